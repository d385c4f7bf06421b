"""Crash safety: runs SIGKILLed at every phase of a step and every stage of checkpoint writing (the test-only hook
$EXPLORE_RLVR_FAULT makes the process kill itself there), resumed each time, end with the weights and metric lines of
a run never interrupted; partial files are ignored; --resume refuses changed experiment flags; non-finite updates are
skipped, counted, and stop the run when too many come in a row."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from test_grpo_script import metrics, run, weights

from common import UserError, parse_args, recover_checkpoint, start_run, truncate_metrics

TINY = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "16", "--eval-problems", "4",
        "--eval-samples", "2", "--lr", "1e-3", "--eval-every", "2"]
VARIES = ("time/", "tokens_per_s/", "memory/")  # wall-clock and memory fields differ between any two runs


def same_lines(a, b):
    """metrics.jsonl rows equal line for line, every field exactly, except the time/*, tokens_per_s/* and
    memory/peak_gib measurements."""
    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(VARIES)} for r in rows]
    return strip(metrics(a)) == strip(metrics(b))


def newest_complete(run_dir):
    """Step of the newest directory with a trainer_state.json (the completion marker), read independently."""
    if not os.path.isdir(run_dir):
        return None
    steps = [json.load(open(os.path.join(run_dir, d, "trainer_state.json")))["step"] for d in os.listdir(run_dir)
             if os.path.exists(os.path.join(run_dir, d, "trainer_state.json"))]
    return max(steps, default=None)


# (stage, step) of each kill, and the newest complete checkpoint it leaves. --save-every 1: a checkpoint per step;
# --export-every 2: model/ at steps 2, 4 and 6, each written before that step's checkpoint.
KILLS = [("rollout", 1, None), ("checkpoint-partial", 1, None), ("tmp-written", 1, 1), ("update", 2, 1),
         ("metrics", 2, 1), ("before-rename-old", 2, 2), ("between-renames", 3, 3), ("after-rename", 4, 4),
         ("export-between-renames", 6, 5), ("rollout", 6, 5)]


def test_killed_at_every_stage_and_resumed_matches_the_uninterrupted_run(tiny_dir, tmp_path):
    common = ["--model", tiny_dir, "--steps", "6", "--save-every", "1", "--export-every", "2"] + TINY
    run(common + ["--run-dir", tmp_path / "full"])
    cut = tmp_path / "cut"
    for stage, step, left in KILLS:  # --resume alone must find a checkpoint; --resume auto starts fresh without one
        mode = ["--resume"] if newest_complete(cut) is not None else ["--resume", "auto"]
        p = run(common + ["--run-dir", cut] + mode, check=False, env={"EXPLORE_RLVR_FAULT": f"{stage}:{step}"})
        assert p.returncode == -9, (stage, step, p.stderr[-2000:])  # the kill landed
        assert newest_complete(cut) == left, (stage, step)
        if stage == "export-between-renames":  # model/ (step 4's) renamed away, step 6's not yet in: none, not half
            assert sorted(os.listdir(cut)) == ["checkpoint", "config.json", "metrics.jsonl", "model.old", "model.tmp",
                                               "samples.jsonl"]
    run(common + ["--run-dir", cut, "--resume", "--save-every", "3"])  # a flag that does not change the experiment
    wa, wb = weights(tmp_path / "full"), weights(cut)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["step"] for r in metrics(cut)] == list(range(7)) and same_lines(tmp_path / "full", cut)
    print(f"kills survived: {len(KILLS)}/{len(KILLS)}")
    resumes = json.load(open(cut / "config.json"))["resumes"]
    assert [r["step"] for r in resumes] == [left or 0 for _, _, left in KILLS]  # each began at the newest checkpoint
    assert resumes[-1]["changed"] == {"save_every": [1, 3]}
    assert sorted(os.listdir(cut)) == ["checkpoint", "config.json", "metrics.jsonl", "model", "samples.jsonl"]
    samples = [json.loads(line)["step"] for line in open(cut / "samples.jsonl")]
    assert samples == [json.loads(line)["step"] for line in open(tmp_path / "full" / "samples.jsonl")]


def test_torchrun_one_rank_killed_then_resumed_matches_the_uninterrupted_run(tiny_dir, tmp_path):
    common = ["--model", tiny_dir, "--steps", "2", "--save-every", "1"] + TINY
    run(common + ["--run-dir", tmp_path / "full"], torchrun=2)
    p = run(common + ["--run-dir", tmp_path / "cut"], torchrun=2, check=False,
            env={"EXPLORE_RLVR_FAULT": "rollout:2@1"})  # rank 1 dies mid-step; torchrun tears the group down
    assert p.returncode != 0 and newest_complete(tmp_path / "cut") == 1, p.stderr[-2000:]
    run(common + ["--run-dir", tmp_path / "cut", "--resume"], torchrun=2)
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert same_lines(tmp_path / "full", tmp_path / "cut")


def fake_checkpoint(path, step, complete=True):
    os.makedirs(path / "train_state")
    (path / "train_state" / ".metadata").write_text(str(step))  # DCP's index file, holding the step as a marker
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))


@pytest.mark.parametrize("present, expect", [
    ({"checkpoint.old": 2}, 2),  # killed between the two renames, checkpoint.tmp partial: only the old one is left
    ({"checkpoint.old": 2, "checkpoint.tmp": 4}, 4),  # killed between the renames: checkpoint.tmp is complete
    ({"checkpoint": 2, "checkpoint.tmp": None}, 2),  # a stale, partial checkpoint.tmp
    ({"checkpoint": 4, "checkpoint.old": 2}, 4),  # killed before checkpoint.old was deleted
    ({"checkpoint": None, "checkpoint.tmp": 4, "checkpoint.old": 2}, 4),
    ({"checkpoint.tmp": None}, None),
])
def test_recovery_keeps_the_newest_complete_checkpoint(tmp_path, capsys, present, expect):
    for name, step in present.items():
        fake_checkpoint(tmp_path / name, step or 9, complete=step is not None)
    assert recover_checkpoint(str(tmp_path)) == expect
    assert sorted(os.listdir(tmp_path)) == (["checkpoint"] if expect else [])
    if expect:
        assert (tmp_path / "checkpoint" / "train_state" / ".metadata").read_text() == str(expect)
    out = capsys.readouterr().out
    assert ("partial checkpoint" in out) == (None in present.values()), out
    assert all(len(line) < 200 for line in out.splitlines())  # one-line notices


def test_truncation_drops_later_steps_and_a_partial_last_line(tmp_path, capsys):
    rows = [{"step": s, "reward/mean": s / 10} for s in range(5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "rew')
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 2, 4)))
    truncate_metrics(str(tmp_path), 3)
    assert metrics(tmp_path) == rows[:4]
    assert [json.loads(line)["step"] for line in open(tmp_path / "samples.jsonl")] == [0, 2]
    assert "partial last line" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "samples.jsonl"]  # the temporary file was renamed


def test_resume_needs_a_checkpoint_unless_auto_and_refuses_changed_experiment_flags(tmp_path):
    import grpo

    def start(script="grpo", *flags):
        return start_run(parse_args(grpo.Args, ["--run-dir", str(tmp_path / "r")] + list(flags)), script, 0)
    with pytest.raises(UserError, match="holds no complete checkpoint: pass --resume auto"):
        start("grpo", "--resume")
    start("grpo", "--lr", "1e-3", "--group-size", "4")  # a fresh run's config.json
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 0}\n')
    fake_checkpoint(tmp_path / "r" / "checkpoint", 3)
    before = (tmp_path / "r" / "config.json").read_text()
    with pytest.raises(UserError) as e:
        start("grpo", "--resume", "--lr", "2e-3", "--group-size", "8", "--seed", "1", "--clip-high", "0.28",
              "--steps", "5", "--eval-every", "1")
    message = str(e.value)
    assert "\n" not in message and "--steps" not in message and "--eval-every" not in message  # those may change
    for diff in ("--lr: 0.001 -> 0.002", "--group-size: 4 -> 8", "--seed: 0 -> 1", "--clip-high: 0.2 -> 0.28"):
        assert diff in message, message
    with pytest.raises(UserError, match='script: "grpo" -> "sps"'):
        start("sps", "--resume", "--lr", "1e-3", "--group-size", "4")
    assert (tmp_path / "r" / "config.json").read_text() == before  # a refused resume changes nothing
    start("grpo", "--resume", "--lr", "1e-3", "--group-size", "4", "--steps", "7")
    config = json.load(open(tmp_path / "r" / "config.json"))
    assert config["steps"] == 7 and config["resumes"][0]["step"] == 3
    assert config["resumes"][0]["changed"] == {"steps": [100, 7]}  # the original value is kept there


def train_with_inf_loss(flags, inf_steps):
    """grpo.train in this process with the loss multiplied by inf on the steps (1-based) `inf_steps`. No script holds a
    test hook, so the test patches one in: set_lr tells which step runs, aggregate_loss returns the poisoned loss."""
    import grpo
    real_set_lr, real_aggregate_loss, now = grpo.set_lr, grpo.aggregate_loss, {}

    def set_lr(optimizer, args, step):
        now["step"] = step + 1
        return real_set_lr(optimizer, args, step)

    def aggregate_loss(*args):
        return real_aggregate_loss(*args) * (math.inf if now["step"] in inf_steps else 1.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo, "set_lr", set_lr)
        patch.setattr(grpo, "aggregate_loss", aggregate_loss)
        grpo.train(parse_args(grpo.Args, [str(f) for f in flags]))


def test_a_non_finite_update_is_skipped_counted_and_restored_on_resume(tiny_dir, tmp_path):
    base = ["--model", tiny_dir, "--save-every", "1", "--run-dir", tmp_path / "r", "--entropy-coef", "0.1"] + TINY
    train_with_inf_loss(base + ["--steps", "1"], inf_steps={1})  # the loss x inf on step 1
    w0, w1 = load_file(os.path.join(tiny_dir, "model.safetensors")), weights(tmp_path / "r")
    run(base + ["--steps", "2", "--resume"])  # skipped_steps comes back from the checkpoint
    w2, rows = weights(tmp_path / "r"), metrics(tmp_path / "r")
    assert [r["skipped_steps"] for r in rows[1:]] == [1, 1]
    assert all(torch.equal(w0[k], w1[k]) for k in w1)  # step 1 was not applied
    assert not any(torch.equal(w1[k], w2[k]) for k in w1)  # step 2 trained (the entropy term gives a gradient)
    assert not torch.isfinite(torch.tensor(rows[1]["grad_norm"])) and 0 < rows[2]["grad_norm"] < float("inf")
    assert json.load(open(tmp_path / "r" / "checkpoint" / "trainer_state.json")) == {
        "step": 2, "skipped_steps": 1, "skip_streak": 0, "optimizer_state": True}


def test_consecutive_non_finite_updates_stop_the_run(tiny_dir, tmp_path):
    flags = ["--model", tiny_dir, "--steps", "4", "--max-skipped-steps", "2", "--run-dir", tmp_path / "r"] + TINY
    with pytest.raises(UserError, match="2 updates in a row had a non-finite loss or gradient") as stop:
        train_with_inf_loss(flags, inf_steps={2, 3})
    assert "--max-skipped-steps" in str(stop.value) and "\n" not in str(stop.value)  # main() prints it as one line
    assert [r["step"] for r in metrics(tmp_path / "r")] == [0, 1, 2]  # stopped during step 3, before training on it


def test_count_skip():
    from common import count_skip
    assert count_skip(1.0, 3, 2, 5) == (3, 0) and count_skip(float("nan"), 3, 2, 5) == (4, 3)
    assert count_skip(float("inf"), 0, 9, 0) == (1, 10)  # 0: never stop
    with pytest.raises(UserError, match="5 updates in a row"):
        count_skip(float("nan"), 7, 4, 5)
