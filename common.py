"""Plumbing shared by every method script, in the order a step calls it: arguments, torchrun/FSDP2 and models,
rollouts (HF generate, or the colocated vLLM engine), rewards, per-token log-probs, the update's micro-batches and
optimizer step, metrics, Pass@k evaluation and checkpoints. No method's math lives here: grpo.py holds all of GRPO's
(advantages, clipped surrogate, k3, loss aggregation, the truncated IS weight) and each method script its own. The
data side (the countdown task, datasets, the tiny model) is in tasks.py and the run-safety machinery (math-verify's
worker pool, crash-safe files, trackers) in infra.py; the scripts import both through this file."""
import argparse
import contextlib
import datetime
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# transformers is imported inside the functions that use it (load_model, generate, shared_prefix_forward), like
# datasets in tasks.py and math_verify in infra.py: `--help` and a mistyped flag answer in about torch's import time.
# The scripts import everything through this file: the data side from tasks.py, the vLLM engine from engine.py,
# the run-safety machinery from infra.py.
from engine import (ENGINES, StaleEngine, choose_backend, counter_gumbel, eos_ids, push_weights,  # noqa: F401
                    rollout_engine, sample_keys, sampling_processor, vllm_generate)
from infra import (REPORT_TO, check_plan, checkpoint_note, close_tracking, commit_checkpoint,  # noqa: F401
                   commit_export, count_skip, fault_point, fixed_mmap_threshold, log_jsonl, log_stop, math_reward,
                   math_rewards, newest_checkpoint_step, peak_memory_gib, print_summary, read_json,
                   recover_checkpoint, remove_checkpoint, resolve_resume, resume_changes, resume_command,
                   save_hf_model, shutdown_reward_pool, start_tracking, tied_weights, truncate_metrics, write_config,
                   write_error)
from tasks import (DATASET_PRESETS, GENERATED, UserError, answer_key, arithmetic_reward,  # noqa: F401
                   countdown_problems, countdown_reward, dataset_name, dataset_names, fit_prompts, format_prompt,
                   hub_reachable, last_boxed, load_eval_sets, load_problems, load_train_set, parse_dataset_list,
                   require, step_problems, TINY_CONFIGS, tiny_config, tiny_model_dir)
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP at world size 1 is intended


# ============================================================================ arguments
@dataclass
class BaseArgs:
    """Flags every script shares. Defaults run the built-in CPU demo; help strings give the paper-scale value."""
    model: str = field(default="tiny", metadata={
        "help": "hub id, local HF directory, or 'tiny' (built-in Qwen2 model, built and cached on first use)"})
    dataset: str = field(default="countdown", metadata={"help": (
        "countdown, a preset (" + ", ".join(DATASET_PRESETS) + "), a hub id, a local .jsonl/.json/.parquet or folder, "
        "NAME=PATH, or PRESET=PATH (a local copy of a preset)")})
    eval_datasets: str = field(default="", metadata={
        "help": ("comma-separated datasets for held-out evaluation, as --dataset; metric keys use the name (a "
                 "file's stem unless NAME=PATH); empty: a built-in --dataset's own held-out split, else countdown "
                 "(real runs: math500,aime24,amc23,minerva,olympiad)")})
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
    top_p: float = field(default=1.0, metadata={"help": (
        "rollout nucleus sampling: training accepts only 1 (the loss's log-probs are of the full tempered "
        "distribution); --eval-top-p is free")})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate (constant after warmup); paper runs: 1e-6"})
    warmup_steps: int = field(default=0, metadata={"help": "linear lr warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    micro_batch_size: int = field(default=64, metadata={
        "help": "sequences per forward/backward on one rank (memory knob; does not change the math)"})
    micro_batch_tokens: int = field(default=0, metadata={"help": (
        "tokens per forward/backward on one rank, padding counted, instead of --micro-batch-size: rows packed in order "
        "(verl's dynamic batch size; Lp-Reg's authors: 30720); 0 = off")})
    seed: int = field(default=0, metadata={"help": "seeds data order, model init of 'tiny', and rollout sampling"})
    train_size: int = field(default=2000, metadata={
        "help": "number of generated countdown training problems (countdown only)"})
    run_dir: str = field(default="", metadata={
        "help": ("where config.json, metrics.jsonl, samples.jsonl, checkpoint/ and model/ go (default: "
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
        "help": "write checkpoint/ (what --resume reads) every N steps (and at the end); 0 = only at the end"})
    save_dtype: str = field(default="auto", metadata={"choices": ["auto", "bf16", "fp32"], "help": (
        "dtype of the model/ export: auto = bf16 on CUDA (the compute dtype), fp32 on CPU")})
    export_every: int = field(default=0, metadata={
        "help": "write model/ (Hugging Face weights) every N steps (and at the end); 0 = only at the end"})
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
    vllm_seeds: str = field(default="auto", metadata={"choices": ["auto", "on", "off"], "help": (
        "vllm: seed each completion by its key; auto = on for CPU (samples then independent of batching and world "
        "size) | off for CUDA, where seeded requests are sampled one by one and still not batch-invariant (README)")})
    gradient_checkpointing: str = field(default="auto", metadata={
        "choices": ["auto", "on", "off"],
        "help": "auto (on with CUDA) | on | off"})
    logprob_chunk: int = field(default=1024, metadata={
        "help": ("token rows per log-prob chunk: about 2 x rows x V x 4 bytes at once (1024 rows of Qwen's "
                 "151,936-token vocabulary: ~1.2 GB)")})
    dry_run: bool = field(default=False, metadata={"help": (
        "print the memory plan (per rank and phase: shards, activations, engine, host RAM) for these flags and exit: "
        "0 if it fits, 2 if not; reads only the model's config.json")})
    world_size: int = field(default=0, metadata={"help": "the plan's number of ranks (default: torchrun's)"})
    device_memory_gib: float = field(default=0.0, metadata={"help": (
        "plan for GPUs of this many GiB each (default: the visible GPU; on CPU, host RAM shared by the local ranks)")})
    plan_check: bool = field(default=True, metadata={"help": (
        "print the plan's summary at start and refuse a run whose plan does not fit (--no-plan-check: start "
        "anyway)")})

    def __post_init__(self):
        for f in fields(self):  # each field's "choices", checked here too: Args(...) built in code skips argparse
            value = getattr(self, f.name)
            require("choices" not in f.metadata or value in f.metadata["choices"] or value is None is f.default,
                    f"--{f.name.replace('_', '-')} must be one of {', '.join(f.metadata.get('choices', []))} "
                    f"(got {value})")
        require(self.group_size >= 2,
                f"--group-size must be >= 2 for group-relative advantages (got {self.group_size})")
        require(self.prompts_per_step >= 1, f"--prompts-per-step must be >= 1 (got {self.prompts_per_step})")
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, read before any process group starts
        require(self.prompts_per_step % world == 0, f"--prompts-per-step ({self.prompts_per_step}) must divide by the "
                                                    f"number of processes ({world}): pass a multiple of {world}")
        self.eval_datasets = self.eval_datasets or (self.dataset if self.dataset in GENERATED else "countdown")
        require(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        require(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number (got {self.lr})")
        require(self.steps >= 0, f"--steps must be >= 0 (got {self.steps})")
        require(self.temperature > 0, f"--temperature must be > 0 for sampling (got {self.temperature})")
        require(0 < self.eval_top_p <= 1, f"--eval-top-p must be in (0, 1] (got {self.eval_top_p})")
        require(self.top_p == 1, f"--top-p {self.top_p}: training samples at --top-p 1 (the loss's log-probs are of "
                "the full tempered distribution): drop --top-p, or lower --temperature")
        require(self.eval_temperature >= 0, f"--eval-temperature must be >= 0 (got {self.eval_temperature})")
        require(self.eval_samples >= 1, f"--eval-samples must be >= 1 (got {self.eval_samples})")
        require(self.micro_batch_size >= 1 and self.logprob_chunk >= 1,
                "--micro-batch-size and --logprob-chunk must be >= 1")
        require(self.micro_batch_tokens >= 0, f"--micro-batch-tokens must be >= 0 (got {self.micro_batch_tokens})")
        require(min(self.eval_every, self.save_every, self.export_every, self.warmup_steps, self.eval_problems) >= 0,
                "--eval-every, --save-every, --export-every, --warmup-steps, --eval-problems must be >= 0")
        require(self.max_grad_norm > 0, f"--max-grad-norm must be > 0 (got {self.max_grad_norm})")
        require(self.max_skipped_steps >= 0, f"--max-skipped-steps must be >= 0 (got {self.max_skipped_steps})")
        require(0 < self.vllm_gpu_memory < 1, f"--vllm-gpu-memory must be in (0, 1) (got {self.vllm_gpu_memory})")
        require(self.vllm_cpu_kv_gib > 0, f"--vllm-cpu-kv-gib must be > 0 (got {self.vllm_cpu_kv_gib})")
        require(self.world_size >= 0 and self.device_memory_gib >= 0, "--world-size and --device-memory-gib must be "
                                                                      ">= 0 (0: torchrun's world, the visible device)")
        require(self.prompts_per_step % (self.world_size or 1) == 0, f"--prompts-per-step ({self.prompts_per_step}) "
                f"must divide by --world-size ({self.world_size}): pass a multiple of {self.world_size}")
        require(self.tis_cap == 0 or self.tis_cap >= 1, f"--tis-cap must be 0 (off) or >= 1 (got {self.tis_cap})")
        require(set(parse_dataset_list(self.report_to)) <= set(REPORT_TO),
                f"--report-to must be none, tensorboard, wandb or a comma-separated list of them "
                f"(got {self.report_to})")


FLAG_GROUPS = {  # --help's sections, in this order; a script's own fields go under "<script>'s own flags"
    "model and data": ["model", "dataset", "prompt_field", "answer_field", "train_size", "max_prompt_tokens"],
    "rollouts": ["prompts_per_step", "group_size", "max_new_tokens", "temperature", "top_p"],
    "the objective": ["clip_low", "clip_high", "loss_agg", "scale_rewards", "kl_coef", "entropy_coef", "tis_cap",
                      "ppo_epochs", "mini_batches"],
    "the optimizer": ["lr", "warmup_steps", "weight_decay", "max_grad_norm", "max_skipped_steps"],
    "evaluation": ["eval_datasets", "eval_every", "eval_samples", "eval_problems", "eval_temperature", "eval_top_p"],
    "the run": ["steps", "seed", "run_dir", "resume", "save_every", "save_dtype", "export_every", "report_to"],
    "the engine (speed and memory; not the math)": [
        "rollout_backend", "micro_batch_size", "micro_batch_tokens", "logprob_chunk", "gradient_checkpointing",
        "vllm_gpu_memory", "vllm_cpu_kv_gib", "vllm_seeds"],
    "the memory plan (--dry-run)": ["dry_run", "world_size", "device_memory_gib", "plan_check"],
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as written: the description and the usage examples keep their lines, and a flag's default is shown
    only where its help string does not already say it (no "(default: None)" after "default: the preset's")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, "", argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def usage_examples(doc, prog):
    """The "Run it" block of a script's docstring, its placeholder SCRIPT replaced by the script: --help's epilog."""
    block = next((p for p in (doc or "").split("\n\n") if p.startswith("Run it")), "")
    lines = block.rstrip().split("\n")[1:]
    return "examples:\n" + "\n".join(lines).replace("SCRIPT", prog) if lines else None


def parse_args(cls, argv=None):
    """dataclass -> argparse: `--flag-name VALUE` for each field, `--flag/--no-flag` for booleans, grouped as
    FLAG_GROUPS says, defaults and the script's usage examples in --help."""
    doc = sys.modules["__main__"].__doc__
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0], formatter_class=HelpFormatter,
                                     usage="%(prog)s [-h] [--flag VALUE ...]  (the flags below, by group)")
    parser.epilog = usage_examples(doc, parser.prog)
    group_of = {name: title for title, names in FLAG_GROUPS.items() for name in names}
    groups = {title: parser.add_argument_group(title) for title in FLAG_GROUPS}
    own = parser.add_argument_group(f"{os.path.splitext(parser.prog)[0]}'s own flags")
    for f in fields(cls):
        kind = {"str": str, "int": int, "float": float, "bool": bool}[re.sub(r"typing\.|Optional\[|\]|<class '|'>", "",
                                                                          str(f.type))]  # str, 'str', Optional[str]
        kw = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind, choices=f.metadata.get(
            "choices"), **({"nargs": "?", "const": f.metadata["const"]} if "const" in f.metadata else {}))  # --resume
        groups.get(group_of.get(f.name), own).add_argument("--" + f.name.replace("_", "-"), default=f.default,
                                                           help=f.metadata.get("help", ""), **kw)
    ns = parser.parse_args(argv)
    try:
        return cls(**vars(ns))
    except UserError as e:  # under torchrun every rank finds it: rank 0 says it, and all exit before any work
        if os.environ.get("RANK", "0") == "0":
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(train, args_cls):
    """Entry point of every script: parse flags, check the memory plan (--dry-run: print it and exit), run, turn
    UserErrors into one line (exit 2) and Ctrl-C into one line with the command that resumes (exit 130)."""
    args = parse_args(args_cls)
    try:
        if args.dry_run or args.plan_check:
            check_plan(args, os.path.splitext(os.path.basename(inspect.getfile(train)))[0])
        train(args)
    except UserError as e:
        if isinstance(e, StaleEngine) and os.environ.get("RANK", "0") == "0":  # before the step's update: its line
            log_stop(args.run_dir, str(e))
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            where = f": {checkpoint_note(args.run_dir)}" if args.run_dir and os.path.isdir(args.run_dir) else ""
            print(f"\ninterrupted (Ctrl-C){where}", file=sys.stderr)
        sys.exit(130)
    finally:
        close_tracking(failed=sys.exc_info()[0] is not None)
        for engine in ENGINES:  # vLLM tears its process groups down itself; before ours, or its exit handler fails
            engine["llm"].llm_engine.engine_core.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()


# ============================================================================ distributed (torchrun, FSDP2) and models
# How long a rank waits in a collective before it fails (torch's default: 10 minutes with nccl). The longest wait is a
# save: the DCP shards (fp32 weights + AdamW: 12 B per parameter over all ranks), then rank 0 alone writes model/
# (2 B per parameter in bf16) while the others wait in a barrier. Qwen2.5-7B (7.62e9 parameters): 91 + 15 = 107 GB,
# 18 minutes at a conservative 100 MB/s to a shared disk; 60 minutes leaves a margin of 3x. A rank that dies does not
# make the others wait that long: torchrun stops them as soon as one process exits with an error.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


def init_distributed():
    """(rank, world_size, device). Under torchrun: nccl on CUDA, gloo on CPU; a plain `python x.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)
        if not torch.cuda.is_available():
            fixed_mmap_threshold()  # before the model loads: several ranks fragment glibc's heaps (infra.py)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1:  # (torchrun sets it to 1 itself)
        # torch's threads spin while they wait for each other: when another process shares the cores, a step of the
        # demo took 8-35 s with 2 threads against 1.1-3.8 s with one (2-core machine; README, Quickstart).
        print(f"CPU: 1 torch thread, not {torch.get_num_threads()} (set OMP_NUM_THREADS=N to use N: it helps bigger "
              f"models on cores nothing else uses, and stalls when another process shares them)")
        torch.set_num_threads(1)
    return rank, world, torch.device("cpu")


def world_size():
    """Processes training together: torchrun's world, 1 for `python x.py` (even after vLLM set up a group of one)."""
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


def all_max_dict(values, device):
    """Max of a dict of floats over ranks in one all-reduce, read back by name (an empty set sends -inf)."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def gather_objects(obj):
    """List of `obj` from every rank (rank order)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def load_model(name, device, rank=0, world=1, dtype=torch.float32):
    """(model, tokenizer) from 'tiny', a local directory or a hub id. Weights stay fp32 (the optimizer's master copy);
    on CUDA the forward runs in bf16 (FSDP2 mixed precision, or autocast at world size 1). Under torchrun (world > 1)
    rank 0 alone reads the weights, on the host; the other ranks build the same model on the meta device (no memory)
    from rank 0's config, and shard_model then gives each rank its shard of rank 0's weights: 8 ranks of a 7B model
    no longer hold 8 full fp32 copies (30 GB each) in host memory."""
    if name == "tiny":
        if rank == 0:  # only rank 0 builds; the others wait
            tiny_model_dir("default", reward_fn=lambda text, p: countdown_reward(text, p["numbers"], p["target"]))
        barrier()
        name = tiny_model_dir("default")
    elif not os.path.isdir(name) and not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise UserError(f"unknown model '{name}': pass 'tiny', a local Hugging Face model directory, or a hub id like "
                        "Qwen/Qwen2.5-Math-1.5B")
    if world == 1:
        model, tokenizer = read_pretrained(name, dtype)
        return model.to(device), tokenizer
    from transformers import AutoModelForCausalLM
    shared = [None, None, None, None]  # rank 0's: error message (or None), tokenizer, config, generation config
    if rank == 0:
        try:
            model, tokenizer = read_pretrained(name, dtype)  # stays on the host: shard_model sends each rank its shard
            shared = [None, tokenizer, model.config, model.generation_config]
        except UserError as e:
            shared[0] = str(e)
    dist.broadcast_object_list(shared, src=0)  # the other ranks read no file (nodes without the hub cache too)
    error, tokenizer, config, generation_config = shared
    if error is not None:  # every rank stops with rank 0's message (the others would wait for it forever)
        raise UserError(error)
    if rank != 0:
        with torch.device("meta"):  # shapes only: shard_model allocates this rank's shard and fills it
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.generation_config = generation_config  # eos ids (engine.eos_ids), as from_pretrained reads them
    return model.eval(), tokenizer  # eval(): from_pretrained's mode


def read_pretrained(name, dtype):
    """from_pretrained's (model, tokenizer) on the host, or a UserError that says what to do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    local = os.path.isdir(name)
    offline = not local and not hub_reachable()  # then only the local cache: no minute of retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left", local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=offline)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if local:
            raise UserError(f"could not load the local model directory '{name}' ({first}): fix or replace its files "
                            f"(config.json, tokenizer files, *.safetensors)") from None
        why = "the hub is unreachable and it is not in the local cache" if offline else first
        raise UserError(f"could not load model '{name}' ({why}): check the id, or download it on a machine with "
                        f"internet (`hf download {name} --local-dir DIR`) and pass --model DIR") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_reference(name, device, rank, world):
    """The frozen initial model pi_ref (for the k3 KL term), sharded like the policy and loaded the same way, in the
    compute dtype (bf16 on CUDA, fp32 on CPU): it is never updated, so it needs no fp32 master copy. It never runs
    backward, so no gradient checkpointing."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return shard_model(load_model(name, device, rank, world, dtype)[0].eval(), world, device, "off")


def shard_model(model, world, device, gradient_checkpointing="auto"):
    """FSDP2 under torchrun: `fully_shard` each decoder layer, then the root (embeddings, final norm, LM head), on the
    meta device; then each rank allocates its shard on `device` and receives it from rank 0's weights (the only
    full copy, on the host: load_model). bf16 compute / fp32 gradient reduction on CUDA. A single process keeps the
    plain module."""
    if gradient_checkpointing == "on" or (gradient_checkpointing == "auto" and device.type == "cuda"):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name goes in v6
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if world == 1:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    rank = dist.get_rank()
    full = model.state_dict() if rank == 0 else {}  # the weights, on rank 0 only
    buffers = dict(model.named_buffers()) if rank == 0 else {}  # with the non-persistent ones (rotary inv_freq)
    model.to("meta")  # rank 0's too: fully_shard would first copy a real model to the device whole
    model.tie_weights()  # .to() gave a tied LM head (SmolLM2, Qwen2.5 up to 3B) a parameter of its own: tie it again
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                              reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)  # this rank's shard of every parameter, and the buffers, uninitialised
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():  # buffers are whole on every rank and in no state dict: rank 0's
        if rank == 0:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)
    return model


def autocast(device):
    """bf16 autocast for single-process CUDA runs (FSDP2 does the casting itself under torchrun)."""
    on = device.type == "cuda" and world_size() == 1
    return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()


# ============================================================================ the run: its directory, resume, progress
def start_run(args, script, rank):
    """Create the run directory of `script` (a name or the script's __file__), or reopen it with --resume: the flags
    that define the experiment must match its config.json, its newest complete checkpoint becomes checkpoint/, and
    --resume auto resolves to "yes" (there is one) or None (start fresh). Writes config.json; on rank 0, gets the
    --report-to trackers ready. Returns the run directory."""
    script = os.path.splitext(os.path.basename(script))[0]  # grpo.py's __file__ -> "grpo"
    require(args.prompts_per_step % world_size() == 0, f"--prompts-per-step ({args.prompts_per_step}) must divide by "
                                                      f"the number of processes ({world_size()})")  # Args in code
    if not args.run_dir:
        require(not args.resume, "--resume needs --run-dir: the run directory to continue")
        stamp = time.strftime("%Y%m%d-%H%M%S") if rank == 0 else None
        stamp = gather_objects(stamp)[0]
        args.run_dir = os.path.join("runs", f"{script}-{dataset_name(args.dataset)[0]}-s{args.seed}-{stamp}")
    run_dir, config_path = args.run_dir, os.path.join(args.run_dir, "config.json")
    config = json.loads(json.dumps({"script": script, **asdict(args)}))  # what config.json will hold (JSON types)
    old = read_json(config_path) if args.resume else {}
    changes = resume_changes(config, old, config_path)  # stops if a flag that defines the experiment differs
    step = gather_objects(recover_checkpoint(run_dir) if args.resume and rank == 0 else None)[0]
    args.resume = resolve_resume(args.resume, run_dir, step, rank)  # "yes": the scripts load checkpoint/; None: fresh
    if rank == 0:
        config["resume"] = args.resume
        write_config(config_path, config, old, changes, step)
        start_tracking(args.report_to, run_dir, config)
        if args.steps == 0:
            print("--steps 0: the initial model is evaluated and nothing is trained or saved (metrics.jsonl and "
                  "samples.jsonl only)")
    barrier()
    return run_dir


def resume_or_evaluate(run_dir, model, optimizer, tokenizer, eval_sets, args, device, engine, rank, extra=dict):
    """(first step, skipped, streak, history): with --resume, the checkpoint's, and on rank 0 the history of its metric
    lines (the later ones are dropped: they are recomputed identically), so the progress bar shows the last held-out
    pass@1 at once; else step 0, after evaluating the initial model (the step-0 metric line, plus extra()'s metrics,
    computed before the evaluation: sps.py's probe)."""
    history = []
    if args.resume:
        start, skipped, streak = load_checkpoint(run_dir, model, optimizer)
        truncate_metrics(run_dir, start, rank)
        path = os.path.join(run_dir, "metrics.jsonl")
        if rank == 0 and os.path.exists(path):
            with open(path) as f:
                history = [json.loads(line) for line in f if line.strip()]
        return start, skipped, streak, history
    more = extra()
    metrics, samples_by_set = evaluate_all(model, tokenizer, eval_sets, args, device, engine)
    log_step(run_dir, {"step": 0, **metrics, **more}, history, rank, samples=samples_by_set)  # the base model's
    return 0, 0, 0, history


def progress(start, steps, script, rank):
    """The steps from `start` with a tqdm bar on rank 0, named after the script (its __file__)."""
    return tqdm(range(start, steps), initial=start, total=steps, desc=os.path.splitext(os.path.basename(script))[0],
                disable=rank != 0, dynamic_ncols=True)


# ============================================================================ 1. rollouts
def step_groups(problems, args, step, rank, world):
    """This rank's share of the step's --prompts-per-step problems, each repeated G times ([N = B / world * G], groups
    contiguous and whole on this rank), and one sampling key per completion from (seed, step, global index)."""
    fault_point("rollout", step + 1)  # test-only: SIGKILL here when $EXPLORE_RLVR_FAULT says so (tests/test_crash.py)
    n_local, G = args.prompts_per_step // world, args.group_size
    mine = step_problems(problems, step, args.prompts_per_step, args.seed)[rank * n_local:(rank + 1) * n_local]
    group = [p for p in mine for _ in range(G)]
    return group, torch.stack([sample_keys(args.seed, step, rank * n_local * G + i) for i in range(len(group))])


@torch.no_grad()
def generate(model, tokenizer, prompts, keys, max_new_tokens, temperature=1.0, top_p=1.0, batch_size=256, engine=None,
             push=True):
    """Sample one completion per prompt string. keys: [N] int64 from sample_keys; temperature 0 = greedy.
    Returns a list of dicts {prompt_ids, completion_ids (incl. EOS if it stopped), finished}.
    engine: None = HF generate on the training model (counter-based sampling); else the colocated vLLM engine of
    rollout_engine(), into which the training weights are first pushed (push=False: they are known to be there; an
    engine that sleeps at level 2 is pushed anyway)."""
    if engine is not None:
        return vllm_generate(engine, model, tokenizer, prompts, keys, max_new_tokens, temperature, top_p, push)
    from transformers import GenerationConfig, LogitsProcessorList
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


def rollout_logprobs(samples, mask):
    """The engine's log-probs of the sampled tokens as [N, T] (like the completion mask), or None for HF rollouts."""
    if "logprobs" not in samples[0]:
        return None
    out = torch.zeros_like(mask)
    for i, s in enumerate(samples):
        out[i, :len(s["logprobs"])] = torch.tensor(s["logprobs"], dtype=out.dtype)
    return out


# ============================================================================ 2. rewards
def compute_rewards(problems, completions):
    """Reward of each completion for its problem: countdown (numbers, target), arithmetic (gold) or math (gold: str
    or list of acceptable golds, any match counts). Math items go through the worker pool in one batch."""
    out = [0.0] * len(problems)
    math_items = []  # (index, completion, gold)
    for i, (p, c) in enumerate(zip(problems, completions)):
        if p.get("task") == "countdown":
            out[i] = countdown_reward(c, p["numbers"], p["target"])
        elif p.get("task") == "arithmetic":
            out[i] = arithmetic_reward(c, p["gold"])
        elif p.get("task") == "math":
            golds = p["gold"] if isinstance(p["gold"], (list, tuple)) else [p["gold"]]
            math_items += [(i, c, g) for g in golds]
        else:
            raise UserError(f"unknown task {p.get('task')!r}: expected 'countdown', 'arithmetic' or 'math'")
    scores = math_rewards([c for _, c, _ in math_items], [g for _, _, g in math_items])
    for (i, _, _), s in zip(math_items, scores):
        out[i] = max(out[i], s)
    return out


# ============================================================================ 4. per-token log-probs and entropy
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
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    h = final_hidden(model, prefixes[:, :split], prefixes[:, split:], cache)  # [U, split, d]
    for layer in cache.layers:  # [U, ...] -> [N, ...]: each row gets its prefix's keys and values
        # backward: index_add
        layer.keys, layer.values = layer.keys.index_select(0, inv), layer.values.index_select(0, inv)
    return cache, h, inv


def _chunk_logits(h, weight, temperature=1.0):
    logits = h @ weight.T  # [n, V] for a chunk of n token rows only
    logits = logits.float() if logits.element_size() < 4 else logits  # bf16 -> fp32; fp64 stays (tests)
    return logits / temperature if temperature != 1.0 else logits  # the sampling policy softmax(z / T)


def _logprob_entropy(h, weight, targets, temperature=1.0):
    logits = _chunk_logits(h, weight, temperature)  # [n, V]
    logz = logits.logsumexp(-1)  # [n]
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    p = logits.softmax(-1)  # [n, V]
    # H = log Z - sum_v p_v z_v: a batched dot, no [n, V] product
    entropy = logz - (p[:, None, :] @ logits[:, :, None])[:, 0, 0]
    return logp, entropy, logits


def token_logprobs(model, input_ids, attention_mask, start, chunk=1024, return_hidden=False, row_fn=None,
                   prompt_len=None, temperature=1.0):
    """log pi(x_t | x_<t) and the entropy of pi(. | x_<t) for positions t >= start: ([N, L-start], [N, L-start]),
    where pi = softmax(logits / temperature) is the policy that samples at --temperature (verl divides the logits
    the same way; vLLM's processed log-probs are of this distribution, engine.py). In value (and gradient) it is the
    naive computation; everything below only saves memory and time:

        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
        logits = model(input_ids, attention_mask=attention_mask, position_ids=positions).logits
        logits = logits[:, start - 1:-1].float() / temperature  # [N, L-start, V]: position t - 1 predicts token t
        logp_all = logits.log_softmax(-1)
        logp = logp_all.gather(-1, input_ids[:, start:, None]).squeeze(-1) * attention_mask[:, start:]
        entropy = -(logp_all.exp() * logp_all).sum(-1) * attention_mask[:, start:]

    Also returns the LM-head inputs h_t [N, L-start, d] if asked, and row_fn(logits [n, V], targets [n]) -> [n]
    gathered to [N, L-start] if given (a method's own per-token statistic of the full distribution, computed while the
    chunk's logits, divided by the temperature too, exist). The vocabulary projection runs on `chunk` valid rows at a
    time (recomputed in backward), so no [N, L, V] float32 tensor ever exists. Rows with the same prompt (the first
    `prompt_len`, default `start`, tokens) share one forward of it (shared_prefix_forward), with or without
    gradient."""
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
        args = (h_rows[i:i + chunk], weight, t_rows[i:i + chunk], temperature)
        if torch.is_grad_enabled():  # keep only h for backward; the chunk's logits are recomputed there
            lp, ent = checkpoint(lambda *a: _logprob_entropy(*a)[:2], *args, use_reentrant=False)
            logits = _chunk_logits(*args[:2], temperature).detach() if row_fn is not None else None
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


# ============================================================================ 5. the update
def micro_batches(rows, mask, P, args, group=1):
    """The rows of one pass, a no-grad log-prob pass or one optimizer step's gradient accumulation, in micro-batches
    (one forward each): --micro-batch-size rows, or with --micro-batch-tokens N, packed in order while a micro-batch
    costs at most N tokens, padding counted: n rows cost n x (P + their longest completion), the columns
    token_logprobs runs (a row longer than N goes alone). group > 1 keeps whole groups of `group` rows together
    (THR's pass). Under FSDP2 every rank must run as many forwards (each gathers the weights with the others): this
    rank's largest micro-batches are halved until it has as many as the busiest rank (SPS pads the rest when it has
    too few rows). Each backward reduce-scatters its gradient at once (FSDP2's default, and verl's): turning that off
    until the last micro-batch would keep an unsharded fp32 gradient of the whole model on every rank.
    rows: [n] indices into mask [N, T], P: the prompts' padded width. Returns [n_j] index tensors."""
    lengths = mask[rows].sum(-1).long().tolist()  # [n] completion tokens of each row
    size = max(group, args.micro_batch_size // group * group)  # rows, whole groups

    def cost(part):  # tokens of one micro-batch, padding counted
        return len(part) * (P + max(lengths[i] for i in part))
    parts = []  # positions in rows
    for start in range(0, len(rows), group):
        unit = list(range(start, start + group))
        if args.micro_batch_tokens:
            fits = parts and cost(parts[-1] + unit) <= args.micro_batch_tokens
        else:
            fits = parts and len(parts[-1]) + group <= size
        if fits:
            parts[-1] += unit
        else:
            parts.append(unit)
    busiest = int(all_max_dict({"n": len(parts)}, mask.device)["n"])
    while len(parts) < busiest and any(len(p) > group for p in parts):
        j = max((j for j, p in enumerate(parts) if len(p) > group), key=lambda j: cost(parts[j]))
        half = len(parts[j]) // group // 2 * group  # at a group boundary
        parts[j:j + 1] = [parts[j][:half], parts[j][half:]]
    return [rows[p] for p in parts]


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


def optimizer_step(model, optimizer, args, skipped, streak):
    """Clip the accumulated gradient to --max-grad-norm and apply it, then free it (set to None: its memory is free
    for the next rollout's engine and KV cache). A non-finite one (a non-finite loss gives one) is skipped and
    counted; --max-skipped-steps of them in a row stop the run. Returns (grad norm, skipped, streak)."""
    grad_norm = clip_grad_norm(model, args.max_grad_norm)
    if math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (grad_norm, *count_skip(grad_norm, skipped, streak, args.max_skipped_steps))


# ============================================================================ 6. metrics, evaluation, checkpoints
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


def time_metrics(t_rollout, t_reward, t_train, s, passes):
    """Seconds per phase and tokens/s; passes: forward passes over the batch in the update (old log-probs included)."""
    return {"time/rollout": t_rollout, "time/reward": t_reward, "time/train": t_train,
            "tokens_per_s/rollout": s["completion_tokens"] / t_rollout,
            "tokens_per_s/train": s["tokens"] * passes / t_train}


def rollout_mismatch(old_logp, rollout_logp, mask, cap, device):
    """Metrics of the engine/trainer mismatch over every sampled token of the step, logged and never a stop:
    rollout/logprob_diff = mean |log pi_old - log pi_rollout| (all ranks), rollout/logprob_diff_max (its largest
    token, all ranks) and rollout/is_capped_frac (tokens whose truncated IS weight hit the cap). {} for HF rollouts.
    Why no threshold (TRL and verl also only log it and correct with the weight): measured with tests/bench_mismatch.py
    (SmolLM2-135M-Instruct, CPU, 5 GRPO steps of 16 completions), a bf16 trainer against an fp32 one differs by
    0.033-0.094 nats/token (max 0.19-0.90), while an engine 1 step stale differs by 0.004-0.005 at lr 1e-6 and
    0.027-0.043 at lr 1e-5, 5 steps stale by 0.019 (lr 1e-6) and 0.145 (lr 1e-5); bf16 engines on GPU are reported
    at 0.011-0.036, growing with training. On CPU (fp32 both sides) it is ~1e-6. A stale engine is caught directly
    instead: engine.push_weights checks a fingerprint of the weights on the engine after every push, before the step's
    update. README, "Rollout/trainer mismatch"."""
    if rollout_logp is None:
        return {}
    d = (old_logp - rollout_logp) * mask  # [N, T]
    diff_sum, capped, n = all_sum([d.abs().sum().item(), ((d.exp() > cap) * mask).sum().item() if cap else 0.0,
                                   mask.sum().item()], device)
    worst = all_max_dict({"max": d.abs().max().item() if d.numel() else 0.0}, device)["max"]
    return {"rollout/logprob_diff": diff_sum / max(n, 1), "rollout/logprob_diff_max": worst,
            "rollout/is_capped_frac": capped / max(n, 1)}


def system_metrics(engine, old_logp, rollout_logp, mask, args, device):
    """time/sync (vLLM's wake and weight push), rollout/weights_verified (tensors whose pushed values the engine was
    checked to hold), the engine/trainer mismatch (rollout/*, vLLM only), this rank's peak memory."""
    return {**(engine["metrics"] if engine else {}),
            **rollout_mismatch(old_logp, rollout_logp, mask, args.tis_cap, device),
            "memory/peak_gib": peak_memory_gib(device)}  # since the previous step's record


def log_step(run_dir, record, history, rank, bar=None, samples=None):
    """Rank 0: one metrics.jsonl line (and the trackers), a few completions per eval set, the progress bar."""
    fault_point("update", record["step"])  # test-only: SIGKILL after the update, before its metric line
    for name, recs in (samples or {}).items():
        log_jsonl(run_dir, "samples.jsonl", {"step": record["step"], "dataset": name, "problems": recs[:4]}, rank)
    history.append(record)
    log_jsonl(run_dir, "metrics.jsonl", record, rank)
    if bar is not None and rank == 0:
        pass1 = next((h["eval/pass@1"] for h in reversed(history) if "eval/pass@1" in h), 0)
        bar.set_postfix(reward=f"{record['reward/mean']:.3f}", pass1=f"{pass1:.3f}")


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), in the stable product form."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ks_up_to(n):
    return [2 ** i for i in range(int(math.log2(n)) + 1)]


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
    texts, greedy_texts = (tokenizer.batch_decode([s["completion_ids"] for s in x], skip_special_tokens=True)
                           for x in (samples, greedy))
    rewards = compute_rewards([p for p in local for _ in range(n)], texts)
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
    `eval/<name>/solved`: the indices of the problems with at least one correct sample, `eval/<name>/correct`: the
    correct samples of each problem in order (and `eval/<name>/problems`)."""
    out, records = {}, {}
    for name, problems in eval_sets.items():
        m, records[name] = evaluate(model, tokenizer, problems, args.eval_samples, args.eval_temperature,
                                    args.eval_top_p,
                                    args.max_new_tokens, args.seed, device, args.logprob_chunk, engine)
        out.update({f"eval/{name}/{k}": v for k, v in m.items()})
        out[f"eval/{name}/problems"] = len(records[name])  # with `solved`, union coverage over runs (eval.py's U2)
        out[f"eval/{name}/solved"] = [x["index"] for x in records[name] if x["correct"] > 0]
        out[f"eval/{name}/correct"] = [x["correct"] for x in records[name]]  # per problem: paired comparisons
    for k in m:
        out[f"eval/{k}"] = float(np.mean([out[f"eval/{name}/{k}"] for name in eval_sets]))
    return out, records


def save_checkpoint(run_dir, step, model, optimizer, rank, skipped=0, streak=0):
    """checkpoint/, what --resume reads: the sharded weights and AdamW state (torch DCP: every rank writes its shard,
    nothing is gathered) + trainer_state.json (step, skipped_steps, skip_streak, ...), written to checkpoint.tmp and
    then swapped in by commit_checkpoint so that a kill at any moment leaves a complete checkpoint. The weights for
    transformers, vLLM and eval.py are model/ (export_model)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: not caught by Exception
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    tmp = os.path.join(run_dir, "checkpoint.tmp")
    if rank == 0 and os.path.exists(tmp):
        remove_checkpoint(tmp)  # a partial one (after a resume, checkpoint/ is the newest complete one)
    barrier()
    if optimizer.state:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    else:  # every update so far was skipped: AdamW has no state, and get_state_dict would make one by a zero-lr step
        state = {"model": get_model_state_dict(model)}  # (which shifts later bias corrections): the model only
    try:
        dcp.save(state, checkpoint_id=os.path.join(tmp, "train_state"))  # returns when every rank has written
        fault_point("checkpoint-partial", step)
        if rank == 0:
            commit_checkpoint(run_dir, {"step": step, "skipped_steps": skipped, "skip_streak": streak,
                                        "optimizer_state": "optim" in state})
    except (Exception, CheckpointException) as e:  # a full disk or quota: torch and safetensors say it their own way
        if any(isinstance(f[0], KeyboardInterrupt) for f in getattr(e, "failures", {}).values()):
            raise KeyboardInterrupt from e  # Ctrl-C while DCP wrote: main's line, not a disk's
        raise UserError(write_error(run_dir, tmp, f"the checkpoint of step {step}", e)) from e
    barrier()


def export_model(run_dir, step, model, tokenizer, args, rank):
    """At --export-every steps and the last one: run_dir/model/, a Hugging Face model directory (transformers, vLLM,
    eval.py) in --save-dtype. Every rank takes part in gathering the weights, one tensor at a time; rank 0 casts each
    as it arrives (Qwen2.5-7B in bf16: 15 GB of host memory, where an fp32 state dict takes 30 GB), writes them into
    model.tmp and renames it to model/ (commit_export), so model/ is never half-written."""
    if not due(args.export_every, step, args.steps):
        return
    auto = "bf16" if torch.cuda.is_available() else "fp32"  # the compute dtype
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[auto if args.save_dtype == "auto" else args.save_dtype]
    tmp = os.path.join(run_dir, "model.tmp")
    tied = tied_weights(model)
    weights = {}
    for name, tensor in model.state_dict().items():  # under FSDP2, DTensor shards: each rank holds 1/world of it
        if name in tied:
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # a collective: every rank calls it
        if rank == 0:
            weights[name] = full.to("cpu", dtype if full.is_floating_point() else full.dtype)
    if rank == 0:
        try:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)  # a partial one, from a run killed while exporting
            save_hf_model(tmp, weights, model, tokenizer, dtype)
            commit_export(run_dir, step)
        except Exception as e:  # a full disk or quota
            raise UserError(write_error(run_dir, tmp, f"the model export of step {step}", e)) from e
    barrier()


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
