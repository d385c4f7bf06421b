"""SPS: Steering Probability Squeezing -- GRPO interleaved with an inverse-RL step on the policy's own correct rollouts.

Paper: Huo et al., "SPS: Steering Probability Squeezing for Better Exploration in Reinforcement Learning for Large
Language Models", arXiv:2604.16995 (Findings of ACL 2026). Only the abstract was available to us and no code has been
released: everything below the idea is a principled RECONSTRUCTION, not the authors' method.

Idea: on-policy RL is winner-take-all among correct solutions -- the more probable of two equally correct trajectories
gains logit faster (E[dz_tau] = eta pi(tau) (r(tau) - b)), so pass@1 rises while pass@k falls ("probability squeezing").
SPS follows every GRPO step with an inverse-RL step that treats the policy's own correct rollouts as demonstrations,
the policy's length-normalised log-likelihood as the implicit reward, and fits the group's Boltzmann distribution to
the uniform distribution over the correct rollouts with a mass-covering forward KL. In the tabular picture its
gradient is dz_i ~ q_i - p_i: the dominant correct rollout is pushed down to a uniform share, rare correct ones up.

    RL step   : grpo.py's update, unchanged (clipped surrogate on group advantages; see grpo.py)
    IRL step  : on the same rollouts, with the weights after the RL step (paper Eq. 4 as we reconstruct it):
        s_i   = (1/|o_i|) sum_t log pi_theta(o_{i,t} | .)                 implicit reward (length-normalised)
        p     = softmax(s / T_s) over the group's correct rollouts        Boltzmann distribution over the demonstrations
        q_i   = 1/D split over the copies of each distinct correct rollout (D distinct correct), 0 otherwise
        L_IRL = (1/#groups) sum_{groups with D >= 2} -sum_i q_i log p_i   = KL(q || p) + H(q) >= H(q), minimised
                #groups = all the step's groups (groups without demonstrations contribute 0, as in the token-mean RL
                loss)
        theta <- theta - eta_irl * clamp(grad(lambda_irl L_IRL) / (sqrt(v_hat_RL) + eps), -1, 1)    (v_hat_RL: the RL
                AdamW's second moment, so the IRL step is measured in the RL step's units; see preconditioned_step)

Choices (all reconstructed or UNCONFIRMED; default first, each a flag):
    sign              minimise KL(q || p)  | --irl-sign literal: the paper's printed "minimise -KL" (a sign
                                             slip; ablation)
    support of p      the demonstrations   | --irl-support group: all G rollouts (our first reconstruction). Over
                                             the group, q = 0 on wrong rollouts puts the minimum at their score = -inf:
                                             the gradient lowers their log-likelihood at every step (an unlikelihood
                                             term on top of the RL step). Over the demonstrations it only evens out the
                                             correct rollouts' scores (README, Results: why the default changed).
    normalisation     over the group       | --irl-variant nll: token-mean NLL on a FIFO buffer of correct rollouts of
                                             EARLIER steps (--irl-buffer; on fresh samples its expected gradient is
                                             zero)
    demonstrations    correct rollouts     | --irl-demos all
    target q          uniform over distinct correct rollouts | --irl-target counts (reproduces the squeezed
                                             distribution; ablation)
    score             length-normalised log-likelihood | --irl-score sum (raw) | ratio (length-normalised log-ratio to
                                             the initial model, which is then loaded); --irl-temperature T_s = 1.0
    schedule          IRL after every RL step, its own optimizer step | --irl-every K (0 = never: exactly grpo.py);
                                             --irl-schedule summed: one step on -J_RL + lambda L_IRL; --irl-coef lambda
                                             = 1
    optimizer         precond: a plain step scaled by the RL AdamW's second moments (no momentum re-applied, no state of
                                             its own, so --resume is exact and lambda_irl sets the IRL step's size
                                             relative to the RL step); lr = current lr x --irl-lr-scale |
                                             --irl-optimizer separate: its own AdamW (Adam's scale invariance makes
                                             every IRL step full-size whatever lambda or the gradient; moments not
                                             checkpointed)
                                             | shared: grpo.py's AdamW (its momentum re-applies the RL step)
    #groups           all the step's groups | --irl-norm eligible: only those with >= 2 distinct demonstrations
    eligible groups   >= 2 DISTINCT demonstrations (a group whose correct rollouts are one repeated sequence has nothing
                                             to flatten); others are skipped. Not a flag.

Diagnostics (every eval, prefix sps/): on a fixed probe set (--probe-prompts training prompts x G rollouts, fixed
sampling keys): top-1 share and effective number exp(H) of the group distribution over distinct rollouts, all and
correct-only; mean top-1 token probability and fraction of positions with top-1 > 0.99; distinct correct answers; the
IRL loss before/after the IRL step; the change in correct-only top share caused by the RL step vs by the IRL step.
Upper bounds on pass@k (definitions UNCONFIRMED): U1 = base model pass@n (the step-0 eval), U2 = fraction of eval
problems solved by at least one evaluation of this run, U3 = saturation of pass@k vs log k (geometric extrapolation of
the per-doubling gains). Every step: sps/irl_loss, sps/irl_groups, sps/irl_grad_norm, sps/d_top_rl (train batch).

Run it:
    python sps.py                                                      # CPU demo: tiny model, countdown, a few minutes
    python sps.py --model Qwen/Qwen2.5-Math-1.5B --dataset math-lighteval --eval-datasets math500,aime24,amc23 \\
        --prompts-per-step 128 --max-new-tokens 3072 --lr 1e-6 --steps 500 --micro-batch-size 8      # one GPU
    torchrun --nproc_per_node 8 sps.py --model Qwen/Qwen2.5-7B ...                                   # FSDP2, 8 GPUs
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from common import (BaseArgs, aggregate_loss, all_sum_dict, autocast, compute_rewards, due, evaluate_all, fault_point,
                    format_prompt, generate, init_distributed, load_eval_sets, load_model, load_reference,
                    load_train_set, log_step, loss_fault, main, micro_batches, optimizer_step, print_summary, progress,
                    require, resume_or_evaluate, rollout_batch, rollout_engine, rollout_logprobs, rollout_metrics,
                    rollout_sums, save_checkpoint, set_lr, shard_model, start_run, step_groups, system_metrics,
                    time_metrics, token_logprobs, truncated_is_weight)
from common import (all_sum, answer_key, clip_grad_norm, count_skip, gather_objects, load_checkpoint,  # SPS
                    sample_keys, truncate_metrics)


@dataclass
class Args(BaseArgs):
    clip_low: float = field(default=0.2, metadata={"help": "PPO clip eps_low: ratio floor 1 - eps_low"})
    clip_high: float = field(default=0.2, metadata={
        "help": "PPO clip eps_high: ratio ceiling 1 + eps_high (DAPO clip-higher: 0.28)"})
    loss_agg: str = field(default="token-mean", metadata={
        "choices": ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
        "help": "token-mean (DAPO) | seq-mean-token-mean (GRPO) | seq-mean-token-sum-norm (Dr. GRPO)"})
    scale_rewards: str = field(default="group", metadata={
        "choices": ["group", "none"], "help": "group: divide by the group std (GRPO) | none: Dr. GRPO"})
    kl_coef: float = field(default=0.0, metadata={
        "help": "beta of the k3 KL to the initial model (0: no reference model is loaded)"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus coefficient"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    mini_batches: int = field(default=1, metadata={"help": "optimizer steps per pass (1 = strictly on-policy)"})
    irl_every: int = field(default=1, metadata={
        "help": "SPS: an IRL step after every K-th RL step (K_irl; 0 = never, exactly grpo.py)"})
    irl_coef: float = field(default=1.0, metadata={
        "help": ("SPS: lambda_irl, weight of the IRL loss (with a separate Adam step it mainly matters for "
                 "--irl-schedule summed)")})
    irl_lr_scale: float = field(default=1.0, metadata={
        "help": "SPS: eta_irl = current lr x this (the IRL step's learning rate)"})
    irl_schedule: str = field(default="separate", metadata={
        "choices": ["separate", "summed"],
        "help": "SPS: separate: its own optimizer step after the RL step | summed: one step on -J_RL + lambda L_IRL"})
    irl_optimizer: str = field(default="precond", metadata={
        "choices": ["precond", "separate", "shared"],
        "help": ("SPS: precond: a step preconditioned by the RL AdamW's second moments (no state of its own) | "
                 "separate: own AdamW state | shared: grpo.py's AdamW (its momentum re-applies the RL step)")})
    irl_variant: str = field(default="group", metadata={
        "choices": ["group", "nll"],
        "help": ("SPS: group: KL(q || softmax(s / T_s)) per group | nll: token-mean NLL on a buffer of earlier "
                 "correct rollouts")})
    irl_sign: str = field(default="kl", metadata={
        "choices": ["kl", "literal"],
        "help": "SPS: kl: minimise KL(q || p) | literal: minimise -KL as printed (ablation)"})
    irl_demos: str = field(default="correct", metadata={
        "choices": ["correct", "all"],
        "help": "SPS: demonstrations: the correct rollouts | all rollouts"})
    irl_target: str = field(default="uniform", metadata={
        "choices": ["uniform", "counts"],
        "help": "SPS: q uniform over distinct demonstrations | proportional to their counts (ablation)"})
    irl_score: str = field(default="mean", metadata={
        "choices": ["mean", "sum", "ratio"],
        "help": "SPS: implicit reward s: mean token log-prob | sum | mean log-ratio to the initial model"})
    irl_temperature: float = field(default=1.0, metadata={
        "help": "SPS: T_s of the group Boltzmann distribution softmax(s / T_s)"})
    irl_support: str = field(default="demos", metadata={
        "choices": ["demos", "group"],
        "help": ("SPS: p = softmax(s / T_s) over the demonstrations (bounded: redistributes among correct "
                 "rollouts) | over the whole group (spec; also pushes wrong rollouts down without bound)")})
    irl_norm: str = field(default="batch", metadata={
        "choices": ["batch", "eligible"],
        "help": ("SPS: L_IRL / #groups over all the step's groups (like the token-mean RL loss) | over eligible "
                 "groups only")})
    irl_buffer: int = field(default=1024, metadata={
        "help": "SPS --irl-variant nll: capacity (rollouts per rank) of the FIFO buffer of earlier correct rollouts"})
    probe_prompts: int = field(default=4, metadata={
        "help": "SPS diagnostics: fixed training prompts (x G rollouts) probed at every eval (0 = off)"})

    def __post_init__(self):
        super().__post_init__()  # also checks every field's "choices"
        require(self.clip_low >= 0 and self.clip_high >= 0, "--clip-low and --clip-high must be >= 0")
        require(self.kl_coef >= 0 and self.entropy_coef >= 0, "--kl-coef and --entropy-coef must be >= 0")
        require(self.ppo_epochs >= 1 and self.mini_batches >= 1, "--ppo-epochs and --mini-batches must be >= 1")
        require(self.irl_every >= 0, f"--irl-every must be >= 0 (got {self.irl_every})")
        require(self.irl_coef >= 0 and math.isfinite(self.irl_coef),
                f"--irl-coef must be a number >= 0 (got {self.irl_coef})")
        require(self.irl_lr_scale > 0 and math.isfinite(self.irl_lr_scale),
                f"--irl-lr-scale must be > 0 (got {self.irl_lr_scale})")
        require(self.irl_temperature > 0, f"--irl-temperature must be > 0 (got {self.irl_temperature})")
        require(self.irl_buffer >= 1, f"--irl-buffer must be >= 1 (got {self.irl_buffer})")
        require(self.probe_prompts >= 0, f"--probe-prompts must be >= 0 (got {self.probe_prompts})")
        require(not (self.irl_variant == "nll" and self.irl_schedule == "summed"),
                "--irl-variant nll needs --irl-schedule separate")


def group_advantages(rewards, group_size, scale="group", eps=1e-6):
    """A_i = (r_i - mean_g r) / (std_g r + eps) within each group of G consecutive completions. rewards: [N] -> [N]."""
    r = rewards.view(-1, group_size)  # [N/G, G]
    a = r - r.mean(-1, keepdim=True)
    if scale == "group":
        a = a / (r.std(-1, keepdim=True) + eps)  # unbiased std, as in the reference implementations
    return a.flatten()


def policy_loss(logp, old_logp, advantages, clip_low, clip_high):
    """PPO clipped surrogate per token. logp, old_logp: [N, T]; advantages: [N, 1] or [N, T].
    Returns (loss [N, T], clipped [N, T])."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def kl_k3(logp, ref_logp):
    """k3 estimator of KL(pi_theta || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 (Schulman 2020)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def implicit_reward(logp, mask, score="mean", ref_logp=None):
    """s_i, the policy's implicit reward of rollout i. logp, mask, ref_logp: [N, T] -> [N].
    mean: (1/|o_i|) sum_t log pi(o_t) (default) | sum: sum_t log pi(o_t) | ratio: (1/|o_i|) sum_t log pi(o_t) /
    pi_ref(o_t)."""
    if score == "ratio":
        logp = logp - ref_logp
    total = (logp * mask).sum(-1)  # [N]
    return total if score == "sum" else total / mask.sum(-1).clamp(min=1)


def first_copy(completions, group_size):
    """Index, within its group, of the first completion identical to each one (equal values = the same trajectory).
    completions: N token lists, groups of G consecutive -> [N/G, G] long."""
    out = []
    for g in range(0, len(completions), group_size):
        seen = {}
        out.append([seen.setdefault(tuple(c), j) for j, c in enumerate(completions[g:g + group_size])])
    return torch.tensor(out, dtype=torch.long)


def irl_target(demos, first, target="uniform"):
    """The target q over each group's G rollouts, and D = the number of distinct demonstrations per group.
    demos: [B, G] bool (correct rollouts, or all); first: [B, G] from first_copy. Returns (q [B, G], D [B]).
    uniform: each distinct demonstration gets 1/D, split equally over its copies | counts: each demonstration rollout
    1/|C|."""
    demos = demos.float()
    same = first[:, :, None] == first[:, None, :]  # [B, G, G]: rollouts i and j are the same trajectory
    copies = (same.float() * demos[:, None, :]).sum(-1).clamp(min=1)  # [B, G]: multiplicity among the demonstrations
    distinct = (demos / copies).sum(-1)  # [B]: D
    if target == "uniform":
        return demos / copies / distinct.clamp(min=1)[:, None], distinct
    return demos / demos.sum(-1, keepdim=True).clamp(min=1), distinct


def irl_loss(scores, q, temperature=1.0, sign="kl", support=None):
    """Per-group IRL loss -sum_i q_i log p_i with p = softmax(s / T_s) (= KL(q || p) + H(q); Eq. 4 as reconstructed).
    scores, q: [B, G] -> [B]. support: [B, G] bool, the rollouts p is normalised over (None: the whole group). Over the
    demonstrations, the minimum H(q) is reached when their scores are equal; over the whole group it is only approached
    as the other rollouts' scores go to -inf, so its gradient never stops pushing them down. sign 'literal' minimises
    -KL instead, as printed in the paper (ablation)."""
    z = scores / temperature if support is None else (scores / temperature).masked_fill(~support, float("-inf"))
    log_p = torch.log_softmax(z, -1)  # [B, G]: the Boltzmann distribution over the group (or its demonstrations)
    loss = -torch.where(q > 0, q * log_p, 0.0).sum(-1)  # [B]; q = 0 outside the support
    return loss if sign == "kl" else -loss


def squeezing(scores, first, keep, temperature=1.0):
    """Top-1 share max p and effective number of trajectories exp(H(p)) of p = softmax(s / T_s) over each group's
    DISTINCT rollouts among `keep` (all, or correct only). scores, first: [B, G]; keep: [B, G] bool -> ([B], [B]), NaN
    if empty."""
    live = keep & (first == torch.arange(first.shape[1], device=first.device))  # one entry per distinct trajectory
    p = torch.nan_to_num(torch.softmax((scores / temperature).masked_fill(~live, float("-inf")), -1))  # [B, G]
    n_eff = torch.exp(-(p * p.clamp_min(1e-30).log()).sum(-1))
    empty = ~live.any(-1)
    return p.max(-1).values.masked_fill(empty, float("nan")), n_eff.masked_fill(empty, float("nan"))


def saturation(pass_at):
    """U3: the level pass@k saturates at as k grows, from pass@k at k = 1, 2, 4, ..., n (list): the gains per doubling
    of k are extrapolated geometrically (ratio of the last two gains); 1.0 if they do not shrink (no saturation
    seen)."""
    if len(pass_at) < 3:
        return pass_at[-1]
    prev, last = pass_at[-2] - pass_at[-3], pass_at[-1] - pass_at[-2]
    if last <= 0:
        return pass_at[-1]
    if prev <= last:
        return 1.0
    r = last / prev
    return min(1.0, pass_at[-1] + last * r / (1 - r))


def nanmean(x):
    x = torch.as_tensor(x, dtype=torch.float64)
    return float(x[~x.isnan()].mean()) if (~x.isnan()).any() else float("nan")


@torch.no_grad()
def preconditioned_step(optimizer, lr):
    """The IRL step in the RL step's units: theta -= lr * clamp(g / (sqrt(v_hat) + eps), -1, 1), with v_hat the RL
    AdamW's
    bias-corrected second moment. Unlike a step of its own Adam, the size follows the IRL gradient's magnitude relative
    to the RL gradients (so lambda_irl matters) and no momentum is re-applied; the clamp keeps any coordinate within
    one Adam-sized step (lr) where the RL gradient was ~0. Parameters the RL step never updated are left alone."""
    for group in optimizer.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if p.grad is None or "exp_avg_sq" not in state:
                continue
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
            p.sub_(lr * (p.grad / (v_hat.sqrt() + eps)).clamp(-1, 1))


def irl_gradients(model, samples, rewards, first, batch, ref_logp, buffer, args, world, device, pad):
    """Accumulate the gradient of lambda_irl * L_IRL into the parameters (no optimizer step). Every rank runs as many
    forwards/backwards as the busiest one (ranks with nothing to fit run a zero-weight micro-batch). Returns None when
    no rank has anything to fit (then all ranks skip together), else stats of this step's IRL loss BEFORE the update."""
    G, mb = args.group_size, args.micro_batch_size
    if args.irl_variant == "nll":  # token-mean NLL on earlier correct rollouts (spec: normalisation alternative)
        n_tokens = all_sum([sum(len(s["completion_ids"]) for s in buffer)], device)[0]
        if n_tokens == 0:
            return None
        n_micro, loss_sum = max(gather_objects(-(-len(buffer) // mb))), 0.0
        for j in range(n_micro):
            part, weight = (buffer[j * mb:(j + 1) * mb], 1.0) if buffer[j * mb:(j + 1) * mb] else (samples[:1], 0.0)
            ids, attn, mask, P = rollout_batch(part, pad, device)
            if world > 1:
                model.set_requires_gradient_sync(j == n_micro - 1)
            with autocast(device):
                logp, _ = token_logprobs(model, ids, attn, P, args.logprob_chunk)  # [n, T]
            nll = -(logp * mask).sum() * weight * (1 if args.irl_sign == "kl" else -1)
            (args.irl_coef * nll / n_tokens * world).backward()
            loss_sum += nll.item()
        return {"sps/irl_loss": all_sum([loss_sum], device)[0] / n_tokens}
    ids, attn, mask, P = batch
    demos = (rewards > 0) if args.irl_demos == "correct" else torch.ones_like(rewards, dtype=torch.bool)
    q, distinct = irl_target(demos.view(-1, G), first, args.irl_target)  # [N/G, G], [N/G]
    eligible = distinct >= 2  # groups with >= 2 distinct demonstrations; the others are skipped
    n_groups, n_all = all_sum([eligible.sum().item(), len(eligible)], device)
    if n_groups == 0:
        return None
    # groups without demonstrations contribute 0, as in token-mean
    n_norm = n_all if args.irl_norm == "batch" else n_groups
    groups, per = eligible.nonzero().squeeze(-1).tolist(), max(1, mb // G)  # micro-batches of whole groups
    n_micro, loss_sum = max(gather_objects(-(-len(groups) // per))), 0.0
    scores = torch.zeros(q.shape, device=device)  # [N/G, G]: s with the weights after the RL step (eligible groups)
    for j in range(n_micro):
        chunk, weight = (groups[j * per:(j + 1) * per], 1.0) if groups[j * per:(j + 1) * per] else ([0], 0.0)
        rows = torch.tensor([g * G + i for g in chunk for i in range(G)], device=device)
        if world > 1:
            model.set_requires_gradient_sync(j == n_micro - 1)  # reduce-scatter once, after the last micro-batch
        with autocast(device):
            logp, _ = token_logprobs(model, ids[rows], attn[rows], P, args.logprob_chunk)  # [n, T]
        s = implicit_reward(logp, mask[rows], args.irl_score, None if ref_logp is None else ref_logp[rows]).view(-1, G)
        support = demos.view(-1, G)[chunk] if args.irl_support == "demos" else None
        loss = irl_loss(s, q[chunk], args.irl_temperature, args.irl_sign, support) * weight  # [groups in chunk]
        (args.irl_coef * loss.sum() / n_norm * world).backward()  # world: FSDP averages gradients over ranks
        loss_sum += loss.sum().item()
        if weight:
            scores[chunk] = s.detach().float()
    return {"sps/irl_loss": all_sum([loss_sum], device)[0] / n_groups, "sps/irl_groups": n_groups / n_all,
            "scores": scores, "eligible": eligible}


@torch.no_grad()
def sample_probe(model, tokenizer, problems, args, device, ref_model):
    """The probe set's G rollouts per prompt, with keys fixed for the whole run (so evaluations differ only by the
    weights)."""
    G = args.group_size
    group = [p for p in problems for _ in range(G)]
    keys = torch.stack([sample_keys(args.seed, 1 << 29, i) for i in range(len(group))])
    samples = generate(model, tokenizer, [format_prompt(tokenizer, p) for p in group], keys, args.max_new_tokens,
                       args.temperature, args.top_p)
    texts = tokenizer.batch_decode([s["completion_ids"] for s in samples], skip_special_tokens=True)
    correct = torch.tensor(compute_rewards(group, texts), device=device) > 0  # [P * G]
    batch = rollout_batch(samples, tokenizer.pad_token_id, device)
    answers = [{answer_key(p, t) for p, t,
                c in zip(group[i:i + G], texts[i:i + G], correct[i:i + G]) if c} for i in range(0, len(group), G)]
    ref = probe_scores(ref_model, {"batch": batch}, args, device, raw=True)[0] if args.irl_score == "ratio" else None
    return {"batch": batch, "ref": ref, "correct": correct.view(-1, G),
            "first": first_copy([s["completion_ids"] for s in samples], G).to(device),
            "distinct_correct": sum(map(len, answers)) / len(answers)}


@torch.no_grad()
def probe_scores(model, probe, args, device, raw=False):
    """s [P, G] of the probe rollouts under the current weights, and token-level squeezing: mean top-1 token
    probability,
    fraction of positions whose top-1 probability exceeds 0.99. raw=True: the per-token log-probs [P * G, T] instead of
    s."""
    ids, attn, mask, P = probe["batch"]
    logp, top1 = [], []
    for i in range(0, len(ids), args.micro_batch_size):
        m = slice(i, i + args.micro_batch_size)
        with autocast(device):
            lp, _, t1 = token_logprobs(model, ids[m], attn[m], P, args.logprob_chunk, row_fn=lambda logits,
                                       t: logits.softmax(-1).max(-1).values)
        logp.append(lp.float()), top1.append(t1.float())
    logp, top1 = torch.cat(logp), torch.cat(top1)  # [P * G, T]
    if raw:
        return logp, None
    s = implicit_reward(logp, mask, args.irl_score, probe["ref"]).view(-1, args.group_size)
    return s, {"sps/probe/top1_token_prob": float((top1 * mask).sum() / mask.sum()),
               "sps/probe/frac_top1_gt_0.99": float(((top1 > 0.99) * mask).sum() / mask.sum())}


def probe_record(probe, s0, s1, s2, token_stats, args):
    """Squeezing diagnostics of the probe set; s0/s1/s2: scores before the RL step, after it, after the IRL step
    [P, G]."""
    correct, first, T = probe["correct"], probe["first"], args.irl_temperature
    top, n_eff = squeezing(s2, first, torch.ones_like(correct), T)
    top_c, n_eff_c = squeezing(s2, first, correct, T)
    rec = {"sps/probe/top_share": nanmean(top), "sps/probe/n_eff": nanmean(n_eff),
           "sps/probe/top_share_correct": nanmean(top_c),
           "sps/probe/n_eff_correct": nanmean(n_eff_c), "sps/probe/distinct_correct": probe["distinct_correct"],
           **token_stats}
    q, distinct = irl_target(correct, first, args.irl_target)
    if s1 is not None and (distinct >= 2).any():
        ok = distinct >= 2
        sup = correct[ok] if args.irl_support == "demos" else None
        # after the RL step
        rec["sps/probe/irl_loss_before"] = float(irl_loss(s1[ok], q[ok], T, args.irl_sign, sup).mean())
        # after the IRL step
        rec["sps/probe/irl_loss_after"] = float(irl_loss(s2[ok], q[ok], T, args.irl_sign, sup).mean())
        rec["sps/probe/d_top_rl"] = nanmean(squeezing(s1, first, correct, T)[0][ok] - squeezing(s0, first, correct,
                                                                                                T)[0][ok])
        rec["sps/probe/d_top_irl"] = nanmean(squeezing(s2, first, correct, T)[0][ok] - squeezing(s1, first, correct,
                                                                                                 T)[0][ok])
    return {k: v for k, v in rec.items() if not math.isnan(v)}  # NaN: no probe group with (two) correct rollouts


def upper_bounds(metrics, records, bounds, n):
    """U1 (base model pass@n, from the first evaluation), U2 (fraction of eval problems solved by any evaluation so far;
    `bounds` carries the solved indices between evaluations), U3 (saturation of pass@k vs log k). UNCONFIRMED
    definitions."""
    bounds.setdefault("U1", metrics[f"eval/pass@{n}"])
    solved = bounds.setdefault("solved", {})
    for name, recs in records.items():
        solved[name] = sorted(set(solved.get(name, [])) | {x["index"] for x in recs if x["correct"] > 0})
    u2 = sum(len(solved[name]) / max(len(recs), 1) for name, recs in records.items()) / len(records)
    ks = [2 ** i for i in range(int(math.log2(n)) + 1)]
    return {"sps/U1": bounds["U1"], "sps/U2": u2, "sps/U3": saturation([metrics[f"eval/pass@{k}"] for k in ks])}


def bounds_from_metrics(run_dir, n):
    """The U1/U2 state of upper_bounds as of the checkpoint, rebuilt from metrics.jsonl (which --resume has truncated to
    the checkpoint's step; sps_bounds.json may hold evaluations that a killed run made after its last checkpoint)."""
    bounds = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for r in map(json.loads, f):
            if f"eval/pass@{n}" in r:
                bounds.setdefault("U1", r[f"eval/pass@{n}"])
            for name in [k[5:-7] for k in r if k.startswith("eval/") and k.endswith("/solved")]:
                solved = bounds.setdefault("solved", {})
                solved[name] = sorted(set(solved.get(name, [])) | set(r[f"eval/{name}/solved"]))
    return bounds


def d_top_rl(irl, old_logp, rewards, mask, ref_logp, first, args, device):
    """Change of the correct-only top share of the IRL-eligible groups caused by the RL step (scores after it, from
    irl_gradients, minus the scores under pi_old), mean over ranks."""
    G = args.group_size
    ok, correct = irl["eligible"], (rewards > 0).view(-1, G)
    s_old = implicit_reward(old_logp.float(), mask, args.irl_score, ref_logp).view(-1, G)
    d = (squeezing(irl["scores"], first, correct, args.irl_temperature)[0]
         - squeezing(s_old, first, correct, args.irl_temperature)[0])
    s = all_sum_dict({"d": d[ok].nansum().item(), "n": (ok & ~d.isnan()).sum().item()}, device)
    return s["d"] / max(s["n"], 1)


def train(args):
    rank, world, device = init_distributed()
    run_dir = start_run(args, __file__, rank)
    model, tokenizer = load_model(args.model, device, rank)
    need_ref = args.kl_coef > 0 or args.irl_score == "ratio"  # SPS: --irl-score ratio also needs the initial model
    ref_model = load_reference(args.model, device, rank, world) if need_ref else None  # pi_ref for the KL
    model = shard_model(model, world, device, args.gradient_checkpointing).train()  # from_pretrained gives eval mode
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    irl_optimizer = optimizer  # SPS: the IRL step's optimizer (precond: the RL AdamW's moments)
    if args.irl_optimizer == "separate":
        irl_optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                                          weight_decay=args.weight_decay)
    train_set, eval_sets = load_train_set(args, tokenizer, model), load_eval_sets(args, tokenizer, model)
    engine = rollout_engine(args, model, tokenizer, rank)  # None: HF generate on the training model; else vLLM
    start, history, skipped, streak = 0, [], 0, 0
    bounds_path, bounds, buffer = os.path.join(run_dir, "sps_bounds.json"), {}, []  # SPS: U1/U2 state; nll buffer
    probe = train_set[:args.probe_prompts]  # SPS: fixed probe prompts for the squeezing diagnostics
    if args.resume:
        start, skipped, streak = load_checkpoint(run_dir, model, optimizer)
        truncate_metrics(run_dir, start, rank)
        bounds = bounds_from_metrics(run_dir, args.eval_samples) if rank == 0 else {}  # SPS: only rank 0 logs them
        if args.irl_optimizer == "separate" and rank == 0:  # SPS: only the default precond step resumes exactly
            print("warning: --irl-optimizer separate: the IRL AdamW's moments are not in the checkpoint; they restart "
                  "at zero", file=sys.stderr)
    else:
        metrics, records = evaluate_all(model, tokenizer, eval_sets, args, device, engine)
        record = {"step": 0, **metrics, **upper_bounds(metrics, records, bounds, args.eval_samples)}
        if probe:
            p0 = sample_probe(model, tokenizer, probe, args, device, ref_model)
            s0, token_stats = probe_scores(model, p0, args, device)
            record.update(probe_record(p0, s0, None, s0, token_stats, args))
        log_step(run_dir, record, history, rank)
    G, pad, on_policy = args.group_size, tokenizer.pad_token_id, args.ppo_epochs == args.mini_batches == 1
    bar = progress(start, args.steps, __file__, rank)
    for step in bar:
        t0, lr = time.time(), set_lr(optimizer, args, step)
        # 1. Rollouts: this rank's share of the step's B prompts, G completions each, from pi_old = the current weights.
        group, keys = step_groups(train_set, args, step, rank, world)  # [N = B / world * G] problems, groups contiguous
        samples = generate(model, tokenizer, [format_prompt(tokenizer, p) for p in group], keys,
                           args.max_new_tokens, args.temperature, args.top_p, engine=engine)
        t_rollout = time.time() - t0
        fault_point("rollout", step + 1)  # test-only: SIGKILL here when $EXPLORE_RLVR_FAULT says so
        # 2. Rewards from the verifier.
        texts = tokenizer.batch_decode([s["completion_ids"] for s in samples], skip_special_tokens=True)
        rewards = torch.tensor(compute_rewards(group, texts), dtype=torch.float32, device=device)  # [N]
        t_reward = time.time() - t0 - t_rollout
        # 3. Group-relative advantages, broadcast to every token of the completion.
        advantages = group_advantages(rewards, G, args.scale_rewards)  # [N]
        # 4. Old log-probs log pi_old(o_t) (and the reference model's) from a no-grad forward of the training model.
        ids, attn, mask, P = rollout_batch(samples, pad, device)  # [N, P+T], [N, P+T], [N, T]
        rollout_logp = rollout_logprobs(samples, mask)  # [N, T]: the engine's log pi(o_t) (vLLM), None with HF
        micro = [slice(i, i + args.micro_batch_size) for i in range(0, len(samples), args.micro_batch_size)]
        logprobs = lambda m, net=model: token_logprobs(net, ids[m], attn[m], P, args.logprob_chunk)  # noqa: E731
        with torch.no_grad(), autocast(device):
            old_logp, entropy = map(torch.cat, zip(*[logprobs(m) for m in micro]))
            ref_logp = torch.cat([logprobs(m, ref_model)[0] for m in micro]) if ref_model else None
        # 4b. SPS: is this an IRL step; at eval steps, the probe rollouts and their scores s0 before the RL step.
        irl_now, irl = args.irl_every > 0 and (step + 1) % args.irl_every == 0, None
        irl_pending = irl_now and args.irl_schedule == "summed"  # summed: L_IRL joins the first RL optimizer step
        first = first_copy([s["completion_ids"] for s in samples], G).to(device)  # [N/G, G]
        evaluating = due(args.eval_every, step + 1, args.steps)
        if evaluating and probe:
            p0 = sample_probe(model, tokenizer, probe, args, device, ref_model)
            s0 = probe_scores(model, p0, args, device)[0]
        # 5. Policy update: ppo_epochs x mini_batches optimizer steps on the clipped surrogate.
        rows, sums = torch.arange(len(samples), device=device), {"clipped": 0.0, "loss": 0.0}
        for epoch in range(args.ppo_epochs):
            for mb in rows.chunk(args.mini_batches):
                n = all_sum_dict({"tokens": mask[mb].sum().item(), "seqs": len(mb)}, device)
                optimizer.zero_grad(set_to_none=True)
                for m in micro_batches(model, mb, args.micro_batch_size, world):  # gradients reduced after the last
                    with autocast(device):
                        logp, ent = logprobs(m)  # [n, T]
                    token_loss, clipped = policy_loss(logp, old_logp[m], advantages[m, None], args.clip_low,
                                                      args.clip_high)
                    token_loss = token_loss * truncated_is_weight(old_logp[m], rollout_logp, m, args.tis_cap)  # TIS
                    if args.kl_coef > 0:
                        token_loss = token_loss + args.kl_coef * kl_k3(logp, ref_logp[m])
                    if args.entropy_coef > 0:
                        token_loss = token_loss - args.entropy_coef * ent
                    loss = aggregate_loss(token_loss, mask[m], args.loss_agg, n["tokens"], n["seqs"],
                                          args.max_new_tokens)
                    loss = loss * loss_fault(step + 1)  # test-only: inf on the steps $EXPLORE_RLVR_FAULT names, else 1
                    loss.backward()
                    sums["loss"] += loss.item() / (args.ppo_epochs * world)
                    sums["clipped"] += (clipped * mask[m]).sum().item()
                # SPS --irl-schedule summed: add grad(lambda L_IRL) at theta_old to this step's gradient
                if irl_pending:
                    irl, irl_pending = irl_gradients(model, samples, rewards, first, (ids, attn, mask, P), ref_logp,
                                                     buffer, args, world, device, pad), False
                grad_norm, skipped, streak = optimizer_step(model, optimizer, args, skipped, streak)  # non-finite: skip
        if evaluating and probe:
            s1 = probe_scores(model, p0, args, device)[0]
        # 5b. SPS: the IRL step on the same rollouts, scores recomputed with the weights after the RL step.
        if irl_now and args.irl_schedule == "separate":
            irl_optimizer.zero_grad(set_to_none=True)
            irl = irl_gradients(model, samples, rewards, first, (ids, attn, mask, P), ref_logp, buffer, args, world,
                                device, pad)
            if irl is not None:
                irl["sps/irl_grad_norm"] = clip_grad_norm(model, args.max_grad_norm)
                for g in irl_optimizer.param_groups:
                    g["lr"] = lr * args.irl_lr_scale  # eta_irl
                if not math.isfinite(irl["sps/irl_grad_norm"]):
                    skipped, streak = count_skip(irl["sps/irl_grad_norm"], skipped, streak, args.max_skipped_steps)
                elif args.irl_optimizer == "precond":
                    preconditioned_step(optimizer, lr * args.irl_lr_scale)
                else:
                    irl_optimizer.step()
                for g in irl_optimizer.param_groups:
                    g["lr"] = lr  # restores the shared optimizer's lr
        if args.irl_variant == "nll":  # earlier correct rollouts only: this step's join the buffer after its IRL step
            buffer = (buffer + [s for s, r in zip(samples, rewards.tolist()) if r > 0])[-args.irl_buffer:]
        fault_point("update", step + 1)
        t_train = time.time() - t0 - t_rollout - t_reward
        # 6. Metrics (sums by name, added over ranks), evaluation, checkpoint.
        s = all_sum_dict({**rollout_sums(rewards, mask, entropy, samples, G), **sums}, device)
        record = {"step": step + 1, **rollout_metrics(s, args.ppo_epochs), "grad_norm": grad_norm, "lr": lr,
                  "skipped_steps": skipped,
                  **time_metrics(t_rollout, t_reward, t_train, s, args.ppo_epochs + 1)}
        if irl is not None:  # SPS: IRL loss before its step; change of the correct-only top share caused by the RL step
            record.update({k: v for k, v in irl.items() if k.startswith("sps/")})
            if "scores" in irl and args.irl_schedule == "separate":
                record["sps/d_top_rl"] = d_top_rl(irl, old_logp, rewards, mask, ref_logp, first, args, device)
        if evaluating and probe:
            s2, token_stats = probe_scores(model, p0, args, device)
            record.update(probe_record(p0, s0, s1, s2, token_stats, args))
        record.update(system_metrics(engine, old_logp, rollout_logp, mask, args, device))
        samples_by_set = None
        if evaluating:
            metrics, samples_by_set = evaluate_all(model, tokenizer, eval_sets, args, device, engine)
            record.update(metrics)
            record.update(upper_bounds(metrics, samples_by_set, bounds, args.eval_samples))
            if rank == 0:
                json.dump(bounds, open(bounds_path, "w"))
        record["time/step"] = time.time() - t0
        log_step(run_dir, record, history, rank, bar, samples_by_set)
        if due(args.save_every, step + 1, args.steps):  # after the metric line
            save_checkpoint(run_dir, step + 1, model, optimizer, tokenizer, rank, skipped, streak)
    print_summary(run_dir, rank)


if __name__ == "__main__":
    main(train, Args)
