"""Write a student copy of this repository for a course, with its handout. Everything below the imports is the
course's one source: the parts, each exercise (the code it removes, what it teaches, the equation it implements, a hint
that points without telling, the tests that grade it, a run to do after it), the questions and the experiments that
answer them. The copy and its HANDOUT.md are generated from it, so they cannot drift apart.

    python student.py OUT_DIR            # the copy, with OUT_DIR/HANDOUT.md (OUT_DIR must not exist)
    python student.py --handout          # print the handout

In the copy each exercise's code is gone: a function's body (after its docstring) or a region of a training loop
(between two of its numbered comments) becomes one `raise NotImplementedError("exercise NAME: hint")`, and so do the
near-answers next to it (e.g. lp_reg.py's batch_bottom_rho with bottom_rho; every method script's step 5 with
grpo.py's). REWRITES replaces the few expressions elsewhere that would give an answer away by calls to the exercise's
function. tests/test_student.py builds the copy and searches it for every solution line, checks that the graders fail
on it and pass on the original, that every grader fails on the wrong solutions in tests/student_fixtures/wrong.py,
and that every command of the handout runs."""
import ast
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
INSTRUCTOR = {"student.py", os.path.join("tests", "test_student.py"),  # left out of the copy
              os.path.join("tests", "student_fixtures", "wrong.py"),
              os.path.join("tests", "student_fixtures", "make_snapshots.py")}
STEP5 = ("# 5. Policy update", "# 6. Metrics")  # the loop's region: from the first comment to just before the 2nd
LOOP_NAMES = ("step 6 needs grad_norm, skipped, streak, sums['loss'] (the loss, averaged over the step's optimizer "
              "steps and ranks) and sums['clipped'] (clipped valid tokens); on-policy, also old_logp and entropy, "
              "filled from the update's own forward")
# the tiny run each handout command is checked with (tests/test_student.py): later flags override earlier ones
CHEAP = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "16", "--eval-problems",
         "4", "--eval-samples", "2", "--save-every", "0"]
DEFAULT_RUN = ("held-out pass@1 0.139 -> 0.352, pass@16 0.710 -> 0.540, entropy 0.48 -> 0.25 (seed 0, one run; "
               "over 3 seeds at n = 64 samples: final pass@1 0.315 +- 0.059, pass@64 0.577 +- 0.035)")

PARTS = {  # number -> title, what the student hands in, what it teaches
    1: dict(title="GRPO's math", deliverable=(
        "the five functions, each passing its grading command; and the default run's metrics.jsonl with one "
        "sentence on the pass@1 and pass@16 you see against the numbers given"),
        objectives="turn the paper's equations (advantage, clipped surrogate, KL estimator, loss aggregation, pass@k) "
                   "into batched tensor code, and know which test pins each"),
    2: dict(title="The training loop", deliverable=(
        "grpo.py's step 5, passing its grading command, and a default run that reproduces part 1's numbers within "
        "their spread"),
        objectives="write the update a library hides: PPO epochs and mini-batches, micro-batch gradient "
                   "accumulation, the on-policy shortcut, multi-process scaling, the optimizer step"),
    3: dict(title="Questions and ablations", deliverable=(
        "a written answer to each question (a paragraph), each backed by the experiment's metrics: the table "
        "that eval.py's compare prints over your runs"),
        objectives="predict, then measure, what each design choice of GRPO does to learning and to exploration"),
    4: dict(title="One exploration method", deliverable=(
        "your chosen method's function and its script's step 5 passing its grading command; its seed-0 run's final "
        "row next to the study's row (README), within two of the study's standard deviations (one seed against "
        "three) or explained"),
        objectives="read a paper's equation, implement it inside GRPO, and reproduce a measured result within its "
                   "spread"),
}

EXERCISES = {  # name -> where its solution is, the course data for it, and the tests that grade it
    "group-advantages": dict(
        part=1, points=5, functions=[("grpo.py", "group_advantages")],
        teaches="the group baseline that replaces a value network, and what standardising by the group's spread does",
        equation="grpo.py docstring, first line (DeepSeekMath Sec. 4.1.2 outcome supervision); scale 'none': "
                 "Dr. GRPO (arXiv:2503.20783)",
        hint="each completion's reward relative to the other completions of its own prompt, in units of that "
             "group's spread (the unbiased estimate, as the reference implementations); an all-equal group must "
             "not divide by zero; --scale-rewards none keeps the units of reward",
        tests=["tests/test_grpo_math.py::test_group_advantages_hand_worked",
               "tests/test_course.py::test_group_advantages_snapshot"]),
    "clipped-surrogate": dict(
        part=1, points=6, functions=[("grpo.py", "policy_loss")],
        teaches="PPO's trust region without a KL constraint, and clip-higher's asymmetric bound",
        equation="grpo.py docstring, L_t (DeepSeekMath Eq. 3; eps_low != eps_high: DAPO Sec. 3.1, clip-higher)",
        hint="rho_t is the probability ratio of the sampled token under the current and the sampling policy (you "
             "hold log-probs); the loss is the pessimistic of the unclipped and the clipped objective, negated; "
             "also return, per token, where the clipped term was the one chosen",
        tests=["tests/test_grpo_math.py::test_policy_loss_hand_worked",
               "tests/test_course.py::test_policy_loss_gradient_and_snapshot"]),
    "k3": dict(
        part=1, points=4, functions=[("grpo.py", "kl_k3")],
        teaches="estimating a KL divergence from one sample per token, unbiased and never negative",
        equation="grpo.py docstring, the k3 term (Schulman 2020, 'Approximating KL divergence', k3; DeepSeekMath "
                 "Eq. 4)",
        hint="k3 for KL(pi_theta || pi_ref) from the sampled token's two log-probs: mind which policy is in the "
             "numerator of the ratio it uses; it is not (log ratio)^2 / 2",
        tests=["tests/test_grpo_math.py::test_kl_k3_is_zero_at_equality_and_positive_elsewhere",
               "tests/test_course.py::test_kl_k3_hand_worked_values_and_gradient"]),
    "loss-aggregation": dict(
        part=1, points=6, functions=[("grpo.py", "aggregate_loss")],
        teaches="which tokens and sequences weigh how much in the gradient, and why micro-batches and ranks must "
                "not change it",
        equation="aggregate_loss's docstring: token-mean DAPO Eq. 8, seq-mean-token-mean DeepSeekMath Eq. 3, "
                 "seq-mean-token-sum-norm Dr. GRPO",
        hint="the counts you are given are the whole optimizer batch's over ALL ranks, and FSDP averages the ranks' "
             "gradients: what must each rank's loss carry so that the average is the big batch's loss? "
             "(common.world_size())",
        tests=["tests/test_grpo_math.py::test_aggregate_loss_hand_worked",
               "tests/test_grpo_math.py::test_aggregate_loss_invariant_to_micro_batching",
               "tests/test_course.py::test_aggregate_loss_scales_with_the_number_of_ranks"]),
    "pass-at-k": dict(
        part=1, points=4, functions=[("common.py", "pass_at_k")],
        teaches="the unbiased pass@k estimator every exploration paper reports, and its numerically stable form",
        equation="pass_at_k's docstring (Chen et al. 2021, Codex, Eq. 1 and its numerically stable form in Fig. 3)",
        hint="the probability that k of the n samples, drawn without replacement, include a correct one; avoid "
             "forming large binomial coefficients",
        tests=["tests/test_grpo_math.py::test_pass_at_k_matches_brute_force",
               "tests/test_course.py::test_pass_at_k_hand_worked"]),
    "training-loop": dict(
        part=2, points=25, regions=[("grpo.py", STEP5)],
        teaches="the update itself: PPO epochs over mini-batches, gradient accumulation over micro-batches, the "
                "on-policy shortcut (pi_old from the update's own forward), the KL and entropy terms, the step",
        equation="grpo.py docstring, loss (every term) per optimizer step; DeepSeekMath Alg. 1's inner loop",
        hint="for each of ppo_epochs passes, each of mini_batches chunks of the rows is one optimizer step: count its "
             "tokens and sequences over all ranks, accumulate the micro-batches' gradients, then optimizer_step; "
             + LOOP_NAMES,
        tests=["tests/test_course.py::test_update_gradient_is_the_batch_loss_gradient",
               "tests/test_grpo_script.py::test_update_runs_in_training_mode_so_checkpointing_acts",
               "tests/test_grpo_script.py::test_torchrun_two_processes_match_one",
               "tests/test_grpo_script.py::test_grpo_learns_on_countdown"]),
    "arm": dict(
        part=4, points=30, option=True, functions=[("arm.py", "arm_advantages")], regions=[("arm.py", STEP5)],
        teaches="ARM / ProGRPO: re-weighting advantages by the model's confidence to keep low-confidence correct "
                "answers alive",
        equation="arm.py docstring, A1 (Li et al., arXiv:2602.05281)",
        hint="shift the advantage by the prompt's confidence minus the answer's, scaled by alpha, only where "
             "--arm-scope puts a response in scope and its group has a correct answer; step 5: grpo.py's, with the "
             "advantages ARM computed",
        tests=["tests/test_arm.py::test_hand_worked_group", "tests/test_arm.py::test_all_wrong_groups_are_unchanged",
               "tests/test_arm.py::test_all_correct_groups_get_the_confidence_signal",
               "tests/test_arm.py::test_scope_correct_leaves_wrong_responses",
               "tests/test_arm.py::test_script_alpha_zero_matches_grpo_script", "tests/test_arm.py::test_end_to_end"],
        run="python arm.py --seed 0 --eval-samples 64", row="ARM",
        study="pass@1 0.311 +- 0.064, pass@64 0.583 +- 0.050, entropy 0.264 +- 0.005, "
              "distinct correct 1.603 +- 0.133"),
    "thr": dict(
        part=4, points=30, option=True, functions=[("thr.py", "reweighted_advantages")],
        regions=[("thr.py", STEP5)],
        teaches="THR: scaling the advantage of the tokens whose hidden reward dominates, to sharpen or to explore",
        equation="thr.py docstring, T5 (Deng et al., arXiv:2510.03669)",
        hint="on dominant tokens scale the advantage up or down by p according to the sign of THR; elsewhere keep it "
             "(or drop it with mask_nondominant); step 5: grpo.py's with the token advantages and --objective",
        tests=["tests/test_thr.py::test_dominant_tokens_and_reweighting_hand_worked",
               "tests/test_thr.py::test_script_p_zero_matches_grpo_and_thr_runs_end_to_end"],
        run="python thr.py --seed 0 --p 0.2 --eval-samples 64", row="THR p=+0.2",
        study="pass@1 0.304 +- 0.061, pass@64 0.547 +- 0.071, entropy 0.257 +- 0.016, "
              "distinct correct 1.530 +- 0.464"),
    "lp-reg": dict(
        part=4, points=30, option=True,
        functions=[("lp_reg.py", "bottom_rho"), ("lp_reg.py", "batch_bottom_rho"),
                   ("lp_reg.py", "microbatch_token_mean")], regions=[("lp_reg.py", STEP5)],
        teaches="Lp-Reg: protecting low-probability reasoning tokens by pulling them toward a filtered proxy",
        equation="lp_reg.py docstring, Eq. 6 steps 2-3 (Huang et al., arXiv:2510.03222) and the authors' "
                 "micro-batch weighting (microbatch_token_mean's docstring)",
        hint="the candidates with the smallest log-prob, as many as the fraction rho of the candidates (rounded "
             "down; none unless that is more than one); the batch version ranks over all ranks; step 5: grpo.py's "
             "with lp_reg_bottom and lp_reg_loss (Eq. 6)",
        tests=["tests/test_lp_reg.py::test_selection_picks_the_bottom_k_negative_tokens_that_pass_the_filter",
               "tests/test_lp_reg.py::test_batch_scope_matches_micro_batch_ranking_on_one_process",
               "tests/test_lp_reg.py::test_microbatch_token_mean_is_the_authors_weighting_hand_worked",
               "tests/test_lp_reg.py::test_end_to_end_rho_zero_trains_exactly_like_grpo"],
        run="python lp_reg.py --seed 0 --rho 0.1 --eval-samples 64", row="Lp-Reg rho=0.1",
        study="pass@1 0.305 +- 0.058, pass@64 0.547 +- 0.067, entropy 0.250 +- 0.019, "
              "distinct correct 1.317 +- 0.236"),
    "sps": dict(
        part=4, points=30, option=True, functions=[("sps.py", "irl_loss")], regions=[("sps.py", STEP5)],
        teaches="SPS: an inverse-RL step that spreads probability over several correct trajectories",
        equation="sps.py docstring, S2/S4 (Huo et al., arXiv:2604.16995, cf. its Eq. 4; a reconstruction)",
        hint="the cross-entropy of the target q against the Boltzmann distribution of the scores at temperature T, "
             "over the support only; 'literal' flips its sign; step 5 (the hardest option): grpo.py's, plus the "
             "IRL step 5b as sps.py's docstring orders it",
        tests=["tests/test_sps.py::test_irl_loss_falls_as_p_moves_toward_q_and_the_literal_sign_rises",
               "tests/test_sps.py::test_irl_gradient_is_p_minus_q",
               "tests/test_sps.py::test_irl_loss_over_the_demonstrations_has_its_minimum_at_equal_scores_"
               "and_ignores_wrong_rollouts",
               "tests/test_sps.py::test_irl_every_0_is_grpo_bit_for_bit",
               "tests/test_sps.py::test_end_to_end_logs_the_sps_diagnostics"],
        run="python sps.py --seed 0 --eval-samples 64", row="SPS",
        study="pass@1 0.295 +- 0.040, pass@64 0.697 +- 0.006, entropy 0.331 +- 0.003, "
              "distinct correct 2.827 +- 0.224"),
}
for e in EXERCISES.values():
    e.setdefault("functions", [])
    e.setdefault("regions", [])
for n in (1, 2):  # the run after parts 1 and 2
    PARTS[n].update(run="python grpo.py", expect=DEFAULT_RUN)

# Expressions outside the exercises that would give one away; in the copy they call the exercise's function instead.
REWRITES = {"grpo.py": [
    ('"""k3 estimator of KL(pi_theta || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 (Schulman 2020)."""',
     '"""k3 estimator of KL(pi_theta || pi_ref) per token (Schulman 2020). logp, ref_logp: [n, T] -> [n, T]."""'),
    ("whole optimizer batch over ALL ranks (hence the factor world_size(), which the rank average divides out).",
     "whole optimizer batch over ALL ranks; FSDP averages the ranks' gradients.")]}

QUESTIONS = [  # think first, then run the experiment that answers it
    dict(q="Strictly on-policy (one optimizer step per rollout batch) the ratio rho_t = pi_theta / pi_old is exactly "
           "1 in value, so the clip never acts. Why does the update still move the policy? What is the gradient of "
           "rho_t at pi_theta = pi_old, and what does `clip/frac` read? When does the clip start to matter?",
         experiment="python grpo.py --clip-high 0.28 --ppo-epochs 2",
         expect="clip/frac exactly 0 in the default run, 0.29% of tokens over both passes here; seed 0 here: "
                "pass@1 0.338, pass@16 0.490, eval entropy 0.219, distinct correct 0.92 (default: 0.352, 0.540, "
                "0.248, 0.96). The study (README, 3 seeds, --eval-samples 64): pass@64 0.430 +- 0.044 against "
                "0.577 +- 0.035, entropy 0.174 +- 0.045 against 0.248 +- 0.010", measured="grpo-ch2"),
    dict(q="token-mean (DAPO) against sequence-mean (GRPO) and Dr. GRPO's fixed normaliser: in each, how much does "
           "one token of a long wrong answer weigh against one of a short right answer? Predict the effect on "
           "completion length and on pass@1.",
         experiment="python grpo.py --scale-rewards none --loss-agg seq-mean-token-sum-norm",
         expect="seed 0 here: pass@1 0.352 (as the default), pass@16 0.530 (0.540), eval entropy 0.221 (0.248), "
                "distinct correct 0.75 (0.96); completion/mean_len 11.4 in both: countdown's answers are ~11 "
                "tokens, so the length bias the question is about has little room here; say why",
         measured="grpo-drgrpo"),
    dict(q="What does a group in which all G answers are correct (or all wrong) teach the policy under GRPO? Read "
           "`frac_zero_std_groups` over training. What would an entropy bonus change for those groups?",
         experiment="python grpo.py --entropy-coef 0.05",
         expect="frac_zero_std_groups 0.46 averaged over the default run. The study (README, 3 seeds, "
                "--eval-samples 64): pass@1 0.290 +- 0.045, pass@64 0.693 +- 0.032, entropy 0.498 +- 0.027 against "
                "GRPO's 0.315 +- 0.059, 0.577 +- 0.035, 0.248 +- 0.010. But seed 0 here (--eval-samples 16) blew up: "
                "training entropy 0.42-0.49 to step 80, 1.19 at step 91; eval pass@1 0.347 at step 75 and 0.000 at "
                "step 100 (eval entropy 5.2). Explain what in the bonus lets that happen", measured="grpo-ent"),
]
# Measured by running the reference solutions through the handout's commands on a shared 2-core machine (load average
# 4-9 from other jobs), OMP_NUM_THREADS=1: the CPU time of the one core a command uses (user + sys), which is what a
# laptop core gives; wall time was inflated by the load. The numbers: this repository's seed-0 runs, one each.
MEASURED = {
    "part1": "about 1 min of grading (11 s a command) and 2.5 min for the run",
    "part2": "about 2.5 min of grading (the 60-step learning test 68 s and torchrun 31 s, wall time under load) and "
             "2.5 min for the run",
    "grpo": "150 s of one core",
    "grpo-ch2": "223 s of one core", "grpo-drgrpo": "144 s of one core", "grpo-ent": "165 s of one core",
    "part3": "about 9 min: the three experiments (3.7, 2.4 and 2.8 min) and eval.py compare",
    "arm": "227 s of one core",
    "arm:numbers": "; the reference solutions here, seed 0: pass@1 0.363, pass@64 0.650, entropy 0.276, distinct "
                   "correct 1.74 (pass@1 within one std; the others within two: one seed against three)",
    "part4": "about 1 min of grading (arm, lp-reg: 36 s; sps: 40 s; thr: 73 s) and 4-8 min for the run (arm: 3.8 "
             "min of one core; README's study: 5-10 min a method run)",
    "grpo:numbers": "; the reference solutions reproduced it exactly here (0.139 -> 0.352, pass@16 0.710 -> 0.540)",
}


def stub_text(name, where):
    return f'raise NotImplementedError("exercise {name} ({where}): {EXERCISES[name]["hint"]}")'


def solutions(text, functions=(), regions=()):
    """[(first line, last line, indent)] (1-based, inclusive) of each named top-level function's body after its
    docstring, and of each training-loop region (first comment, second comment) inside `train`."""
    out = []
    tree = ast.parse(text)
    for fn in [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in functions]:
        first = fn.body[1]  # body[0] is the docstring
        out.append((first.lineno, fn.end_lineno, first.col_offset))
    lines = text.split("\n")
    for start, end in regions:
        a = [i for i, l in enumerate(lines) if l.strip().startswith(start)]
        b = [i for i, l in enumerate(lines) if l.strip().startswith(end)]
        if len(a) != 1 or len(b) != 1 or b[0] <= a[0]:
            raise SystemExit(f"error: the region {start!r} .. {end!r} is not found once in order: fix STEP5")
        indent = len(lines[a[0]]) - len(lines[a[0]].lstrip())
        out.append((a[0] + 2, b[0], indent))  # the first comment stays: it names the step
    return out


def stub(text, path):
    """text of the file `path` with every exercise's solution in it stubbed and REWRITES applied; returns
    (text, exercises stubbed)."""
    cuts, done = [], []
    for name, e in EXERCISES.items():
        fs = [f for p, f in e["functions"] if p == path]
        rs = [r for p, r in e["regions"] if p == path]
        if fs or rs:
            done.append(name)
            for first, last, indent in solutions(text, functions=fs):
                cuts.append((first, last, " " * indent + stub_text(name, path)))
            for first, last, indent in solutions(text, regions=rs):
                cuts.append((first, last, " " * indent + stub_text(name, f"{path} step 5")))
    lines = text.split("\n")
    for first, last, line in sorted(cuts, reverse=True):  # bottom up, so earlier line numbers stay valid
        lines[first - 1:last] = [line]
    text = "\n".join(lines)
    for old, new in REWRITES.get(path, []):
        if text.count(old) != 1:
            raise SystemExit(f"error: REWRITES: {old!r} is not in {path} exactly once: update student.py")
        text = text.replace(old, new)
    return text, done


def student_copy(out_dir):
    """Copy the repository to out_dir with the exercises stubbed and HANDOUT.md; returns the stubbed exercises."""
    if os.path.exists(out_dir):
        sys.exit(f"error: {out_dir} exists: pass a new directory")
    files = {p for e in EXERCISES.values() for p, _ in e["functions"] + e["regions"]} | set(REWRITES)
    done = set()
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in {".git", "__pycache__", "runs", ".pytest_cache"}
                         and not d.startswith(".venv"))
        rel = os.path.relpath(top, ROOT)
        os.makedirs(os.path.join(out_dir, rel), exist_ok=True)
        for f in names:
            src, dst, path = os.path.join(top, f), os.path.join(out_dir, rel, f), os.path.normpath(os.path.join(rel, f))
            if path in INSTRUCTOR:
                continue  # the wrong solutions and what regenerates the copy; the snapshots go with the graders
            if path == "README.md":  # its teaching section is the instructor's: the student's is the handout
                text = open(src, encoding="utf-8").read()
                head = "## Teaching with this repository\n"
                start = text.index(head) + len(head)
                end = text.find("\n## ", start)
                text = text[:start] + "\nThis is a course copy: start with HANDOUT.md.\n" + text[end:]
                with open(dst, "w", encoding="utf-8") as out:
                    out.write(text)
            elif path in files:
                text, names_done = stub(open(src, encoding="utf-8").read(), path)
                done |= set(names_done)
                with open(dst, "w", encoding="utf-8") as out:
                    out.write(text)
            else:
                shutil.copy2(src, dst)
    with open(os.path.join(out_dir, "HANDOUT.md"), "w", encoding="utf-8") as out:
        out.write(handout())
    missing = set(EXERCISES) - done
    if missing:
        sys.exit(f"error: no solution region for {', '.join(sorted(missing))}")
    return sorted(done)


def grade(name):
    return "python -m pytest -q " + " ".join(EXERCISES[name]["tests"])


def handout():
    """HANDOUT.md, from PARTS, EXERCISES, QUESTIONS and MEASURED."""
    def took(key):
        return f" ({MEASURED[key]})" if key in MEASURED else ""
    out = ["# Exploration in RL for LLM reasoning: the handout", "",
           "Generated by student.py from the same data that removed the answers from this copy. You fill in "
           "the `NotImplementedError`s; each names its exercise and points to the equation. Every command below runs "
           "on a laptop CPU (the tiny model and the countdown task; times measured on a shared 2-core machine, "
           "one thread). Run them from this directory.", "", "## Learning objectives", ""]
    out += [f"{n}. {p['objectives'][0].upper() + p['objectives'][1:]}." for n, p in PARTS.items()]
    total = sum(e["points"] for e in EXERCISES.values() if not e.get("option")) + 20 + 30
    out += ["", f"## Parts, in order ({total} points)", "",
            "Do the parts in order: the scripts call part 1's functions and part 2's loop, so nothing trains until "
            "both pass. Points are for passing the grading command (code) and for the deliverable (runs, writing).",
            ""]
    for n, p in PARTS.items():
        pts = {3: 20, 4: 30}.get(n, sum(e["points"] for e in EXERCISES.values() if e["part"] == n))
        out += [f"### Part {n}: {p['title']} ({pts} points)", "", f"Time: {MEASURED['part%d' % n]}.", "",
                f"Deliverable: {p['deliverable']}.", ""]
        if n == 3:
            out += ["Think first: write your prediction before you run anything.", ""]
            for i, q in enumerate(QUESTIONS, 1):
                out += [f"{i}. {q['q']}", "", f"   Experiment{took(q['measured'])}: `{q['experiment']}` then "
                        f"`python eval.py compare runs/<default run> runs/<this run>`. Expect: {q['expect']}"
                        f"{MEASURED.get(q['measured'] + ':numbers', '')}.", ""]
            continue
        if n == 4:
            out += ["Choose ONE method. Its function and its script's step 5 are removed (the script is GRPO plus "
                    "the method: start from your grpo.py step 5 and read the method's section of README). 10 points "
                    "for the function's graders, 10 for the step-5 graders (the script at its GRPO setting must train "
                    "exactly like grpo.py), 10 for reproducing the study's row within its spread (the row: README, "
                    "'Every method, same task, budget and seeds').", ""]
        for name, e in EXERCISES.items():
            if e["part"] != n:
                continue
            where = ", ".join([f"`{p}: {f}`" for p, f in e["functions"]] + [f"`{p}: step 5`" for p, _ in e["regions"]])
            out += [f"#### {name} ({e['points']} points): {where}", "", f"- Teaches: {e['teaches']}.",
                    f"- Equation: {e['equation']}.", f"- Hint: {e['hint']}.", f"- Grade: `{grade(name)}`"]
            if e.get("option"):
                out += [f"- Run after{took(name)}: `{e['run']}`; expect the study's '{e['row']}' row (README; final "
                        f"step, mean +- std over 3 seeds): {e['study']}{MEASURED.get(name + ':numbers', '')}."]
            out.append("")
        if "run" in p:
            out += [f"Run after the part{took('grpo')}: `{p['run']}`; expect {p['expect']}"
                    f"{MEASURED.get('grpo:numbers', '')}.", ""]
    out += ["## Notes", "",
            "- A run writes runs/<name>/metrics.jsonl; eval.py's compare tabulates runs and its plot draws them "
            "(README, 'Evaluating and comparing runs').",
            "- The tiny model's weights differ in floating point from one CPU to another, so numbers move a little "
            "between machines; compare with the spread, not the third digit.", ""]
    return "\n".join(out)


def commands():
    """Every command the handout asks a student to run: the grading commands, the runs after, the experiments."""
    return sorted({grade(n) for n in EXERCISES} | {e["run"] for e in EXERCISES.values() if "run" in e}
                  | {p["run"] for p in PARTS.values() if "run" in p} | {q["experiment"] for q in QUESTIONS})


if __name__ == "__main__":
    if sys.argv[1:] == ["--handout"]:
        print(handout())
        sys.exit(0)
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python student.py OUT_DIR | python student.py --handout")
    student_copy(sys.argv[1])
    print(f"wrote {sys.argv[1]} and {sys.argv[1]}/HANDOUT.md; grade an exercise there with the command beside it:")
    for name in EXERCISES:
        print(f"  {name:18} {grade(name)}")
