"""The training loop: gradient accumulation, DDP, exact resume, preemption, bad configs."""

import contextlib
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import TINY, TRAIN, assert_one_line_error, read_log, run_script, script_command, script_env, train

import train_gpt2 as t

def test_gradient_accumulation_equals_one_big_batch():
    """B=8 x 1 micro-step and B=2 x 4 micro-steps give the same gradient (the 1/N scaling)."""
    torch.manual_seed(0)
    x, y = torch.randint(0, 50257, (8, 16)), torch.randint(0, 50257, (8, 16))
    grads = []
    for micro_batch, steps in ((8, 1), (2, 4)):
        torch.manual_seed(1)
        model = t.GPT(t.GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # new = old - grad: the update IS the gradient
        batches = iter([(x[i : i + micro_batch], y[i : i + micro_batch]) for i in range(0, 8, micro_batch)])
        loss, _, stepped = t.train_step(model, [optimizer], lambda: next(batches), steps, contextlib.nullcontext(),
                                        grad_clip=0.0, scaler=torch.amp.GradScaler("cpu", enabled=False), ddp=False)
        assert stepped
        grads.append([b - p.detach() for b, p in zip(before, model.parameters())])
    for g1, g2 in zip(*grads):
        assert (g1 - g2).abs().max().item() <= 1e-6


def test_learning_rate_schedules():
    """cosine (the default, GPT-3's) and wsd: warmup, then constant until the last decay_frac of the
    steps, then a straight line down; both end at min_lr_ratio."""
    c = t.Settings()
    factor = lambda step: t.lr_schedule(step, c)
    assert factor(0) == pytest.approx(1 / 715) and factor(714) == factor(715) == pytest.approx(1.0)
    assert factor((715 + 19073) // 2) == pytest.approx(0.55, rel=1e-3)  # halfway: the mean of 1 and 0.1
    assert factor(19073) == pytest.approx(0.1)
    c = t.Settings(schedule="wsd", warmup_steps=10, max_steps=100, decay_frac=0.3, min_lr_ratio=0.0)
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # warmup
    assert {factor(s) for s in range(10, 71)} == {1.0}  # the stable phase: 10 .. 70
    assert [factor(s) for s in (70, 85, 99, 100)] == pytest.approx([1.0, 0.5, 1 / 30, 0.0])  # the decay: 70 -> 100
    assert all(factor(s) > factor(s + 1) for s in range(70, 100))


def test_command_line_is_the_config_dataclass():
    c = t.parse_config([])
    assert (c.total_batch_size, c.micro_batch_size, c.max_lr, c.warmup_steps, c.max_steps) == (524288, 64, 6e-4, 715, 19073)
    assert (c.weight_decay, c.beta1, c.beta2, c.eps, c.grad_clip, c.eval_interval) == (0.1, 0.9, 0.95, 1e-8, 1.0, 250)
    c = t.parse_config(["--preset", "shakespeare", "--max_steps", "7", "--no-hellaswag"])
    assert c.data_dir == "tinyshakespeare_tokens" and c.max_steps == 7 and c.hellaswag is False
    assert (c.optimizer, c.schedule, c.muon_lr, c.max_lr, c.decay_frac) == ("muon", "wsd", 0.02, 6e-3, 0.2)  # the fast recipe
    help_text = run_script(TRAIN, "--help").stdout
    assert "--total_batch_size" in help_text and "tokens per optimizer step" in help_text


def test_ddp_on_two_cpu_processes_matches_one_process(shakespeare_shards, shared_data, tmp_path):
    """Same global batch: 1 process x 4 accumulation steps == 2 gloo processes x 2, with the fast
    recipe's Muon (AdamW runs the same way in the LoRA test). HellaSwag is split across the ranks and
    its counts all-reduced."""
    hellaswag = ["--hellaswag", "--hellaswag_limit", "30", "--hellaswag_data", shared_data / "hellaswag_val.jsonl"]
    muon = ["--optimizer", "muon", "--schedule", "wsd"]
    train(shakespeare_shards, tmp_path / "one", "--max_steps", "6", *hellaswag, *muon)
    result = train(shakespeare_shards, tmp_path / "two", "--max_steps", "6", *hellaswag, *muon, procs=2)
    assert "HellaSwag: 30 examples" in result.stdout and "split across 2 rank(s)" in result.stdout
    assert read_log(tmp_path / "one", "hella") == read_log(tmp_path / "two", "hella") != {}
    for stream in ("train", "val"):
        one, two = read_log(tmp_path / "one", stream), read_log(tmp_path / "two", stream)
        assert one.keys() == two.keys() and len(one) >= 2
        for step in one:
            # Muon orthogonalises each update in bfloat16 (torch.optim.Muon's Newton-Schulz iterations): a
            # gradient summed in another order over two ranks, different in its last float32 bit, can round
            # to another bf16 update, and the runs drift apart by up to ~5e-5 in 6 steps (measured on two
            # machines: 0 and 4.5e-5). Ranks that did not average their gradients differ by ~1e-2.
            assert one[step] == pytest.approx(two[step], abs=2e-4)
    assert read_log(tmp_path / "one", "train")[5] < read_log(tmp_path / "one", "train")[0]


@pytest.mark.parametrize("recipe", [[], ["--optimizer", "muon", "--schedule", "wsd", "--decay_frac", "0.5"]],
                         ids=["adamw-cosine", "muon-wsd"])
def test_resume_is_bitwise_exact(shakespeare_shards, tmp_path, recipe):
    n = 24
    train(shakespeare_shards, tmp_path / "straight", "--max_steps", n, *recipe)
    straight = read_log(tmp_path / "straight", "train")
    assert len(straight) == n

    # Half, stop (as if preempted), resume the other half.
    train(shakespeare_shards, tmp_path / "halves", "--max_steps", n, "--stop_after_step", n // 2, *recipe)
    assert sorted(p.name for p in (tmp_path / "halves").glob("ckpt_*.pt")) == [f"ckpt_{n // 2:06d}.pt"]
    train(shakespeare_shards, tmp_path / "halves", "--max_steps", n, "--resume", *recipe)
    assert read_log(tmp_path / "halves", "train") == straight  # logged to 9 digits: bitwise the same float32s

    # The checkpoint loads with weights_only=True and carries everything a resume needs.
    checkpoint = t.load_checkpoint(tmp_path / "halves" / f"ckpt_{n:06d}.pt")
    assert {"model", "optimizers", "step", "loader", "rng", "config", "val_loss"} <= checkpoint.keys()
    assert checkpoint["step"] == n and checkpoint["loader"]["windows_taken"] > 0


def test_a_checkpoint_in_an_earlier_format_loads_and_resumes(shakespeare_shards, tmp_path):
    """Checkpoints written by earlier versions (one optimizer under "optimizer"; the loader's windows
    counted within their epoch, and no list of shards) still load in sample.py and resume exactly. A
    train shard of 33 windows of 64 tokens is an epoch; the run stops at step 10 (40 windows), in its second."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "s_val_000000.npy").symlink_to(next(shakespeare_shards.glob("*_val_*.npy")))
    np.save(data / "s_train_000001.npy", np.load(next(shakespeare_shards.glob("*_train_*.npy")))[: 33 * 64 + 1])
    train(data, tmp_path / "straight", "--max_steps", 12)
    run = tmp_path / "earlier"
    train(data, run, "--max_steps", 12, "--stop_after_step", 10)
    path = run / "ckpt_000010.pt"
    checkpoint = torch.load(path, weights_only=True)
    [checkpoint["optimizer"]] = checkpoint.pop("optimizers")  # AdamW, the only optimizer then
    loader = checkpoint["loader"]
    assert loader.pop("shards") and loader["epoch"] == 1 and loader["windows_taken"] == 40
    loader["windows_taken"] -= 33  # within the epoch
    torch.save(checkpoint, path)

    sample = run_script("sample.py", "--init_from", run, "--prompt", "ROMEO:", "--num_samples", "1", "--max_new_tokens", "4",
                        "--device", "cpu")
    assert sample.returncode == 0 and f"{path} (step 10)" in sample.stdout + sample.stderr, sample.stderr
    train(data, run, "--max_steps", 12, "--resume")
    assert read_log(run, "train") == read_log(tmp_path / "straight", "train")


def test_sigterm_resume_matches_uninterrupted(shakespeare_shards, tmp_path):
    """SIGTERM mid-run, then --resume, ends with the losses of a run that was never interrupted."""
    n = 30
    train(shakespeare_shards, tmp_path / "straight", "--max_steps", n)
    run_dir = tmp_path / "preempted"
    cmd = script_command(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", run_dir, *TINY, "--max_steps", n)
    proc = subprocess.Popen(cmd, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and ((run_dir / "log.txt").exists() and len(read_log(run_dir, "train"))) < 5:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM received" in output, output[-2000:]
    checkpoints = list(run_dir.glob("ckpt_*.pt"))
    assert len(checkpoints) == 1
    stopped_at = t.load_checkpoint(checkpoints[0])["step"]
    assert 5 <= stopped_at < n, "the run ended before the signal could interrupt it"
    train(shakespeare_shards, run_dir, "--max_steps", n, "--resume")
    assert read_log(run_dir, "train") == read_log(tmp_path / "straight", "train")
    assert read_log(run_dir, "val") == read_log(tmp_path / "straight", "val")


def test_bad_configs_give_one_line_errors(shakespeare_shards, tmp_path):
    def run(*args):
        return run_script(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", tmp_path / "run", *TINY, "--max_steps", "2", *args)

    assert_one_line_error(run("--total_batch_size", "300"), "--total_batch_size 300", "not a multiple")
    assert_one_line_error(run("--data_dir", tmp_path / "nowhere"), "no train shards", "fineweb.py")
    assert_one_line_error(run("--n_head", "5"), "divisible")
    # A checkpoint of a 32-token model cannot train on 64-token sequences.
    train(shakespeare_shards, tmp_path / "small", "--max_steps", "1")
    checkpoint = next((tmp_path / "small").glob("ckpt_*.pt"))
    assert_one_line_error(run("--init_from", checkpoint, "--block_size", "64", "--total_batch_size", "512"), "larger than the model")
    # A second run into the same folder would mix two runs.
    assert_one_line_error(
        run_script(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", tmp_path / "small", *TINY, "--max_steps", "1"),
        "already holds a run", "--resume",
    )


def test_fine_tune_from_a_hugging_face_directory(shakespeare_shards, tmp_path):
    source = t.GPT(t.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    t.save_hf(source, tmp_path / "hf")
    result = train(shakespeare_shards, tmp_path / "run", "--init_from", tmp_path / "hf", "--max_steps", "2")
    assert "model: " in result.stdout
    model = t.load_model(str(tmp_path / "run"))
    assert model.config.block_size == 64 and model.config.padded_vocab_size == 50304


def test_compiled_training_still_evaluates_and_samples(shakespeare_shards, shared_data, tmp_path):
    """torch.compile on: val loss, HellaSwag and sampling all run, without recompiling every step."""
    result = train(shakespeare_shards, tmp_path, "--compile", "on", "--max_steps", "4", "--eval_interval", "2",
                   "--hellaswag", "--hellaswag_limit", "8", "--hellaswag_data", shared_data / "hellaswag_val.jsonl",
                   "--sample_interval", "3", "--num_samples", "1", "--sample_tokens", "4", "--n_layer", "1",
                   env={"TORCH_LOGS": "recompiles"}, timeout=900)
    assert set(read_log(tmp_path, "val")) == {0, 2, 3} and set(read_log(tmp_path, "hella")) == {0, 2, 3}
    assert result.stdout.count("sample 0:") == 1  # at step 3
    # A few recompiles are expected (train vs no_grad eval, HellaSwag's shape); one per step is not.
    assert result.stderr.count("Recompiling function") <= 4, result.stderr[-3000:]


def test_quick_start_preset_end_to_end(tmp_path):
    """`train_gpt2.py --preset shakespeare`, shortened: prepares its own shards, trains, evaluates, samples."""
    result = run_script(TRAIN, "--preset", "shakespeare", "--max_steps", "6", "--warmup_steps", "3", "--eval_interval", "3",
                        "--sample_interval", "3", "--sample_tokens", "8", "--val_tokens", "4096", "--device", "cpu",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "tinyshakespeare_tokens").glob("*.npy")) == [
        "tinyshakespeare_train_000001.npy", "tinyshakespeare_val_000000.npy"]
    val = read_log(tmp_path / "log", "val")
    assert set(val) == {0, 3, 5} and val[5] < val[0] - 0.5
    assert len(re.findall(r"^sample 0: ['\"]ROMEO:", result.stdout, re.M)) == 2  # repr: "..." when the text has a '
    assert (tmp_path / "log" / "ckpt_000006.pt").exists() and (tmp_path / "log" / "train_config.json").exists()
    assert "done: step 6 of 6" in result.stdout


def test_muon_trains_exactly_the_block_matrices():
    """--optimizer muon: torch.optim.Muon gets the four weight matrices of every block, AdamW the rest
    (the tied token embedding/classifier, the position embeddings, every bias and LayerNorm)."""
    model = t.GPT(t.GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32))
    adamw, muon = t.configure_optimizers(model, t.Settings(optimizer="muon"), "cpu")
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    muon_names = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    adamw_names = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert muon_names == {f"transformer.h.{i}.{m}.weight" for i in range(3) for m in t.LORA_TARGETS}
    assert adamw_names == set(names.values()) - muon_names
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= adamw_names
    assert muon.param_groups[0]["lr"] == 0.02 and adamw.param_groups[0]["lr"] == 6e-4
    # AdamW alone (the default) has every parameter; weight decay on the matrices and embeddings only.
    (adamw,) = t.configure_optimizers(model, t.Settings(), "cpu")
    decayed = {names[id(p)] for group in adamw.param_groups if group["weight_decay"] for p in group["params"]}
    assert decayed == {name for name, p in model.named_parameters() if p.dim() == 2}
    assert all(group["weight_decay"] == 0 for group in adamw.param_groups if not {names[id(p)] for p in group["params"]} & decayed)


def test_training_graph_stays_static_after_evaluation_and_hellaswag(shakespeare_shards, shared_data):
    """As at step 0, evaluation comes first: the val loss with a partial last batch, then HellaSwag's
    batches of several lengths. Through compile_model's entries they may compile dynamically, but the
    training graph is then compiled once, with fixed shapes (no symbolic size among its inputs), and
    serves every step. (With one compiled entry for both, the training graph inherited symbolic B and T.)"""
    graphs = []  # (grad enabled, symbolic sizes among the inputs) of every graph dynamo compiles

    def backend(graph_module, example_inputs):
        symbolic = any(isinstance(i, torch.SymInt) or (isinstance(i, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in i.shape))
                       for i in example_inputs)
        graphs.append((torch.is_grad_enabled(), symbolic))
        return graph_module.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = t.GPT(t.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    compiled, evaluator = t.compile_model(model, backend=backend)
    no_autocast, scaler = contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False)
    val_loader = t.ValLoader(shakespeare_shards, 2, 32, val_tokens=5 * 32)  # 5 sequences in batches of 2: 2, 2, 1
    t.evaluate_val_loss(evaluator, val_loader, no_autocast, ddp=False)
    t.hellaswag_counts(evaluator, t.load_hellaswag(shared_data / "hellaswag_val.jsonl", limit=12), "cpu", batch_size=2)
    assert any(symbolic for grad, symbolic in graphs if not grad)  # evaluation did meet other shapes
    loader = t.TrainLoader(shakespeare_shards, 2, 32)
    optimizers = t.configure_optimizers(model, t.Settings(), "cpu")
    for _ in range(3):
        t.train_step(compiled, optimizers, loader.next_batch, 2, no_autocast, 1.0, scaler, ddp=False)
    assert [symbolic for grad, symbolic in graphs if grad] == [False]  # one training graph, fixed shapes


def test_one_process_under_torchrun_runs_without_ddp(monkeypatch):
    """torchrun --nproc_per_node=1 is one process: no process group, no DDP wrapper (which would only cut
    the compiled graph at its gradient buckets)."""
    import torch.distributed as dist

    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(name, value)
    assert t.setup_distributed("cpu") == (False, 0, 0, 1, "cpu")
    assert not dist.is_initialized()


def test_auto_dtype_is_float16_with_the_scaler_on_a_gpu_without_native_bf16(monkeypatch):
    """A T4 or V100 (before Ampere) only emulates bf16, far slower, though torch.cuda.is_bf16_supported()
    counts emulation by default: "auto" must pick float16 there, which trains with the gradient scaler."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert t.pick_dtype("auto", "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100, H100
    assert t.pick_dtype("auto", "cuda") == torch.bfloat16
    assert t.pick_dtype("auto", "cpu") == torch.float32
    _, scaler = t.mixed_precision("cpu", torch.float16)
    assert scaler.is_enabled() and not t.mixed_precision("cpu", torch.bfloat16)[1].is_enabled()
