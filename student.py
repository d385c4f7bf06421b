"""Write a student copy of this repository for a course: the bodies of the exercise functions (the regions between
`# --- SOLUTION START: <name>` and `# --- SOLUTION END` in the code) are replaced by a NotImplementedError with a
one-line hint; everything else is copied as is. Each exercise is graded by existing tests, named in EXERCISES.

    python student.py OUT_DIR                      # writes the copy (OUT_DIR must not exist)
    cd OUT_DIR && python -m pytest -q tests/test_grpo_math.py::test_group_advantages_hand_worked   # grade one

tests/test_student.py builds a copy and checks that exactly the mapped tests fail on it and pass on the original."""
import os
import re
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
        file="common.py", function="aggregate_loss", difficulty="medium",
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
REGION = re.compile(r"^( *)# --- SOLUTION START: ([\w-]+)\n.*?^ *# --- SOLUTION END\n", re.S | re.M)
SKIP = {".git", "__pycache__", "runs", ".pytest_cache"}


def stub(text):
    """text with every solution region replaced by its NotImplementedError; returns (text, names of the regions)."""
    names = []

    def replace(m):
        indent, name = m.group(1), m.group(2)
        names.append(name)
        return f'{indent}raise NotImplementedError("exercise {name}: {EXERCISES[name]["hint"]}")\n'
    return REGION.sub(replace, text), names


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
            if f.endswith(".py"):
                text, names = stub(open(src, encoding="utf-8").read())
                for name in names:
                    if name not in EXERCISES or os.path.normpath(os.path.join(rel, f)) != EXERCISES[name]["file"]:
                        sys.exit(f"error: solution region {name} in {os.path.join(rel, f)} is not in EXERCISES")
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
