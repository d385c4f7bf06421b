"""Reading aids the repository promises: no line over 120 columns in any .py file (so `diff` and side-by-side reading
work), no pointer to a file a reader cannot open, each method script grpo.py plus a small diff, and every --help."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


POINTERS = ["specs" + "/", "the " + "spec", "the issue" + "'s target"]  # split: this file must not match itself


def tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [p for p in out if os.path.exists(os.path.join(ROOT, p))]


def test_no_line_over_120_columns():
    long = [f"{path}:{i}" for path in tracked("*.py") for i, line in
            enumerate(open(os.path.join(ROOT, path), encoding="utf-8").read().split("\n"), 1) if len(line) > 120]
    assert not long, f"{len(long)} lines over 120 columns: {', '.join(long[:20])}"


def test_no_pointers_to_files_a_reader_cannot_open():
    bad = [f"{path}:{i}" for path in tracked("*.py", "*.md") for i, line in
           enumerate(open(os.path.join(ROOT, path), encoding="utf-8"), 1)
           if any(p in line for p in POINTERS)]
    assert not bad, f"pointers to text a reader cannot open: {', '.join(bad[:20])}"


DIFF_BUDGET = {"lp_reg.py": 130, "thr.py": 130, "arm.py": 130, "sps.py": 250}  # README, "Read the code"


def test_each_method_is_grpo_plus_a_small_diff():
    """`diff grpo.py X.py` shows the method and nothing else: its changed lines (docstrings included) stay within the
    budget, and grpo.train reads in one pass (at most 80 lines)."""
    grown = {}
    for script, budget in DIFF_BUDGET.items():
        out = subprocess.run(["diff", "grpo.py", script], cwd=ROOT, capture_output=True, text=True).stdout
        changed = sum(line[:2] in ("< ", "> ") or line in ("<", ">") for line in out.split("\n"))
        if changed > budget:
            grown[script] = changed
    assert not grown, f"changed lines against grpo.py over budget {DIFF_BUDGET}: {grown}"
    tree = ast.parse(open(os.path.join(ROOT, "grpo.py"), encoding="utf-8").read())
    train = next(n for n in tree.body if getattr(n, "name", "") == "train")
    assert train.end_lineno - train.lineno + 1 <= 80, "grpo.train is over 80 lines"


def test_every_script_prints_its_help():
    """`python X.py --help` lists every flag (argparse formats each help string: a bare % in one crashes it)."""
    for script in ["grpo.py", *DIFF_BUDGET]:
        out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0 and "--group-size" in out.stdout, f"{script} --help: {out.stderr[-500:]}"
