"""Lp-Reg: Low-probability Regularization, GRPO plus a KL pull that keeps low-probability tokens alive.

Paper: Huang et al., "Low-probability Tokens Sustain Exploration in Reinforcement Learning with Verifiable Reward"
(arXiv:2510.03222). Where it is loose, the authors' verl code (CarlanLark/Lp-Reg-dev) is the default.

Idea: negative-advantage updates keep pushing the rare tokens of failed samples down until exploration dies. Lp-Reg
drops pi_old's tokens below a min-p threshold and renormalises, a less noisy proxy; on the lowest-probability tokens
of negative-advantage samples that the filter keeps, the policy-gradient term becomes a KL pull toward that proxy.
Authors' code: B per micro-batch, the k > 1 guard, --rho-pos. Reconstructed (ours): --percentile-scope batch and
--proxy fixed (the paper's variants), log pi_proxy = FILTERED = -1e4 for filtered tokens. Provenance: README, Lp-Reg.

    A_i = (r_i - mean_g r) / (std_g r + eps)                                   group advantage (DeepSeekMath §4.1.2)
    L_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i),   rho_t = pi_theta(o_t) / pi_old(o_t)
    loss = aggregate(w_t L_t + beta * k3(pi_ref, pi_theta)_t - c_H * H_t)     (token-mean by default, DAPO Eq. 8)
    w_t = min(pi_old(o_t) / pi_rollout(o_t), C) when vLLM sampled, else 1         (truncated IS, Yao et al. 2025)
    L_t = -rho_t A_i + beta_p clamp(exp(d_t) - d_t - 1, -10, 10) instead, on t in B with d_t > 0               (Eq. 6)
        d_t = log pi_proxy(o_t) - log pi_theta(o_t) (k3 of KL(pi_proxy || pi_theta)); beta_p: --beta, beta: --kl-coef
        B = the k = int(|S| rho) tokens of S = {valid t: A_i < 0} with the smallest log pi_theta, none unless k > 1
    pi_proxy(o_t) = pi_old(o_t) / sum_{v: pi_old(v) >= tau_t} pi_old(v) if pi_old(o_t) >= tau_t, else 0       (Eq. 5)
        tau_t = kappa max_v pi_old(v | s_t)                      (rho in B is the fraction --rho, rho_t the ratio)

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
from common import all_sum, gather_objects, world_size  # Lp-Reg: the global percentile, its weighting
from grpo import Args as GRPOArgs  # GRPO's flags; the method adds its own
from grpo import aggregate_loss, group_advantages, kl_k3, policy_loss, truncated_is_weight  # GRPO's math
FILTERED = -1e4  # log pi_proxy of a token the filter removed (pi_proxy = 0): finite, so it never yields inf or nan


@dataclass
class Args(GRPOArgs):
    clip_low: float = field(default=1.0, metadata={
        "help": "PPO clip eps_low: ratio floor 1 - eps_low (Lp-Reg: 1.0 and --clip-high 9.0, i.e. clip(r, 0, 10))"})
    clip_high: float = field(default=9.0, metadata={
        "help": "PPO clip eps_high: ratio ceiling 1 + eps_high (DAPO clip-higher: 0.28)"})
    rho: float = field(default=0.01, metadata={"help": "fraction of negative-advantage tokens (lowest pi_theta) "
                       "considered for the pull; paper 0.01 (Qwen3-14B), 0.005 (Qwen2.5-32B); 0 = plain GRPO. The CPU "
                       "study uses 0.1: a micro-batch there has ~300 such tokens, 0.01 gives k = 0-5 (~0.1%% pulled)"})
    rho_pos: float = field(default=0.0, metadata={"help": "same fraction for positive-advantage tokens, a separate set "
                           "(authors' code logp_pos_k_percent; 0 = not regularised)"})
    kappa: float = field(default=0.02, metadata={"help": "proxy min-p ratio, or tau with --proxy fixed; paper 0.02"})
    proxy: str = field(default="minp", metadata={"choices": ["minp", "fixed"], "help": "minp: tau = kappa * max_v "
                       "pi_old(v) (Eq. 5) | fixed: tau = kappa (paper's ablation)"})
    beta: float = field(default=1.0, metadata={"help": "coefficient of the KL pull toward the proxy; paper 1.0"})
    percentile_scope: str = field(default="microbatch", metadata={"choices": ["microbatch", "batch"], "help": (
        "microbatch: bottom-rho per micro-batch by current log-prob (authors' code; which tokens are pulled depends "
        "on --micro-batch-size / --micro-batch-tokens) | batch: over the whole rollout batch on all ranks, by log "
        "pi_old (paper)")})
    token_mean: str = field(default="batch", metadata={"choices": ["batch", "microbatch"], "help": (
        "--loss-agg token-mean over: batch (ours: every token of the optimizer batch weighs the same, whatever the "
        "micro-batching) | microbatch (authors' code: each micro-batch's token-mean x its share of the sequences, "
        "so the update depends on --micro-batch-size / --micro-batch-tokens)")})

    def __post_init__(self):
        super().__post_init__()  # GRPO's checks
        require(0 <= self.rho <= 1 and 0 <= self.rho_pos <= 1,
                f"--rho and --rho-pos must be in [0, 1] (got {self.rho}, {self.rho_pos})")
        require(0 < self.kappa < 1 and self.beta >= 0,
                f"--kappa must be in (0, 1) and --beta >= 0 (got {self.kappa}, {self.beta})")
        require(self.token_mean == "batch" or self.loss_agg == "token-mean",
                "--token-mean microbatch needs --loss-agg token-mean (it is that aggregation, per micro-batch)")


def proxy_logprob(logits, targets, kappa, proxy="minp"):
    """log pi_proxy(o_t) (Eq. 5) from pi_old's raw logits z (temperature 1), no gradient: pi(v) >= tau is z_v >= max z
    + ln kappa (minp) or logsumexp z + ln kappa (fixed); then z_o - logsumexp_{kept} z. [n, V] float32, [n] -> [n].
    fixed, where no token reaches tau: the uniform proxy -ln V (authors' code), which pulls tokens with pi < 1/V."""
    top = logits.max(-1, keepdim=True).values if proxy == "minp" else torch.logsumexp(logits, -1, keepdim=True)
    kept = logits >= top + math.log(kappa)  # [n, V]
    log_mass = torch.logsumexp(logits.masked_fill(~kept, float("-inf")), -1)  # [n]: log of the unnormalised kept mass
    z_o = logits.gather(-1, targets[:, None]).squeeze(-1)  # [n]
    proxy_logp = torch.where(kept.gather(-1, targets[:, None]).squeeze(-1), z_o - log_mass, FILTERED)  # [n]
    if proxy == "fixed":  # minp always keeps the top token
        proxy_logp = torch.where(kept.any(-1), proxy_logp, -math.log(logits.shape[-1]))
    return proxy_logp


def bottom_rho(logp, candidates, rho):
    """Eq. 6 steps 2-3 (authors' code): the k = int(|S| rho) tokens of S = candidates with the smallest log-prob, none
    unless k > 1. logp, candidates: [n, T] -> (bottom [n, T] bool, k, the k-th smallest log-prob or None)."""
    flat = candidates.flatten().nonzero().squeeze(-1)  # [|S|] flat indices of S
    k = int(len(flat) * rho)
    bottom = torch.zeros_like(candidates, dtype=torch.bool)
    if k <= 1:
        return bottom, k, None
    values, idx = logp.detach().flatten()[flat].topk(k, largest=False)  # ascending
    bottom.view(-1)[flat[idx]] = True
    return bottom, k, values[-1].item()


def batch_bottom_rho(old_logp, candidates, rho):
    """--percentile-scope batch: bottom_rho over the rollout batch of ALL ranks, by log pi_old (fixed once per rollout;
    equal to pi_theta on-policy). Exact and cheap: only a rank's own k smallest can be among the global k smallest."""
    k = int(all_sum([candidates.sum().item()], old_logp.device)[0] * rho)
    if k <= 1:
        return torch.zeros_like(candidates, dtype=torch.bool), k, None
    local = old_logp[candidates].topk(min(k, int(candidates.sum())), largest=False).values.tolist()
    delta = sorted(v for part in gather_objects(local) for v in part)[k - 1]  # the global k-th smallest log-prob
    return candidates & (old_logp <= delta), k, delta


def lp_reg_bottom(logp, advantages, mask, rho, rho_pos, sums, rank=bottom_rho, share=1):
    """Eq. 6 steps 1-3: the bottom-rho tokens [n, T] of valid A < 0 (rho) and, if rho_pos > 0, A > 0 (rho_pos; A = 0
    never), ranked apart; rank=batch_bottom_rho's numbers are global: each of `share` ranks adds 1/share to sums."""
    valid = mask.bool()  # [n, T] like logp; advantages: [n, 1]
    bottom = torch.zeros_like(valid)
    sets = [(valid & (advantages < 0), rho)] + ([(valid & (advantages > 0), rho_pos)] if rho_pos > 0 else [])
    for candidates, r in sets:  # [n, T] bool, its fraction
        b, k, delta = rank(logp, candidates, r)
        bottom |= b
        sums["sets"] += 1 / share
        sums["fired"] += (k > 1) / share
        sums["delta"] += math.exp(delta) / share if delta is not None else 0.0  # the rho-percentile probability
    return bottom


def lp_reg_loss(logp, old_logp, advantages, proxy_logp, bottom, clip_low, clip_high, beta, bound=10.0):
    """Eq. 6 per token (authors' code), all [n, T] (advantages [n, 1]) -> (loss, clipped, selected, penalty): clipped
    surrogate, but -A r + beta clamp(k3(pi_proxy, pi_theta), -bound, bound) on bottom & log pi_theta < log pi_proxy."""
    token_loss, clipped = policy_loss(logp, old_logp, advantages, clip_low, clip_high)  # GRPO's term, [n, T]
    selected = bottom & (logp.detach() < proxy_logp)  # Eq. 6 indicator, step 4
    d = (proxy_logp - logp).clamp(max=20.0)  # [n, T]; exp stays finite (k3 > 10 from d = 2.53: clamped, no gradient)
    penalty = kl_k3(-d, torch.zeros_like(d)).clamp(-bound, bound)  # k3 of KL(pi_proxy || pi_theta), clamped as the code
    unclipped = policy_loss(logp, old_logp, advantages, math.inf, math.inf)[0]  # -A r: the surrogate with no clip
    pull = unclipped + beta * penalty  # plus the pull toward the proxy
    return torch.where(selected, pull, token_loss), clipped, selected, penalty


def microbatch_token_mean(token_loss, mask, n_seqs):
    """--token-mean microbatch, the authors' weighting (verl, dynamic batch size): the token-mean of one micro-batch
    times its share of the optimizer batch's sequences, n_seqs over ALL ranks (x world_size(): ranks average their
    gradients). It equals --token-mean batch (grpo.aggregate_loss) only when every micro-batch has as many valid
    tokens per sequence on average as the whole batch: the update depends on how --micro-batch-size or
    --micro-batch-tokens splits the rows. token_loss, mask: [n, T] -> scalar."""
    return (token_loss * mask).sum() / mask.sum().clamp(min=1) * len(mask) / n_seqs * world_size()


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
        advantages = group_advantages(rewards, G, args.scale_rewards)  # [N]
        # 4. Old log-probs log pi_old(o_t) (and the reference model's) from a no-grad forward of the training model.
        #    Lp-Reg always runs this pass: it also gives log pi_proxy(o_t) (Eq. 5) from pi_old's full distribution.
        ids, attn, mask, P = rollout_batch(samples, tokenizer.pad_token_id, device)  # [N, P+T], [N, P+T], [N, T]
        #    (prompts left-padded to P tokens, so every completion starts at column P; mask: float, 1 on real tokens)
        rollout_logp = rollout_logprobs(samples, mask)  # [N, T]: the engine's log pi(o_t) (vLLM), None with HF

        def logprobs(rows, net=model, **kw):  # log pi(o_t | o_<t) and the entropy of pi(. | o_<t): [n, T] each
            return token_logprobs(net, ids[rows], attn[rows], P, args.logprob_chunk, temperature=args.temperature,
                                  **kw)

        def to_proxy(logits, targets):  # log pi_proxy(o_t) (Eq. 5) from the chunk's logits [n, V]: [n]
            return proxy_logprob(logits, targets, args.kappa, args.proxy)
        rows = torch.arange(len(samples), device=device)  # [N]
        micro = micro_batches(rows, mask, P, args)  # [n] row indices per forward: --micro-batch-size or -tokens
        ref_logp = None
        with torch.no_grad(), autocast(device):
            # micro_batches keeps the rows in order, so the concatenation is row-aligned with ids
            old_logp, entropy, proxy_logp = map(torch.cat, zip(*[logprobs(m, row_fn=to_proxy) for m in micro]))
            if ref_model is not None:
                ref_logp = torch.cat([logprobs(m, ref_model)[0] for m in micro])  # [N, T]
        # 5. Policy update: ppo_epochs x mini_batches optimizer steps on the clipped surrogate.
        sums = {"clipped": 0.0, "loss": 0.0}
        sums.update(dict.fromkeys(["selected", "bottom", "fired", "sets", "delta", "kl"], 0.0))  # Lp-Reg diagnostics
        if args.percentile_scope == "batch":  # the paper: one bottom-rho over the rollout batch of all ranks, by pi_old
            batch_bottom = lp_reg_bottom(old_logp, advantages[:, None], mask, args.rho, args.rho_pos, sums,
                                         batch_bottom_rho, world)
        for epoch in range(args.ppo_epochs):
            for mb in rows.chunk(args.mini_batches):
                totals = all_sum_dict({"tokens": mask[mb].sum().item(), "seqs": len(mb)}, device)  # all ranks
                optimizer.zero_grad(set_to_none=True)
                for m in micro_batches(mb, mask, P, args):  # reduce-scattered per backward: never a full gradient
                    with autocast(device):
                        logp, ent = logprobs(m)  # [n, T]
                    if args.percentile_scope == "batch":
                        bottom = batch_bottom[m]
                    else:  # the authors' code: the bottom-rho of this micro-batch, by the current log-prob
                        bottom = lp_reg_bottom(logp, advantages[m, None], mask[m], args.rho, args.rho_pos, sums)
                    token_loss, clipped, selected, penalty = lp_reg_loss(logp, old_logp[m], advantages[m, None],
                                                                         proxy_logp[m], bottom, args.clip_low,
                                                                         args.clip_high, args.beta)  # Eq. 6
                    if rollout_logp is not None:  # vLLM sampled: correct for the engine/trainer mismatch (pull too)
                        token_loss = token_loss * truncated_is_weight(old_logp[m], rollout_logp[m], args.tis_cap)
                    sums["selected"] += selected.sum().item()  # Lp-Reg diagnostics
                    sums["bottom"] += bottom.sum().item()
                    sums["kl"] += penalty.detach()[selected].sum().item()
                    if ref_model is not None:
                        token_loss = token_loss + args.kl_coef * kl_k3(logp, ref_logp[m])
                    if args.entropy_coef > 0:
                        token_loss = token_loss - args.entropy_coef * ent
                    if args.token_mean == "microbatch":  # the authors' weighting
                        loss = microbatch_token_mean(token_loss, mask[m], totals["seqs"])
                    else:
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
        ratios = {"threshold_prob": ("delta", "fired"),  # Lp-Reg: the rho-percentile probability, mean over k > 1
                  "frac_pass_filter": ("selected", "bottom"),  # share of the bottom-rho tokens the filter keeps
                  "kl_mean": ("kl", "selected")}  # mean clamped k3 penalty over the selected tokens
        record["lp_reg/frac_regularized"] = s["selected"] / (s["tokens"] * args.ppo_epochs)  # of the valid tokens
        record["lp_reg/frac_fired"] = s["fired"] / max(s["sets"], 1)  # share of the rankings with k > 1
        record.update({f"lp_reg/{name}": s[a] / s[b] for name, (a, b) in ratios.items() if s[b] > 0})  # if defined
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
