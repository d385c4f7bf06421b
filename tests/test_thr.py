"""thr.py: the THR score against brute force and autograd, the reweighting by hand, p = 0 against grpo.py, end to
end."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from common import token_logprobs
from grpo import aggregate_loss, policy_loss
from test_grpo_script import SMALL, metrics, run
from thr import (dominant_tokens, entropy_overlap, gspo_token_logp, hidden_reward_scores, nthr_advantages, nthr_eta,
                 prediction_errors, reweighted_advantages, token_hidden_reward, token_hidden_scores)

GROUPS = SMALL + ["--prompts-per-step", "8", "--group-size", "8"]  # enough mixed groups for a learning signal
LSE = lambda logits, t: logits.logsumexp(-1)  # noqa: E731  the row_fn the script passes


def tiny_lm(vocab=48, seed=0):
    """A random Qwen2 with an UNTIED LM head, in fp64 (token_logprobs keeps fp64)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).double().eval()


def group_batch(vocab, G=4, P=3, T=6, seed=1):
    """Two groups of G rollouts: left-padded prompts of P tokens, right-padded completions of 3..T tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2 * G, P + T), generator=g)
    attn = torch.ones_like(ids)
    for i, n in enumerate(torch.randint(3, T + 1, (2 * G,), generator=g).tolist()):
        attn[i, P + n:] = 0
    attn[1, :1] = 0  # one left-padded prompt
    ids[attn == 0] = 0
    return ids, attn, attn[:, P:].double(), P


def old_policy(model, ids, attn, P):
    """(logp, h, logz, W) as the script gets them from the old-log-prob forward."""
    with torch.no_grad():
        logp, _, h, logz = token_logprobs(model, ids, attn, P, 5, return_hidden=True, row_fn=LSE)
    return logp, h, logz, model.get_output_embeddings().weight.detach()


def full_vocab_scores(h, logz, targets, mask, correct, W, G):
    """s with the exact alpha over the WHOLE vocabulary (no V* restriction), by the same sum-first formula."""
    s = torch.zeros(targets.shape, dtype=h.dtype)
    vocab = torch.arange(W.shape[0])
    for g0 in range(0, len(targets), G):
        rows, valid = slice(g0, g0 + G), mask[g0:g0 + G].bool()
        if correct[rows].any():
            hg = h[rows][valid]
            g = prediction_errors(hg @ W.T, logz[rows][valid], targets[rows][valid], vocab)
            s[rows][valid] = hidden_reward_scores(g, hg, correct[rows, None].expand_as(valid)[valid])
    return s


# ------------------------------------------------------------------ (1) fast computation == double sum over token pairs
def test_sum_first_equals_double_sum_over_token_pairs():
    gen = torch.Generator().manual_seed(0)
    g, h = torch.randn(9, 5, generator=gen, dtype=torch.float64), torch.randn(9, 7, generator=gen, dtype=torch.float64)
    correct = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 0]).bool()
    naive = torch.tensor([sum((g[i] @ g[j]) * (h[i] @ h[j]) for i in range(9) if correct[i]) for j in range(9)])
    assert torch.allclose(hidden_reward_scores(g, h, correct), naive, rtol=1e-12, atol=1e-12)


def test_group_scores_equal_double_sum_with_group_vocabulary_and_full_denominator():
    model = tiny_lm()
    ids, attn, mask, P = group_batch(48)
    _, h, logz, W = old_policy(model, ids, attn, P)
    targets, G = ids[:, P:], 4
    correct = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0]).bool()  # the second group has no correct response
    s = token_hidden_scores(h, logz, targets, mask, correct, W, G)
    probs = torch.softmax(h @ W.T, -1)  # [N, T, V] full-vocabulary softmax, independent of the row_fn logsumexp
    naive = torch.zeros_like(s)
    for j, kp in mask[:G].nonzero().tolist():
        vstar = sorted(set(targets[:G][mask[:G].bool()].tolist()))  # the group's tokens
        gj = torch.tensor([float(v == targets[j, kp]) - probs[j, kp, v] for v in vstar])
        for i, k in mask[:G].nonzero().tolist():
            if correct[i]:
                gi = torch.tensor([float(v == targets[i, k]) - probs[i, k, v] for v in vstar])
                naive[j, kp] += (gi @ gj) * (h[i, k] @ h[j, kp])
    assert torch.allclose(s, naive, rtol=1e-10, atol=1e-12)
    assert (s[G:] == 0).all() and (s[:G][mask[:G] == 0] == 0).all() and (s[:G][mask[:G] == 1] != 0).all()


# ---------------------------------------------------------------- (2) alpha <h, h'> == <grad_W log pi, grad_W log pi'>
def test_alpha_times_hidden_product_equals_lm_head_gradient_inner_product():
    model = tiny_lm()
    ids, attn, mask, P = group_batch(48)
    _, h, logz, W = old_policy(model, ids, attn, P)
    logp = token_logprobs(model, ids, attn, P, 5)[0]  # with grad
    W_param, targets, vocab = model.get_output_embeddings().weight, ids[:, P:], torch.arange(48)
    pairs = [((0, 0), (0, 1)), ((0, 2), (5, 1)), ((3, 0), (3, 0)), ((7, 2), (1, 1))]
    for (i, k), (j, kp) in pairs:
        gi_w, = torch.autograd.grad(logp[i, k], W_param, retain_graph=True)
        gj_w, = torch.autograd.grad(logp[j, kp], W_param, retain_graph=True)
        g = prediction_errors(torch.stack([h[i, k], h[j, kp]]) @ W.T, torch.stack([logz[i, k], logz[j, kp]]),
                              torch.stack([targets[i, k], targets[j, kp]]), vocab)
        alpha = g[0] @ g[1]
        assert (alpha * (h[i, k] @ h[j, kp])).item() == pytest.approx((gi_w * gj_w).sum().item(), rel=1e-10, abs=1e-14)


# ---------------------------------------------------- (3) sign(THR) predicts the change of the correct log-likelihood
def test_thr_sign_predicts_first_order_change_of_correct_likelihood():
    model = tiny_lm(vocab=24)
    ids, attn, mask, P = group_batch(24, T=5)
    _, h, logz, W = old_policy(model, ids, attn, P)
    targets, G, eta = ids[:, P:], 4, 1e-7
    rewards = torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 0])
    correct = rewards > 0.5
    A = (rewards.view(-1, G) - rewards.view(-1, G).mean(-1, keepdim=True)).flatten()  # advantages (any scale)
    thr_exact = token_hidden_reward(full_vocab_scores(h, logz, targets, mask, correct, W, G), A, "value")
    thr_vstar = token_hidden_reward(token_hidden_scores(h, logz, targets, mask, correct, W, G), A, "sign")
    W_param = model.get_output_embeddings().weight

    def correct_loglik(group):  # sum_{i in P} log pi(y_i) over the correct responses of this group
        with torch.no_grad():
            lp = token_logprobs(model, ids, attn, P, 5)[0]
        return (lp * mask)[correct & (torch.arange(len(ids)) // G == group)].sum()

    agree, n = 0, 0
    for j, kp in mask.nonzero().tolist():
        base = correct_loglik(j // G)
        logp = token_logprobs(model, ids[j:j + 1], attn[j:j + 1], P, 5)[0][0, kp]
        loss = policy_loss(logp, logp.detach(), A[j], 0.2, 0.2)[0]  # GRPO loss of this single token (ratio 1)
        grad, = torch.autograd.grad(loss, W_param)
        with torch.no_grad():
            W_param -= eta * grad  # one small SGD step on W alone
            delta = correct_loglik(j // G) - base
            W_param += eta * grad
        assert delta.item() / eta == pytest.approx(thr_exact[j, kp].item(), rel=1e-4, abs=1e-9)  # first-order change
        if abs(thr_exact[j, kp]) > 1e-6:
            assert torch.sign(delta) == torch.sign(thr_exact[j, kp]), (j, kp)
            n += 1
            agree += int(torch.sign(delta) == torch.sign(thr_vstar[j, kp]))
    assert n >= 10
    assert agree / n >= 0.9, (agree, n)  # 32/32 here; the V* restriction drops only sum_{v not in V*} pi pi' from alpha


# ------------------------------------------------------------------ (4) p = 0 without masking is grpo.py's loss
def test_p_zero_without_masking_reproduces_grpo_loss_exactly():
    import grpo
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 5, generator=gen, requires_grad=True)
    old = (logp + 0.3 * torch.randn(6, 5, generator=gen)).detach()
    adv = torch.randn(6, generator=gen)
    mask = (torch.rand(6, 5, generator=gen) > 0.2).float()
    thr = torch.randn(6, 5, generator=gen)
    dominant = torch.rand(6, 5, generator=gen) > 0.5

    def loss_and_grad(l):
        loss = aggregate_loss(l, mask, "token-mean", mask.sum(), 6, 5)
        return loss, torch.autograd.grad(loss, logp)[0]
    ref = loss_and_grad(grpo.policy_loss(logp, old, adv[:, None], 0.2, 0.2)[0])
    ours = loss_and_grad(policy_loss(logp, old, reweighted_advantages(adv, thr, dominant, 0.0, False), 0.2, 0.2)[0])
    assert torch.equal(ref[0], ours[0]) and torch.equal(ref[1], ours[1])
    moved = loss_and_grad(policy_loss(logp, old, reweighted_advantages(adv, thr, dominant, 0.2, False), 0.2, 0.2)[0])
    assert not torch.equal(ref[1], moved[1])  # the comparison above can fail


# ------------------------------------------------------------------ reweighting, threshold, GSPO-token, diagnostics
def test_dominant_tokens_and_reweighting_hand_worked():
    thr = torch.tensor([[2.0, 1.0, 0.0], [4.0, -3.0, 0.5], [-0.2, 5.0, 1.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
    correct = torch.tensor([True, False, False, False])  # group 1: rows 0-1 (P = {0}); group 2: no correct response
    # anchor = mean THR of row 0 over its 2 valid tokens = 1.5; tau = 1.5: |4|, |-3| dominant, 2 and 1, 0.5 not
    dom = dominant_tokens(thr, mask, correct, 2, 1.0)
    assert dom.tolist() == [[True, False, False], [True, True, False], [False] * 3, [False] * 3]
    assert dominant_tokens(thr, mask, correct, 2, 0.5)[0].tolist() == [True, True, False]  # tau = 0.75
    adv = torch.tensor([1.0, -0.5, 0.0, 0.0])
    out = reweighted_advantages(adv, thr, dom, 0.2, False)
    assert torch.allclose(out[:2], torch.tensor([[1.2, 1.0, 1.0], [-0.6, -0.4, -0.5]]))
    out = reweighted_advantages(adv, thr, dom, -0.2, True)
    assert torch.allclose(out[:2], torch.tensor([[0.8, 0.0, 0.0], [-0.4, -0.6, 0.0]]))
    s = torch.tensor([[1.0, -2.0]])
    assert token_hidden_reward(s, torch.tensor([-0.5]), "value").tolist() == [[-0.5, 1.0]]
    assert token_hidden_reward(s, torch.tensor([-0.5]), "sign").tolist() == [[-1.0, 2.0]]


def test_nthr_selection_hand_worked():
    # Two groups of 4: rows 0-3, and rows 4-7 with no correct response; s is T2's score.
    s = torch.tensor([[2.0, 4.0, 9.0], [1.0, 3.0, 0.0], [2.5, 1.0, -5.0], [2.0, 7.0, 0.0]] + [[9.0, 9.0, 9.0]] * 4)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]] + [[1.0, 1, 1]] * 4)
    correct = torch.tensor([True, True, False, False] + [False] * 4)
    # mean s over valid tokens: row 0 (2 + 4) / 2 = 3, row 1 (1 + 3) / 2 = 2 -> tau = 1 * min(3, 2) = 2.
    # Row 2 (incorrect): 2.5 > 2 selected; 1 not; -5 not (one-sided, although |-5| > 2). Row 3: 2 is not > 2; 7 is.
    # The correct rows' 4 and 3 exceed tau but are never selected; the padded 9 and 0 neither; rows 4-7 have no tau.
    sel = dominant_tokens(s, mask, correct, 4, 1.0, "nthr")
    assert sel.tolist() == [[False] * 3, [False] * 3, [True, False, False], [False, True, False]] + [[False] * 3] * 4
    # beta = 0.5 -> tau = 1: row 2's 1.0 is still not > 1, row 3's 2.0 now is
    sel_half = dominant_tokens(s, mask, correct, 4, 0.5, "nthr")
    assert sel_half[2:4].tolist() == [[True, False, False], [True, True, False]]
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    assert nthr_advantages(adv, sel, 0.0)[2:4].tolist() == [[0.0, -1.0, -1.0], [-1.0, 0.0, -1.0]]  # eta = 0 (NTHR)
    assert nthr_advantages(adv, sel, 0.5)[3].tolist() == [-1.0, -0.5, -1.0]
    assert torch.equal(nthr_advantages(adv, sel, 1.0), adv[:, None].expand(8, 3))  # eta = 1: GRPO's advantages
    # our two-sided rule on the same numbers (THR = sign(A) s) also takes row 2's -5 and the correct rows' tokens
    dom = dominant_tokens(token_hidden_reward(s, adv, "sign"), mask, correct, 4, 1.0)
    assert dom[:4].tolist() == [[False, True, False], [False, True, False], [True, False, True], [False, True, False]]


def test_nthr_adaptive_eta_hand_worked():
    """eta = 2 |0.5 - p_hat| per group (NTHR App. 7.3): accuracy 1/4 -> 0.5, 2/4 -> 0, 0/4 and 4/4 -> 1."""
    correct = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    eta = nthr_eta(correct, 4)
    assert eta.tolist() == [0.5] * 4 + [0.0] * 4 + [1.0] * 8
    assert nthr_eta(correct, 4, "0.3").tolist() == pytest.approx([0.3] * 16)
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.87, 0.87, -0.87, -0.87])
    sel = torch.tensor([[False, True], [True, False]]).repeat(4, 1)  # [8, 2]
    out = nthr_advantages(adv, sel, eta[:8])
    assert out[1].tolist() == [-0.25, -0.5] and out[2].tolist() == [-0.5, -0.25]  # group 1: eta 0.5
    assert out[6].tolist() == pytest.approx([-0.87, 0.0]) and out[7].tolist() == pytest.approx([0.0, -0.87])  # eta 0


def test_gspo_token_ratio_is_the_sequence_ratio_with_token_gradients():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.9, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    eff = gspo_token_logp(logp, old, mask)
    ratio = torch.exp(eff - old)
    s_i = torch.exp(torch.tensor((0.2 - 0.1) / 2))  # exp(mean over the 2 valid tokens of logp - old)
    assert torch.allclose(ratio[0, :2], s_i.expand(2))
    grad, = torch.autograd.grad(ratio[0, 1], logp)
    assert torch.allclose(grad, torch.tensor([[0.0, s_i.item(), 0.0]]))  # s_i * d log pi(y_t), nothing through s_i


def test_entropy_overlap_hand_worked():
    thr = torch.tensor([[5.0, -4.0, 0.1, 0.2, 0.0], [0.3, 0.4, 0.5, -0.6, 9.0]])
    ent = torch.tensor([[9.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 8.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    # 8 valid tokens with THR != 0 -> k = 1: top |THR| is 5.0, top entropy 9.0: the same token
    assert entropy_overlap(thr, ent, mask) == (1, 1)
    assert entropy_overlap(thr, ent, mask, frac=0.25) == (1, 2)  # {5, -4} vs {9, 8}
    assert entropy_overlap(thr, ent, mask * 0) == (0, 0)  # no valid token: nothing to compare


# ------------------------------------------------------------------ the script
def test_script_p_zero_matches_grpo_and_thr_runs_end_to_end(tiny_dir, tmp_path):
    run(["--model", tiny_dir, "--run-dir", tmp_path / "grpo"] + GROUPS)
    run(["--model", tiny_dir, "--run-dir", tmp_path / "p0", "--p", "0"] + GROUPS, script="thr.py")
    g, t = metrics(tmp_path / "grpo"), metrics(tmp_path / "p0")
    assert any(r["loss"] != 0 for r in g[1:]), "no learning signal: the comparison would be vacuous"
    for a, b in zip(g[1:], t[1:]):
        assert a["reward/mean"] == b["reward/mean"] and a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    run(["--model", tiny_dir, "--run-dir", tmp_path / "n1", "--selection", "nthr", "--eta", "1"] + GROUPS,
        script="thr.py")
    for a, b in zip(g[1:], metrics(tmp_path / "n1")[1:]):  # NTHR with eta = 1 changes nothing either
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    run(["--model", tiny_dir, "--run-dir", tmp_path / "n0", "--selection", "nthr"] + GROUPS, script="thr.py")
    n0 = metrics(tmp_path / "n0")
    assert any(r["thr/dominant_frac"] > 0 for r in n0[1:]), "NTHR selected nothing: the next check would be vacuous"
    assert all(r["thr/dominant_frac"] == 0 or r["thr/pos_frac/correct"] == r["thr/neg_frac/correct"] == 0
               for r in n0[1:])  # only incorrect responses' tokens
    assert any(r["grad_norm"] != b["grad_norm"] for r, b in zip(n0[1:], g[1:]))
    run(["--model", tiny_dir, "--run-dir", tmp_path / "x", "--p", "0.5", "--mask-nondominant", "--thr-advantage",
         "value",
         "--objective", "gspo-token", "--clip-low", "3e-4", "--clip-high", "4e-4"] + GROUPS, script="thr.py")
    rows = metrics(tmp_path / "x")
    for key in ("thr/dominant_frac", "thr/pos_frac", "thr/neg_frac", "thr/pos_frac/correct", "thr/neg_frac/incorrect",
                "thr/entropy_overlap", "thr/time_s", "loss", "grad_norm"):
        assert all(key in r for r in rows[1:]), key
    assert all(0 <= r["thr/dominant_frac"] <= 1 and r["thr/pos_frac"] + r["thr/neg_frac"] <= 1 + 1e-9 for r in rows[1:])
    assert "eval/pass@1" in rows[-1]
    assert any(r["thr/dominant_frac"] > 0 for r in rows[1:]) and any(r["loss"] != b["loss"] for r,
                                                                     b in zip(rows[1:], g[1:]))


@pytest.mark.parametrize("flags, message", [(["--p", "1.5"], "--p must be in (-1, 1)"),
                                            (["--tau-beta", "-1"], "--tau-beta"),
                                            (["--selection", "nthr", "--eta", "2"],
                                             "--eta must be adaptive or a number in [0, 1]"),
                                            (["--selection", "nthr", "--eta", "half"], "--eta must be adaptive"),
                                            (["--objective", "ppo"], "--objective")])
def test_bad_flags_are_one_line_errors(tmp_path, flags, message):
    p = run(flags + ["--run-dir", tmp_path / "r"], script="thr.py", check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
