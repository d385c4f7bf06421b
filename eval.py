"""Pass@k evaluation of any trained model, and comparison tables and plots of training runs.

Evaluate: a run directory (its model/ export), any Hugging Face model directory, a hub id, or 'tiny':
    python eval.py runs/cmp-grpo-s0 runs/cmp-sps-s0 tiny --datasets countdown --n 64 --out eval/
    python eval.py runs/math-s0 --datasets math500,aime24 --n 16 --max-new-tokens 3072      # real runs, on a GPU
writes eval.md (one row per model x dataset) and eval.json. The numbers come from common.evaluate, the code the
training loop runs: sampling keys depend only on (seed, problem, sample), so with the run's n, temperature, top-p,
seed, problems and max-new-tokens they equal the run's final `eval/...` metrics. --seed also picks the held-out
problems, so keep one seed (default 0) to compare models on the same problems and the same sampling noise.

Check that the verifier reads a dataset's golds (how many parse; the reward of the boxed gold and of the dataset's own
solution text, both 1 when it does):
    python eval.py golds gsm8k=../shared/data/gsm8k --split eval

Compare runs (seeds are grouped into methods by the directory name without its trailing -s<seed>):
    python eval.py compare runs/cmp-*-s* --out docs/ [--labels GRPO,SPS,...]
writes reward.png, entropy.png, pass1.png, passk.png, distinct.png (mean +- std band over seeds) and compare.md.
Upper bounds on passk.png: U1 = the base model's pass@n (the step-0 eval's largest k, averaged over runs).
U2 = union coverage: per seed (each seed has its own held-out problems), the fraction of held-out problems that any
evaluation of any of the given runs solved at least once (from `eval/<dataset>/solved`, logged at every evaluation),
averaged over seeds and datasets. U3 (drawn when sps.py runs are given) = where their final pass@k curve
saturates as a function of log k (the gains per doubling of k extrapolated geometrically), mean over those runs.
"""
import argparse
import json
import os
import re
import sys
import warnings
from types import SimpleNamespace

import numpy as np

from common import (HelpFormatter, UserError, dataset_names, evaluate, fit_prompts, init_distributed, ks_up_to,
                    load_model, load_problems, require)


# ============================================================================ evaluate models
def resolve_model(path):
    """(model name for load_model, the run's config dict or {}) for a run dir, a model dir, a hub id or 'tiny'."""
    if path == "tiny" or (not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path)):
        return path, {}  # built-in model or hub id: load_model says if it cannot load it
    require(os.path.isdir(path), f"'{path}' is not a run directory, a model directory, a hub id or 'tiny'")
    if os.path.exists(os.path.join(path, "metrics.jsonl")) or os.path.isdir(os.path.join(path, "checkpoint")):
        export = os.path.join(path, "model")
        require(os.path.isfile(os.path.join(export, "config.json")), f"run directory '{path}' has no model/ yet (the "
                "weights are exported at the end of the run and every --export-every steps): let it finish, "
                "continue it with --resume, or pass a model directory")
        return export, read_json(os.path.join(path, "config.json"))
    require(os.path.isfile(os.path.join(path, "config.json")), f"'{path}' is not a run directory (no metrics.jsonl) "
            "nor a model directory (no config.json)")
    return path, read_json(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))  # a run's model/


def read_json(path):
    return json.load(open(path)) if os.path.isfile(path) else {}


def evaluate_models(args):
    """common.evaluate for every model x dataset; writes eval.json and eval.md into --out and prints the table."""
    rank, _, device = init_distributed()
    names = dataset_names(args.datasets)  # {name: spec}: NAME=PATH, or a short name (a file's stem)
    require(names, "--datasets is empty: pass e.g. countdown or math500,aime24")
    require(args.n >= 1 and args.problems >= 0 and args.temperature >= 0 and 0 < args.top_p <= 1
            and (args.max_new_tokens or 1) >= 1,
            "--n must be >= 1, --problems >= 0, --temperature >= 0, --top-p in (0, 1] and --max-new-tokens >= 1")
    rows, resolved = [], [resolve_model(p) for p in args.paths]  # bad paths and datasets fail before any evaluation
    sets = {d: load_problems(spec, split="eval", n=args.problems or None, seed=args.seed) for d, spec in names.items()}
    for path, (name, config) in zip(args.paths, resolved):
        settings = SimpleNamespace(max_new_tokens=args.max_new_tokens or config.get("max_new_tokens", 24),
                                   max_prompt_tokens=config.get("max_prompt_tokens", 1024))
        model, tokenizer = load_model(name, device, rank)
        for dataset, problems in sets.items():
            problems = fit_prompts(problems, tokenizer, model, settings, dataset)
            metrics, _ = evaluate(model, tokenizer, problems, args.n, args.temperature, args.top_p,
                                  settings.max_new_tokens, args.seed, device)
            rows.append({"model": path.rstrip("/"), "dataset": dataset, "problems": len(problems),
                         "max_new_tokens": settings.max_new_tokens, **metrics})
    if rank != 0:
        return
    keys = [f"pass@{k}" for k in ks_up_to(args.n)] + [f"avg@{args.n}", "greedy", "distinct_correct", "entropy"]
    lines = [f"Held-out evaluation: n = {args.n} samples per problem, temperature {args.temperature}, "
             f"top-p {args.top_p}, seed {args.seed}; pass@k unbiased (Chen et al. 2021).", "",
             "| model | dataset | problems | max new tokens | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---" * (len(keys) + 4) + "|"]
    lines += [f"| {r['model']} | {r['dataset']} | {r['problems']} | {r['max_new_tokens']} | "
              + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in rows]
    settings = {k: getattr(args, k) for k in ("datasets", "n", "temperature", "top_p", "problems", "seed")}
    write_outputs(args.out, {"eval.json": json.dumps({"settings": settings, "results": rows}, indent=2),
                             "eval.md": "\n".join(lines) + "\n"})
    print("\n".join(lines))


def write_outputs(out, files):
    os.makedirs(out, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)


# ============================================================================ compare runs
def load_run(path):
    """metrics.jsonl rows of a finished run, or None (with a warning) when it has no final checkpoint yet."""
    metrics = os.path.join(path, "metrics.jsonl")
    require(os.path.isfile(metrics), f"'{path}' is not a run directory: it has no metrics.jsonl")
    state = read_json(os.path.join(path, "checkpoint", "trainer_state.json"))
    config = read_json(os.path.join(path, "config.json"))
    if "step" not in state or state["step"] < config.get("steps", 0):
        warnings.warn(f"skipping {path}: no final checkpoint/trainer_state.json (still running or interrupted)")
        return None
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    require(any("eval/pass@1" in r for r in rows), f"'{path}' has no evaluation in metrics.jsonl")
    return rows


def group_runs(paths):
    """{method: [rows of each seed]}, methods in order of first appearance; a method is a run dir name minus
    -s<seed>."""
    methods = {}
    for path in paths:
        rows = load_run(path)
        if rows is not None:
            methods.setdefault(re.sub(r"-s\d+$", "", os.path.basename(os.path.normpath(path))), []).append(rows)
    require(methods, "none of the given runs has finished (no final checkpoint/trainer_state.json)")
    return methods


def mean_std(values):
    """Mean and sample std (ddof 1; 0 for a single seed) over seeds, along axis 0."""
    v = np.asarray(values, dtype=float)
    return v.mean(0), (v.std(0, ddof=1) if len(v) > 1 else np.zeros_like(v.mean(0)))


def series(runs, key, smooth=1):
    """(steps, [seeds, steps] values) of `key` at the steps every seed logged, each seed smoothed by a moving
    average."""
    steps = sorted(set.intersection(*[{r["step"] for r in rows if key in r} for rows in runs]))
    if not steps:
        return np.array([]), np.zeros((len(runs), 0))
    values = np.array([[next(r[key] for r in rows if r["step"] == s and key in r) for s in steps] for rows in runs])
    w = min(smooth, len(steps))
    if w > 1:  # trailing window: the value at step s averages steps s-w+1 .. s
        values = np.array([np.convolve(v, np.ones(w) / w, mode="valid") for v in values])
        steps = steps[w - 1:]
    return np.array(steps), values


def final_eval(rows):
    return [r for r in rows if "eval/pass@1" in r][-1]


def plot(methods, labels, key, ylabel, path, smooth=1, xlabel="step", bounds=()):
    """One PNG: a line per method (mean over seeds) with a +- std band; key may be 'passk' for the final pass@k
    curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for (method, runs), label in zip(methods.items(), labels):
        if key == "passk":
            ks = sorted(set.intersection(*[{int(k[10:]) for k in final_eval(rows) if k.startswith("eval/pass@")}
                                           for rows in runs]))
            x, values = np.array(ks), np.array([[final_eval(rows)[f"eval/pass@{k}"] for k in ks] for rows in runs])
        else:
            x, values = series(runs, key, smooth)
        if len(x) == 0:
            continue
        mean, std = mean_std(values)
        line, = ax.plot(x, mean, marker="o" if key == "passk" else None, markersize=3,
                        label=f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    for value, text, style in bounds:
        ax.axhline(value, color={"--": "gray", ":": "black"}.get(style, "tab:brown"), linestyle=style, linewidth=1,
                   label=f"{text} = {value:.3f}")
    if key == "passk":
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(k) for k in x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def upper_bounds(runs, k):
    """(U1, U2, U3), the lines on passk.png, from finished runs [(config.json dict, metric rows)]; NaN where no run has
    what a bound needs. The definitions are UNCONFIRMED readings of the SPS paper's "empirical upper bound on pass@k".
    U1 = the base model's pass@k (k: the largest every run logged) from each run's step-0 evaluation, mean over runs.
    U2 = union coverage: per seed (each seed holds its own held-out problems), the fraction of held-out problems that
    any evaluation of any run solved (`eval/<dataset>/solved`, logged at every evaluation), averaged over seeds and
    datasets. U3 = where the final pass@k curve of each sps.py run saturates as k doubles (saturation), mean."""
    u1 = [rows[0][f"eval/pass@{k}"] for _, rows in runs if rows[0]["step"] == 0 and f"eval/pass@{k}" in rows[0]]
    union, sizes = {}, {}  # (seed, "eval/<dataset>/solved") -> problems solved by any evaluation; how many there are
    for config, rows in runs:
        for r in rows:
            for key in [name for name in r if name.endswith("/solved")]:
                union.setdefault((config.get("seed", 0), key), set()).update(r[key])
                sizes[config.get("seed", 0), key] = r[key[:-len("solved")] + "problems"]
    u3 = []
    for config, rows in runs:
        if config.get("script") == "sps":
            f = final_eval(rows)  # its pass@1, pass@2, pass@4, ..., pass@n
            n = max(int(key[10:]) for key in f if key.startswith("eval/pass@"))
            u3.append(saturation([f[f"eval/pass@{i}"] for i in ks_up_to(n)]))
    u2 = [len(union[x]) / sizes[x] for x in union]
    return tuple(float(np.mean(x)) if x else float("nan") for x in (u1, u2, u3))


def saturation(pass_at):
    """U3 of one run: the level pass@k saturates at as k grows, from pass@k at k = 1, 2, 4, ..., n (a list): the gains
    per doubling of k are extrapolated geometrically (ratio of the last two gains); 1.0 if they do not shrink (no
    saturation seen), the last value if the curve is flat."""
    if len(pass_at) < 3:
        return pass_at[-1]
    prev, last = pass_at[-2] - pass_at[-3], pass_at[-1] - pass_at[-2]
    if last <= 0:
        return pass_at[-1]
    if prev <= last:
        return 1.0
    r = last / prev
    return min(1.0, pass_at[-1] + last * r / (1 - r))


def compare(args):
    """Figures (one PNG each) and compare.md: final held-out metrics, mean +- std over seeds per method."""
    methods = group_runs(args.runs)
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else list(methods)
    require(len(labels) == len(methods),
            f"--labels has {len(labels)} names for {len(methods)} methods ({', '.join(methods)})")
    all_runs = [rows for runs in methods.values() for rows in runs]
    kmax = min(max(int(k[10:]) for k in final_eval(rows) if k.startswith("eval/pass@")) for rows in all_runs)
    k8 = max(k for k in ks_up_to(kmax) if k <= 8)
    finished = [(read_json(os.path.join(p, "config.json")), rows) for p in args.runs if (rows := load_run(p))]
    u1, u2, u3 = upper_bounds(finished, kmax)
    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, name)
    plot(methods, labels, "reward/mean", "training reward (moving avg, 10 steps)", out("reward.png"), smooth=10)
    plot(methods, labels, "entropy/mean", "training entropy (nats/token)", out("entropy.png"))
    plot(methods, labels, "eval/pass@1", "held-out pass@1", out("pass1.png"))
    plot(methods, labels, "eval/distinct_correct", "distinct correct answers / problem", out("distinct.png"))
    bounds = [(u1, f"U1: base pass@{kmax}", "--")] + [b for b in [(u2, "U2: solved by any run at any eval", ":"),
                                                                  (u3, "U3: sps.py's pass@k saturation", "-.")]
                                                        if not np.isnan(b[0])]
    plot(methods, labels, "passk", "final held-out pass@k", out("passk.png"), xlabel="k", bounds=bounds)
    keys = ["pass@1", f"pass@{k8}", f"pass@{kmax}", "greedy", "entropy", "distinct_correct"]
    lines = [f"Final held-out evaluation per method: mean ± std (sample std) over seeds; pass@{kmax} is the largest k "
             f"every run logged. U1 (base pass@{kmax}) = {u1:.3f}; U2 (fraction of held-out problems solved by any run "
             f"at any evaluation, per seed, averaged over seeds) = {u2:.3f}.", "",
             "| method | seeds | final step | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---" * (len(keys) + 3) + "|"]
    for (method, runs), label in zip(methods.items(), labels):
        finals = [final_eval(rows) for rows in runs]
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(*mean_std([[f[f"eval/{k}"] for k in keys] for f in finals]))]
        steps = ", ".join(sorted({str(f["step"]) for f in finals}))
        lines.append(f"| {label} | {len(runs)} | {steps} | " + " | ".join(cells) + " |")
    write_outputs(args.out, {"compare.md": "\n".join(lines) + "\n"})
    print("\n".join(lines))
    print("figures: "
          f"{', '.join(out(n) for n in ('reward.png', 'entropy.png', 'pass1.png', 'passk.png', 'distinct.png'))}")


# ============================================================================ check a dataset's golds
def as_completion(answer):
    r"""A dataset's own solution text as a completion: GSM8K's final `#### X` line becomes \boxed{X}; a text with a
    \boxed{} stays as it is; a bare answer (MATH-500, AIME) is boxed."""
    text = str(answer[0] if isinstance(answer, (list, tuple)) else answer)
    if "####" in text:
        head, _, final = text.rpartition("####")
        return f"{head.rstrip()}\nThe answer is \\boxed{{{final.strip()}}}."
    return text if "\\boxed" in text or "\\fbox" in text else f"\\boxed{{{text}}}"


def check_golds(args):
    r"""For each dataset: how many golds math-verify parses, and the reward of \boxed{gold} and of the dataset's own
    solution text (final answer boxed): both 1 for a dataset whose golds the verifier reads correctly; \boxed{gold+1},
    a wrong answer, should score 0."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from common import compute_rewards
    lines = ["| dataset | split | problems | golds math-verify parses | reward of \\boxed{gold} | "
             "reward of the solution text, final answer boxed | reward of \\boxed{gold+1} |", "|---" * 7 + "|"]
    for name, spec in dataset_names(args.datasets).items():
        problems = load_problems(spec, split=args.split, prompt_field=args.prompt_field, answer_field=args.answer_field,
                                 n=args.problems or None, keep_answer=True)
        golds = [g for p in problems for g in (p["gold"] if isinstance(p["gold"], list) else [p["gold"]])]
        parsed = sum(bool(parse("\\boxed{" + g + "}", [LatexExtractionConfig(), ExprExtractionConfig()],
                                parsing_timeout=5)) for g in golds)
        first = [p["gold"] if isinstance(p["gold"], str) else p["gold"][0] for p in problems]
        boxed = compute_rewards(problems, [f"\\boxed{{{g}}}" for g in first])
        solution = compute_rewards(problems, [as_completion(p["answer"]) for p in problems])
        wrong = compute_rewards(problems, [f"\\boxed{{{g}+1}}" for g in first])  # a control: should be 0
        lines.append(f"| {name} | {args.split} | {len(problems)} | {parsed} of {len(golds)} | {np.mean(boxed):.4f} | "
                     f"{np.mean(solution):.4f} ({sum(s < 1 for s in solution)} below 1) | {np.mean(wrong):.4f} |")
    print("\n".join(lines))


# ============================================================================ command line
def parse(argv):
    """`compare RUN...`, `golds DATASET...` or `RUN_OR_MODEL...` (evaluate)."""
    if argv[:1] == ["golds"]:
        p = argparse.ArgumentParser(prog="eval.py golds", description="check that the verifier reads a dataset's golds")
        p.add_argument("datasets",
                       help="comma-separated datasets, as --eval-datasets (e.g. gsm8k=../shared/data/gsm8k)")
        p.add_argument("--split", default="eval", help="train, or eval: the held-out split")
        p.add_argument("--problems", type=int, default=0, help="problems per dataset (0 = all)")
        p.add_argument("--prompt-field", default=None, help="column holding the question (default: the preset's)")
        p.add_argument("--answer-field", default=None, help="column holding the gold answer (default: the preset's)")
        return check_golds, p.parse_args(argv[1:])
    if argv[:1] == ["compare"]:
        p = argparse.ArgumentParser(prog="eval.py compare", description="plots and a table comparing training runs")
        p.add_argument("runs", nargs="+", help="run directories; NAME-s<seed> directories are seeds of method NAME")
        p.add_argument("--out", default="docs", help="folder for the PNGs and compare.md")
        p.add_argument("--labels", default="", help="comma-separated method names for legends and the table, in order")
        return compare, p.parse_args(argv[1:])
    p = argparse.ArgumentParser(
        prog="eval.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
        usage="eval.py [-h] RUN_OR_MODEL... [--flags]  |  eval.py compare RUN...  |  eval.py golds DATASET...",
        epilog="subcommands (each has its own --help):\n"
               "  eval.py compare RUN...     plots and a table comparing training runs\n"
               "  eval.py golds DATASET...   check that the verifier reads a dataset's golds")
    p.add_argument("paths", nargs="+", help="run directories (their model/), model directories, hub ids or 'tiny'")
    p.add_argument("--datasets", default="countdown", help="comma-separated eval datasets (countdown, math500, aime24, "
                   "a local file, NAME=PATH, PRESET=PATH, ...)")
    p.add_argument("--n", type=int, default=64, help=(
        "samples per problem (pass@k for k = 1, 2, 4, ..., n). 64, not training's --eval-samples 16: a final "
        "evaluation can afford more samples, which reach larger k and estimate pass@1 with less noise; --n 16 "
        "reproduces a run's own eval/ metrics"))
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's config.json, else 24")
    p.add_argument("--problems", type=int, default=100, help="problems per dataset (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="picks the problems and the sampling keys")
    p.add_argument("--out", default="eval", help="folder for eval.md and eval.json")
    return evaluate_models, p.parse_args(argv)


if __name__ == "__main__":
    command, args = parse(sys.argv[1:])
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
    try:
        command(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if "torch" in sys.modules and sys.modules["torch"].distributed.is_initialized():
            sys.modules["torch"].distributed.destroy_process_group()
