"""eval.py as a user runs it: compare on synthetic runs (hand-computed table), evaluation of a real short run
reproducing its logged final eval, and one-line errors."""
import json
import os

import numpy as np
import pytest

from test_grpo_script import SMALL, metrics, run

FIGURES = ["reward.png", "entropy.png", "pass1.png", "passk.png", "distinct.png"]


def fake_run(path, final, steps=4, finished=True, solved=((), (), ())):
    """A run directory: metrics.jsonl with steps 0..steps (evals at 0, 2 and `steps`), config.json, trainer_state.json.
    `final`: the eval metrics of the last step (pass@1, pass@8, pass@16, greedy, entropy, distinct_correct);
    `solved`: the indices of the 10 held-out problems solved at each of the three evals."""
    os.makedirs(path / "checkpoint")
    base = {"eval/pass@1": 0.1, "eval/pass@2": 0.2, "eval/pass@4": 0.3, "eval/pass@8": 0.5, "eval/pass@16": 0.8,
            "eval/avg@16": 0.1, "eval/greedy": 0.1, "eval/entropy": 1.0, "eval/distinct_correct": 2.0}
    rows = [{"step": 0, **base, "eval/countdown/problems": 10, "eval/countdown/solved": list(solved[0])}]
    for s in range(1, steps + 1):
        row = {"step": s, "reward/mean": 0.1 * s, "entropy/mean": 1.0 - 0.1 * s}
        if s == 2:
            row.update(base, **{"eval/countdown/problems": 10, "eval/countdown/solved": list(solved[1])})
        if s == steps:
            row.update({**base, "eval/pass@2": final["pass@1"], "eval/pass@4": final["pass@8"],
                        "eval/avg@16": final["pass@1"],
                        **{f"eval/{k}": v for k, v in final.items()}, "eval/countdown/problems": 10,
                        "eval/countdown/solved": list(solved[2])})
        rows.append(row)
    with open(path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    json.dump({"script": "grpo", "steps": steps, "seed": int(str(path).rsplit("-s", 1)[1])},
              open(path / "config.json", "w"))
    if finished:
        json.dump({"step": steps}, open(path / "checkpoint" / "trainer_state.json", "w"))


def final(p1, p8, p16, greedy, entropy, distinct):
    return {"pass@1": p1, "pass@8": p8, "pass@16": p16, "greedy": greedy, "entropy": entropy,
            "distinct_correct": distinct}


def test_compare_writes_figures_and_mean_std_table(tmp_path):
    fake_run(tmp_path / "a-s0", final(0.2, 0.5, 0.6, 0.3, 0.5, 1.0), solved=([0, 1], [1], [2]))
    fake_run(tmp_path / "a-s1", final(0.4, 0.7, 0.9, 0.5, 0.7, 3.0), solved=([0], [0, 4], [4]))
    fake_run(tmp_path / "b-s0", final(0.3, 0.6, 0.7, 0.2, 0.2, 2.0), solved=([0, 1], [], [3, 1]))
    fake_run(tmp_path / "b-s1", final(0.3, 0.6, 0.7, 0.4, 0.4, 2.0), solved=([0], [], []))
    # running: skipped
    fake_run(tmp_path / "b-s2", final(0.9, 0.9, 0.9, 0.9, 0.9, 9.0), finished=False, solved=([5, 6, 7, 8, 9], [], []))
    out = tmp_path / "figs"
    p = run(["compare"] + [tmp_path / n for n in ("a-s0", "a-s1", "b-s0", "b-s1", "b-s2")] + ["--out", out, "--labels",
                                                                                              "A,B"],
            script="eval.py")
    assert "skipping" in p.stderr and "b-s2" in p.stderr
    import matplotlib.image
    for name in FIGURES:
        assert open(out / name, "rb").read(8) == b"\x89PNG\r\n\x1a\n", name
        h, w = matplotlib.image.imread(out / name).shape[:2]
        assert (w, h) == (500, 350), (name, w, h)
    table = open(out / "compare.md").read()
    assert table in p.stdout
    # sample std of two seeds x, y is |x - y| / sqrt(2): A's pass@1 0.2, 0.4 -> 0.3 +- 0.141; B's greedy 0.2, 0.4
    # likewise
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| A ") or line.startswith("| B ")}
    assert rows["A"] == ["2", "4", "0.300 ± 0.141", "0.600 ± 0.141", "0.750 ± 0.212",
                         "0.400 ± 0.141", "0.600 ± 0.141", "2.000 ± 1.414"]
    assert rows["B"] == ["2", "4", "0.300 ± 0.000", "0.600 ± 0.000", "0.700 ± 0.000",
                         "0.300 ± 0.141", "0.300 ± 0.141", "2.000 ± 0.000"]
    assert "pass@8" in table and "pass@16" in table
    # U2 per seed: seed 0 solved {0, 1, 2, 3} of 10, seed 1 {0, 4} -> mean 0.3 (the unfinished b-s2 is excluded)
    assert "U1 (base pass@16) = 0.800" in table and "averaged over seeds) = 0.300" in table


def test_upper_bounds_u1_u2_u3_hand_worked():
    from eval import saturation, upper_bounds
    # U3: gains per doubling 0.2, 0.1, 0.05, ... (a geometric approach) -> the curve saturates at 0.9
    assert saturation([0.5, 0.7, 0.8]) == pytest.approx(0.9)
    assert saturation([0.5, 0.6, 0.7]) == 1.0 and saturation([0.5, 0.6, 0.6]) == 0.6 and saturation([0.3, 0.4]) == 0.4
    # one sps.py run, 4 held-out problems: the step-0 eval solves problem 0, the step-2 eval problem 1
    rows = [{"step": 0, "eval/pass@1": 0.2, "eval/pass@2": 0.3, "eval/pass@4": 0.35, "eval/countdown/problems": 4,
             "eval/countdown/solved": [0]}, {"step": 1, "reward/mean": 0.5},
            {"step": 2, "eval/pass@1": 0.5, "eval/pass@2": 0.7, "eval/pass@4": 0.8, "eval/countdown/problems": 4,
             "eval/countdown/solved": [1]}]
    sps = {"script": "sps", "seed": 0}
    # after the step-0 eval: U1 = its pass@4; U2 = 1 of 4 solved; U3 = 0.35 + 0.05 * 0.5 / (1 - 0.5) = 0.4
    assert upper_bounds([(sps, rows[:1])], 4) == pytest.approx((0.35, 0.25, 0.4))
    # at the end: U1 stays the step-0 eval's; U2 is the union {0, 1} of 4; U3 from the final pass@k 0.5, 0.7, 0.8
    assert upper_bounds([(sps, rows)], 4) == pytest.approx((0.35, 0.5, 0.9))
    # a GRPO run on the same seed (same problems) adds problem 3 to the union and its base pass@4 0.25 to U1, not U3;
    # a seed-1 run has its own problems: U2 averages the seeds' coverages (3/4 and 2/4)
    grpo = [{"step": 0, "eval/pass@4": 0.25, "eval/countdown/problems": 4, "eval/countdown/solved": [3]}]
    other = [{"step": 0, "eval/pass@4": 0.6, "eval/countdown/problems": 4, "eval/countdown/solved": [0, 1]}]
    assert upper_bounds([(sps, rows), ({"script": "grpo", "seed": 0}, grpo), ({"script": "grpo", "seed": 1}, other)],
                        4) == pytest.approx(((0.35 + 0.25 + 0.6) / 3, (0.75 + 0.5) / 2, 0.9))
    assert all(np.isnan(u) for u in upper_bounds([({"script": "grpo"}, [{"step": 1}])], 4))  # nothing to bound with


def test_evaluating_a_run_reproduces_its_final_eval(tiny_dir, tmp_path):
    run_dir, out = tmp_path / "r-s0", tmp_path / "out"
    run(["--model", tiny_dir, "--run-dir", run_dir, "--steps", "2"] + SMALL[2:] + ["--eval-problems", "20", "--lr",
                                                                                   "1e-4"])
    logged = metrics(run_dir)[-1]
    # some correct samples: the equality is not vacuous
    assert logged["step"] == 2 and logged["eval/countdown/pass@4"] > 0
    p = run([run_dir, "--n", "4", "--problems", "20", "--datasets", "countdown", "--out", out], script="eval.py")
    result = json.load(open(out / "eval.json"))["results"]
    # from config.json
    assert len(result) == 1 and result[0]["dataset"] == "countdown" and result[0]["max_new_tokens"] == 20
    m = result[0]
    for k in ("pass@1", "pass@2", "pass@4", "avg@4", "greedy", "distinct_correct"):
        assert m[k] == logged[f"eval/countdown/{k}"], k  # same code, same sampling keys: equal, not just close
    assert m["entropy"] == pytest.approx(logged["eval/countdown/entropy"], rel=1e-5)
    passk = [m[f"pass@{k}"] for k in (1, 2, 4)]
    assert passk == sorted(passk) and np.isclose(m["avg@4"], m["pass@1"])
    assert open(out / "eval.md").read().strip() in p.stdout and "| countdown |" in p.stdout


def test_golds_table_and_dataset_names_in_the_eval_table(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": "q1", "answer": "3 * 6 = <<3*6=18>>18\n#### 18"},
            {"question": "q2", "answer": "x\n#### 1,000"}]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run(["golds", f"gsm8k={tmp_path / 'gsm8k'}"], script="eval.py")
    assert "| gsm8k | eval | 2 | 2 of 2 | 1.0000 | 1.0000 (0 below 1) | 0.0000 |" in p.stdout, p.stdout
    p = run(["tiny", "--datasets", "held=countdown", "--n", "2", "--problems", "2", "--out", tmp_path / "out"],
            script="eval.py")
    assert json.load(open(tmp_path / "out" / "eval.json"))["results"][0]["dataset"] == "held" and "| held |" in p.stdout


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/no-such-run"], "is not a run directory"),
    (["{tmp}/empty"], "is not a run directory"),
    (["{tmp}/unexported"], "has no model/ yet (the weights are exported at the end of the run and every"),
    (["tiny", "--datasets", "no-such-dataset"], "unknown dataset 'no-such-dataset'"),
    (["compare", "{tmp}/empty"], "has no metrics.jsonl"),
    (["tiny", "--datasets", "{tmp}/a/t.jsonl,{tmp}/b/t.jsonl"], "two datasets are named 't'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, message):
    os.makedirs(tmp_path / "empty")
    os.makedirs(tmp_path / "unexported" / "checkpoint")  # a run stopped before its end: checkpoint/, no model/
    (tmp_path / "unexported" / "metrics.jsonl").write_text('{"step": 0}\n')
    p = run([a.replace("{tmp}", str(tmp_path)) for a in argv], script="eval.py", check=False,
            env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.startswith("error: ") and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
