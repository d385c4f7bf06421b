"""sps.py: the IRL loss and its pieces on hand-worked tensors, the squeezing effect and its fix on a tabular bandit,
--irl-every 0 == grpo.py bit for bit, and the script end to end."""
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from test_grpo_script import SMALL, metrics, run, weights

from sps import first_copy, group_advantages, irl_loss, irl_target, preconditioned_step, squeezing


def test_irl_loss_falls_as_p_moves_toward_q_and_the_literal_sign_rises():
    """Sign test: for a fixed target q, -sum q log softmax(s) decreases along a path of scores whose softmax goes to
    q."""
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    start, goal = torch.tensor([[3.0, -1.0, 2.0, 0.5]]), torch.log(torch.tensor([[0.5, 0.5, 1e-4, 1e-4]]))
    path = [(1 - t) * start + t * goal for t in torch.linspace(0, 1, 11)]
    kl = [irl_loss(s, q).item() for s in path]
    literal = [irl_loss(s, q, sign="literal").item() for s in path]
    assert all(a > b for a, b in zip(kl, kl[1:])), kl
    assert all(a < b for a, b in zip(literal, literal[1:])), literal
    # independent value: KL(q || p) + H(q), computed by hand from the softmax
    p = torch.softmax(start, -1)[0]
    by_hand = sum(qi * math.log(qi / pi) for qi, pi in zip(q[0].tolist(), p.tolist()) if qi > 0) + math.log(2)
    assert kl[0] == pytest.approx(by_hand, rel=1e-6)


def test_preconditioned_step_is_lr_times_g_over_the_rl_adam_scale_and_leaves_its_state_alone():
    """After one AdamW step on g1, v_hat = g1^2 exactly, so the IRL step on g2 moves theta by
    -lr clamp(g2 / (|g1| + eps), -1, 1)."""
    p, q = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.nn.Parameter(torch.tensor([5.0]))
    opt = torch.optim.AdamW([p, q], lr=0.1, weight_decay=0.0)
    p.grad, q.grad = torch.tensor([0.5, -2.0, 1e-3, 0.0]), torch.tensor([1.0])
    opt.step()
    after_rl, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad, q.grad = torch.tensor([0.25, 1.0, 1.0, 3.0]), None  # q has no IRL gradient: untouched
    q_before = q.detach().clone()
    preconditioned_step(opt, lr=0.01)
    eps = opt.param_groups[0]["eps"]
    # last two: clamped to 1
    expected = after_rl - 0.01 * torch.tensor([0.25 / (0.5 + eps), 1.0 / (2.0 + eps), 1.0, 1.0])
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-7)
    assert all(torch.equal(state[k], opt.state[p][k]) for k in state) and torch.equal(q.detach(), q_before)


def test_irl_gradient_is_p_minus_q():
    """The tabular picture: d L / d s_i = (p_i - q_i) / T_s (autograd against the closed form)."""
    s = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(3, 8, dtype=torch.float64), -1)
    irl_loss(s, q, temperature=2.0).sum().backward()
    assert torch.allclose(s.grad, (torch.softmax(s.detach() / 2.0, -1) - q) / 2.0)


def test_irl_target_uniform_over_distinct_correct_rollouts():
    # one group of 4: rollouts 0 and 1 are the same correct sequence, 2 is another correct one, 3 is wrong
    first = first_copy([[5, 6], [5, 6], [7], [5, 6, 1]], 4)
    assert first.tolist() == [[0, 0, 2, 3]]
    correct = torch.tensor([[True, True, True, False]])
    q, distinct = irl_target(correct, first, "uniform")
    assert distinct.tolist() == [2.0] and torch.allclose(q, torch.tensor([[0.25, 0.25, 0.5, 0.0]]))
    q, _ = irl_target(correct, first, "counts")
    assert torch.allclose(q, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]]))
    _, distinct = irl_target(torch.tensor([[True, True, False, False]]), first, "uniform")
    assert distinct.tolist() == [1.0]  # two copies of one sequence: not eligible (nothing to flatten)


def test_squeezing_top_share_and_effective_number_over_distinct_rollouts():
    s = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.5]]))  # rollout 3 repeats rollout 0
    first = torch.tensor([[0, 1, 2, 0]])
    top, n_eff = squeezing(s, first, torch.ones(1, 4, dtype=torch.bool))
    assert top.item() == pytest.approx(0.5)
    assert n_eff.item() == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25))))
    top, n_eff = squeezing(s, first, torch.tensor([[False, True, True, False]]))  # correct-only: two equal shares
    assert top.item() == pytest.approx(0.5) and n_eff.item() == pytest.approx(2.0)
    assert squeezing(s, first, torch.zeros(1, 4, dtype=torch.bool))[1].isnan().all()


def bandit(irl, steps=300, lr=1.0, prompts=4, G=8, seed=0, support="demos"):
    """A tabular softmax policy over 50 one-step "trajectories", the first 5 correct with uneven initial logits.
    Each step: B groups of G samples, one GRPO step (sps.group_advantages), then optionally one IRL step (sps.irl_loss
    with the length-1 "length-normalised log-likelihood" s = log pi(tau)). Plain SGD on the logits.
    Returns P(correct) and the effective number of correct trajectories exp(H(pi restricted to the correct ones))."""
    g = torch.Generator().manual_seed(seed)
    correct = torch.arange(50) < 5
    z = torch.cat([torch.tensor([1.5, 0.75, 0.0, -0.75, -1.5]),
                   0.5 * torch.randn(45, generator=g)]).requires_grad_(True)
    for _ in range(steps):
        tau = torch.multinomial(torch.softmax(z.detach(), -1), prompts * G, replacement=True, generator=g)  # [B * G]
        advantages = group_advantages(correct[tau].float(), G)  # [B * G]
        rl = -(advantages * torch.log_softmax(z, -1)[tau]).mean()  # GRPO (on-policy, ratio = 1)
        z.grad = None
        rl.backward()
        with torch.no_grad():
            z -= lr * z.grad
        if irl:
            s = torch.log_softmax(z, -1)[tau].view(prompts, G)  # scores with the updated logits
            first = (tau.view(prompts, G)[:, :, None] == tau.view(prompts, G)[:, None, :]).float().argmax(-1)
            q, distinct = irl_target(correct[tau].view(prompts, G), first)
            if (distinct >= 2).any():
                z.grad = None
                on = correct[tau].view(prompts, G)[distinct >= 2] if support == "demos" else None
                irl_loss(s[distinct >= 2], q[distinct >= 2], support=on).mean().backward()
                with torch.no_grad():
                    z -= lr * z.grad
    pi = torch.softmax(z.detach(), -1)
    pc = pi[correct] / pi[correct].sum()
    return pi[correct].sum().item(), math.exp(-(pc * pc.log()).sum().item())


def test_tabular_bandit_grpo_squeezes_and_irl_keeps_several_correct_trajectories():
    """The squeezing effect and its fix in seconds: GRPO alone puts all correct mass on the initially most likely
    correct trajectory (N_eff -> 1); GRPO + IRL also reaches P(correct) -> 1 but keeps several correct trajectories."""
    for seed in range(2):
        p_grpo, n_grpo = bandit(irl=False, seed=seed)
        assert p_grpo > 0.95 and n_grpo < 1.1, (p_grpo, n_grpo)
        for support in ("demos", "group"):
            p_sps, n_sps = bandit(irl=True, seed=seed, support=support)
            assert p_sps > 0.95 and n_sps >= 2.0, (support, p_sps, n_sps)


def test_irl_loss_over_the_demonstrations_has_its_minimum_at_equal_scores_and_ignores_wrong_rollouts():
    """Two correct rollouts (q = 1/2 each) and a wrong one. Over the demonstrations: loss = log 2 exactly when the
    correct
    scores are equal, whatever the wrong score, and zero gradient there. Over the group: the gradient on the wrong
    rollout's score is p_wrong > 0 at any finite score, so it is pushed down forever."""
    q, sup = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[True, True, False]])
    for wrong in (-50.0, -1.0, 3.0):
        s = torch.tensor([[-0.4, -0.4, wrong]], requires_grad=True)
        loss = irl_loss(s, q, support=sup)
        loss.sum().backward()
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and torch.allclose(s.grad, torch.zeros(1, 3),
                                                                                      atol=1e-7)
        s = torch.tensor([[-0.4, -0.4, wrong]], requires_grad=True)
        irl_loss(s, q).sum().backward()
        p_wrong = math.exp(wrong) / (2 * math.exp(-0.4) + math.exp(wrong))
        assert s.grad[0, 2].item() == pytest.approx(p_wrong, rel=1e-5) and p_wrong > 0  # d loss / d s_wrong = p_wrong
    # uneven correct scores: the gradient is (p - q) over the support: the likelier correct rollout goes down
    s = torch.tensor([[0.0, -1.0, 2.0]], requires_grad=True)
    irl_loss(s, q, support=sup).sum().backward()
    p1 = 1 / (1 + math.exp(-1.0))
    assert s.grad[0].tolist() == pytest.approx([p1 - 0.5, 0.5 - p1, 0.0], abs=1e-6)


def test_irl_every_0_is_grpo_bit_for_bit(tiny_dir, tmp_path):
    run(["--model", tiny_dir, "--run-dir", tmp_path / "grpo"] + SMALL, script="grpo.py")
    run(["--model", tiny_dir, "--run-dir", tmp_path / "sps", "--irl-every", "0"] + SMALL, script="sps.py")
    w_grpo, w_sps = weights(tmp_path / "grpo"), weights(tmp_path / "sps")
    assert w_grpo.keys() == w_sps.keys()
    for k in w_grpo:
        assert torch.equal(w_grpo[k], w_sps[k]), k
    assert [r["loss"] for r in metrics(tmp_path / "grpo")[1:]] == [r["loss"] for r in metrics(tmp_path / "sps")[1:]]


def test_end_to_end_logs_the_sps_diagnostics(tiny_dir, tmp_path):
    run(["--model", tiny_dir, "--run-dir", tmp_path / "r", "--probe-prompts", "3"] + SMALL, script="sps.py")
    rows = metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ("sps/probe/top_share", "sps/probe/n_eff", "sps/probe/distinct_correct", "sps/probe/top1_token_prob",
                "eval/pass@1"):
        assert key in rows[0] and key in rows[-1], key
    assert not any(k.startswith("sps/U") for r in rows for k in r)  # the pass@k bounds are eval.py's (test_eval.py)
    irl_steps = [r for r in rows[1:] if "sps/irl_loss" in r]
    assert irl_steps, "no group had two distinct correct rollouts: the run tested nothing"
    assert all(math.isfinite(r["sps/irl_loss"]) and r["sps/irl_grad_norm"] > 0 for r in irl_steps)


@pytest.mark.parametrize("flags, message",
                         [(["--irl-every", "-1"], "--irl-every"), (["--irl-temperature", "0"], "--irl-temperature"),
                                            (["--irl-variant", "nll", "--irl-schedule", "summed"],
                                             "--irl-variant nll")])
def test_bad_sps_flags_are_one_line_errors(tmp_path, flags, message):
    p = run(flags + ["--run-dir", tmp_path / "r"], script="sps.py", check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("flags", [
    ["--irl-schedule", "summed"], ["--irl-variant", "nll"], ["--irl-score", "ratio"], ["--irl-support", "group"],
    ["--irl-demos", "all", "--irl-target", "counts", "--irl-sign", "literal", "--irl-score", "sum"]])
def test_every_irl_choice_runs_and_changes_the_update(tiny_dir, tmp_path, flags):
    short = ["--steps", "2"] + SMALL[2:]
    run(["--model", tiny_dir, "--run-dir", tmp_path / "r"] + flags + short, script="sps.py")
    run(["--model", tiny_dir, "--run-dir", tmp_path / "g", "--irl-every", "0"] + short, script="sps.py")
    rows = metrics(tmp_path / "r")
    assert any("sps/irl_loss" in r for r in rows[1:]), "the IRL step never ran"
    w, g = weights(tmp_path / "r"), weights(tmp_path / "g")
    assert any(not torch.equal(w[k], g[k]) for k in w)


def test_torchrun_two_processes_match_one(tiny_dir, tmp_path):
    """Groups are split over ranks, so a rank may have no eligible group: it still runs its (zero-weight) forwards."""
    run(["--model", tiny_dir, "--run-dir", tmp_path / "one"] + SMALL, script="sps.py")
    run(["--model", tiny_dir, "--run-dir", tmp_path / "two"] + SMALL, script="sps.py", torchrun=2)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert any("sps/irl_loss" in r for r in m1[1:])
    for a, b in zip(m1[1:], m2[1:]):
        assert a.get("sps/irl_loss", 0) == pytest.approx(b.get("sps/irl_loss", 0), rel=1e-4, abs=1e-6)
    # as in test_grpo_script: Adam amplifies fp32 reduction-order noise where gradients are ~0, so compare whole updates
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    w0 = load_file(os.path.join(tiny_dir, "model.safetensors"))
    update = torch.cat([(w1[k] - w0[k]).flatten() for k in w1])
    gap = torch.cat([(w1[k] - w2[k]).flatten() for k in w1])
    assert update.norm() > 1e-3 and gap.norm() / update.norm() < 1e-2, (gap.norm() / update.norm()).item()


def test_resume_reaches_the_same_weights(tiny_dir, tmp_path):
    """The IRL step (preconditioned_step) has no state of its own, only the RL AdamW's, which the checkpoint holds: an
    interrupted-and-resumed SPS run reaches the uninterrupted run's weights."""
    small = SMALL[2:] + ["--prompts-per-step", "16", "--group-size", "8", "--lr", "2e-4"]  # IRL steps at steps 3 and 4
    common = ["--model", tiny_dir, "--steps", "4", "--save-every", "2"] + small
    run(common + ["--run-dir", tmp_path / "full"], script="sps.py")
    run(["--model", tiny_dir, "--steps", "2", "--save-every", "2", "--run-dir", tmp_path / "cut"] + small,
        script="sps.py")
    run(common + ["--run-dir", tmp_path / "cut", "--resume"], script="sps.py")
    assert any("sps/irl_loss" in r for r in metrics(tmp_path / "full")[3:]), "no IRL step after the cut: nothing tested"
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    assert [r["step"] for r in metrics(tmp_path / "cut")] == [0, 1, 2, 3, 4]
