"""SPS: Steering Probability Squeezing -- GRPO interleaved with an inverse-RL step on the policy's own correct rollouts.

Papers: Shao et al., "DeepSeekMath" (arXiv:2402.03300) for GRPO; Yu et al., "DAPO" (arXiv:2503.14476) for
clip-higher and the token-mean loss; Liu et al., "Understanding R1-Zero-Like Training" (Dr. GRPO, arXiv:2503.20783).
SPS: Huo et al., "SPS: Steering Probability Squeezing for Better Exploration in Reinforcement Learning for Large
Language Models", arXiv:2604.16995 (Findings of ACL 2026); no code released. We had the abstract and a reader's re-check
of Eq. 4 and Algorithm 1 (PDF pp. 5 and 15); everything else of SPS here is our RECONSTRUCTION, not the authors' method.
UNCONFIRMED, ours (README's SPS section says why): minimising +KL (--irl-sign kl; Eq. 4 prints -KL and Algorithm 1
minimises it: --irl-sign literal, which we read as a slip), p over the demonstrations, the step S5, and every other
--irl-* flag and default. Diagnostics (sps/...): the block after irl_gradients; pass@k bounds U1-U3: eval.py compare.

Idea: sample G completions per prompt, score each with a verifier (reward 1 if the final answer is right), and use the
reward standardised within the group as every token's advantage; no value network. The update is PPO's clipped
surrogate on those advantages, here strictly on-policy by default (one update per rollout batch, ratio = 1).
SPS: such RL is winner-take-all among correct solutions (the likelier of two equally correct trajectories gains logit
faster, E[dz_tau] = eta pi(tau) (r(tau) - b)), so pass@1 rises while pass@k falls: "probability squeezing". After each
GRPO step an inverse-RL step takes the policy's correct rollouts as demonstrations, its log-likelihood as the implicit
reward, and fits the group's Boltzmann distribution to them by forward KL: dz_i ~ q_i - p_i, dominant down, rare up.

    A_i = (r_i - mean_g r) / (std_g r + eps)                                   group advantage (DeepSeekMath §4.1.2)
    L_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i),   rho_t = pi_theta(o_t) / pi_old(o_t)
    loss = aggregate(w_t L_t + beta * k3(pi_ref, pi_theta)_t - c_H * H_t)     (token-mean by default, DAPO Eq. 8)
    w_t = min(pi_old(o_t) / pi_rollout(o_t), C) when vLLM sampled, else 1         (truncated IS, Yao et al. 2025)
  the RL step above is grpo.py's, unchanged; the IRL step follows on the same rollouts, with the updated weights:
    s_i   = (1/|o_i|) sum_t log pi_theta(o_{i,t} | .)                                 implicit reward            (S1)
    p     = softmax(s / T_s) over the group's demonstrations (its correct rollouts)   Boltzmann distribution     (S2)
    q_i   = 1/D split over the copies of each of the group's D distinct demonstrations, 0 elsewhere              (S3)
    L_IRL = (1/#groups) sum_{groups with D >= 2} -sum_i q_i log p_i = KL(q || p) + H(q), minimised   (S4; cf. Eq. 4)
    theta <- theta - eta_irl clamp(grad(lambda_irl L_IRL) / (sqrt(v_hat) + eps), -1, 1), v_hat: the RL AdamW's   (S5)

Run it (SCRIPT: grpo.py or any method script, which takes the same flags plus the method's own):
    python SCRIPT                                                      # CPU demo: tiny model, countdown, a few minutes
    python SCRIPT --model Qwen/Qwen2.5-Math-1.5B --dataset math-lighteval --eval-datasets math500,aime24,amc23 \\
        --prompts-per-step 128 --max-new-tokens 3072 --lr 1e-6 --steps 500 --micro-batch-tokens 32768 \\
        --vllm-gpu-memory 0.6                                       # one GPU (add --dry-run: its memory plan)
    torchrun --nproc_per_node 8 SCRIPT --model Qwen/Qwen2.5-7B ... --micro-batch-tokens 32768     # FSDP2, 8 GPUs
"""
import math
import time
from dataclasses import dataclass, field

import torch

from common import main, require  # the flags
from common import init_distributed, load_model, load_reference, shard_model  # torchrun, FSDP2, models
from common import load_eval_sets, load_train_set, progress, resume_or_evaluate, set_lr, start_run  # the run
from common import format_prompt, generate, rollout_engine, step_groups  # 1. rollouts
from common import compute_rewards  # 2. rewards
from common import autocast, rollout_batch, rollout_logprobs, token_logprobs  # 4. log-probs
from common import all_sum_dict, micro_batches, optimizer_step  # 5. the update
from common import (due, evaluate_all, log_step, print_summary, rollout_metrics, rollout_sums,  # 6. metrics,
                    export_model, save_checkpoint, system_metrics, time_metrics)  # evaluation, checkpoints
from common import all_sum, answer_key, clip_grad_norm, count_skip, gather_objects, sample_keys, world_size  # SPS
from grpo import Args as GRPOArgs  # GRPO's flags; the method adds its own
from grpo import aggregate_loss, group_advantages, kl_k3, policy_loss, truncated_is_weight  # GRPO's math


@dataclass
class Args(GRPOArgs):
    irl_every: int = field(default=1, metadata={"help": "SPS: IRL step every K-th RL step (0: never, exactly grpo.py)"})
    irl_coef: float = field(default=1.0, metadata={
        "help": "SPS: lambda_irl, weight of the IRL loss: the IRL step's size relative to the RL step's"})
    irl_lr_scale: float = field(default=1.0, metadata={"help": "SPS: eta_irl = current lr x this (the IRL step's lr)"})
    irl_schedule: str = field(default="separate", metadata={"choices": ["separate", "summed"], "help":
        "SPS: separate: its own optimizer step after the RL step | summed: one step on -J_RL + lambda L_IRL"})
    irl_variant: str = field(default="group", metadata={"choices": ["group", "nll"], "help":
        "SPS: group: KL(q || p) per group | nll: token-mean NLL on a buffer of earlier correct rollouts"})
    irl_sign: str = field(default="kl", metadata={"choices": ["kl", "literal"], "help":
        "SPS: kl: minimise KL(q || p) | literal: minimise -KL as printed (ablation)"})
    irl_demos: str = field(default="correct", metadata={
        "choices": ["correct", "all"], "help": "SPS: demonstrations: the correct rollouts | all rollouts"})
    irl_target: str = field(default="uniform", metadata={"choices": ["uniform", "counts"], "help":
        "SPS: q uniform over distinct demonstrations | proportional to their counts (ablation)"})
    irl_score: str = field(default="mean", metadata={"choices": ["mean", "sum", "ratio"], "help":
        "SPS: implicit reward s: mean token log-prob | sum | mean log-ratio to the initial model"})
    irl_temperature: float = field(default=1.0, metadata={"help": "SPS: T_s of the group Boltzmann softmax(s / T_s)"})
    irl_support: str = field(default="demos", metadata={"choices": ["demos", "group"], "help":
        "SPS: p = softmax(s / T_s) over the demonstrations (bounded: redistributes among correct rollouts) | over "
        "the whole group (spec; also pushes wrong rollouts down without bound)"})
    irl_norm: str = field(default="batch", metadata={"choices": ["batch", "eligible"], "help":
        "SPS: L_IRL / #groups over all the step's groups (like the token-mean RL loss) | over eligible groups only"})
    irl_buffer: int = field(default=1024, metadata={
        "help": "SPS --irl-variant nll: capacity (rollouts per rank) of the FIFO buffer of earlier correct rollouts"})
    probe_prompts: int = field(default=4, metadata={
        "help": "SPS diagnostics: fixed training prompts (x G rollouts) probed at every eval (0 = off)"})

    def __post_init__(self):
        super().__post_init__()  # GRPO's checks
        require(min(self.irl_every, self.probe_prompts) >= 0, "--irl-every and --probe-prompts must be >= 0")
        require(0 <= self.irl_coef < math.inf, f"--irl-coef must be finite and >= 0 (got {self.irl_coef})")
        require(0 < self.irl_lr_scale < math.inf, f"--irl-lr-scale must be finite and > 0 (got {self.irl_lr_scale})")
        require(self.irl_temperature > 0 and self.irl_buffer >= 1, "--irl-temperature must be > 0, --irl-buffer >= 1")
        require(not (self.irl_variant == "nll" and self.irl_schedule == "summed"),
                "--irl-variant nll needs --irl-schedule separate")


def implicit_reward(logp, mask, score="mean", ref_logp=None):
    """s_i, the policy's implicit reward of rollout i (S1). logp, mask, ref_logp: [N, T] -> [N]. mean: (1/|o_i|)
    sum_t log pi(o_t) | sum: sum_t log pi(o_t) | ratio: (1/|o_i|) sum_t log pi(o_t) / pi_ref(o_t)."""
    total = ((logp - ref_logp if score == "ratio" else logp) * mask).sum(-1)  # [N]
    return total if score == "sum" else total / mask.sum(-1).clamp(min=1)


def first_copy(completions, group_size):
    """Index in its group of each completion's first identical copy (the same trajectory): N lists -> [N/G, G] long."""
    groups = [list(map(tuple, completions[g:g + group_size])) for g in range(0, len(completions), group_size)]
    return torch.tensor([[group.index(c) for c in group] for group in groups], dtype=torch.long)


def irl_target(demos, first, target="uniform"):
    """q [B, G], the target over each group's rollouts (S3), and D [B], its number of distinct demonstrations. demos:
    [B, G] bool (correct or all). uniform: each distinct one 1/D, split over its copies (first_copy) | counts: 1/|C|."""
    demos = demos.float()
    same = first[:, :, None] == first[:, None, :]  # [B, G, G]: rollouts i and j are the same trajectory
    copies = (same.float() * demos[:, None, :]).sum(-1).clamp(min=1)  # [B, G]: multiplicity among the demonstrations
    distinct = (demos / copies).sum(-1)  # [B]: D
    counts = demos / demos.sum(-1, keepdim=True).clamp(min=1)  # [B, G]
    return (demos / copies / distinct.clamp(min=1)[:, None] if target == "uniform" else counts), distinct


def irl_loss(scores, q, temperature=1.0, sign="kl", support=None):
    """Per-group IRL loss -sum_i q_i log p_i, p = softmax(s / T_s) over `support` ([B, G] bool; None: the whole group)
    (= KL(q || p) + H(q); S2, S4; cf. Eq. 4). scores, q: [B, G] -> [B]; sign 'literal' minimises -KL, as printed. Its
    minimum H(q): at equal demonstration scores; over the group only as the others' go to -inf (pushed down forever)."""
    z = scores / temperature if support is None else (scores / temperature).masked_fill(~support, float("-inf"))
    log_p = torch.log_softmax(z, -1)  # [B, G]: the Boltzmann distribution over the group (or its demonstrations)
    loss = -torch.where(q > 0, q * log_p, 0.0).sum(-1)  # [B]; q = 0 outside the support
    return loss if sign == "kl" else -loss


@torch.no_grad()
def preconditioned_step(optimizer, lr):
    """The IRL step in the RL step's units (S5): theta -= lr clamp(g / (sqrt(v_hat) + eps), -1, 1), v_hat the RL AdamW's
    bias-corrected second moment: sized by the IRL gradient relative to the RL's (so lambda_irl matters), no momentum
    re-applied, at most lr per coordinate (clamp); parameters the RL step never updated are left alone."""
    for group in optimizer.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in [p for p in group["params"] if p.grad is not None and "exp_avg_sq" in optimizer.state.get(p, {})]:
            v_hat = optimizer.state[p]["exp_avg_sq"] / (1 - beta2 ** float(optimizer.state[p]["step"]))
            p.sub_(lr * (p.grad / (v_hat.sqrt() + eps)).clamp(-1, 1))


def irl_gradients(model, samples, rewards, logprobs, mask, P, ref_logp, buffer, args, pad):
    """Accumulate the gradient of lambda_irl * L_IRL into the parameters (no optimizer step); None if no rank has
    anything to fit (all skip together), else this step's IRL loss BEFORE the update. Micro-batches as the update's
    (common.micro_batches); every rank runs as many as the busiest one (zero-weight extras where it has fewer rows)."""
    G = args.group_size
    world, device = world_size(), rewards.device
    if args.irl_variant == "nll":  # token-mean NLL on earlier correct rollouts
        n_tokens = all_sum([sum(len(s["completion_ids"]) for s in buffer)], device)[0]
        if n_tokens == 0:
            return None
        ids, attn, buffer_mask, buffer_P = rollout_batch(buffer or samples[:1], pad, device)  # none: a stand-in row
        parts = micro_batches(torch.arange(len(ids), device=device), buffer_mask, buffer_P, args)
        loss_sum = 0.0
        for j in range(max(gather_objects(len(parts)))):  # as many micro-batches as the busiest rank:
            rows = parts[j] if j < len(parts) else parts[0][:1]
            weight = 1.0 if buffer and j < len(parts) else 0.0  # the extras (and the stand-in) weigh nothing
            with autocast(device):
                logp, _ = token_logprobs(model, ids[rows], attn[rows], buffer_P, args.logprob_chunk,
                                         temperature=args.temperature)  # [n, T]
            nll = -(logp * buffer_mask[rows]).sum() * weight * (1 if args.irl_sign == "kl" else -1)
            (args.irl_coef * nll / n_tokens * world).backward()
            loss_sum += nll.item()
        return {"sps/irl_loss": all_sum([loss_sum], device)[0] / n_tokens}
    first = first_copy([s["completion_ids"] for s in samples], G).to(device)  # [N/G, G]: duplicates within groups
    demos = ((rewards > 0) if args.irl_demos == "correct" else torch.ones_like(rewards, dtype=torch.bool)).view(-1, G)
    q, distinct = irl_target(demos, first, args.irl_target)  # [N/G, G], [N/G]
    eligible = distinct >= 2  # groups with >= 2 distinct demonstrations; the others are skipped
    n_groups, n_all = all_sum([eligible.sum().item(), len(eligible)], device)
    if n_groups == 0:
        return None
    n_norm = n_all if args.irl_norm == "batch" else n_groups  # batch: groups without demonstrations contribute 0
    rows = (eligible.nonzero() * G + torch.arange(G, device=device)).flatten()  # [n]: the eligible groups' rows
    parts = micro_batches(rows, mask, P, args, group=G)  # whole groups
    loss_sum = 0.0
    scores = torch.zeros(q.shape, device=device)  # [N/G, G]: s with the weights after the RL step (eligible groups)
    for j in range(max(gather_objects(len(parts)))):  # as many micro-batches as the busiest rank:
        part = parts[j] if j < len(parts) else torch.arange(G, device=device)  # the extras: group 0,
        weight = 1.0 if j < len(parts) else 0.0  # weighing nothing
        chunk = part[::G] // G  # its groups
        with autocast(device):
            logp, _ = logprobs(part)  # [n, T]
        s = implicit_reward(logp, mask[part], args.irl_score, None if ref_logp is None else ref_logp[part]).view(-1, G)
        support = demos[chunk] if args.irl_support == "demos" else None
        loss = irl_loss(s, q[chunk], args.irl_temperature, args.irl_sign, support) * weight  # [groups in chunk]
        (args.irl_coef * loss.sum() / n_norm * world).backward()  # world: FSDP averages gradients over ranks
        loss_sum += loss.sum().item()
        if weight:
            scores[chunk] = s.detach().float()
    return {"sps/irl_loss": all_sum([loss_sum], device)[0] / n_groups, "sps/irl_groups": n_groups / n_all,
            "scores": scores, "eligible": eligible, "first": first}


# ---------------------------------------------------------------- diagnostics (sps/...): they leave the update alone
def squeezing(scores, first, keep, temperature=1.0):
    """Top-1 share max p and effective number of trajectories exp(H(p)), p = softmax(s / T_s) over each group's DISTINCT
    rollouts among `keep` (all, or correct only). scores, first, keep: [B, G] -> ([B], [B]), NaN if none."""
    live = keep & (first == torch.arange(first.shape[1], device=first.device))  # one entry per distinct trajectory
    p = torch.nan_to_num(torch.softmax((scores / temperature).masked_fill(~live, float("-inf")), -1))  # [B, G]
    n_eff = torch.exp(-(p * p.clamp_min(1e-30).log()).sum(-1))  # [B]
    empty = ~live.any(-1)  # [B]
    return p.max(-1).values.masked_fill(empty, float("nan")), n_eff.masked_fill(empty, float("nan"))


def irl_metrics(irl, old_logp, rewards, mask, ref_logp, args, device):
    """The IRL step's sps/irl_* ({} if none ran), and sps/d_top_rl: the change of the correct-only top share of the
    eligible groups caused by the RL step (irl_gradients' scores, after it, minus those under pi_old), over ranks."""
    out = {k: v for k, v in (irl or {}).items() if k.startswith("sps/")}
    if irl and "scores" in irl and args.irl_schedule == "separate":  # summed: irl_gradients scored pi_old
        ok, T = irl["eligible"], args.irl_temperature
        correct = (rewards > 0).view(-1, args.group_size)  # [N/G, G]
        s_old = implicit_reward(old_logp.float(), mask, args.irl_score, ref_logp).view(-1, args.group_size)
        d = squeezing(irl["scores"], irl["first"], correct, T)[0] - squeezing(s_old, irl["first"], correct, T)[0]
        s = all_sum_dict({"d": d[ok].nansum().item(), "n": (ok & ~d.isnan()).sum().item()}, device)
        out["sps/d_top_rl"] = s["d"] / max(s["n"], 1)
    return out


def sample_probe(model, tokenizer, train_set, args, device, ref_model):
    """The probe set (None if --probe-prompts is 0): the first training prompts x G rollouts, sampled with keys fixed
    for the whole run, so that evaluations differ only by the weights."""
    G = args.group_size
    group = [p for p in train_set[:args.probe_prompts] for _ in range(G)]
    if not group:
        return None
    keys = torch.stack([sample_keys(args.seed, 1 << 29, i) for i in range(len(group))])
    samples = generate(model, tokenizer, [format_prompt(tokenizer, p) for p in group], keys, args.max_new_tokens,
                       args.temperature, args.top_p)
    texts = tokenizer.batch_decode([s["completion_ids"] for s in samples], skip_special_tokens=True)
    correct = torch.tensor(compute_rewards(group, texts), device=device) > 0  # [P * G]
    n_answers = [len({answer_key(p, t) for p, t, c in zip(group[i:i + G], texts[i:i + G], correct[i:i + G]) if c})
                 for i in range(0, len(group), G)]  # distinct correct answers per prompt
    batch = rollout_batch(samples, tokenizer.pad_token_id, device)
    return {"batch": batch, "correct": correct.view(-1, G), "distinct_correct": sum(n_answers) / len(n_answers),
            "first": first_copy([s["completion_ids"] for s in samples], G).to(device), "scores": [],
            "ref": probe_logprobs(ref_model, batch, args, device)[0] if args.irl_score == "ratio" else None}


def probe_logprobs(model, batch, args, device):
    """log pi(o_t) of the probe rollouts and the probability of the top-1 token at each position: [P * G, T] each."""
    ids, attn, mask, P = batch

    def top1(logits, targets):  # the top-1 token's probability of each row [n, V] -> [n]
        return logits.softmax(-1).max(-1).values
    with torch.no_grad(), autocast(device):
        out = [token_logprobs(model, ids[m], attn[m], P, args.logprob_chunk, row_fn=top1, temperature=args.temperature)
               for m in micro_batches(torch.arange(len(ids), device=device), mask, P, args)]
    return [torch.cat([o[k].float() for o in out]) for k in (0, 2)]


def probe_scores(model, probe, args, device):
    """Append the probe rollouts' s [P, G] under the current weights to probe["scores"] (s0 before the RL step, s1
    after it, s2 after the IRL step; at step 0 only one) and return their sps/probe/* record ({} without a probe)."""
    if probe is None:
        return {}
    logp, top1 = probe_logprobs(model, probe["batch"], args, device)  # [P * G, T] each
    s = probe["scores"]
    mask, correct, first, T = probe["batch"][2], probe["correct"], probe["first"], args.irl_temperature
    s.append(implicit_reward(logp, mask, args.irl_score, probe["ref"]).view(-1, args.group_size))

    def nanmean(x):
        return float(x[~x.isnan()].double().mean()) if (~x.isnan()).any() else math.nan
    rec = {f"sps/probe/{k}": nanmean(v) for k, v in zip(["top_share", "n_eff", "top_share_correct", "n_eff_correct"],
           [*squeezing(s[-1], first, torch.ones_like(correct), T), *squeezing(s[-1], first, correct, T)])}
    rec.update({"sps/probe/distinct_correct": probe["distinct_correct"],  # and token-level squeezing
                "sps/probe/top1_token_prob": float((top1 * mask).sum() / mask.sum()),
                "sps/probe/frac_top1_gt_0.99": float(((top1 > 0.99) * mask).sum() / mask.sum())})
    q, distinct = irl_target(correct, first, args.irl_target)
    ok = distinct >= 2
    sup = correct[ok] if args.irl_support == "demos" else None
    if len(s) == 3 and ok.any():  # the IRL loss before/after the IRL step; what each step did to the top share
        rec["sps/probe/irl_loss_before"] = float(irl_loss(s[1][ok], q[ok], T, args.irl_sign, sup).mean())
        rec["sps/probe/irl_loss_after"] = float(irl_loss(s[2][ok], q[ok], T, args.irl_sign, sup).mean())
        top = [squeezing(x, first, correct, T)[0][ok] for x in s]  # correct-only top share at s0, s1, s2
        rec["sps/probe/d_top_rl"] = nanmean(top[1] - top[0])
        rec["sps/probe/d_top_irl"] = nanmean(top[2] - top[1])
    return {k: v for k, v in rec.items() if not math.isnan(v)}  # NaN: no probe group with (two) correct rollouts


def train(args):
    rank, world, device = init_distributed()
    run_dir = start_run(args, __file__, rank)
    model, tokenizer = load_model(args.model, device, rank, world)  # torchrun: rank 0 alone reads the weights
    ref_model = load_reference(args.model, device, rank, world) if args.kl_coef > 0 else None  # pi_ref for the KL
    if args.irl_score == "ratio" and ref_model is None:  # SPS: and for the ratio score s
        ref_model = load_reference(args.model, device, rank, world)
    model = shard_model(model, world, device, args.gradient_checkpointing).train()  # from_pretrained gives eval mode
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    train_set = load_train_set(args, tokenizer, model)
    eval_sets = load_eval_sets(args, tokenizer, model)
    engine = rollout_engine(args, model, tokenizer, rank)  # None: HF generate on the training model; else vLLM

    def probe_at_step_0():  # SPS: the step-0 metric line also has the probe's diagnostics
        return probe_scores(model, sample_probe(model, tokenizer, train_set, args, device, ref_model), args, device)
    start, skipped, streak, history = resume_or_evaluate(run_dir, model, optimizer, tokenizer, eval_sets, args, device,
                                                         engine, rank, probe_at_step_0)  # --resume, else step 0
    buffer = []  # SPS --irl-variant nll: correct rollouts of earlier steps (not checkpointed)
    G = args.group_size
    on_policy = args.ppo_epochs == args.mini_batches == 1  # one optimizer step per rollout batch: pi_old = pi_theta
    bar = progress(start, args.steps, __file__, rank)
    for step in bar:
        t0 = time.time()
        lr = set_lr(optimizer, args, step)
        # 1. Rollouts: this rank's share of the step's B prompts, G completions each, from pi_old = the current weights.
        #    keys [N]: one sampling key per completion, from (seed, step, its index), so a completion never depends on
        #    the batching, the number of ranks or a resume.
        group, keys = step_groups(train_set, args, step, rank, world)  # [N = B / world * G] problems, groups contiguous
        samples = generate(model, tokenizer, [format_prompt(tokenizer, p) for p in group], keys,
                           args.max_new_tokens, args.temperature, args.top_p, engine=engine)
        t_rollout = time.time() - t0
        # 2. Rewards from the verifier.
        texts = tokenizer.batch_decode([s["completion_ids"] for s in samples], skip_special_tokens=True)
        rewards = torch.tensor(compute_rewards(group, texts), dtype=torch.float32, device=device)  # [N]
        t_reward = time.time() - t0 - t_rollout
        # 3. Group-relative advantages, broadcast to every token of the completion.
        advantages = group_advantages(rewards, G, args.scale_rewards)  # [N]
        # 4. Old log-probs log pi_old(o_t) (and the reference model's) from a no-grad forward of the training model.
        #    On-policy pi_old = pi_theta: the update's own forward gives them, detached, so this pass is skipped.
        ids, attn, mask, P = rollout_batch(samples, tokenizer.pad_token_id, device)  # [N, P+T], [N, P+T], [N, T]
        #    (prompts left-padded to P tokens, so every completion starts at column P; mask: float, 1 on real tokens)
        rollout_logp = rollout_logprobs(samples, mask)  # [N, T]: the engine's log pi(o_t) (vLLM), None with HF

        def logprobs(rows, net=model):  # log pi(o_t | o_<t) and the entropy of pi(. | o_<t) of these rows: [n, T] each
            return token_logprobs(net, ids[rows], attn[rows], P, args.logprob_chunk, temperature=args.temperature)
        rows = torch.arange(len(samples), device=device)  # [N]
        micro = micro_batches(rows, mask, P, args)  # [n] row indices per forward: --micro-batch-size or -tokens
        old_logp, entropy = torch.zeros_like(mask), torch.zeros_like(mask)  # [N, T] float
        ref_logp = None
        with torch.no_grad(), autocast(device):
            if not on_policy:
                # micro_batches keeps the rows in order, so the concatenation is row-aligned with ids
                old_logp, entropy = map(torch.cat, zip(*[logprobs(m) for m in micro]))
            if ref_model is not None:
                ref_logp = torch.cat([logprobs(m, ref_model)[0] for m in micro])  # [N, T]
        # 4b. SPS: is this an IRL step; at evaluations, the probe set and its scores s0.
        irl = None
        irl_now = args.irl_every > 0 and (step + 1) % args.irl_every == 0
        probe = None
        if due(args.eval_every, step + 1, args.steps):  # the probe's diagnostics: at evaluations only
            probe = sample_probe(model, tokenizer, train_set, args, device, ref_model)
        probe_scores(model, probe, args, device)  # s0
        # 5. Policy update: ppo_epochs x mini_batches optimizer steps on the clipped surrogate.
        sums = {"clipped": 0.0, "loss": 0.0}
        for epoch in range(args.ppo_epochs):
            for mb in rows.chunk(args.mini_batches):
                totals = all_sum_dict({"tokens": mask[mb].sum().item(), "seqs": len(mb)}, device)  # all ranks
                optimizer.zero_grad(set_to_none=True)
                for m in micro_batches(mb, mask, P, args):  # reduce-scattered per backward: never a full gradient
                    with autocast(device):
                        logp, ent = logprobs(m)  # [n, T]
                    if on_policy:  # ratio exp(logp - old_logp) = 1 in value, gradient of log pi
                        old_logp[m], entropy[m] = logp.detach().float(), ent.detach().float()
                    token_loss, clipped = policy_loss(logp, old_logp[m], advantages[m, None], args.clip_low,
                                                      args.clip_high)  # [n, T]
                    if rollout_logp is not None:  # vLLM sampled: correct for the engine/trainer mismatch
                        token_loss = token_loss * truncated_is_weight(old_logp[m], rollout_logp[m], args.tis_cap)
                    if args.kl_coef > 0:  # not `ref_model is not None`: --irl-score ratio loads pi_ref for s alone
                        token_loss = token_loss + args.kl_coef * kl_k3(logp, ref_logp[m])
                    if args.entropy_coef > 0:
                        token_loss = token_loss - args.entropy_coef * ent
                    loss = aggregate_loss(token_loss, mask[m], args.loss_agg, totals["tokens"], totals["seqs"],
                                          args.max_new_tokens)
                    loss.backward()
                    sums["loss"] += loss.item() / (args.ppo_epochs * args.mini_batches * world)  # the mean over updates
                    sums["clipped"] += (clipped * mask[m]).sum().item()
                if irl_now and irl is None and args.irl_schedule == "summed":  # SPS: L_IRL joins the first RL step
                    irl = irl_gradients(model, samples, rewards, logprobs, mask, P, ref_logp, buffer, args,
                                        tokenizer.pad_token_id)
                # clip and apply the gradient (a non-finite one is skipped); grad_norm: the last mini-batch's
                grad_norm, skipped, streak = optimizer_step(model, optimizer, args, skipped, streak)
        probe_scores(model, probe, args, device)  # s1
        # 5b. SPS: the IRL step (S5) on the same rollouts, scores recomputed with the weights after the RL step.
        if irl_now and args.irl_schedule == "separate":
            optimizer.zero_grad(set_to_none=True)
            irl = irl_gradients(model, samples, rewards, logprobs, mask, P, ref_logp, buffer, args,
                                tokenizer.pad_token_id)
            if irl is not None:
                irl["sps/irl_grad_norm"] = clip_grad_norm(model, args.max_grad_norm)
                if math.isfinite(irl["sps/irl_grad_norm"]):
                    preconditioned_step(optimizer, lr * args.irl_lr_scale)  # eta_irl
                else:  # skipped like a non-finite RL update
                    skipped, streak = count_skip(irl["sps/irl_grad_norm"], skipped, streak, args.max_skipped_steps)
            optimizer.zero_grad(set_to_none=True)  # free the IRL gradient before the next rollout
        if args.irl_variant == "nll":  # earlier correct rollouts only: this step's join the buffer after its IRL step
            buffer = (buffer + [s for s, r in zip(samples, rewards.tolist()) if r > 0])[-args.irl_buffer:]
        t_train = time.time() - t0 - t_rollout - t_reward
        # 6. Metrics (sums by name, added over ranks), evaluation, checkpoint.
        s = all_sum_dict({**rollout_sums(rewards, mask, entropy, samples, G), **sums}, device)
        record = {"step": step + 1, **rollout_metrics(s, args.ppo_epochs), "grad_norm": grad_norm, "lr": lr,
                  "skipped_steps": skipped,
                  **time_metrics(t_rollout, t_reward, t_train, s, args.ppo_epochs + (not on_policy))}  # forwards
        record.update(irl_metrics(irl, old_logp, rewards, mask, ref_logp, args, device))  # SPS
        record.update(probe_scores(model, probe, args, device))  # SPS: s2, and the probe's record
        record.update(system_metrics(engine, old_logp, rollout_logp, mask, args, device))
        samples_by_set = None
        if due(args.eval_every, step + 1, args.steps):
            metrics, samples_by_set = evaluate_all(model, tokenizer, eval_sets, args, device, engine)
            record.update(metrics)
        record["time/step"] = time.time() - t0
        log_step(run_dir, record, history, rank, bar, samples_by_set)
        export_model(run_dir, step + 1, model, tokenizer, args, rank)  # model/, at --export-every steps and the last
        if due(args.save_every, step + 1, args.steps):  # after the metric line
            save_checkpoint(run_dir, step + 1, model, optimizer, rank, skipped, streak)
    print_summary(run_dir, rank)


if __name__ == "__main__":
    main(train, Args)
