"""A run is never lost: one run per folder, checkpoints only from finite steps, a full disk or a
broken checkpoint never ends a run's future, and --resume says what it changes."""

import random
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import TINY, TRAIN, assert_one_line_error, read_log, run_script, script_command, script_env, train

import plumbing
import train_gpt2 as t


def test_one_run_per_folder_and_a_killed_run_leaves_no_lock(shakespeare_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = script_command(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", run_dir, *TINY, "--max_steps", "5000")
    first = subprocess.Popen(cmd, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(read_log(run_dir, "train") if (run_dir / "log.txt").exists() else {}) < 2:
            time.sleep(0.1)
        second = run_script(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", run_dir, *TINY, "--max_steps", "4",
                            "--resume")
        assert_one_line_error(second, "in use by another run", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)  # no cleanup at all: the OS drops the lock with the process
        first.wait()
    train(shakespeare_shards, run_dir, "--max_steps", "4", "--overwrite")


def test_non_finite_steps_never_reach_a_checkpoint_and_the_named_one_trains_on(shakespeare_shards, tmp_path):
    """A learning rate of 1e38 from step 8 on: step 8 is still finite, but its update breaks the weights,
    and steps 9 and 10 are not. The run stops after --max_bad_steps, writes no checkpoint from broken
    weights, keeps the last good one although it keeps only one, puts the one saved after step 8 aside
    and names the good one, from which --resume trains on exactly like a run that never broke."""
    train(shakespeare_shards, tmp_path / "straight", "--max_steps", "12", "--checkpoint_interval", "4")
    run_dir = tmp_path / "run"
    train(shakespeare_shards, run_dir, "--max_steps", "12", "--checkpoint_interval", "4", "--stop_after_step", "8")
    result = run_script(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", run_dir, *TINY, "--max_steps", "12",
                        "--resume", "--max_lr", "1e38", "--max_bad_steps", "2", "--checkpoint_interval", "1",
                        "--keep_checkpoints", "1")
    last = assert_one_line_error(result, "2 non-finite steps in a row at step 10", f"Last good checkpoint: {run_dir / 'ckpt_000008.pt'}")
    assert "ckpt_000009.pt.nonfinite" in last and "no checkpoint after step 9" in result.stdout
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == ["ckpt_000008.pt", "ckpt_000009.pt.nonfinite"]

    train(shakespeare_shards, run_dir, "--max_steps", "12", "--checkpoint_interval", "4", "--resume")
    assert read_log(run_dir, "train") == read_log(tmp_path / "straight", "train")  # bitwise, steps 8 to 11 again


def test_a_full_disk_during_a_save_loses_nothing(shakespeare_shards, tmp_path):
    """The temp file of a checkpoint lands on /dev/full (a real ENOSPC): one clear line, no temp file
    left, and the previous checkpoint intact."""
    model = t.GPT(t.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    config = t.Settings(log_dir=str(tmp_path))
    optimizers = t.configure_optimizers(model, config, "cpu")
    loader = t.TrainLoader(shakespeare_shards, 2, 32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    first = plumbing.checkpoint_path(tmp_path, 1)
    plumbing.save_checkpoint_file(t.checkpoint_state(1, model, optimizers, loader, config, None, scaler,
                                                     plumbing.rng_states("cpu")), first)
    (tmp_path / "ckpt_000002.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(plumbing.UserError, match=f"no space left on the device.*--resume to continue from {first}"):
        plumbing.save_checkpoint_file(t.checkpoint_state(2, model, optimizers, loader, config, None, scaler,
                                                         plumbing.rng_states("cpu")), plumbing.checkpoint_path(tmp_path, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001.pt"]
    assert plumbing.load_checkpoint(first)["step"] == 1


def test_resume_skips_an_unreadable_checkpoint_and_a_stale_temp_file(shakespeare_shards, tmp_path):
    train(shakespeare_shards, tmp_path / "straight", "--max_steps", "12")
    run_dir = tmp_path / "run"
    train(shakespeare_shards, run_dir, "--max_steps", "12", "--checkpoint_interval", "4", "--stop_after_step", "8")
    newest = run_dir / "ckpt_000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    (run_dir / "ckpt_000009.pt.tmp").write_bytes(b"half a save")  # a save cut short by a kill
    assert t.load_model(str(run_dir)).source.startswith(str(run_dir / "ckpt_000004.pt"))  # sample.py & co. skip it too
    result = train(shakespeare_shards, run_dir, "--max_steps", "12", "--checkpoint_interval", "4", "--resume")
    assert "ckpt_000008.pt is unreadable" in result.stderr and f"resuming from {run_dir / 'ckpt_000004.pt'}" in result.stdout
    assert read_log(run_dir, "train") == read_log(tmp_path / "straight", "train")
    assert not list(run_dir.glob("*.tmp"))
    # Set aside, so that it is never taken for the newest again (nor keeps a good one from being kept).
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == ["ckpt_000004.pt", "ckpt_000008.pt", "ckpt_000008.pt.unreadable",
                                                              "ckpt_000012.pt"]


def test_resume_applies_and_prints_changed_settings(shakespeare_shards, tmp_path):
    train(shakespeare_shards, tmp_path, "--max_steps", "8", "--stop_after_step", "4")
    result = train(shakespeare_shards, tmp_path, "--max_steps", "8", "--resume", "--max_lr", "5e-4", "--beta2", "0.99")
    assert "applying settings changed since the saved run: --max_lr 0.001 -> 0.0005, --beta2 0.95 -> 0.99" in result.stdout
    (adamw,) = t.load_checkpoint(tmp_path / "ckpt_000008.pt")["optimizers"]
    assert {(g["peak_lr"], g["betas"]) for g in adamw["param_groups"]} == {(5e-4, (0.9, 0.99))}
    config = t.Settings(max_lr=5e-4, warmup_steps=3, max_steps=8)
    assert read_log(tmp_path, "lr")[6] == pytest.approx(5e-4 * t.lr_schedule(6, config), rel=1e-6)


def test_checkpoints_rotate_and_leave_no_temp_files(shakespeare_shards, tmp_path):
    train(shakespeare_shards, tmp_path, "--max_steps", "7", "--checkpoint_interval", "2", "--keep_checkpoints", "2")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt")) == ["ckpt_000006.pt", "ckpt_000007.pt"]


def test_resume_on_another_number_of_ranks_after_an_epoch_ends(shakespeare_shards, tmp_path):
    """A train shard of 33 windows of 64 tokens: an epoch is 8 steps of 4 windows. Stop at step 10, in
    the second epoch, on one process; go on with two: the losses of a straight one-process run."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "s_val_000000.npy").symlink_to(next(shakespeare_shards.glob("*_val_*.npy")))
    np.save(data / "s_train_000001.npy", np.load(next(shakespeare_shards.glob("*_train_*.npy")))[: 33 * 64 + 1])
    train(data, tmp_path / "straight", "--max_steps", "14")
    train(data, tmp_path / "run", "--max_steps", "14", "--stop_after_step", "10")
    assert t.load_checkpoint(tmp_path / "run" / "ckpt_000010.pt")["loader"]["epoch"] == 1  # past the rollover
    train(data, tmp_path / "run", "--max_steps", "14", "--resume", procs=2)
    straight, resumed = read_log(tmp_path / "straight", "train"), read_log(tmp_path / "run", "train")
    assert resumed.keys() == straight.keys()
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5)


def test_fp16_with_a_gradient_scaler_trains_and_resumes_exactly(shakespeare_shards, tmp_path):
    fp16 = ["--dtype", "float16", "--max_steps", "4", "--total_batch_size", "128", "--eval_interval", "0"]
    train(shakespeare_shards, tmp_path / "straight", *fp16)
    train(shakespeare_shards, tmp_path / "run", *fp16, "--stop_after_step", "2")
    assert t.load_checkpoint(tmp_path / "run" / "ckpt_000002.pt")["scaler"]["scale"] > 0
    train(shakespeare_shards, tmp_path / "run", *fp16, "--resume")
    assert read_log(tmp_path / "run", "train") == read_log(tmp_path / "straight", "train")


def test_random_states_survive_a_checkpoint(tmp_path):
    """Python's, NumPy's and torch's generators, through a file and torch.load(weights_only=True)."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(plumbing.rng_states("cpu"), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    plumbing.set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True), "cpu")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla T4", 65e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA RTX A6000", None), ("NVIDIA GeForce RTX 4060", None),
])
def test_mfu_peak_is_looked_up_by_whole_words(name, flops):
    assert plumbing.gpu_peak_flops(name) == flops


def test_weights_stay_tied_after_loading(shakespeare_shards, tmp_path):
    """The classifier and the token embedding are one tensor in every model that comes back from disk."""
    train(shakespeare_shards, tmp_path, "--max_steps", "2", "--stop_after_step", "1")
    for model in (t.load_model(str(tmp_path)), t.build_model(t.Settings(), t.load_checkpoint(tmp_path / "ckpt_000001.pt"))):
        assert model.lm_head.weight is model.transformer.wte.weight


def test_a_lora_fine_tune_outlives_its_base(shakespeare_shards, tmp_path):
    """A LoRA run on a checkpoint of another run keeps a copy of the weights it adapts in its own folder:
    when the base run trains on and rotates that checkpoint out, and even when the base folder is gone,
    the fine-tune still loads (sample.py), resumes, and names the base it adapted."""
    import shutil

    base = tmp_path / "base"
    train(shakespeare_shards, base, "--max_steps", "4", "--keep_checkpoints", "1")
    base_checkpoint = base / "ckpt_000004.pt"
    lora = tmp_path / "lora"
    lora_args = ["--init_from", base_checkpoint, "--lora_rank", "2", "--max_steps", "4", "--eval_interval", "2"]
    train(shakespeare_shards, lora, *lora_args, "--stop_after_step", "2")
    assert (lora / "lora_base.pt").exists() and t.load_checkpoint(lora / "lora_base.pt")["lora"] is None
    train(shakespeare_shards, base, "--max_steps", "8", "--keep_checkpoints", "1", "--checkpoint_interval", "1", "--resume")
    assert not base_checkpoint.exists()  # rotated out
    shutil.rmtree(base)
    result = train(shakespeare_shards, lora, *lora_args, "--resume")
    assert f"from {lora / 'ckpt_000002.pt'} (step 2)" in result.stdout  # a resumed run says what it resumed
    sample = run_script("sample.py", "--init_from", lora, "--max_new_tokens", "3", "--num_samples", "1")
    assert sample.returncode == 0, sample.stderr
    assert f"LoRA rank 2 on {base_checkpoint}, merged" in sample.stdout


def test_a_second_ctrl_c_stops_at_once_with_one_line(shakespeare_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(shakespeare_shards, run_dir, "--max_steps", "2")
    before = {p.name: p.read_bytes() for p in run_dir.glob("ckpt_*.pt")}
    cmd = script_command(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", run_dir, *TINY, "--max_steps", "5000", "--resume")
    proc = subprocess.Popen(cmd, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_log(run_dir, "train")) < 5:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    seen = []  # the second Ctrl-C once the first is handled (two at once may arrive as one), while the step runs
    for line in proc.stdout:
        seen.append(line)
        if "SIGINT received" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    out = "".join(seen) + out
    assert_one_line_error(subprocess.CompletedProcess(cmd, proc.returncode, out, err), "second Ctrl-C", "--resume")
    assert {p.name: p.read_bytes() for p in run_dir.glob("ckpt_*.pt")} == before  # nothing lost
    train(shakespeare_shards, run_dir, "--max_steps", "6", "--resume")


def test_a_pretrained_run_records_its_model_shape_and_resumes(shakespeare_shards, tmp_path):
    """--init_from: train_config.json and the checkpoint record the model's own shape, not the flags'
    defaults (12 layers), and --resume is not refused over the difference."""
    import json

    t.save_hf(t.GPT(t.GPTConfig(block_size=64, n_layer=3, n_head=2, n_embd=32)), tmp_path / "hf")
    shapeless = [flag for i, flag in enumerate(TINY) if flag not in ("--n_layer", "--n_head", "--n_embd")
                 and TINY[i - 1] not in ("--n_layer", "--n_head", "--n_embd")]  # the flags' defaults: 12 layers

    def train_from_hf(*extra):
        result = run_script(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", tmp_path / "run", *shapeless,
                            "--init_from", tmp_path / "hf", "--max_steps", "4", *extra)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    train_from_hf("--stop_after_step", "2")
    settings = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (settings["n_layer"], settings["n_head"], settings["n_embd"]) == (3, 2, 32)
    result = train_from_hf("--resume")
    applied = [line for line in result.stdout.splitlines() if line.startswith("resume: applying")]
    assert not any("--n_layer" in line for line in applied), applied


def test_the_commands_printed_at_the_end_paste_into_a_shell(shakespeare_shards, tmp_path):
    """A run folder with a space and a quote in its name: each command of the summary, pasted into bash,
    gets the folder as one argument."""
    import shlex

    run_dir = tmp_path / "my run's folder"
    out = train(shakespeare_shards, run_dir, "--max_steps", "1").stdout
    commands = [line.split("  #")[0].strip() for line in out[out.index("next:"):].splitlines()[1:]]
    assert shlex.split(commands[0]) == ["python", "sample.py", "--init_from", f"{run_dir}/"]
    assert shlex.split(commands[1]) == ["python", "hellaswag.py", "--model", f"{run_dir}/"]
    assert f"load_model({str(run_dir) + '/'!r})" in shlex.split(commands[2])[2]
    assert shlex.split(commands[3])[0] == f"RUN_DIR={run_dir}"
