"""The notebooks, run the way a user runs them after cloning: a short quick-start training, then
play.ipynb and benchmark.ipynb executed top to bottom, headless, against that run.

The run is the quick start shortened to 6 steps on small batches, with HellaSwag on 20 examples (30-40 s
on a shared 2-core CPU). The notebooks read it through the same environment variables a user would set,
and must leave valid PNG figures and a sane benchmark.json in the run folder.
"""

import json
import math
import re
import sys

import nbformat
import pytest
from conftest import REPO_ROOT, run_script, script_env
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

import settings

NOTEBOOKS = ("play.ipynb", "benchmark.ipynb")
PLAY_FIGURES = ("loss.png", "hellaswag.png", "lr_norm.png", "tok_s.png", "position_embeddings.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HELLASWAG_LIMIT = 20


def read_notebook(name):
    return nbformat.read(REPO_ROOT / name, as_version=4)


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes: an empty figure?"


def cells_tagged(notebook, tag):
    return [cell.source for cell in notebook.cells if tag in cell.metadata.get("tags", [])]


def execute(name, env):
    """Run a notebook top to bottom in a fresh kernel whose cwd is the repo root (as when a user opens it
    there), with env added to the environment; returns the executed notebook. A failing cell raises
    CellExecutionError with that cell's traceback."""
    notebook = read_notebook(name)
    client = NotebookClient(notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute(env=script_env(env))
    return notebook


def printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_data):
    """A finished quick-start run, with HellaSwag on, and the marks a real log can carry after a resume
    or mid-write."""
    cwd = tmp_path_factory.mktemp("quickstart")  # the run prepares its shards here, as in a fresh clone
    result = run_script(
        REPO_ROOT / "train_gpt2.py", "--preset", "shakespeare", "--max_steps", "6", "--eval_interval", "3",
        "--sample_interval", "0", "--checkpoint_interval", "3", "--micro_batch_size", "8", "--total_batch_size", "1024",
        "--hellaswag", "--hellaswag_data", shared_data / "hellaswag_val.jsonl", "--hellaswag_limit", HELLASWAG_LIMIT,
        "--log_dir", cwd / "log", "--device", "cpu", cwd=cwd,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = cwd / "log"
    assert sorted(p.name for p in run_dir.glob("ckpt_*.pt")) == ["ckpt_000003.pt", "ckpt_000006.pt"]
    with open(run_dir / "log.txt", "a") as log:
        # A resumed run evaluated step 5 again: this later line must win over the first.
        log.write("5 val 9.8765\n")
        # A run still writing: half a line, no newline yet.
        log.write("6 tra")
    return run_dir


def test_notebooks_are_stored_without_outputs():
    """Outputs (images, tracebacks, paths) would make every diff of a notebook unreadable."""
    for name in NOTEBOOKS:
        for cell in read_notebook(name).cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} is stored with outputs"


def test_notebooks_share_baselines_and_log_reader():
    """The published numbers and the log reader appear in both notebooks: they must not drift apart."""
    play, benchmark = read_notebook("play.ipynb"), read_notebook("benchmark.ipynb")
    for tag in ("baselines", "read_log"):
        assert len(cells_tagged(play, tag)) == 1, f"play.ipynb has no single cell tagged {tag}"
        assert cells_tagged(play, tag) == cells_tagged(benchmark, tag), f"the {tag} cells differ"


def test_the_training_summary_quotes_the_notebooks_numbers():
    """settings.GPT2_SCORES (the end-of-run summary) holds the notebooks' GPT-2 figures, not others."""
    namespace = {}
    exec(cells_tagged(read_notebook("play.ipynb"), "baselines")[0], namespace)
    baselines = namespace["BASELINES"]
    for name, (params, val_loss, acc_norm) in settings.GPT2_SCORES.items():
        row = next(row for row in baselines.values() if row["params"] == params)
        assert (row["params"], row["val_loss"], row["completion"][1]) == (params, val_loss, acc_norm), name


def test_kernel_runs_this_python():
    """nbclient starts the `python3` kernel; it must be this environment's Python, not another install."""
    argv = KernelSpecManager().get_kernel_spec("python3").argv
    # jupyter_client runs a kernel whose command is plain `python` with sys.executable.
    assert argv[0] in ("python", "python3", sys.executable), f"the python3 kernel runs {argv[0]}, not {sys.executable}"


def test_play_draws_the_run(run_dir):
    for figure in PLAY_FIGURES:
        (run_dir / figure).unlink(missing_ok=True)
    notebook = execute("play.ipynb", {"RUN_DIR": str(run_dir)})
    for figure in PLAY_FIGURES:
        assert_png(run_dir / figure)
    text = printed(notebook)
    assert re.search(r"hella \(3 steps\)", text)  # steps 0, 3 and 5
    assert "last val: 9.8765 at step 5" in text  # the later line for step 5 won
    assert re.search(r"last train: [\d.]+ at step 5\n", text)  # the half-written line of step 6 was left out
    assert "ckpt_000006.pt (step 6)" in text  # the newest checkpoint
    assert "ROMEO:" in text  # the samples continue the run's prompt


def test_benchmark_measures_the_model(run_dir, shared_data):
    """Benchmark the step-3 checkpoint: the training loop evaluated those very weights at step 3 (before
    that step's update), on the same val tokens and HellaSwag examples, so the numbers must agree."""
    (run_dir / "benchmark.json").unlink(missing_ok=True)
    env = {
        "MODEL": str(run_dir / "ckpt_000003.pt"),
        "HELLASWAG_LIMIT": str(HELLASWAG_LIMIT),
        "HELLASWAG_DATA": str(shared_data / "hellaswag_val.jsonl"),
    }
    execute("benchmark.ipynb", env)
    assert_png(run_dir / "benchmark.png")  # the run folder of the checkpoint
    results = json.loads((run_dir / "benchmark.json").read_text())
    logged = {}  # (step, stream) -> value, from the training's own log
    for line in (run_dir / "log.txt").read_text().splitlines():
        if len(line.split()) == 3:  # not the half-written last line
            step, stream, value = line.split()
            logged[int(step), stream] = float(value)
    assert results["step"] == 3

    # The val shards were found beside the run folder, where the training prepared them.
    assert results["val"]["data_dir"] == str(run_dir.parent / "tinyshakespeare_tokens")
    assert results["val"]["tokens"] == 16_384  # the preset's val_tokens
    # 3 steps from a uniform guess (ln 50257 = 10.8): the loss has barely moved, but it is the training's loss.
    assert math.isfinite(results["val"]["loss"])
    assert results["val"]["loss"] == pytest.approx(logged[(3, "val")], abs=1e-4)

    hellaswag = results["hellaswag"]
    assert hellaswag["n"] == HELLASWAG_LIMIT
    assert 0 <= hellaswag["acc"] <= 1 and 0 <= hellaswag["acc_norm"] <= 1
    assert round(hellaswag["acc_norm"], 4) == logged[(3, "hella")]

    assert results["throughput"]["median_tok_s"] > 0 and results["throughput"]["steps"] == 6
    assert len(results["samples"]) == 4 and all(s.startswith("ROMEO:") for s in results["samples"])
