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
        eta = 2 |0.5 - p_hat| per group, p_hat its accuracy (--eta adaptive, NTHR's training runs), or a constant
    L_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i),   rho_t = pi_theta(o_t) / pi_old(o_t)
    loss = aggregate(w_t L_t + beta * k3(pi_ref, pi_theta)_t - c_H * H_t)     (token-mean by default, DAPO Eq. 8)
    w_t = min(pi_old(o_t) / pi_rollout(o_t), C) when vLLM sampled, else 1         (truncated IS, Yao et al. 2025)
with A' (T5; N1 with --selection nthr) for A_i; labels ours; h: LM-head input; P: responses with r > 0.5; all from
pi_old, detached; GRPO's A in groups without a correct response. Confirmed: what THR measures, p's signs; N1 is NTHR's
rule (§5.2, Algorithm 1; beta = 1; the adaptive eta of App. 7.3). Ours, UNCONFIRMED: T1-T2 (NTHR's V* and
sum-first, every token), --thr-advantage, --selection thr (two-sided T4-T5: --tau-beta, --p, --mask-nondominant).
--objective gspo-token is GSPO-token's objective (gspo_token_logp), which THR's paper also runs.

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
from grpo import Args as GRPOArgs  # GRPO's flags; the method adds its own
from grpo import aggregate_loss, group_advantages, kl_k3, policy_loss, truncated_is_weight  # GRPO's math


@dataclass
class Args(GRPOArgs):
    p: float = field(default=-0.2, metadata={"help": "THR steering strength, |p| < 1: < 0 explore (pass@k), > 0 "
                     "exploit (greedy); -0.2: we target collapse, and p < 0 helped pass@k on every model"})
    mask_nondominant: bool = field(default=False, metadata={"help": "zero non-dominant tokens' advantage (THR-only)"})
    tau_beta: float = field(default=1.0, metadata={"help": "beta_tau of the dominant-token threshold tau = beta_tau * "
                                                           "min over correct responses of their mean THR (NTHR: 1)"})
    selection: str = field(default="thr", metadata={"choices": ["thr", "nthr"], "help": "thr: |THR| > tau on every "
                           "response, A (1 + p sign THR) (our two-sided extension) | nthr: NTHR's rule, tokens of "
                           "incorrect responses with s > tau get eta A (--p unused)"})
    eta: str = field(default="adaptive", metadata={"help": "N1's scale of the selected tokens' advantage: adaptive "
                     "(NTHR's training runs: 2 |0.5 - p_hat| per group, p_hat its accuracy) or a number in [0, 1]"})
    thr_advantage: str = field(default="sign", metadata={"choices": ["sign", "value"], "help": "advantage factor of "
                               "THR = a_j * s: sign(A_j) (NTHR's |s| threshold) | value A_j"})
    objective: str = field(default="grpo", metadata={"choices": ["grpo", "gspo-token"], "help": "grpo: token ratio | "
                           "gspo-token: sequence ratio, token advantages (pass --clip-low 3e-4 --clip-high 4e-4)"})

    def __post_init__(self):
        super().__post_init__()  # GRPO's checks
        require(-1 < self.p < 1, f"--p must be in (-1, 1) so that no advantage changes sign (got {self.p})")
        require(0 <= self.tau_beta < torch.inf, f"--tau-beta must be a finite number >= 0 (got {self.tau_beta})")
        try:
            eta = 0.0 if self.eta == "adaptive" else float(self.eta)
        except ValueError:
            eta = math.nan
        require(0 <= eta <= 1, f"--eta must be adaptive or a number in [0, 1] (got {self.eta})")


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


def nthr_eta(correct, group_size, eta="adaptive"):
    """N1's eta per response [N]: adaptive 2 |0.5 - p_hat|, p_hat the group's accuracy (NTHR App. 7.3, Table 5: its
    training runs; a group at 50% accuracy drops its selected tokens' penalty, one at 0% or 100% keeps it), or one
    constant. correct: [N] bool."""
    if eta != "adaptive":
        return torch.full(correct.shape, float(eta), device=correct.device)
    p_hat = correct.float().view(-1, group_size).mean(-1)  # [N/G]
    return (2 * (0.5 - p_hat).abs()).repeat_interleave(group_size)  # [N]


def nthr_advantages(advantages, selected, eta):
    """A' = eta A on NTHR's selected tokens, A elsewhere (N1). advantages, eta: [N] (or eta a number); selected:
    [N, T] bool -> [N, T]."""
    eta = torch.as_tensor(eta, dtype=advantages.dtype, device=advantages.device)
    eta = eta[:, None] if eta.dim() else eta
    return torch.where(selected, eta * advantages[:, None], advantages[:, None])


def entropy_overlap(thr, entropy, mask, frac=0.2):
    """(|top-frac by |THR| & top-frac by entropy|, frac * n) over the n valid tokens with THR != 0 (chance: frac)."""
    keep = mask.bool() & (thr != 0)
    k = int(frac * keep.sum().item())
    if k == 0:
        return 0, 0
    top_thr, top_entropy = (set(v[keep].topk(k).indices.tolist()) for v in (thr.abs(), entropy))
    return len(top_thr & top_entropy), k


def thr_metrics(thr, dominant, correct, entropy, mask, t_thr, world, device):
    """THR's diagnostics over all ranks (dominant share, up/down fractions by answer, entropy overlap, compute time)."""
    overlap, top_k = entropy_overlap(thr, entropy, mask)
    parts = ("", "/correct", "/incorrect")
    s = {"tokens": mask.sum().item(), "t_thr": t_thr, "overlap": overlap, "top_k": top_k}
    for part, dom in zip(parts, (dominant, dominant & correct[:, None], dominant & ~correct[:, None])):  # [N, T] each
        s.update({k + part: (dom & c).sum().item() for k, c in (("dom", dom), ("pos", thr > 0), ("neg", thr < 0))})
    s = all_sum_dict(s, device)

    def ratio(a, b):  # 0 where nothing was counted
        return s[a] / s[b] if s[b] else 0.0
    return {"thr/dominant_frac": s["dom"] / s["tokens"], "thr/entropy_overlap": ratio("overlap", "top_k"),
            "thr/time_s": s["t_thr"] / world, **{f"thr/{sign}_frac{part}": ratio(sign + part, "dom" + part)
                                                 for part in parts for sign in ("pos", "neg")}}


def gspo_token_logp(logp, old_logp, mask):
    """--objective gspo-token (GSPO-token, arXiv:2507.18071, the objective THR's paper also runs): a log-prob whose
    ratio to old_logp is sg[s_i] pi(y_t) / sg[pi(y_t)], s_i = exp(mean_t (logp - old_logp)) the sequence ratio, so value
    s_i and gradient s_i grad log pi(y_t); on-policy (s_i = 1) it is GRPO's token update. logp, old_logp, mask: [n, T]
    -> [n, T]."""
    log_s = ((logp - old_logp) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # [n, 1]
    return old_logp + log_s.detach() + logp - logp.detach()


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
        #    THR always runs this pass, on whole groups: the scores need the group's h and logz before the update.
        ids, attn, mask, P = rollout_batch(samples, tokenizer.pad_token_id, device)  # [N, P+T], [N, P+T], [N, T]
        #    (prompts left-padded to P tokens, so every completion starts at column P; mask: float, 1 on real tokens)
        rollout_logp = rollout_logprobs(samples, mask)  # [N, T]: the engine's log pi(o_t) (vLLM), None with HF

        def logprobs(rows, net=model, **kw):  # log pi(o_t | o_<t) and the entropy of pi(. | o_<t): [n, T] each
            return token_logprobs(net, ids[rows], attn[rows], P, args.logprob_chunk, temperature=args.temperature,
                                  **kw)

        def logsumexp(logits, targets):  # the full-vocabulary log-normaliser logz of each row [n, V] -> [n]
            return logits.logsumexp(-1)
        correct = rewards > 0.5  # [N]: the set P of each group
        rows = torch.arange(len(samples), device=device)  # [N]
        micro = micro_batches(rows, mask, P, args, group=G)  # [n] row indices per forward of the pass: whole groups
        old_logp, entropy = torch.zeros_like(mask), torch.zeros_like(mask)  # [N, T] float
        scores = torch.zeros_like(mask)  # [N, T] s (T2)
        t_thr = 0.0
        ref_logp = None
        with torch.no_grad(), autocast(device):
            for m in micro:  # THR: whole groups; h [n, T, d] LM-head inputs, logz [n, T] the full-vocabulary logsumexp
                old_logp[m], entropy[m], h, logz = logprobs(m, return_hidden=True, row_fn=logsumexp)
                t1 = time.time()
                weight = model.get_output_embeddings().weight  # [V, d], unsharded after the forward
                scores[m] = token_hidden_scores(h, logz, ids[m, P:], mask[m], correct[m], weight, G)  # [n, T] (T2)
                t_thr += time.time() - t1
            if ref_model is not None:
                ref_logp = torch.cat([logprobs(m, ref_model)[0] for m in micro])  # [N, T]
        # 4b. THR's token advantages A' (T3-T5, or N1).
        t1 = time.time()
        thr = token_hidden_reward(scores, advantages, args.thr_advantage)  # [N, T] (T3)
        if args.selection == "nthr":  # NTHR's rule: eta A on incorrect responses' tokens with s > tau (N1)
            dominant = dominant_tokens(scores, mask, correct, G, args.tau_beta, "nthr")  # [N, T]
            token_adv = nthr_advantages(advantages, dominant, nthr_eta(correct, G, args.eta))  # [N, T]
        else:  # our two-sided rule: A (1 + p sign THR) where |THR| > tau (T4, T5)
            dominant = dominant_tokens(thr, mask, correct, G, args.tau_beta, "thr")  # [N, T]
            token_adv = reweighted_advantages(advantages, thr, dominant, args.p, args.mask_nondominant)  # [N, T]
        t_thr += time.time() - t1
        # 5. Policy update: ppo_epochs x mini_batches optimizer steps on the clipped surrogate.
        sums = {"clipped": 0.0, "loss": 0.0}
        for epoch in range(args.ppo_epochs):
            for mb in rows.chunk(args.mini_batches):
                totals = all_sum_dict({"tokens": mask[mb].sum().item(), "seqs": len(mb)}, device)  # all ranks
                optimizer.zero_grad(set_to_none=True)
                for m in micro_batches(mb, mask, P, args):  # reduce-scattered per backward: never a full gradient
                    with autocast(device):
                        logp, ent = logprobs(m)  # [n, T]
                    if args.objective == "gspo-token":  # the sequence ratio, token advantages
                        logp = gspo_token_logp(logp, old_logp[m], mask[m])
                    token_loss, clipped = policy_loss(logp, old_logp[m], token_adv[m], args.clip_low,
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
        record.update(thr_metrics(thr, dominant, correct, entropy, mask, t_thr, world, device))
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
