"""The device check: what one GPU can measure that this repository otherwise only plans, in one run, one table last.
For one H100 or H200 with torch and transformers, no vLLM, no `datasets`, no internet: nothing is downloaded (the
models are random-init Qwen2.5 shapes, the tokenizer is trained here on countdown prompts, tests/bench_gpu.py).

    bash tests/gpu_check.sh             # GPU: shapes 0.5b and 1.5b (about 6 minutes on one H100, most of it saving)
    bash tests/gpu_check.sh --smoke     # CPU: the same code on a tiny shape, in about a minute (tests/test_plan.py)

Rows of the table, per shape:
  plan / measured    grpo.py, 3 steps, HF rollouts, --micro-batch-tokens: the plan's peak per rank (the last line
                     it prints at start) against the largest memory/peak_gib it logs (torch.cuda.max_memory_allocated
                     since the previous step, so load, evaluation and every phase count; CPU: peak RSS)
  train tok/s, MFU   the same run's update: (prompt + completion) tokens per second through the update, and
                     6 x parameters x tok/s over the GPU's dense bf16 peak (gradient checkpointing recomputes the
                     forward: the hardware does ~8 x parameters per token, so this MFU is the model-FLOPs one)
  log-probs vs fp32  token_logprobs of 8 random sequences of 512 tokens in bf16, one process (autocast) and through
                     FSDP2 at world size 1 (bf16 parameters, fp32 reduction: what torchrun runs), against fp32 on the
                     same weights: mean and max |difference| in nats per token. Random weights give near-uniform
                     distributions, so these bound the kernels' noise, not a trained model's mismatch
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import bench_gpu  # noqa: E402


def grpo_run(path, a, tmp):
    """(the plan's predicted peak GiB and phase, the largest logged memory/peak_gib, median update tok/s)."""
    run_dir = os.path.join(tmp, os.path.basename(path) + "-run")
    flags = ["--model", path, "--run-dir", run_dir, "--steps", "3", "--prompts-per-step", str(a.prompts),
             "--group-size", "8", "--max-new-tokens", str(a.new_tokens), "--micro-batch-tokens", str(a.micro_tokens),
             "--rollout-backend", "hf", "--lr", "1e-6", "--eval-every", "0", "--eval-problems", "8",
             "--eval-samples", "2", "--save-every", "0"]
    p = subprocess.run([sys.executable, "grpo.py", *flags], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"grpo.py failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    plan = re.search(r"^plan: peak ([\d.]+) GiB per rank \(([^)]+)\)", p.stdout, re.M)
    import json
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = list(map(json.loads, f))
    train = sorted(r["tokens_per_s/train"] for r in rows if r["step"] > 1)
    return float(plan.group(1)), plan.group(2), max(r.get("memory/peak_gib", 0) for r in rows), train[len(train) // 2]


def logprob_check(path, device):
    """Mean and max |log-prob - fp32 log-prob| (nats) of bf16 autocast and of FSDP2 (world 1, bf16 mixed precision)."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    from common import token_logprobs
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (8, 512), generator=g).to(device)  # the tokenizer's range
    attn = torch.ones_like(ids)
    with torch.no_grad():
        ref = token_logprobs(model, ids, attn, 64)[0]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            autocast = token_logprobs(model, ids, attn, 64)[0]
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="tcp://127.0.0.1:29533",
                                    world_size=1, rank=0)
        sharded = copy.deepcopy(model)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in sharded.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(sharded, mp_policy=mp)
        fsdp = token_logprobs(sharded, ids, attn, 64)[0]
    return {name: ((x - ref).abs().mean().item(), (x - ref).abs().max().item())
            for name, x in (("autocast", autocast), ("fsdp2", fsdp))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="the CPU form: a tiny shape, small batches")
    a = p.parse_args()
    import torch
    gpu = torch.cuda.is_available()
    if not gpu and not a.smoke:
        sys.exit("no GPU here: `bash tests/gpu_check.sh --smoke` runs the CPU form")
    a.shapes = ["tiny"] if a.smoke else ["0.5b", "1.5b"]
    a.prompts, a.new_tokens, a.micro_tokens = (4, 16, 256) if a.smoke else (16, 512, 8192)
    device = torch.device("cuda" if gpu else "cpu")
    name = torch.cuda.get_device_name() if gpu else "CPU"
    peak = next((v for k, v in bench_gpu.PEAK_BF16_TFLOPS.items() if k in name), None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shapes:
            path = bench_gpu.model_dir(shape, tmp)
            params = bench_gpu.count_parameters(path)
            print(f"[{shape}] {params / 1e6:.0f}M parameters: grpo.py, 3 steps ...", file=sys.stderr, flush=True)
            plan, phase, measured, tok_s = grpo_run(path, a, tmp)
            print(f"[{shape}] log-probs in bf16 against fp32 ...", file=sys.stderr, flush=True)
            diffs = logprob_check(path, device)
            mfu = 6 * params * tok_s / (peak * 1e12) if peak and gpu else float("nan")
            results.append((shape, params, plan, phase, measured, tok_s, mfu, diffs))
    print(f"\ndevice: {name}, torch {torch.__version__}; grpo.py: {a.prompts} prompts x 8, {a.new_tokens} new tokens, "
          f"--micro-batch-tokens {a.micro_tokens}, HF rollouts\n")
    print("| shape | params | plan peak (phase) | measured peak | plan / measured | train tok/s | MFU | "
          "bf16 autocast vs fp32 (mean / max) | FSDP2 bf16 vs fp32 (mean / max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, params, plan, phase, measured, tok_s, mfu, d in results:
        print(f"| {shape} | {params / 1e6:.0f}M | {plan:.2f} GiB ({phase}) | {measured:.2f} GiB | "
              f"{plan / measured:.2f} | {tok_s:.0f} | {'—' if mfu != mfu else f'{mfu:.1%}'} | "
              f"{d['autocast'][0]:.4f} / {d['autocast'][1]:.3f} | "
              f"{d['fsdp2'][0]:.4f} / {d['fsdp2'][1]:.3f} |")


if __name__ == "__main__":
    main()
