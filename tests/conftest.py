"""Shared test setup: offline, private caches, paths to the real data beside the repo.

Everything runs on CPU. Hub downloads are switched off (HF_HUB_OFFLINE=1: a hub name fails at once
instead of after ~23 s), and tiktoken / torch.compile / Hugging Face caches point at a private temp
folder because other processes share /tmp.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Set before any test imports tiktoken or transformers; subprocesses inherit it.
_CACHE_ROOT = Path(tempfile.mkdtemp(prefix="gpt2-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_CACHE_ROOT / "hf")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_CACHE_ROOT / "inductor")
os.environ["TIKTOKEN_CACHE_DIR"] = str(_CACHE_ROOT / "tiktoken")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if (SHARED_DATA / "tiktoken_cache").is_dir():
    # tiktoken deletes cached files whose hash does not match, so it gets a writable copy.
    shutil.copytree(SHARED_DATA / "tiktoken_cache", _CACHE_ROOT / "tiktoken")
    for f in (_CACHE_ROOT / "tiktoken").iterdir():
        f.chmod(0o644)
sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} (the shared real data) is not beside the repo")
    return SHARED_DATA


def script_command(*args, torchrun_procs=None):
    """`python script.py args` (or under torchrun), as a user would run it."""
    if torchrun_procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}"]
    else:
        cmd = [sys.executable]
    return cmd + [str(a) for a in args]


def script_env(env=None):
    # One thread per process: results do not depend on how many cores the machine has.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}


def run_script(*args, cwd=REPO_ROOT, timeout=600, torchrun_procs=None, env=None):
    """Run one of the repo's scripts to completion; returns the CompletedProcess (stdout, stderr text)."""
    return subprocess.run(script_command(*args, torchrun_procs=torchrun_procs), cwd=cwd, env=script_env(env),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *fragments):
    """A bad input must end the program with a non-zero code and one clear line, no traceback."""
    assert result.returncode != 0, f"expected failure, got success:\n{result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert lines, "no error message"
    last = lines[-1]
    assert last.startswith("error:"), last
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    return last
