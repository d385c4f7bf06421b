"""What a newcomer meets first: `--help` (grouped, fast: no transformers/datasets import before parsing), and the
mistakes and accidents of a first run, each of which ends in one line that names the fix: Ctrl-C, an empty or
malformed .jsonl, a full disk while saving, a hub id offline, a broken local model, a batch torchrun cannot split,
--steps 0. Every test runs the script as a user would (a subprocess) and reads the last line of stderr."""
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--prompts-per-step", "4", "--group-size", "4", "--eval-problems", "4", "--eval-samples", "2",
         "--max-new-tokens", "16"]


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run(args, timeout=300, **kw):
    kw.setdefault("env", env())
    return subprocess.run([sys.executable, "grpo.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


def last_line(text):
    return [line for line in text.strip().splitlines() if line.strip()][-1]


def error_line(out, code=2):
    """The one line a failed run ends with; no traceback before it."""
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return last_line(out.stderr)


def snapshot(run_dir):
    """{relative path: bytes} of every file in run_dir: what a failed run must leave as it was."""
    out = {}
    for d, _, names in os.walk(run_dir):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, run_dir)] = open(p, "rb").read()
    return out


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


# ---- --help ---------------------------------------------------------------------------------------------------

def test_help_is_grouped_with_one_default_per_flag_and_examples():
    out = subprocess.run([sys.executable, "grpo.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=env(COLUMNS="200"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for title in ["model and data:", "rollouts:", "the objective:", "the optimizer:", "evaluation:", "the run:",
                  "the engine", "examples:"]:
        assert title in text, title
    assert "(default: None)" not in text and "(default: )" not in text
    assert "python grpo.py --model Qwen/" in text and "SCRIPT" not in text
    for line in text.splitlines():
        assert line.count("(default:") <= 1, line
    sps = subprocess.run([sys.executable, "sps.py", "--help"], cwd=ROOT, capture_output=True, text=True, env=env())
    assert "sps's own flags:" in sps.stdout and "--irl-every" in sps.stdout.split("sps's own flags:")[1]


def test_every_shared_flag_has_a_group():
    import grpo
    from common import FLAG_GROUPS, BaseArgs
    from dataclasses import fields
    grouped = [name for names in FLAG_GROUPS.values() for name in names]
    assert len(grouped) == len(set(grouped))
    assert {f.name for f in fields(grpo.Args)} <= set(grouped)
    assert set(grouped) <= {f.name for f in fields(grpo.Args)}
    assert {f.name for f in fields(BaseArgs)} <= set(grouped)


def test_help_and_flag_errors_do_not_import_transformers():
    """--help costs torch's import only: transformers, datasets and math_verify load where they are used."""
    code = ("import sys, common; heavy = [m for m in ('transformers', 'datasets', 'math_verify', 'tokenizers', "
            "'huggingface_hub') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env())
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    bad = run(["--steps", "many"])
    assert bad.returncode == 2 and "invalid int value" in last_line(bad.stderr)


# ---- data -----------------------------------------------------------------------------------------------------

def test_empty_jsonl(tiny_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    line = error_line(run(["--dataset", str(tmp_path / "empty.jsonl"), "--run-dir", str(tmp_path / "r")]))
    assert line.startswith("error: ") and "empty.jsonl' is empty" in line and "one JSON object per line" in line


def test_malformed_jsonl_line_names_its_number(tiny_dir, tmp_path):
    rows = [json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1)}) for i in range(6)]
    rows.insert(6, '{"prompt": "7 + 1 =", answer: 8}')
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    line = error_line(run(["--dataset", str(tmp_path / "bad.jsonl"), "--run-dir", str(tmp_path / "r")]))
    assert "bad.jsonl' line 7 is not valid JSON" in line and "fix that line" in line


# ---- models ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offline", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "no-network"])  # port 9: nothing answers, as without a network
def test_hub_id_offline_fails_fast_and_names_hf_download(tmp_path, offline):
    """Fast because the hub is found unreachable once and nothing is retried (93 s of retries before; README gives
    the measured times: no wall-clock bound here, a loaded machine would fail it)."""
    line = error_line(run(["--model", "nobody-here/no-such-model", "--run-dir", str(tmp_path / "r")],
                          env=env(HF_HOME=str(tmp_path / "hf"), **offline)))
    assert "could not load model 'nobody-here/no-such-model' (the hub is unreachable" in line
    assert "`hf download nobody-here/no-such-model --local-dir DIR`" in line
    assert "huggingface-cli" not in line


def test_the_hub_is_found_unreachable_without_retrying(monkeypatch):
    """What makes both offline paths fast: one connection attempt (or HF_HUB_OFFLINE), then the libraries' offline
    mode, instead of their retries."""
    from tasks import hub_reachable
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # port 9: nothing answers
    assert hub_reachable() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False


def test_hub_dataset_offline_fails_fast(tiny_dir, tmp_path):
    line = error_line(run(["--dataset", "nobody-here/no-such-data", "--run-dir", str(tmp_path / "r")],
                          env=env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")))
    assert "`hf download --repo-type dataset nobody-here/no-such-data --local-dir DIR`" in line


def test_broken_local_model_directory(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2", ')
    line = error_line(run(["--model", str(model), "--run-dir", str(tmp_path / "r")]))
    assert "could not load the local model directory" in line and "config.json" in line
    assert "download" not in line


# ---- the launch -----------------------------------------------------------------------------------------------

def test_torchrun_batch_that_does_not_split_is_said_once(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "grpo.py", "--prompts-per-step", "3", "--run-dir", str(tmp_path / "r")], cwd=ROOT,
                         capture_output=True, text=True, env=env(), timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert text.count("--prompts-per-step (3) must divide by the number of processes (2)") == 1, text
    ours = text.split("Traceback")[0]  # before torchrun's own report of the failed ranks (it always prints one)
    assert "--prompts-per-step (3) must divide" in ours and "raise " not in ours, text
    assert not os.path.exists(tmp_path / "r")  # stopped before any work


def test_mini_batches_that_do_not_divide_the_rows_are_refused_with_the_count():
    """rows.chunk(k) gives fewer than k chunks when k does not divide the rows (9 rows, k = 2 -> 5 + 4 but k = 4 ->
    3 + 3 + 3): fewer updates than asked, each scaled for k. The flags are refused instead."""
    from grpo import Args
    from tasks import UserError
    with pytest.raises(UserError, match="--mini-batches 4 must divide each rank's 9 completions"):
        Args(prompts_per_step=3, group_size=3, mini_batches=4)
    assert Args(prompts_per_step=4, group_size=4, mini_batches=4).mini_batches == 4


def test_eval_datasets_default_to_a_built_in_training_task():
    from grpo import Args
    assert Args(dataset="arithmetic").eval_datasets == "arithmetic"
    assert Args().eval_datasets == "countdown"
    assert Args(dataset="gsm8k").eval_datasets == "countdown"  # not a built-in task: its splits are unknown here
    assert Args(dataset="arithmetic", eval_datasets="gsm8k").eval_datasets == "gsm8k"


def test_steps_0_lists_only_what_it_wrote(tiny_dir, tmp_path):
    out = run(["--steps", "0", *SMALL, "--run-dir", str(tmp_path / "r")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--steps 0: the initial model is evaluated and nothing is trained or saved" in out.stdout
    assert last_line(out.stdout) == f"run directory: {tmp_path / 'r'}  (metrics.jsonl, samples.jsonl)"
    assert sorted(os.listdir(tmp_path / "r")) == ["config.json", "metrics.jsonl", "samples.jsonl"]


# ---- a run stopped midway -------------------------------------------------------------------------------------

def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tiny_dir, tmp_path):
    run_dir = str(tmp_path / "r")
    args = ["--steps", "200", *SMALL, "--eval-every", "0", "--save-every", "1", "--run-dir", run_dir]
    # a foreground job's Ctrl-C: a test session started in the background by a shell without job control
    # (`( pytest & )`, some CI runners) has SIGINT ignored, and a child inherits that (Python then never raises
    # KeyboardInterrupt): restore the default in the child
    proc = subprocess.Popen([sys.executable, "grpo.py", *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        ckpt = os.path.join(run_dir, "checkpoint", "trainer_state.json")
        while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert os.path.exists(ckpt), "no checkpoint appeared"
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    line = error_line(out, code=130)
    step = json.load(open(os.path.join(run_dir, "checkpoint", "trainer_state.json")))["step"]
    assert line.startswith(f"interrupted (Ctrl-C): checkpoint/ holds step {step}; continue from it with: python "
                           f"grpo.py "), line
    command = shlex.split(line.split("continue from it with: ")[1])
    assert command[-3:] == ["--resume", "--run-dir", run_dir] and command.count("--run-dir") == 1
    assert "--steps" in command and command[command.index("--steps") + 1] == "200"


def test_resume_shows_the_last_held_out_pass1(tiny_dir, tmp_path):
    run_dir = str(tmp_path / "r")
    first = run(["--steps", "1", *SMALL, "--eval-every", "1", "--run-dir", run_dir])
    assert first.returncode == 0, first.stderr[-3000:]
    held = metrics(run_dir)[-1]["eval/pass@1"]
    again = run(["--steps", "3", *SMALL, "--eval-every", "0", "--resume", "--run-dir", run_dir])
    assert again.returncode == 0, again.stderr[-3000:]
    bars = again.stderr.split("grpo:")
    step2 = next(b for b in bars if "2/3" in b and "pass1=" in b)  # step 2 does not evaluate: the held value shows
    assert f"pass1={held:.3f}" in step2, step2


@pytest.mark.parametrize("limit_mib, what", [
    (6, "the checkpoint"),  # model/ of the tiny model (3.5 MB in fp32) fits, checkpoint/'s shard (10.5 MB) does not
    (1, "the model export"),  # model/ is written first, and fails
])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_dir, tmp_path, limit_mib, what):
    """A file-size limit makes every write past it fail with EFBIG, as a full disk fails with ENOSPC: the export or
    the checkpoint of step 2 cannot be written, and the checkpoint of step 1 stays as it was."""
    run_dir = str(tmp_path / "r")
    first = run(["--steps", "1", *SMALL, "--eval-every", "0", "--run-dir", run_dir])
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(os.path.join(run_dir, "checkpoint"))
    lines = open(os.path.join(run_dir, "metrics.jsonl")).read()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_mib << 20, limit_mib << 20))
    out = run(["--steps", "2", *SMALL, "--eval-every", "0", "--resume", "--run-dir", run_dir], preexec_fn=small_files)
    line = error_line(out)
    assert line.startswith(f"error: could not write {what} of step 2 to "), line
    assert "is the disk full?" in line and "the previous checkpoint (step 1) is intact and --resume continues from " \
                                          "it: python grpo.py --steps 2" in line, line
    assert snapshot(os.path.join(run_dir, "checkpoint")) == before
    assert open(os.path.join(run_dir, "metrics.jsonl")).read().startswith(lines)
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.tmp"))
    assert not os.path.exists(os.path.join(run_dir, "model.tmp"))


def test_eval_help_names_its_subcommands_and_why_n_is_64():
    out = subprocess.run([sys.executable, "eval.py", "--help"], cwd=ROOT, capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    assert "eval.py compare RUN..." in out.stdout and "eval.py golds DATASET..." in out.stdout
    assert "not training's --eval-samples 16" in out.stdout and "(default: None)" not in out.stdout


def test_a_stale_engine_stops_before_the_update_with_the_steps_metric_line(tmp_path, monkeypatch, capsys):
    """push_weights' check raises StaleEngine inside a step's rollout, before its update: main() ends the run with one
    line and writes that step's metric line with the reason (the earlier lines untouched)."""
    import json
    import common
    from infra import log_jsonl
    run_dir = tmp_path / "r"

    def train(args):  # steps 0 and 1 logged, then step 2's rollout finds the engine stale
        os.makedirs(args.run_dir)
        for step in (0, 1):
            log_jsonl(args.run_dir, "metrics.jsonl", {"step": step, "reward/mean": 0.5})
        raise common.StaleEngine("the vLLM engine does not hold the pushed training weights (3 of 13 tensors differ)")
    monkeypatch.setattr(sys, "argv", ["grpo.py", "--run-dir", str(run_dir)])
    with pytest.raises(SystemExit) as stop:
        common.main(train, common.BaseArgs)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the vLLM engine does not hold") and "\n" not in err
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert rows[:2] == [{"step": 0, "reward/mean": 0.5}, {"step": 1, "reward/mean": 0.5}]
    assert rows[2] == {"step": 2, "stopped": err[len("error: "):]}
