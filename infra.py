"""Machinery under common.py that keeps a run correct and safe but is no part of an RL step: a method reader never
needs to open this file, and the scripts reach all of it through common.py.

- math-verify in worker processes: `math_rewards` gives each answer a time budget and kills a worker stuck in C code;
- crash-safe files: atomic JSON, fsync, the newest complete checkpoint after a kill, metric lines cut back on resume,
  and the flags a resumed run may change;
- test-only fault injection ($EXPLORE_RLVR_FAULT), which tests/test_crash.py uses to kill runs at every stage;
- metric lines (metrics.jsonl, samples.jsonl), the --report-to trackers they feed, peak memory, the final summary."""
import atexit
import contextlib
import copy
import functools
import json
import logging
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import replace

import torch

from engine import choose_backend
from tasks import (GENERATED, TINY_CONFIGS, UserError, format_prompt, hub_reachable, last_boxed,
                   parse_dataset_list, require, tiny_config, tiny_model_dir)


# ============================================================================ math-verify in worker processes


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


def _ignore_ctrl_c():
    """Worker initializer: Ctrl-C reaches the whole process group; the main process ends the run (one line, see
    common.main) and the pool with it, so a worker prints no KeyboardInterrupt traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _get_pool():
    """The shared worker pool, started on first use. Workers fork from a server that has imported the main
    script (which needs an `if __name__ == "__main__":` guard), this module and math_verify: restarts are cheap."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["__main__", __name__, "math_verify"])  # workers re-import nothing
            pool = ProcessPoolExecutor(_WORKERS, mp_context=ctx, initializer=_ignore_ctrl_c)
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


# ============================================================================ crash-safe files


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


# ============================================================================ test-only fault injection


FAULT_ENV = "EXPLORE_RLVR_FAULT"  # "STAGE:STEP" (rank 0) or "STAGE:STEP@RANK"


def fault_point(stage, step):
    """Test-only: SIGKILL this process here when $EXPLORE_RLVR_FAULT names this stage and step (1-based: the step
    whose metric line this is); does nothing otherwise. The scripts' loops hold none: the helpers they call do.
    Stages: rollout (common.step_groups, as the step's rollouts begin), update (common.log_step: after the update,
    before its metric line), metrics (log_jsonl, mid-line), save_checkpoint's checkpoint-partial, tmp-written,
    before-rename-old, between-renames, after-rename, and export_model's export-between-renames.
    tests/test_crash.py kills runs at each of them and checks that --resume loses nothing."""
    spec, rank = os.environ.get(FAULT_ENV, ""), os.environ.get("RANK", "0")
    if spec in (f"{stage}:{step}@{rank}", f"{stage}:{step}" if rank == "0" else None):
        os.kill(os.getpid(), signal.SIGKILL)


# ============================================================================ metric lines, trackers (--report-to)


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


def log_stop(run_dir, reason):
    """Rank 0, a run stopped inside a step before its update (a stale engine): that step's metrics.jsonl line, with
    the reason in place of the metrics ({"step": N, "stopped": reason}); --resume drops it with the step's others."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        steps = [json.loads(line).get("step", 0) for line in f if line.strip()]
    log_jsonl(run_dir, "metrics.jsonl", {"step": max(steps, default=-1) + 1, "stopped": reason})


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


def peak_memory_gib(device):
    """Peak memory in GiB since the previous call: what torch allocated on this CUDA device (the counter is then
    reset), or this process's peak resident set size on CPU (which only grows)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2 ** 30
    return proc_status_kib("VmHWM") / 2 ** 20


# glibc serves an allocation of at least this many bytes with its own mmap, returned to the system when freed
MMAP_THRESHOLD = 1 << 20


def fixed_mmap_threshold():
    """CPU ranks under torchrun: fix glibc's mmap threshold (mallopt M_MMAP_THRESHOLD; fixing it also turns off its
    dynamic raise). By default every freed mmap-served block raises the threshold to the block's size (up to 32 MiB),
    so FSDP2's gathered tensors, gloo's buffers and activations of a few MiB move into malloc's heaps, which are
    shared out among threads and return little memory to the system. Measured with SmolLM2-135M, 2 ranks, vLLM,
    grpo.py (README, "Will it fit?"): the peak resident set per rank went from 5.95 GiB after step 1 (6.44 by step 4,
    plan 3.52) to 3.65-4.17 GiB at 1 MiB and 3.34-3.86 GiB at 64 KiB. 1 MiB, because every mmap costs page faults:
    the tiny model's 2-rank run took 15% longer at 64 KiB than at 1 MiB (its tensors are small). A single process
    keeps glibc's default: its heap wastes less (SmolLM2, 1 rank, HF: 3.98 GiB, 3.54 at 64 KiB) and a fixed threshold
    cost the tiny demo 9% (1 MiB) to 42% (64 KiB) of its time. So does a run started with MALLOC_MMAP_THRESHOLD_ set
    (the user's choice) or on a system without glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other C libraries
        return False
    M_MMAP_THRESHOLD = -3  # malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def proc_status_kib(field):
    """A memory field of /proc/self/status in KiB (Linux): VmHWM, this process's peak resident set since it started
    its program (getrusage's ru_maxrss is kept across exec, so a process started by a big one, pytest, would report its
    parent's), or VmRSS, the resident set now. Elsewhere: ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 10 if sys.platform == "darwin" else 1)


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
    written = [name for name in ("metrics.jsonl", "samples.jsonl", "checkpoint/", "model/") if os.path.exists(
        os.path.join(run_dir, name))]  # --steps 0 writes no checkpoint and no model
    print(f"run directory: {run_dir}  ({', '.join(written)})")


# ============================================================================ checkpoint recovery and resume


def remove_checkpoint(path):
    """Delete a checkpoint directory, its completion marker first: a kill midway leaves a partial one, never one that
    looks complete with files missing."""
    if os.path.exists(os.path.join(path, "trainer_state.json")):
        os.remove(os.path.join(path, "trainer_state.json"))
        _fsync(path)
    shutil.rmtree(path)


def tied_weights(model):
    """Names of the parameters that are another's (Qwen2.5 <= 3B ties lm_head to the embeddings): a model directory
    stores that tensor once, as save_pretrained does, and from_pretrained ties it again from the config."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.update([name] if id(p) in seen else [])
        seen.add(id(p))
    return tied


def save_hf_model(path, weights, model, tokenizer, dtype):
    """Rank 0: `weights` ({name: CPU tensor}, tied ones left out) as model.safetensors + config (its dtype set to
    `dtype`, which vLLM loads in), generation config and tokenizer: a Hugging Face model directory that transformers
    and vLLM load."""
    from safetensors.torch import save_file
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    config = copy.deepcopy(model.config)  # the training model's own stays fp32
    config.dtype = dtype
    config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)


def commit_checkpoint(run_dir, trainer):
    """Rank 0, once checkpoint.tmp holds every file: fsync them (and the metric files, so the lines of the steps this
    checkpoint holds survive a reboot), write trainer_state.json LAST (a checkpoint is complete iff it has one), then
    checkpoint -> checkpoint.old, checkpoint.tmp -> checkpoint, checkpoint.old deleted. A kill at any moment leaves at
    least one complete checkpoint with the newest step, which recover_checkpoint finds."""
    final, tmp, old = (os.path.join(run_dir, name) for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    step = trainer["step"]
    for name in ("metrics.jsonl", "samples.jsonl"):  # the lines of the steps this checkpoint holds survive a reboot
        _fsync(os.path.join(run_dir, name)) if os.path.exists(os.path.join(run_dir, name)) else None
    for root, _, files in os.walk(tmp):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)
    write_json_atomic(os.path.join(tmp, "trainer_state.json"), trainer)  # the completion marker, last
    fault_point("tmp-written", step)
    if os.path.exists(old):
        remove_checkpoint(old)  # left by an earlier kill, older than checkpoint.tmp
    fault_point("before-rename-old", step)
    if os.path.exists(final):
        os.replace(final, old)
        _fsync(run_dir)
    fault_point("between-renames", step)
    os.replace(tmp, final)
    _fsync(run_dir)
    fault_point("after-rename", step)
    if os.path.exists(old):
        remove_checkpoint(old)


def commit_export(run_dir, step):
    """Rank 0, once model.tmp holds every file: fsync them, then model -> model.old, model.tmp -> model, model.old
    deleted. model/ is complete or, after a kill between the two renames, absent (the next export writes it again;
    a resumed run exports at its end): never half-written."""
    final, tmp, old = (os.path.join(run_dir, name) for name in ("model", "model.tmp", "model.old"))
    for name in os.listdir(tmp):
        _fsync(os.path.join(tmp, name))
    _fsync(tmp)
    if os.path.exists(old):
        shutil.rmtree(old)  # left by an earlier kill
    if os.path.exists(final):
        os.replace(final, old)
    fault_point("export-between-renames", step)
    os.replace(tmp, final)
    _fsync(run_dir)
    if os.path.exists(old):
        shutil.rmtree(old)


def _checkpoint_step(path):
    """The step of the checkpoint in `path` if it is complete (has its trainer_state.json, written last), else None."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def newest_checkpoint_step(run_dir):
    """The step --resume would continue: that of the newest complete checkpoint among checkpoint/, checkpoint.tmp and
    checkpoint.old, or None. Reads only (recover_checkpoint does the renaming at resume)."""
    steps = [_checkpoint_step(os.path.join(run_dir, name)) for name in ("checkpoint", "checkpoint.tmp",
                                                                        "checkpoint.old")]
    return max((s for s in steps if s is not None), default=None)


def recover_checkpoint(run_dir):
    """Rank 0: step of the newest complete checkpoint among checkpoint/, checkpoint.tmp and checkpoint.old (a kill
    inside save_checkpoint can leave any of them), or None. It is renamed to checkpoint/ and the others deleted, a
    partial one with a one-line notice, so the next save_checkpoint starts from one checkpoint."""
    paths = [os.path.join(run_dir, name) for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old")]
    steps = {p: _checkpoint_step(p) for p in paths if os.path.isdir(p)}
    best = max((p for p in steps if steps[p] is not None), key=steps.get, default=None)  # ties: checkpoint/
    for p in steps:
        if steps[p] is None:
            print(f"ignoring the partial checkpoint {p} (the run was killed while writing it)")
    if best is not None and best != paths[0]:
        print(f"resuming from {best} (step {steps[best]}): the run was killed while renaming it")
        if os.path.exists(paths[0]):
            remove_checkpoint(paths[0])  # partial, or older than best
        os.replace(best, paths[0])
        _fsync(run_dir)
    for p in paths[1:]:
        if os.path.exists(p):
            remove_checkpoint(p)
    return steps[best] if best is not None else None


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


def resume_command(run_dir):
    """The exact command that continues `run_dir`: this one's flags, with --resume --run-dir DIR in place of any."""
    argv, skip = [], 0
    for i, a in enumerate(sys.argv[1:], 1):
        if skip:
            skip -= 1
        elif a in ("--run-dir", "--resume") or a.startswith(("--run-dir=", "--resume=")):
            nxt = sys.argv[i + 1] if i + 1 < len(sys.argv) else ""
            skip = int(a == "--run-dir" or (a == "--resume" and nxt in ("yes", "auto")))
        else:
            argv.append(a)
    world = os.environ.get("WORLD_SIZE")
    launcher = ["torchrun", "--nproc_per_node", world] if world and world != "1" else ["python"]
    return shlex.join(launcher + [os.path.basename(sys.argv[0]), *argv, "--resume", "--run-dir", run_dir])


def checkpoint_note(run_dir):
    """What --resume would continue in run_dir, for the line a stopped run ends with."""
    step = newest_checkpoint_step(run_dir)
    if step is None:
        return "no checkpoint was written yet, so a new run starts over (`--save-every N` saves every N steps)"
    return f"checkpoint/ holds step {step}; continue from it with: {resume_command(run_dir)}"


def write_error(run_dir, tmp, what, error):
    """The line a failed write of `what` (a checkpoint or the model export) into the directory `tmp` ends the run with:
    the cause, the space left, and what --resume continues (the complete checkpoint before it is untouched)."""
    with contextlib.suppress(OSError):
        remove_checkpoint(tmp)  # the partial one: its space back
    cause = (str(error).strip().splitlines() or [type(error).__name__])[-1][:160]
    free = shutil.disk_usage(run_dir).free / 2 ** 30
    last = newest_checkpoint_step(run_dir)
    kept = (f"the previous checkpoint (step {last}) is intact and --resume continues from it: {resume_command(run_dir)}"
            if last is not None else "no earlier checkpoint exists, so a new run starts over")
    return (f"could not write {what} to {tmp} ({type(error).__name__}: {cause}; "
            f"{free:.1f} GiB free there): is the disk full? Free space, then: {kept}")


# flags that change speed, memory, evaluation or logging, not what is trained: --resume accepts new values for them
RESUME_MAY_CHANGE = {"steps", "run_dir", "resume", "save_every", "save_dtype", "export_every", "eval_every",
                     "eval_samples", "eval_problems", "eval_datasets", "eval_temperature", "eval_top_p",
                     "micro_batch_size", "logprob_chunk", "gradient_checkpointing", "rollout_backend",
                     "vllm_gpu_memory", "vllm_cpu_kv_gib", "max_skipped_steps", "report_to", "micro_batch_tokens",
                     "dry_run", "world_size", "device_memory_gib", "plan_check"}


def resume_changes(config, old, config_path):
    """{flag: (old, new)} between a resumed run's config and its config.json `old` ({} for a new run). Stops with one
    line listing them if any is not in RESUME_MAY_CHANGE; fields added to the code since are ignored."""
    changes = {k: (old[k], v) for k, v in config.items() if k in old and old[k] != v}
    bad = [f"{k if k == 'script' else '--' + k.replace('_', '-')}: {json.dumps(a)} -> {json.dumps(b)}"
           for k, (a, b) in changes.items() if k not in RESUME_MAY_CHANGE]
    require(not bad, f"--resume: these flags differ from {config_path} and change the experiment: {', '.join(bad)}: "
                     f"pass the original values, or start a new --run-dir")
    return changes


def resolve_resume(resume, run_dir, step, rank):
    """--resume (yes | auto | None) and the step of run_dir's newest complete checkpoint (None: there is none) ->
    "yes" (continue from it) or None (start fresh). Stops on --resume without a checkpoint and on a new run in a used
    directory; --resume auto without a checkpoint drops the metric lines of a run that never checkpointed."""
    if not resume:
        require(not os.path.exists(os.path.join(run_dir, "metrics.jsonl")),
                f"{run_dir} already holds a run: pass --resume to continue it, or another --run-dir")
        return None
    require(step is not None or resume == "auto", f"--resume: {run_dir} holds no complete checkpoint: pass "
            f"--resume auto to start it from step 0, or check --run-dir")
    if step is None and rank == 0:
        print(f"--resume auto: no complete checkpoint in {run_dir}: starting from step 0")
        truncate_metrics(run_dir, -1)
    return "yes" if step is not None else None


def write_config(config_path, config, old, changes, step):
    """Rank 0: config.json, atomically; a resumed run appends {step, time, changed flags} to the "resumes" list."""
    os.makedirs(os.path.dirname(config_path) or ".", exist_ok=True)
    if old:
        record = {"step": step or 0, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "changed": {k: list(v) for k, v in changes.items() if k != "resume"}}
        config["resumes"] = old.get("resumes", []) + [record]
    write_json_atomic(config_path, config)


# ============================================================================ non-finite updates
def count_skip(grad_norm, skipped, streak, limit):
    """(skipped, streak) after one update: a non-finite grad_norm (which a non-finite loss gives) adds one to both, the
    caller does not apply that update; a finite one resets the streak. Stops the run when `limit`
    (--max-skipped-steps; 0 = never) updates in a row were skipped."""
    if math.isfinite(grad_norm):
        return skipped, 0
    require(not limit or streak + 1 < limit, f"{streak + 1} updates in a row had a non-finite loss or gradient (none "
            f"was applied): lower --lr or --max-grad-norm, check the data, or raise --max-skipped-steps")
    return skipped + 1, streak + 1



# ============================================================================ the memory plan
GIB = 2 ** 30
HEADROOM = 0.9  # a plan fits when its peak is at most 90% of the budget: the allocator's fragmentation, CUDA's context
#                 and NCCL's buffers (which torch.cuda.max_memory_allocated does not count), the OS on CPU
VLLM_CPU_GIB = 0.25  # CPU: vLLM's own resident memory beyond its weights, KV cache and sampler (measured, tiny model)
LAYER_ACTIVATIONS = (6, 4, 4, 1, 8)  # elements saved for backward per token and decoder layer: 6 d + 4 I + 4 q + L + 8
#   (d: hidden size, I: MLP width, q: heads x head size, L: the micro-batch's padded length: each layer keeps its own
#   [n, 1, L, L] attention mask), counted with torch.autograd.graph.saved_tensors_hooks on transformers 5's Qwen2 and
#   Llama layers (SDPA attention, fp32) at L = 64 and 256 by `python tests/bench_plan.py --count`. With gradient
#   checkpointing a layer keeps its input (d) and one layer at a time holds the full count while it is recomputed.


def model_shape(model):
    """The sizes the plan needs from a causal LM (a meta-device build is enough): {params (a tied weight once), layer
    (one decoder layer's), root (the rest: embeddings, final norm, LM head), layers, d, I, q, kv (K or V width),
    vocab, tied (the LM head is the input embedding)}."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return {"params": params, "layer": layer, "root": params - layer * config.num_hidden_layers,
            "context": getattr(config, "max_position_embeddings", None) or 1 << 30,
            "layers": config.num_hidden_layers, "d": config.hidden_size, "I": config.intermediate_size,
            "q": config.num_attention_heads * head_dim, "kv": config.num_key_value_heads * head_dim,
            "vocab": config.vocab_size, "tied": bool(getattr(config, "tie_word_embeddings", False))}


def process_bytes():
    """CPU: this process's resident memory now (python, torch, transformers, this repository; no model yet): the
    plan's base on this machine (0.2-0.4 GiB measured)."""
    return proc_status_kib("VmRSS") * 1024


def device_budget(device_memory_gib, world, gpu):
    """GiB one rank may use: --device-memory-gib, else the visible GPU's memory, else (CPU) the host's RAM divided
    among the ranks on this machine."""
    if device_memory_gib:
        return device_memory_gib
    if gpu:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return host / min(world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def micro_batch_rows(args, rows, row_tokens):
    """Rows in the update's largest micro-batch when every row has row_tokens tokens (the plan's worst case)."""
    if getattr(args, "micro_batch_tokens", 0):
        return max(1, min(rows, args.micro_batch_tokens // row_tokens))  # a row longer than the budget goes alone
    return min(rows, args.micro_batch_size)


def memory_plan(args, shape, world, gpu, budget_gib, backend, reference, old_pass, group_pass=None):
    """Bytes one rank holds in each phase of a run, by part: {"phases": {phase: {part: bytes}}, "peak_phase",
    "peak_gib", "fits", ...}. The rank is rank 0, the busiest (it alone reads the weights at load and gathers the
    export). gpu: a CUDA device of budget_gib (bf16 compute, vLLM asleep outside rollouts); else a CPU rank (fp32,
    host memory, vLLM-CPU never sleeps). Worst cases: every prompt as long as --max-prompt-tokens (the dataset's
    bound), every completion --max-new-tokens long, the largest micro-batch full and its rows spread over as many
    prompts as they can be (without gradient checkpointing each distinct prompt runs once: prefix sharing).
    reference: a frozen pi_ref is loaded; old_pass: the update is preceded by a no-grad pass over the batch
    (off-policy, or the method's pi_old); group_pass: a pass whose micro-batches keep whole groups of --group-size
    rows, so its largest one holds at least G rows whatever the micro-batch flags say: "irl" (sps.py's IRL step, a
    backward: its own phase) or "thr" (thr.py's no-grad pass over the batch; its per-group scoring matrices are not
    counted)."""
    P, W, c = shape["params"], world, 2 if gpu else 4  # c: bytes per element of the compute dtype (bf16 | fp32)
    d, I, q, layers, V = shape["d"], shape["I"], shape["q"], shape["layers"], shape["vocab"]
    L = min(args.max_prompt_tokens + args.max_new_tokens, shape.get("context", 1 << 30))  # a row, padding included
    rows = args.prompts_per_step // W * args.group_size  # completions this rank samples in a step
    eval_rows = -(-(args.eval_problems or 1024) // W) * args.eval_samples  # 0 = all problems: counted as 1024
    n = micro_batch_rows(args, rows, L)
    G = args.group_size
    n_groups = max(G, n // G * G)  # rows of the largest micro-batch of whole groups (common.micro_batches, group=G)
    T = min(args.max_new_tokens, L)  # a row's completion tokens, at most

    def prompts_in(n, whole_groups):  # distinct prompts among n consecutive rows of groups of G
        return n // G if whole_groups else min(n, -(-(n - 1) // G) + 1)  # else at the worst alignment
    a, b, e, g, f = LAYER_ACTIVATIONS
    layer_bytes = (a * d + b * I + e * q + g * L + f) * c  # saved for backward, per token and layer
    checkpointing = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and gpu)
    kv_token = 2 * layers * shape["kv"] * c  # K and V of one token, every layer

    base = {} if gpu else {"process (python, torch, transformers)": process_bytes()}
    state = {"weights (fp32 shard)": 4 * P / W, "AdamW moments (fp32 shard)": 8 * P / W}
    if reference:
        state["reference model (shard)"] = c * P / W
    gathered = {"gathered parameters (root + 2 layers)": c * (shape["root"] + 2 * shape["layer"])} if W > 1 else {}

    def logits(n):  # a micro-batch of n rows of L tokens: the log-prob pass's logits and LM-head inputs
        completion_tokens = n * T  # token_logprobs projects only the completions' tokens onto the vocabulary
        return {"log-prob chunk logits": min(args.logprob_chunk, completion_tokens) * V * (c + 16),  # [chunk, V], grads
                "LM-head inputs": n * L * d * 4 * 3}  # h [n, L, d] fp32: the model's, padded, the valid rows

    def activations(n, whole_groups=False):  # what its forward saves for the backward
        if checkpointing:  # no prefix sharing: transformers drops the KV cache under gradient checkpointing
            parts = {"activations (checkpointed)": n * L * (layers * d * c + layer_bytes)}
        elif prompts_in(n, whole_groups) < n:  # prefix sharing: each distinct prompt runs once, then the completions
            parts = {"activations": (prompts_in(n, whole_groups) * (L - T) + n * T) * layers * layer_bytes,
                     "prompts' K and V, one copy per row": 2 * n * (L - T) * kv_token}  # index_select, then cat
        else:
            parts = {"activations": n * L * layers * layer_bytes}
        parts["attention mask"] = 4 * n * L * L  # the model's own, before its layers
        return parts

    def vocab_grads(n):  # [V, d] gradients of the LM head and the input embedding alive at once in the backward
        # a tied weight: the LM head's (waiting in autograd's buffer), the embedding's, their sum. One process,
        # untied: the log-prob chunks' LM-head gradients and their sum (one chunk: one at a time). FSDP2, untied: both
        # unsharded gradients and their copies in the fp32 reduce-scatter input. Counted by bench_plan.py --vocab-grads
        grad = c if gpu and W > 1 else 4  # FSDP2 on CUDA: unsharded gradients in bf16, reduced in fp32
        if shape["tied"]:
            vd = 3 * grad
        elif W > 1:
            vd = 2 * grad + 2 * 4
        else:
            vd = 3 * 4 if n * T > args.logprob_chunk else 4
        return {"vocabulary-sized gradients in the backward": vd * V * d}
    if backend == "vllm" and gpu:
        engine = {"vLLM engine (--vllm-gpu-memory)": args.vllm_gpu_memory * budget_gib * GIB}
        eval_engine, resident = engine, {}  # asleep at level 2 outside rollouts: its weights and KV cache are freed
    elif backend == "vllm":
        seqs = min(max(rows, eval_rows), 1024)  # engine_limits' max_num_seqs
        engine = {"vLLM weights (fp32)": 4 * P, "vLLM KV cache (--vllm-cpu-kv-gib)": args.vllm_cpu_kv_gib * GIB,
                  "vLLM sampler ([seqs, V] fp32 x 4)": 4 * seqs * V * 4, "vLLM itself": VLLM_CPU_GIB * GIB,
                  # vLLM-CPU prepacks a oneDNN GEMM copy of the [V, d] matrix for the embedding and for the LM head
                  # (tied or not) and keeps both parameters: measured by bench_plan.py --vllm-engine
                  "vLLM's packed [V, d] copies (embedding, LM head)": 2 * 4 * V * d}
        if W == 1:  # measured: after the first weight push (vLLM's layer-wise reload) one process holds the weights
            # once more (SmolLM2: +0.49 of 0.50 GiB, the 0.5B shape +1.83 of 1.84, bench_plan.py --vllm-engine); 2 ranks
            # of the 0.5B shape: +0.55 GiB, not counted
            engine["vLLM weights again after a push (one process)"] = 4 * P
        eval_engine, resident = engine, engine
    else:
        def hf_generate(n_seqs):  # generate() on the training model, 256 completions at a time
            n_seqs = min(n_seqs, 256)
            return {**gathered, "KV cache": n_seqs * L * kv_token * (1 + 1 / layers), "logits": 4 * n_seqs * V * 4}
        engine, eval_engine, resident = hf_generate(rows), hf_generate(eval_rows), {}
    update = {"gradients (fp32 shard)": 4 * P / W, **gathered, **activations(n), **logits(n), **vocab_grads(n)}
    if gpu and W == 1:
        update["autocast's bf16 weight copies"] = 2 * P
    phases = {"rollout": {**base, **state, **engine},
              "update": {**base, **state, **resident, **update},
              "evaluation": {**base, **state, **eval_engine}}
    if old_pass or reference:
        m = n_groups if group_pass == "thr" else n
        phases["old log-probs"] = {**base, **state, **resident, **gathered, **logits(m),
                                   "activations (no grad, one layer)": m * L * layer_bytes / 2}
    if group_pass == "irl":  # after the RL step's optimizer step (--irl-schedule separate) or beside its gradient
        phases["IRL step"] = {**base, **state, **resident, "gradients (fp32 shard)": 4 * P / W, **gathered,
                              **activations(n_groups, whole_groups=True), **logits(n_groups), **vocab_grads(n_groups)}
        if gpu and W == 1:
            phases["IRL step"]["autocast's bf16 weight copies"] = 2 * P
    save_dtype = getattr(args, "save_dtype", "auto")
    export_bytes = 2 if save_dtype == "bf16" or (save_dtype == "auto" and gpu) else 4
    full = {"full fp32 state dict (rank 0)": 4 * P} if W > 1 else {}  # one process: the model's own tensors
    exported = {"export: full weights in --save-dtype (rank 0)": export_bytes * P}  # gathered tensor by tensor
    host = {"load": 4 * P + (0 if gpu else 4 * P / W) * (W > 1), "export": export_bytes * P}
    if not gpu:  # host memory is the device: loading and exporting count too
        phases["load"] = {**base, **full, "weights (fp32 shard)": 4 * P / W}
        phases["export"] = {**base, **state, **resident, **exported}
    engine_gib = sum(v for k, v in engine.items() if k.startswith("vLLM engine") or "KV cache" in k) / GIB
    room = (HEADROOM * budget_gib - sum(phases["rollout"].values()) / GIB + engine_gib)  # GiB the engine may have
    totals = {k: sum(v.values()) / GIB for k, v in phases.items()}
    peak = max(totals, key=totals.get)
    return {"phases": phases, "totals": totals, "peak_phase": peak, "peak_gib": totals[peak],
            "budget_gib": budget_gib, "fits": totals[peak] <= HEADROOM * budget_gib, "gpu": gpu, "world": W,
            "backend": backend, "rows": rows, "micro_rows": n, "row_tokens": L, "host_gib": {k: v / GIB for k, v in
                                                                                           host.items()},
            "engine_tokens": (args.vllm_gpu_memory * budget_gib * GIB - 2 * P - GIB) / kv_token if gpu else
            args.vllm_cpu_kv_gib * GIB / kv_token,
            "checkpoint_gib": 12 * P / GIB, "export_gib": export_bytes * P / GIB,
            "engine_max": math.floor(100 * room / budget_gib) / 100 if gpu else math.floor(8 * room) / 8}


def phase_fits(plan, phase):
    return plan["totals"][phase] <= HEADROOM * plan["budget_gib"]


def plan_fix(args, plan_of):
    """The change that brings the plan closer to fitting, (flag, value), or None when it fits or no setting can. For
    the peak phase's flags in this order: the largest value of one flag that makes the phase fit; else, when no single
    flag can but all of them at their smallest would fit, the smallest value of the first flag that lowers the phase
    (the next call names the next one); else the fewest ranks (--world-size) at which the smallest setting fits.
    plan_of(args, world=...): the plan of a modified copy of the flags. Applied one after another, these changes
    reach a fitting plan whenever one exists (tests/test_plan.py checks it against a brute-force search). Only memory
    flags change: micro-batches, log-prob chunks and checkpointing leave the math alone, and the engine's share
    changes how many completions it holds at once (one whole row at least)."""
    from dataclasses import replace
    plan = plan_of(args)
    if plan["fits"]:
        return None
    phase, L = plan["peak_phase"], plan["row_tokens"]
    engine_flag = "vllm_gpu_memory" if plan["gpu"] else "vllm_cpu_kv_gib"
    tried = {"micro_batch_tokens": [k * L for k in range(plan["micro_rows"] - 1, 0, -1)],  # largest first
             "logprob_chunk": [x for x in (512, 256, 128, 64, 32) if x < args.logprob_chunk],
             "gradient_checkpointing": ["on"] if args.gradient_checkpointing != "on" else [],
             "vllm_gpu_memory": [x / 100 for x in range(round(args.vllm_gpu_memory * 100) - 1, 4, -1)],
             "vllm_cpu_kv_gib": [x / 8 for x in range(math.ceil(args.vllm_cpu_kv_gib * 8) - 1, 0, -1)]}
    tried[engine_flag] = [v for v in tried[engine_flag]  # the engine must hold one whole row
                          if plan_of(replace(args, **{engine_flag: v}))["engine_tokens"] >= L]
    engine = [engine_flag] if plan["backend"] == "vllm" else []
    resident = engine if not plan["gpu"] else []  # vLLM-CPU never sleeps: its KV cache weighs on every phase
    knobs = {"update": ["micro_batch_tokens", "logprob_chunk", "gradient_checkpointing"] + resident,
             "IRL step": ["micro_batch_tokens", "logprob_chunk", "gradient_checkpointing"] + resident,
             "old log-probs": ["micro_batch_tokens", "logprob_chunk"] + resident,
             "rollout": engine, "evaluation": engine, "export": resident, "load": []}[phase]
    every = ["micro_batch_tokens", "logprob_chunk", "gradient_checkpointing"] + engine
    smallest = replace(args, **{f: tried[f][-1] for f in every if tried[f]})
    if plan_of(smallest)["fits"]:
        for flag in knobs:
            for value in tried[flag]:
                if phase_fits(plan_of(replace(args, **{flag: value})), phase):
                    return flag, value
        for flag in knobs:
            if tried[flag] and plan_of(replace(args, **{flag: tried[flag][-1]}))["totals"][phase] < plan["totals"][
                    phase]:
                return flag, tried[flag][-1]
    for w in range(plan["world"] + 1, 1025):
        if args.prompts_per_step % w == 0 and plan_of(smallest, world=w)["fits"]:
            return "world_size", w
    return None


def plan_lines(plan, fix):
    """The plan as printed: one line per phase (its total and its parts, largest first), the engine's room, host
    memory, checkpoint sizes; the last line machine-readable:
    `plan: peak X.XX GiB per rank (PHASE); fits` or `...; does not fit: --FLAG VALUE`."""
    where = (f"{plan['world']} rank(s), {plan['budget_gib']:.1f} GiB each"
             + (" (GPU)" if plan["gpu"] else " (CPU: host RAM / local ranks)"))
    lines = [f"memory plan: {where}, rollouts by {plan['backend']}, micro-batch {plan['micro_rows']} rows x "
             f"{plan['row_tokens']} tokens (prompt bound + completion)"]
    for phase, parts in plan["phases"].items():
        detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)
        lines.append(f"  {phase:<13} {plan['totals'][phase]:7.2f} GiB = {detail}")
    if plan["backend"] == "vllm":
        lines.append(f"  engine: KV cache for ~{max(plan['engine_tokens'], 0):,.0f} tokens = "
                     f"~{max(plan['engine_tokens'], 0) / plan['row_tokens']:.0f} concurrent sequences of "
                     f"{plan['row_tokens']} tokens (this rank samples {plan['rows']} per step); the most the rollout "
                     f"phase leaves it: " + (f"--vllm-gpu-memory {plan['engine_max']:.2f}" if plan["gpu"] else
                                             f"--vllm-cpu-kv-gib {plan['engine_max']:.3g}"))
    if plan["gpu"]:
        lines.append(f"  host RAM of rank 0: load {plan['host_gib']['load']:.2f} GiB (the full fp32 state dict it "
                     f"reads and broadcasts), export {plan['host_gib']['export']:.2f} GiB (the weights in "
                     f"--save-dtype); other ranks ~0")
    lines.append(f"  checkpoint/ (sharded weights + AdamW) {plan['checkpoint_gib']:.2f} GiB; model/ export "
                 f"{plan['export_gib']:.2f} GiB")
    verdict = "fits" if plan["fits"] else "does not fit: " + (
        f"--{fix[0].replace('_', '-')} {fix[1]}" if fix else "no setting of the memory flags fits")
    lines.append(f"plan: peak {plan['peak_gib']:.2f} GiB per rank ({plan['peak_phase']}); {verdict}")
    return lines


def plan_model(name):
    """The model built on the meta device from its config alone (no weights, no memory), as the memory plan reads it;
    None when the config cannot be read without downloading (a hub id that is not cached, offline)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if name == "tiny":
        config = tiny_config("default", TINY_CONFIGS["default"]["tokenizer_vocab_size"])  # the vocabulary's bound
    else:
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=not os.path.isdir(name) and not hub_reachable())
        except (OSError, ValueError):
            return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan_prompt_tokens(args):
    """The longest prompt the plan assumes: --max-prompt-tokens (the bound the data is filtered by), or for the
    built-in tasks (countdown, arithmetic: train and eval) the longest of 1,000 of their prompts in the model's chat
    format."""
    specs = {args.dataset, *parse_dataset_list(args.eval_datasets)}
    if not specs <= set(GENERATED):
        return args.max_prompt_tokens
    problems = [p for spec in specs for p in GENERATED[spec](1000, args.seed, "test")]
    path = tiny_model_dir("default", build=False) if args.model == "tiny" else args.model
    if not os.path.isdir(path):  # not built or downloaded yet: at most one token per character
        return min(max(len(format_prompt(None, p)) for p in problems), args.max_prompt_tokens)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = max(len(tokenizer(format_prompt(tokenizer, p), add_special_tokens=False).input_ids) for p in problems)
    return min(tokens, args.max_prompt_tokens)


def check_plan(args, script):
    """The run's memory plan (infra.memory_plan) for its flags on this machine, or on --world-size ranks of
    --device-memory-gib GPUs. --dry-run prints it whole and exits (0: it fits, 2: it does not); otherwise rank 0 prints
    its summary, and a plan that does not fit stops the run here, in one line naming the flag to change."""
    rank = int(os.environ.get("RANK", "0"))
    model = plan_model(args.model)
    if model is None:
        require(not args.dry_run, f"--dry-run: no config.json for '{args.model}' here (offline and not cached): pass "
                                  "--model DIR, a local copy")
        if rank == 0:
            print(f"memory plan: skipped ('{args.model}' has no config.json here before its download)")
        return
    gpu = torch.cuda.is_available() or args.device_memory_gib > 0
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    # a GPU plan on auto assumes vLLM (README's GPU install); elsewhere, what the run would choose
    backend = "vllm" if gpu and args.rollout_backend == "auto" else choose_backend(args, model)[0]
    # the flags below are grpo.Args' (BaseArgs alone has none of them): a reference model for the KL or sps.py's
    # ratio score, and a no-grad pi_old pass (off-policy, or a method that needs pi_old's statistics first)
    reference = getattr(args, "kl_coef", 0) > 0 or getattr(args, "irl_score", None) == "ratio"
    updates = getattr(args, "ppo_epochs", 1) * getattr(args, "mini_batches", 1)
    old_pass = script in ("arm", "lp_reg", "thr") or updates > 1
    group_pass = ("irl" if script == "sps" and args.irl_every > 0 and args.irl_variant == "group" else
                  "thr" if script == "thr" else None)
    shape = model_shape(model)
    plan_args = replace(args, max_prompt_tokens=plan_prompt_tokens(args))

    def plan_of(a, world=world):
        return memory_plan(a, shape, world, gpu, device_budget(args.device_memory_gib, world, gpu), backend,
                           reference, old_pass, group_pass)
    plan = plan_of(plan_args)
    fix = plan_fix(plan_args, plan_of)
    lines = plan_lines(plan, fix)
    if args.dry_run:
        if rank == 0:
            print("\n".join(lines))
        sys.exit(0 if plan["fits"] else 2)
    if rank == 0:
        totals = ", ".join(f"{k} {v:.2f}" for k, v in plan["totals"].items())
        print(f"memory plan (GiB per rank of {plan['budget_gib']:.1f}): {totals}; the parts: `--dry-run`\n{lines[-1]}")
    require(plan["fits"], f"{lines[-1]} (of {HEADROOM * plan['budget_gib']:.1f} GiB usable; the parts: add "
                          f"--dry-run; --no-plan-check starts anyway)")
