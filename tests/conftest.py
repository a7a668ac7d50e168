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
import torch

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
sys.path.insert(0, str(REPO_ROOT / "dev"))  # the development tools: bench.py, recipe_proxy.py
# One thread, in this process as in the scripts it starts (script_env): with two, every small op can wait
# for a thread that another process has descheduled, and a test runs 5-20x slower on a busy machine.
torch.set_num_threads(1)


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


# The scripts whose main(argv) a test may run inside its own process: what a user's command runs, minus the
# ~4 s a fresh process spends importing torch (and torch._dynamo, which the optimizers import), which made
# up most of the suite's time. A run under torchrun, with its own environment, or compiled (dynamo's caches
# and recompile limits are per process) still gets a process of its own.
IN_PROCESS = {"train_gpt2.py": "train_gpt2", "sample.py": "sample", "hellaswag.py": "hellaswag", "validate.py": "validate"}


def run_script(*args, cwd=REPO_ROOT, timeout=600, torchrun_procs=None, env=None, in_process=None):
    """Run one of the repo's scripts to completion, as `python script.py args` would; returns the
    CompletedProcess (stdout, stderr text). in_process: run its main(argv) here (default: where it can)."""
    words = [str(a) for a in args]
    if in_process is None:
        compiled = "--compile=on" in words or any(
            a == "--compile" and b == "on" for a, b in zip(words, words[1:]))
        in_process = Path(words[0]).name in IN_PROCESS and not (torchrun_procs or env or compiled)
    if in_process:
        return run_in_process(IN_PROCESS[Path(words[0]).name], words[1:], cwd)
    return subprocess.run(script_command(*args, torchrun_procs=torchrun_procs), cwd=cwd, env=script_env(env),
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(module_name: str, argv: list[str], cwd) -> subprocess.CompletedProcess:
    """module.main(argv) through plumbing.run_main, in this process and folder cwd, its output captured: the
    exit code, stdout and stderr a process running `python module.py argv` would have given."""
    import contextlib
    import importlib
    import io
    import traceback

    import plumbing

    module = importlib.import_module(module_name)
    out, err, code, here = io.StringIO(), io.StringIO(), 0, os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                plumbing.run_main(lambda: module.main(argv))
            except SystemExit as e:  # sys.exit("error: ...") prints its message, as Python does at exit
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # a bug: its traceback, as an uncaught exception would print it
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess([module_name, *argv], code, out.getvalue(), err.getvalue())


TRAIN = REPO_ROOT / "train_gpt2.py"
# A tiny GPT that trains a step in tens of milliseconds on a CPU.
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--micro_batch_size", "2",
        "--total_batch_size", "256", "--warmup_steps", "3", "--max_lr", "1e-3", "--val_tokens", "256",
        "--eval_interval", "4", "--sample_interval", "0", "--no-hellaswag", "--device", "cpu"]


def train(shards, run_dir, *extra, procs=None, **kw):
    """train_gpt2.py with the TINY settings on `shards`, into run_dir; it must succeed."""
    result = run_script(TRAIN, "--data_dir", shards, "--log_dir", run_dir, *TINY, *extra, torchrun_procs=procs, **kw)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_log(run_dir, stream):
    """{step: value} of one stream of a run's log.txt."""
    import plumbing

    return plumbing.read_log(Path(run_dir) / "log.txt").get(stream, {})


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


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory):
    """Real text: the first 200K characters of Tiny Shakespeare, tokenized, as one val and two train shards."""
    import numpy as np

    import train_gpt2 as t

    out = tmp_path_factory.mktemp("shards")
    text = (REPO_ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    tokens = np.array([t.EOT_TOKEN] + t.get_tokenizer().encode_ordinary(text), dtype=np.uint16)
    n = len(tokens)
    np.save(out / "shk_val_000000.npy", tokens[: n // 10])
    np.save(out / "shk_train_000001.npy", tokens[n // 10 : n // 2])
    np.save(out / "shk_train_000002.npy", tokens[n // 2 :])
    return out
