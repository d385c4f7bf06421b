"""The memory plan (infra.memory_plan, infra.check_plan): its parts by hand, the parameter counts against real
models, its fixes against a brute-force search over the memory flags, the --dry-run contract, the refusal at start,
and its predicted peak against the measured one on the tiny model. Plan against measurement for real models (SmolLM2,
a Qwen2.5-0.5B shape, 1 and 2 ranks, HF and vLLM): tests/bench_plan.py."""
import itertools
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from infra import plan_model  # noqa: E402
from grpo import Args  # noqa: E402
from infra import GIB, HEADROOM, LAYER_ACTIVATIONS, memory_plan, model_shape, plan_fix  # noqa: E402
from tasks import tiny_config  # noqa: E402

LAST_LINE = re.compile(r"^plan: peak \d+\.\d\d GiB per rank \(([a-z -]+)\); (fits|does not fit: --([a-z-]+) (\S+))$")


def run(*flags, env=None):
    return subprocess.run([sys.executable, "grpo.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), timeout=600)


def test_model_shape_counts_what_the_real_model_has():
    from transformers import AutoModelForCausalLM, LlamaConfig
    configs = [tiny_config("test", 320), LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                                                      tie_word_embeddings=True)]
    for config in configs:
        real = AutoModelForCausalLM.from_config(config)
        with torch.device("meta"):
            shape = model_shape(AutoModelForCausalLM.from_config(config))
        unique = {p.data_ptr(): p.numel() for p in real.parameters()}  # a tied weight once
        assert shape["params"] == sum(unique.values())
        assert shape["layer"] * config.num_hidden_layers + shape["root"] == shape["params"]
        embed = real.get_input_embeddings().weight.numel()
        assert shape["root"] == embed * (1 if config.tie_word_embeddings else 2) + config.hidden_size  # + final norm
        assert shape["tied"] == config.tie_word_embeddings


SHAPE = {"params": 1_000_000_000, "layer": 30_000_000, "root": 160_000_000, "layers": 28, "d": 1024, "I": 4096,
         "q": 1024, "kv": 256, "vocab": 32000, "tied": True}


def test_gpu_plan_by_hand():
    """8 ranks of 80 GiB, bf16, vLLM: each part as the formula in its comment, worked here by hand."""
    args = Args(prompts_per_step=64, group_size=8, max_prompt_tokens=512, max_new_tokens=1536, micro_batch_size=4,
                logprob_chunk=1024, vllm_gpu_memory=0.25)
    plan = memory_plan(args, SHAPE, 8, True, 80.0, "vllm", reference=False, old_pass=False)
    P, L, n = 1e9, 2048, 4
    update = plan["phases"]["update"]
    assert update["weights (fp32 shard)"] == 4 * P / 8 == 5e8
    assert update["AdamW moments (fp32 shard)"] == 8 * P / 8
    assert update["gradients (fp32 shard)"] == 4 * P / 8
    assert update["gathered parameters (root + 2 layers)"] == 2 * (160e6 + 2 * 30e6)
    layer = (6 * 1024 + 4 * 4096 + 4 * 1024 + 2048 + 8) * 2  # bytes per token and layer, bf16
    assert LAYER_ACTIVATIONS == (6, 4, 4, 1, 8)
    assert update["activations (checkpointed)"] == n * L * (28 * 1024 * 2 + layer)  # CUDA: checkpointing on (auto)
    assert update["log-prob chunk logits"] == 1024 * 32000 * (2 + 16)
    # the LM head's and the embedding's [V, d] gradients and their sum, unsharded bf16 under FSDP2
    assert update["vocabulary-sized gradients in the backward"] == 3 * 32000 * 1024 * 2
    untied = memory_plan(args, dict(SHAPE, tied=False), 8, True, 80.0, "vllm", reference=False, old_pass=False)
    vocab_grads = untied["phases"]["update"]["vocabulary-sized gradients in the backward"]
    assert vocab_grads == (2 * 2 + 2 * 4) * 32000 * 1024  # untied: both unsharded (bf16) and their fp32 copies
    assert "vLLM engine (--vllm-gpu-memory)" not in update  # asleep during the update
    assert plan["phases"]["rollout"]["vLLM engine (--vllm-gpu-memory)"] == 0.25 * 80 * GIB
    assert "gradients (fp32 shard)" not in plan["phases"]["rollout"]  # freed before the rollout
    assert plan["rows"] == 64 // 8 * 8 and plan["micro_rows"] == 4
    assert plan["checkpoint_gib"] == 12 * P / GIB and plan["export_gib"] == 2 * P / GIB  # bf16 export on GPUs
    assert plan["peak_gib"] == max(sum(v.values()) for v in plan["phases"].values()) / GIB


def test_cpu_vllm_engine_stays_resident_and_tokens_pack_rows():
    args = Args(prompts_per_step=8, group_size=4, max_prompt_tokens=100, max_new_tokens=100, micro_batch_tokens=450,
                vllm_cpu_kv_gib=2.0, rollout_backend="vllm")
    plan = memory_plan(args, SHAPE, 2, False, 64.0, "vllm", reference=True, old_pass=True)
    assert plan["micro_rows"] == 2  # 450 // 200 rows of 200 tokens
    for phase in ("rollout", "update", "old log-probs", "evaluation"):  # vLLM-CPU has no sleep mode
        assert plan["phases"][phase]["vLLM KV cache (--vllm-cpu-kv-gib)"] == 2 * GIB
    assert plan["phases"]["update"]["reference model (shard)"] == 4 * 1e9 / 2
    assert plan["phases"]["load"]["full fp32 state dict (rank 0)"] == 4e9  # rank 0 reads, then broadcasts
    assert plan["engine_tokens"] == 2 * GIB / (2 * 28 * 256 * 4)
    # the embedding's and the LM head's oneDNN-packed copies beside the parameter: 2 x V x d x 4 bytes
    assert plan["phases"]["rollout"]["vLLM's packed [V, d] copies (embedding, LM head)"] == 2 * 32000 * 1024 * 4
    assert "vLLM weights again after a push (one process)" not in plan["phases"]["rollout"]
    one = memory_plan(args, SHAPE, 1, False, 64.0, "vllm", reference=False, old_pass=False)
    assert one["phases"]["rollout"]["vLLM weights again after a push (one process)"] == 4e9  # measured on CPU


def test_sps_irl_step_and_thr_pass_hold_whole_groups():
    """Their micro-batches keep whole groups (common.micro_batches, group=G): 8 rows where the update packs 2. Without
    gradient checkpointing a group's prompt runs once (prefix sharing): 1 prompt of 100 tokens + 8 completions of 100
    tokens, each row with its own copy of the prompt's K and V; logits over the 800 completion tokens only."""
    args = Args(prompts_per_step=8, group_size=8, max_prompt_tokens=100, max_new_tokens=100, micro_batch_tokens=450,
                gradient_checkpointing="off", logprob_chunk=100000)
    L, layer = 200, (6 * 1024 + 4 * 4096 + 4 * 1024 + 200 + 8) * 4  # fp32 bytes per token and layer
    irl = memory_plan(args, SHAPE, 1, False, 64.0, "hf", reference=False, old_pass=False, group_pass="irl")
    assert irl["micro_rows"] == 2
    assert irl["phases"]["update"]["activations"] == 2 * L * 28 * layer  # 2 rows: at worst 2 prompts, no sharing
    assert irl["phases"]["IRL step"]["activations"] == (100 + 8 * 100) * 28 * layer
    assert irl["phases"]["IRL step"]["prompts' K and V, one copy per row"] == 2 * 8 * 100 * (2 * 28 * 256 * 4)
    assert irl["phases"]["IRL step"]["log-prob chunk logits"] == 8 * 100 * 32000 * (4 + 16)
    assert irl["phases"]["IRL step"]["gradients (fp32 shard)"] == 4 * 1e9
    assert irl["phases"]["IRL step"]["vocabulary-sized gradients in the backward"] == 3 * 32000 * 1024 * 4
    # one process, untied: one LM-head gradient when the 800 completion tokens are one log-prob chunk, 3 when several
    untied = memory_plan(args, dict(SHAPE, tied=False), 1, False, 64.0, "hf", reference=False, old_pass=False,
                         group_pass="irl")
    assert untied["phases"]["IRL step"]["vocabulary-sized gradients in the backward"] == 1 * 32000 * 1024 * 4
    untied = memory_plan(replace(args, logprob_chunk=512), dict(SHAPE, tied=False), 1, False, 64.0, "hf",
                         reference=False, old_pass=False, group_pass="irl")
    assert untied["phases"]["IRL step"]["vocabulary-sized gradients in the backward"] == 3 * 32000 * 1024 * 4
    thr = memory_plan(args, SHAPE, 1, False, 64.0, "hf", reference=False, old_pass=True, group_pass="thr")
    assert "IRL step" not in thr["phases"]
    assert thr["phases"]["old log-probs"]["activations (no grad, one layer)"] == 8 * L * layer / 2
    grpo = memory_plan(args, SHAPE, 1, False, 64.0, "hf", reference=False, old_pass=True)
    assert grpo["phases"]["old log-probs"]["activations (no grad, one layer)"] == 2 * L * layer / 2
    # 10 rows fit the update's 2,000 tokens; whole groups of 4: 2 groups (8 rows), not 10 or 12
    wide = replace(args, prompts_per_step=8, group_size=4, micro_batch_tokens=2000)
    irl = memory_plan(wide, SHAPE, 1, False, 64.0, "hf", reference=False, old_pass=False, group_pass="irl")
    assert irl["micro_rows"] == 10 and irl["phases"]["IRL step"]["activations"] == (2 * 100 + 8 * 100) * 28 * layer


@pytest.mark.parametrize("G", [2, 3, 4, 5])
def test_the_update_counts_each_prompt_once_at_the_worst_alignment_of_its_rows(G):
    """Prefix sharing in the update: n consecutive rows (a micro-batch) run each distinct prompt once; the plan counts
    the most prompts any n consecutive rows can span, brute-forced here over where the micro-batch starts."""
    L, T, layer = 200, 120, (6 * 1024 + 4 * 4096 + 4 * 1024 + 200 + 8) * 4
    for n in range(1, 13):
        args = Args(prompts_per_step=64, group_size=G, max_prompt_tokens=L - T, max_new_tokens=T, micro_batch_size=n,
                    gradient_checkpointing="off", logprob_chunk=100000)
        update = memory_plan(args, SHAPE, 1, False, 64.0, "hf", reference=False, old_pass=False)["phases"]["update"]
        prompts = max(len({(start + i) // G for i in range(n)}) for start in range(G))
        assert update["activations"] == (prompts * (L - T) + n * T if prompts < n else n * L) * 28 * layer
        assert ("prompts' K and V, one copy per row" in update) == (prompts < n)
        assert update["log-prob chunk logits"] == n * T * 32000 * (4 + 16)
        checkpointed = memory_plan(replace(args, gradient_checkpointing="on"), SHAPE, 1, False, 64.0, "hf",
                                   reference=False, old_pass=False)["phases"]["update"]
        assert checkpointed["activations (checkpointed)"] == n * L * (28 * 1024 * 4 + layer)  # no sharing then


@pytest.mark.parametrize("seed", range(12))
def test_the_fixes_reach_a_fit_whenever_a_setting_of_the_memory_flags_does(seed):
    """Apply the plan's fix, then the next, ...: it fits in the end exactly when a brute-force search over the same
    flags (and world sizes) finds a setting that fits."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    gpu = bool(seed % 2)
    shape = dict(SHAPE, params=pick([5e8, 2e9, 7e9]), layers=pick([16, 28]))
    args = Args(prompts_per_step=pick([16, 64]), group_size=8, max_prompt_tokens=pick([256, 1024]),
                max_new_tokens=pick([512, 3072]), micro_batch_size=pick([8, 64]), gradient_checkpointing="off",
                vllm_gpu_memory=pick([0.3, 0.6, 0.9]), vllm_cpu_kv_gib=pick([1.0, 8.0]),
                rollout_backend="vllm", logprob_chunk=1024)
    budget = pick([24.0, 40.0, 80.0])
    group_pass = pick([None, "irl", "thr"])  # sps.py's IRL step, thr.py's pass: whole groups, whatever the flags

    def plan_of(a, world=2):
        return memory_plan(a, shape, world, gpu, budget, "vllm", reference=False, old_pass=True,
                           group_pass=group_pass)
    a, world, steps = args, 2, 0
    while (fix := plan_fix(a, lambda x, world=world: plan_of(x, world))) and steps < 8:
        if fix[0] == "world_size":
            world = fix[1]
        else:
            a = replace(a, **{fix[0]: fix[1]})
        steps += 1
    reached = plan_of(a, world)["fits"]
    L = args.max_prompt_tokens + args.max_new_tokens
    engine = ({"vllm_gpu_memory": [x / 100 for x in range(5, 91)]} if gpu else
              {"vllm_cpu_kv_gib": [x / 8 for x in range(1, 65)]})
    grid = dict(micro_batch_tokens=[k * L for k in (1, 2, 4, 8, 64)], logprob_chunk=[32, 64, 128, 256, 1024],
                gradient_checkpointing=["on", "off"], **engine)
    exists = any(plan_of(replace(args, **dict(zip(grid, values))), w)["fits"]
                 and plan_of(replace(args, **dict(zip(grid, values))), w)["engine_tokens"] >= L
                 for w in (2, 4, 8, 16, 32, 64) if args.prompts_per_step % w == 0
                 for values in itertools.product(*grid.values()))
    assert reached == exists, (reached, exists, fix, steps)


def test_dry_run_prints_the_plan_and_its_machine_readable_last_line():
    out = run("--dry-run")
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert LAST_LINE.match(last) and last.endswith("; fits"), last
    for phase in ("rollout", "update", "evaluation", "load", "export"):
        assert re.search(rf"^  {phase} +\d+\.\d\d GiB = ", out.stdout, re.M), phase
    small = run("--dry-run", "--world-size", "2", "--device-memory-gib", "0.05", "--micro-batch-size", "64")
    assert small.returncode == 2, small.stderr
    m = LAST_LINE.match(small.stdout.strip().splitlines()[-1])
    assert m and m.group(2).startswith("does not fit: --"), small.stdout
    nothing = run("--dry-run", "--device-memory-gib", "0.0001")
    assert nothing.returncode == 2
    assert nothing.stdout.strip().splitlines()[-1].endswith("does not fit: no setting of the memory flags fits")


def test_a_run_that_does_not_fit_stops_in_one_line_and_no_plan_check_starts_it(tmp_path):
    out = run("--device-memory-gib", "0.0001", "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: plan: peak ") and "--no-plan-check" in errors[0], errors
    assert not (tmp_path / "r").exists()  # refused before the run directory
    started = run("--device-memory-gib", "0.0001", "--no-plan-check", "--steps", "0", "--eval-problems", "2",
                  "--eval-samples", "1", "--run-dir", str(tmp_path / "s"))
    assert started.returncode == 0, started.stderr
    assert (tmp_path / "s" / "metrics.jsonl").exists()


def test_plan_model_reads_only_config_json(tmp_path):
    from transformers import AutoConfig
    tiny_config("test", 320).save_pretrained(tmp_path)  # config.json alone: no weights, no tokenizer
    assert AutoConfig.from_pretrained(tmp_path).vocab_size == 320
    model = plan_model(str(tmp_path))
    assert next(model.parameters()).device.type == "meta"
    out = run("--dry-run", "--model", str(tmp_path), "--world-size", "8", "--device-memory-gib", "80",
              "--prompts-per-step", "64")
    assert out.returncode == 0 and "8 rank(s), 80.0 GiB each (GPU)" in out.stdout, out.stdout + out.stderr


def test_the_tiny_models_plan_is_within_25_percent_of_its_measured_peak(tmp_path):
    """grpo.py on the tiny model (CPU): the plan's peak (its first lines) against the largest memory/peak_gib (resident
    set size) rank 0 logged, through load, rollouts, updates, evaluation and checkpoints."""
    out = run("--steps", "2", "--prompts-per-step", "8", "--eval-problems", "16", "--eval-samples", "4",
              "--save-every", "1", "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    plan = float(re.search(r"^plan: peak (\d+\.\d+) GiB", out.stdout, re.M).group(1))
    with open(tmp_path / "r" / "metrics.jsonl") as f:
        measured = max(r.get("memory/peak_gib", 0) for r in map(json.loads, f))
    assert 0.75 <= plan / measured <= 1.25, (plan, measured)
    assert HEADROOM < 1


def test_the_device_checks_cpu_smoke_form_runs_and_prints_its_table():
    """tests/gpu_check.sh --smoke: the device check's code on a tiny shape (a GPU run differs only in sizes)."""
    out = subprocess.run(["bash", "tests/gpu_check.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    row = out.stdout.strip().splitlines()[-1].split(" | ")
    assert row[0] == "| tiny" and re.fullmatch(r"\d+\.\d\d", row[4]), row  # plan / measured
    assert 0.5 <= float(row[4]) <= 1.5  # a sane ratio: the ±25% claim is the tiny model's test and bench_plan's rows
    for pair in row[7:9]:  # bf16 against fp32, mean / max: small and not zero (bf16 did run)
        mean, worst = map(float, pair.strip(" |").split(" / "))
        assert 0 < mean < 0.05 and worst < 0.5, pair


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_ranks_fix_the_mmap_threshold_unless_the_user_set_it():
    """A CPU rank under torchrun fixes glibc's mmap threshold (infra.fixed_mmap_threshold); MALLOC_MMAP_THRESHOLD_
    in the environment is the user's and wins. (Its memory effect is measured by tests/bench_plan.py.)"""
    code = "import infra; print(infra.fixed_mmap_threshold())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    libc = platform.libc_ver()[0] == "glibc"
    ours = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ours.stdout.strip() == ("True" if libc else "False"), ours.stderr
    theirs = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "MALLOC_MMAP_THRESHOLD_": "131072"},
                            capture_output=True, text=True)
    assert theirs.stdout.strip() == "False", theirs.stderr
