"""Write a student copy of this repository for a course: the body of each exercise function (EXERCISES: its file and
function; everything after the docstring) is replaced by a NotImplementedError with a one-line hint; everything else is
copied as is. Each exercise is graded by existing tests, named in EXERCISES.

    python student.py OUT_DIR                      # writes the copy (OUT_DIR must not exist)
    cd OUT_DIR && python -m pytest -q tests/test_grpo_math.py::test_group_advantages_hand_worked   # grade one

tests/test_student.py builds a copy and checks that exactly the mapped tests fail on it and pass on the original."""
import ast
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
EXERCISES = {  # name -> the file and function holding its solution region, the hint, the tests that grade it
    "group-advantages": dict(
        file="grpo.py", function="group_advantages", difficulty="easy",
        hint="standardise each group of G rewards: (r - group mean) / (group std + eps); scale='none': no division",
        tests=["tests/test_grpo_math.py::test_group_advantages_hand_worked"]),
    "clipped-surrogate": dict(
        file="grpo.py", function="policy_loss", difficulty="easy",
        hint="ratio = exp(logp - old_logp); loss = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)",
        tests=["tests/test_grpo_math.py::test_policy_loss_hand_worked"]),
    "k3": dict(
        file="grpo.py", function="kl_k3", difficulty="easy",
        hint="with d = ref_logp - logp: exp(d) - d - 1",
        tests=["tests/test_grpo_math.py::test_kl_k3_is_zero_at_equality_and_positive_elsewhere"]),
    "loss-aggregation": dict(
        file="grpo.py", function="aggregate_loss", difficulty="medium",
        hint="divide by the GLOBAL n_tokens / n_seqs and multiply by world_size(): ranks average their gradients",
        tests=["tests/test_grpo_math.py::test_aggregate_loss_hand_worked",
               "tests/test_grpo_math.py::test_aggregate_loss_invariant_to_micro_batching"]),
    "pass-at-k": dict(
        file="common.py", function="pass_at_k", difficulty="easy",
        hint="1 - C(n - c, k) / C(n, k) as a product over i in (n - c, n] of (1 - k / i); 1 when n - c < k",
        tests=["tests/test_grpo_math.py::test_pass_at_k_matches_brute_force"]),
    "arm-reweighting": dict(
        file="arm.py", function="arm_advantages", difficulty="medium",
        hint="A + alpha (c(q) - c(o|q)) on the responses in scope of groups with a correct answer, A elsewhere",
        tests=["tests/test_arm.py::test_hand_worked_group", "tests/test_arm.py::test_all_wrong_groups_are_unchanged",
               "tests/test_arm.py::test_all_correct_groups_get_the_confidence_signal",
               "tests/test_arm.py::test_scope_correct_leaves_wrong_responses"]),
    "thr-reweighting": dict(
        file="thr.py", function="reweighted_advantages", difficulty="easy",
        hint="A (1 + p sign(THR)) on dominant tokens; A elsewhere, or 0 with mask_nondominant",
        tests=["tests/test_thr.py::test_dominant_tokens_and_reweighting_hand_worked"]),
    "lp-reg-selection": dict(
        file="lp_reg.py", function="bottom_rho", difficulty="medium",
        hint="k = int(|S| rho); mark the k candidates with the smallest log-prob (none unless k > 1)",
        tests=["tests/test_lp_reg.py::test_selection_picks_the_bottom_k_negative_tokens_that_pass_the_filter",
               "tests/test_lp_reg.py::test_batch_scope_matches_micro_batch_ranking_on_one_process"]),
    "sps-irl-loss": dict(
        file="sps.py", function="irl_loss", difficulty="medium",
        hint="-sum_i q_i log softmax(s / T)_i over the support (-inf outside it); sign 'literal' negates it",
        tests=["tests/test_sps.py::test_irl_loss_falls_as_p_moves_toward_q_and_the_literal_sign_rises",
               "tests/test_sps.py::test_irl_gradient_is_p_minus_q",
               "tests/test_sps.py::test_irl_loss_over_the_demonstrations_has_its_minimum_at_equal_scores_"
               "and_ignores_wrong_rollouts"]),
}
SKIP = {".git", "__pycache__", "runs", ".pytest_cache"}


def stub(text, functions):
    """text with the body (after its docstring) of each top-level function {name: exercise} replaced by the exercise's
    NotImplementedError; returns (text, the exercises stubbed)."""
    lines, done = text.split("\n"), []
    defs = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name in functions]
    for fn in sorted(defs, key=lambda n: -n.lineno):  # bottom up, so earlier line numbers stay valid
        name, first = functions[fn.name], fn.body[1]  # body[0] is the docstring
        stub_line = f'raise NotImplementedError("exercise {name}: {EXERCISES[name]["hint"]}")'
        lines[first.lineno - 1:fn.end_lineno] = [" " * first.col_offset + stub_line]
        done.append(name)
    return "\n".join(lines), done


def student_copy(out_dir):
    """Copy the repository to out_dir with the exercises stubbed; returns the names of the stubbed exercises."""
    if os.path.exists(out_dir):
        sys.exit(f"error: {out_dir} exists: pass a new directory")
    done = []
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP and not d.startswith(".venv"))
        rel = os.path.relpath(top, ROOT)
        os.makedirs(os.path.join(out_dir, rel), exist_ok=True)
        for f in files:
            src, dst = os.path.join(top, f), os.path.join(out_dir, rel, f)
            path = os.path.normpath(os.path.join(rel, f))
            functions = {e["function"]: name for name, e in EXERCISES.items() if e["file"] == path}
            if functions:
                text, names = stub(open(src, encoding="utf-8").read(), functions)
                done += names
                with open(dst, "w", encoding="utf-8") as out:
                    out.write(text)
            else:
                shutil.copy2(src, dst)
    missing = set(EXERCISES) - set(done)
    if missing:
        sys.exit(f"error: no solution region for {', '.join(sorted(missing))}")
    return done


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python student.py OUT_DIR")
    student_copy(sys.argv[1])
    print(f"wrote {sys.argv[1]}; grade an exercise there with the command beside it:")
    for name, e in EXERCISES.items():
        print(f"  {name:18} {e['file'] + ':' + e['function']:32} {e['difficulty']:7} "
              f"python -m pytest -q {' '.join(e['tests'])}")
