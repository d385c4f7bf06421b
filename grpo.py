"""GRPO: Group Relative Policy Optimization, the baseline every method in this repository extends.

Papers: Shao et al., "DeepSeekMath" (arXiv:2402.03300) for GRPO; Yu et al., "DAPO" (arXiv:2503.14476) for
clip-higher and the token-mean loss; Liu et al., "Understanding R1-Zero-Like Training" (Dr. GRPO, arXiv:2503.20783).

Idea: sample G completions per prompt, score each with a verifier (reward 1 if the final answer is right), and use the
reward standardised within the group as every token's advantage; no value network. The update is PPO's clipped
surrogate on those advantages, here strictly on-policy by default (one update per rollout batch, ratio = 1).

    A_i = (r_i - mean_g r) / (std_g r + eps)                                   group advantage (DeepSeekMath §4.1.2)
    L_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i),   rho_t = pi_theta(o_t) / pi_old(o_t)
    loss = aggregate(w_t L_t + beta * k3(pi_ref, pi_theta)_t - c_H * H_t)     (token-mean by default, DAPO Eq. 8)
    w_t = min(pi_old(o_t) / pi_rollout(o_t), C) when vLLM sampled, else 1         (truncated IS, Yao et al. 2025)

Run it (SCRIPT: grpo.py or any method script, which takes the same flags plus the method's own):
    python SCRIPT                                                      # CPU demo: tiny model, countdown, a few minutes
    python SCRIPT --model Qwen/Qwen2.5-Math-1.5B --dataset math-lighteval --eval-datasets math500,aime24,amc23 \\
        --prompts-per-step 128 --max-new-tokens 3072 --lr 1e-6 --steps 500 --micro-batch-tokens 32768 \\
        --vllm-gpu-memory 0.6                                       # one GPU (add --dry-run: its memory plan)
    torchrun --nproc_per_node 8 SCRIPT --model Qwen/Qwen2.5-7B ... --micro-batch-tokens 32768     # FSDP2, 8 GPUs
"""
import os
import time
from dataclasses import dataclass, field

import torch

from common import BaseArgs, main, require  # the flags
from common import init_distributed, load_model, load_reference, shard_model, world_size  # torchrun, FSDP2, models
from common import load_eval_sets, load_train_set, progress, resume_or_evaluate, set_lr, start_run  # the run
from common import format_prompt, generate, rollout_engine, step_groups  # 1. rollouts
from common import compute_rewards  # 2. rewards
from common import autocast, rollout_batch, rollout_logprobs, token_logprobs  # 4. log-probs
from common import all_sum_dict, micro_batches, optimizer_step  # 5. the update
from common import (due, evaluate_all, log_step, print_summary, rollout_metrics, rollout_sums,  # 6. metrics,
                    export_model, save_checkpoint, system_metrics, time_metrics)  # evaluation, checkpoints


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

    def __post_init__(self):
        super().__post_init__()  # also checks every field's "choices"
        require(self.clip_low >= 0 and self.clip_high >= 0, "--clip-low and --clip-high must be >= 0")
        require(self.kl_coef >= 0 and self.entropy_coef >= 0, "--kl-coef and --entropy-coef must be >= 0")
        require(self.ppo_epochs >= 1 and self.mini_batches >= 1, "--ppo-epochs and --mini-batches must be >= 1")
        rows = self.prompts_per_step // int(os.environ.get("WORLD_SIZE", "1")) * self.group_size  # completions per rank
        require(rows % self.mini_batches == 0, f"--mini-batches {self.mini_batches} must divide each rank's "
                f"{rows} completions (--prompts-per-step / ranks x --group-size): every update sees as many rows")


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


def truncated_is_weight(old_logp, rollout_logp, cap):
    """w_t = min(pi_old(o_t) / pi_rollout(o_t), C), detached: token-level truncated importance sampling (Yao et al.
    2025, "Your efficient RL framework secretly brings you off-policy RL training"). The engine that sampled (vLLM)
    and the trainer compute the same policy with different kernels, so each token's policy loss is re-weighted by
    how much likelier the trainer finds it. Token-level rather than a sequence-level mask: it matches the token-level
    loss, needs no threshold on a product over thousands of tokens, and keeps every token's gradient.
    old_logp, rollout_logp: [n, T] -> [n, T]; C = 0 (--tis-cap 0): w = 1. HF rollouts need none: the trainer sampled."""
    if cap == 0:
        return torch.ones_like(old_logp)
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def aggregate_loss(token_loss, mask, mode, n_tokens, n_seqs, max_new_tokens):
    """Reduce a per-token loss [n, T] of one micro-batch so that summing the micro-batches' gradients and averaging
    them over ranks (as FSDP does) gives one big batch's loss. n_tokens, n_seqs: valid tokens and sequences of the
    whole optimizer batch over ALL ranks (hence the factor world_size(), which the rank average divides out).
      token-mean               sum_{i,t} l_it / #tokens                                (DAPO Eq. 8; default)
      seq-mean-token-mean      mean_i (sum_t l_it / |o_i|)                            (GRPO, DeepSeekMath Eq. 3)
      seq-mean-token-sum-norm  mean_i (sum_t l_it / max_new_tokens)                   (Dr. GRPO)"""
    if mode == "token-mean":
        return (token_loss * mask).sum() / n_tokens * world_size()
    if mode == "seq-mean-token-mean":
        return ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seqs * world_size()
    if mode == "seq-mean-token-sum-norm":
        return ((token_loss * mask).sum(-1) / max_new_tokens).sum() / n_seqs * world_size()
    raise ValueError(f"unknown loss aggregation {mode!r}")


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
                  **time_metrics(t_rollout, t_reward, t_train, s, args.ppo_epochs + (not on_policy))}  # forwards
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
