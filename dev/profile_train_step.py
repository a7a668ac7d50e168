"""Where a training step's time goes: one micro-step (forward and backward, B=64, T=1024) and one AdamW step
of GPT-2 124M, compiled, in bf16, under torch.profiler, its GPU kernels grouped by what they do.

    python dev/profile_train_step.py --device cuda --out train_profile.txt
    python dev/profile_train_step.py --device cpu --toy     # a toy GPT on a CPU: CPU ops instead of kernels

It uses only what train_gpt2.py promises to keep: GPT, GPTConfig, `_, loss = model(x, y)`, and plain
torch.optim.AdamW and torch.compile (its AdamW settings: betas (0.9, 0.95), weight decay 0.1 on the matrices,
fused on a GPU). No gradient clipping: the micro-step and the optimizer, nothing else. Kernels are told
apart by their names, which is guesswork for Triton's fused kernels: each goes to the first class whose
name fragment it holds (a kernel fusing the log-softmax with a copy counts as loss).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_gpt2 import GPT, GPTConfig  # noqa: E402

# (class, what it holds, lower-case name fragments): a kernel (or CPU op) goes to the first class with a fragment
# in its name; whatever runs inside the optimizer's step goes to "optimizer" whatever its name
KERNEL_CLASSES = (
    ("optimizer", "AdamW's step", ("adam", "multi_tensor_apply", "foreach", "optimizer.")),
    ("loss", "log-softmax / NLL / cross-entropy", ("log_softmax", "logsoftmax", "nll_loss", "cross_entropy")),
    ("attention", "flash / cuDNN / fmha / SDPA", ("flash", "fmha", "cudnn", "sdpa", "scaled_dot_product", "attention")),
    ("matmul", "GEMMs: cuBLAS, CUTLASS, nvjet, Triton templates", ("gemm", "cutlass", "cublas", "nvjet", "xmma", "splitk",
                                                                   "triton_tem", "aten::mm", "aten::addmm", "aten::bmm",
                                                                   "aten::matmul", "aten::linear")),
    ("elementwise", "LayerNorm, GELU, adds, copies: Triton's fused kernels", ("triton", "elementwise", "vectorized", "reduce",
                                                                            "layer_norm", "gelu", "copy", "memcpy", "memset",
                                                                            "fill", "embedding", "index", "aten::")),
    ("other", "the rest", ("",)),
)
TOY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)


def kernel_class(name: str, in_optimizer=False) -> str:
    if in_optimizer:
        return "optimizer"
    name = name.lower()
    return next(key for key, _, fragments in KERNEL_CLASSES if any(f in name for f in fragments))


def timed_events(profile, gpu: bool) -> list[tuple[str, float, bool]]:
    """(name, microseconds, inside the optimizer's step) of each GPU kernel, memcpy and memset, or on a CPU
    of each op, by its self time (the time not spent in the ops it called, so that nothing counts twice)."""
    from torch.autograd import DeviceType

    events = profile.events()
    cpu = {e.id: e for e in events if e.device_type == DeviceType.CPU}

    def in_optimizer(event):  # a kernel: the CPU call that launched it, then that call's callers
        event = cpu.get(getattr(event, "linked_correlation_id", 0)) if event.device_type != DeviceType.CPU else event
        while event is not None:
            if event.name.startswith("Optimizer.step"):
                return True
            event = event.cpu_parent
        return False

    if gpu:  # user annotations are ranges drawn on the GPU's timeline, not work
        return [(e.name, e.self_device_time_total, in_optimizer(e)) for e in events
                if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    return [(e.name, e.self_cpu_time_total, in_optimizer(e)) for e in events if e.device_type == DeviceType.CPU]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--toy", action="store_true", help="a 2-layer, 64-wide GPT of block 64 (and B=2): a CPU dry run")
    p.add_argument("--warmup", type=int, default=3, help="steps before the profiled one (compile, allocator, AdamW state)")
    p.add_argument("--out", type=Path, help="also write the tables here")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    B = 2 if args.toy else args.batch_size
    torch.manual_seed(0)
    model = GPT(GPTConfig(**(TOY if args.toy else {}), vocab_pad_multiple=64)).to(args.device)
    T = model.config.block_size
    matrices = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on the matrices only
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=matrices, weight_decay=0.1), dict(params=others, weight_decay=0.0)],
                                  lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=gpu)
    compiled = torch.compile(model)
    x = torch.randint(0, model.config.vocab_size, (B, T), device=args.device)
    y = torch.randint(0, model.config.vocab_size, (B, T), device=args.device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def train_step():
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=gpu):
            _, loss = compiled(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        train_step()
    sync()
    start = time.perf_counter()
    train_step()
    sync()
    wall_ms = 1000 * (time.perf_counter() - start)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    with torch.profiler.profile(activities=activities) as profile:
        train_step()
        sync()

    by_class, by_kernel = {key: [0.0, 0] for key, *_ in KERNEL_CLASSES}, {}
    for name, us, in_optimizer in timed_events(profile, gpu):
        key = kernel_class(name, in_optimizer)
        by_class[key][0] += us / 1000
        by_class[key][1] += 1
        by_kernel[(key, name)] = by_kernel.get((key, name), 0.0) + us / 1000
    total = sum(ms for ms, _ in by_class.values())
    what = "GPU kernels" if gpu else "CPU ops' self time"
    compile_off = torch._dynamo.config.disable or os.environ.get("TORCHDYNAMO_DISABLE") == "1"  # as torch.compile reads them
    compiled = "not compiled: TORCHDYNAMO_DISABLE" if compile_off else "torch.compile"
    card = torch.cuda.get_device_name() if gpu else "cpu"
    shape = f"{'toy GPT' if args.toy else '124M'}, B={B}, T={T}"
    out = [f"one micro-step + AdamW step ({shape}, {compiled}, {'bf16' if gpu else 'fp32'}, {card}): "
           f"{total:.1f} ms of {what} in a {wall_ms:.1f} ms step (timed unprofiled)", "",
           f"{'class':<12} {'ms':>9} {'%':>6} {'count':>6}  what"]
    for key, description, _ in KERNEL_CLASSES:
        ms, count = by_class[key]
        out.append(f"{key:<12} {ms:>9.2f} {100 * ms / total:>5.1f}% {count:>6}  {description}")
    out += [f"{'total':<12} {total:>9.2f} {100.0:>5.1f}%", "", "the 25 longest, summed by name:"]
    for (key, name), ms in sorted(by_kernel.items(), key=lambda item: -item[1])[:25]:
        out.append(f"{ms:>9.2f} ms  {key:<11}  {name[:140]}")
    classes = ", ".join(f"{key} {ms:.1f} ms ({100 * ms / total:.0f}%)" for key, (ms, _) in by_class.items())
    out += ["", f"train step profile ({shape}, {card}): {what} {total:.1f} ms (step {wall_ms:.1f} ms): {classes}"]
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
