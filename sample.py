"""
Talk to a model: sample continuations of a prompt.

    python sample.py --init_from gpt2 --prompt "Hello, I'm a language model,"
    python sample.py --init_from log/                  # the newest checkpoint of a training run
    python sample.py --init_from path/to/hf_dir --top_p 0.9 --temperature 0.8
"""

import argparse

import torch

from train_gpt2 import UserError, get_tokenizer, load_model, pick_device, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default="gpt2", help="gpt2|gpt2-medium|gpt2-large|gpt2-xl, a checkpoint .pt, a run folder, or a Hugging Face dir")
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue ('' starts from <|endoftext|>)")
    p.add_argument("--num_samples", type=int, default=4, help="continuations to sample, as one batch")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to add to the prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; below 1 sharper, above 1 more random")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0 = no limit)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int, default=42, help="random seed of the sampler")
    p.add_argument("--stop_at_eot", action="store_true", help="end a sample at <|endoftext|>")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:1, mps, cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise UserError("--num_samples and --max_new_tokens must be at least 1")
    device = pick_device(args.device)
    model = load_model(args.init_from, device)
    enc = get_tokenizer()
    prompt = enc.encode(args.prompt) if args.prompt else [enc.eot_token]
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(
        idx,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        generator=generator,
        stop_at_eot=args.stop_at_eot,
    )
    for i, row in enumerate(out.tolist()):
        if args.stop_at_eot and enc.eot_token in row[len(prompt) :]:
            row = row[: len(prompt) + row[len(prompt) :].index(enc.eot_token)]
        print(f"--- sample {i} ---")
        print(enc.decode(row))


if __name__ == "__main__":
    run_main(main)
