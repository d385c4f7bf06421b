"""The course's graders beyond the hand-worked tests (student.py names which grade which exercise): hand-worked
values that tell the right estimator from its look-alikes, gradients, reference snapshots (tests/student_fixtures/
snapshots.json, generated once from the reference implementation by make_snapshots.py, so no solution ships with the
student copy), the world_size() factor, and the training loop's update against the batch loss's own gradient."""
import json
import math
import os

import pytest
import torch

import common
import grpo
from grpo import aggregate_loss, group_advantages, kl_k3, policy_loss

SNAPSHOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "student_fixtures", "snapshots.json")


def snapshot(name):
    with open(SNAPSHOTS) as f:
        return json.load(f)[name]


def snapshot_inputs():
    """The inputs the snapshots were taken on (make_snapshots.py): CPU generators give the same numbers everywhere."""
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(24, generator=g) > 0.6).float()
    rewards[:6] = 1.0  # an all-correct group of 6 (and of 3)
    logp = -torch.rand(6, 5, generator=g, dtype=torch.float64) * 2
    old_logp = logp + torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(6, 1, generator=g, dtype=torch.float64)
    return rewards, logp, old_logp, adv


def test_group_advantages_snapshot():
    rewards, *_ = snapshot_inputs()
    for G in (3, 6):
        for scale in ("group", "none"):
            want = torch.tensor(snapshot(f"group_advantages/{G}/{scale}"))
            assert torch.allclose(group_advantages(rewards, G, scale), want, atol=1e-5), (G, scale)


def test_policy_loss_gradient_and_snapshot():
    # hand-worked (test_policy_loss_hand_worked's case): d loss / d logp = -rho A where the unclipped term is chosen,
    # 0 where the clip binds
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    loss, _ = policy_loss(logp, torch.zeros(1, 4), torch.tensor([[1.0, -1.0, 1.0, -1.0]]), 0.2, 0.2)
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 1.5, -0.5, 0.0]]), atol=1e-6)
    _, logp, old_logp, adv = snapshot_inputs()
    logp.requires_grad_()
    for low, high in ((0.2, 0.2), (0.1, 0.28)):
        loss, clipped = policy_loss(logp, old_logp, adv, low, high)
        (grad,) = torch.autograd.grad(loss.sum(), logp)
        want = snapshot(f"policy_loss/{low}/{high}")
        assert torch.allclose(loss.detach(), torch.tensor(want["loss"], dtype=torch.float64), atol=1e-9)
        assert clipped.tolist() == want["clipped"]
        assert torch.allclose(grad, torch.tensor(want["grad"], dtype=torch.float64), atol=1e-9)


def test_kl_k3_hand_worked_values_and_gradient():
    """d = log pi_ref - log pi_theta = 1, -1, 0, 2: k3 = e^d - d - 1. Its look-alikes differ: k2 = d^2 / 2 gives 0.5 at
    d = +-1, the ratio taken the other way round swaps the values at +-1, k1 = -d is negative at d = 1."""
    logp = torch.tensor([0.0, 0.0, -1.0, -2.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([1.0, -1.0, -1.0, -0.5], dtype=torch.float64)
    d = torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.float64)
    k3 = kl_k3(logp, ref)
    assert torch.allclose(k3.detach(), torch.tensor([math.e - 2, math.exp(-1), 0.0, math.exp(2) - 3],
                                                    dtype=torch.float64), atol=1e-12)
    (grad,) = torch.autograd.grad(k3.sum(), logp)
    assert torch.allclose(grad, 1 - d.exp(), atol=1e-12)  # d k3 / d log pi_theta = 1 - pi_ref / pi_theta


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_loss_scales_with_the_number_of_ranks(mode, monkeypatch):
    """Two ranks, each holding half the rows, given the counts of the whole batch (over both ranks): the average of
    their losses (what FSDP's gradient average computes) must equal one process's loss over the whole batch."""
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(8, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(8, 6, generator=g) > 0.3).double()
    mask[:, 0] = 1
    n_tok, n_seq = mask.sum().item(), 8
    one = aggregate_loss(loss, mask, mode, n_tok, n_seq, 6)
    for module in (grpo, common):
        monkeypatch.setattr(module, "world_size", lambda: 2)
    ranks = [aggregate_loss(loss[r::2], mask[r::2], mode, n_tok, n_seq, 6) for r in (0, 1)]
    assert (ranks[0] + ranks[1]).item() / 2 == pytest.approx(one.item(), rel=1e-12)


def test_pass_at_k_hand_worked():
    from fractions import Fraction
    from common import pass_at_k
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3, 2) / C(4, 2) = 1 - 3 / 6
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7, 5) / C(10, 5)
    assert pass_at_k(5, 0, 3) == 0 and pass_at_k(3, 3, 1) == 1 and pass_at_k(8, 6, 3) == 1
    exact = 1 - Fraction(math.comb(1990, 200), math.comb(2000, 200))  # C(2000, 200) ~ 1e280: no overflow allowed
    assert pass_at_k(2000, 10, 200) == pytest.approx(float(exact), rel=1e-9)


# ------------------------------------------------------------------------------ the training loop (grpo.py step 5)
LOOP_CONFIGS = {
    "on-policy": [],
    "epochs-minibatches": ["--ppo-epochs", "2", "--mini-batches", "2", "--clip-high", "0.28", "--loss-agg",
                           "seq-mean-token-mean"],
    "kl-entropy": ["--kl-coef", "0.1", "--entropy-coef", "0.01", "--loss-agg", "seq-mean-token-sum-norm"],
}


@pytest.mark.parametrize("config", list(LOOP_CONFIGS))
def test_update_gradient_is_the_batch_loss_gradient(config, tiny_dir, tmp_path, monkeypatch):
    """Two steps of grpo.train: every optimizer step's accumulated gradient equals the gradient of the loss (grpo.py
    docstring) computed in one piece over its mini-batch, with pi_old the weights that sampled (on-policy: the
    update's own, detached), the counts of the whole mini-batch, and pi_ref the initial weights (which the second
    step has left: at the first, pi_theta = pi_ref and the KL's gradient is 0 either way round); the logged loss is
    their mean over the ppo_epochs x mini_batches optimizer steps of a step."""
    from common import load_model, parse_args, token_logprobs
    seen, steps = {"advantages": [], "batch": []}, []
    for fn, key in {"group_advantages": "advantages", "rollout_batch": "batch"}.items():
        def wrapped(*a, _real=getattr(grpo, fn), _key=key, **kw):
            seen[_key].append(_real(*a, **kw))
            return seen[_key][-1]
        monkeypatch.setattr(grpo, fn, wrapped)
    real_step = grpo.optimizer_step

    def step_spy(model, optimizer, args, skipped, streak):
        steps.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                      {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}))
        return real_step(model, optimizer, args, skipped, streak)
    monkeypatch.setattr(grpo, "optimizer_step", step_spy)
    flags = ["--model", tiny_dir, "--run-dir", str(tmp_path / "r"), "--steps", "2", "--prompts-per-step", "8",
             "--group-size", "8", "--max-new-tokens", "16", "--micro-batch-size", "24", "--eval-problems", "2",
             "--eval-samples", "1", "--eval-every", "0", "--save-every", "0", "--lr", "1e-2", "--seed", "3"]
    args = parse_args(grpo.Args, flags + LOOP_CONFIGS[config])
    grpo.train(args)

    per_step = args.ppo_epochs * args.mini_batches
    assert len(steps) == 2 * per_step and len(seen["batch"]) == 2
    on_policy = per_step == 1
    model, _ = load_model(tiny_dir, torch.device("cpu"))
    ref_model, _ = load_model(tiny_dir, torch.device("cpu"))
    with open(tmp_path / "r" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f][1:]
    signal = 0  # optimizer steps with a non-zero gradient
    for s, ((ids, attn, mask, P), adv, row) in enumerate(zip(seen["batch"], seen["advantages"], rows)):
        mine = steps[s * per_step:(s + 1) * per_step]
        model.load_state_dict(mine[0][0], strict=False)  # the weights that sampled this step: pi_old
        with torch.no_grad():
            old = token_logprobs(model, ids, attn, P, args.logprob_chunk)[0]
            ref = token_logprobs(ref_model, ids, attn, P, args.logprob_chunk)[0]
        minis = list(torch.arange(len(ids)).chunk(args.mini_batches)) * args.ppo_epochs
        total = 0.0
        for (params, grads), mb in zip(mine, minis):
            model.load_state_dict(params, strict=False)
            model.zero_grad()
            logp, ent = token_logprobs(model, ids[mb], attn[mb], P, args.logprob_chunk)
            token_loss, _ = policy_loss(logp, logp.detach() if on_policy else old[mb], adv[mb, None], args.clip_low,
                                        args.clip_high)
            token_loss = token_loss + args.kl_coef * kl_k3(logp, ref[mb]) - args.entropy_coef * ent
            loss = aggregate_loss(token_loss, mask[mb], args.loss_agg, mask[mb].sum().item(), len(mb),
                                  args.max_new_tokens)
            loss.backward()
            total += loss.item() / per_step
            want = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None])
            got = torch.cat([grads[n].flatten() for n, p in model.named_parameters() if p.grad is not None])
            signal += want.norm().item() > 0
            gap = (got - want).norm().item()
            assert gap <= 1e-4 * want.norm().item(), (config, s, gap, want.norm().item())
        assert row["loss"] == pytest.approx(total, rel=1e-4, abs=1e-7)
        if on_policy:
            assert row["clip/frac"] == 0 and row["entropy/mean"] > 0  # entropy: filled from the update's forward
    assert signal >= per_step, "no learning signal in the first step: pick another --seed"
