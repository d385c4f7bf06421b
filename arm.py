"""ARM / ProGRPO (Advantage Re-weighting Mechanism): GRPO with advantages shifted by the confidence gap c(q) - c(o|q).

Paper: Li, Goncharova, Kuznetsov, Oseledets, "Back to Basics: Revisiting Exploration in Reinforcement Learning for LLM
Reasoning via Generative Probabilities" (arXiv:2602.05281); only its abstract and secondary reviews were available.
Papers: Shao et al., "DeepSeekMath" (arXiv:2402.03300) for GRPO; Yu et al., "DAPO" (arXiv:2503.14476) for
clip-higher and the token-mean loss; Liu et al., "Understanding R1-Zero-Like Training" (Dr. GRPO, arXiv:2503.20783).

Idea: sample G completions per prompt, score each with a verifier (reward 1 if the final answer is right), and use the
reward standardised within the group as every token's advantage; no value network. The update is PPO's clipped
surrogate on those advantages, here strictly on-policy by default (one update per rollout batch, ratio = 1).
But GRPO keeps pushing up the correct answers the model already finds most likely, so entropy collapses. ARM shifts
every advantage of a group with a correct answer by a confidence term (A1): over-confident correct paths get a smaller
update, under-explored ones a larger one, all-correct groups (A = 0; NOT dropped) still learn.

    A_i = (r_i - mean_g r) / (std_g r + eps)                                   group advantage (DeepSeekMath §4.1.2)
    A~_i = A_i if no response of the group is correct, else A_i + alpha (c(q) - c(o_i|q))                           (A1)
    K_i = max(1, ceil(rho L_i)),  T_low = the K_i response positions with the smallest l_t = log pi_old(o_t | q, o_<t)
    c(o_i|q) = exp(mean_{t in T_low} l_t)                                                                         (A2)
    c(q) = exp(mean_{t >= 2} log pi_old(q_t | q_<t)) = 1 / PPL(q)   over the prompt tokens as fed (chat template)  (A3)
    L_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i),   rho_t = pi_theta(o_t) / pi_old(o_t)
    loss = aggregate(w_t L_t + beta * k3(pi_ref, pi_theta)_t - c_H * H_t)     (token-mean by default, DAPO Eq. 8)
    w_t = min(pi_old(o_t) / pi_rollout(o_t), C) when vLLM sampled, else 1         (truncated IS, Yao et al. 2025)
with A~_i in place of A_i, eps = --delta and clip-higher [0.8, 1.28] (A4); the labels A1-A4 are ours. Confirmed (the
paper's LaTeX, quoted in a review): A1 and its gating; reported by summaries: T_low with rho ~ 20%. UNCONFIRMED, ours,
each a flag: --alpha 0.2, --rho 0.2 and A2, --answer-confidence, --prompt-confidence (A3), --arm-scope correct|mixed.

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
from common import all_max_dict, answer_key  # arm_metrics
from grpo import Args as GRPOArgs  # GRPO's flags; the method adds its own
from grpo import aggregate_loss, group_advantages, kl_k3, policy_loss, truncated_is_weight  # GRPO's math


@dataclass
class Args(GRPOArgs):
    clip_high: float = field(default=0.28, metadata={"help": (
        "PPO clip eps_high: ratio ceiling 1 + eps_high (clip-higher 0.28, as in ProGRPO's setup; GRPO default 0.2)")})
    alpha: float = field(default=0.2, metadata={"help": "A1's shift strength; UNCONFIRMED, sweep 0.05-0.5; 0 = GRPO"})
    rho: float = field(default=0.2, metadata={"help": "T_low: K = max(1, ceil(rho L)) lowest-probability tokens (A2)"})
    delta: float = field(default=1e-6, metadata={"help": "delta in A = (r - mean) / (std + delta)"})
    arm_scope: str = field(default="all", metadata={"choices": ["all", "correct", "mixed"], "help": "responses shifted "
        "in a group with a correct answer: all (A1) | correct (only) | mixed (all, but not in all-correct groups)"})
    answer_confidence: str = field(default="tlow-mean", metadata={"choices": ["tlow-mean", "sum-over-k"], "help": (
        "c(o|q): tlow-mean exp(mean_{T_low} l_t) (A2) | sum-over-k exp(sum_{all t} l_t / K)")})
    prompt_confidence: str = field(default="ppl", metadata={"choices": ["ppl", "tlow", "group-mean"], "help": (
        "c(q): ppl 1/PPL(q) (A3) | tlow (A2 on the prompt tokens) | group-mean mean_g c(o|q); UNCONFIRMED")})

    def __post_init__(self):
        super().__post_init__()  # GRPO's checks
        require(0 <= self.alpha < math.inf, f"--alpha must be a finite number >= 0 (got {self.alpha})")
        require(0 < self.rho <= 1, f"--rho must be in (0, 1] (got {self.rho})")
        require(self.delta > 0 and math.isfinite(self.delta), f"--delta must be a finite number > 0 (got {self.delta})")


def split_prompt_positions(logp, entropy, attn, P, first):
    """Split the old-log-prob pass run from `first` (1; P: no prompt scoring) into log pi_old(q_t | q_<t) with its mask
    [N, P-first] (left padding: q_t counts if it and the state predicting it are real, t >= 2), logp, entropy [N, T]."""
    prompt_mask = (attn[:, 1:P] * attn[:, :P - 1]).float()[:, :P - first]  # [N, P-first]
    return logp[:, :P - first], prompt_mask, logp[:, P - first:], entropy[:, P - first:]


def low_probability_tokens(logp, mask, rho):
    """T_low: the K = max(1, ceil(rho L)) valid positions with the smallest log-prob (A2). logp, mask: [N, T] -> ([N, T]
    bool, K [N]). Ties at the boundary pick any of the tied positions: the values, hence c, are the same."""
    L = mask.sum(-1)  # [N]
    K = torch.ceil(rho * L.double() - 1e-9).clamp(min=1).minimum(L)  # [N]; - 1e-9: 0.2 * 15 = 3.0000000000000004
    order = torch.where(mask.bool(), logp, torch.inf).argsort(dim=-1, stable=True)  # [N, T] ascending, padding last
    return order.argsort(dim=-1) < K[:, None], K  # the order's argsort: each position's rank


def answer_confidence(logp, mask, rho, form="tlow-mean"):
    """c(o|q) = exp(mean_{t in T_low} l_t) (A2), or exp(sum_{all t} l_t / K) with form="sum-over-k". logp = log pi_old
    of the response tokens, mask: [N, T] -> [N]. An empty response has c = 1 (probability of the empty sequence)."""
    low, K = low_probability_tokens(logp, mask, rho)  # [N, T], [N]
    total = torch.where(low if form == "tlow-mean" else mask.bool(), logp, 0.0).sum(-1)  # where, not *: never 0 * inf
    return torch.exp(total / K.clamp(min=1))


def prompt_confidence(prompt_logp, prompt_mask, c_answer, group_size, rho, form="ppl"):
    """c(q) per prompt, broadcast to its G responses -> [N]: ppl exp(mean_t) = 1/PPL(q) (A3) | tlow: A2 on the prompt |
    group-mean: mean_g c(o|q). prompt_logp (log pi_old(q_t | q_<t)), prompt_mask (t >= 2): [N, P-1]; c_answer: [N]."""
    if form == "ppl":  # A3
        c = torch.exp(torch.where(prompt_mask.bool(), prompt_logp, 0.0).sum(-1) / prompt_mask.sum(-1).clamp(min=1))
    else:  # tlow: A2 on the prompt tokens; group-mean: the mean of c(o|q) below
        c = answer_confidence(prompt_logp, prompt_mask, rho) if form == "tlow" else c_answer
    return c.view(-1, group_size).mean(-1).repeat_interleave(group_size)  # [N/G] -> [N]: one c(q) per prompt


def arm_advantages(advantages, correct, c_prompt, c_answer, group_size, alpha, scope="all"):
    """A~ = A + alpha (c(q) - c(o|q)) (A1) on the responses in scope of groups with a correct answer, A elsewhere;
    scope: all | correct (correct ones only) | mixed (all, except in all-correct groups). [N] -> (A~, shifted) [N]."""
    c = correct.view(-1, group_size)  # [N/G, G]
    shifted = c.any(-1, keepdim=True).expand_as(c)  # every response of a group with a correct answer
    if scope != "all":  # correct: only the correct responses; mixed: not in all-correct groups either
        shifted = shifted & (c if scope == "correct" else ~c.all(-1, keepdim=True))
    return torch.where(shifted.flatten(), advantages + alpha * (c_prompt - c_answer), advantages), shifted.flatten()


def arm_metrics(advantages, grpo_advantages, shifted, correct, c_prompt, c_answer, prompt_mask, group, texts,
                group_size, device):
    """The arm/ diagnostics of one step over all ranks (README's ARM section describes each): shift = A~ - A over the
    shifted responses; weight = A~ / A over the correct ones of mixed groups; corr_conf_*: Pearson r with c(o|q)."""
    pos, ok = correct & (grpo_advantages > 0), correct.tolist()
    shift, weight = (advantages - grpo_advantages)[shifted].double(), (advantages[pos] / grpo_advantages[pos]).double()
    distinct = [len({answer_key(group[j], texts[j]) for j in range(g, g + group_size) if ok[j]})
                for g in range(0, len(group), group_size)]
    top, s = {}, {"n": len(c_answer), "c_prompt": c_prompt.sum(), "c_answer": c_answer.sum(),
                  "n_correct": correct.sum(), "correct_negative": (correct & (advantages < 0)).sum(),
                  "distinct": sum(distinct), "groups": len(distinct), "prompt_tokens": prompt_mask.sum()}
    for y, x, name in ((shift, c_answer[shifted].double(), "shift"), (weight, c_answer[pos].double(), "w")):
        s.update({"n_" + name: len(y), name: y.sum(), name + "_abs": y.abs().sum(), name + "2": (y * y).sum(),
                  "x_" + name: x.sum(), "x2_" + name: (x * x).sum(), "xy_" + name: (x * y).sum()})
        top[name], top["-" + name] = (v.max().item() if len(v) else -math.inf for v in (y, -y))  # max, -min
    s = all_sum_dict({k: float(v) for k, v in s.items()}, device)
    top = {k: v if math.isfinite(v) else 0.0 for k, v in all_max_dict(top, device).items()}  # 0: empty on every rank

    def pearson(y):  # of c(o|q) and y, from the sums
        n, sx, sy, sxx, syy, sxy = (s[k] for k in ("n_" + y, "x_" + y, y, "x2_" + y, y + "2", "xy_" + y))
        v = (n * sxx - sx * sx) * (n * syy - sy * sy)
        return (n * sxy - sx * sy) / math.sqrt(v) if v > 0 else 0.0
    return {"arm/c_prompt_mean": s["c_prompt"] / s["n"], "arm/c_answer_mean": s["c_answer"] / s["n"],
            "arm/frac_shifted": s["n_shift"] / s["n"], "arm/shift_mean": s["shift"] / max(s["n_shift"], 1),
            "arm/shift_abs_mean": s["shift_abs"] / max(s["n_shift"], 1), "arm/shift_min": -top["-shift"],
            "arm/shift_max": top["shift"], "arm/weight_mean": s["w"] / s["n_w"] if s["n_w"] else 1.0,
            "arm/weight_min": -top["-w"], "arm/weight_max": top["w"],
            "arm/frac_correct_negative": s["correct_negative"] / max(s["n_correct"], 1),
            "arm/corr_conf_shift": pearson("shift"), "arm/corr_conf_weight": pearson("w"),
            "arm/distinct_correct": s["distinct"] / s["groups"], "arm/prompt_tokens_scored": s["prompt_tokens"]}


def train(args):
    rank, world, device = init_distributed()
    run_dir = start_run(args, __file__, rank)
    model, tokenizer = load_model(args.model, device, rank, world)  # torchrun: rank 0 alone reads the weights
    ref_model = load_reference(args.model, device, rank, world) if args.kl_coef > 0 else None  # pi_ref for the KL
    model = shard_model(model, world, device, args.gradient_checkpointing).train()  # from_pretrained gives eval mode
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    train_set = load_train_set(args, tokenizer, model)
    eval_sets = load_eval_sets(args, tokenizer, model)
    engine = rollout_engine(args, model, tokenizer, rank)  # None: HF generate on the training model; else vLLM
    start, skipped, streak, history = resume_or_evaluate(run_dir, model, optimizer, tokenizer, eval_sets, args, device,
                                                         engine, rank)  # --resume: the checkpoint; else eval step 0
    G = args.group_size
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
        advantages = group_advantages(rewards, G, args.scale_rewards, args.delta)  # [N]
        # 4. Old log-probs log pi_old(o_t) (and the reference model's) from a no-grad forward of the training model.
        #    ARM always runs this pass: c(o|q) and c(q) must be known before the update. It starts at position
        #    `first` to score the prompt tokens too (for c(q)); each prompt still runs once per group.
        ids, attn, mask, P = rollout_batch(samples, tokenizer.pad_token_id, device)  # [N, P+T], [N, P+T], [N, T]
        #    (prompts left-padded to P tokens, so every completion starts at column P; mask: float, 1 on real tokens)
        rollout_logp = rollout_logprobs(samples, mask)  # [N, T]: the engine's log pi(o_t) (vLLM), None with HF

        def logprobs(rows, net=model, start=P):  # log pi(x_t | x_<t) and the entropy for t >= start: [n, P+T-start]
            return token_logprobs(net, ids[rows], attn[rows], start, args.logprob_chunk, prompt_len=P,
                                  temperature=args.temperature)
        rows = torch.arange(len(samples), device=device)  # [N]
        micro = micro_batches(rows, mask, P, args)  # [n] row indices per forward: --micro-batch-size or -tokens
        first = P if args.prompt_confidence == "group-mean" else 1  # ARM: from position 1, to score the prompt too
        ref_logp = None
        with torch.no_grad(), autocast(device):
            # micro_batches keeps the rows in order, so the concatenation is row-aligned with ids
            old_logp, entropy = map(torch.cat, zip(*[logprobs(m, start=first) for m in micro]))  # [N, P+T-first]
            if ref_model is not None:
                ref_logp = torch.cat([logprobs(m, ref_model)[0] for m in micro])  # [N, T]
        # 4b. ARM: the detached confidences c(o|q) (A2) and c(q) (A3) shift the advantages (A1).
        prompt_logp, prompt_mask, old_logp, entropy = split_prompt_positions(old_logp, entropy, attn, P, first)
        grpo_advantages = advantages  # [N], for the diagnostics
        correct = rewards > 0.5  # [N]
        c_answer = answer_confidence(old_logp, mask, args.rho, args.answer_confidence)  # [N]
        c_prompt = prompt_confidence(prompt_logp, prompt_mask, c_answer, G, args.rho, args.prompt_confidence)  # [N]
        advantages, shifted = arm_advantages(advantages, correct, c_prompt, c_answer, G, args.alpha, args.arm_scope)
        # 5. Policy update: ppo_epochs x mini_batches optimizer steps on the clipped surrogate.
        sums = {"clipped": 0.0, "loss": 0.0}
        for epoch in range(args.ppo_epochs):
            for mb in rows.chunk(args.mini_batches):
                totals = all_sum_dict({"tokens": mask[mb].sum().item(), "seqs": len(mb)}, device)  # all ranks
                optimizer.zero_grad(set_to_none=True)
                for m in micro_batches(mb, mask, P, args):  # reduce-scattered per backward: never a full gradient
                    with autocast(device):
                        logp, ent = logprobs(m)  # [n, T]
                    token_loss, clipped = policy_loss(logp, old_logp[m], advantages[m, None], args.clip_low,
                                                      args.clip_high)  # [n, T]
                    if rollout_logp is not None:  # vLLM sampled: correct for the engine/trainer mismatch
                        token_loss = token_loss * truncated_is_weight(old_logp[m], rollout_logp[m], args.tis_cap)
                    if ref_model is not None:
                        token_loss = token_loss + args.kl_coef * kl_k3(logp, ref_logp[m])
                    if args.entropy_coef > 0:
                        token_loss = token_loss - args.entropy_coef * ent
                    loss = aggregate_loss(token_loss, mask[m], args.loss_agg, totals["tokens"], totals["seqs"],
                                          args.max_new_tokens)
                    loss.backward()
                    sums["loss"] += loss.item() / (args.ppo_epochs * args.mini_batches * world)  # the mean over updates
                    sums["clipped"] += (clipped * mask[m]).sum().item()
                # clip and apply the gradient (a non-finite one is skipped); grad_norm: the last mini-batch's
                grad_norm, skipped, streak = optimizer_step(model, optimizer, args, skipped, streak)
        t_train = time.time() - t0 - t_rollout - t_reward
        # 6. Metrics (sums by name, added over ranks), evaluation, checkpoint.
        s = all_sum_dict({**rollout_sums(rewards, mask, entropy, samples, G), **sums}, device)
        record = {"step": step + 1, **rollout_metrics(s, args.ppo_epochs), "grad_norm": grad_norm, "lr": lr,
                  "skipped_steps": skipped,
                  **time_metrics(t_rollout, t_reward, t_train, s, args.ppo_epochs + 1)}  # + 1: the pi_old pass
        record.update(arm_metrics(advantages, grpo_advantages, shifted, correct, c_prompt, c_answer, prompt_mask,
                                  group, texts, G, device))
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
