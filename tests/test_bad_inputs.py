"""Bad input, one case per line: every command-line entry point refuses it with exactly one `error:`
line that names the flag or file, no traceback, a non-zero exit, and nothing of an earlier run lost.

The scripts run in this process (their main() under run_main, as `python script.py` does it): the
same code path as the command line, without starting 60 Pythons. tests/test_train.py and the others
run a few of the same cases as real subprocesses.
"""


import argparse

import numpy as np
import pytest
import torch
from conftest import TINY, train

import bench
import fineweb
import hellaswag
import plumbing
import recipe_proxy
import sample
import train_gpt2 as t
import validate

SCRIPTS = {"train": t.main, "sample": sample.main, "hellaswag": hellaswag.main, "fineweb": fineweb.main,
           "validate": validate.main, "bench": bench.main, "recipe_proxy": recipe_proxy.main}


@pytest.fixture(scope="module")
def files(tmp_path_factory, shakespeare_shards, shared_data):
    """Good and bad inputs, made once: {name: path}."""
    root = tmp_path_factory.mktemp("bad_inputs")
    val = np.load(next(shakespeare_shards.glob("*_val_*.npy")))
    train_shard = np.load(next(shakespeare_shards.glob("*_train_*.npy")))

    def shard_dir(name, train_bytes=None, val_tokens=val):
        folder = root / name
        folder.mkdir()
        np.save(folder / "x_val_000000.npy", val_tokens)
        if train_bytes is None:
            np.save(folder / "x_train_000001.npy", train_shard)
        else:
            (folder / "x_train_000001.npy").write_bytes(train_bytes)
        return folder

    np.save(root / "whole.npy", train_shard)
    whole = (root / "whole.npy").read_bytes()
    np.save(root / "half.npy", train_shard[: len(train_shard) // 2])
    high = val.copy()
    high[100] = 50300  # inside the padded vocab (50,304): a model would score it without complaint
    train_high = train_shard.copy()
    train_high[-50] = 60000  # in the last window of the shard: found at the start, not when its batch comes
    paths = dict(
        shards=shakespeare_shards,
        truncated=shard_dir("truncated", whole[: len(whole) // 2]),
        empty=shard_dir("empty", b""),
        garbage=shard_dir("garbage", b"these bytes are no shard at all"),
        val_out_of_vocab=shard_dir("val_out_of_vocab", val_tokens=high),
        smaller=shard_dir("smaller", (root / "half.npy").read_bytes()),
        train_out_of_vocab=shard_dir("train_out_of_vocab"),
        binary=root / "binary.txt",
        bad_utf8_jsonl=root / "bad.jsonl",
        fake_parquet=root / "fake.parquet",
        hellaswag=shared_data / "hellaswag_val.jsonl",
        bad_hellaswag=root / "hellaswag_bad.jsonl",
        a_file=root / "a_file",
        hf=root / "hf",
        earlier=root / "earlier_run",
        log_only=root / "log_only",
        empty_texts=root / "empty_texts.jsonl",
        bad_config=root / "bad_config.pt",
        cut_safetensors=root / "cut_safetensors",
        pickled_bin=root / "pickled_bin",
    )
    np.save(paths["train_out_of_vocab"] / "x_train_000001.npy", train_high)
    paths["empty_texts"].write_text('{"text": ""}\n{"text": ""}\n')
    paths["log_only"].mkdir()
    (paths["log_only"] / "log.txt").write_text("0 train 10.9\n")  # a run killed before its first checkpoint
    paths["binary"].write_bytes(bytes(range(256)) * 4)
    paths["bad_utf8_jsonl"].write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    paths["fake_parquet"].write_text("PAR1 this is a text file pretending to be parquet")
    good_line = (shared_data / "hellaswag_val.jsonl").open().readline().encode()
    paths["bad_hellaswag"].write_bytes(good_line + b'{"ctx": "\xff\xfe"}\n')
    paths["a_file"].write_text("a file where a folder should be")
    torch.manual_seed(0)
    t.save_hf(t.GPT(t.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)), paths["hf"])
    train(shakespeare_shards, paths["earlier"], "--max_steps", "1")  # a finished run: must survive every case
    checkpoint = torch.load(next(paths["earlier"].glob("ckpt_*.pt")), weights_only=True)
    checkpoint["model_config"]["n_layer"] = "2"  # a value of the wrong type
    torch.save(checkpoint, paths["bad_config"])
    t.save_hf(t.GPT(t.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)), paths["cut_safetensors"])
    weights = paths["cut_safetensors"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    t.save_hf(t.GPT(t.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)), paths["pickled_bin"])
    (paths["pickled_bin"] / "model.safetensors").unlink()
    torch.save({"weights": argparse.Namespace(a=1)}, paths["pickled_bin"] / "pytorch_model.bin")  # a pickled object
    return paths


def run(script, args, capsys):
    """(exit code, stdout, stderr) of `python <script>.py args`, run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        plumbing.run_main(lambda: SCRIPTS[script]([str(a) for a in args]))
    out, err = capsys.readouterr()
    code = exit_info.value.code
    if isinstance(code, str):  # sys.exit("error: ...") prints its message to stderr and exits with 1
        err, code = err + code + "\n", 1
    return code, out, err


def run_files(run_dir) -> dict:
    """The bytes of every file of a run (not the lock, which only says who holds the folder)."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}


def train_args(files, *extra, log_dir=None):
    return ["--data_dir", files["shards"], "--log_dir", log_dir or files["a_file"].parent / "run", *TINY,
            "--max_steps", "2", *extra]


# (script, arguments (a function of the files), what the error line must name)
CASES = {
    # train_gpt2.py: values that mean nothing
    "max_steps 0": ("train", lambda f: train_args(f, "--max_steps", "0"), ["--max_steps 0"]),
    "micro_batch_size 0": ("train", lambda f: train_args(f, "--micro_batch_size", "0"), ["--micro_batch_size 0"]),
    "total_batch_size 0": ("train", lambda f: train_args(f, "--total_batch_size", "0"), ["--total_batch_size 0"]),
    "total_batch_size not a multiple": ("train", lambda f: train_args(f, "--total_batch_size", "300"), ["--total_batch_size 300"]),
    "checkpoint_interval 0": ("train", lambda f: train_args(f, "--checkpoint_interval", "0"), ["--checkpoint_interval 0"]),
    "keep_checkpoints 0": ("train", lambda f: train_args(f, "--keep_checkpoints", "0"), ["--keep_checkpoints 0"]),
    "warmup_steps -1": ("train", lambda f: train_args(f, "--warmup_steps", "-1"), ["--warmup_steps -1"]),
    "max_lr nan": ("train", lambda f: train_args(f, "--max_lr", "nan"), ["--max_lr nan"]),
    "max_lr negative": ("train", lambda f: train_args(f, "--max_lr", "-0.1"), ["--max_lr -0.1"]),
    "muon_lr inf": ("train", lambda f: train_args(f, "--muon_lr", "inf"), ["--muon_lr inf"]),
    "beta2 1": ("train", lambda f: train_args(f, "--beta2", "1.0"), ["--beta2 1.0"]),
    "decay_frac 1.5": ("train", lambda f: train_args(f, "--decay_frac", "1.5"), ["--decay_frac 1.5"]),
    "grad_clip nan": ("train", lambda f: train_args(f, "--grad_clip", "nan"), ["--grad_clip nan"]),
    "n_head does not divide n_embd": ("train", lambda f: train_args(f, "--n_head", "5"), ["--n_head 5"]),
    # ... choices and spellings
    "dtype fp16": ("train", lambda f: train_args(f, "--dtype", "fp16"), ["--dtype", "fp16"]),
    "compile yes": ("train", lambda f: train_args(f, "--compile", "yes"), ["--compile", "yes"]),
    "optimizer sgd": ("train", lambda f: train_args(f, "--optimizer", "sgd"), ["--optimizer", "sgd"]),
    "schedule linear": ("train", lambda f: train_args(f, "--schedule", "linear"), ["--schedule", "linear"]),
    "device gpu": ("train", lambda f: train_args(f, "--device", "gpu"), ["--device gpu"]),
    "device cuda without a GPU": ("train", lambda f: train_args(f, "--device", "cuda"), ["--device cuda", "no CUDA"]),
    "a misspelled flag": ("train", lambda f: train_args(f, "--max_stepz", "5"), ["--max_stepz"]),
    "an abbreviated flag": ("train", lambda f: train_args(f, "--max_st", "5"), ["--max_st"]),
    "not an int": ("train", lambda f: train_args(f, "--max_steps", "1e3"), ["--max_steps", "1e3"]),
    "sample prompt longer than the block": ("train", lambda f: train_args(f, "--sample_interval", "1", "--sample_prompt", "word " * 40), ["--sample_prompt", "--block_size 32"]),
    # ... LoRA settings
    "lora_rank -1": ("train", lambda f: train_args(f, "--lora_rank", "-1"), ["--lora_rank -1"]),
    "lora_alpha without a rank": ("train", lambda f: train_args(f, "--lora_alpha", "8"), ["--lora_alpha", "--lora_rank"]),
    "lora from scratch": ("train", lambda f: train_args(f, "--lora_rank", "4"), ["--lora_rank", "--init_from"]),
    "lora rank above the layer": ("train", lambda f: train_args(f, "--init_from", f["hf"], "--lora_rank", "40"), ["--lora_rank 40", "32"]),
    "lora on an unknown matrix": ("train", lambda f: train_args(f, "--init_from", f["hf"], "--lora_rank", "4", "--lora_targets", "attn.q"), ["--lora_targets", "attn.q"]),
    "lora with muon": ("train", lambda f: train_args(f, "--init_from", f["hf"], "--lora_rank", "4", "--optimizer", "muon"), ["--optimizer muon", "LoRA"]),
    "lora on a matrix twice": ("train", lambda f: train_args(f, "--init_from", f["hf"], "--lora_rank", "4", "--lora_targets", "attn.c_attn, attn.c_attn"), ["--lora_targets", "twice"]),
    "lora_also_train matching nothing": ("train", lambda f: train_args(f, "--init_from", f["hf"], "--lora_rank", "4", "--lora_also_train", "lnf_typo"), ["--lora_also_train", "lnf_typo"]),
    "muon_lr without muon": ("train", lambda f: train_args(f, "--muon_lr", "0.05"), ["--muon_lr", "--optimizer muon"]),
    "decay_frac without wsd": ("train", lambda f: train_args(f, "--decay_frac", "0.2"), ["--decay_frac", "--schedule wsd"]),
    "resume and overwrite at once": ("train", lambda f: train_args(f, "--resume", "--overwrite"), ["--resume", "--overwrite"]),
    # ... files
    "no data": ("train", lambda f: train_args(f, "--data_dir", f["a_file"].parent / "nowhere"), ["nowhere", "fineweb.py"]),
    "truncated shard": ("train", lambda f: train_args(f, "--data_dir", f["truncated"]), ["x_train_000001.npy", "truncated"]),
    "empty shard": ("train", lambda f: train_args(f, "--data_dir", f["empty"]), ["x_train_000001.npy", "empty"]),
    "not a shard": ("train", lambda f: train_args(f, "--data_dir", f["garbage"]), ["x_train_000001.npy", "not a .npy"]),
    "val token out of the vocab": ("train", lambda f: train_args(f, "--data_dir", f["val_out_of_vocab"], "--vocab_pad_multiple", "64"), ["x_val_000000.npy", "50300"]),
    "init_from a missing folder": ("train", lambda f: train_args(f, "--init_from", f["a_file"].parent / "no_model/"), ["no_model", "does not exist"]),
    "init_from an unknown name": ("train", lambda f: train_args(f, "--init_from", "gpt3"), ["gpt3"]),
    "log_dir is a file": ("train", lambda f: train_args(f, log_dir=f["a_file"]), ["--log_dir", "a_file"]),
    "hellaswag data missing": ("train", lambda f: train_args(f, "--hellaswag", "--hellaswag_data", f["a_file"].parent / "h.jsonl"), ["h.jsonl"]),
    "a run folder that holds a run": ("train", lambda f: train_args(f, log_dir=f["earlier"]), ["already holds a run", "--resume"]),
    # --overwrite checks everything before deleting anything
    "overwrite with no data": ("train", lambda f: train_args(f, "--overwrite", "--data_dir", f["a_file"].parent / "typo", log_dir=f["earlier"]), ["typo"]),
    "overwrite with a bad model": ("train", lambda f: train_args(f, "--overwrite", "--init_from", "gpt3", log_dir=f["earlier"]), ["gpt3"]),
    "overwrite with bad HellaSwag data": ("train", lambda f: train_args(f, "--overwrite", "--hellaswag", "--hellaswag_data", f["bad_hellaswag"], log_dir=f["earlier"]), ["hellaswag_bad.jsonl", "line 2"]),
    "resume with another model size": ("train", lambda f: train_args(f, "--resume", "--n_layer", "3", log_dir=f["earlier"]), ["--n_layer", "--resume"]),
    "resume on other data": ("train", lambda f: train_args(f, "--resume", "--data_dir", f["smaller"], "--max_steps", "3", log_dir=f["earlier"]), ["train shards", "saved run"]),
    "resume a log without checkpoints": ("train", lambda f: train_args(f, "--resume", log_dir=f["log_only"]), ["no checkpoint", "--overwrite"]),
    # ... the second round: numbers out of range, flags with no effect, files that fail in other ways
    "seed above 2^63": ("train", lambda f: train_args(f, "--seed", str(2**64)), ["--seed 18446744073709551616"]),
    "data_seed negative": ("train", lambda f: train_args(f, "--data_seed", "-1"), ["--data_seed -1"]),
    "eps that is 0 in float32": ("train", lambda f: train_args(f, "--eps", "1e-50"), ["--eps 1e-50", "float32"]),
    "a shape with init_from": ("train", lambda f: train_args(f, "--init_from", f["hf"], "--n_layer", "3"), ["--n_layer", "--init_from"]),
    "a size with init_from": ("train", lambda f: train_args(f, "--init_from", f["hf"], "--model", "gpt2-medium"), ["--model", "--init_from"]),
    "log_dir unwritable": ("train", lambda f: train_args(f, log_dir="/proc/gpt2_run"), ["--log_dir /proc/gpt2_run"]),
    "a block far larger than the data": ("train", lambda f: train_args(f, "--block_size", str(10**8), "--total_batch_size", str(2 * 10**8)),
                                         ["fewer than one batch", "--block_size"]),
    "a bad token in a train shard": ("train", lambda f: train_args(f, "--data_dir", f["train_out_of_vocab"]), ["x_train_000001.npy", "60000"]),
    "hellaswag data a folder": ("train", lambda f: train_args(f, "--hellaswag", "--hellaswag_data", f["hf"]), ["is a folder"]),
    "model_config of the wrong type": ("train", lambda f: train_args(f, "--init_from", f["bad_config"]), ["model_config", "n_layer='2'"]),
    "safetensors cut in half": ("sample", lambda f: ["--init_from", f["cut_safetensors"]], ["cut_safetensors", "could not load"]),
    "pickled objects in a .bin": ("sample", lambda f: ["--init_from", f["pickled_bin"]], ["pickled_bin", "pickled Python objects"]),
    "sample num_samples absurd": ("sample", lambda f: ["--init_from", f["hf"], "--num_samples", "100000000"], ["--num_samples 100000000", "GiB"]),
    "sample max_new_tokens absurd": ("sample", lambda f: ["--init_from", f["hf"], "--max_new_tokens", str(10**12)], ["--max_new_tokens", "GiB"]),
    "hellaswag data a folder (hellaswag.py)": ("hellaswag", lambda f: ["--model", f["hf"], "--data", f["hf"]], ["is a folder"]),
    "fineweb out_dir a file": ("fineweb", lambda f: ["--input", f["bad_utf8_jsonl"], "--out_dir", f["a_file"], "--num_proc", "1"], ["--out_dir", "is a file"]),
    "fineweb out_dir unwritable": ("fineweb", lambda f: ["--input", f["bad_utf8_jsonl"], "--out_dir", "/proc/gpt2_tokens", "--num_proc", "1"],
                                   ["--out_dir /proc/gpt2_tokens", "cannot write"]),
    "fineweb only empty texts": ("fineweb", lambda f: ["--input", f["empty_texts"], "--out_dir", f["a_file"].parent / "o4", "--num_proc", "1"],
                                 ["empty_texts.jsonl", "empty"]),
    # sample.py
    "top_p 0": ("sample", lambda f: ["--init_from", f["hf"], "--top_p", "0"], ["--top_p 0"]),
    "top_p 1.5": ("sample", lambda f: ["--init_from", f["hf"], "--top_p", "1.5"], ["--top_p 1.5"]),
    "top_k -1": ("sample", lambda f: ["--init_from", f["hf"], "--top_k", "-1"], ["--top_k -1"]),
    "temperature -1": ("sample", lambda f: ["--init_from", f["hf"], "--temperature", "-1"], ["--temperature -1"]),
    "temperature nan": ("sample", lambda f: ["--init_from", f["hf"], "--temperature", "nan"], ["--temperature nan"]),
    "num_samples 0": ("sample", lambda f: ["--init_from", f["hf"], "--num_samples", "0"], ["--num_samples 0"]),
    "eval_text missing": ("sample", lambda f: ["--init_from", f["hf"], "--eval_text", f["a_file"].parent / "notes.txt"], ["notes.txt"]),
    "eval_text not text": ("sample", lambda f: ["--init_from", f["hf"], "--eval_text", f["binary"]], ["binary.txt", "UTF-8"]),
    "sample seed too large": ("sample", lambda f: ["--init_from", f["hf"], "--seed", str(2**70)], ["--seed"]),
    "eval_text a folder": ("sample", lambda f: ["--init_from", f["hf"], "--eval_text", f["hf"]], ["--eval_text", "folder"]),
    "sample compile maybe": ("sample", lambda f: ["--init_from", f["hf"], "--compile", "maybe"], ["--compile", "maybe"]),
    "sample from a broken checkpoint": ("sample", lambda f: ["--init_from", f["binary"]], ["binary.txt"]),
    # hellaswag.py
    "hellaswag limit 0": ("hellaswag", lambda f: ["--model", f["hf"], "--data", f["hellaswag"], "--limit", "0"], ["--limit"]),
    "hellaswag batch 0": ("hellaswag", lambda f: ["--model", f["hf"], "--data", f["hellaswag"], "--batch_size", "0"], ["--batch_size"]),
    "hellaswag data not UTF-8": ("hellaswag", lambda f: ["--model", f["hf"], "--data", f["bad_hellaswag"]], ["hellaswag_bad.jsonl", "line 2", "UTF-8"]),
    "hellaswag json cannot be written": ("hellaswag", lambda f: ["--model", f["hf"], "--data", f["hellaswag"], "--json", f["a_file"] / "out.json"], ["--json", "out.json"]),
    "hellaswag dtype fp8": ("hellaswag", lambda f: ["--model", f["hf"], "--dtype", "fp8"], ["--dtype", "fp8"]),
    "hellaswag device gpu": ("hellaswag", lambda f: ["--model", f["hf"], "--device", "gpu"], ["--device gpu"]),
    # fineweb.py
    "fineweb binary .txt": ("fineweb", lambda f: ["--input", f["binary"], "--out_dir", f["a_file"].parent / "o1", "--num_proc", "1"], ["binary.txt", "UTF-8"]),
    "fineweb bad UTF-8 line": ("fineweb", lambda f: ["--input", f["bad_utf8_jsonl"], "--out_dir", f["a_file"].parent / "o2", "--num_proc", "1"], ["bad.jsonl:2", "UTF-8"]),
    "fineweb fake parquet": ("fineweb", lambda f: ["--input", f["fake_parquet"], "--out_dir", f["a_file"].parent / "o3", "--num_proc", "1"], ["fake.parquet", "parquet"]),
    "fineweb shard_size 0": ("fineweb", lambda f: ["--input", f["bad_utf8_jsonl"], "--shard_size", "0"], ["--shard_size 0"]),
    "fineweb num_proc 0": ("fineweb", lambda f: ["--input", f["bad_utf8_jsonl"], "--num_proc", "0"], ["--num_proc 0"]),
    "fineweb source typo": ("fineweb", lambda f: ["--source", "edu10b"], ["--source", "edu10b"]),
    # validate.py
    "validate a missing model": ("validate", lambda f: [f["a_file"].parent / "missing/"], ["missing", "does not exist"]),
    "validate tolerance -1": ("validate", lambda f: [f["hf"], "--tolerance", "-1"], ["--tolerance -1"]),
    "validate max_new_tokens 0": ("validate", lambda f: [f["hf"], "--max_new_tokens", "0"], ["--max_new_tokens 0"]),
    # bench.py
    "bench steps 0": ("bench", lambda f: ["--model", "tiny", "--steps", "0"], ["--steps 0"]),
    "bench dtype fp8": ("bench", lambda f: ["--model", "tiny", "--dtype", "fp8"], ["--dtype", "fp8"]),
    "bench skip a typo": ("bench", lambda f: ["--model", "tiny", "--skip", "trian"], ["--skip", "trian"]),
    "bench json cannot be written": ("bench", lambda f: ["--model", "tiny", "--json", f["a_file"] / "b.json"], ["--json", "b.json"]),
    "bench model size typo": ("bench", lambda f: ["--model", "125M"], ["--model", "125M"]),
    "bench json a folder": ("bench", lambda f: ["--model", "tiny", "--json", f["hf"]], ["--json", "folder"]),
    "bench block_size 8": ("bench", lambda f: ["--model", "tiny", "--block_size", "8"], ["--block_size 8"]),
    "bench lora_rank 0": ("bench", lambda f: ["--model", "tiny", "--lora_rank", "0"], ["--lora_rank 0"]),
    "bench peak_flops nan": ("bench", lambda f: ["--model", "tiny", "--peak_flops", "nan"], ["--peak_flops nan"]),
    "recipe_proxy device tpu": ("recipe_proxy", lambda f: ["--data", f["hf"], "--device", "tpu"], ["--device tpu"]),
    "recipe_proxy json a folder": ("recipe_proxy", lambda f: ["--data", f["hf"], "--json", f["hf"]], ["--json", "folder"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_error_line(case, files, capsys):
    script, make_args, fragments = CASES[case]
    earlier = run_files(files["earlier"])
    code, out, err = run(script, make_args(files), capsys)
    assert code != 0, out[-2000:]
    assert "Traceback" not in err + out
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and err.strip().splitlines()[-1] == error_lines[0], err
    for fragment in fragments:
        assert fragment in error_lines[0], f"{fragment!r} not in {error_lines[0]!r}"
    assert run_files(files["earlier"]) == earlier  # nothing of the earlier run was lost or changed
