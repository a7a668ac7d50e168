"""The one GPU command (.ci/gpu_checks.sh), dry-run on a CPU at toy sizes so that it cannot rot: every
part runs, and the results come back as the two files a short GPU rental returns."""

import shutil
import subprocess
import sys
import tarfile

from conftest import REPO_ROOT, script_env


def test_gpu_checks_dry_run_runs_every_part_and_packs_two_files(shakespeare_shards, shared_data, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(shakespeare_shards, data / "shards")
    shutil.copy(shared_data / "hellaswag_val.jsonl", data)
    result = subprocess.run(["bash", ".ci/gpu_checks.sh", "--dry-run", "--data", str(data), "--out", str(out)],
                            cwd=REPO_ROOT, env=script_env({"PYTHON": sys.executable}), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    for line in ("train adamw plain: ", "train muon plain: ", "train adamw chunked: ", "decode B=1: compiled ", "decode B=4: compiled ", "decode profile: generate B=4", "medium plain: ", "medium shard: ",
                 "medium shard_ac: ",
                 "equivalence: logits", "loop: a compiled run", "2 samples", "GPU checks: all passed"):
        assert line in summary, (line, summary)
    assert "FAILED" not in summary
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./hardware.txt", "./equivalence.txt", "./decode_B4.json", "./run_muon_plain/log.txt", "./short/log.txt"} <= names
    assert not any(name.endswith(".pt") for name in names)  # checkpoints stay behind: the tarball must come back small


def test_gpu_checks_refuse_a_missing_data_folder(tmp_path):
    result = subprocess.run(["bash", ".ci/gpu_checks.sh", "--dry-run", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
                            cwd=REPO_ROOT, env=script_env({"PYTHON": sys.executable}), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error:") and "--prepare" in result.stderr
