"""Reading aids the repository promises: no line over 120 columns in any .py file (so `diff` and side-by-side reading
work), no pointer to a file a reader cannot open, each method script grpo.py's math imported plus its own, and every
--help."""
import ast
import os
import re
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
           if any(p in line for p in POINTERS) or re.search(r"\b[Ii]ssues? #?[0-9]", line)]  # the tracker's numbers
    assert not bad, f"pointers to text a reader cannot open: {', '.join(bad[:20])}"


METHODS = ["lp_reg.py", "thr.py", "arm.py", "sps.py"]
GRPO_MATH = {"group_advantages", "policy_loss", "kl_k3", "aggregate_loss", "truncated_is_weight"}


def test_each_method_imports_grpos_math_and_its_loop_holds_no_test_hook():
    """grpo.py holds all of GRPO's math; a method script imports it (and GRPO's Args) and defines no copy of it; no
    script's loop holds a test-only hook (the helpers it calls do, or the tests patch one in)."""
    grpo = ast.parse(open(os.path.join(ROOT, "grpo.py"), encoding="utf-8").read())
    assert GRPO_MATH <= {n.name for n in grpo.body if isinstance(n, ast.FunctionDef)}
    for script in METHODS:
        tree = ast.parse(open(os.path.join(ROOT, script), encoding="utf-8").read())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        imported = {a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "grpo" for a in n.names}
        assert not defined & GRPO_MATH, f"{script} defines {defined & GRPO_MATH}: import them from grpo.py"
        assert GRPO_MATH | {"Args"} <= imported, f"{script} does not import {GRPO_MATH | {'Args'} - imported}"
    for script in ["grpo.py"] + METHODS:
        text = open(os.path.join(ROOT, script), encoding="utf-8").read()
        hooks = [w for w in ("fault_point", "loss_fault", "EXPLORE_RLVR", "# noqa") if w in text]
        assert not hooks, f"{script} holds {hooks}: a test hook or a silenced linter"


def test_every_script_prints_its_help():
    """`python X.py --help` lists every flag (argparse formats each help string: a bare % in one crashes it)."""
    for script in ["grpo.py", *METHODS]:
        out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0 and "--group-size" in out.stdout, f"{script} --help: {out.stderr[-500:]}"
