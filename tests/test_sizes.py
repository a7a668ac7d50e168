"""Bigger models: the size flag and its recipe, sharded training (FSDP2) on two gloo processes against DDP
and one process, sharded checkpoints everywhere, activation checkpointing, and the memory estimate
against the measured peak."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY, REPO_ROOT, assert_one_line_error, read_log, run_script, script_env, train

import settings
import train_gpt2 as t


def test_the_size_flag_sets_the_shape_and_recipe_of_the_table():
    for name, recipe in settings.GPT2_RECIPES.items():
        config = t.parse_config(["--model", name])
        assert (config.n_layer, config.n_head, config.n_embd) == tuple(settings.GPT2_SIZES[name].values())
        assert (config.max_lr, config.total_batch_size, config.warmup_steps, config.max_steps, config.micro_batch_size) == (
            recipe["max_lr"], recipe["total_batch_size"], recipe["warmup_steps"], recipe["max_steps"], recipe["micro_batch_size"])
        fast = t.parse_config(["--model", name, "--preset", "fast"])  # the fast recipe, at this size's own number of steps
        assert (fast.optimizer, fast.schedule, fast.max_steps, fast.n_layer) == ("muon", "wsd", recipe["fast_steps"], config.n_layer)
    medium = t.parse_config(["--model", "gpt2-medium", "--max_lr", "1e-4", "--n_layer", "6"])  # flags given beside it win
    assert (medium.max_lr, medium.n_layer, medium.n_embd) == (1e-4, 6, 1024)
    assert t.parse_config([]).max_steps == 19_073 and t.parse_config(["--preset", "fast"]).max_steps == 8_000  # as before
    model = t.GPT(t.GPTConfig(**settings.GPT2_SIZES["gpt2-medium"]))
    assert model.num_params() == settings.GPT2_SCORES["gpt2-medium"][0]  # the shape is OpenAI's: 354,823,168 parameters


def sharded_runs(shards, tmp_path, optimizer):
    """The same run three ways: one process, two DDP processes, two sharded (FSDP2) processes. 7 val
    sequences and 7 HellaSwag examples are split 4 / 3 between two ranks: their forward passes differ in
    number, which a sharded model, whose forward is a collective, must make up for."""
    common = ["--max_steps", "6", "--optimizer", optimizer, "--val_tokens", "224", "--eval_interval", "3"]
    train(shards, tmp_path / "one", *common)
    train(shards, tmp_path / "ddp", *common, procs=2)
    return train(shards, tmp_path / "sharded", *common, "--shard", procs=2)


# Muon orthogonalises in bfloat16: on shards, its matmuls sum in another order again, and the loss drifts
# by up to ~2e-4 in 6 steps (measured); ranks that do not average their gradients drift by ~1e-2 (test_train).
@pytest.mark.parametrize("optimizer, tolerance", [("adamw", 1e-5), ("muon", 1e-3)])
def test_sharded_training_matches_ddp_and_one_process(shakespeare_shards, tmp_path, optimizer, tolerance):
    result = sharded_runs(shakespeare_shards, tmp_path, optimizer)
    assert "sharded (FSDP2)" in result.stdout
    for stream in ("train", "val"):
        one, ddp, sharded = (read_log(tmp_path / name, stream) for name in ("one", "ddp", "sharded"))
        assert one.keys() == ddp.keys() == sharded.keys() and len(one) >= 3
        for step in one:
            assert sharded[step] == pytest.approx(ddp[step], abs=tolerance) and sharded[step] == pytest.approx(one[step], abs=tolerance)


def test_a_sharded_checkpoint_resumes_anywhere_and_loads_everywhere(shakespeare_shards, shared_data, tmp_path):
    """Stopped at step 3 of 6, sharded, with HellaSwag and samples on the way: --resume sharded on two
    processes, unsharded on one and on two (DDP) gives the losses of a run never stopped; the checkpoint
    is an ordinary one (sample.py, hellaswag.py, save_hf with the same logits)."""
    from transformers import GPT2LMHeadModel

    common = ["--max_steps", "6", "--val_tokens", "224", "--eval_interval", "3", "--sample_interval", "2", "--sample_tokens", "4",
              "--hellaswag", "--hellaswag_limit", "7", "--hellaswag_data", shared_data / "hellaswag_val.jsonl"]
    straight = train(shakespeare_shards, tmp_path / "straight", *common, "--shard", procs=2)
    assert straight.stdout.count("sample 0:") == 3  # steps 2, 4 and 5: rank 0 samples from the gathered weights
    expected = read_log(tmp_path / "straight", "train")
    train(shakespeare_shards, tmp_path / "stopped", *common, "--shard", "--stop_after_step", "3", procs=2)
    for name, procs, shard in (("sharded", 2, ["--shard"]), ("one", None, []), ("ddp", 2, [])):
        shutil.copytree(tmp_path / "stopped", tmp_path / name)  # one stopped run, resumed three ways
        train(shakespeare_shards, tmp_path / name, *common, *shard, "--resume", procs=procs)
        resumed = read_log(tmp_path / name, "train")
        assert resumed.keys() == expected.keys()
        for step in expected:
            assert resumed[step] == pytest.approx(expected[step], abs=1e-5), (name, step)

    checkpoint = t.load_checkpoint(tmp_path / "straight" / "ckpt_000006.pt")
    assert all(type(v) is torch.Tensor for v in checkpoint["model"].values())  # full tensors, no shards
    model = t.load_model(str(tmp_path / "straight"))
    t.save_hf(model, tmp_path / "hf")
    tokens = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()(tokens).logits - model(tokens)[0]).abs().max() <= 1e-5
    sample = run_script("sample.py", "--init_from", tmp_path / "straight", "--max_new_tokens", "4", "--num_samples", "1")
    assert sample.returncode == 0 and "--- sample 0 ---" in sample.stdout, sample.stderr
    hellaswag = run_script("hellaswag.py", "--model", tmp_path / "straight", "--data", shared_data / "hellaswag_val.jsonl",
                           "--limit", "4")
    assert hellaswag.returncode == 0 and "acc_norm" in hellaswag.stdout, hellaswag.stderr


def test_muon_orthogonalises_the_whole_matrix_of_a_sharded_weight(tmp_path):
    """torch.optim.Muon on FSDP2's DTensor shards: each rank holds half of a weight's rows, and the update
    is the whole matrix's orthogonalisation (that of one process), not each half's."""
    script = tmp_path / "muon.py"
    script.write_text('''
import os, sys
import torch, torch.distributed as dist
from torch.distributed.tensor import distribute_tensor, init_device_mesh, Shard
dist.init_process_group("gloo")
torch.manual_seed(0)
weight, grad = torch.randn(64, 48), torch.randn(64, 48)
def step(param, g):
    param = torch.nn.Parameter(param)
    optimizer = torch.optim.Muon([param], lr=0.1)
    param.grad = g
    optimizer.step()
    return param.detach()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
sharded = step(distribute_tensor(weight, mesh, [Shard(0)]), distribute_tensor(grad, mesh, [Shard(0)])).full_tensor()
whole = step(weight.clone(), grad)
halves = torch.cat([step(w, g) for w, g in zip(weight.chunk(2), grad.chunk(2))])
if dist.get_rank() == 0:
    print((sharded - whole).abs().max().item(), (halves - whole).abs().max().item())
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as plumbing.run_main ends a torchrun process: torch's caches hold the mesh's group (see there)
''')
    result = run_script(script, torchrun_procs=2)
    assert result.returncode == 0, result.stderr[-2000:]
    sharded_vs_whole, halves_vs_whole = map(float, result.stdout.split())
    assert sharded_vs_whole < 2e-3 < halves_vs_whole  # bf16 Newton-Schulz noise, against a real difference


def test_activation_checkpointing_keeps_less_and_changes_no_loss(shakespeare_shards, tmp_path):
    """A forward pass with checkpointing keeps a fraction of the activations for backward (counted with
    saved_tensors_hooks); a run with it logs bitwise the losses and gradient norms of a run without."""
    x = torch.randint(0, 50257, (4, 64))
    kept = {}
    for checkpointing in (False, True):
        model = t.GPT(t.GPTConfig(block_size=64, n_layer=4, n_head=2, n_embd=64))
        if checkpointing:
            t.checkpoint_activations(model)
        sizes = []
        keep = lambda t: sizes.append(0 if {50257, 50304} & set(t.shape) else t.numel() * t.element_size()) or t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(x, x)[1].backward()
        kept[checkpointing] = sum(sizes)  # but the classifier's and the logits', the same either way
    assert kept[True] < 0.3 * kept[False], kept
    train(shakespeare_shards, tmp_path / "plain", "--max_steps", "4")
    result = train(shakespeare_shards, tmp_path / "checkpointed", "--max_steps", "4", "--activation_checkpointing")
    assert "activation checkpointing" in result.stdout
    for stream in ("train", "val", "norm"):
        assert read_log(tmp_path / "plain", stream) == read_log(tmp_path / "checkpointed", stream) != {}


MEASURE = '''
import contextlib, json, sys, torch
sys.path.insert(0, sys.argv[2])
import settings
import train_gpt2 as t
def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024
args = json.loads(sys.argv[1])
config = t.Settings(**args["config"])
x = torch.randint(0, 50257, (config.micro_batch_size, config.block_size))
before = rss("VmRSS:")  # torch and its libraries: not the run's
model = t.GPT(t.GPTConfig(block_size=config.block_size, n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                          vocab_pad_multiple=64))
if args["chunked"]:
    t.use_chunked_loss(model)
if config.activation_checkpointing:
    t.checkpoint_activations(model)
optimizers = t.configure_optimizers(model, config, "cpu")
for _ in range(3):  # the optimizer's state appears at the first step
    t.train_step(model, optimizers, lambda: (x, x), 1, contextlib.nullcontext(), 1.0, torch.amp.GradScaler("cpu", enabled=False), ddp=False)
print(rss("VmHWM:") - before, settings.estimate_memory(model, config, 1, torch.float32, "cpu").total)
'''


@pytest.mark.parametrize("shape, chunked", [
    (dict(n_layer=4, n_head=4, n_embd=256, block_size=256, micro_batch_size=8), False),
    (dict(n_layer=4, n_head=4, n_embd=256, block_size=512, micro_batch_size=8, activation_checkpointing=True), True),
])
def test_the_memory_estimate_is_within_a_quarter_of_the_measured_peak(shape, chunked):
    """estimate_memory against the peak resident memory of a process that trains three steps (above what
    it held before the model was built), float32 on a CPU: one run with the plain loss, one with the
    chunked loss and activation checkpointing."""
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(dict(config=shape, chunked=chunked)), str(REPO_ROOT)],
                            env=script_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    measured, estimated = map(float, result.stdout.split())
    assert abs(estimated - measured) <= 0.25 * measured, (estimated / 2**30, measured / 2**30)


def test_out_of_memory_ends_with_one_line_that_says_what_to_change(shakespeare_shards, tmp_path):
    """The process may use 3 GiB (a ulimit, as a GPU has its memory): a micro-batch of 64 x 256 tokens
    with the plain loss needs ~10 GiB of logits. The run ends with one line naming the micro-batch
    that fits, not the allocator's traceback."""
    limit = 3 * 2**30
    command = [sys.executable, "-c", "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_DATA, "
               f"({limit}, resource.RLIM_INFINITY)); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
               str(REPO_ROOT / "train_gpt2.py"), "--data_dir", str(shakespeare_shards), "--log_dir", str(tmp_path / "run"),
               "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "256", "--micro_batch_size", "64",
               "--total_batch_size", str(64 * 256), "--loss", "plain", "--eval_interval", "0", "--no-hellaswag",
               "--sample_interval", "0", "--device", "cpu", "--max_steps", "2"]
    result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=600)
    last = assert_one_line_error(result, "out of memory with --micro_batch_size 64", "try --micro_batch_size")
    suggested = int(last.split("try --micro_batch_size ")[1].split()[0])
    estimate = lambda b: settings.estimate_memory(t.GPT(t.GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=64, vocab_pad_multiple=64)),
                                           t.Settings(block_size=256, micro_batch_size=b, loss="plain"), 1, torch.float32, "cpu")
    assert 64 % suggested == 0 and estimate(suggested).total <= 0.85 * limit < estimate(2 * suggested).total


def test_size_and_sharding_flags_are_checked(shakespeare_shards, tmp_path):
    run = lambda *args: run_script("train_gpt2.py", "--data_dir", shakespeare_shards, "--log_dir", tmp_path / "run", *TINY,
                                   "--max_steps", "2", *args)
    assert_one_line_error(run("--model", "gpt2-huge"), "--model", "gpt2-huge")
    assert_one_line_error(run("--shard"), "--shard", "torchrun")
    assert_one_line_error(run("--shard", "--dtype", "float16"), "--shard", "float16")


def test_out_of_memory_while_the_model_is_built_is_one_line_too(shakespeare_shards, tmp_path):
    """GPT-2 XL's fp32 weights alone (6.2 GB) do not fit a process allowed 3 GiB: building the model runs
    out, before any training state exists. The run ends with one line that says no micro-batch can help."""
    limit = 3 * 2**30
    command = [sys.executable, "-c", "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_DATA, "
               f"({limit}, resource.RLIM_INFINITY)); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
               str(REPO_ROOT / "train_gpt2.py"), "--data_dir", str(shakespeare_shards), "--log_dir", str(tmp_path / "run"),
               "--model", "gpt2-xl", "--block_size", "64", "--micro_batch_size", "1", "--total_batch_size", "64",
               "--eval_interval", "0", "--no-hellaswag", "--sample_interval", "0", "--device", "cpu", "--max_steps", "1",
               "--val_tokens", "64"]
    result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=600)
    assert_one_line_error(result, "out of memory with --micro_batch_size 1", "alone take", "add --shard")
    assert not (tmp_path / "run" / "log.txt").exists()  # nothing started: the same command with --shard is not refused


def test_gpt2_124m_recipe_is_train_configs_own_defaults():
    """--model gpt2 (the default) applies no recipe over TrainConfig's defaults: they are the same numbers,
    so a learner who edits a default in train_gpt2.py sees it take effect."""
    defaults = t.TrainConfig()
    recipe = dict(settings.GPT2_SIZES["gpt2"], **settings.GPT2_RECIPES["gpt2"])
    assert all(getattr(defaults, name) == value for name, value in recipe.items() if name != "fast_steps")
    args = t.parse_config([])
    assert settings.size_defaults(type("Args", (), dict(model="gpt2", preset=None))) == {}
    assert (args.n_layer, args.max_lr, args.max_steps) == (12, 6e-4, 19_073)
