"""
Check our GPT-2 against Hugging Face's, the reference implementation.

    python validate.py gpt2                 # OpenAI's 124M weights (downloads them)
    python validate.py path/to/hf_dir       # any directory written by GPT2LMHeadModel.save_pretrained
    python validate.py log/                 # a checkpoint of ours: exported to HF format, then compared

Reports state-dict alignment, the largest logit difference, the loss on the same text, and whether
greedy generations agree token for token. Exits 1 when they don't.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from plumbing import ArgumentParser, UserError, pick_device, run_main
from train_gpt2 import CONV1D_WEIGHTS, GPT, get_tokenizer, load_model, quiet_transformers, save_hf

PROMPTS = [
    "Hello, I'm a language model,",
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):",
]
TEXT = (
    "The Transformer replaces recurrence with attention: every position reads from every earlier "
    "position in one step, so a sentence of a thousand tokens trains as fast as a sentence of ten."
)


def compare_state_dicts(model: GPT, hf_model) -> dict:
    """Every HF tensor must have a twin in ours with the same values (Conv1D weights transposed)."""
    ours = model.state_dict()
    theirs = {k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    report = dict(tensors=len(theirs), missing=[], extra=sorted(set(ours) - set(theirs)), shape_mismatch=[], max_weight_diff=0.0)
    for key, value in theirs.items():
        if key not in ours:
            report["missing"].append(key)
            continue
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        mine = ours[key][: value.size(0)]  # our embedding may carry padding rows
        if mine.shape != value.shape:
            report["shape_mismatch"].append(key)
            continue
        report["max_weight_diff"] = max(report["max_weight_diff"], (mine.float() - value.float()).abs().max().item())
    return report


def validate(model: GPT, hf_model, device="cpu", max_new_tokens=32, tolerance=1e-4,
             reference="Hugging Face's GPT2LMHeadModel on the same weights") -> bool:
    """Compare our model with `hf_model`, described as `reference` in the verdict line."""
    enc = get_tokenizer()
    alignment = compare_state_dicts(model, hf_model)
    print(
        f"state dict: {alignment['tensors']} HF tensors, missing {len(alignment['missing'])}, "
        f"extra {len(alignment['extra'])}, shape mismatches {len(alignment['shape_mismatch'])}, "
        f"max |weight diff| {alignment['max_weight_diff']:.2e}"
    )
    tokens = torch.tensor([enc.encode(TEXT)], device=device)
    with torch.no_grad():
        ours, _ = model(tokens[:, :-1])  # logits over the real vocab, as HF has it
        theirs = hf_model(tokens[:, :-1]).logits
        logit_diff = (ours - theirs).abs().max().item()
        our_loss = torch.nn.functional.cross_entropy(ours[0].float(), tokens[0, 1:])
        their_loss = hf_model(tokens, labels=tokens).loss
    print(f"logits: max |difference| {logit_diff:.2e} (tolerance {tolerance:g})")
    print(f"loss on a test sentence: ours {our_loss.item():.6f}, Hugging Face {their_loss.item():.6f}")

    generations_agree = True
    for prompt in PROMPTS:
        idx = torch.tensor([enc.encode(prompt)], device=device)
        new = min(max_new_tokens, model.config.block_size - idx.size(1))
        ours = model.generate(idx, new, temperature=0)[0].tolist()
        theirs = hf_model.generate(idx, max_new_tokens=new, do_sample=False, pad_token_id=enc.eot_token)[0].tolist()
        agree = ours == theirs
        generations_agree &= agree
        print(f"greedy {'agree   ' if agree else 'DISAGREE'}: {enc.decode(ours)!r}")
    ok = (
        not alignment["missing"]
        and not alignment["shape_mismatch"]
        and alignment["max_weight_diff"] == 0.0
        and logit_diff <= tolerance
        and generations_agree
    )
    print(f"OK: matches {reference}" if ok else f"FAILED: does not match {reference}")
    return ok


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="gpt2|gpt2-medium|gpt2-large|gpt2-xl, a Hugging Face dir, a checkpoint .pt or a run folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |logit difference| (float32)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} must be at least 1")
    if not args.tolerance >= 0:  # also refuses nan
        raise UserError(f"--tolerance {args.tolerance} must be a number, 0 or more")
    from transformers import GPT2LMHeadModel

    device = pick_device(args.device)
    model = load_model(args.model, device)
    with tempfile.TemporaryDirectory() as tmp:
        hf_source, reference = args.model, f"Hugging Face's GPT2LMHeadModel on the same weights ({args.model})"
        if not (Path(args.model) / "config.json").exists() and Path(args.model).exists():
            # Our checkpoint: the reference is its own export, which checks the export path, not the weights.
            save_hf(model, tmp)
            hf_source, reference = tmp, "its own export, loaded by Hugging Face's GPT2LMHeadModel"
            print(f"comparing {model.source} with its Hugging Face export (save_hf), loaded by GPT2LMHeadModel")
        with quiet_transformers():
            hf_model = GPT2LMHeadModel.from_pretrained(hf_source).to(device).eval()
        ok = validate(model, hf_model, device, args.max_new_tokens, args.tolerance, reference)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    run_main(main)
