"""The course copy (student.py): every exercise's function body is stubbed, and exactly the tests that grade the
exercises fail on the copy (with the exercise's NotImplementedError) while they pass on the original."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from student import EXERCISES, student_copy  # noqa: E402


def outcomes(root, ids, xml):
    """{test case name: failure message or None} of running `ids` with pytest in `root`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *ids],
                   cwd=root, env=env, capture_output=True, text=True)
    cases = ET.parse(xml).getroot().iter("testcase")
    return {c.get("name"): next((f.get("message") or f.text or "fail" for f in c if f.tag in ("failure", "error")),
                                None) for c in cases}


def test_student_copy_fails_exactly_the_mapped_tests_and_the_original_passes_them(tmp_path):
    copy = tmp_path / "copy"
    assert sorted(student_copy(str(copy))) == sorted(EXERCISES)
    for name, e in EXERCISES.items():
        assert f"NotImplementedError(\"exercise {name}:" in (copy / e["file"]).read_text()
    ids = sorted({t for e in EXERCISES.values() for t in e["tests"]})
    original, student = outcomes(ROOT, ids, tmp_path / "o.xml"), outcomes(str(copy), ids, tmp_path / "s.xml")
    assert original and set(original) == set(student)
    assert not [n for n, fail in original.items() if fail], original
    assert [n for n, fail in student.items() if not fail] == [], student
    assert all("NotImplementedError" in fail for fail in student.values()), student
