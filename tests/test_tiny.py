import sys, os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from common import countdown_problems
from tasks import (TINY_CONFIGS, build_tiny_model, tiny_completion_loss, tiny_model_dir, tiny_sft_batch,
                        tiny_sft_examples, train_tiny_tokenizer)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run fastest on one thread; two threads on a busy 2-core machine are ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The "test" size, built once for the module."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), "test", log=lambda *a: None)


def test_tokenizer_roundtrip_through_save_and_autotokenizer(tmp_path):
    problems = countdown_problems(300, seed=1)
    tok = train_tiny_tokenizer([p["prompt"] + "\\boxed{" + p["solution"] + "}" for p in problems], 300)
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.padding_side == "left"
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == tok.pad_token_id
    texts = [problems[0]["prompt"] + "\\boxed{" + problems[0]["solution"] + "}",
             "Ünïcødé → 数学 🙂🚀 tabs\tand\r\nnewlines  ",
             "  leading spaces, 'quotes' and \\frac{1}{2}\n\n"]
    for s in texts:
        ids = tok(s)["input_ids"]
        assert tok.decode(ids) == s
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):  # each one token, decoded back
        assert len(tok(special)["input_ids"]) == 1 and tok.decode(tok(special)["input_ids"]) == special
    assert all(len(tok.convert_ids_to_tokens(tok(str(n))["input_ids"])) == len(str(n)) for n in (7, 42, 123))
    batch = tok(["a", "a longer text"], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id and batch["attention_mask"][0][0] == 0


def test_build_loads_with_untied_head_and_sft_lowers_loss(built):
    tok = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built).eval()
    assert tok.padding_side == "left" and model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size == len(tok) and not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    info = json.load(open(os.path.join(built, "tiny_build.json")))
    assert info["config"] == TINY_CONFIGS["test"]
    heldout = countdown_problems(32, seed=0, split="test")
    torch.manual_seed(123)
    fresh = Qwen2ForCausalLM(model.config).eval()
    trained_loss, fresh_loss = tiny_completion_loss(model, tok, heldout), tiny_completion_loss(fresh, tok, heldout)
    assert trained_loss < fresh_loss - 1.0, (trained_loss, fresh_loss)
    assert info["heldout_completion_loss"] < fresh_loss - 1.0 and info["parameters"] == model.num_parameters()


def test_sft_batch_masks_prompt_and_padding(built):
    tok = AutoTokenizer.from_pretrained(built)
    examples = tiny_sft_examples(tok, countdown_problems(3, seed=0))
    assert all(c[-1] == tok.eos_token_id and tok.decode(c[:-1]).startswith("\\boxed{") for _, c in examples)
    b = tiny_sft_batch(examples, tok.pad_token_id)
    for i, (p, c) in enumerate(examples):
        assert b["attention_mask"][i].sum() == len(p) + len(c)
        assert b["labels"][i].tolist() == [-100] * len(p) + c + [-100] * (b["labels"].shape[1] - len(p) - len(c))


def test_build_is_deterministic(built, tmp_path):
    again = build_tiny_model(str(tmp_path / "again"), "test", log=lambda *a: None)
    a = AutoModelForCausalLM.from_pretrained(built).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert build_tiny_model(again, "test", log=lambda *a: None) == again  # already there (built meanwhile): kept
    assert os.listdir(tmp_path) == ["again"]  # no .tmp-<pid> left behind


def test_tiny_model_dir_uses_cache_and_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORE_RLVR_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(sys.modules[build_tiny_model.__module__], "build_tiny_model",
                        lambda out_dir, size, **kw: calls.append(size) or os.makedirs(out_dir) or out_dir)
    path = tiny_model_dir("test")
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith("tiny-test-")
    assert tiny_model_dir("test") == path and calls == ["test"]
    assert tiny_model_dir("default") != path
