import sys, os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702
import multiprocessing
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from common import (UserError, compute_rewards, countdown_reward, last_boxed, load_problems, math_reward, math_rewards,
                    shutdown_reward_pool)
from infra import _collect, _get_pool


@pytest.fixture(scope="module", autouse=True)
def _pool_lifetime():
    yield
    shutdown_reward_pool()


# ---------------------------------------------------------------- countdown

@pytest.mark.parametrize("completion,numbers,target", [
    (r"\boxed{(3+5)*3}", [3, 5, 3], 24),
    (r"\boxed{6/(1-3/4)}", [1, 3, 4, 6], 24),  # intermediate fractions, exact arithmetic
    (r"\boxed{8/(3-8/3)}", [3, 3, 8, 8], 24),
    (r"\boxed{ 6 ÷ (1 − 3 ÷ 4) }", [1, 3, 4, 6], 24),  # unicode operators, spaces
    (r"\boxed{(10 × 2) + 4}", [2, 4, 10], 24),
    (r"\boxed{12 \times 2}", [12, 2], 24),
    ("Let me try: 3+5=8, 8*3=24. So the answer is \\boxed{3 * (5 + 3)}.", [3, 5, 3], 24),
    (r"First \boxed{3+5+3} is wrong, so \boxed{(5+3)*3}", [3, 5, 3], 24),  # last box counts
    (r"\boxed{100-99}", [99, 100], 1),
    (r"\boxed{" + "(" * 90 + "1+2" + ")" * 90 + "}", [1, 2], 3),  # deep but legal parentheses
])
def test_countdown_valid(completion, numbers, target):
    assert countdown_reward(completion, numbers, target) == 1.0


@pytest.mark.parametrize("completion,numbers,target", [
    (r"\boxed{(3+5)*3}", [3, 5, 3], 25),  # wrong value
    (r"\boxed{(5+3)*3}", [3, 5, 3, 1], 24),  # a number missing
    (r"\boxed{(5+3)*3*1}", [3, 5, 3], 24),  # an extra number
    (r"\boxed{(5+5)*3-6}", [3, 5, 6], 24),  # a number used twice
    (r"\boxed{8*3}", [8, 3, 3], 24),  # number missing (duplicates count)
    (r"\boxed{-3+27}", [3, 27], 24),  # unary minus
    (r"\boxed{2**3*3}", [2, 3, 3], 24),  # power
    (r"\boxed{2^3*3}", [2, 3, 3], 24),
    (r"\boxed{2.5*4}", [2.5, 4], 10),  # floats
    (r"\boxed{03*8}", [3, 8], 24),  # leading zero
    (r"\boxed{__import__('os')}", [1], 1),
    (r"\boxed{eval('1+2')}", [1, 2], 3),
    (r"\boxed{abs(1)}", [1], 1),
    (r"\boxed{4/(2-2)}", [4, 2, 2], 1),  # division by zero
    (r"\boxed{1+2=3}", [1, 2], 3),  # only the expression, no equation
    (r"\boxed{(3+5)*3} and then \boxed{3+5+3}", [3, 5, 3], 24),  # last box is wrong
    ("(3+5)*3", [3, 5, 3], 24),  # no box
    (r"\boxed{}", [3, 5, 3], 24),
    (r"\boxed{１＋２}", [1, 2], 3),  # fullwidth digits are not ASCII arithmetic
])
def test_countdown_invalid(completion, numbers, target):
    assert countdown_reward(completion, numbers, target) == 0.0


@pytest.mark.parametrize("completion", [
    r"\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
    r"\boxed{" + "(" * 100 + "1+2" + ")" * 100 + "}",  # over the length cap
    r"\boxed{" + "([{" * 3400 + "}",
    "\\boxed{" * 1000,
    "x" * 1_000_000,
    r"\boxed{" + "1+" * 500_000 + "2}",
    r"\boxed{9**9**9**9}",
    r"\boxed{\u202e\x00\ud800\U0001f600}",
    None, b"\\boxed{1+2}", 12, ["\\boxed{1+2}"],
])
def test_countdown_hostile(completion):
    start = time.perf_counter()
    assert countdown_reward(completion, [1, 2], 3) == 0.0
    assert time.perf_counter() - start < 0.1


def test_countdown_bad_problem_args():
    assert countdown_reward(r"\boxed{1+2}", None, 3) == 0.0
    assert countdown_reward(r"\boxed{1+2}", [1, 2], None) == 0.0
    assert countdown_reward(r"\boxed{9*9*9*9}", [9, 9, 9, 9], 9 ** 4) == 1.0  # sanity: same call shape works


# ---------------------------------------------------------------- math

@pytest.mark.parametrize("completion,gold,expected", [
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac12}", "0.5", 1.0),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt2}{2}", 1.0),
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", 1.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),  # units are dropped
    (r"\boxed{(1,2]}", "(1,2]", 1.0),
    (r"\boxed{[1,2]}", "(1,2]", 0.0),  # interval ends matter
    (r"\boxed{\{2,1\}}", r"\{1,2\}", 1.0),
    (r"\boxed{(1,2)}", "1<x<2", 1.0),  # gold inequality -> interval (math-verify only converts the gold side)
    ("The answer is \\boxed{42}.", "42", 1.0),
    (r"\boxed{41} no wait, \boxed{42}", "42", 1.0),  # last box counts
    (r"\boxed{42} no wait, \boxed{41}", "42", 0.0),
    (r"\boxed{43}", "42", 0.0),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0),
    (r"\boxed{\pi}", "3.14159", 0.0),
    ("The answer is 42.", "42", 0.0),  # no box
    (r"\boxed{}", "42", 0.0),
    (r"\boxed{42}", "", 0.0),
])
def test_math_reward(completion, gold, expected):
    assert math_reward(completion, gold) == expected


def test_math_rewards_batch_and_garbage():
    completions = [r"\boxed{\frac{4}{8}}", None, 5, r"\boxed{2}", r"\boxed{" + "1" * 1200 + "}", r"\boxed{7}"]
    golds = ["0.5", "1", "1", None, "1" * 1200, "7"]
    assert math_rewards(completions, golds) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert math_rewards([], []) == []


def test_last_boxed_is_reexported():
    assert last_boxed(r"a \boxed{\frac{1}{2}} b") == r"\frac{1}{2}"


@pytest.mark.parametrize("completion", [
    r"\boxed{9^{9^{9^9}}}",
    r"\boxed{(1+x)^{100000}}",
    r"\boxed{9!!!!!!}",
    r"\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",  # under the length cap: reaches math-verify
    r"\boxed{" + r"\frac{" * 90 + "1" + "}{2}" * 90 + "}",
    r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "{" * 10_000 + r"\boxed{" + "}" * 10_000,
])
def test_math_reward_pathological(completion):
    start = time.perf_counter()
    assert math_reward(completion, "1", timeout=2.0) == 0.0
    assert time.perf_counter() - start < 4.0
    assert math_reward(r"\boxed{1}", "1") == 1.0  # the pool still works afterwards


def test_batch_with_slow_item_is_bounded():
    completions = [r"\boxed{1}", r"\boxed{9^{9^{9^9}}}", r"\boxed{2}", r"\boxed{3}", r"\boxed{4}"]
    pool, start = _get_pool(), time.perf_counter()
    assert math_rewards(completions, ["1", "1", "2", "3", "5"], timeout=2.0) == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert time.perf_counter() - start < 5.0
    assert _get_pool() is pool  # the worker's own timer stopped it: no pool restart needed


def test_hung_worker_is_killed():
    """A worker stuck where its own timer can't reach it: the parent gives up at the deadline and kills it."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
    futures = [(0, pool.submit(abs, -1.0)), (1, pool.submit(time.sleep, 60)), (2, pool.submit(abs, -2.0))]
    futures[0][1].result(timeout=30)  # the worker is up
    procs, out, start = list(pool._processes.values()), [0.0] * 3, time.perf_counter()
    retry = _collect(pool, futures, 1.0, out)
    assert time.perf_counter() - start < 3.0
    assert out[:2] == [1.0, 0.0] and retry == [2]  # item 2 never ran: it goes to a fresh pool
    assert procs
    for proc in procs:
        proc.join(timeout=5)
        assert not proc.is_alive()


def test_batch_survives_worker_death():
    """Workers killed mid-batch (say by the OOM killer): the unfinished items are retried on a fresh pool."""
    pool = _get_pool()
    procs = list(pool._processes.values())
    threading.Timer(0.1, lambda: [proc.kill() for proc in procs]).start()
    completions = [rf"\boxed{{{i}\sqrt{{{i + 1}}}}}" for i in range(2, 130)]
    golds = [rf"\sqrt{{{i * i * (i + 1)}}}" for i in range(2, 130)]
    start = time.perf_counter()
    assert math_rewards(completions, golds) == [1.0] * len(completions)
    print(f"batch of {len(completions)} with a pool restart: {time.perf_counter() - start:.2f} s")
    assert _get_pool() is not pool  # the kill really happened mid-batch
    assert all(not proc.is_alive() for proc in procs)


def test_math_reward_from_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(math_reward(r"so \boxed{\frac{2}{4}}", "0.5")))
    thread.start()
    thread.join(timeout=60)
    assert results == [1.0]


SCRIPT = """import sys; sys.path.insert(0, {root!r})
from common import math_reward
def main():
    print("reward", math_reward(r"\\boxed{{1/2}}", "0.5"))
{call}
"""


@pytest.mark.parametrize("call,ok", [('if __name__ == "__main__":\n    main()', True), ("main()", False)])
def test_script_main_guard(tmp_path, call, ok):
    """A training script with a __main__ guard gets rewards; one without fails loudly instead of scoring 0."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "train.py").write_text(SCRIPT.format(root=root, call=call))
    res = subprocess.run([sys.executable, str(tmp_path / "train.py")], capture_output=True, text=True, timeout=120)
    if ok:
        assert res.returncode == 0 and "reward 1.0" in res.stdout, res.stderr
    else:
        assert res.returncode != 0 and "did not start" in res.stderr


def test_pool_restarts_after_shutdown():
    shutdown_reward_pool()
    assert math_reward(r"\boxed{3}", "3") == 1.0


# ---------------------------------------------------------------- dispatch

def reward_fn(problem, completion):
    return compute_rewards([problem], [completion])[0]


def test_reward_fn_gold_list():
    problem = {"task": "math", "gold": ["0.5", r"\frac{1}{3}"]}
    assert reward_fn(problem, r"\boxed{\frac{1}{3}}") == 1.0
    assert reward_fn(problem, r"\boxed{1/2}") == 1.0
    assert reward_fn(problem, r"\boxed{2}") == 0.0
    assert reward_fn({"task": "countdown", "numbers": [2, 3], "target": 6}, r"\boxed{2*3}") == 1.0


def test_compute_rewards_mixed():
    problems = [
        {"task": "countdown", "numbers": [1, 3, 4, 6], "target": 24},
        {"task": "math", "gold": "42"},
        {"task": "countdown", "numbers": [2, 3], "target": 6},
        {"task": "math", "gold": [r"\frac{1}{2}", "0.5"]},
        {"task": "math", "gold": r"\sqrt{2}"},
    ]
    completions = [r"\boxed{6/(1-3/4)}", r"\boxed{42}", r"\boxed{2+3}", r"\boxed{0.5}", r"\boxed{2}"]
    assert compute_rewards(problems, completions) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert compute_rewards([], []) == []


ARITHMETIC_CASES = [  # (completion, gold, reward): the final number, worked by hand
    (r"so the answer is \boxed{10}.", "10", 1.0),
    (r"\boxed{10 cookies}", "10", 1.0),                      # the last integer inside the box
    (r"11 - 1 = 10, so \boxed{10} cookies, 3 more later", "10", 1.0),  # a box wins over numbers after it
    (r"\boxed{11}. No wait, 10.", "10", 0.0),              # ... even when the text after it is right
    ("11 - 1 = 10. Emma has 10 cookies left.", "10", 1.0),  # no box: the last integer of the text
    ("Emma has 10 cookies left, 2 days later.", "10", 0.0),
    ("11 - 1 = 10", "1", 0.0),                             # whole numbers only: "10" is not "1"
    ("the total is 1,200.", "1200", 1.0),                  # thousands separators are ignored
    ("3 - 5 = -2", "2", 0.0),                              # a sign is part of the number
    ("no number at all", "0", 0.0),
    (r"\boxed{}", "0", 0.0),
    (None, "1", 0.0),
]


@pytest.mark.parametrize("completion,gold,reward", ARITHMETIC_CASES)
def test_arithmetic_reward_hand_worked(completion, gold, reward):
    from tasks import arithmetic_reward
    assert arithmetic_reward(completion, gold) == reward


def test_arithmetic_rewards():
    """The built-in word problems are scored by their final number, through compute_rewards."""
    problems = load_problems("arithmetic", split="eval", n=20, seed=0)
    right = [f"{p['work']} \\boxed{{{p['gold']}}}" for p in problems]
    wrong = [f"\\boxed{{{int(p['gold']) + 1}}}" for p in problems]
    unboxed = [f"The answer is {p['gold']}." for p in problems]
    assert compute_rewards(problems * 3, right + wrong + unboxed) == [1.0] * 20 + [0.0] * 20 + [1.0] * 20


def test_unknown_task():
    with pytest.raises(UserError):
        compute_rewards([{"task": "chess"}], ["e4"])
