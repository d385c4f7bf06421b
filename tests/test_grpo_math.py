"""GRPO's math and common.py's numerics against hand-worked numbers and independent computations."""
import itertools

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import common
from common import (counter_gumbel, ks_up_to, pass_at_k, rollout_batch, sample_keys,
                    sampling_processor, shard_model, shared_prefix_forward, token_logprobs)
from grpo import aggregate_loss, group_advantages, kl_k3, policy_loss


def test_group_advantages_hand_worked():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2: all equal -> 0
    assert torch.allclose(group_advantages(r, 4), torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]), atol=1e-5)
    assert torch.allclose(group_advantages(r, 4, "none"), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


def test_policy_loss_hand_worked():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped = policy_loss(logp, old, adv, 0.2, 0.2)
    # min(rho A, clip(rho) A): 1.5 -> 1.2 clipped; -1.5 stays; 0.5 stays; -0.5 -> -0.8 clipped
    assert torch.allclose(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]]), atol=1e-6)
    assert clipped.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    # clip-higher: the ceiling moves to 1.28
    loss, _ = policy_loss(logp, old, adv, 0.2, 0.28)
    assert loss[0, 0].item() == pytest.approx(-1.28)


def test_kl_k3_is_zero_at_equality_and_positive_elsewhere():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.allclose(kl_k3(lp, lp), torch.zeros(3))
    assert (kl_k3(lp, lp + torch.tensor([0.3, -0.3, 1.0])) > 0).all()


def test_aggregate_loss_hand_worked():
    l = torch.tensor([[1.0, 2, 3], [4, 5, 9]])
    m = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    assert aggregate_loss(l, m, "token-mean", 5, 2, 4).item() == pytest.approx(15 / 5)
    assert aggregate_loss(l, m, "seq-mean-token-mean", 5, 2, 4).item() == pytest.approx((2 + 4.5) / 2)
    assert aggregate_loss(l, m, "seq-mean-token-sum-norm", 5, 2, 4).item() == pytest.approx((6 / 4 + 9 / 4) / 2)


def test_aggregate_loss_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(torch.ones(1, 2), torch.ones(1, 2), "token-sum", 2, 1, 2)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_loss_invariant_to_micro_batching(mode):
    g = torch.Generator().manual_seed(0)
    l = torch.randn(10, 7, generator=g)
    m = (torch.rand(10, 7, generator=g) > 0.3).float()
    n_tok, n_seq = m.sum().item(), 10
    whole = aggregate_loss(l, m, mode, n_tok, n_seq, 7)
    for size in (1, 3, 4):
        parts = sum(aggregate_loss(l[i:i + size], m[i:i + size], mode, n_tok, n_seq, 7) for i in range(0, 10, size))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def brute_force_pass_at_k(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 4, 8])
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
    assert ks_up_to(16) == [1, 2, 4, 8, 16] and ks_up_to(12) == [1, 2, 4, 8]


def tiny_random_model(tie=False):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg).double()


def test_token_logprobs_match_naive_full_softmax_values_and_gradients():
    model = tiny_random_model()
    samples = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 10, 11]},
               {"prompt_ids": [12], "completion_ids": [13, 14]},
               {"prompt_ids": [15, 16], "completion_ids": [17]}]
    ids, attn, mask, P = rollout_batch(samples, 0, "cpu")
    logp, ent = token_logprobs(model, ids, attn, P, chunk=3)  # chunk=3 forces several chunks
    (logp * mask).sum().backward()
    grad_chunked = model.lm_head.weight.grad.clone()
    model.zero_grad()
    # naive: every sequence alone, no padding, full [T, V] softmax
    naive_grad_loss = 0
    for i, s in enumerate(samples):
        seq = torch.tensor([s["prompt_ids"] + s["completion_ids"]])
        logits = model(seq).logits[0].double()
        lsm = logits.log_softmax(-1)
        n_p, n_c = len(s["prompt_ids"]), len(s["completion_ids"])
        want = lsm[n_p - 1:n_p - 1 + n_c].gather(-1, torch.tensor(s["completion_ids"])[:, None]).squeeze(-1)
        want_ent = -(lsm.exp() * lsm).sum(-1)[n_p - 1:n_p - 1 + n_c]
        assert torch.allclose(logp[i, :n_c], want, atol=1e-9)
        assert torch.allclose(ent[i, :n_c], want_ent, atol=1e-9)
        assert (logp[i, n_c:] == 0).all() and mask[i].sum() == n_c
        naive_grad_loss = naive_grad_loss + want.sum()
    naive_grad_loss.backward()
    assert torch.allclose(grad_chunked, model.lm_head.weight.grad, atol=1e-9)


def test_token_logprobs_at_a_temperature_are_the_tempered_policy_values_and_gradients():
    """temperature T: log softmax(z / T) of the sampled tokens (the policy that samples at --temperature T), its
    entropy, and the gradient of their sum, against the naive full softmax; T = 1 is the plain policy."""
    model = tiny_random_model()
    samples = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 10, 11]},
               {"prompt_ids": [12], "completion_ids": [13]}]
    ids, attn, mask, P = rollout_batch(samples, 0, "cpu")
    logp, ent = token_logprobs(model, ids, attn, P, chunk=2, temperature=0.7)
    (logp * mask).sum().backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits[:, P - 1:-1]
    lsm = (logits / 0.7).log_softmax(-1)  # [N, T, V]
    want = lsm.gather(-1, ids[:, P:, None]).squeeze(-1) * mask
    assert torch.allclose(logp, want, atol=1e-9)
    assert torch.allclose(ent, -(lsm.exp() * lsm).sum(-1) * mask, atol=1e-9)
    want.sum().backward()
    assert torch.allclose(grad, model.lm_head.weight.grad, atol=1e-9)
    with torch.no_grad():
        plain, _ = token_logprobs(model, ids, attn, P)
        assert not torch.allclose(plain, logp, atol=1e-3)  # the temperature matters on these tokens


def test_training_top_p_below_one_is_refused_with_the_flag_named():
    with pytest.raises(common.UserError, match="--top-p 0.9"):
        common.BaseArgs(top_p=0.9)
    assert common.BaseArgs(eval_top_p=0.9).eval_top_p == 0.9  # evaluation keeps its nucleus


def test_token_logprobs_hidden_is_lm_head_input():
    model = tiny_random_model()
    ids, attn, mask, P = rollout_batch([{"prompt_ids": [1, 2], "completion_ids": [3, 4, 5]}], 0, "cpu")
    with torch.no_grad():
        logp, _, h = token_logprobs(model, ids, attn, P, return_hidden=True)
        full = model(ids).logits.log_softmax(-1)[0, P - 1:-1]
    assert h.shape == (1, 3, 32)
    assert torch.allclose((h[0] @ model.lm_head.weight.T).log_softmax(-1), full, atol=1e-9)


def test_counter_sampling_matches_softmax_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    n = 40000
    keys = torch.stack([sample_keys(7, i) for i in range(n)])
    for T in (1.0, 0.5):
        proc = sampling_processor(keys, prompt_len=3, temperature=T, top_p=1.0)
        tokens = proc(torch.zeros(n, 5, dtype=torch.long), logits.expand(n, 5)).argmax(-1)
        freq = torch.bincount(tokens, minlength=5).double() / n
        want = (logits.double() / T).softmax(-1)
        assert torch.allclose(freq, want, atol=4 * (want * (1 - want) / n).sqrt().max().item() + 1e-3)
    # top-p 0.8: probabilities .64 .23 .086 ...: the nucleus is the first two tokens
    proc = sampling_processor(keys, 3, 1.0, 0.8)
    tokens = proc(torch.zeros(n, 5, dtype=torch.long), logits.expand(n, 5)).argmax(-1)
    assert set(tokens.tolist()) == {0, 1}
    # the noise of a completion depends only on its key and position, not on its batch neighbours
    a = counter_gumbel(keys[:4], 2, 5)
    b = counter_gumbel(keys[2:6], 2, 5)
    assert torch.equal(a[2:], b[:2]) and not torch.equal(a[0], a[1])
    assert not torch.equal(counter_gumbel(keys[:1], 2, 5), counter_gumbel(keys[:1], 3, 5))


def test_token_logprobs_row_fn_sees_full_vocabulary_logits():
    model = tiny_random_model()
    ids, attn, mask, P = rollout_batch([{"prompt_ids": [1, 2], "completion_ids": [3, 4, 5]},
                                        {"prompt_ids": [6], "completion_ids": [7]}], 0, "cpu")
    with torch.no_grad():
        _, _, lse = token_logprobs(model, ids, attn, P, chunk=2, row_fn=lambda logits, t: logits.logsumexp(-1))
        full = model(ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits[:, P - 1:-1]
    assert torch.allclose(lse * mask, full.logsumexp(-1) * mask, atol=1e-9)
    with torch.enable_grad():  # also with gradients on (the chunk is recomputed in backward)
        _, _, lse2 = token_logprobs(model, ids, attn, P, chunk=2, row_fn=lambda logits, t: logits.logsumexp(-1))
    assert torch.allclose(lse2, lse, atol=1e-12)


def test_shared_prompt_forward_matches_rows_run_in_full(monkeypatch):
    """Prefix sharing (each prompt's forward once, its KV cache copied to the G rows) gives the same log-probs,
    entropies and gradients of every parameter as running each sequence alone, and really runs each prompt once."""
    model = tiny_random_model()
    a, b = [5, 6, 7, 8], [12, 3]  # two prompts of different lengths (b is left-padded), 3 and 2 completions each
    samples = [{"prompt_ids": a, "completion_ids": c} for c in ([8, 9, 10, 11], [9], [13, 14, 15])] + \
              [{"prompt_ids": b, "completion_ids": c} for c in ([13, 14], [17, 18, 19, 20])]
    ids, attn, mask, P = rollout_batch(samples, 0, "cpu")
    rows_seen = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kw: rows_seen.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)
    logp, ent = token_logprobs(model, ids, attn, P, chunk=3)
    hook.remove()
    assert rows_seen == [(2, P), (5, ids.shape[1] - P)]  # 2 distinct prompts once, then 5 completions on top
    (logp * mask).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0
    for i, s in enumerate(samples):  # naive: each sequence alone, no padding, no cache
        seq = torch.tensor([s["prompt_ids"] + s["completion_ids"]])
        lsm = model(seq).logits[0].log_softmax(-1)
        n_p, n_c = len(s["prompt_ids"]), len(s["completion_ids"])
        want = lsm[n_p - 1:n_p - 1 + n_c].gather(-1, torch.tensor(s["completion_ids"])[:, None]).squeeze(-1)
        assert torch.allclose(logp[i, :n_c], want, atol=1e-5)  # RMSNorm runs in fp32 even in a float64 model
        assert torch.allclose(ent[i, :n_c], -(lsm.exp() * lsm).sum(-1)[n_p - 1:n_p - 1 + n_c], atol=1e-5)
        total = total + want.sum()
    total.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(shared_grads[n], p.grad, atol=1e-5, rtol=1e-4), n
    assert shared_grads["model.embed_tokens.weight"][a].abs().sum() > 0  # the prompt forward got its gradient
    # scoring from position 1 (ARM's prompt confidence) with the prompt still shared
    with torch.no_grad():
        part = token_logprobs(model, ids, attn, 1, prompt_len=P)[0]
        monkeypatch.setattr(common, "shared_prefix_forward", lambda *a: None)  # every row in full
        full = token_logprobs(model, ids, attn, 1)[0]
        monkeypatch.undo()
    assert torch.allclose(full, part, atol=1e-5)
    # gradient checkpointing in training: transformers drops caches, so sharing turns itself off
    shard_model(model, 1, torch.device("cpu"), "on")  # gradient checkpointing on, as on GPU
    model.train()
    assert shared_prefix_forward(model, ids, attn, P) is None
    again, _ = token_logprobs(model, ids, attn, P)
    assert torch.allclose(again, logp, atol=1e-5)


def test_generate_with_shared_prompts_samples_the_same_completions(tiny_dir, monkeypatch):
    from common import format_prompt, generate, load_model, countdown_problems
    model, tok = load_model(tiny_dir, torch.device("cpu"))
    model.double()
    prompts = [format_prompt(tok, p) for p in countdown_problems(3, 0) for _ in range(4)]
    keys = torch.stack([sample_keys(1, i) for i in range(len(prompts))])
    shared = generate(model, tok, prompts, keys, 16)
    monkeypatch.setattr(common, "shared_prefix_forward", lambda *a: None)  # every row runs its prompt in full
    full = generate(model, tok, prompts, keys, 16)
    assert shared == full
    assert len({tuple(s["completion_ids"]) for s in shared}) > 3  # sampled, not one completion per prompt
