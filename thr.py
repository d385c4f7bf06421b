"""THR: Token Hidden Reward, GRPO's token advantages steered toward exploitation (p > 0) or exploration (p < 0).

Papers: Shao et al., "DeepSeekMath" (arXiv:2402.03300) for GRPO; Yu et al., "DAPO" (arXiv:2503.14476) for
clip-higher and the token-mean loss; Liu et al., "Understanding R1-Zero-Like Training" (Dr. GRPO, arXiv:2503.20783).
THR: Deng et al., "Token Hidden Reward" (arXiv:2510.03669), body unavailable: the score follows NTHR (arXiv:2505.18830).

Idea: sample G completions per prompt, score each with a verifier (reward 1 if the final answer is right), and use the
reward standardised within the group as every token's advantage; no value network. The update is PPO's clipped
surrogate on those advantages, here strictly on-policy by default (one update per rollout batch, ratio = 1).
THR: a GRPO step on token k' of response j moves the log-likelihood of the correct responses P by A_j times the sum over
P's tokens of LM-head gradient inner products <g, g'> <h, h'>, its hidden reward: > 0 sharpens correct answers (exploit:
greedy accuracy), < 0 keeps mass on alternatives (explore: pass@k); large-|THR| tokens get A (1 + p sign THR).

    A_i = (r_i - mean_g r) / (std_g r + eps)                                   group advantage (DeepSeekMath §4.1.2)
    g_ik = e_{y_ik} - pi_old(. | x, y_i,<k) over V* (the group's tokens; full-vocabulary softmax denominator)     (T1)
    s_jk' = sum_{i in P} sum_k <g_ik, g_jk'> <h_ik, h_jk'> = ((g_jk' M) * h_jk').sum,  M = G+^T H+               (T2)
    THR_jk' = a_j s_jk',  a_j = sign(A_j) (--thr-advantage sign) or A_j (value)                                  (T3)
    tau = beta_tau min_{i in P} mean_k THR_ik;  dominant <=> |THR_jk'| > tau                                      (T4)
    A'_jk' = A_j (1 + p sign THR_jk') on dominant tokens, A_j elsewhere (0 with --mask-nondominant)               (T5)
    tau = beta min_{i in P} mean_k s_ik;  selected <=> j incorrect and s_jk' > tau;  A'_jk' = eta A_j if selected (N1)
    L_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i),   rho_t = pi_theta(o_t) / pi_old(o_t)
    loss = aggregate(L_t + beta * k3(pi_ref, pi_theta)_t - c_H * H_t)         (token-mean by default, DAPO Eq. 8)
with A' (T5; N1 with --selection nthr) for A_i; labels ours; h: LM-head input; P: responses with r > 0.5; all from
pi_old, detached; GRPO's A in groups without a correct response. Confirmed: what THR measures, p's signs; N1 is NTHR's
rule (§5.2, Algorithm 1; beta = 1, eta = 0). Ours, UNCONFIRMED: T1-T2 (NTHR's V* and sum-first, every token),
--thr-advantage, --selection thr (two-sided T4-T5: --tau-beta, --p, --mask-nondominant), --objective gspo-token.

Run it (SCRIPT: grpo.py or any method script, which takes the same flags plus the method's own):
    python SCRIPT                                                      # CPU demo: tiny model, countdown, a few minutes
    python SCRIPT --model Qwen/Qwen2.5-Math-1.5B --dataset math-lighteval --eval-datasets math500,aime24,amc23 \\
        --prompts-per-step 128 --max-new-tokens 3072 --lr 1e-6 --steps 500 --micro-batch-size 8     # one GPU
    torchrun --nproc_per_node 8 SCRIPT --model Qwen/Qwen2.5-7B ...                                  # FSDP2, 8 GPUs
"""
import time
from dataclasses import dataclass, field

import torch

from common import (BaseArgs, aggregate_loss, all_sum_dict, autocast, compute_rewards, due, evaluate_all, fault_point,
                    format_prompt, generate, init_distributed, load_eval_sets, load_model, load_reference,
                    load_train_set, log_step, loss_fault, main, micro_batches, optimizer_step, print_summary, progress,
                    require, resume_or_evaluate, rollout_batch, rollout_engine, rollout_logprobs, rollout_metrics,
                    rollout_sums, save_checkpoint, set_lr, shard_model, start_run, step_groups, system_metrics,
                    time_metrics, token_logprobs, truncated_is_weight)
from common import gspo_token_logp  # --objective gspo-token


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
    p: float = field(default=-0.2, metadata={"help": "THR steering strength, |p| < 1: < 0 explore (pass@k), > 0 "
                     "exploit (greedy); -0.2: we target collapse, and p < 0 helped pass@k on every model"})
    mask_nondominant: bool = field(default=False, metadata={"help": "zero non-dominant tokens' advantage (THR-only)"})
    tau_beta: float = field(default=1.0, metadata={"help": "beta_tau of the dominant-token threshold tau = beta_tau * "
                                                           "min over correct responses of their mean THR (NTHR: 1)"})
    selection: str = field(default="thr", metadata={"choices": ["thr", "nthr"], "help": "thr: |THR| > tau on every "
                           "response, A (1 + p sign THR) (our two-sided extension) | nthr: NTHR's rule, tokens of "
                           "incorrect responses with s > tau get eta A (--p unused)"})
    eta: float = field(default=0.0, metadata={"help": "N1's scale of selected tokens' advantage, in [0, 1] (NTHR: 0)"})
    thr_advantage: str = field(default="sign", metadata={"choices": ["sign", "value"], "help": "advantage factor of "
                               "THR = a_j * s: sign(A_j) (NTHR's |s| threshold) | value A_j"})
    objective: str = field(default="grpo", metadata={"choices": ["grpo", "gspo-token"], "help": "grpo: token ratio | "
                           "gspo-token: sequence ratio, token advantages (pass --clip-low 3e-4 --clip-high 4e-4)"})

    def __post_init__(self):
        super().__post_init__()  # also checks every field's "choices"
        require(self.clip_low >= 0 and self.clip_high >= 0, "--clip-low and --clip-high must be >= 0")
        require(self.kl_coef >= 0 and self.entropy_coef >= 0, "--kl-coef and --entropy-coef must be >= 0")
        require(self.ppo_epochs >= 1 and self.mini_batches >= 1, "--ppo-epochs and --mini-batches must be >= 1")
        require(-1 < self.p < 1, f"--p must be in (-1, 1) so that no advantage changes sign (got {self.p})")
        require(0 <= self.tau_beta < torch.inf, f"--tau-beta must be a finite number >= 0 (got {self.tau_beta})")
        require(0 <= self.eta <= 1, f"--eta must be in [0, 1] (got {self.eta})")


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


def prediction_errors(logits, logz, targets, vocab):
    """g = e_y - pi_old over the columns `vocab` (V*), with the FULL-vocabulary log-normaliser logz (T1). logits:
    [n, K] = h @ W[vocab].T; logz, targets: [n]; vocab: [K] -> [n, K]."""
    return (targets[:, None] == vocab[None, :]).to(logits.dtype) - torch.exp(logits - logz[:, None])


def hidden_reward_scores(g, h, correct):
    """s_j = sum_{i in P} <g_i, g_j> <h_i, h_j> for every token j of one group, sum-first (T2): M = G+^T H+ is formed
    once, so the cost is O(n K d) instead of O(n^2 (K + d)). g: [n, K], h: [n, d], correct: [n] bool -> [n]."""
    M = g[correct].T @ h[correct]  # [K, d]
    return ((g @ M) * h).sum(-1)  # [n]


def token_hidden_scores(hidden, logz, targets, mask, correct, weight, group_size):
    """s (T2) for every completion token of whole groups of G rows, V* per group. hidden: [n, T, d] LM-head inputs;
    logz, targets, mask: [n, T]; correct: [n] bool; weight: [V, d] LM head -> [n, T], 0 at padding and where no THR."""
    s = targets.new_zeros(targets.shape, dtype=torch.promote_types(weight.dtype, torch.float32))  # [n, T] fp32 or fp64
    with torch.autocast(hidden.device.type, enabled=False):  # fp32 accumulation even inside the bf16 autocast region
        for g0 in range(0, len(targets), group_size):
            rows, valid = slice(g0, g0 + group_size), mask[g0:g0 + group_size].bool()  # [G, T]
            if correct[rows].any():  # else THR is undefined there: plain GRPO
                y, h = targets[rows][valid], hidden[rows][valid].to(s)  # [n_g], [n_g, d]: the group's tokens, s's dtype
                vocab = y.unique()  # V* [K]
                g = prediction_errors(h @ weight[vocab].to(h).T, logz[rows][valid].to(h), y, vocab)  # [n_g, K]
                s[rows][valid] = hidden_reward_scores(g, h, correct[rows, None].expand_as(valid)[valid])
    return s


def token_hidden_reward(s, advantages, factor="sign"):
    """THR = a_j s (T3), a_j = sign(A_j) or A_j. s: [N, T], advantages: [N] -> [N, T]."""
    return (advantages.sign() if factor == "sign" else advantages)[:, None] * s


def dominant_tokens(score, mask, correct, group_size, beta, rule="thr"):
    """Tokens past tau: |THR| > tau on every response (rule thr: our T4) or s > tau on incorrect ones (nthr: N1). score,
    mask: [N, T]; correct: [N] bool -> [N, T] bool (never padding; none in a group with no correct response)."""
    mean = (score * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N] anchor score of each response
    tau = beta * torch.where(correct, mean, torch.inf).view(-1, group_size).min(-1).values  # [N/G] (inf or nan: none)
    tau = tau.repeat_interleave(group_size)[:, None]  # [N, 1]
    return mask.bool() & ((score > tau) & ~correct[:, None] if rule == "nthr" else score.abs() > tau)  # [N, T] N1 | T4


def reweighted_advantages(advantages, thr, dominant, p, mask_nondominant):
    """A' = A (1 + p sign(THR)) on dominant tokens, A (or 0 with mask_nondominant) elsewhere (T5). advantages: [N];
    thr: [N, T]; dominant: [N, T] bool -> [N, T]. p = 0 without masking gives A exactly (GRPO)."""
    A = advantages[:, None].expand_as(thr)  # [N, T]
    return torch.where(dominant, A * (1 + p * thr.sign()), torch.zeros_like(A) if mask_nondominant else A)


def nthr_advantages(advantages, selected, eta):
    """A' = eta A on NTHR's selected tokens, A elsewhere (N1). advantages: [N]; selected: [N, T] bool -> [N, T]."""
    return torch.where(selected, eta * advantages[:, None], advantages[:, None])


def entropy_overlap(thr, entropy, mask, frac=0.2):
    """(|top-frac by |THR| & top-frac by entropy|, frac * n) over the n valid tokens with THR != 0 (chance: frac)."""
    keep = mask.bool() & (thr != 0)
    k = int(frac * keep.sum().item())
    top = lambda v: set(v[keep].topk(k).indices.tolist())  # noqa: E731
    return (len(top(thr.abs()) & top(entropy)), k) if k else (0, 0)


def thr_metrics(thr, dominant, correct, entropy, mask, t_thr, world, device):
    """THR's diagnostics over all ranks (dominant share, up/down fractions by answer, entropy overlap, compute time)."""
    (overlap, top_k), parts = entropy_overlap(thr, entropy, mask), ("", "/correct", "/incorrect")
    s = {"tokens": mask.sum().item(), "t_thr": t_thr, "overlap": overlap, "top_k": top_k}
    for part, dom in zip(parts, (dominant, dominant & correct[:, None], dominant & ~correct[:, None])):  # [N, T] each
        s.update({k + part: (dom & c).sum().item() for k, c in (("dom", dom), ("pos", thr > 0), ("neg", thr < 0))})
    s, div = all_sum_dict(s, device), lambda a, b: a / b if b else 0.0
    return {"thr/dominant_frac": s["dom"] / s["tokens"], "thr/entropy_overlap": div(s["overlap"], s["top_k"]),
            "thr/time_s": s["t_thr"] / world, **{f"thr/{sign}_frac{part}": div(s[sign + part], s["dom" + part])
                                                 for part in parts for sign in ("pos", "neg")}}


def train(args):
    rank, world, device = init_distributed()
    run_dir = start_run(args, __file__, rank)
    model, tokenizer = load_model(args.model, device, rank)
    ref_model = load_reference(args.model, device, rank, world) if args.kl_coef > 0 else None  # pi_ref for the KL
    model = shard_model(model, world, device, args.gradient_checkpointing).train()  # from_pretrained gives eval mode
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    train_set, eval_sets = load_train_set(args, tokenizer, model), load_eval_sets(args, tokenizer, model)
    engine = rollout_engine(args, model, tokenizer, rank)  # None: HF generate on the training model; else vLLM
    start, skipped, streak, history = resume_or_evaluate(run_dir, model, optimizer, tokenizer, eval_sets, args, device,
                                                         engine, rank)  # --resume: the checkpoint; else eval step 0
    G, pad, on_policy = args.group_size, tokenizer.pad_token_id, False  # THR: always the no-grad pass (its h, logz)
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
        #    On-policy (one optimizer step per rollout batch) pi_old = pi_theta: the update's forward gives them.
        ids, attn, mask, P = rollout_batch(samples, pad, device)  # [N, P+T], [N, P+T], [N, T]
        rollout_logp = rollout_logprobs(samples, mask)  # [N, T]: the engine's log pi(o_t) (vLLM), None with HF
        mbs, correct = max(G, args.micro_batch_size // G * G), rewards > 0.5  # whole groups; [N] the set P of each
        micro = [slice(i, i + mbs) for i in range(0, len(samples), mbs)]
        logprobs = lambda m, net=model, **kw: token_logprobs(net, ids[m], attn[m], P, args.logprob_chunk, **kw)  # noqa
        old_logp, entropy = torch.zeros_like(mask), torch.zeros_like(mask)  # [N, T]
        scores, t_thr = torch.zeros_like(mask), 0.0  # [N, T] s (T2)
        with torch.no_grad(), autocast(device):
            for m in micro:  # THR: whole groups; h [n, T, d] LM-head inputs, logz [n, T] the full-vocabulary logsumexp
                old_logp[m], entropy[m], h, logz = logprobs(m, return_hidden=True, row_fn=lambda x, t: x.logsumexp(-1))
                t1, weight = time.time(), model.get_output_embeddings().weight  # [V, d], unsharded after the forward
                scores[m] = token_hidden_scores(h, logz, ids[m, P:], mask[m], correct[m], weight, G)  # [n, T] (T2)
                t_thr += time.time() - t1
            ref_logp = torch.cat([logprobs(m, ref_model)[0] for m in micro]) if ref_model else None
        t1, nthr = time.time(), args.selection == "nthr"  # 4b. THR's token advantages A' (T3-T5, or N1)
        thr = token_hidden_reward(scores, advantages, args.thr_advantage)  # [N, T] (T3)
        dominant = dominant_tokens(scores if nthr else thr, mask, correct, G, args.tau_beta, args.selection)  # T4 | N1
        token_adv = (nthr_advantages(advantages, dominant, args.eta) if nthr else
                     reweighted_advantages(advantages, thr, dominant, args.p, args.mask_nondominant))  # [N, T] N1 | T5
        t_thr += time.time() - t1
        # 5. Policy update: ppo_epochs x mini_batches optimizer steps on the clipped surrogate.
        rows, sums = torch.arange(len(samples), device=device), {"clipped": 0.0, "loss": 0.0}
        for epoch in range(args.ppo_epochs):
            for mb in rows.chunk(args.mini_batches):
                n = all_sum_dict({"tokens": mask[mb].sum().item(), "seqs": len(mb)}, device)
                optimizer.zero_grad(set_to_none=True)
                for m in micro_batches(model, mb, args.micro_batch_size, world):  # gradients reduced after the last
                    with autocast(device):
                        logp, ent = logprobs(m)  # [n, T]
                    if on_policy:  # ratio exp(logp - old_logp) = 1 in value, gradient of log pi
                        old_logp[m], entropy[m] = logp.detach().float(), ent.detach().float()
                    logp = gspo_token_logp(logp, old_logp[m], mask[m]) if args.objective == "gspo-token" else logp
                    token_loss, clipped = policy_loss(logp, old_logp[m], token_adv[m], args.clip_low,
                                                      args.clip_high)
                    token_loss = token_loss * truncated_is_weight(old_logp[m], rollout_logp, m, args.tis_cap)  # TIS
                    if ref_model is not None:
                        token_loss = token_loss + args.kl_coef * kl_k3(logp, ref_logp[m])
                    if args.entropy_coef > 0:
                        token_loss = token_loss - args.entropy_coef * ent
                    loss = aggregate_loss(token_loss, mask[m], args.loss_agg, n["tokens"], n["seqs"],
                                          args.max_new_tokens)
                    loss = loss * loss_fault(step + 1)  # test-only: inf on the steps $EXPLORE_RLVR_FAULT names, else 1
                    loss.backward()
                    sums["loss"] += loss.item() / (args.ppo_epochs * world)
                    sums["clipped"] += (clipped * mask[m]).sum().item()
                grad_norm, skipped, streak = optimizer_step(model, optimizer, args, skipped, streak)  # non-finite: skip
        fault_point("update", step + 1)
        t_train = time.time() - t0 - t_rollout - t_reward
        # 6. Metrics (sums by name, added over ranks), evaluation, checkpoint.
        s = all_sum_dict({**rollout_sums(rewards, mask, entropy, samples, G), **sums}, device)
        record = {"step": step + 1, **rollout_metrics(s, args.ppo_epochs), "grad_norm": grad_norm, "lr": lr,
                  "skipped_steps": skipped,
                  **time_metrics(t_rollout, t_reward, t_train, s, args.ppo_epochs + (not on_policy))}
        record.update(thr_metrics(thr, dominant, correct, entropy, mask, t_thr, world, device))
        record.update(system_metrics(engine, old_logp, rollout_logp, mask, args, device))
        samples_by_set = None
        if due(args.eval_every, step + 1, args.steps):
            metrics, samples_by_set = evaluate_all(model, tokenizer, eval_sets, args, device, engine)
            record.update(metrics)
        record["time/step"] = time.time() - t0
        log_step(run_dir, record, history, rank, bar, samples_by_set)
        if due(args.save_every, step + 1, args.steps):  # after the metric line
            save_checkpoint(run_dir, step + 1, model, optimizer, tokenizer, rank, skipped, streak)
    print_summary(run_dir, rank)


if __name__ == "__main__":
    main(train, Args)
