"""--report-to: TensorBoard event files and offline wandb runs hold metrics.jsonl's numbers; dataset names (NAME=PATH,
PRESET=PATH) in metric keys and samples.jsonl; one-line errors for a missing package or a bad value."""
import glob
import json
import os
import sys

import datasets
import pytest

import common
import infra
from test_grpo_script import metrics, run

TINY = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "16", "--eval-problems",
        "4",
        "--eval-samples", "2", "--eval-every", "1"]


def has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


needs_tb = pytest.mark.skipif(not has("tensorboard"), reason="tensorboard not installed (pip install tensorboard)")
needs_wandb = pytest.mark.skipif(not has("wandb"),
                                 reason="wandb not installed (pip install -r tests/requirements-extra.txt)")


def tensorboard_scalars(run_dir):
    """{tag: {step: value}} read back with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}, acc


@needs_tb
def test_tensorboard_events_equal_metrics_jsonl(tmp_path):
    run_dir = tmp_path / "r"
    common.start_tracking("tensorboard", str(run_dir), {"script": "grpo", "lr": 0.001})
    os.makedirs(run_dir)
    records = [{"step": 0, "eval/pass@1": 0.25, "eval/cd/solved": [1, 3], "eval/cd/problems": 4},
               {"step": 1, "reward/mean": 0.5, "lr": 1e-3, "note": "text"}, {"step": 2, "reward/mean": 0.75}]
    for r in records:
        common.log_jsonl(str(run_dir), "metrics.jsonl", r)
    common.close_tracking()
    scalars, acc = tensorboard_scalars(run_dir)
    assert scalars == {"eval/pass@1": {0: 0.25}, "eval/cd/problems": {0: 4.0}, "reward/mean": {1: 0.5, 2: 0.75},
                       "lr": {1: pytest.approx(1e-3)}}  # numbers only: lists and strings are skipped
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| lr | 0.001 |" in text and "| script | grpo |" in text
    common.log_jsonl(str(run_dir), "metrics.jsonl", {"step": 3, "reward/mean": 1.0})  # closed: metrics.jsonl only
    assert len(metrics(run_dir)) == 4 and tensorboard_scalars(run_dir)[0]["reward/mean"] == {1: 0.5, 2: 0.75}


def gsm8k_copy(root):
    """A local GSM8K copy in the layout `hf download --repo-type dataset openai/gsm8k --local-dir root` writes."""
    os.makedirs(root / "main")
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(1, 4)]
    for split in ("train", "test"):
        datasets.Dataset.from_list(rows).to_parquet(str(root / "main" / f"{split}-00000-of-00001.parquet"))
    return str(root)


@needs_tb
@needs_wandb
def test_grpo_reports_to_tensorboard_and_wandb_with_dataset_names(tiny_dir, tmp_path):
    run_dir, data = tmp_path / "r", gsm8k_copy(tmp_path / "gsm8k")
    run(["--model", tiny_dir, "--run-dir", run_dir, "--report-to", "tensorboard,wandb",
         "--eval-datasets", f"countdown,heldout=countdown,gsm8k={data}"] + TINY, env={"WANDB_MODE": "offline"})
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for name in ("countdown", "heldout", "gsm8k"):
        assert f"eval/{name}/pass@1" in rows[0] and f"eval/{name}/greedy" in rows[-1]
    assert rows[0]["eval/gsm8k/problems"] == 3 and not any("/" in k[5:-7] for k in rows[0] if k.endswith("/pass@1"))
    samples = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    assert {s["dataset"] for s in samples} == {"countdown", "heldout", "gsm8k"}
    scalars, acc = tensorboard_scalars(run_dir)
    numeric = {(k, r["step"]): v for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert {(k, s) for k in scalars for s in scalars[k]} == set(numeric)
    for (k, s), v in numeric.items():
        assert scalars[k][s] == pytest.approx(v, rel=1e-6, abs=1e-12), k  # TensorBoard stores float32
    assert "| group_size | 4 |" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    offline = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(offline) == 1 and glob.glob(os.path.join(offline[0], "run-*.wandb"))
    config = json.load(open(run_dir / "config.json"))
    assert config["report_to"] == "tensorboard,wandb"


@pytest.mark.parametrize("script", ["grpo", "sps", "arm", "lp_reg", "thr"])
def test_every_script_takes_report_to(script, capsys):
    Args = __import__(script).Args
    assert common.parse_args(Args, ["--report-to", "tensorboard,wandb"]).report_to == "tensorboard,wandb"
    assert common.parse_args(Args, []).report_to == "none"
    with pytest.raises(SystemExit) as e:
        common.parse_args(Args, ["--report-to", "tensorbord"])
    assert e.value.code == 2 and "--report-to must be none, tensorboard, wandb" in capsys.readouterr().err


def test_missing_package_is_a_one_line_error(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(common.UserError, match=r"--report-to wandb needs the wandb package: pip install wandb"):
        common.start_tracking("none,wandb", str(tmp_path), {})
    common.start_tracking("none", str(tmp_path), {})  # nothing to import
    # the script, where `import wandb` fails: one line, exit 2, before any model is loaded
    os.makedirs(tmp_path / "shadow")
    (tmp_path / "shadow" / "wandb.py").write_text("raise ImportError('no wandb here')\n")
    p = run(["--model", tiny_dir, "--run-dir", tmp_path / "r", "--report-to", "wandb"] + TINY, check=False,
            env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --report-to wandb needs the wandb package: pip install wandb"], p.stderr[-2000:]


@needs_tb
def test_tensorboard_after_resume_drops_the_events_past_the_checkpoint(tmp_path):
    run_dir = str(tmp_path)
    common.start_tracking("tensorboard", run_dir, {})
    for step in range(4):
        common.log_jsonl(run_dir, "metrics.jsonl", {"step": step, "reward/mean": float(step)})
    common.close_tracking()
    common.start_tracking("tensorboard", run_dir, {})  # resumed from the step-1 checkpoint: step 2 comes next
    common.log_jsonl(run_dir, "metrics.jsonl", {"step": 2, "reward/mean": 20.0})
    common.close_tracking()
    assert tensorboard_scalars(run_dir)[0]["reward/mean"] == {0: 0.0, 1: 1.0, 2: 20.0}


@needs_tb
def test_trackers_are_closed_when_a_run_fails(tmp_path, monkeypatch, capsys):
    def train(args):
        run_dir = common.start_run(args, "failing", 0)
        common.log_jsonl(run_dir, "metrics.jsonl", {"step": 0, "reward/mean": 0.5})
        raise common.UserError("boom")
    monkeypatch.setattr(sys, "argv", ["x", "--run-dir", str(tmp_path / "r"), "--report-to", "tensorboard"])
    with pytest.raises(SystemExit) as e:
        common.main(train, common.BaseArgs)
    assert e.value.code == 2 and capsys.readouterr().err == "error: boom\n" and not infra._TRACKING
    assert tensorboard_scalars(tmp_path / "r")[0] == {"reward/mean": {0: 0.5}}  # flushed by the close
