"""
Talk to a model: sample continuations of a prompt, or hold two models side by side.

    python sample.py --init_from gpt2 --prompt "Hello, I'm a language model,"
    python sample.py --init_from log/                  # the newest checkpoint of a training run
    python sample.py --init_from path/to/hf_dir --top_p 0.9 --temperature 0.8
    python sample.py --init_from log/ --compare gpt2 --eval_text notes.txt   # after vs before fine-tuning

With --compare, both models continue the same prompt with the same seed, one after the other, and with
--eval_text each model's loss on that text is printed too: "before vs after" in one command.
"""

import argparse
import math
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from plumbing import ArgumentParser, UserError, available_memory, pick_device, run_main
from train_gpt2 import encode_prompt, generate_with_cache, get_tokenizer, load_model, pick_dtype


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default="gpt2", help="gpt2|gpt2-medium|gpt2-large|gpt2-xl, a checkpoint .pt, a run folder, or a Hugging Face dir")
    p.add_argument("--compare", default=None, help="a second model (same kinds): the same prompts and seed, printed after the first's")
    p.add_argument("--eval_text", default=None, help="a UTF-8 text file: also print each model's loss on it")
    p.add_argument("--eval_tokens", type=int, default=100_000, help="score at most this many tokens of --eval_text")
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue ('' starts from <|endoftext|>)")
    p.add_argument("--num_samples", type=int, default=4, help="continuations to sample, as one batch")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to add to the prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; below 1 sharper, above 1 more random")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0 = no limit)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int, default=42, help="random seed of the sampler")
    p.add_argument("--stop_at_eot", action="store_true", help="end a sample at <|endoftext|>")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:1, mps, cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="the weights' dtype while sampling (auto: bfloat16 on GPUs that have it, float16 on older ones, else float32)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="compile the one-token step (a CUDA graph on GPUs; auto: on for CUDA); pays off over many tokens")
    args = p.parse_args(argv)
    for name in ("num_samples", "max_new_tokens", "eval_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature {args.temperature} must be a finite number, 0 (greedy) or more")
    if args.top_k < 0:
        raise UserError(f"--top_k {args.top_k} must be 0 (no limit) or more")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p {args.top_p} must be above 0 and at most 1")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed {args.seed} must be between 0 and 2^63 - 1")
    return args


def read_eval_text(path) -> list[int]:
    """The tokens of a text file (opened by <|endoftext|>, as a document in training), checked up front."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--eval_text {path} {'is a folder, not a text file' if path.is_dir() else 'does not exist'}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--eval_text {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    tokens = [get_tokenizer().eot_token] + get_tokenizer().encode_ordinary(text)
    if len(tokens) < 2:
        raise UserError(f"--eval_text {path} is empty")
    return tokens


@torch.no_grad()
def text_loss(model, tokens: list[int], device: str, max_tokens: int, batch_size: int = 8) -> tuple[float, int]:
    """Mean loss of the model on the tokens (at most max_tokens of them predicted), read in windows of
    block_size tokens: (loss, tokens predicted)."""
    T = model.config.block_size
    tokens = torch.tensor(tokens[: max_tokens + 1], device=device)
    full = (len(tokens) - 1) // T  # windows of T + 1 tokens (the last token of one is the first of the next)
    starts = range(0, full * T, T)
    batches = [[tokens[s : s + T + 1] for s in starts[i : i + batch_size]] for i in range(0, full, batch_size)]
    if (len(tokens) - 1) % T:  # the rest: one shorter window
        batches.append([tokens[full * T :]])
    loss_sum, count = 0.0, 0
    for batch in tqdm(batches, desc="scoring", unit="batch", leave=False):
        x = torch.stack(batch)
        logits, _ = model(x[:, :-1])
        loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return loss_sum / count, count


def check_memory(model, args, prompt_tokens: int, device: str) -> None:
    """Refuse, before sampling, what cannot fit: the tokens of every sample, the KV cache (keys and values
    of every layer for block_size positions of each sample) and a step's logits."""
    c, rows = model.config, args.num_samples
    weight_bytes = model.lm_head.weight.element_size()
    need = (rows * (prompt_tokens + args.max_new_tokens) * 8 + 2 * c.n_layer * rows * c.block_size * c.n_embd * weight_bytes
            + 3 * rows * c.padded_vocab_size * 4)
    available = available_memory(device)
    if available and need > 0.8 * available:
        raise UserError(f"--num_samples {rows} x --max_new_tokens {args.max_new_tokens} needs ~{need / 2**30:,.1f} GiB "
                        f"(the tokens and the KV cache), more than the {available / 2**30:,.1f} GiB here: ask for fewer")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    eval_tokens = read_eval_text(args.eval_text) if args.eval_text else None  # a bad file fails before any model loads
    enc = get_tokenizer()
    prompt = encode_prompt(args.prompt)  # '' is <|endoftext|>: the start of a document
    compile_step = args.compile == "on" or (args.compile == "auto" and device.startswith("cuda"))
    references = [args.init_from] + ([args.compare] if args.compare else [])
    labels = ["A", "B"] if args.compare else [""]
    models = {}
    for label, reference in zip(labels, references):
        models[label] = load_model(reference, device).to(dtype)  # decoded in the dtype it is held in
        check_memory(models[label], args, len(prompt), device)
        print(f"model{' ' + label if label else ''}: {models[label].source}")
    losses = {}
    for label, model in models.items():
        idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
        generator = torch.Generator(device=device).manual_seed(args.seed)  # the same seed for each model
        out = generate_with_cache(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                                  top_p=args.top_p, generator=generator, stop_at_eot=args.stop_at_eot,
                                  compile_step=compile_step)
        for i, row in enumerate(out.tolist()):
            if args.stop_at_eot and enc.eot_token in row[len(prompt) :]:
                row = row[: len(prompt) + row[len(prompt) :].index(enc.eot_token)]
            print(f"--- sample {i}{', model ' + label if label else ''} ---")
            print(enc.decode(row))
        if eval_tokens:
            losses[label] = text_loss(model, eval_tokens, device, args.eval_tokens)
    if eval_tokens:
        scored = next(iter(losses.values()))[1]
        print(f"loss on {args.eval_text} ({scored:,} tokens): " +
              ", ".join(f"{'model ' + label + ' ' if label else ''}{loss:.4f}" for label, (loss, _) in losses.items()))


if __name__ == "__main__":
    run_main(main)
