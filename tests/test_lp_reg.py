"""lp_reg.py: the min-p proxy, the token selection, the penalty's gradient, equality with GRPO at rho = 0, end to
end."""
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from common import token_logprobs
from grpo import aggregate_loss
from grpo import policy_loss as grpo_policy_loss
from lp_reg import FILTERED, batch_bottom_rho, bottom_rho, lp_reg_bottom, lp_reg_loss, proxy_logprob
from test_grpo_script import SMALL, metrics, run, weights


def brute_force_proxy(logits, kappa, proxy):
    """Min-p filter + renormalise over the full vocabulary, in probability space: [n, V] -> pi_proxy [n, V]; a row
    where no token reaches tau (fixed only) gets the uniform distribution, as the authors' code does."""
    p = torch.softmax(logits.double(), -1)
    tau = kappa * p.max(-1, keepdim=True).values if proxy == "minp" else torch.full_like(p[:, :1], kappa)
    kept = p * (p >= tau)
    none = kept.sum(-1, keepdim=True) == 0
    return torch.where(none, 1 / p.shape[-1], kept / kept.sum(-1, keepdim=True).clamp(min=1e-300))


@pytest.mark.parametrize("proxy, kappa", [("minp", 0.02), ("minp", 0.3), ("fixed", 0.02), ("fixed", 0.1),
                                          ("fixed", 0.5)])
def test_proxy_logprob_equals_brute_force_min_p(proxy, kappa):
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.5, 6, 64, dtype=torch.float64)[:, None]
    logits = torch.randn(64, 40, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, 40, (64,), generator=g)
    want = brute_force_proxy(logits, kappa, proxy).gather(-1, targets[:, None]).squeeze(-1)
    got = proxy_logprob(logits, targets, kappa, proxy)
    kept = want > 0
    assert 0 < kept.sum() < len(kept)  # both branches are exercised
    assert torch.allclose(got[kept], want[kept].log(), atol=1e-12)
    assert (got[~kept] == FILTERED).all()
    if proxy == "fixed" and kappa == 0.5:  # some rows have no token with pi >= 0.5: the uniform fallback is exercised
        none = torch.softmax(logits, -1).max(-1).values < kappa
        assert 0 < none.sum() < len(none) and torch.allclose(got[none], torch.tensor(-math.log(40), dtype=got.dtype))


def test_fixed_proxy_without_a_token_above_tau_pulls_tokens_below_uniform():
    """--proxy fixed, no token reaches tau: log pi_proxy = -ln V (authors' code), so exactly the bottom tokens with
    pi_theta < 1/V are selected for the pull, and their penalty raises them toward 1/V."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 1.0, -1.0, -3.0]])  # pi = 1/4 each | max pi 0.70
    proxy = proxy_logprob(logits, torch.tensor([1, 3]), 0.6, "fixed")
    assert proxy[0].item() == pytest.approx(-math.log(4)) and proxy[1].item() == FILTERED  # row 1: kept, not o_t
    logp = torch.tensor([[-2.0, -1.0]], requires_grad=True)  # pi_theta 0.135 < 1/4 and 0.37 > 1/4
    bottom = torch.tensor([[True, True]])
    uniform = torch.full((1, 2), -math.log(4))
    grads = []
    for beta in (1.0, 0.0):
        loss, _, selected, _ = lp_reg_loss(logp, logp.detach(), torch.tensor([[-1.0]]), uniform, bottom, 1.0, 9.0, beta)
        assert selected.tolist() == [[True, False]]
        grads.append(torch.autograd.grad(loss.sum(), logp)[0])
    pull = grads[0] - grads[1]  # the penalty's gradient: -(pi_proxy / pi_theta - 1) on the selected token
    assert pull[0, 0].item() == pytest.approx(-(math.exp(2.0) / 4 - 1), rel=1e-5) and pull[0, 1] == 0


def test_proxy_through_token_logprobs_row_fn_is_chunked_and_exact():
    """The script computes the proxy inside the old-log-prob pass; chunking must not change it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 50, (3, 12))
    attn = torch.ones_like(ids)
    attn[1, -4:] = 0  # right padding on one row
    with torch.no_grad():
        logp, _, proxy = token_logprobs(model, ids, attn, 4, chunk=5, row_fn=lambda z, o: proxy_logprob(z, o, 0.02))
        logits = model(input_ids=ids, attention_mask=attn).logits[:, 3:-1].float()  # predicts positions 4..11
    want = brute_force_proxy(logits.reshape(-1, 50), 0.02, "minp").gather(-1, ids[:, 4:].reshape(-1, 1)).view(3, 8)
    valid = attn[:, 4:].bool()
    kept = valid & (want > 0)
    assert torch.allclose(proxy[kept], want[kept].log().float(), atol=1e-5)
    assert (proxy[valid & (want == 0)] == FILTERED).all() and (proxy[~valid] == 0).all()


def hand_built():
    """3 sequences x 5 tokens. Row 0: A < 0; row 1: A < 0, last token padding; row 2: A > 0 (row 3: A = 0)."""
    logp = torch.tensor([[-0.1, -3.0, -0.2, -5.0, -0.3],
                         [-4.0, -0.1, -6.0, -0.2, -9.0],    # -9.0 is padding: never a candidate
                         [-7.0, -8.0, -0.1, -0.1, -0.1],    # positive advantage: not regularised by default
                         [-9.5, -9.5, -0.1, -0.1, -0.1]])   # zero advantage: never regularised
    advantages = torch.tensor([[-1.0], [-0.5], [1.0], [0.0]])
    mask = torch.ones(4, 5)
    mask[1, 4] = 0
    # bottom-3 of the 9 negative-advantage tokens: -6.0 (1,2), -5.0 (0,3), -4.0 (1,0); the proxy then removes (0,3)
    # (filtered) and (1,0) (proxy below pi_theta), so only (1,2) is selected.
    proxy = torch.full((4, 5), -0.05)
    proxy[0, 3] = FILTERED
    proxy[1, 0] = -4.5
    return logp, advantages, mask, proxy


def select(logp, advantages, mask, proxy, rho, rho_pos=0.0, sums=None):
    sums = dict.fromkeys(["sets", "fired", "delta"], 0.0) if sums is None else sums
    bottom = lp_reg_bottom(logp, advantages, mask, rho, rho_pos, sums)
    _, _, selected, _ = lp_reg_loss(logp, logp, advantages, proxy, bottom, 1.0, 9.0, 1.0)
    return bottom, selected


def test_selection_picks_the_bottom_k_negative_tokens_that_pass_the_filter():
    logp, advantages, mask, proxy = hand_built()
    sums = dict.fromkeys(["sets", "fired", "delta"], 0.0)
    bottom, selected = select(logp, advantages, mask, proxy, rho=1 / 3, sums=sums)  # k = int(9 / 3) = 3
    assert bottom.nonzero().tolist() == [[0, 3], [1, 0], [1, 2]]
    assert selected.nonzero().tolist() == [[1, 2]]
    assert sums == {"sets": 1, "fired": 1, "delta": pytest.approx(math.exp(-4.0))}  # one set ranked, k > 1, delta
    # k = int(9 * 0.2) = 1: the k > 1 guard regularises nothing
    assert not select(logp, advantages, mask, proxy, rho=0.2, sums=sums)[1].any()
    assert sums["sets"] == 2 and sums["fired"] == 1
    # rho_pos adds the positive-advantage set, ranked on its own: k = int(5 * 0.4) = 2 -> (2, 1), (2, 0)
    bottom, selected = select(logp, advantages, mask, proxy, rho=1 / 3, rho_pos=0.4)
    assert selected.nonzero().tolist() == [[1, 2], [2, 0], [2, 1]]


def test_batch_scope_matches_micro_batch_ranking_on_one_process():
    logp, advantages, mask, proxy = hand_built()
    candidates = mask.bool() & (advantages < 0)
    b1, k1, d1 = bottom_rho(logp, candidates, 1 / 3)
    b2, k2, d2 = batch_bottom_rho(logp, candidates, 1 / 3)
    assert torch.equal(b1, b2) and k1 == k2 == 3 and d1 == d2 == -4.0


def test_penalty_gradient_raises_the_selected_tokens_probability():
    z = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0, -6.0], requires_grad=True)  # one position, V = 6
    o = torch.tensor([3])
    proxy = proxy_logprob(z.detach()[None], o, 0.02)  # token 3 is kept (p / p_max = e^-3 > 0.02)
    assert proxy.item() > FILTERED
    logp = torch.log_softmax(z, -1)[o][None]  # [1, 1]
    # A = 0 isolates the pull (beta = 1); bottom = the token itself
    loss, _, selected, _ = lp_reg_loss(logp, logp.detach(), torch.zeros(1, 1), proxy[None],
                                       torch.ones(1, 1, dtype=torch.bool), 1.0, 9.0, 1.0)
    assert selected.item()
    loss.sum().backward()
    assert z.grad[3] < 0  # gradient descent raises its logit ...
    p_before = torch.softmax(z.detach(), -1)[3]
    assert torch.softmax(z.detach() - 0.1 * z.grad, -1)[3] > p_before  # ... and its probability


@pytest.mark.parametrize("kappa", [0.02, 0.2])
def test_expected_penalty_gradient_is_the_forward_kl_gradient(kappa):
    """E_{o ~ pi_theta}[grad k3(o)] = grad KL(pi_proxy || pi_theta), enumerating every token of a small vocabulary."""
    z = torch.tensor([1.5, 1.0, 0.2, -0.7, -2.0, -4.5, -5.0, 0.8], dtype=torch.float64, requires_grad=True)
    V = len(z)
    logp = torch.log_softmax(z, -1)
    targets = torch.arange(V)
    proxy = proxy_logprob(z.detach().expand(V, V), targets, kappa)  # [V]: log pi_proxy of each token
    assert (proxy == FILTERED).any()  # tokens outside the proxy's support take part too
    pi = logp.detach().exp()
    _, _, _, penalty = lp_reg_loss(logp[None], logp.detach()[None], torch.zeros(1, 1, dtype=torch.float64),
                                   proxy[None], torch.ones(1, V, dtype=torch.bool), 1.0, 9.0, 1.0, bound=math.inf)
    estimator_grad, = torch.autograd.grad((pi * penalty[0]).sum(), z)
    p_proxy = brute_force_proxy(z.detach()[None], kappa, "minp")[0]
    kl = (p_proxy * (p_proxy.clamp(min=1e-300).log() - torch.log_softmax(z, -1))).sum()
    kl_grad, = torch.autograd.grad(kl, z)
    assert torch.allclose(estimator_grad, kl_grad, atol=1e-10)
    assert torch.allclose(kl_grad, torch.softmax(z.detach(), -1) - p_proxy, atol=1e-10)  # the textbook form


def test_rho_zero_equals_grpo_loss_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(6, 9, generator=g) - 2).requires_grad_()
    old_logp = logp.detach() + torch.randn(6, 9, generator=g) * 1.5  # ratios far from 1: the (0, 10) clip is active
    advantages = torch.tensor([[-1.2], [0.7], [0.0], [-0.3], [1.1], [-0.9]])
    mask = (torch.rand(6, 9, generator=g) > 0.2).float()
    proxy = torch.where(torch.rand(6, 9, generator=g) > 0.5, logp.detach() + 0.5, torch.full((6, 9), FILTERED))
    bottom, selected = select(logp, advantages, mask, proxy, rho=0.0)
    assert not bottom.any()
    ours, clipped, _, _ = lp_reg_loss(logp, old_logp, advantages, proxy, bottom, 1.0, 9.0, 1.0)
    theirs, clipped_g = grpo_policy_loss(logp, old_logp, advantages, 1.0, 9.0)
    assert clipped_g.sum() > 0 and torch.equal(clipped, clipped_g)
    n = mask.sum().item()
    a, b = aggregate_loss(ours, mask, "token-mean", n, 6, 9), aggregate_loss(theirs, mask, "token-mean", n, 6, 9)
    assert torch.equal(a, b)
    ga, = torch.autograd.grad(a, logp)
    gb, = torch.autograd.grad(b, logp)
    assert torch.equal(ga, gb)
    # and with rho > 0 the same inputs do differ: the comparison can fail
    bottom, selected = select(logp, advantages, mask, proxy, rho=0.5)
    assert selected.any() and not torch.equal(lp_reg_loss(logp, old_logp, advantages, proxy, bottom, 1.0, 9.0, 1.0)[0],
                                              theirs)


def test_microbatch_token_mean_is_the_authors_weighting_hand_worked():
    """--token-mean microbatch: each micro-batch's token-mean times its share of the sequences (verl's dynamic batch
    size); --token-mean batch (grpo.aggregate_loss): one token-mean over the whole optimizer batch. Equal with one
    micro-batch or equal tokens per sequence, different otherwise."""
    from lp_reg import microbatch_token_mean
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # 3 + 1 + 2 = 6 tokens, 3 sequences
    a = microbatch_token_mean(loss[:2], mask[:2], 3) + microbatch_token_mean(loss[2:], mask[2:], 3)
    assert a.item() == pytest.approx((1 + 2 + 3 + 4) / 4 * 2 / 3 + (5 + 6) / 2 * 1 / 3)  # 10/6 + 11/6 = 3.5
    ours = sum(aggregate_loss(loss[m], mask[m], "token-mean", 6, 3, 3) for m in (slice(0, 2), slice(2, 3)))
    assert ours.item() == pytest.approx(21 / 6)  # 3.5 as well here, by coincidence of the sums; gradients differ:
    w = torch.ones(3, 3, requires_grad=True)
    g_authors, = torch.autograd.grad(sum(microbatch_token_mean((w * loss)[m], mask[m], 3)
                                         for m in (slice(0, 2), slice(2, 3))), w)
    g_ours, = torch.autograd.grad(sum(aggregate_loss((w * loss)[m], mask[m], "token-mean", 6, 3, 3)
                                      for m in (slice(0, 2), slice(2, 3))), w)
    assert g_authors[0, 0].item() == pytest.approx(1 / 4 * 2 / 3) and g_ours[0, 0].item() == pytest.approx(1 / 6)
    assert g_authors[2, 0].item() == pytest.approx(5 / 2 * 1 / 3) and g_ours[2, 0].item() == pytest.approx(5 / 6)
    whole = microbatch_token_mean(loss, mask, 3)  # one micro-batch: the two weightings agree
    assert whole.item() == pytest.approx(aggregate_loss(loss, mask, "token-mean", 6, 3, 3).item())


def test_end_to_end_microbatch_token_mean_runs_and_equals_batch_with_one_micro_batch(tiny_dir, tmp_path):
    run(["--model", tiny_dir, "--run-dir", tmp_path / "a", "--rho", "0.2", "--token-mean", "microbatch"] + SMALL,
        script="lp_reg.py")
    run(["--model", tiny_dir, "--run-dir", tmp_path / "b", "--rho", "0.2"] + SMALL, script="lp_reg.py")
    run(["--model", tiny_dir, "--run-dir", tmp_path / "c", "--rho", "0.2", "--token-mean", "microbatch",
         "--micro-batch-size", "3"] + SMALL, script="lp_reg.py")
    a, b, c = metrics(tmp_path / "a"), metrics(tmp_path / "b"), metrics(tmp_path / "c")
    for x, y in zip(a[1:], b[1:]):  # one micro-batch per step (SMALL's 16 rows < 64): the same update
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["grad_norm"] == pytest.approx(y["grad_norm"],
                                                                                                 rel=1e-5)
    assert any(x["grad_norm"] != pytest.approx(z["grad_norm"], rel=1e-4) for x, z in zip(a[1:], c[1:]))


def test_end_to_end_rho_zero_trains_exactly_like_grpo(tiny_dir, tmp_path):
    run(["--model", tiny_dir, "--run-dir", tmp_path / "lp", "--rho", "0"] + SMALL, script="lp_reg.py")
    run(["--model", tiny_dir, "--run-dir", tmp_path / "grpo", "--clip-low", "1.0", "--clip-high", "9.0"] + SMALL)
    m1, m2 = metrics(tmp_path / "lp"), metrics(tmp_path / "grpo")
    assert any(r["grad_norm"] > 0 for r in m1[1:]), "no learning signal: the comparison would be vacuous"
    for a, b in zip(m1[1:], m2[1:]):
        assert (a["loss"], a["grad_norm"], a["reward/mean"]) == (b["loss"], b["grad_norm"], b["reward/mean"])
        assert a["lp_reg/frac_regularized"] == 0
    w1, w2, w0 = weights(tmp_path / "lp"), weights(tmp_path / "grpo"), load_file(os.path.join(tiny_dir,
                                                                                              "model.safetensors"))
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_end_to_end_regularises_and_logs(tiny_dir, tmp_path):
    run(["--model", tiny_dir, "--run-dir", tmp_path / "r", "--rho", "0.2", "--rho-pos", "0.1"] + SMALL,
        script="lp_reg.py")
    rows = metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all("lp_reg/frac_regularized" in r and "lp_reg/frac_fired" in r for r in rows[1:])
    fired = [r for r in rows[1:] if r["lp_reg/frac_regularized"] > 0]
    assert fired, "the regularisation never fired: the run checks nothing"
    for r in fired:
        assert 0 < r["lp_reg/threshold_prob"] <= 1 and 0 < r["lp_reg/frac_pass_filter"] <= 1
        assert r["lp_reg/kl_mean"] >= 0
    assert "eval/pass@1" in rows[-1]


@pytest.mark.parametrize("flags, message", [(["--rho", "2"], "--rho"), (["--proxy", "topk"], "--proxy"),
                                            (["--percentile-scope", "step"], "--percentile-scope"),
                                            (["--kappa", "0"], "--kappa"),
                                            (["--token-mean", "microbatch", "--loss-agg", "seq-mean-token-mean"],
                                             "--token-mean microbatch needs --loss-agg token-mean")])
def test_bad_flags_name_the_flag(flags, message, capsys):
    from common import parse_args
    from lp_reg import Args
    with pytest.raises(SystemExit):
        parse_args(Args, flags)
    assert message in capsys.readouterr().err
