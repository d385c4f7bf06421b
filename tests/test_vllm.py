"""The colocated vLLM rollout engine (common.rollout_engine / push_weights / vllm_generate / logprob_parity).

On CPU: the plumbing against a stand-in for the few vLLM calls it makes (an LLM backed by its own copy of the model,
so its weights are stale until pushed): every tensor is pushed, the engine wakes, samples with one seed per completion
and sleeps, and the parity check catches an engine that kept old weights. The stand-in encodes our reading of vLLM's
API; the `gpu` tests run the real engine (pip install vllm, see README) and are skipped without CUDA."""
import copy
import sys
from types import SimpleNamespace

import pytest
import torch

import common
from common import UserError, generate, logprob_parity, push_weights, rollout_engine, vllm_generate


class FakeLLM:
    """The vLLM surface we use: generate (token-id prompts, one SamplingParams per prompt, or prompt_logprobs),
    sleep/wake_up, reset_prefix_cache, and llm_engine....model_runner.model.load_weights."""

    def __init__(self, model, push_works=True):
        self.model, self.push_works, self.calls = copy.deepcopy(model).to(torch.bfloat16), push_works, []
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self.load_weights))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)))

    def load_weights(self, weights):
        for name, t in weights:
            self.calls.append(("load", name, t.dtype))
            if self.push_works:
                self.model.state_dict()[name].copy_(t)

    def reset_prefix_cache(self):
        self.calls.append(("reset",))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake", tags))

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        if not isinstance(params, list):  # the parity check: prompt log-probs from the raw logits
            ids = torch.tensor([prompts[0]["prompt_token_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(self.model(input_ids=ids).logits.float()[0], -1)  # [L, V]
            pl = [None] + [{t: SimpleNamespace(logprob=float(logp[i - 1, t]))} for i, t in enumerate(ids[0].tolist()) if i > 0]
            return [SimpleNamespace(prompt_logprobs=pl, outputs=[])]
        out = []  # sampling: completion "seed mod 3 tokens of id 7", stopped by EOS when the seed is even
        for p, sp in zip(prompts, params):
            tokens = [7] * (sp.seed % 3) + ([sp.stop_token_ids[0]] if sp.seed % 2 == 0 else [])
            out.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(tokens), finish_reason="stop" if sp.seed % 2 == 0 else "length")]))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=lambda **kw: SimpleNamespace(**kw)))


@pytest.fixture
def tiny(tiny_dir):
    return common.load_model(tiny_dir, torch.device("cpu"))


def engine_for(model, push_works=True, parity_every=1, tol=0.05):
    return {"llm": FakeLLM(model, push_works), "pushes": 0, "metrics": {}, "parity_every": parity_every, "parity_tol": tol}


def test_push_weights_sends_every_tensor_in_bf16_then_resets_the_prefix_cache(tiny):
    model, _ = tiny
    engine = engine_for(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # "an update": the engine still holds the old weights
    push_weights(engine, model)
    calls = engine["llm"].calls
    assert [c[1] for c in calls[:-1]] == list(model.state_dict()) and {c[2] for c in calls[:-1]} == {torch.bfloat16}
    assert calls[-1] == ("reset",) and engine["pushes"] == 1
    for name, t in model.state_dict().items():
        assert torch.equal(engine["llm"].model.state_dict()[name], t.to(torch.bfloat16)), name


def test_vllm_generate_wakes_pushes_samples_with_one_seed_per_completion_and_sleeps(tiny, fake_vllm):
    model, tok = tiny
    engine = engine_for(model, parity_every=0)
    keys = torch.tensor([4, 5, 2])
    samples = generate(model, tok, ["1 2 3", "4 5", "6"], keys, 24, 1.0, 1.0, engine=engine)
    eos = common.eos_ids(model, tok)[0]
    assert samples == [{"prompt_ids": tok("1 2 3", add_special_tokens=False).input_ids, "completion_ids": [7, eos], "finished": True},
                       {"prompt_ids": tok("4 5", add_special_tokens=False).input_ids, "completion_ids": [7, 7], "finished": False},
                       {"prompt_ids": tok("6", add_special_tokens=False).input_ids, "completion_ids": [7, 7, eos], "finished": True}]
    kinds = [c[0] for c in engine["llm"].calls]
    n = len(model.state_dict())
    assert kinds == ["wake"] + ["load"] * n + ["reset", "generate", "sleep"] and engine["llm"].calls[-1] == ("sleep", 1)
    assert engine["metrics"]["time/sync"] > 0  # logged by the scripts with the rest of engine["metrics"]
    engine["llm"].calls.clear()
    generate(model, tok, ["6"], keys[:1], 24, 0.0, engine=engine, push=False)  # e.g. eval's greedy pass right after sampling
    assert [c[0] for c in engine["llm"].calls] == ["wake", "generate", "sleep"] and engine["pushes"] == 1


def test_parity_check_passes_with_pushed_weights_and_stops_a_stale_engine(tiny, fake_vllm):
    model, tok = tiny
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)  # a large "update", so stale weights are far off
    ok = engine_for(model)
    vllm_generate(ok, model, tok, ["3 4 5"], torch.tensor([1]), 24, 1.0, 1.0)
    assert 0 < ok["metrics"]["rollout/logprob_diff"] < 0.05  # bf16 engine vs fp32 trainer: close, not equal
    stale = engine_for(model, push_works=False)
    stale["llm"].model.model.norm.weight.data /= 3.0  # the engine kept the weights from before the update
    with pytest.raises(RuntimeError, match="not running the training weights"):
        vllm_generate(stale, model, tok, ["3 4 5"], torch.tensor([1]), 24, 1.0, 1.0)


def test_parity_check_runs_on_the_first_push_then_every_n(tiny, fake_vllm):
    model, tok = tiny
    engine = engine_for(model, parity_every=3)
    checked = []
    for _ in range(7):
        engine["metrics"].clear()
        vllm_generate(engine, model, tok, ["1"], torch.tensor([1]), 24, 1.0, 1.0)
        checked.append("rollout/logprob_diff" in engine["metrics"])
    assert checked == [True, False, False, True, False, False, True]


def test_logprob_parity_is_the_mean_absolute_difference(tiny, fake_vllm):
    model, tok = tiny
    llm = FakeLLM(model)
    with torch.no_grad():
        llm.model.model.norm.weight.mul_(1.5)
    sample = {"prompt_ids": tok("3 4 5", add_special_tokens=False).input_ids, "completion_ids": [7, 8, 9]}
    ids = torch.tensor([sample["prompt_ids"] + sample["completion_ids"]])
    with torch.no_grad():  # an independent computation: full log-softmax of both models
        a = torch.log_softmax(llm.model(input_ids=ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        b = torch.log_softmax(model(input_ids=ids).logits, -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    P = len(sample["prompt_ids"])
    expected = float((a[P - 1:] - b[P - 1:]).abs().mean())
    assert expected > 0.01 and logprob_parity(llm, model, sample) == pytest.approx(expected, rel=1e-4)


def test_backend_choice_on_cpu(tiny):
    model, tok = tiny
    args = SimpleNamespace(rollout_backend="auto", seed=0)
    assert rollout_engine(args, model, tok, 0) is None  # auto without CUDA: HF generate
    args.rollout_backend = "hf"
    assert rollout_engine(args, model, tok, 0) is None
    args.rollout_backend = "vllm"
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        rollout_engine(args, model, tok, 0)


# ---------------------------------------------------------------------------- the real engine (GPU only)
@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    pytest.importorskip("vllm", reason="pip install vllm (README, GPU install)")
    from transformers import AutoModelForCausalLM, Qwen2Config
    from common import tiny_model_dir
    path = str(tmp_path_factory.mktemp("qwen-shaped"))
    tiny = tiny_model_dir("default")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2Config.from_pretrained(tiny)).save_pretrained(path)
    common.AutoTokenizer.from_pretrained(tiny).save_pretrained(path)
    model, tok = common.load_model(path, torch.device("cuda"))
    args = SimpleNamespace(rollout_backend="vllm", seed=0, vllm_gpu_memory=0.2, max_prompt_tokens=128, max_new_tokens=16,
                           parity_every=1, parity_tol=0.05)
    return model, tok, rollout_engine(args, model, tok, 0)


@pytest.mark.gpu
def test_gpu_engine_generates_within_parity(gpu_setup):
    model, tok, engine = gpu_setup
    samples = generate(model, tok, ["1 2 3", "4 5 6"] * 4, torch.arange(8), 16, 1.0, 1.0, engine=engine)
    assert len(samples) == 8 and all(1 <= len(s["completion_ids"]) <= 16 for s in samples)
    assert engine["metrics"]["rollout/logprob_diff"] < 0.05


@pytest.mark.gpu
def test_gpu_weight_push_changes_outputs(gpu_setup):
    model, tok, engine = gpu_setup
    before = generate(model, tok, ["1 2 3"] * 4, torch.arange(4), 16, 1.0, 1.0, engine=engine)
    again = generate(model, tok, ["1 2 3"] * 4, torch.arange(4), 16, 1.0, 1.0, engine=engine)
    assert before == again  # same weights, same seeds: same samples
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    after = generate(model, tok, ["1 2 3"] * 4, torch.arange(4), 16, 1.0, 1.0, engine=engine)
    assert after != before and engine["metrics"]["rollout/logprob_diff"] < 0.05


def test_a_process_group_of_one_is_still_a_single_process(tmp_path):
    """vLLM's external_launcher sets up torch.distributed even under a plain `python grpo.py`: that must not turn off
    bf16 autocast (FSDP2 casts only when there are several ranks) nor switch on the multi-rank code paths."""
    import contextlib
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert common.world_size() == 1
        assert not isinstance(common.autocast(torch.device("cuda")), contextlib.nullcontext)
    finally:
        dist.destroy_process_group()
