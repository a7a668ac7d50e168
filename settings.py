"""
What a GPT-2 run is set to do, and whether it can: the presets and rules apart from train_gpt2.py's
story (whose TrainConfig holds the story's settings, one field per flag, and whose extensions declare
theirs beside their sections).

  1. GPT-2's four sizes, each one's recipe (--model), the run's own settings (the folder, the log, when
     to stop), and the presets (--preset fast, shakespeare)
  2. the checks before any work starts: settings, model files and names, token shards, a resumed
     loader; each refuses bad input in one `error: ...` line that says what to do
  3. the memory a run will need, and which flag to change when it runs out
  4. what a run prints: its settings resolved at the start, a summary at the end, and the published
     scores it is held against (BASELINES, also read by the notebooks)

It knows GPT-2 (its sizes, its config, its published scores) but imports no file of the project other
than plumbing.py: train_gpt2.py and the scripts import it, never the other way round.
"""

import base64
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from plumbing import (MemoryEstimate, UserError, available_memory, check_rules, find_latest_checkpoint, format_duration,
                      human, load_checkpoint, pick_device, progress_bar, quiet_transformers, rank0_decides,
                      resolve_reference, setting, shell_command, shell_double_quoted, split_list)

# ---------------------------------------------------------------------------------------------------
# 1. GPT-2's sizes and their recipes, the run's own settings, the presets

# OpenAI's four GPT-2 sizes (all with block_size 1024, vocab 50257).
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


# The recipe of each GPT-2 size trained from scratch (--model), on FineWeb-Edu with the default recipe
# (AdamW, warmup, cosine to 10%). Cited: the learning rate and batch of the GPT-3 paper's model nearest
# in size (Brown et al., 2020, Table 2.1), warmup over GPT-3's 375M tokens (715 steps of 2^19), and
# llm.c's GPT-2 runs (karpathy/llm.c, scripts/run_gpt2_{124M,350M,774M,1558M}.sh). max_steps is our
# estimate of the tokens that reach OpenAI's model of that size; fast_steps the same for --preset fast.
# micro_batch_size: what fits an 80 GB GPU with DDP, bf16 (estimate_memory, below).
GPT2_RECIPES = {
    # GPT-3 Small: 6e-4, 2^19 tokens. 10B tokens: build-nanogpt's and llm.c's 124M runs pass GPT-2 124M's
    # HellaSwag (cited); fast: docs/recipes.md, "Where 8,000 steps comes from" (our estimate).
    "gpt2": dict(max_lr=6e-4, total_batch_size=2**19, warmup_steps=715, max_steps=19_073, fast_steps=8_000,
                 micro_batch_size=64),
    # GPT-3 Medium (350M) and llm.c's 350M: 3e-4, 2^19 (cited). 31.5B tokens: llm.c's 350M run (cited);
    # that it reaches GPT-2 medium is our guess (80 tokens per parameter, as 124M's 10B).
    "gpt2-medium": dict(max_lr=3e-4, total_batch_size=2**19, warmup_steps=715, max_steps=60_000, fast_steps=25_000,
                        micro_batch_size=32),
    # GPT-3 Large (760M) and llm.c's 774M: 2.5e-4, 2^19 (cited). llm.c trained 150B tokens; 80 tokens per
    # parameter, 62B, is our guess.
    "gpt2-large": dict(max_lr=2.5e-4, total_batch_size=2**19, warmup_steps=715, max_steps=118_000, fast_steps=50_000,
                       micro_batch_size=16),
    # llm.c's 1558M: 6e-4, 2^20 tokens a step, 700 warmup steps (cited); it matched GPT-2 XL's HellaSwag
    # about 25K steps into its 32K-step run (cited): 25,000 steps (26B tokens), the schedule ending there (guess).
    "gpt2-xl": dict(max_lr=6e-4, total_batch_size=2**20, warmup_steps=700, max_steps=25_000, fast_steps=10_500,
                    micro_batch_size=8),
}


@dataclass
class SizeSettings:
    model: str = setting("gpt2", "the GPT-2 size to train from scratch: gpt2 (124M), gpt2-medium (350M), gpt2-large "
                         "(774M), gpt2-xl (1558M); sets its shape and recipe (settings.py), flags given beside it win",
                         choices=tuple(GPT2_SIZES))


# The settings of the run itself, beside the story's (train_gpt2.TrainConfig) and the extensions': how
# plumbing.Run keeps the folder, the log and the checkpoints, and when it stops.
@dataclass
class RunSettings:
    keep_checkpoints: int = setting(3, "keep the newest K checkpoints", rule="positive")
    overwrite: bool = setting(False, "delete an earlier run's log and checkpoints in log_dir and start over")
    stop_after_step: int = setting(0, "stop with a checkpoint after this many steps, as if preempted (0 = run to "
                                   "max_steps)", rule="non_negative")
    max_bad_steps: int = setting(5, "stop after this many non-finite losses/gradients in a row", rule="positive")
    tensorboard: bool = setting(False, "also write log.txt's streams and the samples for TensorBoard, in "
                                "log_dir/tensorboard")
    print_settings: bool = setting(False, "print every setting at the start (they are always saved in "
                                   "train_config.json)")
    peak_flops: float = setting(0.0, "accelerator peak FLOP/s for MFU (0 = look it up from the device name)",
                                rule="non_negative_number")


def size_defaults(args) -> dict:
    """--model's shape and recipe (with --preset fast, its fast_steps): defaults under a preset's and the flags'.
    GPT-2 124M's are train_gpt2.TrainConfig's own defaults (a test holds the two equal), which stay in force:
    a learner who edits one there sees it take effect."""
    recipe = dict(GPT2_SIZES[args.model], **GPT2_RECIPES[args.model])
    fast_steps = recipe.pop("fast_steps")
    if args.model == "gpt2":
        recipe = {}
    if args.preset == "fast":
        recipe["max_steps"] = fast_steps
    return recipe


# The fast recipe: Muon for the block matrices, AdamW for the rest, a warmup-stable-decay schedule.
FAST_RECIPE = dict(optimizer="muon", muon_lr=0.02, max_lr=6e-3, schedule="wsd", decay_frac=0.2, min_lr_ratio=0.0)

PRESETS = {
    # GPT-2 in fewer tokens: the fast recipe, 250 warmup steps, and the size's fast_steps (8,000 for 124M,
    # 4.2B tokens). The same GPT-2 (it exports to Hugging Face like any other); the evidence for each
    # number is in docs/recipes.md.
    "fast": dict(FAST_RECIPE, warmup_steps=250),
    # A quick start: a small GPT on Tiny Shakespeare, 5-20 minutes on a 2-core CPU, trained with the
    # fast recipe: val loss ~5.0 in 150 steps, where AdamW with a cosine schedule (the preset's recipe
    # until 2026-11) ends at 5.88 and writes word salad (docs/recipes.md, "The quick start's recipe").
    "shakespeare": dict(data_dir="tinyshakespeare_tokens", val_tokens=16_384, block_size=128, n_layer=4, n_head=4, n_embd=128,
                        total_batch_size=4096, micro_batch_size=32, **FAST_RECIPE, warmup_steps=20, max_steps=150,
                        eval_interval=25, hellaswag=False, sample_interval=75, num_samples=2, sample_prompt="ROMEO:",
                        checkpoint_interval=75),
}


def prepare_quick_start_data(config, master: bool, ddp: bool) -> None:
    """The quick start's corpus, Tiny Shakespeare (vendored), is small enough to tokenize on the spot:
    rank 0 runs `python fineweb.py --source shakespeare` for the user (and shows its summary line)."""
    data_dir = config.data_dir
    if data_dir != PRESETS["shakespeare"]["data_dir"] or list(Path(data_dir).glob("*_train_*.npy")):
        return
    def prepare():  # on rank 0; the others wait for its verdict, and stop with it if it failed (its line)
        command = [sys.executable, str(Path(__file__).with_name("fineweb.py")), "--source", "shakespeare", "--out_dir", data_dir]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise UserError(f"preparing {data_dir}/ failed: {(result.stderr.strip().splitlines() or ['?'])[-1].removeprefix('error: ')}")
        print(result.stdout.splitlines()[0])  # "tinyshakespeare_tokens: 2 shards, 338,026 tokens, ..."

    rank0_decides(ddp, master, prepare)


# ---------------------------------------------------------------------------------------------------
# 2. The checks before any work starts

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # a block's four matrices (train_gpt2.py, section 12)

# GPT-2's tokenizer: the merge ranks of its byte-pair encoding (a .tiktoken file: each line a token's bytes
# in base64 and its rank), and how it splits text into words before merging bytes: contractions, letters,
# digits, punctuation, and whitespace (a run of spaces keeps its last space for the next word, " hello" is
# one token).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_tokenizer(ranks_file: Path, eot_token: int):
    """tiktoken's Encoding of GPT-2 from its ranks file: the same as tiktoken.get_encoding("gpt2"), which
    would download the ranks on first use."""
    import tiktoken

    ranks = {}
    with open(ranks_file, "rb") as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": eot_token})


# The flags that set a new model's shape. A run that starts from another model (--init_from) takes that
# model's shape instead, and records it in place of theirs.
SHAPE_SETTINGS = ("n_layer", "n_head", "n_embd")

# What a resumed run must keep from the saved one: the model, the data order, the batches, the optimizer.
# Everything else may change on --resume (learning rates, max_steps, intervals, ...) and is applied.
FIXED_ON_RESUME = ("model", "init_from", "block_size", "n_layer", "n_head", "n_embd", "vocab_pad_multiple", "lora_rank",
                   "lora_alpha", "lora_targets", "lora_also_train", "total_batch_size", "micro_batch_size",
                   "data_seed", "optimizer")


def pretrained_shape(reference: str) -> dict | None:
    """n_layer, n_head, n_embd of the model a reference names, read without loading its weights; None
    if it cannot be read (loading it says why, later)."""
    if reference in GPT2_SIZES:
        return GPT2_SIZES[reference]
    try:
        path = Path(resolve_reference(reference))
        if path.is_dir():  # a Hugging Face directory
            hf = json.loads((path / "config.json").read_text())
            shape = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
            return shape if all(type(value) is int for value in shape.values()) else None
        model_config = load_checkpoint(path)["model_config"]  # memory-mapped: the weights are not read
        shape = {name: model_config[name] for name in SHAPE_SETTINGS}
        return shape if all(type(value) is int for value in shape.values()) else None
    except (UserError, OSError, KeyError, ValueError, TypeError):
        return None


def check_pretrained_shape(config, explicit) -> None:
    """With --init_from the model's shape is its own: a shape flag that says otherwise would be ignored."""
    shape = pretrained_shape(config.init_from)
    if shape is None:
        return
    claims = [(name, getattr(config, name), shape[name]) for name in SHAPE_SETTINGS if name in explicit]
    if "model" in explicit:
        claims += [("model", config.model, "another shape")] if GPT2_SIZES[config.model] != shape else []
    for name, value, actual in claims:
        if value != actual:
            raise UserError(f"--{name} {value} has no effect with --init_from {config.init_from}, whose shape is "
                            f"{shape['n_layer']} layers, {shape['n_head']} heads, {shape['n_embd']} wide: drop the flag")


def check_model_shape(config, explicit) -> None:
    """--model sets the shape of a model trained from scratch; a preset's shape (--preset shakespeare's
    small GPT) would silently win over it, and train_config.json would name a model that never ran."""
    shape = GPT2_SIZES[config.model]
    overridden = [name for name in SHAPE_SETTINGS if name not in explicit and getattr(config, name) != shape[name]]
    if overridden:
        raise UserError(f"--model {config.model} has no effect beside --preset, which sets its own model ({config.n_layer} "
                        f"layers, {config.n_head} heads, {config.n_embd} wide): drop --model to train the preset's, or "
                        f"--preset to train {config.model}")


def check_config(config, explicit=frozenset()) -> None:
    """One UserError for the first bad setting, before any work starts (train_gpt2.parse_config adds the
    two that need the tokenizer or the launcher: --sample_prompt's length and --shard without torchrun)."""
    check_rules(config)
    pick_device(config.device)  # a device that does not exist here
    if config.n_embd % config.n_head:
        raise UserError(f"--n_embd {config.n_embd} must be divisible by --n_head {config.n_head}")
    lora_flags = sorted(explicit & {"lora_alpha", "lora_targets", "lora_also_train"})
    if not config.lora_rank and lora_flags:
        raise UserError(f"--{lora_flags[0]} has no effect without --lora_rank (the rank of the LoRA adapters)")
    if config.lora_rank and config.init_from == "scratch":
        raise UserError("--lora_rank adapts a pretrained model: give --init_from (gpt2, an HF dir, a checkpoint)")
    if config.lora_rank and config.optimizer == "muon":
        raise UserError("--optimizer muon trains the block matrices, which LoRA freezes: fine-tune LoRA with adamw")
    unknown = [t for t in split_list(config.lora_targets) if t not in LORA_TARGETS]
    if unknown or not split_list(config.lora_targets):
        raise UserError(f"--lora_targets {config.lora_targets!r}: choose among {','.join(LORA_TARGETS)}")
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if config.init_from != "scratch" and explicit & {"model", "n_layer", "n_head", "n_embd"}:
        check_pretrained_shape(config, explicit)
    if config.init_from == "scratch" and "model" in explicit:
        check_model_shape(config, explicit)
    hellaswag_flags = sorted(explicit & {"hellaswag_data", "hellaswag_limit"})
    if not config.hellaswag and hellaswag_flags:
        raise UserError(f"--{hellaswag_flags[0]} has no effect without --hellaswag"
                        + (" (the preset turns HellaSwag off)" if "preset" in explicit and "hellaswag" not in explicit else ""))
    sample_flags = sorted(explicit & {"sample_prompt", "num_samples", "sample_tokens"})
    if not config.sample_interval and sample_flags:
        raise UserError(f"--{sample_flags[0]} has no effect with --sample_interval 0 (no samples): give a --sample_interval")
    if config.shard and config.dtype == "float16":
        raise UserError("--shard runs in bfloat16 or float32: float16's gradient scaler does not work with sharding here")
    if config.loss == "chunked" and not hasattr(F, "linear_cross_entropy"):
        raise UserError(f"--loss chunked needs torch 2.13 or newer (F.linear_cross_entropy); this is torch {torch.__version__}")
    if config.resume and config.overwrite:
        raise UserError("--resume continues the run in --log_dir and --overwrite deletes it: give one of them")
    if len(set(split_list(config.lora_targets))) < len(split_list(config.lora_targets)):
        raise UserError(f"--lora_targets {config.lora_targets!r} names a matrix twice")
    muon_flags = sorted(explicit & {"muon_lr", "muon_momentum", "muon_weight_decay", "muon_adjust_lr"})
    if config.optimizer != "muon" and muon_flags:
        raise UserError(f"--{muon_flags[0]} has no effect without --optimizer muon")
    if config.schedule != "wsd" and "decay_frac" in explicit:
        raise UserError("--decay_frac has no effect without --schedule wsd")


def check_model_config(model_config, config_class, source: str):
    """The config_class (GPTConfig) a checkpoint's model_config describes: its fields, positive whole numbers."""
    try:
        config = config_class(**model_config)
    except TypeError as e:
        raise UserError(f"{source}: model_config does not describe a GPTConfig ({e})") from e
    bad = [f"{k}={v!r}" for k, v in asdict(config).items() if type(v) is not int or v < 1]
    if bad:
        raise UserError(f"{source}: model_config has {bad[0]}, not a positive whole number: the checkpoint is damaged")
    return config


def check_also_train(also_train, names: list[str]) -> None:
    """Each --lora_also_train fragment must be part of some parameter's name."""
    unmatched = [fragment for fragment in also_train if not any(fragment in name for name in names)]
    if unmatched:
        raise UserError(f"--lora_also_train {unmatched[0]!r} matches no parameter (their names look like {names[2]})")


def open_shard(path: Path):
    """A shard of tokens, memory-mapped (nothing is read until used), refused in one line if it is not one."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":  # every .npy file starts with these bytes
        raise UserError(f"{path} is {'empty' if not magic else 'not a .npy file'}: make the shards again with fineweb.py")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)  # memory-mapped: nothing is read until used
    except (OSError, ValueError, EOFError) as e:  # a header that promises more than the file holds
        raise UserError(f"{path} is truncated or damaged ({e}): make the shards again with fineweb.py") from e
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(f"{path} is not a shard of GPT-2 tokens (expected 1-D uint16, got {tokens.ndim}-D {tokens.dtype})")
    return tokens


def check_tokens(tokens: np.ndarray, path: Path, vocab_size: int) -> None:
    """Every token id must have a row in the model's embedding."""
    if len(tokens) and (top := int(tokens.max())) >= vocab_size:
        split = "val" if "_val_" in Path(path).name else "train"
        raise UserError(f"token id {top} in {split} shard {path} is >= the model's vocab_size {vocab_size}: were "
                        "these shards made with another tokenizer?")


def check_train_shards(loader, paths: list[Path]) -> None:
    """Token ids the model has, and at least one window of B*T+1 tokens (shorter shards are skipped)."""
    master, window = loader.rank == 0, loader.B * loader.T
    for path, shard in zip(progress_bar(paths, master, "checking the train shards"), loader.shards):
        check_tokens(shard, path, loader.vocab_size)
    too_small = [p.name for p, n in zip(paths, loader.windows_per_shard) if n == 0]
    if too_small and master:
        print(f"note: skipping train shards shorter than one batch ({window + 1:,} tokens): {', '.join(too_small)}")
    if loader.windows_per_epoch == 0:
        raise UserError(
            f"the train shards in {loader.data_dir}/ hold {sum(len(s) for s in loader.shards):,} tokens, fewer than one "
            f"batch (B*T+1 = {window + 1:,}): lower --micro_batch_size or --block_size, or make bigger shards"
        )


def check_val_shards(loader, paths: list[Path], starts: list, data_dir, vocab_size: int) -> None:
    """At least one sequence, and token ids the model has in the part of each shard in use."""
    if not starts:
        raise UserError(f"the val shards in {data_dir}/ hold fewer than block_size+1 = {loader.T + 1} tokens")
    for i, shard in enumerate(loader.shards):
        used = [a for s, a in starts if s == i]
        if used:
            check_tokens(shard[: max(used) + loader.T + 1], paths[i], vocab_size)


def checked_loader_position(loader, state: dict) -> int:
    """Where a resumed loader starts (the windows all ranks have taken), once it is known to cut the same
    windows from the same shards."""
    if (state["B"], state["T"], state["seed"]) != (loader.B, loader.T, loader.seed):
        raise UserError(
            f"the checkpoint's data loader used B={state['B']}, T={state['T']}, seed={state['seed']}; "
            f"this run uses B={loader.B}, T={loader.T}, seed={loader.seed}: resume with the same settings"
        )
    saved = state.get("shards")
    if saved is not None and [list(s) for s in saved] != loader.shard_list:
        raise UserError(
            f"the train shards in {loader.data_dir}/ are not those of the saved run ({len(saved)} shards, "
            f"{sum(n for _, n in saved):,} tokens then; {len(loader.shard_list)} shards, "
            f"{sum(n for _, n in loader.shard_list):,} tokens now): resume with the run's own --data_dir"
        )
    if saved is None:  # a checkpoint of an earlier version, which counted windows within the epoch
        return state["epoch"] * loader.windows_per_epoch + state["windows_taken"]
    return state["windows_taken"]


def optimizer_states(checkpoint: dict) -> list:
    """The optimizers' states a checkpoint holds (a checkpoint of an earlier version held one, "optimizer")."""
    return checkpoint.get("optimizers") or [checkpoint["optimizer"]]


def load_hf_gpt2(name_or_dir: str):
    """transformers' GPT2LMHeadModel for a GPT-2 name or a save_pretrained directory, refused with one
    line if it does not exist, does not load, or computes another function than GPT-2's."""
    if not os.path.isdir(name_or_dir) and name_or_dir not in GPT2_SIZES:
        if os.sep in name_or_dir or name_or_dir.startswith("."):
            raise UserError(f"model directory {name_or_dir!r} does not exist")
        raise UserError(
            f"unknown model {name_or_dir!r}: use one of {', '.join(GPT2_SIZES)}, "
            "or a directory written by GPT2LMHeadModel.save_pretrained"
        )
    from transformers import GPT2LMHeadModel  # imported here: only this path needs transformers

    try:
        with quiet_transformers():
            hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir)
    except Exception as e:  # a missing or truncated file (safetensors' own error), pickled objects, a bad config, ...
        first_line = str(e).strip().splitlines()[0].strip() if str(e).strip() else ""
        if "weights_only" in str(e) or "Weights only" in str(e):  # torch refused to unpickle: don't pass on its advice
            first_line = "it holds pickled Python objects, not only weights, and loading those could run code"
        raise UserError(f"could not load {name_or_dir!r} with transformers: {type(e).__name__}: {first_line}") from e
    hf = hf_model.config
    # Every GPT2Config field that changes what the model computes must have GPT-2's value: this
    # model implements exactly that one function. Refuse anything else rather than be subtly wrong.
    # (Dropout rates are left out: they change training, not the function, and we train without.)
    gpt2_only = dict(model_type="gpt2", activation_function="gelu_new", layer_norm_epsilon=1e-5,  # GELU(tanh)
                     tie_word_embeddings=True,  # one matrix for the token embeddings and the classifier
                     scale_attn_weights=True,  # attention scores divided by sqrt(head size)
                     scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, add_cross_attention=False,
                     n_inner=4 * hf.n_embd)  # the MLP's width (None means 4 * n_embd)
    for key, expected in gpt2_only.items():
        value = getattr(hf, key, expected)
        value = 4 * hf.n_embd if key == "n_inner" and value is None else value
        if value != expected:
            raise UserError(
                f"{name_or_dir}: GPT2Config.{key}={value!r} is not supported: this GPT-2 implements "
                f"{key}={expected!r} only"
            )
    return hf_model


def parse_hellaswag_line(line: str, where: str, num_endings: int) -> tuple[str, list[str], int]:
    """(ctx, endings, label) from one line of HellaSwag's file: a JSON object with these three fields."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if missing := [field for field in ("ctx", "endings", "label") if field not in row]:
        raise UserError(f"{where}: missing field {missing[0]!r}")
    context, endings, label = row["ctx"], row["endings"], row["label"]
    label = int(label) if isinstance(label, str) and label.isdigit() else label  # Hugging Face's copy stores "3"
    if not isinstance(context, str):
        raise UserError(f"{where}: 'ctx' must be a string")
    if not (isinstance(endings, list) and len(endings) == num_endings and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of {num_endings} strings")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_endings:
        raise UserError(f"{where}: label {row['label']!r} is out of range (expected 0..{num_endings - 1})")
    return context, endings, label


# ---------------------------------------------------------------------------------------------------
# 3. The memory a run needs


def estimate_memory(model, config, world_size: int, dtype: torch.dtype, device: str,
                    micro_batch_size: int | None = None) -> MemoryEstimate:
    """What a process holds while it trains: a model of what PyTorch keeps, calibrated against the measured
    peak on a CPU (tests/test_sizes.py holds it within 25% at two shapes) and on an H200 (docs/sizes.md,
    "Memory": within 10% for GPT-2 and medium, compiled, one GPU and sharded)."""
    c, B, T = model.config, micro_batch_size or config.micro_batch_size, config.block_size
    shards = world_size if config.shard else 1
    n_trainable, optimizer_bytes = trained_and_optimizer_bytes(model, config)
    weights, gradients = 4 * model.num_params() / shards, 4 * n_trainable / shards  # fp32 masters and gradients
    optimizer = optimizer_bytes / shards
    # Per token and layer, autograd keeps the inputs of the two LayerNorms in fp32, and in the compute
    # dtype the inputs of the four matmuls (C, C, C, 4C), q, k, v and attention's output (4C) and GELU's
    # input (4C): 15C values; checkpointing keeps the block's input only, and one block's worth again
    # while it is recomputed. The logits peak in backward at ~12 bytes each (the logits, their fp32
    # log-softmax and its gradient); the chunked loss holds ~6 bytes a logit, a chunk of rows at a time.
    # Compiled on a GPU, inductor fuses the log-softmax and its gradient into kernels that keep only the
    # logits, in the compute dtype (measured on an H200: 124M at B=64 peaks at 28.9 GiB, not 60); a
    # sharded model's compiled graph breaks at every block and the measured peak is the eager one.
    compute = 4 if dtype == torch.float32 else 2
    per_layer = B * T * c.n_embd * (8 + 15 * compute)
    layers = B * T * c.n_embd * 4 * c.n_layer + per_layer if config.activation_checkpointing else per_layer * c.n_layer
    fused = config.compile != "off" and device.startswith("cuda") and not config.shard
    chunk_rows = getattr(model, "loss_chunk_rows", 0)  # train_gpt2.use_chunked_loss sets it
    logits = 6 * min(B * T, chunk_rows) if chunk_rows else (compute if fused else 12) * B * T
    activations = layers + logits * c.padded_vocab_size + 2 * B * T * c.n_embd * 4  # + the stream's two ends
    return MemoryEstimate(weights, gradients, optimizer, activations, available_memory(device))


def resolve_compile(requested: str, device: str, say=print) -> bool:
    """Whether the run compiles its model (--compile; auto: on CUDA), found out now rather than at the
    first step, where a run without a C++ compiler (inductor's CPU kernels, Triton's launcher) would fail
    with its log already started: --compile on is refused in one line, auto trains uncompiled, saying so."""
    if not (requested == "on" or (requested == "auto" and device.startswith("cuda"))):
        return False
    problem = compile_problem(device)
    if problem is None:
        return True
    if requested == "on":
        raise UserError(f"--compile on: torch.compile cannot build kernels here ({problem}): install a C++ "
                        "compiler (e.g. apt install g++) or train with --compile off")
    say(f"note: torch.compile cannot build kernels here ({problem}): training uncompiled, slower (install "
        "a C++ compiler, e.g. apt install g++, to compile)")
    return False


def compile_problem(device: str) -> str | None:
    """None if torch.compile builds and runs a small kernel on the device, else why not, in one line."""
    import random

    scale = 1.0 + random.random()  # a constant of its own: the kernel is built, never found in a cache
    try:
        torch.compile(lambda x: x * scale + 1.0, dynamic=False)(torch.ones(8, device=device))
    except Exception as e:  # inductor's errors vary with the version and what is missing
        # Its first line names the cause (InvalidCxxCompiler: No working C++ compiler found ...); the rest
        # is advice about tracebacks.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return (lines[0] if lines else type(e).__name__)[:200]
    return None


def trained_and_optimizer_bytes(model, config) -> tuple[int, int]:
    """(the parameters that train, the bytes of their optimizer state in float32: AdamW's two moments, and
    with --optimizer muon Muon's one momentum for the matrices inside the blocks, as train_gpt2 splits them)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for _, p in trainable)
    muon = sum(p.numel() for name, p in trainable if config.optimizer == "muon" and name.startswith("transformer.h.") and p.dim() == 2)
    return n_trainable, 8 * (n_trainable - muon) + 4 * muon


def checkpoint_bytes(model, config) -> int:
    """What a checkpoint of this run takes on disk: the weights it saves (a LoRA run's: those that train)
    and the optimizer's state, all float32."""
    n_trainable, optimizer_bytes = trained_and_optimizer_bytes(model, config)
    # A tied weight is saved once, but twice when sharded (each gathered on its own).
    weights = (n_trainable if getattr(model, "lora", None) else sum(v.numel() for v in model.state_dict().values()) if config.shard
               else sum(p.numel() for p in model.parameters()))
    return 4 * weights + optimizer_bytes


def out_of_memory_advice(model, config, world_size: int, dtype: torch.dtype, device: str) -> str:
    """One line for a run that ran out of memory: which flag to change, and by how much."""
    estimate = estimate_memory(model, config, world_size, dtype, device)
    line = f"out of memory with --micro_batch_size {config.micro_batch_size} ({estimate.describe()}): "
    budget = 0.85 * (estimate.available or estimate.total / 2)  # leave room for the allocator's fragments
    smaller = [b for b in range(config.micro_batch_size - 1, 0, -1) if config.micro_batch_size % b == 0
               and estimate_memory(model, config, world_size, dtype, device, b).total <= budget]
    if smaller:
        return line + (f"try --micro_batch_size {smaller[0]} (the same total batch, "
                       f"{config.micro_batch_size // smaller[0]}x the accumulation steps)")
    state = estimate.weights + estimate.gradients + estimate.optimizer  # what no micro-batch size changes
    if state > budget and not config.shard:
        return line + (f"the weights and their training state alone take {state / 2**30:.1f} GiB: add --shard and "
                       "run on several GPUs (torchrun --nproc_per_node=N), each keeps 1/N of them, or train a "
                       "smaller --model")
    if not config.activation_checkpointing:
        return line + "even --micro_batch_size 1 does not fit: add --activation_checkpointing (and --shard on several GPUs)"
    if not config.shard:
        return line + "add --shard and run on several GPUs (torchrun --nproc_per_node=N): each keeps 1/N of the model"
    return line + f"the model does not fit {world_size} GPU(s) of this size: add GPUs, or train a smaller --model"


# ---------------------------------------------------------------------------------------------------
# 4. What a run prints


# What OpenAI's models score: the one table of baselines. The run summary, play.ipynb and benchmark.ipynb
# all read it. A number means something only together with its protocol (GPT-2 124M scores 0.2955 or
# 0.3114 on HellaSwag depending on how the four endings are scored), so every number is stored under the
# protocol it was measured with, and only numbers of one protocol are compared.
BASELINE_PROTOCOLS = {
    "val_loss": "val loss, FineWeb-Edu (sample-10BT) val shard, T=1024",
    "completion": "HellaSwag acc_norm, completion-style (our hellaswag.py), 10,042 val, zero-shot",
    "harness": "HellaSwag acc_norm, lm-evaluation-harness (multiple-choice style), 10,042 val, zero-shot",
    "gpt3_paper": "HellaSwag, GPT-3 paper's own scoring (per-token likelihood), dev set = 10,042 val, zero-shot",
}
# One row per model. HellaSwag entries are (acc, acc_norm); None: not published, as far as we know. The
# GPT-3 paper reports one accuracy, picking the ending with the best per-token likelihood: an acc_norm.
# Sources. completion, 124M and 1558M: build-nanogpt's hellaswag.py, whose scoring ours reproduces (fp32,
# all 10,042 examples). completion, 350M and 774M: the reference lines of build-nanogpt's play.ipynb, which
# puts 124M at 0.2945 and 1558M at 0.4889: the same protocol run another way, so expect +-0.001 between
# runs. harness: the lm-evaluation-harness results quoted in build-nanogpt's hellaswag.py. gpt3_paper:
# Brown et al. 2020, Table H.1. val_loss: build-nanogpt's play.ipynb, OpenAI's 124M checkpoint on its
# FineWeb-Edu val shard.
BASELINES = {
    "GPT-2 124M": dict(params=124_439_808, val_loss=3.2924, completion=(0.2859, 0.2955), harness=(0.2892, 0.3114),
                       gpt3_paper=None),
    "GPT-2 350M": dict(params=354_823_168, val_loss=None, completion=(None, 0.3752), harness=None, gpt3_paper=None),
    "GPT-2 774M": dict(params=774_030_080, val_loss=None, completion=(None, 0.4320), harness=None, gpt3_paper=None),
    "GPT-2 1558M": dict(params=1_557_611_200, val_loss=None, completion=(0.3842, 0.4893), harness=(0.4004, 0.5089),
                        gpt3_paper=None),
    "GPT-3 Small 125M": dict(params=125_000_000, val_loss=None, completion=None, harness=None, gpt3_paper=(None, 0.337)),
    "GPT-3 Medium 350M": dict(params=350_000_000, val_loss=None, completion=None, harness=None, gpt3_paper=(None, 0.436)),
    "GPT-3 Large 760M": dict(params=760_000_000, val_loss=None, completion=None, harness=None, gpt3_paper=(None, 0.510)),
    "GPT-3 XL 1.3B": dict(params=1_300_000_000, val_loss=None, completion=None, harness=None, gpt3_paper=(None, 0.547)),
}
# The rows of OpenAI's GPT-2 by --model name, as the summary at the end of a run quotes them:
# (parameters, val loss on FineWeb-Edu's val shard, HellaSwag acc_norm in hellaswag.py's protocol).
GPT2_SCORES = {
    name: (BASELINES[row]["params"], BASELINES[row]["val_loss"], BASELINES[row]["completion"][1])
    for name, row in (("gpt2", "GPT-2 124M"), ("gpt2-medium", "GPT-2 350M"), ("gpt2-large", "GPT-2 774M"),
                      ("gpt2-xl", "GPT-2 1558M"))
}


def baselines_table(first_rows=()) -> str:
    """BASELINES as a Markdown table, under first_rows (rows already formatted: a model of ours), then
    what each column's protocol is."""
    def number(value, digits=4) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    rows = ["| model | params | val loss | HellaSwag completion-style (acc / acc_norm) | harness acc_norm | GPT-3 paper |",
            "|---|---:|---:|---:|---:|---:|", *first_rows]
    for name, b in BASELINES.items():
        completion = "n/a" if b["completion"] is None else " / ".join(number(v) for v in b["completion"])
        harness = "n/a" if b["harness"] is None else number(b["harness"][1])
        gpt3 = "n/a" if b["gpt3_paper"] is None else number(b["gpt3_paper"][1], 3)
        rows.append(f"| {name} | {b['params'] / 1e6:,.0f}M | {number(b['val_loss'])} | {completion} | {harness} | {gpt3} |")
    protocols = [f"- **{key}**: {text}" for key, text in BASELINE_PROTOCOLS.items()]
    return "\n".join(rows) + "\n\n" + "\n".join(protocols)


def describe_run(config, model, device: str, dtype, use_compile: bool, world_size: int,
                 grad_accum_steps: int, train_loader, val_loader, hellaswag_line: str = "") -> str:
    """The settings the run really uses, resolved (the device, not "auto"), in a few lines (and the
    HellaSwag examples it scores, if any)."""
    c = model.config
    if device.startswith("cuda"):
        hardware = f"{torch.cuda.get_device_name(device)} x {world_size} GPU{'s' if world_size > 1 else ''}"
    else:
        threads = torch.get_num_threads()
        hardware = f"{device} ({threads} thread{'s' if threads > 1 else ''})" + (f" x {world_size} processes" if world_size > 1 else "")
    recipe = (f"Muon lr {config.muon_lr:g} (block matrices) + AdamW lr {config.max_lr:g} (the rest)"
              if config.optimizer == "muon" else f"AdamW lr {config.max_lr:g}")
    recipe += f", {config.schedule} schedule, warmup {config.warmup_steps} steps"
    if config.schedule == "wsd":
        recipe += f", decay over the last {config.decay_frac:.0%}"
    tokens = config.max_steps * config.total_batch_size
    train_tokens = train_loader.windows_per_epoch * config.micro_batch_size * config.block_size
    lines = [
        f"on:     {hardware} | {str(dtype).removeprefix('torch.')} | torch.compile {'on' if use_compile else 'off'} | "
        f"{'chunked' if getattr(model, 'loss_chunk_rows', 0) else 'plain'} loss" + (" | sharded (FSDP2)" if config.shard else "")
        + (" | activation checkpointing" if config.activation_checkpointing else ""),
        f"model:  {model.num_params() / 1e6:.1f}M parameters ({c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, "
        f"block {c.block_size}, vocab {c.padded_vocab_size}) from {getattr(model, 'source', 'a new GPT')}",
        f"data:   {config.data_dir}/: {human(train_tokens)} train tokens in {len(train_loader.shards)} shard(s); "
        f"{human(val_loader.total_tokens)} val tokens per eval",
        f"recipe: {recipe}",
        f"steps:  {config.max_steps:,} x {config.total_batch_size:,} tokens = {human(tokens)} tokens "
        f"({tokens / train_tokens:.2f} epochs); a step = {config.micro_batch_size} x {config.block_size} tokens x "
        f"{world_size} process(es) x {grad_accum_steps} accumulation steps",
        f"memory: {estimate_memory(model, config, world_size, dtype, device).describe()}",
        f"every setting: {Path(config.log_dir) / 'train_config.json'} (--print_settings prints them here)",
    ]
    lora = getattr(model, "lora", None)  # train_gpt2.lora_settings
    if lora:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lines.insert(2, f"LoRA:   rank {lora['rank']}, alpha {lora['alpha']:g} on {','.join(lora['targets'])}: "
                        f"{trainable:,} trainable parameters ({100 * trainable / model.num_params():.2f}%), the rest frozen")
    return "\n".join(lines + [hellaswag_line] if hellaswag_line else lines)


def run_summary(config, model, step: int, steps_done: int, seconds: float, val_loss, acc_norm,
                finished: bool) -> str:
    """What the run did, how it compares with OpenAI's GPT-2 of its size, and what to do next."""
    log_dir = Path(config.log_dir)
    tokens = steps_done * config.total_batch_size
    lines = [f"{'done' if finished else 'stopped'}: step {step:,} of {config.max_steps:,}; this session: {steps_done:,} "
             f"steps, {human(tokens)} tokens in {format_duration(seconds)} ({tokens / max(seconds, 1e-9):,.0f} tok/s overall)"]
    name, (params, gpt2_val, gpt2_hella) = min(GPT2_SCORES.items(), key=lambda kv: abs(kv[1][0] - model.num_params()))
    same_size = abs(params - model.num_params()) < 0.05 * params
    if val_loss is not None:
        reference = f" (OpenAI's {name}: {gpt2_val:.4f} on FineWeb-Edu's val shard)" if same_size and gpt2_val else ""
        lines.append(f"val loss {val_loss:.4f}{reference}")
    if acc_norm is not None:
        reference = f" (OpenAI's {name}: {gpt2_hella:.4f})" if same_size else ""
        lines.append(f"HellaSwag acc_norm {acc_norm:.4f}{reference}")
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():  # what to compare with the estimate at the start
        lines.append(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated on this GPU, of "
                     f"{torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30:.1f} GiB")
    newest = find_latest_checkpoint(log_dir)
    lines.append(f"newest checkpoint: {newest}")
    if not finished:
        lines.append("continue: the same command with --resume")
    folder = f"{log_dir}/"
    export = f"from train_gpt2 import load_model, save_hf; save_hf(load_model({folder!r}), 'my-gpt2')"
    lines += ["next:",  # commands to paste: a folder with a space or a quote in its name is quoted
              f"  {shell_command('python', 'sample.py', '--init_from', folder):<56}  # talk to it",
              f"  {shell_command('python', 'hellaswag.py', '--model', folder):<56}  # HellaSwag on all 10,042 examples",
              f"  python -c {shell_double_quoted(export)}   # to Hugging Face",
              f"  {'RUN_DIR=' + shell_command(log_dir) + ' jupyter lab play.ipynb':<56}  # plots of the run"]
    return "\n".join(lines)
