"""Memory benchmark of common.token_logprobs: peak RSS of per-token log-probs + entropy for a batch of
[8, 2048] tokens with Qwen's 151,936-token vocabulary, next to the naive computation that materialises the full
[B, T, V] float32 logits (~10 GB for [8, 2048] on their own).

    python tests/bench_memory.py [--threads 1] [--out bench_memory.json]

The model is a random-init Qwen2 with Qwen's vocabulary and a deliberately tiny body (hidden 64, 1 layer), float32
on the CPU: its activations are a few MB, so the figures isolate the vocabulary-sized part, the [tokens, V] logits.
Each case runs in a fresh subprocess; peak RSS is getrusage(RUSAGE_SELF).ru_maxrss, read once after the model
and inputs are built (the baseline) and once after the computation. Cases:
  ours, no grad   token_logprobs under torch.no_grad(), start=1 (every position is completion), several chunks
  ours, grad      the same in grad mode plus (logp.sum() + entropy.sum()).backward()
  naive           model(...).logits [B, T, V], log_softmax, gather, entropy = -(p * log p).sum(-1); measured on
                  [1, 1024] and [1, 2048] (the [8, 2048] case would not fit in this machine's memory) and
                  extrapolated linearly in B*T to [8, 2048]
Before any of that, ours is checked against the naive computation (values and gradients) on a [1, 256] slice,
so the benchmark cannot report memory for wrong math. Not a pytest test (the file name does not match test_*.py)."""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, B, T = 151936, 8, 2048
GIB = 2 ** 30
FULL_BYTES = B * T * V * 4  # the [8, 2048, 151936] float32 logits alone
CASES = ([("ours, no grad", B, T, c) for c in (4096, 1024, 256)] + [("ours, grad", B, T, c) for c in (1024, 256)]
         + [("naive", 1, 1024, None), ("naive", 1, 2048, None)])


# ---------------------------------------------------------------------------------------- runs in the subprocess
def build(threads, batch, length):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=V, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2,
                         intermediate_size=128, max_position_embeddings=4096, tie_word_embeddings=False)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = torch.randint(0, V, (batch, length))
    return model, ids, torch.ones_like(ids)


def naive(model, ids, attn, start):
    """The textbook computation: the full [B, T, V] float32 logits, then log_softmax, gather and entropy."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, start - 1:-1]  # [B, T-start, V]
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, start:, None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def child_check(threads):
    """ours vs naive on [1, 256] (chunk 100, so several chunks and a ragged last one): values and gradients."""
    from common import token_logprobs
    model, ids, attn = build(threads, 1, 256)
    params = [model.lm_head.weight, model.model.embed_tokens.weight]
    out = {}
    for name, fn in (("ours", lambda: token_logprobs(model, ids, attn, 1, chunk=100)),
                     ("naive", lambda: naive(model, ids, attn, 1))):
        model.zero_grad()
        logp, ent = fn()
        (logp.sum() + ent.sum()).backward()
        out[name] = (logp.detach(), ent.detach(), [p.grad.clone() for p in params])
    (lp1, e1, g1), (lp2, e2, g2) = out["ours"], out["naive"]
    return {"logp": (lp1 - lp2).abs().max().item(), "entropy": (e1 - e2).abs().max().item(),
            "grad": max((a - b).abs().max().item() for a, b in zip(g1, g2)),
            "grad_scale": max(b.abs().max().item() for b in g2)}


def child_case(threads, kind, batch, length, chunk):
    import resource
    import torch
    from common import token_logprobs
    model, ids, attn = build(threads, batch, length)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    t0 = time.perf_counter()
    if kind == "naive":
        with torch.no_grad():
            logp, ent = naive(model, ids, attn, 1)
    elif kind == "ours, no grad":
        with torch.no_grad():
            logp, ent = token_logprobs(model, ids, attn, 1, chunk=chunk)
    else:
        logp, ent = token_logprobs(model, ids, attn, 1, chunk=chunk)
        (logp.sum() + ent.sum()).backward()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert logp.shape == ent.shape == (batch, length - 1) and torch.isfinite(ent).all()
    return {"baseline": before, "peak": after, "seconds": seconds, "torch": torch.__version__}


# ---------------------------------------------------------------------------------------- the parent (stdlib only)
def spawn(threads, *spec):
    """Run one measurement in a fresh interpreter; the parent stays small (no torch) so it cannot inflate the peak."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"case {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each measurement (default 1)")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, ROOT)
        spec = json.loads(args.child)
        result = child_check(args.threads) if spec[0] == "check" else child_case(args.threads, *spec)
        print("RESULT " + json.dumps(result))
        return

    check = spawn(args.threads, "check")
    print(f"check vs naive on [1, 256], chunk 100: max |diff| logp {check['logp']:.2e}, "
          f"entropy {check['entropy']:.2e}, grads {check['grad']:.2e} "
          f"(largest grad entry {check['grad_scale']:.2e})", flush=True)
    if max(check["logp"], check["entropy"]) > 1e-4 or check["grad"] > 1e-4 * max(1.0, check["grad_scale"]):
        sys.exit("token_logprobs disagrees with the naive computation; not reporting memory for wrong math")
    rows = []
    for kind, batch, length, chunk in CASES:
        r = spawn(args.threads, kind, batch, length, chunk)
        rows.append(dict(case=kind, batch=batch, length=length, chunk=chunk, **r))
        print(f"  done: {kind} [{batch}, {length}] chunk {chunk}: peak {r['peak'] / GIB:.2f} GiB, {r['seconds']:.1f} s",
              flush=True)

    # naive, extrapolated: increase over baseline = a + b * tokens, fitted through the two measured naive shapes
    (n1, i1), (n2, i2) = [(r["batch"] * r["length"], r["peak"] - r["baseline"]) for r in rows if r["case"] == "naive"]
    slope = (i2 - i1) / (n2 - n1)
    increase = i2 + slope * (B * T - n2)
    base = rows[-1]["baseline"]
    rows.append(dict(case="naive (extrapolated)", batch=B, length=T, chunk=None, baseline=base, peak=base + increase,
                     seconds=None))

    print(f"\nmachine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {rows[0]['torch']} (CPU, {args.threads} thread(s)); Qwen2 random init, vocab {V:,}, tiny body "
          f"(hidden 64, 1 layer), float32")
    print(f"full [{B}, {T}, {V}] float32 logits tensor alone: {FULL_BYTES:,} B = {FULL_BYTES / 1e9:.2f} GB = "
          f"{FULL_BYTES / GIB:.2f} GiB; one chunk of c rows is c x {V} x 4 B (4096: {4096 * V * 4 / GIB:.2f} GiB, "
          f"1024: {1024 * V * 4 / GIB:.2f} GiB, 256: {256 * V * 4 / GIB:.2f} GiB)\n")
    print("| case | shape | chunk | peak RSS (GiB) | increase over baseline (GiB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        secs = "—" if r["seconds"] is None else f"{r['seconds']:.1f}"
        print(f"| {r['case']} | [{r['batch']}, {r['length']}] | {r['chunk'] or '—'} | {r['peak'] / GIB:.2f} | "
              f"{(r['peak'] - r['baseline']) / GIB:.2f} | {secs} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"check": check, "full_tensor_bytes": FULL_BYTES, "threads": args.threads, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
