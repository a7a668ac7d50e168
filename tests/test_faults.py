"""Nothing lost, no traceback, no wrong word: a full disk, a file that cannot be written, a fault on one
process of a torchrun, a flag that a preset would silently override. Each ends with one `error: ...`
line that says what failed, what was kept and what to do, and the run goes on exactly once it is fixed.

A small disk is simulated (mounting one needs privileges CI may not have): a sitecustomize.py, loaded by
every Python process the test starts, makes writes under one folder fail with ENOSPC once its files
would pass a size (and shutil.disk_usage report that disk), a file unwritable (EACCES), or a file that
stops taking writes past a size (EROFS). torch.save then fails as it does on a real full disk: the
OSError of the write, then a RuntimeError from its zip writer ("unexpected pos").
"""

import json
from pathlib import Path

import pytest
from conftest import TINY, TRAIN, assert_one_line_error, run_script, train

import plumbing
import settings
import train_gpt2 as t

SITECUSTOMIZE = r'''
import builtins, errno, io, os, shutil

DISK = os.environ.get("FAKE_DISK_DIR")  # a folder on a disk of FAKE_DISK_BYTES bytes
DISK_BYTES = int(os.environ.get("FAKE_DISK_BYTES", "0"))
READONLY = os.environ.get("FAKE_READONLY")  # a file that cannot be opened for writing
BREAK_PATH, _, BREAK_AT = os.environ.get("FAKE_BREAK", "").rpartition(":")  # a file that takes no more than N bytes
real_open, real_disk_usage = builtins.open, shutil.disk_usage


def under_disk(path):
    return bool(DISK) and os.path.commonpath([os.path.abspath(path), DISK]) == DISK


def used():
    total = 0
    for folder, _, files in os.walk(DISK):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


class Limited:
    def __init__(self, file, path):
        self._file, self._path = file, path

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        self._file.flush()
        if under_disk(self._path) and used() + size > DISK_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self._path == BREAK_PATH and os.path.getsize(self._path) + size > int(BREAK_AT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)


def fake_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
        path = os.path.abspath(os.fsdecode(file))
        if READONLY and path == READONLY:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        if under_disk(path) or path == BREAK_PATH:
            return Limited(real_open(file, mode, *args, **kwargs), path)
    return real_open(file, mode, *args, **kwargs)


def fake_disk_usage(path):
    if under_disk(path):
        taken = used()
        return shutil._ntuple_diskusage(DISK_BYTES, taken, max(0, DISK_BYTES - taken))
    return real_disk_usage(path)


builtins.open = io.open = fake_open
shutil.disk_usage = fake_disk_usage
'''


def faults(tmp_path, disk=None, disk_bytes=0, readonly=None, broken=None, broken_at=0) -> dict:
    """The environment of a process that meets these faults: `disk` a folder on a disk of disk_bytes,
    `readonly` a file it cannot write, `broken` a file that takes no more than broken_at bytes."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"PYTHONPATH": str(site)}
    if disk:
        env.update(FAKE_DISK_DIR=str(Path(disk).absolute()), FAKE_DISK_BYTES=str(disk_bytes))
    if readonly:
        env["FAKE_READONLY"] = str(Path(readonly).absolute())
    if broken:
        env["FAKE_BREAK"] = f"{Path(broken).absolute()}:{broken_at}"
    return env


def train_lines(run_dir) -> list[tuple[int, str]]:
    """(step, loss) of every `train` line of log.txt, in order: a resumed run's lines follow the first's."""
    rows = [line.split() for line in (Path(run_dir) / "log.txt").read_text().splitlines()]
    return [(int(step), value) for step, stream, value in rows if stream == "train"]


def test_a_disk_that_fills_mid_run_loses_nothing(shakespeare_shards, tmp_path):
    """Room for one checkpoint: the second save fails with one line that names the checkpoint to resume
    from and the room a checkpoint takes; no partial file stays on the full disk. --resume on that disk
    is refused before any work, as is a read-only log.txt; once both are fixed, it goes on exactly."""
    disk = tmp_path / "disk"
    disk.mkdir()
    run_dir = disk / "run"
    args = [TRAIN, "--data_dir", shakespeare_shards, "--log_dir", run_dir, *TINY, "--max_steps", "8", "--checkpoint_interval", "3"]
    full = faults(tmp_path, disk=disk, disk_bytes=30_000_000)  # a checkpoint takes 19.7 MB
    result = run_script(*args, env=full)
    assert_one_line_error(result, f"could not write checkpoint {run_dir / 'ckpt_000006.pt'}: no space left on the device",
                          "it takes ~19.", f"add --resume to continue from {run_dir / 'ckpt_000003.pt'}")
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == ["ckpt_000003.pt"]  # no ckpt_000006.pt.tmp

    again = run_script(*args, "--resume", env=full)  # the disk is still full: refused before any step
    assert_one_line_error(again, f"--log_dir {run_dir}: 10.", "free, and a checkpoint of this run takes ~19.")
    readonly = run_script(*args, "--resume", env=faults(tmp_path, readonly=run_dir / "log.txt"))
    assert_one_line_error(readonly, f"--log_dir {run_dir}: cannot write its log.txt (Permission denied)", "chmod u+w")
    assert "| loss " not in again.stdout + readonly.stdout  # no step trained

    train(shakespeare_shards, run_dir, "--max_steps", "8", "--checkpoint_interval", "3", "--resume")
    lines = train_lines(run_dir)
    first, resumed = dict(lines[:6]), dict(lines[6:])  # steps 0-5, then 3-7 again from ckpt_000003.pt
    assert sorted(first) == list(range(6)) and sorted(resumed) == list(range(3, 8))
    assert all(first[step] == resumed[step] for step in (3, 4, 5))  # bitwise: as if never stopped


def test_a_full_disk_at_the_start_is_one_line_before_any_work(shakespeare_shards, tmp_path):
    """An empty file needs no space, so the check of the folder writes a byte: a full disk is named before
    the data and the model are built, and no run folder is left behind."""
    disk = tmp_path / "disk"
    disk.mkdir()
    result = run_script(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", disk / "run", *TINY, "--max_steps", "4",
                        env=faults(tmp_path, disk=disk, disk_bytes=0))
    assert_one_line_error(result, f"--log_dir {disk / 'run'}: cannot write there: no space left on the device")
    assert not (disk / "run").exists()


def test_check_room_refuses_a_disk_without_room_for_one_checkpoint(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(plumbing, "free_bytes", lambda path: 25_000_000)
    with pytest.raises(plumbing.UserError, match="25.0 MB free, and a checkpoint of this run takes ~30.0 MB"):
        plumbing.check_room(tmp_path, 30_000_000, 3, said.append)
    plumbing.check_room(tmp_path, 10_000_000, 3, said.append)  # room for 2 of the 4 that --keep_checkpoints 3 needs
    assert said and "room for 2 more checkpoint(s) of ~10.0 MB, and --keep_checkpoints 3 needs 4" in said[0]


def test_checkpoint_bytes_is_what_a_checkpoint_takes(shakespeare_shards, tmp_path):
    model = t.GPT(t.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    for optimizer in ("adamw", "muon"):
        config = t.Settings(log_dir=str(tmp_path), optimizer=optimizer, max_steps=1)
        optimizers = t.configure_optimizers(model, config, "cpu")
        loss = model(*t.TrainLoader(shakespeare_shards, 2, 32).next_batch())[1]
        loss.backward()
        for opt in optimizers:
            opt.step()  # the optimizer's state exists after its first step
        loader = t.TrainLoader(shakespeare_shards, 2, 32)
        scaler = t.mixed_precision("cpu", t.pick_dtype("float32", "cpu"))[1]
        path = tmp_path / f"{optimizer}.pt"
        plumbing.save_checkpoint_file(t.checkpoint_state(1, model, optimizers, loader, config, None, scaler,
                                                         plumbing.rng_states("cpu")), path)
        assert abs(settings.checkpoint_bytes(model, config) / path.stat().st_size - 1) < 0.02, optimizer


def test_torchrun_a_full_disk_on_rank_0_is_its_line_only(shakespeare_shards, tmp_path):
    """Sharded on two processes, rank 0's save meets a full disk: every process learns it and stops; rank 0
    says why, rank 1 ends quietly (no gloo traceback), and torchrun's report names rank 0's line."""
    disk = tmp_path / "disk"
    disk.mkdir()
    run_dir = disk / "run"
    result = run_script(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", run_dir, *TINY, "--max_steps", "8",
                        "--checkpoint_interval", "3", "--shard", torchrun_procs=2,
                        env=faults(tmp_path, disk=disk, disk_bytes=40_000_000))  # a sharded checkpoint takes 26 MB
    line = f"error: could not write checkpoint {run_dir / 'ckpt_000006.pt'}: no space left on the device"
    assert_torchrun_one_line(result, line)
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == ["ckpt_000003.pt"]


def test_torchrun_a_fault_on_rank_0_mid_run_and_a_folder_in_use(shakespeare_shards, tmp_path):
    """log.txt stops taking writes mid-run (on rank 0, which alone writes it): its line, not rank 1's
    traceback. A folder another run holds, with --resume: rank 0's verdict ("in use") reaches rank 1,
    which never takes the lock and would otherwise tell the user to --overwrite a live run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.txt").write_text("")
    result = run_script(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", run_dir, *TINY, "--max_steps", "50",
                        "--overwrite", torchrun_procs=2, env=faults(tmp_path, broken=run_dir / "log.txt", broken_at=1500))
    assert_torchrun_one_line(result, f"error: could not write {run_dir / 'log.txt'}: Read-only file system",
                             "start over with --overwrite")

    held = tmp_path / "held"
    held.mkdir()
    (held / "log.txt").write_text("0 train 10.9\n")  # a run that has no checkpoint yet
    lock = plumbing.RunLock(held)
    try:
        result = run_script(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", held, *TINY, "--resume", torchrun_procs=2)
    finally:
        lock.release()
    assert_torchrun_one_line(result, f"error: {held}/ is in use by another run")
    assert "--overwrite" not in result.stderr


def assert_torchrun_one_line(result, line, *fragments):
    """A torchrun whose processes stopped: one `error:` line, the failed process's, no process's traceback
    (torchrun's own report follows it, and names the line as the root cause)."""
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(line), result.stderr[-3000:]
    assert all(fragment in errors[0] for fragment in fragments), errors[0]
    assert "[rank" not in result.stderr and "Connection closed" not in result.stderr, result.stderr[-3000:]
    assert f"traceback : {errors[0]}" in result.stderr  # torchrun's report: the root cause is our line


HELD_GROUP = r'''
import atexit, os, sys
sys.path.insert(0, REPO)
import torch, torch.distributed as dist
import plumbing

HELD = []


def main():
    dist.init_process_group("gloo")
    HELD.append(dist.distributed_c10d._get_default_group())  # as torch's caches hold FSDP2's mesh, and its group
    dist.barrier()
    dist.all_reduce(torch.ones(1000))
    dist.destroy_process_group()
    atexit.register(lambda: print("teardown ran", flush=True))
    print(f"rank {os.environ['RANK']} done")  # left in Python's buffer: the end must flush it
    if os.environ["RANK"] == "1" and len(sys.argv) > 1:
        raise plumbing.UserError(sys.argv[1])


plumbing.run_main(main)
'''


def test_torchrun_processes_end_without_the_teardown_that_aborts_gloo(tmp_path):
    """A process group that outlives destroy_process_group (torch's caches keep --shard's) is destroyed by
    the interpreter's teardown, where gloo's threads abort the process ("terminate called without an
    active exception", CI 2026-12-06) in about half of such 4-process runs: a torchrun process skips that
    teardown, its output flushed and its exit code kept, a UserError's line included."""
    script = tmp_path / "held_group.py"
    script.write_text(f"REPO = {str(Path(__file__).parents[1])!r}\n" + HELD_GROUP)
    buffered = {"PYTHONUNBUFFERED": ""}  # (the tests' default is unbuffered output)
    result = run_script(script, torchrun_procs=4, env=buffered)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(result.stdout.count(f"rank {r} done") == 1 for r in range(4)), result.stdout
    assert "teardown ran" not in result.stdout and "terminate" not in result.stderr

    result = run_script(script, "--data_dir nowhere: give a folder of shards", torchrun_procs=2, env=buffered)
    assert_torchrun_one_line(result, "error: --data_dir nowhere: give a folder of shards")
    assert "rank 1 done" in result.stdout and "teardown ran" not in result.stdout


def test_fineweb_on_a_disk_that_fills_keeps_its_shards_and_goes_on(tmp_path):
    """The val shard fits, the train shard does not: one line, no partial file, and the same command once
    there is room writes the shards of a run that never stopped, byte for byte."""
    disk = tmp_path / "disk"
    disk.mkdir()
    command = ["fineweb.py", "--source", "shakespeare", "--out_dir"]
    result = run_script(*command, disk / "tok", env=faults(tmp_path, disk=disk, disk_bytes=150_000))
    assert_one_line_error(result, f"could not write {disk / 'tok' / 'tinyshakespeare_train_000001.npy'}: no space left",
                          "run the same command again")
    assert sorted(p.name for p in (disk / "tok").iterdir()) == ["meta.json", "tinyshakespeare_val_000000.npy"]
    for out_dir in (disk / "tok", tmp_path / "straight"):
        assert run_script(*command, out_dir).returncode == 0
    for shard in (tmp_path / "straight").glob("*.npy"):
        assert (disk / "tok" / shard.name).read_bytes() == shard.read_bytes()


@pytest.mark.parametrize("argv, words", [
    (["--preset", "shakespeare", "--model", "gpt2-xl"], "--model gpt2-xl has no effect beside --preset, which sets its own model (4 layers"),
    (["--preset", "shakespeare", "--hellaswag_limit", "100"], "--hellaswag_limit has no effect without --hellaswag (the preset turns"),
    (["--sample_interval", "0", "--sample_prompt", "Hi"], "--sample_prompt has no effect with --sample_interval 0"),
])
def test_a_flag_a_preset_would_override_is_refused(argv, words):
    with pytest.raises(plumbing.UserError, match=words.replace("(", r"\(")):
        t.parse_config(argv)


def test_a_flag_beside_a_preset_wins(shakespeare_shards):
    config = t.parse_config(["--preset", "fast", "--model", "gpt2-medium"])  # the fast recipe, medium's shape and batch
    assert (config.n_layer, config.optimizer, config.max_steps, config.micro_batch_size) == (24, "muon", 25_000, 32)
    config = t.parse_config(["--preset", "shakespeare", "--model", "gpt2-xl", "--n_layer", "4", "--n_head", "4", "--n_embd", "128"])
    assert config.n_layer == 4  # the shape given beside --model wins, as --model's help says


def test_json_and_folder_outputs_on_a_full_disk_leave_nothing_half_written(tmp_path):
    """/dev/full takes no byte (ENOSPC): a result file and an exported folder are whole or left as they were."""
    out = tmp_path / "out.json"
    out.write_text("{}")
    (tmp_path / "out.json.part").symlink_to("/dev/full")
    with pytest.raises(plumbing.UserError, match=f"could not write --json {out}: no space left on the device"):
        plumbing.write_json_atomically(out, dict(a=1), "--json")
    assert out.read_text() == "{}" and not (tmp_path / "out.json.part").is_symlink()

    with pytest.raises(plumbing.UserError, match="could not write Hugging Face folder .*: no space left on the device"):
        with plumbing.folder_written_whole(tmp_path / "hf", what="Hugging Face folder") as folder:
            (folder / "config.json").write_text("{}")
            (folder / "model.safetensors").symlink_to("/dev/full")
            with open(folder / "model.safetensors", "wb") as f:
                f.write(b"weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no hf/, no partial folder

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with plumbing.folder_written_whole(tmp_path / "hf") as folder:
        (folder / "config.json").write_text(json.dumps({}))
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "notes.txt"]


def test_compile_without_a_cxx_compiler_is_one_line_before_the_log_starts(shakespeare_shards, tmp_path):
    """torch.compile needs a C++ compiler (inductor's CPU kernels; Triton's launcher on GPUs). Without one,
    --compile on is refused before the log starts, so the same command with --compile off is not told that
    the folder "already holds a run"; --compile auto on a GPU trains uncompiled, saying so."""
    import sys

    no_compiler = {"PATH": str(Path(sys.executable).parent)}  # python, and no g++, c++, cc or clang
    result = run_script(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", tmp_path / "run", *TINY, "--max_steps", "2",
                        "--compile", "on", env=no_compiler)
    assert_one_line_error(result, "--compile on", "C++ compiler", "--compile off")
    assert not (tmp_path / "run" / "log.txt").exists()
    train(shakespeare_shards, tmp_path / "run", "--max_steps", "2", env=no_compiler)  # the same run, uncompiled


def test_compile_auto_falls_back_with_a_note_where_it_cannot_build(monkeypatch):
    notes = []
    monkeypatch.setattr(settings, "compile_problem", lambda device: "InvalidCxxCompiler: No working C++ compiler found")
    assert settings.resolve_compile("auto", "cuda", notes.append) is False
    assert len(notes) == 1 and notes[0].startswith("note: torch.compile cannot build kernels here (InvalidCxxCompiler")
    with pytest.raises(plumbing.UserError, match="--compile on: torch.compile cannot build kernels"):
        settings.resolve_compile("on", "cpu", notes.append)
    monkeypatch.setattr(settings, "compile_problem", lambda device: None)
    assert settings.resolve_compile("auto", "cuda", notes.append) and not settings.resolve_compile("auto", "cpu")
    assert settings.resolve_compile("off", "cuda") is False and len(notes) == 1
