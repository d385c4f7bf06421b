"""Disk bytes of a checkpoint and of the model export, and the host memory rank 0 adds while writing them: the code
before model/ existed (commit 2cc0862: checkpoint/ held the DCP state plus an fp32 model.safetensors, gathered in
full on rank 0 at every save) against this checkout (checkpoint/: the DCP state only; model/: the export).

    git archive 2cc0862 | tar -x -C /tmp/before          # the code before, once (run in the repository)
    OMP_NUM_THREADS=1 python tests/bench_checkpoint.py --before /tmp/before \\
        --models tiny,/root/.cache/explore-rlvr/smollm2-135m-instruct-hf

For each code (before, after) x model x ranks (1, 2), torchrun starts that many processes on the CPU, which load
the model, shard it (FSDP2 at 2 ranks), take one AdamW step so that the optimizer state exists, and call
save_checkpoint once (after: then export_model, in --save-dtype) into a fresh run directory. The table gives `du` of
checkpoint/ and model/ and rank 0's peak resident memory during each call above its resident memory just before
(the kernel's high-water mark VmHWM, reset through /proc/self/clear_refs before each call).

Bytes per checkpoint/ (DCP, over all ranks): fp32 weights 4 B/param + AdamW's two moments 8 B/param = 12 B/param
(before: + 4 B/param of model.safetensors = 16). Per model/: 2 B/param in bf16 (the CUDA default), 4 in fp32.
Not a pytest test (the file name does not match test_*.py).
"""
import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1e6


def resident_mb(field):
    """VmRSS or VmHWM (the peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024 / MB


def peak_while(fn):
    """Run fn(); MB of resident memory at its peak above the resident memory just before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = resident_mb("VmRSS")
    fn()
    return resident_mb("VmHWM") - before


def du_mb(path):
    if not os.path.exists(path):
        return 0.0
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files) / MB


def worker(args):
    """One rank of one case (under torchrun): the save, measured; rank 0 writes the figures to --out."""
    sys.path.insert(0, args.code)  # `import common` picks the code under test
    import torch
    import common
    rank, world, device = common.init_distributed()
    model, tokenizer = common.load_model(args.model, device, rank)
    model = common.shard_model(model, world, device, "off")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.arange(16).view(1, 16)
    model(input_ids=ids).logits.float().mean().backward()
    optimizer.step()  # AdamW's moments now exist: the checkpoint holds them, as a run's does
    params = sum(p.numel() for p in model.parameters())  # a DTensor's numel is the full tensor's
    if rank == 0:
        os.makedirs(args.run_dir)
    common.barrier()
    save_args = [args.run_dir, 1, model, optimizer, tokenizer, rank]  # before: save_checkpoint took the tokenizer
    if "tokenizer" not in inspect.signature(common.save_checkpoint).parameters:
        save_args.remove(tokenizer)
    peak_save = peak_while(lambda: common.save_checkpoint(*save_args))
    peak_export = 0.0
    if hasattr(common, "export_model"):
        flags = SimpleNamespace(export_every=0, steps=1, save_dtype=args.save_dtype)
        peak_export = peak_while(lambda: common.export_model(args.run_dir, 1, model, tokenizer, flags, rank))
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"params": params, "checkpoint_mb": du_mb(os.path.join(args.run_dir, "checkpoint")),
                       "model_mb": du_mb(os.path.join(args.run_dir, "model")), "peak_save_mb": peak_save,
                       "peak_export_mb": peak_export}, f)


def run_case(code, model, ranks, save_dtype, tmp):
    run_dir, out = os.path.join(tmp, "run"), os.path.join(tmp, "out.json")
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           os.path.abspath(__file__), "--worker", "--code", code, "--model", model, "--run-dir", run_dir, "--out", out,
           "--save-dtype", save_dtype]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        sys.exit(f"{code} {model} x{ranks} failed:\n{p.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    shutil.rmtree(run_dir)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="a checkout of commit 2cc0862 (the code before); required")
    p.add_argument("--models", default="tiny", help="comma-separated: 'tiny' or local model directories")
    p.add_argument("--save-dtype", default="bf16", choices=["bf16", "fp32"], help="dtype of the export (after)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--code", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not args.before:
        p.error("--before DIR is required: a checkout of commit 2cc0862 (the docstring's first command)")
    print("| model | params | ranks | code | checkpoint/ MB | B/param | model/ MB | B/param | rank 0 peak +MB: save | "
          "export |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for ranks in (1, 2):
                for label, code in (("before", args.before), ("after", ROOT)):
                    r = run_case(os.path.abspath(code), model, ranks, args.save_dtype, tmp)
                    n = r["params"]
                    print(f"| {os.path.basename(model.rstrip('/'))} | {n / 1e6:.1f}M | {ranks} | {label} | "
                          f"{r['checkpoint_mb']:.1f} | {r['checkpoint_mb'] * MB / n:.2f} | {r['model_mb']:.1f} | "
                          f"{r['model_mb'] * MB / n:.2f} | {r['peak_save_mb']:.0f} | {r['peak_export_mb']:.0f} |",
                          flush=True)


if __name__ == "__main__":
    main()
