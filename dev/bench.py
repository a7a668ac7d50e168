"""
Measure our training, HellaSwag and sampling throughput next to Hugging Face's GPT-2, in one run.

    python dev/bench.py --model 124M --device cuda                     # the GPU figures (bf16, compiled)
    python dev/bench.py --model 124M --device cuda --compile off       # ... without torch.compile
    python dev/bench.py --model tiny --device cpu                      # a quick look on a CPU
    python dev/bench.py --model 124M --device cpu --batch_size 4 --block_size 256 --steps 3 --warmup 1

Every figure is measured for our GPT and for transformers.GPT2LMHeadModel (attn_implementation="sdpa",
the same shapes, the same AdamW settings, the same precision, the same train step code), so each comes
with a ratio measured in the same run. Training figures are the median of --steps steps after
--warmup steps (which absorb torch.compile and allocator warm-up). Prints a table; --json writes it.
"""

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules, from dev/
from plumbing import ArgumentParser, UserError, check_writable, peak_flops_for, pick_device, run_main, write_json_atomically
from train_gpt2 import (GPT, LOSS_CHUNK_ROWS, GPTConfig, Settings, chunked_cross_entropy, configure_optimizers,
                        find_hellaswag_data, flops_per_token, generate_with_cache, hellaswag_counts, load_hellaswag, mixed_precision, pick_dtype,
                        train_step)

SIZES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "124M": dict(n_layer=12, n_head=12, n_embd=768),
    "350M": dict(n_layer=24, n_head=16, n_embd=1024),
    "774M": dict(n_layer=36, n_head=20, n_embd=1280),
    "1558M": dict(n_layer=48, n_head=25, n_embd=1600),
}


class HFPeer(nn.Module):
    """transformers.GPT2LMHeadModel behind our forward signature: (idx, targets) -> (logits, loss).

    The loss is computed as ours is (on the given targets), so both models do the same work and the
    comparison is between the two model implementations."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config(
            vocab_size=config.padded_vocab_size,  # the same padded table as ours: same matmul shapes
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        hf_config._attn_implementation = "sdpa"  # F.scaled_dot_product_attention, as ours
        self.hf = GPT2LMHeadModel(hf_config)
        assert self.hf.config._attn_implementation == "sdpa"
        self.config = config

    def forward(self, idx, targets=None):
        logits = self.hf(input_ids=idx).logits
        if targets is None:
            return logits[..., : self.config.vocab_size], None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# What is measured (impl): "ours", our GPT with the plain loss (as it trains on GPUs), and "hf", Hugging
# Face's GPT-2 as the peer.
def build(impl: str, config: GPTConfig, device: str) -> nn.Module:
    torch.manual_seed(0)
    return (HFPeer(config) if impl == "hf" else GPT(config)).to(device)


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_training(config, args, device, dtype, impls) -> dict:
    """Median time of a full optimizer step (forward, backward, clip, AdamW) on (B, T), for each of
    `impls`. Their steps alternate, so a change in machine load hits all alike."""
    autocast, _ = mixed_precision(device, dtype)
    B, T = args.batch_size, config.block_size
    x = torch.randint(0, config.vocab_size, (B, T), device=device)
    y = torch.randint(0, config.vocab_size, (B, T), device=device)
    setups, times, peak_mem = {}, {impl: [] for impl in impls}, {}
    for impl in impls:
        model = build(impl, config, device)
        optimizers = configure_optimizers(model, Settings(), device.split(":")[0])
        _, scaler = mixed_precision(device, dtype)  # a scaler per model: each tracks its own gradients
        setups[impl] = (model, torch.compile(model) if args.compile == "on" else model, optimizers, scaler)
    for i in range(args.warmup + args.steps):
        for impl, (model, compiled, optimizers, scaler) in setups.items():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            train_step(compiled, optimizers, lambda: (x, y), 1, autocast, 1.0, scaler, ddp=False)
            sync(device)
            if i >= args.warmup:
                times[impl].append(time.perf_counter() - t0)
            if device.startswith("cuda"):  # the step's own peak (the other model's weights included)
                peak_mem[impl] = torch.cuda.max_memory_allocated(device) / 2**30
    peak = args.peak_flops or peak_flops_for(device, dtype)
    results = {}
    for impl, (model, *_rest) in setups.items():
        dt = statistics.median(times[impl])
        tokens_per_sec = B * T / dt
        results[impl] = dict(
            step_ms=1000 * dt,
            tok_per_s=tokens_per_sec,
            mfu=flops_per_token(model, T) * tokens_per_sec / peak if peak else None,
            peak_mem_gb=peak_mem.get(impl),
        )
    del setups
    return results


# ---------------------------------------------------------------------------------------------------
# Decoding speed, defined once: bench.py's sampling rows and .ci/gpu_checks.sh's decode parts all report it.
# A figure of the whole generate() call, as a user meets it, not of the decode steps alone: the prompt's
# prefill and the sampling included. Two warm-up calls first: the first compiles the decode step, and only
# the second records its CUDA graphs (mode="reduce-overhead" records on a graph's second call), so a single
# warm-up would time the recording too.

DECODE_PROMPT_TOKENS = 10
DECODE_WARMUP_CALLS = 2
DECODE_TIMED_CALLS = 3
DECODE_SPEED = (f"decode speed = B x new tokens / the time of a whole generate() call ({DECODE_PROMPT_TOKENS}-token prompt "
                f"included), the median of {DECODE_TIMED_CALLS} calls after {DECODE_WARMUP_CALLS} warm-up calls; "
                f"ms a step = that time / new tokens")


def time_generate(generate, batch_size: int, new_tokens: int, device: str) -> dict:
    """DECODE_SPEED of `generate` (a call that makes new_tokens tokens for each of batch_size rows)."""
    for _ in range(DECODE_WARMUP_CALLS):
        generate()
    times = []
    for _ in range(DECODE_TIMED_CALLS):
        sync(device)
        t0 = time.perf_counter()
        generate()
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return dict(batch_size=batch_size, new_tokens=new_tokens, ms_per_step=1000 * seconds / new_tokens,
                tok_per_s=batch_size * new_tokens / seconds)


@torch.no_grad()
def decode_speeds(model, cases, device: str, compile_step: bool) -> list[dict]:
    """time_generate of our model's greedy generate() for each (batch size, new tokens) of `cases`. Each new
    batch size starts from a fresh torch.compile, as in a process of its own: its decode step would otherwise
    be recompiled for a dynamic batch and could reach dynamo's limit of recompiles (then run uncompiled)."""
    speeds = []
    for i, (batch_size, new_tokens) in enumerate(cases):
        if i and batch_size != cases[i - 1][0]:
            torch.compiler.reset()
        prompt = torch.randint(0, model.config.vocab_size, (batch_size, DECODE_PROMPT_TOKENS), device=device)
        speeds.append(time_generate(lambda: generate_with_cache(model, prompt, new_tokens, temperature=0,
                                                                compile_step=compile_step),
                                    batch_size, new_tokens, device))
    return speeds


@torch.no_grad()
def bench_sampling(impl, config, args, device, dtype, use_cache: bool, compile_step=False) -> float:
    """Greedy generation tokens/s (DECODE_SPEED) for a batch of 10-token prompts, with or without the KV
    cache, and (ours) with the one-token step compiled (a CUDA graph on GPUs) or not."""
    model = build(impl, config, device).eval().to(dtype)  # weights in the dtype it decodes in: no per-token casts
    prompt = torch.randint(0, config.vocab_size, (args.sample_batch, DECODE_PROMPT_TOKENS), device=device)
    new = min(args.sample_tokens, config.block_size - DECODE_PROMPT_TOKENS)

    def generate():
        if impl != "hf":
            if use_cache:
                generate_with_cache(model, prompt, new, temperature=0, compile_step=compile_step)
            else:
                model.generate(prompt, new, temperature=0)
        else:
            model.hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=use_cache,
                              pad_token_id=0)

    return time_generate(generate, args.sample_batch, new, device)["tok_per_s"]


def bench_hellaswag(impl, config, args, device, dtype) -> float | None:
    """HellaSwag examples/s through the batched scorer (train_gpt2.hellaswag_counts)."""
    try:
        examples = load_hellaswag(find_hellaswag_data(args.hellaswag_data or None), args.hellaswag_limit)
    except Exception as e:  # no data offline: skip this row, keep the others
        print(f"HellaSwag skipped: {e}")
        return None
    model = build(impl, config, device).eval()
    scorer = torch.compile(model) if args.compile == "on" else model
    autocast_dtype = None if dtype == torch.float32 else dtype
    hellaswag_counts(scorer, examples[: args.hellaswag_batch], device, args.hellaswag_batch, autocast_dtype=autocast_dtype)
    sync(device)
    t0 = time.perf_counter()
    hellaswag_counts(scorer, examples, device, args.hellaswag_batch, autocast_dtype=autocast_dtype)
    sync(device)
    del model, scorer
    return len(examples) / (time.perf_counter() - t0)


def loss_cost(chunked: bool, rows: int, n_embd: int, device: str, dtype: torch.dtype, repeats: int = 5) -> tuple[float, float]:
    """The classifier and the loss, forward and backward, over `rows` positions of width n_embd, with
    the plain loss (every logit, then F.cross_entropy) or the chunked one (chunked_cross_entropy): the
    median milliseconds of `repeats`, and the peak memory in GiB (on a GPU the allocator's peak above
    the inputs; on a CPU the process's peak, so bench_loss runs each case in a fresh process)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_pad_multiple=64)
    x = torch.randn(rows, n_embd, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(config.padded_vocab_size, n_embd, device=device)).requires_grad_()
    targets = torch.randint(0, config.vocab_size, (rows,), device=device)
    autocast, _ = mixed_precision(device, dtype)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        x.grad = weight.grad = None
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            if chunked:
                loss = chunked_cross_entropy(x, weight[: config.vocab_size], targets, LOSS_CHUNK_ROWS)
            else:
                loss = F.cross_entropy(F.linear(x, weight)[:, : config.vocab_size].float(), targets)
        loss.backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        return 1000 * statistics.median(times[1:]), (torch.cuda.max_memory_allocated(device) - baseline) / 2**30
    return 1000 * statistics.median(times[1:]), peak_rss_gib()


def bench_loss(config, args, device, dtype, chunked: bool) -> tuple[float, float]:
    """loss_cost at the training step's shape (B x T rows), in a fresh process (spawned)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(loss_cost, (chunked, args.batch_size * config.block_size, config.n_embd, device, dtype))


def finetune_step_memory(config: GPTConfig, batch_size: int, device: str, dtype: torch.dtype, lora_rank: int) -> float:
    """Peak memory (GiB) of fine-tuning steps: every weight (lora_rank 0) or LoRA adapters only. On a
    GPU, torch's allocator peak; on a CPU, the peak resident memory of this process, which runs alone
    (bench.py starts it fresh for each case, so the two share no allocations)."""
    from train_gpt2 import add_lora

    model = build("ours", config, device)
    if lora_rank:
        add_lora(model, lora_rank, alpha=2.0 * lora_rank)
    optimizers = configure_optimizers(model, Settings(), device.split(":")[0])
    autocast, scaler = mixed_precision(device, dtype)
    x = torch.randint(0, config.vocab_size, (batch_size, config.block_size), device=device)
    for _ in range(3):  # the optimizer's moments appear at the first step
        train_step(model, optimizers, lambda: (x, x), 1, autocast, 1.0, scaler, ddp=False)
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()


def peak_rss_gib() -> float:
    """This process's peak resident memory. On Linux, VmHWM: ru_maxrss would be no good, since Linux
    carries the parent's peak over fork + exec, so a spawned child would report bench.py's own peak."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # kB
    except (OSError, StopIteration):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2**30 if sys.platform == "darwin" else maxrss / 2**20  # bytes on macOS, KiB elsewhere


def bench_finetune(config, args, device, dtype, lora_rank: int) -> float:
    """finetune_step_memory in a fresh process (spawned: it imports nothing of this one's state)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(finetune_step_memory, (config, args.batch_size, device, dtype, lora_rank))


def compile_disabled() -> bool:
    """torch.compile returns the function unchanged (the environment switched it off), as torch reads it."""
    return torch._dynamo.config.disable or os.environ.get("TORCHDYNAMO_DISABLE") == "1"


def free_memory(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


PARTS = {
    "train": "training step: ours vs HF",
    "loss": "the chunked loss (F.linear_cross_entropy) vs the plain one: time and peak memory of the classifier + loss",
    "hellaswag": "HellaSwag examples/s: ours vs HF",
    "sample": "sampling tok/s, with and without the KV cache: ours vs HF",
    "decode": "sampling with the compiled one-token step vs the plain one",
    "finetune": "peak memory of full vs LoRA fine-tuning",
}


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=SIZES, default="124M")
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=16, help="micro-batch B of the training step")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="auto: on for CUDA")
    p.add_argument("--vocab_pad_multiple", type=int, default=64)
    p.add_argument("--sample_batch", type=int, default=4)
    p.add_argument("--sample_tokens", type=int, default=128)
    p.add_argument("--hellaswag_limit", type=int, default=200, help="HellaSwag examples to time (0 = skip)")
    p.add_argument("--hellaswag_batch", type=int, default=16)
    p.add_argument("--hellaswag_data", default="", help="hellaswag_val.jsonl (default: $HELLASWAG_DATA or the download cache)")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip: {','.join(PARTS)}")
    p.add_argument("--lora_rank", type=int, default=8, help="the LoRA rank of the finetune part")
    p.add_argument("--peak_flops", type=float, default=0.0)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("block_size", "batch_size", "steps", "vocab_pad_multiple", "sample_batch", "sample_tokens", "hellaswag_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be at least 1")
    if args.warmup < 0 or args.hellaswag_limit < 0:
        raise UserError("--warmup and --hellaswag_limit must be 0 or more")
    if args.block_size < 16:
        raise UserError(f"--block_size {args.block_size} must be at least 16 (the sampling part's prompts are 10 tokens)")
    if args.lora_rank < 1:
        raise UserError(f"--lora_rank {args.lora_rank} must be at least 1")
    if not args.peak_flops >= 0 or args.peak_flops == float("inf"):
        raise UserError(f"--peak_flops {args.peak_flops} must be a finite number, 0 (look it up) or more")
    skip = set(filter(None, args.skip.split(",")))
    unknown = skip - set(PARTS)
    if unknown:
        raise UserError(f"--skip {args.skip}: {', '.join(sorted(unknown))} is not a part ({', '.join(PARTS)})")
    if args.json:
        check_writable(args.json, "--json")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    args.compile = "on" if args.compile == "on" or (args.compile == "auto" and device.startswith("cuda")) else "off"
    config = GPTConfig(block_size=args.block_size, vocab_pad_multiple=args.vocab_pad_multiple, **SIZES[args.model])
    hardware = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{device} ({torch.get_num_threads()} threads)"
    print(f"{args.model} (B={args.batch_size}, T={args.block_size}) on {hardware}, torch {torch.__version__}, "
          f"{str(dtype).replace('torch.', '')}, compile {args.compile}")

    rows, effects = [], []  # ours vs HF; an optimisation on vs off

    def measure(name, unit, fn):
        values = {}
        for impl in ("ours", "hf"):
            values[impl] = fn(impl)
            free_memory(device)
        rows.append(dict(name=name, unit=unit, **values))

    if "train" not in skip:
        train = bench_training(config, args, device, dtype, ("ours", "hf"))
        free_memory(device)
        rows.append(dict(name="train step", unit="tok/s", ours=train["ours"]["tok_per_s"], hf=train["hf"]["tok_per_s"]))
        rows.append(dict(name="train step time", unit="ms", ours=train["ours"]["step_ms"], hf=train["hf"]["step_ms"]))
        if train["ours"]["mfu"] is not None:
            rows.append(dict(name="MFU", unit="%", ours=100 * train["ours"]["mfu"], hf=100 * train["hf"]["mfu"]))
        if train["ours"]["peak_mem_gb"] is not None:
            rows.append(dict(name="peak memory", unit="GiB", ours=train["ours"]["peak_mem_gb"], hf=train["hf"]["peak_mem_gb"]))
    # Without F.linear_cross_entropy, chunked_cross_entropy is the plain loss: the row would time it twice.
    if "loss" not in skip and not hasattr(F, "linear_cross_entropy"):
        print(f"chunked loss row skipped: torch {torch.__version__} has no F.linear_cross_entropy (2.13+)")
    elif "loss" not in skip:
        (chunked_ms, chunked_gib), (plain_ms, plain_gib) = (bench_loss(config, args, device, dtype, chunked)
                                                            for chunked in (True, False))
        kind = "GPU allocator" if device.startswith("cuda") else "process RSS"
        effects.append(dict(name=f"chunked loss, B x T = {args.batch_size * config.block_size:,} rows: time", unit="ms",
                            on=chunked_ms, off=plain_ms))
        effects.append(dict(name=f"chunked loss: peak memory ({kind})", unit="GiB", on=chunked_gib, off=plain_gib))
    if "hellaswag" not in skip and args.hellaswag_limit:
        measure("HellaSwag", "examples/s", lambda impl: bench_hellaswag(impl, config, args, device, dtype))
    if "sample" not in skip:
        measure("sampling, KV cache", "tok/s", lambda impl: bench_sampling(impl, config, args, device, dtype, True))
        measure("sampling, no cache", "tok/s", lambda impl: bench_sampling(impl, config, args, device, dtype, False))
    if "decode" not in skip and compile_disabled():  # the "compiled" step would be the plain one, timed twice
        print("compiled decode step row skipped: torch.compile is switched off here (TORCHDYNAMO_DISABLE or "
              "TORCH_COMPILE_DISABLE)")
    elif "decode" not in skip:
        compiled = bench_sampling("ours", config, args, device, dtype, True, compile_step=True)
        free_memory(device)
        plain = bench_sampling("ours", config, args, device, dtype, True, compile_step=False)
        effects.append(dict(name="compiled decode step: sampling", unit="tok/s", on=compiled, off=plain))
    if "finetune" not in skip:
        lora = bench_finetune(config, args, device, dtype, args.lora_rank)
        full = bench_finetune(config, args, device, dtype, 0)
        kind = "GPU allocator" if device.startswith("cuda") else "process RSS"
        effects.append(dict(name=f"LoRA r={args.lora_rank} vs full fine-tuning: peak memory ({kind})", unit="GiB", on=lora, off=full))

    print(f"\n| {'measure':<20} | {'unit':<10} | {'ours':>12} | {'HF GPT-2':>12} | {'ours / HF':>9} |")
    print(f"|{'-' * 22}|{'-' * 12}|{'-' * 14}|{'-' * 14}|{'-' * 11}|")
    for row in rows:
        if row["ours"] is None or row["hf"] is None:
            continue
        ratio = row["ours"] / row["hf"] if row["hf"] else float("nan")
        row["ratio"] = ratio
        print(f"| {row['name']:<20} | {row['unit']:<10} | {row['ours']:>12,.1f} | {row['hf']:>12,.1f} | {ratio:>8.2f}x |")
    if effects:
        print(f"\n| {'optimisation':<56} | {'unit':<6} | {'on':>10} | {'off':>10} | {'on / off':>8} |")
        print(f"|{'-' * 58}|{'-' * 8}|{'-' * 12}|{'-' * 12}|{'-' * 10}|")
        for row in effects:
            row["ratio"] = row["on"] / row["off"]
            print(f"| {row['name']:<56} | {row['unit']:<6} | {row['on']:>10,.2f} | {row['off']:>10,.2f} | {row['ratio']:>7.2f}x |")
    if {"sample", "decode"} - skip:
        print(f"\n{DECODE_SPEED}")
    if args.json:
        write_json_atomically(args.json, dict(hardware=hardware, torch=torch.__version__, dtype=str(dtype), compile=args.compile,
                                              model=args.model, batch_size=args.batch_size, block_size=args.block_size,
                                              rows=rows, optimisations=effects, decode_speed=DECODE_SPEED), "--json")


if __name__ == "__main__":
    run_main(main)
