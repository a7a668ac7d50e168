"""
GPT-2, from scratch, in a file that reads top to bottom.

    python train_gpt2.py --preset shakespeare               # a small GPT on a CPU, 5-13 minutes
    torchrun --standalone --nproc_per_node=8 train_gpt2.py  # the GPT-2 124M reproduction (FineWeb-Edu 10B)

Part I, the story: a complete GPT-2 trainer, in the order you would explain it
  1. the tokenizer                    6. training settings, also the command line
  2. the model: attention, MLP, GPT   7. AdamW and the learning-rate schedule
  3. GPT-2's weights in               8. evaluation: the val loss
  4. sampling                         9. the training loop: gradient accumulation, DDP, eval, samples
  5. the data loader: token shards, shuffled, split across GPUs
Part II, extensions: attached from outside the model; train() calls them by name, each section says what
 10. the KV cache and the compiled decode step    14. loading any model; exporting to Hugging Face
 11. the memory-saving loss                       15. bigger models: sharding, activation checkpointing
 12. LoRA: fine-tuning a few parameters           16. a faster recipe: Muon and the WSD schedule
 13. HellaSwag                                    17. checkpoints: what one holds, and resuming exactly
Running it: the command line, one process or torchrun's.

Beside it: settings.py (the presets, each GPT-2 size's recipe, the checks on settings and inputs, the memory
a run needs, what a run prints) and plumbing.py (run plumbing that knows nothing of GPT-2: one-line errors,
checkpoint files written atomically, the run-folder lock, the stop request, log.txt and TensorBoard).
"""

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing import (Run, UserError, find_data_file, folder_written_whole, gathered, is_sharded,
                      load_checkpoint, load_optimizer_state, load_state_dict_checked, parse_dataclass,
                      peak_flops_for, pick_device, progress_bar, quiet_transformers, rank0_decides,
                      resolve_reference, rng_states, run_main, save_checkpoint_file, set_rng_states, setting,
                      split_list, utf8_lines, weights_fingerprint)
from settings import (FIXED_ON_RESUME, LORA_TARGETS, PRESETS, SHAPE_SETTINGS, RunSettings, SizeSettings,
                      check_also_train, check_config, check_model_config, check_train_shards, check_val_shards,
                      checked_loader_position, checkpoint_bytes, describe_run, gpt2_tokenizer, load_hf_gpt2,
                      open_shard, optimizer_states, out_of_memory_advice, parse_hellaswag_line,
                      prepare_quick_start_data, pretrained_shape, resolve_compile, run_summary, size_defaults)

# Files that ship with the repo (the GPT-2 BPE ranks, Tiny Shakespeare).
DATA_DIR = Path(__file__).resolve().parent / "data"

# ===================================================================================================
# Part I: the story
# ===================================================================================================

# ---------------------------------------------------------------------------------------------------
# 1. The tokenizer
#
# GPT-2 reads bytes, not characters: 256 byte tokens, 50,000 merges learned by byte-pair encoding on
# WebText, and one special token, <|endoftext|> (id 50256), which separates documents. tiktoken would
# download the merge table on first use; we ship it (data/gpt2.tiktoken, 0.8 MB) so that training
# nodes without internet can tokenize.

EOT_TOKEN = 50256  # <|endoftext|>


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer: what tiktoken.get_encoding("gpt2") gives, read from the copy in data/."""
    return gpt2_tokenizer(DATA_DIR / "gpt2.tiktoken", EOT_TOKEN)  # settings.py


# ---------------------------------------------------------------------------------------------------
# 2. The model
#
# A stack of identical blocks, each "communicate, then compute": attention lets every position read
# from the positions before it, then an MLP transforms each position on its own. Module names match
# Hugging Face's GPT-2 (transformer.h.0.attn.c_attn, ...), so that loading its weights is a copy.


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model can read (number of position embeddings)
    vocab_size: int = 50257  # tokens the tokenizer produces: 256 bytes + 50,000 merges + <|endoftext|>
    n_layer: int = 12  # number of blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    # Round the embedding table up to a multiple of this: 64 gives 50304 rows, and matmuls whose sizes
    # are multiples of 64 run markedly faster on GPUs. The extra rows are tokens that never occur: the
    # loss, the logits and sampling all leave them out (GPT.forward).
    vocab_pad_multiple: int = 1

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_pad_multiple) * self.vocab_pad_multiple


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        # The queries, keys and values of all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # mixes the heads back into the residual stream
        self.c_proj.is_residual_projection = True  # the lecture's NANOGPT_SCALE_INIT: see GPT._init_weights

    def forward(self, x):
        B, T, C = x.size()  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # Split the channels into heads; each head attends on its own: (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # Causal: position t may look at positions <= t. SDPA runs this as flash attention where the
        # hardware has it, never materialising the (T, T) attention matrix.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2 used the tanh approximation of GELU (it was faster in 2019); we keep it to match its weights.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        # Pre-LayerNorm (GPT-2's change to the original Transformer): the residual stream x itself is
        # never normalised, so gradients flow straight from the loss to the first layer.
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


# Weights stored as Conv1D (in, out) in OpenAI's and Hugging Face's checkpoints, (out, in) here (section 3).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# A row per token: a 50257-row GPT-2 fits a model whose vocab is padded.
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings (learned)
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),  # the stream is never normalised in the blocks: once here
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying: the same matrix maps token -> vector at the input and vector -> token scores at
        # the output. Tokens that mean similar things should look similar at both ends, and it saves
        # 38.6M parameters (30% of the 124M model). GPT-2 does this.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2's init: N(0, 0.02) everywhere, zero biases, LayerNorms at (1, 0). Each block adds the
        # output of its two residual projections to the stream, whose variance would so grow with the
        # number of blocks; scaling those weights by (2 * n_layer)^-0.5 stops that growth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameters, the tied embedding once: 124,439,808 for GPT-2 small (124,475,904 padded to 50,304)."""
        return sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids -> (logits (B, T, vocab_size), loss): the mean cross-entropy against
        targets (B, T), or None without them."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) broadcasts over B
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        # The padded vocab rows are tokens that never occur, but their logits are whatever their rows
        # give: about 0, while a trained GPT-2 puts every real logit near -60, so left in the softmax they
        # would take nearly all the probability. Logits, loss and sampling cover the real vocab only.
        logits = self.lm_head(x)[..., : self.config.vocab_size]
        loss = None
        if targets is not None:  # in fp32: a softmax over 50,257 tokens
            loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T))
        return logits, loss

    # -----------------------------------------------------------------------------------------------
    # 3. GPT-2's weights
    #
    # OpenAI's checkpoints (and Hugging Face's GPT2LMHeadModel) use a "Conv1D" layer that stores its
    # weight as (in, out), the transpose of nn.Linear's (out, in). Everything else is copied as is.

    @classmethod
    def from_pretrained(cls, name_or_dir: str, vocab_pad_multiple: int = 1) -> "GPT":
        """Load gpt2 / gpt2-medium / gpt2-large / gpt2-xl (downloaded by transformers), or any directory
        written by GPT2LMHeadModel.save_pretrained."""
        hf_model = load_hf_gpt2(name_or_dir)  # transformers' own model, its config checked (settings.py)
        hf = hf_model.config
        config = GPTConfig(block_size=hf.n_positions, vocab_size=hf.vocab_size, n_layer=hf.n_layer,
                           n_head=hf.n_head, n_embd=hf.n_embd, vocab_pad_multiple=vocab_pad_multiple)
        model = cls(config)
        state = {}
        for key, value in hf_model.state_dict().items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of older versions
                continue
            state[key] = value.t() if key.endswith(CONV1D_WEIGHTS) else value
        load_state_dict_checked(model, state, name_or_dir, padded=VOCAB_ROWS)  # the padded rows stay zero
        return model

    # -----------------------------------------------------------------------------------------------
    # 4. Sampling
    #
    # Autoregressive: score the prompt, pick a next token from the last position's distribution
    # (sample_next_token, below the class), append it, repeat. Each step re-reads the whole sequence:
    # the simplest way, and fast enough for a few samples.

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None, generator=None,
                 stop_at_eot=False):
        """idx: (B, T) prompt tokens, the same length in every row. Returns (B, T + n), n <= max_new_tokens.
        temperature 0 is greedy. stop_at_eot: a row that produced <|endoftext|> is padded with it, and
        generation ends once every row has. A context longer than block_size is cropped, as in nanoGPT."""
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])  # the whole sequence again, every token
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            if stop_at_eot:
                next_token = torch.where(finished[:, None], EOT_TOKEN, next_token)
                finished |= next_token[:, 0] == EOT_TOKEN
            idx = torch.cat((idx, next_token), dim=1)
            if stop_at_eot and finished.all():
                break
        return idx


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, vocab). Returns (B, 1).

    temperature 0: greedy. top_k: sample only among the k most likely tokens. top_p (nucleus): only
    among the smallest set of most likely tokens whose probabilities add up to top_p.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best one always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ---------------------------------------------------------------------------------------------------
# 5. The data loader
#
# fineweb.py writes the corpus as shards of uint16 token ids ({name}_train_000001.npy, ...), documents
# separated by <|endoftext|>. Training cuts each shard into windows of B*T+1 tokens (B*T inputs, the same
# shifted by one as targets; consecutive windows share one token), and:
#  - memory-maps the shards: the OS pages in what is read, and no rank ever holds a whole shard;
#  - shuffles every epoch, from one seed that all ranks share: the shard order, then the window order
#    inside each shard (a fixed order shows as a periodic pattern in the loss);
#  - reads the epochs one after the other as one stream of windows and deals it round-robin to the
#    ranks: ranks never read the same data, together they read every full window (only a shard's tail
#    shorter than one window is skipped), and the stream is the same for any number of GPUs;
#  - can say where it is (state_dict): a resumed run sees the batches it would have seen.


def find_shards(data_dir, split: str) -> list[Path]:
    shards = sorted(Path(data_dir).glob(f"*_{split}_*.npy"))
    if not shards:
        raise UserError(f"no {split} shards (*_{split}_*.npy) in {data_dir}/: run `python fineweb.py` to "
                        "make them (or train with --preset shakespeare, which prepares its own)")
    return shards


def to_device(window: np.ndarray, B: int, T: int, device: str):
    """(B*T+1,) uint16 tokens -> inputs x and targets y, each (B, T) int64 on the device."""
    buf = torch.from_numpy(window.astype(np.int64))
    x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
    if device.startswith("cuda"):  # pinned memory: the copy runs asynchronously, overlapping compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class TrainLoader:
    """Shuffled (B, T) training batches for one rank, resumable: the lecture's DataLoaderLite, grown up."""

    def __init__(self, data_dir, B: int, T: int, rank=0, world_size=1, seed=1337, vocab_size=50257,
                 device="cpu"):
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.seed, self.vocab_size, self.device = seed, vocab_size, device
        paths = find_shards(data_dir, "train")
        self.data_dir, self.shards = data_dir, [open_shard(p) for p in paths]  # memory-mapped (settings.py)
        self.shard_list = [[p.name, len(s)] for p, s in zip(paths, self.shards)]  # what a resume finds again
        # Full windows per shard: the last window needs one more token for its final target.
        self.windows_per_shard = [(len(s) - 1) // (B * T) for s in self.shards]
        self.windows_per_epoch = sum(self.windows_per_shard)
        check_train_shards(self, paths)  # token ids now, not mid-run; at least one window (settings.py)
        self.windows_taken = 0  # by all ranks together; this rank's next window is windows_taken + rank
        self._orders = {}  # epoch -> its order, for the (at most two) epochs in use

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Every (shard, start) window of the epoch, in this epoch's shuffled order. Same on every rank."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            order = []
            for shard in rng.permutation(len(self.shards)):
                starts = rng.permutation(self.windows_per_shard[shard]) * (self.B * self.T)
                order.append(np.stack([np.full_like(starts, shard), starts], axis=1))
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = np.concatenate(order)
        return self._orders[epoch]

    def next_batch(self):
        epoch, i = divmod(self.windows_taken + self.rank, self.windows_per_epoch)  # round-robin over ranks
        shard, start = self._epoch_order(epoch)[i]
        self.windows_taken += self.world_size
        window = self.shards[shard][start : start + self.B * self.T + 1]
        return to_device(window, self.B, self.T, self.device)

    def state_dict(self) -> dict:
        # Counted in windows of the whole job, so a run resumed on another number of GPUs carries on
        # at the same point of the stream.
        epoch = self.windows_taken // self.windows_per_epoch
        return dict(seed=self.seed, epoch=epoch, windows_taken=self.windows_taken, B=self.B, T=self.T,
                    shards=self.shard_list)

    def load_state_dict(self, state: dict) -> None:
        # The same batches and shards as the saved run's, or one line saying what differs (settings.py).
        self.windows_taken = checked_loader_position(self, state)


class ValLoader:
    """A fixed set of validation sequences, the same whatever the number of ranks or the micro-batch:
    the first val_tokens // T sequences of the val split, dealt round-robin to the ranks."""

    def __init__(self, data_dir, B: int, T: int, val_tokens: int, rank=0, world_size=1, device="cpu",
                 vocab_size=50257):
        self.B, self.T, self.device = B, T, device
        paths = find_shards(data_dir, "val")
        self.shards = [open_shard(p) for p in paths]
        starts = [(i, s * T) for i, shard in enumerate(self.shards) for s in range((len(shard) - 1) // T)]
        self.num_sequences = min(len(starts), max(1, val_tokens // T))
        check_val_shards(self, paths, starts[: self.num_sequences], data_dir, vocab_size)  # settings.py
        self.total_tokens = self.num_sequences * T  # evaluated by all ranks together
        self.starts = starts[rank : self.num_sequences : world_size]  # this rank's sequences
        # The most batches any rank runs: a sharded model's forward is a collective, so that every rank
        # must run as many (evaluate_val_loss makes up the difference with batches it does not count).
        self.batches_per_rank = math.ceil(math.ceil(self.num_sequences / world_size) / B)

    def batches(self):
        for i in range(0, len(self.starts), self.B):
            group = self.starts[i : i + self.B]
            x = np.stack([self.shards[s][a : a + self.T + 1] for s, a in group]).astype(np.int64)
            x = torch.from_numpy(x)
            yield x[:, :-1].to(self.device), x[:, 1:].to(self.device)


# ---------------------------------------------------------------------------------------------------
# 6. Training settings
#
# TrainConfig's fields are the story's command-line flags (setting() gives each its --help text and the
# rule its value must meet: plumbing.py), saved as train_config.json beside the log. The defaults are the
# GPT-2 124M reproduction on FineWeb-Edu 10B, with the numbers of the GPT-3 paper's "small" model (GPT-2
# itself never published them). The extensions of Part II add settings of their own, each beside its
# section; Settings, at the end, is all of them: the command line. settings.py holds the presets, the
# other sizes' recipes (--model) and the checks that need several settings at once.


@dataclass
class TrainConfig:
    # data
    data_dir: str = setting("edu_fineweb10B", "folder of token shards written by fineweb.py")
    val_tokens: int = setting(10_485_760, "val tokens per evaluation (any number of GPUs)", rule="positive")
    data_seed: int = setting(1337, "seed of the per-epoch shuffle of shards and windows", rule="seed")
    # the model: a new GPT of this shape, or one to start from (section 14)
    init_from: str = setting("scratch", "scratch | gpt2[-medium|-large|-xl] | HF dir | .pt file | run folder")
    block_size: int = setting(1024, "sequence length T", rule="positive")
    n_layer: int = setting(12, "blocks (for --init_from scratch)", rule="positive")
    n_head: int = setting(12, "attention heads per block (for --init_from scratch)", rule="positive")
    n_embd: int = setting(768, "width of the residual stream (for --init_from scratch)", rule="positive")
    vocab_pad_multiple: int = setting(64, "pad the vocab to a multiple (50257 -> 50304)", rule="positive")
    # the batch: total_batch_size = micro_batch_size * block_size * world_size * grad_accum_steps
    total_batch_size: int = setting(524_288, "tokens per optimizer step, all GPUs together", rule="positive")
    micro_batch_size: int = setting(64, "sequences per forward/backward on each GPU", rule="positive")
    # AdamW and the learning-rate schedule
    max_lr: float = setting(6e-4, "peak learning rate of AdamW, after warmup", rule="positive_number")
    min_lr_ratio: float = setting(0.1, "the schedule ends at each peak learning rate x this", rule="fraction")
    warmup_steps: int = setting(715, "linear warmup (375M tokens, as GPT-3)", rule="non_negative")
    max_steps: int = setting(19_073, "optimizer steps (19,073 x 2^19 = 10B tokens)", rule="positive")
    weight_decay: float = setting(0.1, "AdamW weight decay, on 2-D weights only (not biases, LayerNorms)",
                                  rule="non_negative_number")
    beta1: float = setting(0.9, "AdamW beta1", rule="beta")
    beta2: float = setting(0.95, "AdamW beta2", rule="beta")
    eps: float = setting(1e-8, "AdamW epsilon", rule="float32_positive")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = no clipping)",
                               rule="non_negative_number")
    # evaluation, samples, checkpoints
    eval_interval: int = setting(250, "steps between val loss / HellaSwag evaluations (0 = never)",
                                 rule="non_negative")
    sample_interval: int = setting(250, "steps between printed samples (0 = never)", rule="non_negative")
    num_samples: int = setting(4, "samples printed each time", rule="positive")
    sample_tokens: int = setting(32, "tokens per sample", rule="positive")
    sample_prompt: str = setting("Hello, I'm a language model,", "prompt of the printed samples")
    log_dir: str = setting("log", "run folder: log.txt, train_config.json, checkpoints")
    checkpoint_interval: int = setting(1000, "steps between checkpoints (one is also written at the end)",
                                       rule="positive")
    resume: bool = setting(False, "continue from the newest checkpoint in log_dir (fresh if there is none)")
    # the machine
    device: str = setting("auto", "auto (cuda > mps > cpu) | cuda | cuda:N | mps | cpu")
    dtype: str = setting("auto", "auto: bfloat16 on GPUs that have it, float16 on older GPUs, else float32",
                         choices=("auto", "bfloat16", "float16", "float32"))
    compile: str = setting("auto", "torch.compile the model (auto: on CUDA)", choices=("auto", "on", "off"))
    seed: int = setting(1337, "seed of the model init", rule="seed")


# ---------------------------------------------------------------------------------------------------
# 7. The optimizer and the learning-rate schedule


def configure_optimizers(model: GPT, config: "Settings", device_type: str) -> list[torch.optim.Optimizer]:
    """AdamW for every trainable parameter, GPT-3's recipe (as a list: --optimizer muon, section 16, adds
    Muon). Each param group keeps its peak_lr; set_lr scales them all by the schedule."""
    if config.optimizer == "muon":
        return muon_and_adamw(model, config, device_type)  # section 16
    # Only what trains gets an optimizer state (with LoRA: the adapters, not the frozen weights).
    return [adamw([p for p in model.parameters() if p.requires_grad], config, device_type)]


def adamw(params: list, config: TrainConfig, device_type: str) -> torch.optim.AdamW:
    # Weight decay pulls weights towards zero. It regularises the matmul weights and embeddings; on
    # biases and LayerNorm gains it would only fight their job, so 1-D parameters are left alone.
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=config.weight_decay, peak_lr=config.max_lr),
              dict(params=no_decay, weight_decay=0.0, peak_lr=config.max_lr)]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=config.max_lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=device_type == "cuda",  # one kernel for all parameters instead of several per parameter
    )


def lr_schedule(step: int, config: "Settings") -> float:
    """The lecture's get_lr, as a factor of each peak lr (0..1): GPT-3's schedule, a linear warmup over
    warmup_steps, then a cosine down to min_lr_ratio at max_steps. (--schedule wsd: section 16.)"""
    if config.schedule == "wsd":
        return wsd_schedule(step, config)  # section 16
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return config.min_lr_ratio
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)  # 0 -> 1
    return config.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - config.min_lr_ratio)


def set_lr(optimizers, factor: float) -> None:
    """Every param group's learning rate = its peak_lr x the schedule's factor."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor


# ---------------------------------------------------------------------------------------------------
# 8. Evaluation: the val loss
#
# How well the model predicts text it never trained on: the same sequences at every evaluation, whatever
# the number of GPUs. (HellaSwag, does it pick the sensible ending of a story: section 13.)


@torch.no_grad()
def evaluate_val_loss(model, val_loader: ValLoader, autocast, ddp: bool, progress=False) -> tuple[float, int]:
    """Mean loss over the fixed val set, all ranks together. Returns (val_loss, tokens evaluated)."""
    model.eval()
    device = val_loader.device
    loss_sum, token_count = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    total = math.ceil(len(val_loader.starts) / val_loader.B)
    for x, y in progress_bar(val_loader.batches(), progress, "val loss", total=total):
        with autocast:
            _, loss = model(x, y)
        loss_sum += loss.float() * y.numel()  # back from mean to sum, so ranks with fewer tokens weigh less
        token_count += y.numel()
    if is_sharded(model):  # its forward is a collective: as many as the busiest rank, of batches not counted
        for _ in range(val_loader.batches_per_rank - total):
            zeros = torch.zeros(val_loader.B, val_loader.T, dtype=torch.long, device=device)
            with autocast:
                model(zeros, zeros)
    if ddp:
        dist.all_reduce(loss_sum)
        dist.all_reduce(token_count)
    model.train()
    return (loss_sum / token_count).item(), int(token_count.item())


# ---------------------------------------------------------------------------------------------------
# 9. The training loop
#
# The dtype, torch.compile and one optimizer step, then train(), which also calls Part II by name (each call
# says its section). Its `run` is plumbing.Run: the run folder and lock, log.txt, the stop, the checkpoints.


def pick_dtype(requested: str, device: str) -> torch.dtype:
    if requested != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[requested]
    if device.startswith("cuda"):
        # bf16 keeps fp32's range, so it needs no loss scaling, but only GPUs from Ampere on (A100, RTX 30xx,
        # H100) compute in it. Older ones (T4, V100) would emulate it, far slower: they get fp16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32  # on most CPUs bf16 runs slower than fp32 (few have bf16 units); MPS: the safest


def mixed_precision(device: str, dtype: torch.dtype):
    """(autocast context, gradient scaler) for this device and dtype; on CUDA, fp32 matmuls use TF32."""
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    fp32 = dtype == torch.float32  # nothing to cast
    autocast = contextlib.nullcontext() if fp32 else torch.autocast(device_type, dtype=dtype)
    # fp16's narrow range would flush small gradients to zero: the scaler scales the loss up (and back).
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    return autocast, scaler


def compile_model(model: GPT, backend="inductor"):
    """(training entry, evaluation entry), compiled, sharing the parameters. Training compiles one graph of
    fixed shapes; evaluation meets others (a partial val batch, HellaSwag's lengths) in an entry of its
    own, so that the training graph never turns dynamic."""
    return torch.compile(model, dynamic=False, backend=backend), torch.compile(model, backend=backend)


def flops_per_token(model: GPT, T: int) -> float:
    """Training FLOPs per token: 6 per parameter (2 forward, 4 backward) plus attention's 12*L*T*d."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * T * c.n_embd


def train_step(model, optimizers, next_batch, grad_accum_steps: int, autocast, grad_clip: float, scaler,
               ddp: bool):
    """One optimizer step over grad_accum_steps micro-batches, at the learning rates set_lr gave. Returns
    (the mean loss over all micro-batches and ranks, the gradient norm before clipping, whether the update
    was applied: it is skipped when either is not finite)."""
    loss_accum = 0.0
    for micro_step in range(grad_accum_steps):
        x, y = next_batch()
        # DDP would all-reduce the gradients after every backward; only the last micro-step needs it. (A
        # sharded model, section 15, reduce-scatters every micro-step: it keeps only its shard of them.)
        sync_gradients = micro_step == grad_accum_steps - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync_gradients else model.no_sync():
            with autocast:
                _, loss = model(x, y)
            # Gradients add up over backward calls; we want the gradient of the MEAN loss over all
            # micro-batches, so each micro-batch's (mean) loss counts 1/grad_accum_steps.
            loss = loss / grad_accum_steps
            loss_accum = loss_accum + loss.detach()
            scaler.scale(loss).backward()  # with fp16 the loss is scaled up so small gradients survive
    if ddp:
        dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)  # for the log: the mean over all ranks
    for optimizer in optimizers:
        scaler.unscale_(optimizer)  # clip the true gradients, not fp16-scaled ones
    max_norm = grad_clip if grad_clip > 0 else float("inf")  # inf: measure the norm, clip nothing
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # a sharded model's norm is a DTensor
        grad_norm = grad_norm.full_tensor()
    loss_value, norm_value = torch.stack([loss_accum, grad_norm.float()]).tolist()  # the step's one host sync
    stepped = math.isfinite(loss_value) and math.isfinite(norm_value)
    if stepped or scaler.is_enabled():  # the fp16 scaler skips non-finite steps itself and lowers its scale
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, stepped


def train(config: "Settings", ddp: bool, rank: int, local_rank: int, world_size: int, device: str) -> None:
    """Train as `config` says: from a new, pretrained or resumed model to max_steps, then a summary.
    Every rank runs this; rank 0 prints, logs and writes the checkpoints (plumbing.Run)."""
    master, device_type = rank == 0, device.split(":")[0]
    # The run folder, locked, and on --resume the checkpoint to continue from. (A model from elsewhere has
    # a shape of its own: the shape flags, which it ignores, may differ from the saved run's.)
    ignored = ("model", *SHAPE_SETTINGS) if config.init_from != "scratch" else ()
    with Run(config, master, ddp, device, fixed_on_resume=FIXED_ON_RESUME, ignored_on_resume=ignored) as run:
        if run.already_finished():
            return
        checkpoint = run.checkpoint

        # The batch: total_batch_size tokens per optimizer step, made of micro-batches of B sequences of
        # T tokens on each of world_size ranks, accumulated grad_accum_steps times.
        B, T = config.micro_batch_size, config.block_size
        tokens_per_micro_step = B * T * world_size
        if config.total_batch_size % tokens_per_micro_step:
            raise UserError(f"--total_batch_size {config.total_batch_size:,} is not a multiple of "
                            f"micro_batch_size x block_size x processes = {B} x {T} x {world_size} = "
                            f"{tokens_per_micro_step:,}: change one of them")
        grad_accum_steps = config.total_batch_size // tokens_per_micro_step

        # The data, checked before a model is built.
        prepare_quick_start_data(config, master, ddp)  # --preset shakespeare tokenizes its text (settings.py)
        train_loader = TrainLoader(config.data_dir, B, T, rank, world_size, config.data_seed, device=device)
        val_loader = ValLoader(config.data_dir, B, T, config.val_tokens, rank, world_size, device)

        # The model: a new GPT of the configured shape, or one resumed, pretrained or with LoRA (section 14).
        # Should it (or training it) not fit in memory, one line says which flag to change (section 15).
        dtype = pick_dtype(config.dtype, device)
        autocast, scaler = mixed_precision(device, dtype)
        model = None
        run.on_out_of_memory = lambda: out_of_memory_advice(model or model_plan(config, checkpoint), config,
                                                            world_size, dtype, device)
        torch.manual_seed(config.seed)
        if checkpoint is None and config.init_from == "scratch":
            model = GPT(GPTConfig(block_size=config.block_size, n_layer=config.n_layer, n_head=config.n_head,
                                  n_embd=config.n_embd, vocab_pad_multiple=config.vocab_pad_multiple))
        else:
            model, config = load_model_to_train(config, checkpoint, run)
        model.to(device)
        use_memory_options(model, config, dtype, device_type)  # the chunked loss, sharding, ... (11, 15)
        optimizers = configure_optimizers(model, config, device_type)
        start_step, val_loss, acc_norm = 0, None, None
        if checkpoint is not None:
            start_step, val_loss = restore_checkpoint(checkpoint, optimizers, scaler, train_loader, device,
                                                      rank)
            checkpoint = run.checkpoint = None  # its tensors are copied: free them

        # One model, called three ways. `model` is the GPT itself (the lecture's raw_model): its weights are
        # what the optimizers update and checkpoints and samples read. torch.compile fuses its many small
        # operations into a few large kernels: `train_model` is the compiled model the optimizer step runs,
        # `eval_model` the one evaluation runs, compiled apart (compile_model says why). With several
        # processes, DDP wraps train_model: it averages the gradients of all ranks during backward.
        use_compile = resolve_compile(config.compile, device, run.say)  # auto: on for CUDA (settings.py)
        train_model, eval_model = compile_model(model) if use_compile else (model, model)
        if ddp and not is_sharded(model):  # (a sharded model, section 15, reduces its own gradients)
            train_model = DDP(train_model, device_ids=[local_rank] if device_type == "cuda" else None)
        sampling_copy = None  # and a fourth: the weights in sampling's dtype, made at the first sample

        hellaswag_examples, hellaswag_line = hellaswag_for_training(config, master, ddp, world_size)  # (13)
        run.say(describe_run(config, model, device, dtype, use_compile, world_size, grad_accum_steps,
                             train_loader, val_loader, hellaswag_line))  # the settings resolved (settings.py)
        run.start(start_step, checkpoint_bytes(model, config))  # the log starts (--overwrite: anew)
        keep_lora_base(model, run.log_dir, master, start_step)  # a new LoRA run keeps the weights it adapts
        peak_flops = config.peak_flops or peak_flops_for(device, dtype)
        flops_per_step = flops_per_token(model, T) * config.total_batch_size

        step = start_step
        for step in range(start_step, config.max_steps):
            last_step = step == config.max_steps - 1

            # once in a while: evaluate the val loss and HellaSwag
            if config.eval_interval and (step % config.eval_interval == 0 or last_step):
                with run.timed("eval"):
                    val_loss, _ = evaluate_val_loss(eval_model, val_loader, autocast, ddp, progress=master)
                    run.say(f"step {step:5d} | val loss {val_loss:.4f}")
                    run.log(step, val=f"{val_loss:.6f}")
                    if hellaswag_examples is not None:  # every rank scores its share (section 13)
                        correct, total = hellaswag_score(eval_model, hellaswag_examples, dtype, device, rank,
                                                         world_size, progress=master)
                        acc_norm = correct / total
                        run.say(f"step {step:5d} | HellaSwag acc_norm {acc_norm:.4f} ({correct}/{total})")
                        run.log(step, hella=f"{acc_norm:.4f}")

            # once in a while: show what the model writes (rank 0; a sharded model's weights gathered first)
            if config.sample_interval and step > 0 and (step % config.sample_interval == 0 or last_step):
                with run.timed("sample"):  # with the KV cache: GPT.generate's tokens, faster (section 10)
                    # The compiled decode step replays as one CUDA graph on GPUs; a CPU gains nothing from it.
                    compile_step = use_compile and device_type == "cuda"
                    texts, sampling_copy = write_samples(model, config, dtype, sampling_copy, master,
                                                         compile_step)
                    run.say("\n".join(f"sample {i}: {text!r}" for i, text in enumerate(texts)))
                    run.text(step, "samples", "\n\n".join(texts))

            # one optimizer step: grad_accum_steps micro-batches on every rank, at the scheduled learning rate
            t0 = time.time()
            lr_factor = lr_schedule(step, config)
            set_lr(optimizers, lr_factor)
            loss, grad_norm, stepped = train_step(train_model, optimizers, train_loader.next_batch,
                                                  grad_accum_steps, autocast, config.grad_clip, scaler, ddp)
            dt = time.time() - t0
            run.check_step(step, loss, grad_norm, stepped, scaler.get_scale() if scaler.is_enabled() else None)

            # log the step
            lr = config.max_lr * lr_factor  # AdamW's, for the log
            tokens_per_sec = config.total_batch_size / dt
            mfu = flops_per_step / dt / (peak_flops * world_size) if peak_flops else None
            run.say(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {grad_norm:.4f} | "
                    f"dt {1000 * dt:.1f}ms | tok/s {tokens_per_sec:,.0f} | "
                    f"MFU {f'{100 * mfu:.1f}%' if mfu else 'n/a'} | ETA {run.eta(step, dt)}")
            run.log(step, train=f"{loss:.9g}",  # 9 digits tell any two float32 losses apart
                    lr=f"{lr:.6e}", norm=f"{grad_norm:.6g}", tok_s=f"{tokens_per_sec:.0f}",
                    **({"mfu": f"{mfu:.4f}"} if mfu else {}))

            # once in a while, at the end, and when asked to stop (SIGTERM, Ctrl-C): a checkpoint
            stop_now = run.stop_requested(step)
            checkpoint_due = last_step or stop_now or (step + 1) % config.checkpoint_interval == 0
            if checkpoint_due and run.weights_are_good(step, model.parameters()):
                with run.timed("checkpoint"):
                    rng = rng_states(device, ddp)  # every rank takes part: each GPU's generator is saved
                    state = checkpoint_state(step + 1, model, optimizers, train_loader, config, val_loss,
                                             scaler, rng, master)
                    run.save_checkpoint(step + 1, state)
            if stop_now:
                break
        seconds = time.time() - run.started
        run.say(run_summary(config, model, step + 1, step + 1 - start_step, seconds, val_loss, acc_norm,
                            finished=step + 1 == config.max_steps))


# ===================================================================================================
# Part II: extensions
# ===================================================================================================

# ---------------------------------------------------------------------------------------------------
# 10. The KV cache and the compiled decode step
#
# Sampling re-runs the whole sequence for every new token, though the keys and values of the tokens
# already seen never change: the KV cache keeps them, so that a step feeds only the new token.
#
# A 124M model does little work per new token, and in eager PyTorch each step is ~200 kernel
# launches: the GPU waits for Python. generate_with_cache(compile_step=True) compiles the one-token step (fixed
# shapes, thanks to the static KV cache) and, on CUDA, captures it as a CUDA graph that replays all its
# kernels in one launch. It compiles once per batch size, and pays off over many tokens.
#
# A decode step reads every weight for a handful of tokens, so it runs on weights already in the dtype
# it computes in: decoding_copy casts them once per sampling event, where autocast would cast every
# weight (the 50,304 x 768 embedding included) on every token.


class KVCache:
    """Keys and values of every layer for the tokens already seen.

    "Static": room for block_size positions is allocated once, and a step writes its new keys/values
    into their slots. Attention reads the first `width` slots, with a mask that hides those not yet
    filled. Uncompiled, width is the number of filled slots. For a compiled step (fixed_shapes=True) it
    is rounded up to a power of two, at least 64: a few shapes for the whole generation (five for a
    1024-token block, each compiled once), and at most twice the slots needed (reading all 1,024 made
    a compiled 124M step 20% slower than eager on a CPU). The tensors are the same at every step, and
    the count of cached tokens is a tensor on the device: a Python int would be baked into the compiled
    step as a constant. Each layer has tensors of its own, which the compiled step writes in place
    (slices of one big tensor were written through copies, and the whole cache copied back each token).
    """

    def __init__(self, config: GPTConfig, batch_size: int, device="cpu", dtype=torch.float32):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)  # (B, nh, slots, hs)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.length = torch.zeros((), dtype=torch.long, device=device)  # tokens cached so far
        self.slots = torch.arange(config.block_size, device=device)  # the position each slot holds
        self.reset(fixed_shapes=True)
        for tensor in (*self.k, *self.v, self.length):  # tell torch.compile they keep their address (CUDA graphs)
            torch._dynamo.mark_static_address(tensor)

    def reset(self, fixed_shapes: bool):
        self.length.zero_()  # what the slots still hold is masked until written again
        self.fixed_shapes = fixed_shapes
        self.filled = self.width = 0  # = length, as a Python int; the slots attention reads

    def advance(self, T: int):
        """Count T more tokens on the Python side, and widen what attention reads if they need it."""
        self.filled += T
        self.width = max(64, 1 << (self.filled - 1).bit_length()) if self.fixed_shapes else self.filled
        self.width = min(self.width, self.slots.numel())

    def step(self, T: int):
        """Make room for T new tokens: (their positions (T,), the attention mask (T, slots read))."""
        if not torch.compiler.is_compiling():  # a compiled step is advanced before it runs (KVDecoder.step)
            self.advance(T)
        positions = self.length + torch.arange(T, device=self.length.device)
        mask = self.slots[None, : self.width] <= positions[:, None]  # a new token sees the cached tokens and itself
        self.length += T  # in place: the same tensor every step
        return positions, mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write this layer's new keys/values (B, nh, T, hs) into their slots; return the slots attention
        reads (B, nh, width, hs)."""
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.k[layer][:, :, : self.width], self.v[layer][:, :, : self.width]


class KVDecoder:
    """Sampling with a KV cache, for one batch size: the prompt in one pass, then one token a step,
    eager or compiled. kv_decoder() keeps the last one, so that the next generate_with_cache() of the same batch
    size replays the compiled step (and its CUDA graph) instead of capturing it again."""

    def __init__(self, model: GPT, batch_size: int, device, dtype):
        self.model, self.key = model, (batch_size, torch.device(device), dtype)
        self.cache = KVCache(model.config, batch_size, device, dtype)  # dtype: what the model computes in
        self.compiled_step = None

    def prefill(self, idx, fixed_shapes: bool):
        """Empty the cache, then read the prompt (B, T) in one pass: the logits of its last position."""
        self.cache.reset(fixed_shapes)
        return forward_with_cache(self.model, idx, self.cache)

    def step(self, token, compiled: bool):
        """One new token per row, after the cached ones: (B, 1) -> logits of the next token (B, 1, vocab)."""
        if not compiled:
            return self.eager_step(token)
        if self.compiled_step is None:
            mode = "reduce-overhead" if self.cache.length.is_cuda else None  # reduce-overhead = CUDA graphs
            self.compiled_step = torch.compile(self.eager_step, mode=mode, fullgraph=True)
        self.cache.advance(1)  # outside the graph, which sees only the width (and recompiles when it doubles)
        torch.compiler.cudagraph_mark_step_begin()  # the last step's logits have been read: reuse their memory
        return self.compiled_step(token)

    def eager_step(self, token):
        return forward_with_cache(self.model, token, self.cache)


def forward_with_cache(model: GPT, idx, cache: KVCache, last_only=True):
    """GPT.forward for tokens idx (B, T) that come after the cached ones: their keys and values join the
    cache, and attention reads the cached ones too. Returns the logits of the last position (B, 1, vocab)
    (last_only=False: of every position), the only ones sampling reads."""
    positions, mask = cache.step(idx.size(1))  # the caller keeps the cached tokens + T within block_size
    x = model.transformer.wte(idx) + model.transformer.wpe(positions)
    for layer, block in enumerate(model.transformer.h):
        x = x + attention_with_cache(block.attn, block.ln_1(x), cache, layer, positions, mask)
        x = x + block.mlp(block.ln_2(x))
    x = model.transformer.ln_f(x)
    if last_only:  # the vocab projection is the largest matmul: skip it where nobody reads it
        x = x[:, -1:, :]
    return model.lm_head(x)[..., : model.config.vocab_size]


def attention_with_cache(attn: CausalSelfAttention, x, cache: KVCache, layer: int, positions, mask):
    """CausalSelfAttention.forward, for tokens after the cached ones: the same heads, but their keys and
    values are written into the cache, and the queries read every filled slot (the mask hides the rest)."""
    B, T, C = x.size()
    q, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)
    q = q.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
    v = v.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
    k, v = cache.update(layer, k, v, positions)  # the cached slots (B, nh, width, hs)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # the mask hides slots after each token
    return attn.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


@torch.no_grad()
def generate_with_cache(model: GPT, idx, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None,
                        generator=None, stop_at_eot=False, compile_step=False, progress=False):
    """GPT.generate with the KV cache: the same tokens, the prompt in one pass, then one new token per
    step. compile_step: the compiled decode step (a CUDA graph on GPUs), for long or repeated sampling."""
    B, T = idx.shape
    block_size = model.config.block_size
    tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # all written in place
    tokens[:, :T] = idx
    decoder = kv_decoder(model, B, idx.device)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    n = T  # tokens so far
    logits = decoder.prefill(idx[:, -block_size:], fixed_shapes=compile_step)
    for i in progress_bar(range(max_new_tokens), progress, "sampling", unit="tok"):
        next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
        if stop_at_eot:
            next_token = torch.where(finished[:, None], EOT_TOKEN, next_token)
            finished |= next_token[:, 0] == EOT_TOKEN
        tokens[:, n] = next_token[:, 0]
        n += 1
        if i == max_new_tokens - 1 or (stop_at_eot and finished.all()):
            break
        if n <= block_size:  # the new token's position n - 1 has a slot
            logits = decoder.step(next_token, compiled=compile_step)
        else:
            # The context outgrew the block: run the last block_size tokens again. (A sliding KV cache
            # cannot do this: GPT-2's positions are learned embeddings, and every token of the cropped
            # window moves to a new position, so its keys and values change.)
            logits, _ = model(tokens[:, n - block_size : n])
    return tokens[:, :n]


def kv_decoder(model: GPT, batch_size: int, device) -> KVDecoder:
    """The model's KV cache and decode step, in the dtype it computes in (autocast's if it is on); the
    last one is kept with the model and reused for the same batch size."""
    device_type = torch.device(device).type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else model.lm_head.weight.dtype
    key = (batch_size, torch.device(device), dtype)
    if getattr(model, "kv_decoder", None) is None or model.kv_decoder.key != key:
        model.kv_decoder = KVDecoder(model, *key)
    return model.kv_decoder


def decoding_copy(model: GPT, dtype: torch.dtype, previous: GPT | None = None, state: dict | None = None) -> GPT:
    """The model with its weights in `dtype`, the dtype sampling computes in (bfloat16 on GPUs that
    have it): the model itself if they already are, else a copy. `previous`, the copy made at the last
    sampling event, is refreshed in place, so that its compiled decode step is reused. state: the
    weights to copy, if not model.state_dict() (a sharded model's, gathered)."""
    weight = model.lm_head.weight
    if weight.dtype == dtype and state is None:
        return model
    if previous is None:
        with torch.device(weight.device):  # built where it runs, then cast: once per run
            previous = GPT(model.config)
        lora = lora_settings(model)
        if lora:
            add_lora(previous, lora["rank"], lora["alpha"], lora["targets"], lora["also_train"])
        previous = previous.to(dtype).eval()
    previous.load_state_dict(model.state_dict() if state is None else state)  # copy_ casts each weight
    return previous


def encode_prompt(text: str) -> list[int]:
    """A prompt's tokens. "<|endoftext|>" in it is the special token (a document boundary), and an empty
    prompt is that token alone: a model starts a document from it."""
    return get_tokenizer().encode(text, allowed_special={"<|endoftext|>"}) or [EOT_TOKEN]


def write_samples(model: GPT, config: TrainConfig, dtype: torch.dtype, sampling_copy: GPT | None = None,
                  master: bool = True, compile_step: bool = False) -> tuple[list[str], GPT]:
    """config.num_samples continuations of config.sample_prompt (top-k 50, a seed of their own: the
    training RNG stays untouched), and the copy of the model in `dtype` that wrote them to pass back
    next time. Rank 0 samples; the others only help gather a sharded model's weights."""
    state = gathered(model.state_dict(), keep=master) if is_sharded(model) else None
    if not master:
        return [], sampling_copy
    sampling_copy = decoding_copy(model, dtype, sampling_copy, state)
    device = model.lm_head.weight.device
    prompt = torch.tensor([encode_prompt(config.sample_prompt)] * config.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(42)
    samples = generate_with_cache(sampling_copy, prompt, config.sample_tokens, top_k=50, generator=generator,
                                  compile_step=compile_step, progress=True)
    return [get_tokenizer().decode(row) for row in samples.tolist()], sampling_copy


# ---------------------------------------------------------------------------------------------------
# 11. The memory-saving loss
#
# The logits are the largest tensor of training: 64 x 1024 positions x 50,304 tokens is 6.6 GB in bf16,
# and their gradient as much again. --loss chunked (use_chunked_loss) computes the classifier and
# the loss a chunk of rows at a time with PyTorch's F.linear_cross_entropy (torch 2.13+), which also
# computes each chunk's gradient right away, so that a chunk's logits live only while it is processed:
# the same loss and gradients as the plain F.cross_entropy of section 2 (the tests hold it to that),
# for memory-bound runs such as fine-tuning a larger GPT-2 on a small GPU. On a GPU, torch.compile
# fuses the plain loss well, so the plain loss is the default there; on a CPU, whose matmuls are slow,
# the chunked one is faster too (docs/performance.md), and the default.


LOSS_CHUNK_ROWS = 1024  # 1024 x 50,304 fp32 logits: 206 MB at a time


def chunked_cross_entropy(x, weight, targets, chunk_rows: int):
    """F.cross_entropy(x @ weight.T, targets), chunk_rows rows at a time. x (rows, C), weight (vocab, C).
    Older torch, without F.linear_cross_entropy: the plain loss."""
    if not hasattr(F, "linear_cross_entropy"):
        return F.cross_entropy(F.linear(x, weight).float(), targets)
    # allow_retain_graph: torch.compile needs it, and would set it with a warning
    options = torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=chunk_rows,
                                                 allow_retain_graph=torch.compiler.is_compiling())
    # In float32 (TF32 matmuls on GPUs), also under autocast: given bf16 inputs it would return a bf16
    # loss, 10.875 for 10.854, too coarse to log.
    with torch.autocast(x.device.type, enabled=False):
        return F.linear_cross_entropy(x.float(), weight.float(), targets, options=options)


def use_chunked_loss(model: GPT, chunk_rows: int = LOSS_CHUNK_ROWS) -> None:
    """From now on, model(idx, targets) computes its loss with chunked_cross_entropy, chunk_rows rows at
    a time (the model's own forward still gives the logits, without targets)."""
    model.loss_chunk_rows = chunk_rows  # for what a run prints and its memory estimate (settings.py)
    model.forward = functools.partial(forward_with_chunked_loss, model, chunk_rows=chunk_rows)


def forward_with_chunked_loss(model: GPT, idx, targets=None, chunk_rows: int = LOSS_CHUNK_ROWS):
    """GPT.forward, with the memory-saving loss: the blocks as there, then chunked_cross_entropy on the
    last hidden states. Returns (None, loss): the logits are never whole."""
    if targets is None:
        return GPT.forward(model, idx)
    B, T = idx.size()
    if T > model.config.block_size:
        raise ValueError(f"sequence of {T} tokens is longer than block_size {model.config.block_size}")
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(T, device=idx.device))
    for block in model.transformer.h:
        x = block(x)
    x = model.transformer.ln_f(x).reshape(B * T, -1)
    weight = model.lm_head.weight[: model.config.vocab_size]  # the real vocab's rows, as in GPT.forward
    return None, chunked_cross_entropy(x, weight, targets.reshape(B * T), chunk_rows)


# ---------------------------------------------------------------------------------------------------
# 12. LoRA: fine-tuning a few parameters
#
# Fine-tuning every weight needs, per weight, its gradient and AdamW's two moments: four copies of the
# model before a single activation, 2 GB for GPT-2 124M and 25 GB for GPT-2 XL. LoRA (Hu et al., 2021)
# freezes the pretrained weights and learns, beside a weight matrix W (out x in), a low-rank update
# B @ A, with A (r x in) and B (out x r) for a small rank r:
#
#     y = x W^T + b + (alpha / r) * x A^T B^T
#
# With r = 8 on the four matrices of every block, GPT-2 124M trains 1.2M parameters (1%), and only they
# have gradients and optimizer moments. Three details make it work:
#  - B starts at zero, so the update starts at zero: step 0 is exactly the pretrained model. A starts
#    random, because the gradient of B goes through A (and A's through B): were both zero, neither
#    would ever move.
#  - alpha / r scales the update, so that a change of r keeps roughly the same step size: tune the
#    learning rate once, then try ranks.
#  - After training, W + (alpha / r) B A is one ordinary matrix. Merging gives back a plain GPT-2 of the
#    same shapes and speed, which exports to Hugging Face like any other; a checkpoint stores only A
#    and B, and where the pretrained weights come from. LORA_TARGETS (settings.py) names the matrices.


@dataclass
class LoRASettings:
    lora_rank: int = setting(0, "rank of the LoRA adapters (0 = no LoRA: every weight trains)", rule="non_negative")
    lora_alpha: float = setting(16.0, "LoRA's update is scaled by lora_alpha / lora_rank", rule="positive_number")
    lora_targets: str = setting(",".join(LORA_TARGETS), "the matrices of each block that get adapters "
                                "(comma-separated)")
    lora_also_train: str = setting("", "with LoRA, also train the parameters whose names contain one of these "
                                   "(e.g. ln_,bias)")


class LoRALinear(nn.Module):
    """A frozen nn.Linear (the same weight and bias tensors) plus a trainable low-rank update."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # state-dict names stay those of the layer
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, **factory))  # zero: starts as W
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as LoRA's authors did
        self.scale = alpha / rank

    def forward(self, x):
        # Through A first: (B, T, in) -> (B, T, r) -> (B, T, out) costs r * (in + out) per token, never in * out.
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale

    def merged(self) -> nn.Linear:
        """An ordinary nn.Linear computing the same function: W + (alpha / r) B A."""
        out_features, in_features = self.weight.shape
        linear = nn.Linear(in_features, out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter((self.weight + self.scale * self.lora_B @ self.lora_A).detach())
        linear.bias = nn.Parameter(self.bias.detach()) if self.bias is not None else None
        return linear


def lora_settings(model: GPT) -> dict | None:
    """The settings of the model's LoRA adapters (rank, alpha, targets, ..., where its weights come from),
    which build_model or model_from_checkpoint records as model.lora; None for a model without."""
    return getattr(model, "lora", None)


def add_lora(model: GPT, rank: int, alpha: float, targets=LORA_TARGETS, also_train=()) -> GPT:
    """Freeze the model and give the `targets` matrices of every block a LoRA adapter (in place).
    Parameters whose names contain one of `also_train` (e.g. "ln_", "bias") keep training too."""
    for name, param in model.named_parameters():
        param.requires_grad_(any(fragment in name for fragment in also_train))
    for block in model.transformer.h:
        for target in targets:
            parent_name, layer_name = target.split(".")
            parent = getattr(block, parent_name)
            layer = getattr(parent, layer_name)
            if not 1 <= rank <= min(layer.in_features, layer.out_features):
                raise UserError(f"--lora_rank {rank} must be between 1 and the smaller side of {target} "
                                f"({layer.out_features} x {layer.in_features})")
            setattr(parent, layer_name, LoRALinear(layer, rank, alpha))
    return model


LORA_BASE_FILE = "lora_base.pt"  # a LoRA run's copy of the weights it adapts, in its own folder


def keep_lora_base(model: GPT, folder: Path, master: bool, start_step: int) -> None:
    """A new LoRA run's copy of the weights it adapts (all but the adapters, before the first step) in
    its own folder, as a checkpoint: its checkpoints name it, so that it stays usable whatever becomes of
    the original (a base checkpoint rotated out, a folder deleted). A GPT-2 name is not copied: it can be
    downloaded again. Every rank calls it (a sharded model's weights are gathered); rank 0 writes."""
    lora = lora_settings(model)
    if not lora or start_step > 0 or lora["base"] != LORA_BASE_FILE:
        return
    state = gathered({name: value for name, value in model.state_dict().items() if ".lora_" not in name}, master)
    base = dict(model=state, model_config=asdict(model.config), lora=None, source=lora["source"])
    rank0_decides(dist.is_initialized(), master, lambda: save_checkpoint_file(base, Path(folder) / LORA_BASE_FILE))


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its weight (in place): a plain GPT again, every parameter trainable."""
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, layer in list(parent.named_children()):
                if isinstance(layer, LoRALinear):
                    setattr(parent, name, layer.merged())
    for param in model.parameters():
        param.requires_grad_(True)
    model.lora = None
    return model


# ---------------------------------------------------------------------------------------------------
# 13. HellaSwag: does the model pick the sensible ending?
#
# HellaSwag (Zellers et al., 2019): each of 10,042 validation examples is a context and four endings,
# one of them right,
#
#     "A man is sitting on a roof. he"  ->  "is using wrap to wrap a pair of skis."
#                                           "is ripping level tiles off."
#                                           "is holding a rubik's cube."
#                                           "starts pulling up roofing on a roof."   (label 3)
#
# The model scores each ending as a completion of the context, never seeing the four side by side: the
# cross-entropy of the ending's tokens. acc picks the ending with the lowest total loss, acc_norm the
# lowest loss per token (a long ending is not penalised for being long). This is the completion style
# of build-nanogpt, in which GPT-2 124M scores acc_norm 0.2955; lm-evaluation-harness's `hellaswag`
# task normalises by bytes instead, so its numbers are not comparable. The training loop scores the
# model every eval_interval; hellaswag.py scores any model on its own.

@dataclass
class HellaSwagSettings:
    hellaswag: bool = setting(True, "evaluate HellaSwag every eval_interval (needs hellaswag.py's data)")
    hellaswag_data: str = setting("", "path of hellaswag_val.jsonl (default: $HELLASWAG_DATA, else download)")
    hellaswag_limit: int = setting(0, "evaluate only the first N HellaSwag examples (0 = all 10,042)",
                                   rule="non_negative")


HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_DATA_ENV = "HELLASWAG_DATA"  # a local copy of hellaswag_val.jsonl, when no path is given
HELLASWAG_CACHE_DIR = Path(__file__).resolve().parent / "hellaswag_cache"  # where the download is kept
NUM_ENDINGS = 4


def find_hellaswag_data(data: str | None = None, cache_dir=HELLASWAG_CACHE_DIR) -> Path:
    """The validation file: `data` if given, else $HELLASWAG_DATA, else the download in cache_dir."""
    cached = Path(cache_dir) / "hellaswag_val.jsonl"
    return find_data_file("HellaSwag", data, HELLASWAG_DATA_ENV, HELLASWAG_URL, cached)


@dataclass
class HellaSwagExample:
    context: list[int]  # tokens of the context
    endings: list[list[int]]  # tokens of " " + each ending: GPT-2's tokens carry the space before a word
    label: int  # index of the right ending


def load_hellaswag(path, limit: int | None = None) -> list[HellaSwagExample]:
    """The first `limit` examples of a HellaSwag .jsonl file (all of them by default), tokenized (the
    whole val set in about half a second). A malformed line is named in one UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"HellaSwag data file {path} does not exist")
    examples, encode = [], get_tokenizer().encode
    for line_number, line in utf8_lines(path):  # a bad byte is reported with its line
        if limit is not None and len(examples) >= limit:
            break
        if line.strip():  # tolerate blank lines (a trailing newline, a hand-edited file)
            where = f"{path} line {line_number}"
            context, endings, label = parse_hellaswag_line(line, where, NUM_ENDINGS)  # checked (settings.py)
            examples.append(HellaSwagExample(encode(context), [encode(" " + ending) for ending in endings], label))
    if not examples:
        raise UserError(f"{path} holds no HellaSwag examples")
    return examples


# Many examples per forward pass. Each example becomes four rows, context + ending; a batch holds
# 4 * batch_size rows, right-padded to a common length. Right padding never changes a score: attention
# is causal, so a token never sees the padding after it, and only the ending's tokens are scored. The
# length is rounded up to a multiple of pad_to_multiple and the last batch is filled with empty rows, so
# a compiled model meets only a handful of shapes (10 for the whole val set). Rows are sorted longest
# first: little of a batch is padding, a batch too big for memory fails at once, and the last, partial
# batch costs least.


@dataclass
class Batch:
    tokens: torch.Tensor  # (4 * batch_size, T) context + ending, right-padded with <|endoftext|>
    scored: torch.Tensor  # (4 * batch_size, T) bool: True on the ending's tokens, whose loss counts
    rows: list[int]  # which rows these are (row 4 * i + j: example i, ending j); the rest is padding


def make_batches(examples, batch_size: int, block_size: int | None, pad_to_multiple=16, sort_by_length=True):
    """Batches covering each row of each example once. A row longer than block_size loses context from
    the left, never the ending. batch_size=1, pad_to_multiple=1, sort_by_length=False is the plain loop
    of one example per forward pass."""
    rows = []  # (tokens, how many of them are the ending's: a row's first token is predicted by nothing)
    for example in examples:
        for ending in example.endings:
            row = (example.context + ending)[-block_size:] if block_size else example.context + ending
            rows.append((row, min(len(ending), len(row) - 1)))
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0])) if sort_by_length else list(range(len(rows)))
    rows_per_batch = NUM_ENDINGS * batch_size
    for start in range(0, len(order), rows_per_batch):
        batch_rows = order[start : start + rows_per_batch]
        length = math.ceil(max(len(rows[r][0]) for r in batch_rows) / pad_to_multiple) * pad_to_multiple
        length = min(length, block_size or length)
        tokens = torch.full((rows_per_batch, length), EOT_TOKEN, dtype=torch.long)
        scored = torch.zeros((rows_per_batch, length), dtype=torch.bool)
        for slot, r in enumerate(batch_rows):
            row, n_scored = rows[r]
            tokens[slot, : len(row)] = torch.tensor(row)
            scored[slot, len(row) - n_scored : len(row)] = True
        yield Batch(tokens, scored, batch_rows)


@torch.no_grad()
def hellaswag_losses(model, examples, device, batch_size=16, autocast_dtype=None, pad_to_multiple=16,
                     sort_by_length=True, progress=False, min_batches=0):
    """Each ending's loss, summed over its tokens and per token: two (len(examples), 4) CPU tensors.
    model maps tokens (B, T) to logits: our GPT (compiled or not) or a Hugging Face GPT2LMHeadModel.
    min_batches: forward passes to run at least (empty batches after the examples', scored nothing)."""
    config = model.config  # (a compiled module passes attribute lookups through)
    block_size = getattr(config, "block_size", None) or getattr(config, "n_positions", None)
    sum_losses = torch.zeros(len(examples) * NUM_ENDINGS, device=device)  # row 4 * i + j: example i, ending j
    mean_losses = torch.zeros(len(examples) * NUM_ENDINGS, device=device)
    batches = make_batches(examples, batch_size, block_size, pad_to_multiple, sort_by_length)
    shape = (NUM_ENDINGS * batch_size, min(pad_to_multiple, block_size or pad_to_multiple))
    empty = Batch(torch.full(shape, EOT_TOKEN), torch.zeros(shape, dtype=torch.bool), rows=[])
    batches = itertools.chain(batches, [empty] * max(0, min_batches - math.ceil(len(examples) / batch_size)))
    for batch in progress_bar(batches, progress, "HellaSwag", total=math.ceil(len(examples) / batch_size)):
        tokens, scored = batch.tokens.to(device), batch.scored.to(device)
        with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            output = model(tokens)
        logits = output[0] if isinstance(output, tuple) else output.logits  # ours: (logits, loss); HF's: .logits
        # The logits at position t predict the token at t + 1. Cross-entropy on the scored positions
        # only: a fraction of all the logits, and always in fp32.
        logits, targets, scored = logits[:, :-1], tokens[:, 1:], scored[:, 1:]
        token_losses = torch.zeros(scored.shape, device=device)  # (rows, T - 1), zero where not scored
        token_losses[scored] = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
        rows = torch.tensor(batch.rows, dtype=torch.long, device=device)  # the rows after len(rows) are padding
        sum_losses[rows] = token_losses.sum(dim=1)[: len(rows)]
        mean_losses[rows] = (token_losses.sum(dim=1) / scored.sum(dim=1).clamp(min=1))[: len(rows)]
    # One device -> host copy, at the end: no waiting for the GPU after every batch.
    return sum_losses.view(-1, NUM_ENDINGS).cpu(), mean_losses.view(-1, NUM_ENDINGS).cpu()


def hellaswag_counts(model, examples, device, batch_size=16, rank=0, world_size=1, autocast_dtype=None,
                     pad_to_multiple=16, sort_by_length=True, progress=False) -> dict:
    """Score this rank's share of `examples` (every world_size-th, from the rank-th): dict(correct,
    correct_norm, total); acc = correct / total, acc_norm = correct_norm / total. Ranks run different
    numbers of forward passes: pass the model itself (compiled or not), not its DDP wrapper.
    pad_to_multiple: 16 gives a compiled model few shapes; an eager one may use 1 (no wasted tokens)."""
    share = examples[rank::world_size]
    # A sharded model's forward is a collective (section 15): every rank runs as many as the busiest.
    min_batches = math.ceil(math.ceil(len(examples) / world_size) / batch_size) if is_sharded(model) else 0
    sum_losses, mean_losses = hellaswag_losses(model, share, device, batch_size, autocast_dtype, pad_to_multiple,
                                               sort_by_length, progress, min_batches)
    labels = torch.tensor([example.label for example in share], dtype=torch.long)
    return dict(correct=int((sum_losses.argmin(dim=1) == labels).sum()),
                correct_norm=int((mean_losses.argmin(dim=1) == labels).sum()), total=len(share))


def hellaswag_counts_all_ranks(model, examples, device, rank=0, world_size=1, **kwargs) -> dict:
    """hellaswag_counts over all ranks: each scores its share, then the counts are summed (all-reduce)."""
    counts = hellaswag_counts(model, examples, device, rank=rank, world_size=world_size, **kwargs)
    if world_size > 1:
        summed = torch.tensor([counts["correct"], counts["correct_norm"], counts["total"]], device=device)
        dist.all_reduce(summed)  # SUM
        counts = dict(zip(("correct", "correct_norm", "total"), summed.tolist()))
    return counts


def hellaswag_score(model, examples, dtype: torch.dtype, device: str, rank: int, world_size: int,
                    progress=False) -> tuple[int, int]:
    """(correct by acc_norm, examples) of the training loop's evaluation, all ranks together. Every rank
    scores its share through the model itself, not DDP's wrapper: ranks run different numbers of batches."""
    counts = hellaswag_counts_all_ranks(model, examples, device, rank, world_size, progress=progress,
                                        autocast_dtype=None if dtype == torch.float32 else dtype)
    return counts["correct_norm"], counts["total"]


def hellaswag_for_training(config, master: bool, ddp: bool, world_size: int) -> tuple[list | None, str]:
    """The examples the training loop scores (None if it scores none), and a line saying so. Rank 0
    downloads the val set if it must (now, not at step 250) while the others wait; then every rank reads it."""
    if not (config.hellaswag and config.eval_interval):
        return None, ""
    rank0_decides(ddp, master, lambda: find_hellaswag_data(config.hellaswag_data or None))  # the others wait
    path = find_hellaswag_data(config.hellaswag_data or None)
    examples = load_hellaswag(path, config.hellaswag_limit or None)
    return examples, f"HellaSwag: {len(examples):,} examples from {path}, split across {world_size} rank(s)"


# ---------------------------------------------------------------------------------------------------
# 14. Loading any model, and exporting ours to Hugging Face
#
# Every tool here (training with --init_from, sample.py, hellaswag.py, validate.py, the notebooks)
# takes the same kind of model reference: a GPT-2 name, a Hugging Face directory, a checkpoint file
# written by this script, or a run folder (its newest checkpoint). save_hf writes any of them as a
# Hugging Face GPT-2, the way from_pretrained (section 3) reads one.


def model_from_checkpoint(checkpoint: dict, source: str = "checkpoint", merge: bool = True, folder=None) -> GPT:
    """The model a checkpoint holds. A LoRA checkpoint holds only the adapters (and what else trained):
    the pretrained model it adapted is loaded again (from the run folder's copy of it, LORA_BASE_FILE,
    which `folder` holds, or for a GPT-2 name from the hub), and the adapters are merged into it
    (merge=False keeps them separate, to resume training)."""
    config = check_model_config(checkpoint["model_config"], GPTConfig, source)
    lora = checkpoint.get("lora")
    if lora is None:
        model = GPT(config)
        load_state_dict_checked(model, checkpoint["model"], source, padded=VOCAB_ROWS)
        return model
    base = lora["base"]
    if not Path(base).is_absolute() and base.endswith(".pt"):  # the run folder's own copy
        base = str(Path(folder or ".") / base)
    try:
        model = load_pretrained(base, config.vocab_pad_multiple)
    except UserError as e:
        raise UserError(f"{source} holds LoRA adapters for {base}, which does not load: {e}") from e
    if asdict(model.config) != asdict(config) or weights_fingerprint(model) != lora["base_fingerprint"]:
        raise UserError(f"{source} holds LoRA adapters for another model than the one now at {base}")
    add_lora(model, lora["rank"], lora["alpha"], lora["targets"], lora["also_train"])
    model.lora = lora
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(checkpoint["model"]):
        raise UserError(f"{source}: its LoRA tensors do not match its LoRA settings")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(checkpoint["model"][name])
    return merge_lora(model) if merge else model


def load_pretrained(reference: str, vocab_pad_multiple: int = 1) -> GPT:
    """The model a reference names, on the CPU: a GPT-2 name (gpt2, gpt2-medium, ...) or a Hugging Face
    directory (its vocab padded to vocab_pad_multiple), a checkpoint file, or a run folder (its newest
    checkpoint). model.source says what was loaded, for the user."""
    path = Path(resolve_reference(reference))
    if path.is_file() or path.suffix == ".pt":
        checkpoint = load_checkpoint(path)
        model = model_from_checkpoint(checkpoint, source=str(path), folder=path.parent)
        lora = checkpoint.get("lora")
        merged = f", LoRA rank {lora['rank']} on {lora.get('source', lora['base'])}, merged" if lora else ""
        model.source = f"{path} (step {checkpoint.get('step', '?')}{merged})"
    else:
        model = GPT.from_pretrained(str(reference), vocab_pad_multiple)
        model.source = str(reference)
    return model


def load_model(init_from: str, device: str = "cpu") -> GPT:
    """load_pretrained(init_from), on `device`, in eval mode: for sampling and evaluation."""
    return load_pretrained(init_from).to(device).eval()


def to_hf(model: GPT):
    """The model as a transformers.GPT2LMHeadModel carrying the same weights (padded rows dropped)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                           n_head=c.n_head, activation_function="gelu_new",  # HF's name for GELU(tanh)
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # we train without dropout
                           layer_norm_epsilon=1e-5, bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN,
                           tie_word_embeddings=True)
    hf_model = GPT2LMHeadModel(hf_config)
    hf_state = {}
    for key, value in model.state_dict().items():
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        if key in VOCAB_ROWS:
            value = value[: c.vocab_size]  # drop the padding rows
        hf_state[key] = value.detach().float().contiguous()
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    assert not missing and not unexpected, f"export mismatch: missing {missing}, unexpected {unexpected}"
    hf_model.tie_weights()
    return hf_model.eval()


def save_hf(model: GPT, out_dir) -> None:
    """Write a Hugging Face GPT-2 directory (weights, config, tokenizer): it loads with
    GPT2LMHeadModel.from_pretrained(out_dir), in pipelines and in lm-evaluation-harness."""
    with folder_written_whole(out_dir, 4 * model.num_params(), "Hugging Face folder") as folder:  # all or nothing
        with quiet_transformers():
            to_hf(model).save_pretrained(folder)
        # GPT-2's tokenizer in Hugging Face's file format (vocab.json + merges.txt), from the vendored
        # copies of OpenAI's files: AutoTokenizer.from_pretrained(out_dir) then needs no download.
        shutil.copyfile(DATA_DIR / "encoder.json", folder / "vocab.json")
        shutil.copyfile(DATA_DIR / "vocab.bpe", folder / "merges.txt")
        tokenizer_config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": model.config.block_size,
            **{k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")},
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def load_model_to_train(config, checkpoint: dict | None, run: Run):
    """(model, config) of a run that does not start from a new GPT: the model of the checkpoint it resumes,
    or --init_from's (with LoRA adapters if asked), and the run's settings, which record a pretrained
    model's own shape in place of the shape flags' defaults (train_config.json says what ran)."""
    model = build_model(config, checkpoint, run.resume_from)
    if config.init_from != "scratch":
        shape = {name: getattr(model.config, name) for name in SHAPE_SETTINGS}
        config = run.config = dataclasses.replace(config, **shape)
    return model, config


def build_model(config, checkpoint: dict | None, resumed_from: Path | None = None) -> GPT:
    """The model to train: the resumed checkpoint's, or a pretrained model (a GPT-2 name, an HF dir, a
    checkpoint or a run folder), with LoRA adapters if asked."""
    if checkpoint is not None:  # resuming: the architecture (and LoRA adapters) come from the checkpoint
        model = model_from_checkpoint(checkpoint, source=f"{resumed_from}", merge=False,
                                      folder=Path(config.log_dir))
        model.source = f"{resumed_from} (step {checkpoint['step']})"
        return model
    # A run folder means its newest checkpoint *now*: a LoRA run records that file, not the folder.
    reference = resolve_reference(config.init_from)
    model = load_pretrained(reference, config.vocab_pad_multiple)
    if config.lora_rank:
        # A local base is kept as a copy in the run folder (keep_lora_base), so that the fine-tune stays
        # usable whatever becomes of the original; a GPT-2 name is downloaded again when needed.
        base = dict(base=reference, source=reference, base_fingerprint=weights_fingerprint(model))
        if Path(reference).exists():
            base.update(base=LORA_BASE_FILE, source=str(Path(reference).resolve()))
        targets, also_train = split_list(config.lora_targets), split_list(config.lora_also_train)
        check_also_train(also_train, [name for name, _ in model.named_parameters()])
        add_lora(model, config.lora_rank, config.lora_alpha, targets, also_train)
        model.lora = dict(rank=config.lora_rank, alpha=config.lora_alpha, targets=targets, also_train=also_train,
                          **base)
    if config.block_size > model.config.block_size:
        raise UserError(f"--block_size {config.block_size} is larger than the model's block_size "
                        f"{model.config.block_size}")
    return model


# ---------------------------------------------------------------------------------------------------
# 15. Bigger models: sharding and activation checkpointing
#
# With DDP every GPU holds the whole model and its training state: AdamW keeps 16 bytes per parameter
# (fp32 weights, gradients, two moments), 25 GB for GPT-2 XL before a single activation. --shard uses
# PyTorch's FSDP2 (fully_shard): each of N GPUs keeps 1/N of every weight, gradient and optimizer state,
# gathers a block's weights just before the block runs (in forward and again in backward) and frees
# them after. Every block is a unit of its own, then the root (embeddings, final LayerNorm and the tied
# classifier); weights are gathered in bf16 and the fp32 copy stays the master, as under autocast.
# --activation_checkpointing keeps only each block's input during the forward pass and recomputes the
# rest in backward: about 1/16 of a block's activations, for about a third more compute.
#
# A sharded run's checkpoint is gathered to full tensors as it is saved, so that it is the same file as
# any other run's: sample.py, hellaswag.py, validate.py, save_hf and --init_from read it as it is, and
# --resume continues it sharded or not, on any number of GPUs. (torch.distributed.checkpoint writes
# each rank's shards in parallel instead: faster for models far beyond GPT-2's sizes, but every reader
# of a checkpoint would need a conversion first.)


@dataclass
class MemorySettings:
    loss: str = setting("auto", "plain: every logit, then F.cross_entropy; chunked: a chunk of rows at a time, "
                        "less memory (section 11); auto: chunked on CPUs, where it is faster too",
                        choices=("auto", "plain", "chunked"))
    shard: bool = setting(False, "shard weights, gradients and optimizer state across the GPUs with FSDP2 (section "
                          "15), for models whose training state does not fit one GPU")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in backward instead of "
                                             "keeping them (section 15): less memory, ~1/3 more compute")


def use_memory_options(model: GPT, config, dtype: torch.dtype, device_type: str) -> None:
    """The options that trade speed or simplicity for memory, as the settings ask: the chunked loss
    (section 11; by default on CPUs, where it is faster too), activation checkpointing, sharding."""
    chunked_by_default = device_type == "cpu" and hasattr(F, "linear_cross_entropy")
    if config.loss == "chunked" or (config.loss == "auto" and chunked_by_default):
        use_chunked_loss(model)
    if config.activation_checkpointing:
        checkpoint_activations(model)
    if config.shard:  # each rank keeps 1/world_size of the weights and their training state
        shard_model(model, dtype)


def model_plan(config, checkpoint: dict | None = None) -> GPT:
    """The model a run will train, on the meta device (its shapes, no memory): what the out-of-memory
    advice reasons about when building the model itself runs out."""
    shape = dict(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, block_size=config.block_size)
    if checkpoint is not None:
        shape = {name: checkpoint["model_config"][name] for name in shape}
    elif config.init_from != "scratch":
        shape.update(pretrained_shape(config.init_from) or {})
    with torch.device("meta"):
        model = GPT(GPTConfig(**shape, vocab_pad_multiple=config.vocab_pad_multiple))
        if config.lora_rank:
            add_lora(model, config.lora_rank, config.lora_alpha, split_list(config.lora_targets))
    return model


def checkpoint_activations(model: GPT) -> None:
    """From now on, each block keeps only its input for backward and recomputes the rest there."""
    for block in model.transformer.h:
        block.forward = functools.partial(recompute_in_backward, block.forward)


def recompute_in_backward(forward, x):
    """forward(x), its activations recomputed in backward instead of kept (with gradients on)."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False)
    return forward(x)


def shard_model(model: GPT, dtype: torch.dtype) -> None:
    """FSDP2, in place: each block a unit, then the root. Call before the optimizers are made: they then
    hold this rank's shards only."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    gathered_dtype = None if dtype == torch.float32 else dtype  # the dtype weights are gathered (and computed) in
    policy = MixedPrecisionPolicy(param_dtype=gathered_dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


# ---------------------------------------------------------------------------------------------------
# 16. A faster recipe: Muon and a warmup-stable-decay schedule
#
# --optimizer muon changes how the weight matrices inside the blocks learn; --schedule wsd, how the
# learning rate moves over the run. Together they are the fast recipe (--preset fast, and the quick
# start), which reaches GPT-2's loss in fewer steps than GPT-3's AdamW with a cosine (docs/recipes.md).
#
# Muon (Jordan et al., 2024) is SGD with Nesterov momentum whose update, for each weight matrix, is
# orthogonalised: a few Newton-Schulz iterations turn the momentum M = U S V^T into U V^T, every singular
# value set to 1. Adam's update of a matrix is dominated by a few directions; this one moves every
# direction the gradient points to by the same amount, which is what the hidden matrices of a transformer
# need and why it trains them in fewer tokens. It is a rule for matrices only: the embeddings (one row per
# token, rarely seen), biases and LayerNorm gains stay with AdamW.
#
# WSD (warmup-stable-decay) holds the peak learning rate after the warmup, then decays it linearly over
# the last decay_frac of the steps. A checkpoint from the constant phase can be trained longer (a larger
# --max_steps on --resume) or cooled down early with a short decay, without starting over.


@dataclass
class MuonSettings:
    optimizer: str = setting("adamw", "adamw: AdamW for every weight (GPT-3's recipe); muon: Muon for the matrices "
                             "inside the blocks, AdamW for the rest", choices=("adamw", "muon"))
    muon_lr: float = setting(0.02, "peak learning rate of Muon (--optimizer muon)", rule="positive_number")
    muon_momentum: float = setting(0.95, "Muon's momentum (Nesterov)", rule="beta")
    muon_weight_decay: float = setting(0.0, "Muon's decoupled weight decay", rule="non_negative_number")
    muon_adjust_lr: str = setting("original", "how Muon scales muon_lr by a matrix's shape (torch.optim.Muon's "
                                  "adjust_lr_fn): original: x sqrt(max(1, rows/cols)); match_rms_adamw: x 0.2 "
                                  "sqrt(max(rows, cols)), updates as large as AdamW's",
                                  choices=("original", "match_rms_adamw"))
    schedule: str = setting("cosine", "cosine: warmup, then a cosine to min_lr_ratio (GPT-3); wsd: warmup, "
                            "constant, then a linear decay over the last decay_frac of the steps",
                            choices=("cosine", "wsd"))
    decay_frac: float = setting(0.4, "wsd: the fraction of max_steps over which the learning rate decays",
                                rule="fraction")


def muon_and_adamw(model: GPT, config, device_type: str) -> list[torch.optim.Optimizer]:
    """[AdamW for the embeddings, biases and LayerNorms, Muon for the weight matrices inside the blocks]."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    hidden = [name for name, p in trainable.items() if name.startswith("transformer.h.") and p.dim() == 2]
    muon_params = [trainable.pop(name) for name in hidden]
    muon = torch.optim.Muon(muon_params, lr=config.muon_lr, momentum=config.muon_momentum, nesterov=True,
                            weight_decay=config.muon_weight_decay, adjust_lr_fn=config.muon_adjust_lr)
    muon.param_groups[0]["peak_lr"] = config.muon_lr  # set_lr scales it by the schedule, as AdamW's
    return [adamw(list(trainable.values()), config, device_type), muon]


def wsd_schedule(step: int, config) -> float:
    """lr_schedule's factor (0..1) for --schedule wsd: the same warmup, then constant, then a linear decay
    to min_lr_ratio over the last decay_frac of max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return config.min_lr_ratio
    decay_start = config.max_steps - round(config.decay_frac * config.max_steps)
    progress = max(0.0, (step - decay_start) / max(1, config.max_steps - decay_start))  # 0 until the decay
    return 1.0 - progress * (1.0 - config.min_lr_ratio)


# ---------------------------------------------------------------------------------------------------
# 17. Checkpoints: what one holds, and resuming exactly
#
# A run stopped at any step (a preempted node, a Ctrl-C, --stop_after_step) and resumed with --resume
# continues as if it had never stopped: the same batches, the same random numbers, the same losses to the
# last bit (the tests hold it to that), on the same number of GPUs or another. For that a checkpoint holds
# more than the weights: the optimizers' moments, the loader's position in the data, every random state.


def checkpoint_state(step: int, model: GPT, optimizers, loader: TrainLoader, config: TrainConfig, val_loss,
                     scaler, rng: dict, master: bool = True) -> dict:
    """Everything needed to continue as if never stopped: weights, optimizer moments, the step, the
    loader's position and every random state (plumbing.py writes it atomically, keeps the newest few, and
    reads it back with weights_only=True: a checkpoint from elsewhere cannot run code). A sharded model's
    are gathered whole: every rank calls this, rank 0 gets the tensors."""
    lora = lora_settings(model)
    weights = model.state_dict()
    if lora:  # a LoRA run stores what trains (the adapters) and where its frozen weights come from
        weights = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return dict(model=gathered(weights, master), lora=lora, model_config=asdict(model.config),
                optimizers=[gathered(optimizer.state_dict(), master) for optimizer in optimizers],
                scaler=scaler.state_dict() if scaler.is_enabled() else None,
                step=step,  # optimizer steps completed
                loader=loader.state_dict(), rng=rng, config=asdict(config), val_loss=val_loss)


def restore_checkpoint(checkpoint: dict, optimizers, scaler, loader: TrainLoader, device: str, rank: int):
    """Put the optimizers, the gradient scaler, the loader and the random generators back where the
    checkpoint left them (the weights are the model's already). Returns (step, val_loss)."""
    for optimizer, state in zip(optimizers, optimizer_states(checkpoint), strict=True):
        settings_now = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        load_optimizer_state(optimizer, state)  # the moments, and the saved run's settings ...
        for group, setting_now in zip(optimizer.param_groups, settings_now):
            group.update(setting_now)  # ... which give way to this run's (the changes were printed)
    if checkpoint.get("scaler") is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    loader.load_state_dict(checkpoint["loader"])
    set_rng_states(checkpoint["rng"], device, rank)
    return checkpoint["step"], checkpoint["val_loss"]


# ===================================================================================================
# Running it: `python train_gpt2.py [flags]`, or the same under `torchrun --nproc_per_node=N`
# ===================================================================================================


@dataclass
class Settings(RunSettings, MemorySettings, HellaSwagSettings, LoRASettings, MuonSettings, SizeSettings,
               TrainConfig):
    """Every setting of a run, one per flag: the story's (TrainConfig, section 6) first, then those of the
    extensions (sections 12, 13, 15 and 16) and of the run itself (settings.py)."""


def parse_config(argv=None) -> Settings:
    """The command line, from the fields of Settings, checked. --preset NAME changes the defaults; flags win."""
    description = "Train GPT-2. Every setting is a flag; see README.md."
    config, explicit = parse_dataclass(Settings, argv, PRESETS, description,
                                       defaults=size_defaults)  # --model's shape and recipe (settings.py)
    for name in ("lora_targets", "lora_also_train"):  # "a, b" and "a,b" are the same list
        setattr(config, name, ",".join(split_list(getattr(config, name))))
    # The flags on the command line (not a preset's or the defaults): some only make sense with others.
    check_config(config, explicit)  # the rules each setting must meet (settings.py)
    if config.sample_interval and len(encode_prompt(config.sample_prompt)) >= config.block_size:
        raise UserError(f"--sample_prompt is {len(encode_prompt(config.sample_prompt))} tokens: it must be "
                        f"shorter than --block_size {config.block_size}")
    if config.shard and "RANK" not in os.environ:
        raise UserError("--shard splits the model across processes that torchrun starts: torchrun --nproc_per_node=N "
                        "train_gpt2.py ... (N GPUs; with one, FSDP2 runs but saves nothing)")
    return config


def setup_distributed(requested_device: str, shard: bool = False):
    """(ddp, rank, local_rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; one
    process runs without DDP (its wrapper would only cut the compiled graph at its gradient buckets),
    unless --shard's FSDP2 needs a process group even of one."""
    device = pick_device(requested_device)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 and not (shard and "RANK" in os.environ):
        return False, 0, 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")  # gloo: DDP on CPUs
    return True, rank, local_rank, world_size, device


def main(argv=None):
    config = parse_config(argv)
    ddp, rank, local_rank, world_size, device = setup_distributed(config.device, config.shard)
    try:
        train(config, ddp, rank, local_rank, world_size, device)
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
