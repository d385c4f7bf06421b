"""What lets a run grow past one host and one micro-batch: loading under torchrun (rank 0 alone reads the weights, the
other ranks get their shard), micro-batches packed by tokens (--micro-batch-tokens) that every rank runs as many of,
a gradient reduce-scattered after each micro-batch (no rank holds a full one), and an update that does not depend on
how the rows are split."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import common
from common import micro_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lengths_mask(lengths, T=None):
    """A completion mask [N, T] with these many valid tokens per row."""
    T = T or max(lengths)
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


def packed(lengths, P, size=64, tokens=0, group=1, rows=None):
    args = SimpleNamespace(micro_batch_size=size, micro_batch_tokens=tokens)
    mask = lengths_mask(lengths)
    rows = torch.arange(len(lengths)) if rows is None else rows
    return [m.tolist() for m in micro_batches(rows, mask, P, args, group)]


def test_micro_batch_size_splits_rows_in_order():
    assert packed([3, 1, 4, 2, 2], P=2, size=2) == [[0, 1], [2, 3], [4]]
    assert packed([3, 1, 4, 2, 2, 2], P=2, size=3, group=2) == [[0, 1], [2, 3], [4, 5]]  # whole groups: 2 rows
    assert packed([3, 1, 4, 2, 2, 2], P=2, size=5, group=2) == [[0, 1, 2, 3], [4, 5]]


def test_micro_batch_tokens_hand_worked():
    # P = 2, N = 10: [0, 1] cost 2 x (2 + 3) = 10 <= 10; + row 2 would cost 3 x (2 + 4) = 18; [2] costs 6, + row 3
    # 2 x 6 = 12 > 10; [3, 4] costs 2 x (2 + 2) = 8
    assert packed([3, 1, 4, 2, 2], P=2, tokens=10) == [[0, 1], [2], [3, 4]]
    # padding counted: 3 + 6 = 9 real tokens, but the pair runs 2 x 6 = 12 columns
    assert packed([1, 4], P=2, tokens=10) == [[0], [1]]
    # a row longer than N goes alone, and the rows after it pack as usual
    assert packed([20, 1, 1], P=2, tokens=10) == [[0], [1, 2]]
    # whole groups of 2: rows [0, 1] cost 2 x 5 = 10; with [2, 3] 4 x 6 = 24 > 20; [4, 5] alone, 4 x 6 = 24 > 20 too
    assert packed([3, 1, 4, 2, 2, 2], P=2, tokens=20, group=2) == [[0, 1], [2, 3], [4, 5]]
    # rows: a mini-batch's indices into the batch
    assert packed([9, 3, 1, 4, 2], P=2, tokens=10, rows=torch.tensor([1, 2, 3])) == [[1, 2], [3]]


def test_every_rank_runs_as_many_micro_batches_as_the_busiest(monkeypatch):
    """The largest micro-batch (in tokens, padding counted) is halved until this rank has as many as the busiest rank;
    a rank with too few rows to split keeps what it has (SPS pads the rest)."""
    def busiest(n):
        monkeypatch.setattr(common, "all_max_dict", lambda values, device: {"n": n})
    busiest(4)  # [0, 1] costs 10, [3, 4] 8: [0, 1] is halved
    assert packed([3, 1, 4, 2, 2], P=2, tokens=10) == [[0], [1], [2], [3, 4]]
    busiest(5)
    assert packed([3, 1, 4, 2, 2], P=2, tokens=10) == [[0], [1], [2], [3], [4]]
    busiest(9)
    assert packed([3, 1, 4, 2, 2], P=2, tokens=10) == [[0], [1], [2], [3], [4]]
    busiest(3)  # groups stay whole: [0..3] costs 4 x 6 = 24, halved at the group boundary
    assert packed([3, 1, 4, 2, 2, 2], P=2, size=4, group=2) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_update_does_not_depend_on_how_the_rows_are_split(tiny_dir, tmp_path, monkeypatch, loss_agg):
    """One grpo.py update (float64 weights) with every row in one micro-batch, packed two by two by tokens, and one
    row per micro-batch: the same accumulated gradient and the same weights after the step. Prefix sharing is off:
    RMSNorm runs in fp32 even in a float64 model, so a prompt run once for the rows that share it rounds differently
    from a prompt run per row (test_grpo_math tests that gradient at fp32's tolerance), and how many rows share one
    depends on the split."""
    import grpo
    load_model, micro, optimizer_step = grpo.load_model, grpo.micro_batches, grpo.optimizer_step
    seen = {}

    def load_float64(*args):
        model, tokenizer = load_model(*args)
        return model.double(), tokenizer

    def spy_micro(rows, mask, P, args, group=1):
        parts = micro(rows, mask, P, args, group)
        seen.update(parts=[len(p) for p in parts], P=P, longest=int(mask.sum(-1).max()))
        return parts

    def spy_step(model, optimizer, args, skipped, streak):
        seen["grad"] = torch.cat([p.grad.flatten() for p in model.parameters()])
        out = optimizer_step(model, optimizer, args, skipped, streak)
        seen["weights"] = torch.cat([p.detach().flatten() for p in model.parameters()])
        return out
    monkeypatch.setattr(grpo, "load_model", load_float64)
    monkeypatch.setattr(grpo, "micro_batches", spy_micro)
    monkeypatch.setattr(grpo, "optimizer_step", spy_step)
    monkeypatch.setattr(common, "shared_prefix_forward", lambda *a: None)  # every row runs its prompt in full

    def update(name, flags):
        grpo.train(common.parse_args(grpo.Args, [str(a) for a in [
            "--model", tiny_dir, "--run-dir", tmp_path / name, "--steps", "1", "--prompts-per-step", "4",
            "--group-size", "4", "--max-new-tokens", "16", "--eval-problems", "1", "--eval-samples", "1",
            "--loss-agg", loss_agg, "--entropy-coef", "0.01", "--lr", "1e-3"] + flags]))
        return dict(seen)
    whole = update("whole", ["--micro-batch-size", "64"])
    assert whole["parts"] == [16] and whole["grad"].abs().max() > 0
    pairs = update("pairs", ["--micro-batch-tokens", 2 * (whole["P"] + whole["longest"])])
    alone = update("alone", ["--micro-batch-tokens", "1"])
    assert pairs["parts"] == [2] * 8 and alone["parts"] == [1] * 16
    for split in (pairs, alone):
        assert torch.allclose(split["grad"], whole["grad"], rtol=1e-9, atol=1e-12)
        assert torch.allclose(split["weights"], whole["weights"], rtol=1e-9, atol=1e-12)


WORKER = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
from types import SimpleNamespace
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM
import common

rank, world, device = common.init_distributed()
path = sys.argv[2]
model = common.shard_model(common.load_model(path, device, rank, world)[0], world, device, "off")
ref = common.load_reference(path, device, rank, world)
want = AutoModelForCausalLM.from_pretrained(path)
buffers = dict(want.named_buffers())
for net in (model, ref):
    for name, value in net.state_dict().items():
        assert torch.equal(value.full_tensor(), want.state_dict()[name]), (rank, name)
    for name, value in net.named_buffers():  # the rotary inv_freq: in no state dict
        assert torch.equal(value, buffers[name]), (rank, name)
    assert net.lm_head.weight is net.model.embed_tokens.weight  # still tied
    assert net.generation_config.eos_token_id == want.generation_config.eos_token_id

# micro-batches of different rows on each rank: as many on both; the gradient reduce-scattered after each
torch.manual_seed(rank)
lengths = torch.randint(1, 12, (8,)) if rank == 0 else torch.full((8,), 2)
mask = (torch.arange(12)[None, :] < lengths[:, None]).float()  # [8, 12]
P = 4
ids = torch.randint(0, 100, (8, P + 12))
attn = torch.cat([torch.ones(8, P, dtype=torch.long), mask.long()], 1)
parts = common.micro_batches(torch.arange(8), mask, P, SimpleNamespace(micro_batch_size=8, micro_batch_tokens=40))
counts = common.gather_objects(len(parts))
assert counts[0] == counts[1] and len(parts) > 1, counts
full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
for j, m in enumerate(parts):
    logp, _ = common.token_logprobs(model, ids[m], attn[m], P)
    (logp * mask[m]).sum().backward()
    if j == 0:
        fsdp_params = [p for module in model.modules() if isinstance(module, FSDPModule)
                       for p in module._get_fsdp_state()._fsdp_param_group.fsdp_params]
        assert all(p.unsharded_accumulated_grad is None and p._unsharded_param.grad is None for p in fsdp_params)
        grad_bytes = sum(p.grad.to_local().numel() * p.grad.element_size() for p in model.parameters())
        assert grad_bytes <= full_bytes / world * 1.05, (grad_bytes, full_bytes)
print(f"rank {rank} ok")
dist.destroy_process_group()
'''


def test_torchrun_loads_rank_0s_weights_and_never_holds_a_full_gradient(tiny_dir, tmp_path):
    """2 ranks: rank 0 reads the weights, rank 1 builds the model on the meta device; after sharding, every rank's
    weights are from_pretrained's exactly (tied embeddings still tied, the rotary buffers right), for the policy and
    the reference model. Then micro-batches of different lengths on each rank: as many on both, and after the first
    backward no rank holds an unsharded gradient (its gradient is 1/world of the model's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.config.tie_word_embeddings = True  # as SmolLM2 and Qwen2.5 up to 3B
    model.tie_weights()
    model.save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path / "tied")
    (tmp_path / "worker.py").write_text(WORKER)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "worker.py"), ROOT, str(tmp_path / "tied")], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rank 0 ok" in p.stdout and "rank 1 ok" in p.stdout
