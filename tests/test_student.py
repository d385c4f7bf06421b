"""The course (student.py): the student copy holds no solution line, its HANDOUT.md covers every part and exercise, the
graders fail on the copy and pass on the original, every grader fails on each of its wrong versions
(tests/student_fixtures/wrong.py), and every command of the handout runs."""
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from student import (CHEAP, EXERCISES, INSTRUCTOR, PARTS, QUESTIONS, STEP5, commands, solutions,  # noqa: E402
                     student_copy)
from student_fixtures.wrong import WRONG  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
IGNORE = shutil.ignore_patterns(".git", "__pycache__", "runs", ".pytest_cache", ".venv*")


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    out = tmp_path_factory.mktemp("course") / "copy"
    assert student_copy(str(out)) == sorted(EXERCISES)
    return out


def solution_lines(name):
    """The exercise's solution code in the original, one whitespace-free line each (comments dropped)."""
    out = []
    for path, what in [(p, f) for p, f in EXERCISES[name]["functions"]] + [(p, S) for p, S in
                                                                             EXERCISES[name]["regions"]]:
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        lines = text.split("\n")
        spans = solutions(text, regions=[what]) if what == STEP5 else solutions(text, functions=[what])
        for first, last, _ in spans:
            code = [line.split("  #")[0] for line in lines[first - 1:last]]
            out += [re.sub(r"\s+", "", c) for c in code if not c.strip().startswith("#")]
    return out


# expressions that give an answer away wherever they appear (the solutions' cores, also written other ways)
# solution lines that say nothing of the answer: plumbing that steps 1-4 and 6 and the tests use too, and the tails of
# calls split over two lines (their significant head is searched)
GENERIC = {"withautocast(device):", "ifref_modelisnotNone:", "ifon_policy:", "loss.backward()", "args.clip_high)",
           "args.max_new_tokens)", "optimizer.zero_grad(set_to_none=True)"}  # the last: optimizer_step frees them too
NEAR = {"k3": ["torch.exp(d)-d-1", "exp(ref-logp)-(ref-logp)-1"], "clipped-surrogate": ["exp(logp-old_logp)"],
        "loss-aggregation": ["*world_size()", "factorworld_size()"]}


def test_student_copy_holds_no_solution_line(copy):
    """Every significant line of every solution (12+ characters without spaces), and the expressions in NEAR, occur
    nowhere in the copy: not in the other scripts (each method's step 5 is stubbed too), helpers, tests or docs."""
    texts = {}
    for top, _, files in os.walk(copy):
        for f in files:
            try:
                text = open(os.path.join(top, f), encoding="utf-8").read()
            except UnicodeDecodeError:
                continue  # images
            texts[os.path.relpath(os.path.join(top, f), copy)] = re.sub(r"[ \t]+", "", text)
    lines = {path: set(text.split("\n")) for path, text in texts.items()}
    found = []
    for name in EXERCISES:
        needles = {s for s in solution_lines(name) if len(s) >= 12} - GENERIC
        assert needles, name
        found += [(name, s, path) for s in sorted(needles) for path in texts if s in lines[path]]
        found += [(name, s, path) for s in NEAR.get(name, []) for path, text in texts.items() if s in text]
    assert not found, "\n".join(f"{n}: {s!r} in {p}" for n, s, p in found)
    for name in EXERCISES:
        assert any(f'NotImplementedError("exercise{name}(' in t for t in texts.values()), name  # spaces gone
    assert not INSTRUCTOR & set(texts) and "tests/student_fixtures/snapshots.json" in texts
    assert "start with HANDOUT.md" in (copy / "README.md").read_text()


def test_handout_covers_every_part_exercise_and_question(copy):
    text = (copy / "HANDOUT.md").read_text()
    assert "## Learning objectives" in text
    for n, p in PARTS.items():
        assert f"### Part {n}: {p['title']} (" in text and p["deliverable"] in text
    for name, e in EXERCISES.items():
        head = f"#### {name} ({e['points']} points)"
        assert head in text, head
        block = text.split(head)[1].split("####")[0]
        for key in ("teaches", "equation", "hint"):
            assert e[key] in block, (name, key)
        assert "python -m pytest -q " + " ".join(e["tests"]) in block and e.get("run", "") in block
    for n in (1, 2):
        assert "Run after the part" in text.split(f"### Part {n}:")[1].split("### Part")[0]
    for q in QUESTIONS:
        assert q["q"] in text and q["experiment"] in text
    in_text = set(re.findall(r"`(python [^`<]+)`", text))  # every command the handout shows...
    assert in_text == set(commands()), in_text ^ set(commands())  # ...is one the command test below runs


def outcomes(root, ids, xml):
    """{test case name: failure text or None} of running `ids` with pytest in `root`."""
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", f"--junitxml={xml}",
                    *ids], cwd=root, env=ENV, capture_output=True, text=True)
    cases = ET.parse(xml).getroot().iter("testcase")
    return {c.get("name"): next(((f.get("message") or "") + (f.text or "") for f in c
                                 if f.tag in ("failure", "error")), None) for c in cases}


@pytest.mark.slow
def test_graders_fail_on_the_copy_and_pass_on_the_original(copy, tmp_path):
    """Minutes: the graders include end-to-end runs (the 60-step learning test, torchrun, each method's script)."""
    ids = sorted({t for e in EXERCISES.values() for t in e["tests"]})
    original, student = outcomes(ROOT, ids, tmp_path / "o.xml"), outcomes(str(copy), ids, tmp_path / "s.xml")
    assert original and set(original) == set(student)
    assert not [n for n, fail in original.items() if fail], original
    assert [n for n, fail in student.items() if not fail] == [], student
    assert all("NotImplementedError" in fail for fail in student.values()), student


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    """A copy of the original (the reference solutions) in which to substitute one wrong version at a time."""
    out = tmp_path_factory.mktemp("solved") / "repo"
    shutil.copytree(ROOT, out, ignore=IGNORE)
    return out


def substitute(text, where, old, new):
    """text with old replaced by new inside function `where`'s body (or the step-5 region)."""
    lines = text.split("\n")
    [(first, last, _)] = solutions(text, regions=[STEP5]) if where == "step 5" else solutions(text, functions=[where])
    body = "\n".join(lines[first - 1:last])
    assert old in body, (where, old)
    return "\n".join(lines[:first - 1] + body.replace(old, new).split("\n") + lines[last:])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXERCISES))
def test_every_grader_fails_each_of_its_wrong_versions(name, solved):
    """One pytest run per wrong version on that exercise's graders alone (-x: the first failure kills it)."""
    assert len(WRONG[name]) >= 3
    survived = []
    for label, (path, where, old, new) in WRONG[name].items():
        original = (solved / path).read_text()
        (solved / path).write_text(substitute(original, where, old, new))
        try:
            p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "", *EXERCISES[name]["tests"]],
                               cwd=solved, env=ENV, capture_output=True, text=True, timeout=1800)
        finally:
            (solved / path).write_text(original)
        if p.returncode != 1 or " failed" not in p.stdout:  # 1: tests failed (not a collection or usage error)
            survived.append((label, p.returncode, p.stdout[-500:]))
    assert not survived, survived


@pytest.mark.slow
def test_every_handout_command_runs(solved, tmp_path):
    """Each command in its cheapest form, on the solved copy (the original code plus HANDOUT.md): each run with
    student.CHEAP's tiny budget, each grading command collected (test_graders_fail_on_the_copy_and_pass_on_the_original
    runs them in full), and the experiments' eval.py compare on the runs made."""
    runs = []
    for i, cmd in enumerate(commands()):
        argv = cmd.split()
        if argv[1:3] == ["-m", "pytest"]:
            argv += ["--collect-only", "-m", ""]
        else:
            runs.append(tmp_path / f"r{i}")
            argv += CHEAP + ["--run-dir", str(runs[-1])]
        p = subprocess.run([sys.executable] + argv[1:], cwd=solved, env=ENV, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, (cmd, p.stdout[-1500:], p.stderr[-1500:])  # collect-only: 0 = every id found
    p = subprocess.run([sys.executable, "eval.py", "compare", *map(str, runs)], cwd=solved, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "pass@1" in p.stdout, p.stdout[-1500:] + p.stderr[-1500:]
