"""Plausible wrong solutions, for the mutation test in tests/test_student.py: each one, substituted for the reference
in a copy of the repository, must make its exercise's grading command fail. A wrong version is an edit of the
reference solution: (file, function or "step 5", old text, new text); every occurrence of old in that function's body
(or in the step-5 region) is replaced. Instructor-side: student.py leaves this folder out of the student copy."""
S5 = "step 5"
WRONG = {
    "group-advantages": {
        "population std": ("grpo.py", "group_advantages", "r.std(-1, keepdim=True)",
                           "r.std(-1, keepdim=True, unbiased=False)"),
        "baseline over the whole batch": ("grpo.py", "group_advantages", "a = r - r.mean(-1, keepdim=True)",
                                          "a = r - r.mean()"),
        "no eps (0 / 0 on an all-equal group)": ("grpo.py", "group_advantages", "(r.std(-1, keepdim=True) + eps)",
                                                 "r.std(-1, keepdim=True)"),
        "always scaled": ("grpo.py", "group_advantages", 'if scale == "group":', "if True:"),
    },
    "clipped-surrogate": {
        "ratio the wrong way round": ("grpo.py", "policy_loss", "torch.exp(logp - old_logp)",
                                      "torch.exp(old_logp - logp)"),
        "max instead of min": ("grpo.py", "policy_loss", "-torch.min(unclipped, clipped)",
                               "-torch.max(unclipped, clipped)"),
        "symmetric clip": ("grpo.py", "policy_loss", "1 + clip_high", "1 + clip_low"),
        "ratio detached (no gradient)": ("grpo.py", "policy_loss", "ratio = torch.exp(logp - old_logp)",
                                         "ratio = torch.exp(logp - old_logp).detach()"),
    },
    "k3": {
        "k2 = d^2 / 2": ("grpo.py", "kl_k3", "return torch.exp(d) - d - 1", "return d ** 2 / 2"),
        "ratio the wrong way round": ("grpo.py", "kl_k3", "d = ref_logp - logp", "d = logp - ref_logp"),
        "k1 = -log ratio": ("grpo.py", "kl_k3", "return torch.exp(d) - d - 1", "return -d"),
    },
    "loss-aggregation": {
        "no world_size() factor": ("grpo.py", "aggregate_loss", " * world_size()", ""),
        "this micro-batch's token count": ("grpo.py", "aggregate_loss", "/ n_tokens * world_size()",
                                           "/ mask.sum() * world_size()"),
        "sequence mean over T, not |o_i|": ("grpo.py", "aggregate_loss", "/ mask.sum(-1).clamp(min=1)",
                                            "/ mask.shape[-1]"),
        "sum-norm by the length": ("grpo.py", "aggregate_loss", "/ max_new_tokens", "/ mask.sum(-1).clamp(min=1)"),
    },
    "pass-at-k": {
        "biased 1 - (1 - c/n)^k": ("common.py", "pass_at_k",
                                   "return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))",
                                   "return 1.0 - (1.0 - c / n) ** k"),
        "product range off by one": ("common.py", "pass_at_k", "np.arange(n - c + 1, n + 1)", "np.arange(n - c, n)"),
        "1 / i instead of k / i": ("common.py", "pass_at_k", "1.0 - k / np.arange", "1.0 - 1 / np.arange"),
    },
    "training-loop": {
        "zero_grad per micro-batch (no accumulation)": (
            "grpo.py", S5, "                    with autocast(device):\n",
            "                    optimizer.zero_grad(set_to_none=True)\n                    with autocast(device):\n"),
        "no on-policy shortcut (pi_old left at 0)": (
            "grpo.py", S5, "old_logp[m], entropy[m] = logp.detach().float(), ent.detach().float()",
            "entropy[m] = ent.detach().float()"),
        "this micro-batch's counts": ("grpo.py", S5, 'totals["tokens"], totals["seqs"]',
                                      "mask[m].sum().item(), len(m)"),
        "pi_old refreshed at every step": ("grpo.py", S5, "if on_policy:  # ratio", "if True:  # ratio"),
        "KL arguments swapped": ("grpo.py", S5, "kl_k3(logp, ref_logp[m])", "kl_k3(ref_logp[m], logp)"),
    },
    "arm": {
        "confidence gap reversed": ("arm.py", "arm_advantages", "alpha * (c_prompt - c_answer)",
                                    "alpha * (c_answer - c_prompt)"),
        "every group shifted": ("arm.py", "arm_advantages", "shifted = c.any(-1, keepdim=True).expand_as(c)",
                                "shifted = torch.ones_like(c)"),
        "scope ignored": ("arm.py", "arm_advantages", 'if scope != "all":', "if False:"),
    },
    "thr": {
        "sign of A, not of THR": ("thr.py", "reweighted_advantages", "A * (1 + p * thr.sign())",
                                  "A * (1 + p * A.sign())"),
        "THR's value, not its sign": ("thr.py", "reweighted_advantages", "thr.sign()", "thr"),
        "mask_nondominant ignored": ("thr.py", "reweighted_advantages",
                                     "torch.zeros_like(A) if mask_nondominant else A", "A"),
    },
    "lp-reg": {
        "the largest, not the smallest": ("lp_reg.py", "bottom_rho", "topk(k, largest=False)",
                                          "topk(k, largest=True)"),
        "no k > 1 guard": ("lp_reg.py", "bottom_rho", "if k <= 1:", "if k < 1:"),
        "k rounded up": ("lp_reg.py", "bottom_rho", "k = int(len(flat) * rho)", "k = math.ceil(len(flat) * rho)"),
    },
    "sps": {
        "no temperature": ("sps.py", "irl_loss", "/ temperature", ""),
        "support ignored": ("sps.py", "irl_loss", '.masked_fill(~support, float("-inf"))', ""),
        "literal sign ignored": ("sps.py", "irl_loss", 'return loss if sign == "kl" else -loss', "return loss"),
        "softmax, not its log": ("sps.py", "irl_loss", "log_p = torch.log_softmax(z, -1)",
                                 "log_p = torch.softmax(z, -1)"),
    },
}
