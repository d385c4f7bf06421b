"""arm.py (ProGRPO's Advantage Re-weighting Mechanism) against hand-worked numbers, brute force, grpo.py and
autograd."""
import math
import os
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

import grpo
from arm import (answer_confidence, arm_advantages, group_advantages, low_probability_tokens, policy_loss,
                 prompt_confidence, split_prompt_positions)
from common import rollout_batch, token_logprobs
from grpo import aggregate_loss
from test_grpo_script import SMALL, metrics, run, weights

A = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # GRPO advantage of rewards 1,1,0,0: mean 0.5, unbiased std sqrt(1/3)


def padded_logp(rows):
    """Right-padded [N, T] log-probs and mask from lists of probabilities."""
    T = max(len(r) for r in rows)
    logp = torch.tensor([[math.log(p) for p in r] + [0.0] * (T - len(r)) for r in rows], dtype=torch.float64)
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in rows], dtype=torch.float64)
    return logp, mask


# Hand-worked group, G = 4, rewards 1, 1, 0, 0, rho = 0.2, alpha = 0.2.
#   o1 (correct) L = 3  -> K = 1: T_low = {0.5}                           c = 0.5
#   o2 (correct) L = 6  -> K = ceil(1.2) = 2: {0.1, 0.4}, 0.4 tied        c = sqrt(0.1 * 0.4) = 0.2
#   o3 (wrong)   L = 15 -> K = 3 (0.2 * 15 = 3.0000000000000004 in floats): {0.2, 0.2, 0.2} c = 0.2
#                (K = 4 would add 0.3)
#   o4 (wrong)   L = 1  -> K = 1                                          c = 0.6
#   prompt: q_1 not scored (NaN: predicted by padding), then 0.5, 0.25, 0.125: c(q) = exp(mean log) = 0.25
ANSWERS = [[0.9, 0.5, 0.8], [0.9, 0.1, 0.4, 0.4, 0.8, 0.7], [0.9] * 11 + [0.3, 0.2, 0.2, 0.2], [0.6]]
C_ANSWER = [0.5, 0.2, 0.2, 0.6]


def hand_prompt(G=4):
    logp = torch.tensor([[math.nan, math.log(0.5), math.log(0.25), math.log(0.125)]] * G, dtype=torch.float64)
    return logp, torch.tensor([[0.0, 1, 1, 1]] * G, dtype=torch.float64)


def test_hand_worked_group():
    logp, mask = padded_logp(ANSWERS)
    low, K = low_probability_tokens(logp, mask, 0.2)
    assert K.tolist() == [1, 2, 3, 1]
    assert low.sum(-1).tolist() == [1, 2, 3, 1] and not (low & ~mask.bool()).any()
    c_answer = answer_confidence(logp, mask, 0.2)
    assert c_answer.tolist() == pytest.approx(C_ANSWER, rel=1e-12)
    c_prompt = prompt_confidence(*hand_prompt(), c_answer, 4, 0.2)
    assert c_prompt.tolist() == pytest.approx([0.25] * 4, rel=1e-12)
    rewards = torch.tensor([1.0, 1, 0, 0], dtype=torch.float64)
    adv, shifted = arm_advantages(group_advantages(rewards, 4), rewards > 0.5, c_prompt, c_answer, 4, 0.2)
    expected = [A + 0.2 * (0.25 - 0.5), A + 0.2 * (0.25 - 0.2), -A + 0.2 * (0.25 - 0.2), -A + 0.2 * (0.25 - 0.6)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-9)  # [A - 0.05, A + 0.01, -A + 0.01, -A - 0.07]
    assert shifted.all()
    # the over-confident correct o1 (c = 0.5 > c(q)) is pushed up less than the under-confident correct o2
    assert adv[0] < A < adv[1]


def test_confidence_ablations_hand_worked():
    logp, mask = padded_logp(ANSWERS)
    # sum-over-k: exp(sum_{all t} l_t / K)
    expected = [math.prod(r) ** (1 / k) for r, k in zip(ANSWERS, [1, 2, 3, 1])]
    assert answer_confidence(logp, mask, 0.2, "sum-over-k").tolist() == pytest.approx(expected, rel=1e-9)
    c_answer = torch.tensor(C_ANSWER, dtype=torch.float64)
    # T_low on the prompt: 3 scored tokens -> K = 1 -> the lowest, 0.125
    assert prompt_confidence(*hand_prompt(), c_answer, 4, 0.2, "tlow").tolist() == pytest.approx([0.125] * 4)
    # group mean of c(o|q) (prompt log-probs unused)
    assert prompt_confidence(torch.zeros(4, 0), torch.zeros(4, 0), c_answer, 4, 0.2, "group-mean").tolist() == \
        pytest.approx([0.375] * 4)


def test_low_probability_tokens_match_brute_force_with_ties():
    rng = random.Random(0)
    for _ in range(200):
        L, T, rho = rng.randint(0, 12), 12, rng.choice([0.1, 0.2, 0.25, 0.5, 1.0])
        values = [float(-rng.randint(0, 3)) for _ in range(L)]  # many ties
        logp = torch.tensor(values + [rng.uniform(-9, 0) for _ in range(T - L)], dtype=torch.float64)[None]
        mask = torch.tensor([1.0] * L + [0.0] * (T - L), dtype=torch.float64)[None]
        low, K = low_probability_tokens(logp, mask, rho)
        k = min(max(1, math.ceil(round(rho * L, 9))), L)
        assert K.item() == k and low.sum().item() == k and not low[0, L:].any()
        assert sorted(logp[0][low[0]].tolist()) == sorted(values)[:k]  # the k smallest values, whichever tied index
        c = answer_confidence(logp, mask, rho).item()
        assert c == pytest.approx(math.exp(sum(sorted(values)[:k]) / k) if L else 1.0, rel=1e-12)


@pytest.mark.parametrize("scope", ["all", "correct", "mixed"])
def test_all_wrong_groups_are_unchanged(scope):
    g = torch.Generator().manual_seed(0)
    rewards = torch.tensor([0.0, 0, 0, 0, 1, 0, 1, 0])
    base = group_advantages(rewards, 4)
    c_answer, c_prompt = torch.rand(8, generator=g), torch.rand(8, generator=g)
    adv, shifted = arm_advantages(base, rewards > 0.5, c_prompt, c_answer, 4, 0.3, scope)
    assert torch.equal(adv[:4], base[:4]) and not shifted[:4].any()
    assert (adv[4:] != base[4:]).any()


def test_all_correct_groups_get_the_confidence_signal():
    rewards = torch.ones(4)
    base = group_advantages(rewards, 4)
    assert torch.equal(base, torch.zeros(4))  # GRPO: no signal at all
    c_answer, c_prompt = torch.tensor([0.9, 0.1, 0.5, 0.3]), torch.full((4,), 0.4)
    for scope in ("all", "correct"):
        adv, _ = arm_advantages(base, rewards > 0.5, c_prompt, c_answer, 4, 0.2, scope)
        assert adv.tolist() == pytest.approx([0.2 * (0.4 - c) for c in c_answer.tolist()])
        # over-confident (c(o|q) > c(q)) -> pushed down; under-confident -> pushed up
        assert (adv.sign() == (c_prompt - c_answer).sign()).all() and (adv != 0).all()
    adv, shifted = arm_advantages(base, rewards > 0.5, c_prompt, c_answer, 4, 0.2, "mixed")
    assert torch.equal(adv, base) and not shifted.any()


def test_scope_correct_leaves_wrong_responses():
    rewards = torch.tensor([1.0, 0, 1, 0])
    base = group_advantages(rewards, 4)
    c_answer, c_prompt = torch.tensor([0.9, 0.1, 0.5, 0.3]), torch.full((4,), 0.4)
    adv, shifted = arm_advantages(base, rewards > 0.5, c_prompt, c_answer, 4, 0.2, "correct")
    assert shifted.tolist() == [True, False, True, False]
    assert adv[1] == base[1] and adv[3] == base[3] and adv[0] == pytest.approx(base[0] - 0.1)


# ---------------------------------------------------------------- on a tiny random Qwen2

def tiny_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(dtype)


def tiny_samples(seed=0, G=4):
    """Two prompts of different lengths (left padding), G completions of different lengths each."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for plen in (5, 8):
        prompt = torch.randint(1, 64, (plen,), generator=g).tolist()
        for j in range(G):
            samples.append({"prompt_ids": prompt,
                            "completion_ids": torch.randint(1, 64, (3 + 2 * j,), generator=g).tolist(),
                            "finished": True})
    return samples


def test_prompt_positions_come_from_the_old_logprob_pass():
    model, samples = tiny_model(), tiny_samples()
    ids, attn, mask, P = rollout_batch(samples, 0, "cpu")
    with torch.no_grad():
        logp, ent = token_logprobs(model, ids, attn, 1)
        prompt_logp, prompt_mask, old_logp, entropy = split_prompt_positions(logp, ent, attn, P, 1)
        ref_logp, ref_ent = token_logprobs(model, ids, attn, P)  # what grpo.py computes
        assert torch.allclose(old_logp, ref_logp, atol=1e-12) and torch.allclose(entropy, ref_ent, atol=1e-12)
        for i, s in enumerate(samples):  # independent: each prompt alone, unpadded, full logits
            q = torch.tensor(s["prompt_ids"])[None]
            lp = model(input_ids=q).logits.log_softmax(-1)[0, :-1].gather(-1, q[0, 1:, None]).squeeze(-1)  # t >= 2
            assert prompt_mask[i].sum().item() == len(s["prompt_ids"]) - 1
            assert torch.allclose(prompt_logp[i][prompt_mask[i].bool()], lp, atol=1e-10)
    c_prompt = prompt_confidence(prompt_logp, prompt_mask, None, 4, 0.2)
    assert c_prompt[0].item() == pytest.approx(math.exp(prompt_logp[0][prompt_mask[0].bool()].mean().item()))
    # group-mean needs no prompt scoring: the pass starts at P as in GRPO and the prompt part is empty
    prompt_logp, prompt_mask, old_logp, _ = split_prompt_positions(ref_logp, ref_ent, attn, P, P)
    assert prompt_logp.shape == prompt_mask.shape == (8, 0) and torch.equal(old_logp, ref_logp)


def test_alpha_zero_reproduces_grpo_loss_and_gradient():
    samples = tiny_samples(1)
    ids, attn, mask, P = rollout_batch(samples, 0, "cpu")
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])  # a mixed and an all-correct group
    losses, grads = [], []
    for method in ("grpo", "arm"):
        model = tiny_model()
        with torch.no_grad():
            if method == "grpo":
                old_logp = token_logprobs(model, ids, attn, P)[0]
                adv = grpo.group_advantages(rewards, 4)
            else:
                logp, ent = token_logprobs(model, ids, attn, 1)
                prompt_logp, prompt_mask, old_logp, _ = split_prompt_positions(logp, ent, attn, P, 1)
                c_answer = answer_confidence(old_logp, mask, 0.2)
                c_prompt = prompt_confidence(prompt_logp, prompt_mask, c_answer, 4, 0.2)
                adv, shifted = arm_advantages(group_advantages(rewards, 4), rewards > 0.5, c_prompt, c_answer, 4, 0.0)
                assert shifted.all() and (c_prompt != c_answer).all()  # the shift is applied, with alpha = 0
            for p in model.parameters():  # move the policy so the ratios leave 1 and the clip bites
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
        logp = token_logprobs(model, ids, attn, P)[0]
        loss_fn = grpo.policy_loss if method == "grpo" else policy_loss
        token_loss, clipped = loss_fn(logp, old_logp, adv[:, None], 0.2, 0.28)
        loss = aggregate_loss(token_loss, mask, "token-mean", mask.sum().item(), 8, 20)
        loss.backward()
        assert clipped.sum() > 0
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-12, abs=1e-15)
    assert torch.allclose(grads[1], grads[0], rtol=1e-10, atol=1e-14)


def per_response(model, ids, attn, mask, P, adv):
    """Per-response policy-gradient weight -d loss / d log pi(o_i) (summed over its tokens, x #tokens) and the norm of
    response i's own parameter gradient, at ratio 1 (on-policy), token-mean loss."""
    n_tokens = mask.sum().item()
    logp = token_logprobs(model, ids, attn, P)[0]
    logp_leaf = logp.detach().requires_grad_()
    loss = policy_loss(logp_leaf, logp.detach(), adv[:, None], 0.2, 0.28)[0]
    aggregate_loss(loss, mask, "token-mean", n_tokens, 4, 20).backward()
    weight = -(logp_leaf.grad * mask).sum(-1) * n_tokens / mask.sum(-1)  # [N]
    norms = []
    for i in range(len(adv)):
        model.zero_grad()
        lp = token_logprobs(model, ids[i:i + 1], attn[i:i + 1], P)[0]
        aggregate_loss(policy_loss(lp, lp.detach(), adv[i:i + 1, None], 0.2, 0.28)[0], mask[i:i + 1], "token-mean",
                       n_tokens, 4, 20).backward()
        norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
    return weight, torch.tensor(norms)


def test_overconfident_correct_response_gets_the_smaller_update():
    model = tiny_model(3)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, 64, (6,), generator=g).tolist()
    with torch.no_grad():  # over-confident: the greedy continuation; under-confident: uniformly random tokens
        greedy = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                                do_sample=False,
                                max_new_tokens=8, min_new_tokens=8, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    completions = [greedy] + [torch.randint(1, 64, (8,), generator=g).tolist() for _ in range(3)]
    samples = [{"prompt_ids": prompt, "completion_ids": c, "finished": True} for c in completions]
    ids, attn, mask, P = rollout_batch(samples, 0, "cpu")
    # mixed, all-correct
    for rewards in (torch.tensor([1.0, 1, 0, 0], dtype=torch.float64), torch.ones(4, dtype=torch.float64)):
        with torch.no_grad():
            logp, ent = token_logprobs(model, ids, attn, 1)
            prompt_logp, prompt_mask, old_logp, _ = split_prompt_positions(logp, ent, attn, P, 1)
            c_answer = answer_confidence(old_logp, mask, 0.2)
            c_prompt = prompt_confidence(prompt_logp, prompt_mask, c_answer, 4, 0.2)
        assert c_answer[0] > c_answer[1]  # the greedy response is the over-confident one
        base = group_advantages(rewards, 4)
        adv, _ = arm_advantages(base, rewards > 0.5, c_prompt, c_answer, 4, 0.2)
        w_arm, n_arm = per_response(model, ids, attn, mask, P, adv)
        w_grpo, n_grpo = per_response(model, ids, attn, mask, P, base)
        assert torch.allclose(w_arm, adv, atol=1e-10) and torch.allclose(w_grpo, base, atol=1e-10)  # autograd = A~
        assert w_arm[0] < w_arm[1]  # same reward, the over-confident correct response is pushed up less
        assert w_grpo[0] == pytest.approx(w_grpo[1])  # GRPO treats them alike
        if rewards.sum() == 2:  # relative to GRPO, its gradient shrinks and the under-confident one's grows
            assert n_arm[0] / n_grpo[0] < 1 < n_arm[1] / n_grpo[1]
        else:  # all-correct: GRPO has no gradient at all; ARM's signs follow c(q) - c(o|q)
            assert (n_grpo == 0).all() and (n_arm > 0).all()
            assert (w_arm.sign() == (c_prompt - c_answer).sign()).all()


# ---------------------------------------------------------------- the script

def test_end_to_end(tiny_dir, tmp_path):
    p = run(["--model", tiny_dir, "--run-dir", tmp_path / "r"] + SMALL, script="arm.py")
    rows = metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ("arm/c_prompt_mean", "arm/c_answer_mean", "arm/shift_mean", "arm/shift_abs_mean", "arm/shift_min",
                "arm/shift_max", "arm/frac_correct_negative", "arm/weight_mean", "arm/corr_conf_shift",
                "arm/distinct_correct", "arm/frac_shifted", "entropy/mean", "reward/mean", "loss"):
        assert all(key in r and math.isfinite(r[key]) for r in rows[1:]), key
    assert all(0 < r["arm/c_prompt_mean"] <= 1 and 0 < r["arm/c_answer_mean"] <= 1 for r in rows[1:])
    assert all(r["arm/prompt_tokens_scored"] > 0 for r in rows[1:])
    assert "eval/pass@1" in rows[-1] and "pass@1" in p.stdout
    import json
    config = json.load(open(tmp_path / "r" / "config.json"))
    assert config["script"] == "arm" and config["alpha"] == 0.2 and config["clip_high"] == 0.28


def test_script_alpha_zero_matches_grpo_script(tiny_dir, tmp_path):
    # enough samples for a correct answer at ~3% success
    flags = SMALL + ["--prompts-per-step", "8", "--group-size", "8"]
    run(["--model", tiny_dir, "--run-dir", tmp_path / "g", "--clip-high", "0.28"] + flags)
    run(["--model", tiny_dir, "--run-dir", tmp_path / "a", "--alpha", "0"] + flags, script="arm.py")
    mg, ma = metrics(tmp_path / "g"), metrics(tmp_path / "a")
    assert any(r["loss"] != 0 for r in mg[1:]), "no learning signal: the comparison would be vacuous"
    for a, b in zip(mg[1:], ma[1:]):
        assert a["reward/mean"] == b["reward/mean"] and a["entropy/mean"] == pytest.approx(b["entropy/mean"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # Weights: equal up to float rounding. ARM's old-log-prob pass projects a different set of rows through the LM head
    # (prompt positions too), so pi_old differs in the last bits; Adam divides by sqrt(v), which blows up that noise on
    # entries whose gradient is ~0. Bound: 2% of how far the weights moved (an ARM shift of alpha 0.2 moves far more).
    wg, wa, w0 = weights(tmp_path / "g"), weights(tmp_path / "a"), load_file(os.path.join(tiny_dir,
                                                                                          "model.safetensors"))
    moved = max((wg[k] - w0[k]).abs().max().item() for k in wg)
    assert moved > 1e-4 and max((wg[k] - wa[k]).abs().max().item() for k in wg) < 0.02 * moved


@pytest.mark.parametrize("flags, message", [(["--alpha", "-0.1"], "--alpha"), (["--rho", "0"], "--rho"),
                                            (["--delta", "0"], "--delta"), (["--arm-scope", "some"], "--arm-scope"),
                                            (["--prompt-confidence", "x"], "--prompt-confidence")])
def test_bad_flags_name_the_flag(flags, message):
    p = run(flags + ["--steps", "0"], script="arm.py", check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
