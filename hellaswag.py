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

The scoring runs many examples per forward pass, in batches of a few fixed shapes: fast on a GPU, and
a torch.compile'd model never recompiles per example. The training loop calls `hellaswag_counts` from
here: there is one implementation of the scoring.

The story, in the order it is told below:
  1. the data: download once, or read a local copy; validate every line; render to tokens
  2. batches of fixed shapes: four rows per example, right-padded, with a mask of the scored tokens
  3. scoring: per-ending losses, then correct counts for this rank's share of the examples
  4. the command line, single process or under torchrun
"""

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F

from plumbing import (ArgumentParser, UserError, check_writable, download, progress_bar, run_main, utf8_lines,
                     write_json_atomically)
from train_gpt2 import EOT_TOKEN, get_tokenizer, load_model, setup_distributed

# ---------------------------------------------------------------------------------------------------
# 1. The data
#
# One JSON object per line. We read three fields: `ctx` (the context), `endings` (four strings) and
# `label` (the index of the right ending). Nodes without internet take a local copy of the file.

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DATA_ENV_VAR = "HELLASWAG_DATA"  # a local copy of hellaswag_val.jsonl, when --data is not given
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / "hellaswag_cache"  # where the download is kept
NUM_ENDINGS = 4


def find_hellaswag_data(data: str | None = None, cache_dir=DEFAULT_CACHE_DIR) -> Path:
    """The validation file: `data` if given, else $HELLASWAG_DATA, else the download in cache_dir
    (fetched on first use)."""
    for source, value in (("--data", data), (f"${DATA_ENV_VAR}", os.environ.get(DATA_ENV_VAR))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise UserError(f"HellaSwag data file {path} (from {source}) does not exist")
            return path
    path = Path(cache_dir) / "hellaswag_val.jsonl"
    if not path.is_file():
        try:
            download(HELLASWAG_URL, path)
        except OSError as e:  # no network, DNS failure, HTTP error (URLError and HTTPError are OSErrors)
            raise UserError(
                f"could not download HellaSwag from {HELLASWAG_URL} ({e}); without internet, pass "
                f"--data path/to/hellaswag_val.jsonl or set {DATA_ENV_VAR}"
            ) from e
    return path


@dataclass
class HellaSwagExample:
    context: list[int]  # tokens of the context
    endings: list[list[int]]  # tokens of " " + each ending (the space belongs to the ending's first word)
    label: int  # index of the right ending


def render_example(context: str, endings: list[str], label: int) -> HellaSwagExample:
    """Tokenize one example. GPT-2's tokens carry the space before a word (" roof" is one token), and
    the context ends without one, so the space goes at the start of each ending."""
    tokenizer = get_tokenizer()
    return HellaSwagExample(
        context=tokenizer.encode(context),
        endings=[tokenizer.encode(" " + ending) for ending in endings],
        label=label,
    )


def parse_line(line: str, where: str) -> tuple[str, list[str], int]:
    """(ctx, endings, label) from one line of the file; a UserError naming the line if it is malformed."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("ctx", "endings", "label"):
        if field not in row:
            raise UserError(f"{where}: missing field {field!r}")
    context, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(context, str):
        raise UserError(f"{where}: 'ctx' must be a string")
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    if isinstance(label, str) and label.isdigit():  # Hugging Face's copy of the data stores "3"
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_ENDINGS:
        raise UserError(f"{where}: label {row['label']!r} is out of range (expected 0..{NUM_ENDINGS - 1})")
    return context, endings, label


def load_hellaswag(path, limit: int | None = None) -> list[HellaSwagExample]:
    """The first `limit` examples of a HellaSwag .jsonl file (all of them by default), tokenized.
    Tokenizing the whole validation set takes about half a second."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"HellaSwag data file {path} does not exist")
    examples = []
    for line_number, line in utf8_lines(path):  # a bad byte is reported with its line
        if limit is not None and len(examples) >= limit:
            break
        if line.strip():  # tolerate blank lines (a trailing newline, a hand-edited file)
            examples.append(render_example(*parse_line(line, where=f"{path} line {line_number}")))
    if not examples:
        raise UserError(f"{path} holds no HellaSwag examples")
    return examples


# ---------------------------------------------------------------------------------------------------
# 2. Batches of fixed shapes
#
# Each example becomes four rows, context + ending. A batch holds 4 * batch_size rows, right-padded to
# a common length. Right padding never changes a score: attention is causal, so a token never sees the
# padding after it, and the loss mask keeps the padding out of the sums. The length is rounded up to a
# multiple of pad_to_multiple and the last batch is filled with empty rows, so a compiled model meets
# only a handful of shapes (10 for the whole validation set). Rows are sorted by length first, so that
# little of a batch is padding: the rows of one example need not share a batch, each is scored alone.


@dataclass
class Batch:
    tokens: torch.Tensor  # (4 * batch_size, T) context + ending, right-padded with <|endoftext|>
    scored: torch.Tensor  # (4 * batch_size, T) bool: True on the ending's tokens, whose loss counts
    rows: list[int]  # which rows these are (row 4 * i + j: example i, ending j); the rest is padding


def example_rows(example: HellaSwagExample, block_size: int | None) -> list[tuple[list[int], int]]:
    """The four rows context + ending, each with how many of its last tokens are the ending's.

    A row longer than block_size loses tokens from the left: the context is cut, the ending kept. The
    first token of a row has nothing before it to be predicted from, so it is never scored.
    """
    rows = []
    for ending in example.endings:
        row = example.context + ending
        if block_size is not None:
            row = row[-block_size:]
        rows.append((row, min(len(ending), len(row) - 1)))
    return rows


def make_batches(examples, batch_size: int, block_size: int | None, pad_to_multiple=16, sort_by_length=True):
    """Yield Batches covering each row of each example once.

    Shapes: (4 * batch_size, T), T a multiple of pad_to_multiple (or block_size, if that is shorter).
    Sorted longest first: a batch too big for memory fails at once, and the last, partial batch is the
    shortest, so its empty rows cost least. batch_size=1, pad_to_multiple=1, sort_by_length=False is
    the plain loop of one example per forward pass.
    """
    assert batch_size >= 1 and pad_to_multiple >= 1
    rows = [row for example in examples for row in example_rows(example, block_size)]
    order = list(range(len(rows)))
    if sort_by_length:
        order.sort(key=lambda r: len(rows[r][0]), reverse=True)
    rows_per_batch = NUM_ENDINGS * batch_size
    for start in range(0, len(order), rows_per_batch):
        batch_rows = order[start : start + rows_per_batch]
        length = math.ceil(max(len(rows[r][0]) for r in batch_rows) / pad_to_multiple) * pad_to_multiple
        if block_size is not None:
            length = min(length, block_size)
        tokens = torch.full((rows_per_batch, length), EOT_TOKEN, dtype=torch.long)
        scored = torch.zeros((rows_per_batch, length), dtype=torch.bool)
        for slot, r in enumerate(batch_rows):
            row, n_scored = rows[r]
            tokens[slot, : len(row)] = torch.tensor(row)
            scored[slot, len(row) - n_scored : len(row)] = True
        yield Batch(tokens, scored, batch_rows)


# ---------------------------------------------------------------------------------------------------
# 3. Scoring
#
# `model` is anything that maps token ids (B, T) to logits (B, T, vocab): our GPT (which returns
# (logits, loss)), a torch.compile'd GPT, or a Hugging Face GPT2LMHeadModel (which returns an output
# with .logits). The caller puts it in eval mode if it has dropout (our GPT has none).


def logits_of(output) -> torch.Tensor:
    """Logits from what a model returns: our GPT's (logits, loss), a Hugging Face output, or a tensor."""
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "logits", output)


def block_size_of(model) -> int | None:
    """The longest sequence the model reads (our block_size, Hugging Face's n_positions), looking
    through DDP's wrapper (torch.compile's forwards attribute lookups itself); None if unknown."""
    while model is not None:
        config = getattr(model, "config", None)
        if config is not None:
            return getattr(config, "block_size", None) or getattr(config, "n_positions", None)
        model = getattr(model, "module", None)
    return None


@torch.no_grad()
def ending_losses(model, tokens: torch.Tensor, scored: torch.Tensor, autocast_dtype=None):
    """Loss of each row's scored tokens: (sum, mean per scored token), each of shape (rows,)."""
    with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = logits_of(model(tokens))  # (rows, T, vocab)
    # The logits at position t predict the token at t + 1.
    logits, targets, scored = logits[:, :-1], tokens[:, 1:], scored[:, 1:]
    token_losses = torch.zeros(scored.shape, device=tokens.device)  # (rows, T - 1), zero where not scored
    # Cross-entropy on the scored positions only: a fraction of all the logits, and always in fp32.
    token_losses[scored] = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
    sum_loss = token_losses.sum(dim=1)
    mean_loss = sum_loss / scored.sum(dim=1).clamp(min=1)  # padding rows score nothing: 0 / 1
    return sum_loss, mean_loss


def hellaswag_losses(
    model, examples, device, batch_size=16, autocast_dtype=None, pad_to_multiple=16, sort_by_length=True, progress=False
):
    """Per-ending losses (sum_losses, mean_losses), each a float tensor (len(examples), 4) on the CPU,
    in the order of `examples`. progress: a progress bar with an ETA (on a terminal)."""
    block_size = block_size_of(model)
    sum_losses = torch.zeros(len(examples) * NUM_ENDINGS, device=device)  # row 4 * i + j: example i, ending j
    mean_losses = torch.zeros(len(examples) * NUM_ENDINGS, device=device)
    batches = make_batches(examples, batch_size, block_size, pad_to_multiple, sort_by_length)
    total = math.ceil(len(examples) / batch_size)
    for batch in progress_bar(batches, progress, "HellaSwag", total=total):
        sum_loss, mean_loss = ending_losses(model, batch.tokens.to(device), batch.scored.to(device), autocast_dtype)
        rows = torch.tensor(batch.rows, device=device)
        sum_losses[rows] = sum_loss[: len(rows)]  # the rows after len(rows) are padding
        mean_losses[rows] = mean_loss[: len(rows)]
    # One device -> host copy, at the end: no waiting for the GPU after every batch.
    return sum_losses.view(-1, NUM_ENDINGS).cpu(), mean_losses.view(-1, NUM_ENDINGS).cpu()


def hellaswag_counts(
    model, examples, device, batch_size=16, rank=0, world_size=1, autocast_dtype=None, pad_to_multiple=16,
    sort_by_length=True, progress=False,
) -> dict:
    """Score this rank's share of `examples` (a list from load_hellaswag): every world_size-th
    example, from the rank-th.

    Returns dict(correct=..., correct_norm=..., total=...) as ints: the caller adds them up across
    ranks (all-reduce) and divides. acc = correct / total, acc_norm = correct_norm / total.
    Ranks run different numbers of forward passes: pass the model itself (compiled or not), not its
    DDP wrapper, whose forward may talk to the other ranks.

    batch_size: examples per forward pass (4 rows each). autocast_dtype: None (fp32) or torch.bfloat16.
    pad_to_multiple: round each batch's length up to a multiple of this, so that a compiled model sees
    a few shapes; an eager model may use 1 (no wasted tokens). sort_by_length=False keeps the rows in
    order (with batch_size=1, one example per forward: the slow baseline).
    """
    share = examples[rank::world_size]
    sum_losses, mean_losses = hellaswag_losses(
        model, share, device, batch_size, autocast_dtype, pad_to_multiple, sort_by_length, progress
    )
    labels = torch.tensor([example.label for example in share], dtype=torch.long)
    return dict(
        correct=int((sum_losses.argmin(dim=1) == labels).sum()),
        correct_norm=int((mean_losses.argmin(dim=1) == labels).sum()),
        total=len(share),
    )


# ---------------------------------------------------------------------------------------------------
# 4. The command line
#
# Under torchrun (RANK and WORLD_SIZE set) each process scores its share, the counts are all-reduced,
# and rank 0 prints and writes the result.

AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description="HellaSwag accuracy of a GPT-2 model (completion style).")
    parser.add_argument("--model", required=True, help="gpt2 | gpt2-medium | ... | checkpoint.pt | run folder | HF dir")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps, ...")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per forward pass (4 rows each)")
    parser.add_argument(
        "--data", default=None, help=f"a local hellaswag_val.jsonl (default: ${DATA_ENV_VAR}, else download it)"
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
    counts = hellaswag_counts(model, examples, device, rank=rank, world_size=world_size, **kwargs)
    if world_size > 1:
        summed = torch.tensor([counts["correct"], counts["correct_norm"], counts["total"]], device=device)
        dist.all_reduce(summed)  # SUM
        counts = dict(zip(("correct", "correct_norm", "total"), summed.tolist()))
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
        write_json_atomically(args.json, result)


if __name__ == "__main__":
    run_main(main)
