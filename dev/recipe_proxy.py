"""
A CPU proxy for the two training recipes: is `--preset fast` (Muon + WSD) better than the default
(AdamW + cosine) at equal tokens, by how much, and how many tokens does it save?

    python dev/recipe_proxy.py --json proxy.json   # compare, 3 seeds (~50 min on one core)
    python dev/recipe_proxy.py --sweep             # the fast recipe's learning rates on a grid, one seed (~45 min)
    python dev/recipe_proxy.py --muon_lr 0.04 --decay_frac 0.4 --seeds 0   # compare other values

Both recipes train the same small GPT (4 layers x 128 wide, T=128; the 50,304-token classifier is most
of its 7.2M parameters and most of its cost) on the same tokens: real FineWeb documents, by default the
300 that ship in data/fineweb_legal_300.jsonl.gz (~0.5M tokens; see data/SOURCES.md), whose last 8% are
held out whole as the val set. The figures in docs/recipes.md were measured on the 2,800 documents of
the file these 300 open (--data fineweb_legal_sample.jsonl, 4.36M tokens); on the 300 the same runs
end at other losses, so compare a change with a run on the same data. Each run
is a complete training run with its own schedule, on one CPU thread, scored by the val loss of its
final weights. The comparison reports:

  - val loss at equal tokens: each recipe at --max_steps x --total_batch_size tokens (48 x 4,096),
    mean ± std over --seeds, and the paired difference (same seed = same init and same batches);
  - the token speedup: the fast recipe is also trained on shorter budgets (--fractions of --max_steps,
    each a complete run with its own warmup-stable-decay); the tokens at which its val loss reaches the
    default's are interpolated between them; speedup = the default's tokens / those tokens;
  - seconds per step of each optimizer, and the optimizer step alone timed side by side: Muon's overhead.

What a proxy this small can and cannot say: ~200K tokens is the very start of training, where AdamW
at GPT-3's 6e-4 has barely moved, so the fast recipe's 10x higher AdamW lr (on the embeddings) wins
by far more than Muon would over 10B tokens. So the comparison also runs the default recipe at
--tuned_adamw_lr (the best AdamW lr of --sweep on this proxy): the speedup over that baseline is the
one to quote; the speedup over 6e-4 only says that 6e-4 is too low for 200K tokens of a tiny model.

The schedules are scaled to the short runs: both recipes warm up over --warmup_frac of the full budget
(8%: 4 of 48 steps; GPT-3's 4% would be 2 steps here; 8% was chosen, not tuned), and the shorter fast
runs keep the same 4 warmup steps (warmup steadies the first updates of a fresh model, whatever the
budget). Everything else is the recipe's own: Settings' defaults, or PRESETS["fast"] with the
learning rates and decay_frac given here.

Shards and runs are cached in --work_dir: a run whose settings match a finished one is not trained
again (--rerun forces it), so an interrupted proxy continues where it stopped, and a comparison
reuses the sweep's runs that it needs.
"""

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules, from dev/
import fineweb
import plumbing
import train_gpt2
from plumbing import ArgumentParser, UserError, run_main
from settings import PRESETS

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "fineweb_legal_300.jsonl.gz"
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "gpt2_recipe_proxy"


# ---------------------------------------------------------------------------------------------------
# Data: whole documents held out as val


def prepare_data(data_path, work_dir, val_fraction: float) -> Path:
    """Tokenize the corpus into shards once (a finished folder is reused); return the folder.

    The last val_fraction of the documents are the val split, and the val shard holds exactly them:
    a val set cut from whole unseen documents, not from the neighbours of training windows.
    """
    docs = list(fineweb.read_docs([data_path]))
    num_val = max(1, round(val_fraction * len(docs)))
    if num_val >= len(docs):
        raise UserError(f"--val_fraction {val_fraction} leaves no training documents out of {len(docs)}")
    val_docs, train_docs = docs[-num_val:], docs[:-num_val]
    # Shard 0 is val: make it exactly the val documents, each opened by <|endoftext|>.
    val_tokens = sum(1 + len(fineweb.encode_document(doc)) for doc in val_docs)
    out_dir = Path(work_dir) / f"{Path(str(data_path).removesuffix('.gz')).stem}_val{num_val}docs"
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # tqdm's bar: a second, not worth a screen
        fineweb.write_shards(val_docs + train_docs, out_dir, prefix="proxy", val_tokens=val_tokens,
                             source={"file": Path(data_path).name, "val": f"the last {num_val} documents"})
    return out_dir


# ---------------------------------------------------------------------------------------------------
# One training run


def recipe_config(recipe: str, data_dir, log_dir, args, steps: int, seed: int, **overrides) -> train_gpt2.Settings:
    """The Settings of one proxy run: the recipe's own settings, the proxy's model, batch and budget.

    recipe "default" is Settings' defaults (AdamW, cosine); "fast" is PRESETS["fast"] (Muon, WSD).
    overrides (muon_lr=..., max_lr=..., decay_frac=...) are applied last.
    """
    flags = ["--preset", "fast"] if recipe == "fast" else []
    settings = dict(
        data_dir=data_dir, log_dir=log_dir, overwrite=True,
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
        total_batch_size=args.total_batch_size, micro_batch_size=args.micro_batch_size,
        max_steps=steps, warmup_steps=warmup_steps(args),
        val_tokens=args.val_tokens,
        eval_interval=0,  # scored once, after the last update, by final_val_loss (the loop's last eval comes before the last update)
        hellaswag=False, sample_interval=0, checkpoint_interval=steps, keep_checkpoints=1,
        device=args.device, compile="off",  # eager: the recipes are compared, not the kernels
        seed=seed, data_seed=seed,  # a seed changes the init and the order of the batches
        **overrides,
    )
    for name, value in settings.items():
        flags += [f"--{name}"] if value is True else [f"--no-{name}"] if value is False else [f"--{name}", value]
    return train_gpt2.parse_config(flags)


def warmup_steps(args) -> int:
    return max(1, round(args.warmup_frac * args.max_steps))


def train_and_score(config: train_gpt2.Settings, rerun: bool = False) -> dict:
    """Train one run (its output goes to log_dir/stdout.txt), then score its final weights.

    Returns {val_loss, seconds_per_step, tokens, wall_seconds}; a result is cached in log_dir/result.json
    beside the settings that produced it, and reused when they match.
    """
    log_dir = Path(config.log_dir)
    result_path = log_dir / "result.json"
    if not rerun and result_path.exists():
        cached = json.loads(result_path.read_text())
        if cached["config"] == asdict(config):
            return cached["result"]
    started = time.time()
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "w") as out, contextlib.redirect_stdout(out):
        train_gpt2.train(config, ddp=False, rank=0, local_rank=0, world_size=1, device=config.device)
    log = plumbing.read_log(log_dir / "log.txt")
    if not plumbing.checkpoint_path(log_dir, config.max_steps).exists():  # asked to stop (SIGTERM, Ctrl-C)
        steps_done = max(log.get("train", {}), default=-1) + 1  # a shorter run's loss is no result
        raise UserError(f"{log_dir.name} stopped at step {steps_done} of {config.max_steps}: nothing recorded for it; "
                        "run the proxy again to train it whole (finished runs are reused)")
    # Step time from the loop's own tok/s (the optimizer step included, eval and checkpoints not).
    # The median skips the first step (allocator warm-up) and steps slowed by other work on the machine.
    step_seconds = [config.total_batch_size / tok_s for step, tok_s in log["tok_s"].items() if step > 0 or config.max_steps == 1]
    result = dict(
        val_loss=final_val_loss(log_dir, config),
        seconds_per_step=statistics.median(step_seconds),
        tokens=config.max_steps * config.total_batch_size,
        wall_seconds=time.time() - started,
    )
    for checkpoint in log_dir.glob(plumbing.CHECKPOINT_GLOB):  # ~90 MB each with the optimizer state
        checkpoint.unlink()
    plumbing.write_json_atomically(result_path, dict(config=asdict(config), result=result))  # a full disk: one line
    return result


def final_val_loss(log_dir: Path, config: train_gpt2.Settings) -> float:
    """The val loss of the run's last checkpoint: the weights after all max_steps updates."""
    model = train_gpt2.load_model(str(log_dir), config.device)
    val_loader = train_gpt2.ValLoader(config.data_dir, config.micro_batch_size, config.block_size, config.val_tokens,
                                      device=config.device)
    autocast, _ = train_gpt2.mixed_precision(config.device, train_gpt2.pick_dtype(config.dtype, config.device))
    val_loss, _ = train_gpt2.evaluate_val_loss(model, val_loader, autocast, ddp=False)
    return val_loss


def fast_lrs(args) -> dict:
    return dict(muon_lr=args.muon_lr, max_lr=args.max_lr, decay_frac=args.decay_frac)


def run_name(recipe: str, steps: int, seed: int, **overrides) -> str:
    """A readable folder name that tells every run of the proxy apart."""
    return "_".join([recipe, f"{steps}steps", f"seed{seed}"] +
                    [f"{k}{v:g}" if isinstance(v, (int, float)) else f"{k}_{v}" for k, v in sorted(overrides.items())])


# ---------------------------------------------------------------------------------------------------
# The comparison and the token speedup


def tokens_to_reach(target: float, budgets: list[tuple[int, float]]) -> tuple[float | None, str]:
    """The tokens at which the fast recipe's val loss falls to `target`.

    budgets: (tokens, final val loss) of complete runs, fewest tokens first. Linear interpolation
    between the two runs on either side; since loss-vs-tokens curves are convex, the straight line lies
    above the curve, so the tokens (and so the speedup) err on the conservative side. Returns
    (tokens, "exact"), (the smallest budget, "at_most") when even that run beats the target, or
    (None, "never") when the largest one does not reach it.
    """
    if budgets[0][1] <= target:
        return budgets[0][0], "at_most"
    for (tokens_a, loss_a), (tokens_b, loss_b) in zip(budgets, budgets[1:]):
        if loss_b <= target:
            return tokens_a + (loss_a - target) / (loss_a - loss_b) * (tokens_b - tokens_a), "exact"
    return None, "never"


def token_speedup(default_tokens: int, default_loss: float, budgets) -> dict:
    tokens, kind = tokens_to_reach(default_loss, budgets)
    if kind == "never":
        # The fast recipe's largest budget is the default's: not reaching its loss means slower.
        return dict(speedup=None, tokens=None, kind=kind, text="< 1x")
    speedup = default_tokens / tokens
    return dict(speedup=speedup, tokens=tokens, kind=kind, text=f"{speedup:.2f}x" if kind == "exact" else f">= {speedup:.2f}x")


def mean_std(values) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(args, data_dir: Path) -> dict:
    """The default recipe and the fast recipe at equal tokens over every seed, the fast recipe also at
    the shorter budgets; with --tuned_adamw_lr, the default recipe at that AdamW lr as a second baseline."""
    # A budget is at least one step past the warmup; two fractions that round to the same steps are one run.
    fast_steps = sorted({max(warmup_steps(args) + 1, round(f * args.max_steps)) for f in args.fractions} | {args.max_steps})
    baselines = {f"default (AdamW {train_gpt2.Settings().max_lr:g}, cosine)": {}}
    if args.tuned_adamw_lr:
        baselines[f"default at AdamW {args.tuned_adamw_lr:g}"] = dict(max_lr=args.tuned_adamw_lr)
    runs = []

    def run(recipe, steps, seed, **overrides):
        name = run_name(recipe, steps, seed, **overrides)
        config = recipe_config(recipe, data_dir, Path(args.work_dir) / "runs" / name, args, steps, seed, **overrides)
        result = train_and_score(config, args.rerun)
        print(f"  {name}: val loss {result['val_loss']:.4f}, {result['seconds_per_step']:.2f} s/step "
              f"({result['wall_seconds']:.0f} s)", flush=True)
        runs.append(dict(name=name, recipe=recipe, steps=steps, seed=seed, **overrides, **result))
        return result

    per_seed = []
    for seed in args.seeds:
        # Recipes alternate within a seed, so load from other work on the machine hits both alike.
        baseline = {label: run("default", args.max_steps, seed, **overrides) for label, overrides in baselines.items()}
        fast = {steps: run("fast", steps, seed, **fast_lrs(args)) for steps in reversed(fast_steps)}
        per_seed.append(dict(seed=seed, baseline=baseline, fast=fast))

    tokens = args.max_steps * args.total_batch_size
    fast_losses = {steps: [s["fast"][steps]["val_loss"] for s in per_seed] for steps in fast_steps}
    mean_budgets = [(steps * args.total_batch_size, statistics.mean(fast_losses[steps])) for steps in fast_steps]
    rows = []
    for label in baselines:
        losses = [s["baseline"][label]["val_loss"] for s in per_seed]
        rows.append(dict(
            label=label,
            val_loss=mean_std(losses),
            # Paired by seed: both recipes started from the same init and saw the same batches.
            fast_lower_by=mean_std([loss - fast for loss, fast in zip(losses, fast_losses[args.max_steps])]),
            speedup_per_seed=[token_speedup(tokens, s["baseline"][label]["val_loss"],
                                            [(steps * args.total_batch_size, s["fast"][steps]["val_loss"]) for steps in fast_steps])
                              for s in per_seed],
            speedup_of_means=token_speedup(tokens, statistics.mean(losses), mean_budgets),
        ))
    # Seconds per step of each optimizer: the median over all its runs (each the median of its steps).
    adamw_step = statistics.median(r["seconds_per_step"] for r in runs if r["recipe"] == "default")
    muon_step = statistics.median(r["seconds_per_step"] for r in runs if r["recipe"] == "fast")
    optimizer_step = time_optimizer_steps(args)
    return dict(
        runs=runs,
        tokens_per_run=tokens,
        baselines=rows,
        fast=dict(val_loss=mean_std(fast_losses[args.max_steps]),
                  budgets=[dict(steps=steps, tokens=steps * args.total_batch_size, val_loss=mean_std(fast_losses[steps]))
                           for steps in fast_steps]),
        adamw_seconds_per_step=adamw_step,
        muon_seconds_per_step=muon_step,
        muon_overhead=muon_step / adamw_step - 1,
        optimizer_step_seconds=optimizer_step,
        # What Muon adds to a training step: its optimizer step's extra time over AdamW's, over a whole step.
        muon_overhead_from_optimizer_steps=(optimizer_step["muon"] - optimizer_step["adamw"]) / adamw_step,
    )


def time_optimizer_steps(args, repeats: int = 30) -> dict:
    """Seconds per optimizer step of each recipe on the proxy's model (random gradients), timed in
    alternation so that other work on the machine slows both alike. Muon's own cost, free of the
    noise of whole training steps: its Newton-Schulz iterations are a few small matmuls per matrix."""
    defaults = train_gpt2.Settings()
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                                                n_embd=args.n_embd, vocab_pad_multiple=defaults.vocab_pad_multiple))
    model.to(args.device)  # where the runs train: the overhead is a ratio to their step time
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    device_type = args.device.split(":")[0]
    optimizers = {name: train_gpt2.configure_optimizers(model, train_gpt2.Settings(optimizer=name), device_type)
                  for name in ("adamw", "muon")}
    seconds = {name: [] for name in optimizers}

    def sync():  # a GPU runs the step after Python returns: time the work, not its launch
        if device_type == "cuda":
            torch.cuda.synchronize()

    for _ in range(repeats):
        for name, group in optimizers.items():
            sync()
            started = time.perf_counter()
            for optimizer in group:
                optimizer.step()
            sync()
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values[1:]) for name, values in seconds.items()}  # [1:]: the state is created


def print_comparison(summary: dict, args) -> None:
    tokens = summary["tokens_per_run"]
    print(f"\n### Equal tokens: {tokens:,} per run ({args.max_steps} steps x {args.total_batch_size:,}), "
          f"seeds {','.join(map(str, args.seeds))}\n")
    print("| recipe | val loss (mean ± std) | minus fast, paired by seed | fast's token speedup over it (per seed) |")
    print("| --- | --- | --- | --- |")
    for row in summary["baselines"]:
        per_seed = ", ".join(s["text"] for s in row["speedup_per_seed"])
        print(f"| {row['label']} | {row['val_loss'][0]:.4f} ± {row['val_loss'][1]:.4f} | "
              f"{row['fast_lower_by'][0]:.4f} ± {row['fast_lower_by'][1]:.4f} | {row['speedup_of_means']['text']} ({per_seed}) |")
    fast = summary["fast"]["val_loss"]
    print(f"| fast (Muon {args.muon_lr:g} + AdamW {args.max_lr:g}, WSD decay {args.decay_frac:g}) | "
          f"{fast[0]:.4f} ± {fast[1]:.4f} | | |")
    print(f"\nSeconds per step: AdamW {summary['adamw_seconds_per_step']:.3f}, Muon {summary['muon_seconds_per_step']:.3f} "
          f"(Muon's overhead {100 * summary['muon_overhead']:+.1f}%; medians over all runs of each, one thread)")
    optimizer_step = summary["optimizer_step_seconds"]
    print(f"Optimizer step alone: AdamW {1000 * optimizer_step['adamw']:.1f} ms, Muon + AdamW {1000 * optimizer_step['muon']:.1f} ms: "
          f"Muon adds {100 * summary['muon_overhead_from_optimizer_steps']:+.2f}% to a training step")
    print("\n### The fast recipe at shorter budgets (each a complete run with its own WSD decay)\n")
    print("| steps | tokens | val loss (mean ± std) |")
    print("| --- | --- | --- |")
    for row in summary["fast"]["budgets"]:
        print(f"| {row['steps']} | {row['tokens']:,} | {row['val_loss'][0]:.4f} ± {row['val_loss'][1]:.4f} |")
    print("\nToken speedup = the baseline's tokens / the tokens at which the fast recipe's val loss reaches the "
          "baseline's, interpolated linearly between the budgets above (from the seed means; per seed in brackets).")
    for row in summary["baselines"]:
        speedup = row["speedup_of_means"]
        reached = {"exact": f"at {speedup['tokens']:,.0f} tokens", "at_most": "within its smallest budget",
                   "never": "not within the baseline's tokens"}[speedup["kind"]]
        print(f"  {row['label']}: val loss {row['val_loss'][0]:.4f} is reached {reached}: {speedup['text']}")


# ---------------------------------------------------------------------------------------------------
# The learning-rate sweep


def sweep(args, data_dir: Path) -> dict:
    """The fast recipe on a grid of muon_lr x max_lr, then decay_frac at the best pair, one seed; and
    the default recipe at a few AdamW learning rates, for reference."""
    seed = args.seeds[0]
    rows = []

    def run(recipe, **overrides):
        name = run_name(recipe, args.max_steps, seed, **overrides)
        config = recipe_config(recipe, data_dir, Path(args.work_dir) / "runs" / name, args, args.max_steps, seed, **overrides)
        result = train_and_score(config, args.rerun)
        print(f"  {name}: val loss {result['val_loss']:.4f} ({result['wall_seconds']:.0f} s)", flush=True)
        rows.append(dict(name=name, recipe=recipe, **overrides, **result))
        return result["val_loss"]

    for max_lr in args.sweep_adamw_lrs:
        run("default", max_lr=max_lr)
    grid = {(muon_lr, max_lr): run("fast", muon_lr=muon_lr, max_lr=max_lr, decay_frac=args.decay_frac)
            for muon_lr in args.sweep_muon_lrs for max_lr in args.sweep_max_lrs}
    best_muon_lr, best_max_lr = min(grid, key=grid.get)
    for decay_frac in args.sweep_decay_fracs:
        if decay_frac != args.decay_frac:
            run("fast", muon_lr=best_muon_lr, max_lr=best_max_lr, decay_frac=decay_frac)
    best = min((row for row in rows if row["recipe"] == "fast"), key=lambda row: row["val_loss"])
    return dict(rows=rows, best={k: best[k] for k in ("muon_lr", "max_lr", "decay_frac", "val_loss")})


def print_sweep(summary: dict, args) -> None:
    print(f"\n### Sweep: {args.max_steps} steps x {args.total_batch_size:,} tokens, seed {args.seeds[0]}, "
          f"warmup {warmup_steps(args)} steps\n")
    print("| recipe | muon_lr | max_lr (AdamW) | decay_frac | val loss |")
    print("| --- | --- | --- | --- | --- |")
    for row in sorted(summary["rows"], key=lambda row: (row["recipe"], row["val_loss"])):
        muon = f"{row['muon_lr']:g}" if row["recipe"] == "fast" else "-"
        decay = f"{row['decay_frac']:g}" if row["recipe"] == "fast" else "cosine"
        print(f"| {row['recipe']} | {muon} | {row['max_lr']:g} | {decay} | {row['val_loss']:.4f} |")
    best = summary["best"]
    print(f"\nbest fast: --muon_lr {best['muon_lr']:g} --max_lr {best['max_lr']:g} --decay_frac {best['decay_frac']:g} "
          f"(val loss {best['val_loss']:.4f})")


def width_check(args, data_dir: Path) -> dict:
    """The fast recipe's Muon learning rate at several widths (--widths), under each of torch.optim.Muon's
    ways to scale it by a matrix's shape (adjust_lr_fn), one seed: if the best rate moves with the width,
    every GPT-2 size would need its own."""
    seed, rows = args.seeds[0], []
    for adjust, lrs in (("original", args.sweep_muon_lrs), ("match_rms_adamw", args.sweep_rms_lrs)):  # "" skips one
        for width in args.widths if lrs else ():
            shape = argparse.Namespace(**{**vars(args), "n_embd": width})
            for muon_lr in lrs:
                overrides = dict(muon_lr=muon_lr, max_lr=args.max_lr, decay_frac=args.decay_frac, muon_adjust_lr=adjust)
                name = run_name("fast", args.max_steps, seed, n_embd=width, **overrides)
                config = recipe_config("fast", data_dir, Path(args.work_dir) / "runs" / name, shape, args.max_steps, seed, **overrides)
                result = train_and_score(config, args.rerun)
                print(f"  {name}: val loss {result['val_loss']:.4f} ({result['wall_seconds']:.0f} s)", flush=True)
                rows.append(dict(adjust_lr_fn=adjust, n_embd=width, muon_lr=muon_lr, **result))
    best = {f"{adjust} n_embd {width}": min((r for r in rows if (r["adjust_lr_fn"], r["n_embd"]) == (adjust, width)),
                                            key=lambda r: r["val_loss"])["muon_lr"]
            for adjust in {row["adjust_lr_fn"]: None for row in rows} for width in args.widths}
    return dict(rows=rows, best=best)


def print_width_check(summary: dict, args) -> None:
    print(f"\n### Muon's learning rate by width: {args.max_steps} steps x {args.total_batch_size:,} tokens, "
          f"{args.n_layer} layers, seed {args.seeds[0]}\n")
    print("| adjust_lr_fn | n_embd | muon_lr | val loss |")
    print("| --- | --- | --- | --- |")
    for row in summary["rows"]:
        print(f"| {row['adjust_lr_fn']} | {row['n_embd']} | {row['muon_lr']:g} | {row['val_loss']:.4f} |")
    print("\nbest muon_lr: " + "; ".join(f"{k}: {v:g}" for k, v in summary["best"].items()))


# ---------------------------------------------------------------------------------------------------
# The command line


def numbers(kind):
    """An argparse type: "1,2,3" -> [1, 2, 3]."""
    def parse(text):
        try:
            return [kind(item) for item in plumbing.split_list(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    fast = PRESETS["fast"]
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="run the learning-rate sweep instead of the comparison")
    p.add_argument("--width_check", action="store_true",
                   help="instead: the best Muon learning rate at each of --widths, under both of Muon's lr scalings")
    p.add_argument("--data", default=str(DEFAULT_DATA), help=".jsonl or .jsonl.gz (or .txt/.parquet) documents (default: %(default)s)")
    p.add_argument("--val_fraction", type=float, default=0.08, help="the last fraction of documents held out as val")
    p.add_argument("--work_dir", default=str(DEFAULT_WORK_DIR), help="shards and runs, reused across calls (default: %(default)s)")
    p.add_argument("--rerun", action="store_true", help="train again even when a finished run has the same settings")
    p.add_argument("--json", default="", help="also write every setting and result here")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the 124M-shaped proxy on a GPU (bf16, eager)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the other cores stay free, step times are one core's)")
    # The model and the budget.
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--total_batch_size", type=int, default=4096, help="tokens per step, both recipes")
    p.add_argument("--micro_batch_size", type=int, default=32, help="32 x 128 = the whole 4,096-token batch in one pass")
    p.add_argument("--max_steps", type=int, default=48, help="steps of the full budget, both recipes")
    p.add_argument("--warmup_frac", type=float, default=0.08, help="warmup steps = this x max_steps, every run")
    p.add_argument("--val_tokens", type=int, default=32_768, help="val tokens scored after each run (the same ones every run)")
    p.add_argument("--seeds", type=numbers(int), default=[0, 1, 2], help="comma-separated; the sweep uses the first")
    p.add_argument("--fractions", type=numbers(float), default=[1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3],
                   help="the fast recipe's shorter budgets, as fractions of max_steps (the full budget is always run); "
                        "small ones too, to bracket the default's loss (default: 1/8, 1/6, 1/4, 1/3, 1/2, 2/3)")
    p.add_argument("--tuned_adamw_lr", type=float, default=2e-3,
                   help="also run the default recipe at this AdamW lr, the best of --sweep on this proxy (0 = don't)")
    # The fast recipe's learning rates (defaults: PRESETS["fast"], what `train_gpt2.py --preset fast` uses).
    p.add_argument("--muon_lr", type=float, default=fast["muon_lr"], help="fast: Muon's peak lr (default: %(default)s)")
    p.add_argument("--max_lr", type=float, default=fast["max_lr"], help="fast: AdamW's peak lr (default: %(default)s)")
    p.add_argument("--decay_frac", type=float, default=fast["decay_frac"], help="fast: WSD's decay fraction (default: %(default)s)")
    # The sweep's grid.
    p.add_argument("--sweep_muon_lrs", type=numbers(float), default=[0.01, 0.02, 0.04])
    p.add_argument("--sweep_max_lrs", type=numbers(float), default=[3e-3, 6e-3, 1.2e-2])
    p.add_argument("--sweep_decay_fracs", type=numbers(float), default=[0.2, 0.4, 0.6], help="at the best muon_lr, max_lr")
    p.add_argument("--widths", type=numbers(int), default=[128, 256], help="--width_check: the widths (n_embd)")
    p.add_argument("--sweep_rms_lrs", type=numbers(float), default=[3e-3, 6e-3, 1.2e-2],
                   help="--width_check: Muon's learning rates under match_rms_adamw (AdamW-sized; \"\" leaves it out)")
    p.add_argument("--sweep_adamw_lrs", type=numbers(float), default=[6e-4, 2e-3, 6e-3],
                   help="the default recipe at these AdamW lrs, for reference (6e-4 is the recipe's own)")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])
    if not args.seeds:
        raise UserError("--seeds is empty: give at least one seed")
    if not all(0 < f < 1 for f in args.fractions):
        raise UserError(f"--fractions {args.fractions}: each must be between 0 and 1 (the full budget is always run)")
    if not 0 < args.val_fraction < 1 or not 0 <= args.warmup_frac < 1:
        raise UserError("--val_fraction must be between 0 and 1, --warmup_frac at least 0 and below 1")
    if not Path(args.data).exists():
        raise UserError(f"--data {args.data} not found: pass the FineWeb sample (or any .jsonl of documents)")
    args.device = plumbing.pick_device(args.device)  # "auto" resolved; a device that does not exist here refused
    if args.json:
        plumbing.check_writable(args.json, "--json")  # fail now, not after the runs
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = prepare_data(args.data, args.work_dir, args.val_fraction)
    print(f"data: {data_dir}; runs in {Path(args.work_dir) / 'runs'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    started = time.time()
    if args.width_check:
        summary = width_check(args, data_dir)
        print_width_check(summary, args)
    elif args.sweep:
        summary = sweep(args, data_dir)
        print_sweep(summary, args)
    else:
        summary = compare(args, data_dir)
        print_comparison(summary, args)
    print(f"\n({plumbing.format_duration(time.time() - started)} in all)")
    if args.json:
        plumbing.write_json_atomically(args.json, dict(settings=vars(args), warmup_steps=warmup_steps(args), **summary), "--json")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
