#!/usr/bin/env bash
# The README's side-by-side study: every method on the built-in task with grpo.py's default configuration (tiny model,
# countdown, 100 steps x 32 prompts x G = 8), n = 64 held-out samples per problem at every evaluation, one seed
# (SEED=0 by default) per invocation; about 5-10 minutes a run on one core (2 PPO epochs: more). Then eval.py compare (README)
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-0}
run() { name=$1; shift; [ -f runs/cmp-$name-s$SEED/checkpoint/trainer_state.json ] || python "$@" --seed $SEED --eval-samples 64 --run-dir runs/cmp-$name-s$SEED; }
run grpo      grpo.py
run lp_reg    lp_reg.py --rho 0.1            # rho so that regularisation fires on this small batch (README)
run thr+0.2   thr.py --p 0.2
run thr-0.2   thr.py --p -0.2
run arm       arm.py
run sps       sps.py
run grpo+ent  grpo.py --entropy-coef 0.05    # the baseline Lp-Reg compares with; 0.05: entropy visibly higher (README)
run grpo+ch2  grpo.py --clip-high 0.28 --ppo-epochs 2  # clip-higher (ARM's baseline), off-policy so the clip acts
run thr-nthr  thr.py --selection nthr --eta 0   # NTHR's rule with eta = 0 (the table's row; README)
run thr-nthr-adaptive thr.py --selection nthr  # NTHR's training runs: the adaptive eta 2|0.5 - p_hat|
run arm-mixed arm.py --arm-scope mixed       # the ablation: ARM also off in all-correct groups
