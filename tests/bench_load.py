"""Host memory of loading under torchrun, and gradient memory during accumulation, for two checkouts side by side.

    OMP_NUM_THREADS=1 python tests/bench_load.py --model /path/to/SmolLM2-135M-Instruct --before /path/to/old/checkout

For each checkout (this one, and --before if given) it runs `torchrun --nproc_per_node 2` (CPU, gloo) of itself as a
worker that imports that checkout's common.py and, on every rank:
  1. loads and shards the model as the scripts do (load_model, then shard_model), and reads the process's host memory:
     VmRSS before loading, the peak VmHWM after loading and sharding, VmRSS after;
  2. runs 4 micro-batches of 2 rows x 64 tokens as the scripts' update does (common.micro_batches) and, after the
     first one's backward, counts the gradient bytes this rank holds: the sharded .grad of every parameter plus any
     unsharded gradient FSDP2 keeps for later (FSDPParam.unsharded_accumulated_grad, or the unsharded parameter's
     .grad when there is no reduce dtype, as on CPU).
Then prints one table. The model's fp32 size is printed with it: a rank that holds only its shard needs about half.
A checkout older than --micro-batch-tokens has micro_batches(model, rows, size, world); this one has
micro_batches(rows, mask, P, args). Nothing is timed."""
import argparse
import inspect
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def memory_mib(key):
    """VmRSS (now) or VmHWM (peak) of this process, MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def worker(code, model_path):
    sys.path.insert(0, code)
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    import common
    rank, world, device = common.init_distributed()
    before = memory_mib("VmRSS")
    if "world" in inspect.signature(common.load_model).parameters:
        model, _ = common.load_model(model_path, device, rank, world)
    else:  # the older code: every rank reads the whole model
        model, _ = common.load_model(model_path, device, rank)
    model = common.shard_model(model, world, device, "off").train()
    peak, after = memory_mib("VmHWM"), memory_mib("VmRSS")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (8, 64))  # [8, 64]: 32 prompt + 32 completion tokens per row
    attn = torch.ones_like(ids)
    mask = torch.ones(8, 32)  # [8, 32]
    rows = torch.arange(8)
    if "model" in inspect.signature(common.micro_batches).parameters:
        parts = common.micro_batches(model, rows, 2, world)  # sync off until the last micro-batch
    else:
        parts = common.micro_batches(rows, mask, 32, SimpleNamespace(micro_batch_size=2, micro_batch_tokens=0))
    fsdp_params = [p for m in model.modules() if isinstance(m, FSDPModule)
                   for p in m._get_fsdp_state()._fsdp_param_group.fsdp_params]
    grad_bytes = None
    for j, m in enumerate(parts):
        logp, _ = common.token_logprobs(model, ids[m], attn[m], 32)
        (logp * mask[m]).sum().backward()
        if j == 0:
            sharded = sum(p.grad.to_local().numel() * p.grad.element_size() for p in model.parameters()
                          if p.grad is not None)
            held = [g for p in fsdp_params for g in (p.unsharded_accumulated_grad, p._unsharded_param.grad)
                    if g is not None]
            unsharded = sum(g.numel() * g.element_size() for g in held)
            grad_bytes = {"sharded": sharded, "unsharded": unsharded}
    print("RESULT " + json.dumps({"rank": rank, "rss_before": before, "peak": peak, "rss_after": after,
                                  "model_mib": model_bytes / 2 ** 20,
                                  "grad_mib": (grad_bytes["sharded"] + grad_bytes["unsharded"]) / 2 ** 20,
                                  "unsharded_grad_mib": grad_bytes["unsharded"] / 2 ** 20}), flush=True)
    dist.destroy_process_group()


def measure(code, model_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), "--worker", "--code", code, "--model", model_path]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        sys.exit(f"{code}: the workers failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    results = [json.loads(line[len("RESULT "):]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    return sorted(results, key=lambda r: r["rank"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local HF model directory (or 'tiny')")
    parser.add_argument("--before", help="another checkout to compare with (e.g. a worktree of an older commit)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", default=os.path.dirname(HERE), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.code, args.model)
    runs = ([("before", args.before)] if args.before else []) + [("after", os.path.dirname(HERE))]
    print(f"2 ranks, CPU (gloo), --model {args.model}; host memory in MiB; gradient after the first of 4 "
          f"micro-batches' backward")
    print("| code | rank | RSS before load | peak RSS after load + shard | RSS after | model fp32 | "
          "gradient held | of it unsharded |")
    print("|---|---|---|---|---|---|---|---|")
    for name, code in runs:
        for r in measure(os.path.abspath(code), args.model):
            print(f"| {name} ({code}) | {r['rank']} | {r['rss_before']:.0f} | {r['peak']:.0f} | {r['rss_after']:.0f} | "
                  f"{r['model_mib']:.0f} | {r['grad_mib']:.0f} | {r['unsharded_grad_mib']:.0f} |")


if __name__ == "__main__":
    main()
