"""Regenerate snapshots.json from the reference implementation (run once by the instructor, on the original repository,
never on a student copy): python tests/student_fixtures/make_snapshots.py. The inputs: test_course.snapshot_inputs."""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
from grpo import group_advantages, policy_loss  # noqa: E402
from test_course import snapshot_inputs  # noqa: E402

rewards, logp, old_logp, adv = snapshot_inputs()
out = {f"group_advantages/{G}/{scale}": group_advantages(rewards, G, scale).tolist()
       for G in (3, 6) for scale in ("group", "none")}
logp.requires_grad_()
for low, high in ((0.2, 0.2), (0.1, 0.28)):
    loss, clipped = policy_loss(logp, old_logp, adv, low, high)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    out[f"policy_loss/{low}/{high}"] = dict(loss=loss.tolist(), clipped=clipped.tolist(), grad=grad.tolist())
with open(os.path.join(HERE, "snapshots.json"), "w") as f:
    json.dump(out, f, indent=1)
print(f"wrote {os.path.join(HERE, 'snapshots.json')}")
