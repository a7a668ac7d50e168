"""The one GPU command (.ci/gpu_checks.sh), dry-run on a CPU at toy sizes so that it cannot rot: every
part runs, and the results come back as the two files a short GPU rental returns. Its inputs are checked
before the first part, and its helpers (.ci/scoreboard.py, bench.py's decode figure) do what they say."""

import importlib.util
import json
import re
import shutil
import statistics
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch.nn.functional as F

from conftest import REPO_ROOT, assert_one_line_error, script_env

spec = importlib.util.spec_from_file_location("scoreboard", REPO_ROOT / ".ci" / "scoreboard.py")
scoreboard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scoreboard)


def gpu_checks(*args, env=None, timeout=60):
    return subprocess.run(["bash", ".ci/gpu_checks.sh", *map(str, args)], cwd=REPO_ROOT,
                          env=script_env({"PYTHON": sys.executable, **(env or {})}), capture_output=True, text=True,
                          timeout=timeout)


def speeds_after_warmup(log: str) -> list[float]:
    """tok/s of a run's steps after its first three, read from its log as a person would: the figure beside
    'tok/s' (ours: 'tok/s 1,234 |'; llm.c: '| 1234 tok/s)') or 'tok/sec:' (build-nanogpt) on each step line."""
    figures = [re.search(r"tok/s ([\d,]+) \||tok/sec: ([\d.]+)|\| (\d+) tok/s\)", line) for line in log.splitlines()
               if line.startswith("step ")]
    return [float(next(g for g in m.groups() if g).replace(",", "")) for m in figures][3:]


def test_gpu_checks_dry_run_runs_every_part_and_packs_two_files(shakespeare_shards, shared_data, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(shakespeare_shards, data / "shards")
    shutil.copy(shared_data / "hellaswag_val.jsonl", data)
    result = gpu_checks("--dry-run", "--data", data, "--out", out, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    for line in ("scoreboard: the peers are fakes", "scoreboard ours: ", "scoreboard build-nanogpt: ",
                 "scoreboard llm.c-pytorch: ", "train step profile (toy GPT, B=2, T=64, cpu): CPU ops' self time",
                 "decode B=1: 4 new tokens ", "; 8 new tokens ", "decode B=4: 4 new tokens ", "decode B=32: 8 new tokens ",
                 "decode speed = B x new tokens / the time of a whole generate() call", "generate B=4: ",
                 "train muon plain: ", "train adamw chunked: ", "bench.py decode B=4: not measured", "medium plain: ",
                 "medium shard: ", "medium shard_ac: ", "logits CUDA vs CPU", "loop: a compiled run", "2 samples",
                 "GPU checks: all passed (17 parts)"):
        assert line in summary, (line, summary)
    assert "FAILED" not in summary and "SKIPPED" not in summary
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        logs = {name: tar.extractfile(name).read().decode() for name in names if re.fullmatch(r"\./train_\w+\.log", name)}
    assert {"./hardware.txt", "./equivalence.txt", "./train_profile.txt", "./decode.txt", "./bench_decode.json",
            "./run_muon_plain/log.txt", "./short/log.txt"} <= names
    assert set(logs) == {"./train_ours_1.log", "./train_bng_1.log", "./train_ours_2.log", "./train_bng_2.log",
                         "./train_llmc_1.log"}
    assert not any(name.endswith(".pt") for name in names)  # checkpoints stay behind: the tarball must come back small
    # Each ratio line agrees with the steady steps of the logs it came from, recomputed here from the tarball.
    def median_of(kind):
        return statistics.median([s for name, log in logs.items() if f"_{kind}_" in name for s in speeds_after_warmup(log)])

    for peer, kind in (("build-nanogpt", "bng"), ("llm.c-pytorch", "llmc")):
        match = re.search(rf"^ratio train 124M ours/{re.escape(peer)}: (\d+\.\d\d\d)x \(ours ([\d,]+) tok/s, "
                          rf"theirs ([\d,]+) tok/s, cpu\)$", summary, re.MULTILINE)
        assert match, (peer, summary)
        ours, theirs = median_of("ours"), median_of(kind)
        assert match.groups() == (f"{ours / theirs:.3f}", f"{ours:,.0f}", f"{theirs:,.0f}"), (match.group(0), ours, theirs)


# ---------------------------------------------------------------------------------------------------
# Bad inputs: one line, before the first part (no "== part" on stdout), and never a verdict


@pytest.fixture
def data(tmp_path):
    """A data folder that passes the script's checks (they look at what is there, not inside)."""
    (tmp_path / "data" / "shards").mkdir(parents=True)
    (tmp_path / "data" / "hellaswag_val.jsonl").touch()
    return tmp_path / "data"


def assert_refused_before_any_part(result, *fragments):
    assert_one_line_error(result, *fragments)
    assert "== " not in result.stdout and "GPU checks:" not in result.stdout, result.stdout


def test_gpu_checks_refuse_a_missing_data_folder(tmp_path):
    result = gpu_checks("--dry-run", "--data", tmp_path / "none", "--out", tmp_path / "out")
    assert result.returncode == 1
    assert_refused_before_any_part(result, "--prepare")


def test_gpu_checks_refuse_an_out_that_is_a_file(data, tmp_path):
    (tmp_path / "results").write_text("not a folder")
    result = gpu_checks("--dry-run", "--data", data, "--out", tmp_path / "results")
    assert_refused_before_any_part(result, "--out", "is a file")
    assert (tmp_path / "results").read_text() == "not a folder"


def test_gpu_checks_refuse_an_out_that_cannot_be_written(data, tmp_path):
    (tmp_path / "a_file").touch()  # (as root, a folder without write permission would still be written)
    result = gpu_checks("--dry-run", "--data", data, "--out", tmp_path / "a_file" / "out")
    assert_refused_before_any_part(result, "--out", "cannot write")


@pytest.mark.parametrize("seconds", ["8m", "0", "-60", "1e3", "480s"])
def test_gpu_checks_refuse_a_time_budget_that_is_not_whole_seconds(data, tmp_path, seconds):
    result = gpu_checks("--dry-run", "--data", data, "--out", tmp_path / "out", env={"GPU_CHECKS_SECONDS": seconds})
    assert_refused_before_any_part(result, f"GPU_CHECKS_SECONDS={seconds}")
    assert not (tmp_path / "out").exists()


def test_gpu_checks_refuse_a_skip_that_names_no_part(data, tmp_path):
    result = gpu_checks("--dry-run", "--data", data, "--out", tmp_path / "out", env={"GPU_CHECKS_SKIP": "train_muon decode_B1"})
    assert_refused_before_any_part(result, "GPU_CHECKS_SKIP", "decode_B1", "train_ours_1")  # the parts it could name


def test_gpu_checks_refuse_a_python_that_is_not_there(data, tmp_path):
    result = gpu_checks("--dry-run", "--data", data, "--out", tmp_path / "out", env={"PYTHON": str(tmp_path / "python")})
    assert_refused_before_any_part(result, "PYTHON=")


def test_gpu_checks_refuse_an_out_without_a_value(data):
    result = gpu_checks("--dry-run", "--data", data, "--out")
    assert result.returncode == 2
    assert_refused_before_any_part(result, "--out needs a value")


def test_a_gpu_run_without_the_peers_is_refused_unless_they_are_skipped(data, tmp_path):
    result = gpu_checks("--data", data, "--out", tmp_path / "out")  # not a dry run: the real peers are due
    assert_refused_before_any_part(result, "--prepare --peers", "GPU_CHECKS_SKIP")


def test_skipped_parts_are_named_and_no_pass(data, tmp_path):
    """Every part left out: the verdict says nothing ran (exit 1); one part run: it says how many were
    skipped. Never "all passed" where a part did not run."""
    everything = "train decode equivalence bench medium loop"
    result = gpu_checks("--dry-run", "--data", data, "--out", tmp_path / "out", env={"GPU_CHECKS_SKIP": everything})
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert result.returncode == 1, summary
    assert summary.count("SKIPPED ") == 17 and "all passed" not in summary
    assert summary.splitlines()[-1].startswith("GPU checks: no part ran: 0 of 17 parts passed, 17 skipped, not run (train_ours_1 ")

    all_but_one = "train_ours train_bng_2 train_llmc train_profile train_muon train_adamw decode equivalence bench medium loop"
    result = gpu_checks("--dry-run", "--data", data, "--out", tmp_path / "out", env={"GPU_CHECKS_SKIP": all_but_one})
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert result.returncode == 0, summary
    assert summary.splitlines()[-1] == ("GPU checks: 1 of 17 parts passed, 16 skipped, not run (train_ours_1 train_ours_2 "
                                        "train_bng_2 train_llmc_1 train_profile decode decode_profile equivalence train_muon_plain "
                                        "train_adamw_chunked bench_decode medium_plain medium_shard medium_shard_ac "
                                        "loop_stop loop_resume)")


# ---------------------------------------------------------------------------------------------------
# .ci/scoreboard.py: the peers' data and patches


def test_train_shards_are_written_in_llm_c_format(tmp_path):
    """llm.c's loader reads a header of 256 int32 (magic 20240520, version 1, token count), then uint16 tokens."""
    tokens = np.array([50256, 15496, 11, 995, 0, 65535], dtype=np.uint16)
    scoreboard.write_llmc_shard(tokens, tmp_path / "x_train_000001.bin")
    raw = (tmp_path / "x_train_000001.bin").read_bytes()
    header = np.frombuffer(raw[:1024], dtype=np.int32)
    assert header[:3].tolist() == [20240520, 1, 6] and not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype=np.uint16).tolist() == tokens.tolist()


def fake_checkouts(tmp_path, use_compile_line="use_compile = False # TODO"):
    """Stand-ins for the peers' scripts, holding only the lines that --prepare looks for."""
    (tmp_path / "peers" / "build-nanogpt").mkdir(parents=True)
    (tmp_path / "peers" / "llm.c").mkdir()
    (tmp_path / "peers" / "build-nanogpt" / "train_gpt2.py").write_text(
        "\n".join(["total_batch_size = 524288", "B = 64", "T = 1024", '        data_root = "edu_fineweb10B"',
                   use_compile_line, 'print(f"... | tok/sec: {tokens_per_sec:.2f}")', ""]))
    (tmp_path / "peers" / "llm.c" / "train_gpt2.py").write_text("\n".join(scoreboard.LLMC_FLAGS) + "\n")
    (tmp_path / "data" / "shards").mkdir(parents=True)
    np.save(tmp_path / "data" / "shards" / "x_train_000001.npy", np.arange(100, dtype=np.uint16))
    return tmp_path / "peers", tmp_path / "data"


def test_prepare_patches_build_nanogpt_compiled_and_leaves_llm_c_as_it_is(tmp_path):
    peers, data = fake_checkouts(tmp_path)
    scoreboard.main(["prepare", "--peers", str(peers), "--data", str(data)])
    patched = (data / "peers" / "build-nanogpt" / "train_gpt2.py").read_text().splitlines()
    assert patched[4].startswith("use_compile = True") and "use_compile = False" not in "\n".join(patched)
    assert (data / "peers" / "llm.c" / "train_gpt2.py").read_text() == (peers / "llm.c" / "train_gpt2.py").read_text()
    assert "def iterate_examples" in (data / "peers" / "build-nanogpt" / "hellaswag.py").read_text()
    assert (data / "peers" / "llmc_data" / "x_train_000001.bin").stat().st_size == 1024 + 200


def test_prepare_fails_in_one_line_when_a_patch_does_not_apply(tmp_path):
    peers, data = fake_checkouts(tmp_path, use_compile_line="use_compile = True")
    result = subprocess.run([sys.executable, ".ci/scoreboard.py", "prepare", "--peers", peers, "--data", data],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, "build-nanogpt", "use_compile = False")


# ---------------------------------------------------------------------------------------------------
# bench.py: one definition of the decode figure; no row that times one thing twice


def test_the_decode_figure_is_a_whole_generate_call_after_two_warm_up_calls(monkeypatch):
    import bench

    clock, calls = [0.0], []

    def generate():  # 0.5 s a call, except the two warm-up calls (compiling, recording the graphs)
        calls.append(1)
        clock[0] += 30.0 if len(calls) <= 2 else 0.5

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    speed = bench.time_generate(generate, batch_size=4, new_tokens=256, device="cpu")
    assert len(calls) == 5 and speed == dict(batch_size=4, new_tokens=256, ms_per_step=500 / 256, tok_per_s=4 * 256 / 0.5)


def test_bench_skips_the_chunked_loss_row_on_a_torch_without_it(monkeypatch, tmp_path, capsys):
    import bench

    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    bench.main(["--model", "tiny", "--device", "cpu", "--skip", "train,hellaswag,sample,decode,finetune",
                "--json", str(tmp_path / "bench.json")])
    assert "chunked loss row skipped: torch " in capsys.readouterr().out
    assert json.loads((tmp_path / "bench.json").read_text())["optimisations"] == []


def test_bench_skips_the_compiled_decode_row_where_compile_is_off(monkeypatch, tmp_path, capsys):
    import bench

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    bench.main(["--model", "tiny", "--device", "cpu", "--block_size", "64", "--sample_tokens", "8",
                "--skip", "train,loss,hellaswag,sample,finetune", "--json", str(tmp_path / "bench.json")])
    assert "compiled decode step row skipped" in capsys.readouterr().out
    assert json.loads((tmp_path / "bench.json").read_text())["optimisations"] == []
