"""Benchmark (not a pytest test): seconds per GRPO step of grpo.py vs TRL's GRPOTrainer on CPU, same tiny model,
same prompts, same config (target: ours <= 0.6x TRL's time).

Run it (on a quiet machine; TRL is a benchmark-only dependency, not in requirements.txt):
    pip install trl==1.16.0            # pulls accelerate; keeps torch and transformers as they are
    python tests/bench_trl.py                          # 2 warm-up + 10 measured steps each, prints a markdown table
    python tests/bench_trl.py --steps 20 --out bench.json

Both sides: B prompts x G completions per step (default 32 x 8 = 256), max new tokens 24, temperature 1, AdamW lr 2e-4
(constant, no weight decay), clip eps 0.2, group-std-scaled advantages, token-mean loss over all the step's completion
tokens, no KL (no reference model), grad-norm clip 1.0, forward/backward in micro-batches of 64, ONE optimizer step
per rollout batch, fp32 on CPU, no gradient checkpointing, no eval or checkpoint inside the timed steps.
  ours: `python grpo.py` as a subprocess; a step's time is time/rollout + time/reward + time/train from metrics.jsonl
        (time/step would also count the final eval and checkpoint of the last step).
  TRL:  GRPOTrainer with loss_type="dapo" (loss = sum over the micro-batch's tokens / tokens of the whole generation
        batch, so the accumulated gradient is the token mean over all B*G completions, as --loss-agg token-mean),
        per_device_train_batch_size=64, gradient_accumulation_steps=B*G/64 and steps_per_generation left at its default
        (= gradient_accumulation_steps): one generation of B*G completions, then one optimizer step on them. A step is
        timed from on_step_begin to on_step_end, which encloses generation, rewards, forward/backward and the optimizer
        (checked: exactly one reward call of B*G completions per step, made inside the timed interval).
The TRL dataset is the exact prompt sequence grpo.py draws (step_problems over the same countdown training problems),
in order (shuffle_dataset=False), so both sides see the same prompts at every step.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
INSTALL = "pip install trl==1.16.0"


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="measured steps per implementation (median over these)")
    p.add_argument("--warmup", type=int, default=2, help="leading steps discarded")
    p.add_argument("--model", default="tiny", help="'tiny' (the built-in model) or a local HF directory")
    p.add_argument("--prompts-per-step", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=2000, help="countdown training problems (as grpo.py --train-size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the results as JSON here")
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0 or (a.prompts_per_step * a.group_size) % a.micro_batch_size:
        p.error("need --steps >= 1, --warmup >= 0 and prompts-per-step x group-size divisible by --micro-batch-size")
    return a


def run_ours(a, model_dir):
    """grpo.py for warmup + steps steps; returns the per-step seconds of the measured steps."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--model", model_dir, "--run-dir", run_dir,
               "--steps", a.warmup + a.steps, "--prompts-per-step", a.prompts_per_step, "--group-size", a.group_size,
               "--max-new-tokens", a.max_new_tokens, "--lr", a.lr, "--micro-batch-size", a.micro_batch_size,
               "--train-size", a.train_size, "--seed", a.seed, "--temperature", 1.0, "--loss-agg", "token-mean",
               "--scale-rewards", "group", "--kl-coef", 0, "--gradient-checkpointing", "off",
               "--eval-every", 0, "--eval-problems", 1, "--eval-samples", 1, "--save-every", 0]
        p = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"grpo.py failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if r["step"] > 0]
    return [r["time/rollout"] + r["time/reward"] + r["time/train"] for r in rows][a.warmup:]


def run_trl(a, model_dir):
    """GRPOTrainer for warmup + steps optimizer steps; returns the per-step seconds of the measured steps."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from common import compute_rewards, countdown_problems, format_prompt, step_problems

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, n = a.warmup + a.steps, a.prompts_per_step * a.group_size
    train_set = countdown_problems(a.train_size, a.seed, "train")  # what grpo.py trains on (load_train_set)
    problems = [p for step in range(total) for p in step_problems(train_set, step, a.prompts_per_step, a.seed)]
    dataset = Dataset.from_list([{"prompt": format_prompt(tokenizer, p), "numbers": p["numbers"],  # plain-text prompts:
                                  "target": p["target"], "task": p["task"]} for p in problems])  # no 2nd chat template

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):  # before the first micro-batch, i.e. before generation
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # after the optimizer step and lr-scheduler step
            self.times.append(time.perf_counter() - self.t0)
            self.t0 = None

    timer = StepTimer()
    calls = []  # (completions, inside a timed step) per reward call; expected: one timed call of B*G per step

    def reward(prompts, completions, numbers, target, task, **_):
        calls.append((len(completions), timer.t0 is not None))
        return compute_rewards([{"numbers": x, "target": t, "task": k} for x, t, k in zip(numbers, target, task)],
                               completions)

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, seed=a.seed,
            max_steps=total, learning_rate=a.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
            beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2, num_iterations=1,
            num_generations=a.group_size, max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0,
            per_device_train_batch_size=a.micro_batch_size, gradient_accumulation_steps=n // a.micro_batch_size,
            shuffle_dataset=False, eval_strategy="no", save_strategy="no", report_to="none",
            logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0)
        assert config.generation_batch_size == n and config.steps_per_generation == config.gradient_accumulation_steps
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # no end-of-training log dict in the output
        trainer.train()
    assert len(timer.times) == total, f"expected {total} optimizer steps, timed {len(timer.times)}"
    assert calls == [(n, True)] * total, f"expected one timed generation of {n} completions per step, got {calls}"
    return timer.times[a.warmup:]


def main():
    a = parse()
    try:
        import trl
    except ImportError:
        print(f"bench_trl.py: TRL is not installed (a benchmark-only dependency): {INSTALL}", file=sys.stderr)
        sys.exit(2)
    import torch

    from common import tiny_model_dir
    model_dir = tiny_model_dir("default") if a.model == "tiny" else a.model
    print(f"running grpo.py: {a.warmup} warm-up + {a.steps} measured steps ...", file=sys.stderr, flush=True)
    ours = run_ours(a, model_dir)
    print(f"running TRL {trl.__version__} GRPOTrainer: {a.warmup} warm-up + {a.steps} measured steps ...",
          file=sys.stderr, flush=True)
    theirs = run_trl(a, model_dir)
    med_ours, med_trl = statistics.median(ours), statistics.median(theirs)
    ratio = med_ours / med_trl
    config = (f"{a.prompts_per_step} prompts x {a.group_size} completions, max new tokens {a.max_new_tokens}, "
              f"lr {a.lr}, micro-batch {a.micro_batch_size}, 1 optimizer step per step, fp32, seed {a.seed}, "
              f"model {os.path.basename(model_dir.rstrip('/'))}")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
               f"trl {trl.__version__}, python {platform.python_version()}")
    print(f"\nconfig: {config}\nmachine: {machine}\n")
    print("| implementation | median s/step | steps measured |\n|---|---|---|")
    print(f"| grpo.py (ours) | {med_ours:.3f} | {len(ours)} |")
    print(f"| TRL GRPOTrainer | {med_trl:.3f} | {len(theirs)} |")
    print(f"\nratio ours/TRL: {ratio:.2f}x (target <= 0.6x: {'met' if ratio <= 0.6 else 'NOT met'})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": config, "machine": machine, "ours_s": ours, "trl_s": theirs, "ours_median_s": med_ours,
                       "trl_median_s": med_trl, "ratio": ratio, "target": 0.6, "args": vars(a)}, f, indent=2)


if __name__ == "__main__":
    main()
