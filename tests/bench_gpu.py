"""Benchmark 3 (a script, not a pytest test): GRPO steps with random-init Qwen2.5-0.5B- and 1.5B-shaped models
(no weights needed), bf16 on CUDA: rollout tokens/s of padded HF `generate` vs vLLM's paged, continuously batched
engine; training tokens/s and model-FLOPs utilisation (MFU) of the update phase; peak memory; seconds per step; at
64 prompts x 8 completions x 1024 new tokens (the defaults).

Run it on a CUDA machine (vLLM is optional: without it only the hf rows are measured):
    pip install vllm==0.32.0
    python tests/bench_gpu.py                          # shapes 0.5b and 1.5b x backends hf and vllm, 3 steps each
    python tests/bench_gpu.py --shapes 1.5b --backends vllm --steps 5 --out bench_gpu.json
Smoke run anywhere (a tiny body with Qwen's 151,936-token vocabulary; fp32 on CPU, hf only):
    python tests/bench_gpu.py --shapes tiny --backends hf --prompts 4 --group-size 2 --new-tokens 16 \
        --micro-batch-size 4

How: each (shape, backend) runs grpo.py itself, as a subprocess, on a model directory written here (the Qwen2.5 config
of that shape, random init, seed 0, saved with a byte-level BPE tokenizer trained on countdown prompts). Random weights
almost never sample EOS, so completions run to --new-tokens: a fixed amount of work per step. Prompts are the built-in
countdown prompts. Per step, from its metrics.jsonl, then the median over the steps after --warmup:
  rollout tok/s   completion tokens / time/rollout (vllm: including wake-up, the weight push and sleep)
  train tok/s     (prompt + completion) tokens through the update / time/train (forward, backward, optimizer step)
  MFU             6 x parameters x train tok/s / the GPU's dense bf16 peak (--peak-tflops; H100 and H200: 989)
  peak GiB        memory/peak_gib: torch's CUDA allocations (with vllm, its weights and KV cache too); CPU: peak RSS
  s/step          time/rollout + time/reward + time/train (no evaluation, no checkpoint)
"""
import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
            hidden_act="silu")
SHAPES = {  # the published Qwen2.5 configs' shapes; "tiny" keeps Qwen's vocabulary for a CPU smoke run
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, no sparsity


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default="0.5b,1.5b", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--backends", default="hf,vllm",
                   help="comma-separated: hf (padded generate), vllm (colocated engine)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="steps per run")
    p.add_argument("--warmup", type=int, default=1, help="leading steps dropped")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="dense bf16 peak of the GPU (0: from the device name)")
    p.add_argument("--model-root", default="", help="where the random-init model directories go (default: a temp dir)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    a = p.parse_args()
    a.shapes, a.backends = a.shapes.split(","), a.backends.split(",")
    bad = [s for s in a.shapes if s not in SHAPES] + [b for b in a.backends if b not in ("hf", "vllm")]
    if bad or a.steps <= a.warmup or a.warmup < 0:
        p.error(f"unknown shape/backend {bad}" if bad else "need --steps > --warmup >= 0")
    return a


def model_dir(shape, root):
    """A Qwen2.5-shaped model with random weights (fp32, seed 0) and a small byte-level tokenizer, saved under root."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tasks import countdown_problems, train_tiny_tokenizer
    path = os.path.join(root, f"qwen2.5-{shape}-shaped-random")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tokenizer = train_tiny_tokenizer([p["prompt"] for p in countdown_problems(2000, 0)], 512)
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN, **SHAPES[shape], bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def count_parameters(path):
    """Parameters of a saved model, from the safetensors headers (tied embeddings are stored, and counted, once)."""
    from safetensors import safe_open
    n = 0
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                n += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return n


def prompt_tokens(path, a):
    """Prompt tokens of every completion of each step, as grpo.py draws them (so the update's token count is exact)."""
    from transformers import AutoTokenizer

    from common import countdown_problems, format_prompt, step_problems
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_set = countdown_problems(2000, 0, "train")  # grpo.py's default --train-size and --seed
    return [a.group_size * sum(len(tokenizer(format_prompt(tokenizer, p), add_special_tokens=False).input_ids)
                               for p in step_problems(train_set, step, a.prompts, 0)) for step in range(a.steps)]


def run(path, backend, a, tmp):
    """grpo.py for a.steps steps; returns its metrics.jsonl rows after step 0."""
    run_dir = os.path.join(tmp, f"{os.path.basename(path)}-{backend}")
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--model", path, "--run-dir", run_dir, "--steps", a.steps,
           "--prompts-per-step", a.prompts, "--group-size", a.group_size, "--max-new-tokens", a.new_tokens,
           "--micro-batch-size", a.micro_batch_size, "--rollout-backend", backend, "--lr", 1e-6,
           "--eval-every", 0, "--eval-problems", 1, "--eval-samples", 1, "--save-every", 0]
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"grpo.py --rollout-backend {backend} failed (exit "
                 f"{p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["step"] > 0]
    shutil.rmtree(run_dir)  # its final checkpoint/ (12 B per parameter) and model/ (2): ~21 GB at 1.5B, not needed
    return rows


def main():
    a = parse()
    import torch
    cuda = torch.cuda.is_available()
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    device = torch.cuda.get_device_name(0) if cuda else cpu
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), 0.0)
    if "vllm" in a.backends:
        import importlib.util
        if not (cuda and importlib.util.find_spec("vllm")):
            print("vllm rows skipped: they need CUDA and `pip install vllm==0.32.0` (CPU: tests/bench_vllm.py)",
                  file=sys.stderr)
            a.backends = [b for b in a.backends if b != "vllm"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = a.model_root or tmp
        for shape in a.shapes:
            print(f"[{shape}] writing the random-init model ...", file=sys.stderr, flush=True)
            path = model_dir(shape, root)
            n_params = count_parameters(path)
            prompts = prompt_tokens(path, a)
            for backend in a.backends:
                print(f"[{shape}] grpo.py --rollout-backend {backend}: {a.steps} steps ...", file=sys.stderr,
                      flush=True)
                rows = run(path, backend, a, tmp)[a.warmup:]
                completion = [r["completion/mean_len"] * a.prompts * a.group_size for r in rows]
                train_tps = [(prompts[r["step"] - 1] + c) / r["time/train"] for r, c in zip(rows, completion)]
                med = statistics.median
                results.append({
                    "shape": shape, "backend": backend, "params_M": n_params / 1e6, "steps": len(rows),
                    "rollout_tok_s": med(c / r["time/rollout"] for r, c in zip(rows, completion)),
                    "train_tok_s": med(train_tps),
                                "mfu": med(6 * n_params * t / (peak * 1e12) for t in train_tps) if peak else None,
                    "peak_gib": max(r["memory/peak_gib"] for r in rows),
                    "s_per_step": med(r["time/rollout"] + r["time/reward"] + r["time/train"] for r in rows),
                    "mean_completion_len": med(r["completion/mean_len"] for r in rows)})
    config = (f"{a.prompts} prompts x {a.group_size} completions x {a.new_tokens} new tokens, "
              f"micro-batch {a.micro_batch_size}, {'bf16' if cuda else 'fp32'}, one optimizer step per step, "
              f"median of {a.steps - a.warmup} steps after {a.warmup} warm-up")
    machine = f"{device}, torch {torch.__version__}" + (
        f", peak {peak:g} TFLOPS bf16" if peak else ", no MFU (unknown peak: --peak-tflops)")
    print(f"\nconfig: {config}\nmachine: {machine}\n")
    print("| shape | params (M) | rollout | rollout tok/s | train tok/s | MFU | peak GiB | s/step "
          "| mean completion len |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "—"
        print(f"| {r['shape']} | {r['params_M']:.0f} | {r['backend']} | {r['rollout_tok_s']:.0f} "
              f"| {r['train_tok_s']:.0f} | {mfu} | {r['peak_gib']:.1f} | {r['s_per_step']:.2f} "
              f"| {r['mean_completion_len']:.0f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": config, "machine": machine, "results": results, "args": vars(a)}, f, indent=2)


if __name__ == "__main__":
    main()
