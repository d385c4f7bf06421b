"""Reading aids the repository promises: no line over 120 columns in any .py file (so `diff` and side-by-side reading
work), and no pointer to a file a reader cannot open."""
import os
import subprocess

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
