"""
HellaSwag: can a language model tell the sensible ending of a story from three nonsensical ones?

    python hellaswag.py --model gpt2                           # OpenAI's 124M: acc 0.2859, acc_norm 0.2955
    python hellaswag.py --model runs/my_run --limit 1000        # the newest checkpoint of a run
    python hellaswag.py --model gpt2 --data hellaswag_val.jsonl # offline: a local copy of the data
    torchrun --standalone --nproc_per_node=8 hellaswag.py --model gpt2-xl --dtype bfloat16

Each of the 10,042 validation examples is a context and four endings, one of them right:

    "A man is sitting on a roof. he"  ->  "is using wrap to wrap a pair of skis."
                                          "is ripping level tiles off."
                                          "is holding a rubik's cube."
                                          "starts pulling up roofing on a roof."   (label 3)

The model never sees the four endings side by side. It scores each as a completion of the context:
the cross-entropy of the ending's tokens, each predicted from the context and the ending tokens before
it. `acc` picks the ending with the lowest total loss; `acc_norm` the lowest loss per token, so that a
long ending is not penalised for being long. This is the completion-style protocol of build-nanogpt's
hellaswag.py, in which GPT-2 124M scores acc_norm 0.2955. lm-evaluation-harness's `hellaswag` task
cleans the text and normalises by length in bytes instead: its numbers are not comparable with these.

The data, the rendering and the batched scoring are train_gpt2.py's (section 13), which the training
loop calls every eval_interval: there is one implementation of the scoring. This script scores any
model on its own, on one process or under torchrun (each process scores its share, the counts are
all-reduced, and rank 0 prints and writes the result).
"""

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

from plumbing import ArgumentParser, check_writable, run_main, write_json_atomically
from train_gpt2 import (HELLASWAG_DATA_ENV, find_hellaswag_data, hellaswag_counts_all_ranks, load_hellaswag, load_model,
                        setup_distributed)


AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description="HellaSwag accuracy of a GPT-2 model (completion style).")
    parser.add_argument("--model", required=True, help="gpt2 | gpt2-medium | ... | checkpoint.pt | run folder | HF dir")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps, ...")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per forward pass (4 rows each)")
    parser.add_argument(
        "--data", default=None, help=f"a local hellaswag_val.jsonl (default: ${HELLASWAG_DATA_ENV}, else download it)"
    )
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    parser.add_argument("--dtype", default="float32", choices=AUTOCAST_DTYPES, help="autocast dtype of the forward")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument(
        "--compare_unbatched", action="store_true", help="benchmark: also score one example per forward, report speedup"
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    return args


def timed_counts(model, examples, device, rank, world_size, **kwargs) -> tuple[dict, float]:
    """Counts summed over all ranks, and the seconds it took (the slowest rank's, as the all-reduce waits)."""
    start = time.perf_counter()
    counts = hellaswag_counts_all_ranks(model, examples, device, rank, world_size, **kwargs)
    return counts, time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    _, rank, _, world_size, device = setup_distributed(args.device)  # train_gpt2's: torchrun or one process
    try:
        evaluate(args, rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def evaluate(args, rank: int, world_size: int, device: str) -> None:
    if rank == 0 and args.json:
        check_writable(args.json, "--json")  # now, not after the evaluation
    # Rank 0 downloads (if it must) while the others wait, so they never race to write the same file.
    if rank == 0:
        data_path = find_hellaswag_data(args.data)
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        data_path = find_hellaswag_data(args.data)
    examples = load_hellaswag(data_path, args.limit)  # before the model: a bad file fails fast

    model = load_model(args.model, device)
    if args.compile:
        model = torch.compile(model)
    autocast_dtype = AUTOCAST_DTYPES[args.dtype]
    # A compiled model needs a few fixed shapes; an eager one runs any shape, and padding is wasted work.
    pad_to_multiple = 16 if args.compile else 1
    counts, seconds = timed_counts(
        model, examples, device, rank, world_size, batch_size=args.batch_size, autocast_dtype=autocast_dtype,
        pad_to_multiple=pad_to_multiple, progress=rank == 0,
    )
    n = counts["total"]
    result = dict(
        model=args.model,
        n=n,
        acc=counts["correct"] / n,
        acc_norm=counts["correct_norm"] / n,
        correct=counts["correct"],
        correct_norm=counts["correct_norm"],
        examples_per_s=n / seconds,
        seconds=seconds,
        data=str(Path(data_path).resolve()),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        world_size=world_size,
        compile=args.compile,
    )
    if rank == 0:
        print(f"hellaswag {args.model}: {n} examples, {result['examples_per_s']:.1f} examples/s")
        print(f"acc {result['acc']:.4f}")
        print(f"acc_norm {result['acc_norm']:.4f}")
    if args.compare_unbatched:
        # The same scoring, one example per forward pass: its four rows, padded to the longest of them.
        unbatched, unbatched_seconds = timed_counts(
            model, examples, device, rank, world_size, batch_size=1, autocast_dtype=autocast_dtype,
            pad_to_multiple=1, sort_by_length=False,
        )
        result["unbatched_examples_per_s"] = n / unbatched_seconds
        result["unbatched_counts_match"] = unbatched == counts
        if rank == 0:
            print(f"unbatched: {result['unbatched_examples_per_s']:.1f} examples/s")
            print(f"batched is {unbatched_seconds / seconds:.2f}x faster; same counts: {unbatched == counts}")
    if rank == 0 and args.json:
        write_json_atomically(args.json, result, "--json")


if __name__ == "__main__":
    run_main(main)
