"""The notebooks, as a reader meets them on the repository page and as a user runs them after cloning.

On the page: both are committed executed, with their outputs (play.ipynb's plots among them), and the
README's picture is one of play.ipynb's. After cloning: play.ipynb runs on the committed reference run
alone (no checkpoint there), and both notebooks run top to bottom, headless, on a quick-start run
shortened to 4 steps on small batches, with HellaSwag on 8 examples; they read it through the same
environment variables a user would set, and must leave valid PNG figures and a benchmark.json whose
numbers are the training's own.
"""

import base64
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
HELLASWAG_LIMIT = 8
REFERENCE_RUN = REPO_ROOT / "reference_run" / "quick_start"
README_PICTURE = REPO_ROOT / "docs" / "quick_start_loss.png"


def read_notebook(name):
    return nbformat.read(REPO_ROOT / name, as_version=4)


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes: an empty figure?"


def execute(name, env):
    """Run a notebook top to bottom in a fresh kernel whose cwd is the repo root (as when a user opens it
    there), with env added to the environment; returns the executed notebook. A failing cell raises
    CellExecutionError with that cell's traceback."""
    notebook = read_notebook(name)
    client = NotebookClient(notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute(env=script_env(env))
    return notebook


def code_outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def printed(notebook) -> str:
    return "".join(output.get("text", "") for output in code_outputs(notebook))


def images(notebook) -> list[bytes]:
    return [base64.b64decode(output["data"]["image/png"]) for output in code_outputs(notebook)
            if "image/png" in output.get("data", {})]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_data):
    """A finished quick-start run, shortened, with HellaSwag on, and the marks a real log can carry after
    a resume or mid-write."""
    cwd = tmp_path_factory.mktemp("quickstart")  # the run prepares its shards here, as in a fresh clone
    result = run_script(
        REPO_ROOT / "train_gpt2.py", "--preset", "shakespeare", "--max_steps", "4", "--eval_interval", "2",
        "--sample_interval", "0", "--checkpoint_interval", "2", "--micro_batch_size", "8", "--total_batch_size", "1024",
        "--val_tokens", "4096", "--hellaswag", "--hellaswag_data", shared_data / "hellaswag_val.jsonl",
        "--hellaswag_limit", HELLASWAG_LIMIT, "--log_dir", cwd / "log", "--device", "cpu", cwd=cwd,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = cwd / "log"
    assert sorted(p.name for p in run_dir.glob("ckpt_*.pt")) == ["ckpt_000002.pt", "ckpt_000004.pt"]
    with open(run_dir / "log.txt", "a") as log:
        # A resumed run evaluated step 3 again: this later line must win over the first.
        log.write("3 val 9.8765\n")
        # A run still writing: half a line, no newline yet.
        log.write("4 tra")
    return run_dir


def test_the_committed_notebooks_show_their_results():
    """On the repository page a reader sees what each notebook does before running anything: every code
    cell was run, in order, without an error; play.ipynb shows its plots, benchmark.ipynb its chart."""
    for name in NOTEBOOKS:
        notebook = read_notebook(name)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), f"{name}: not run top to bottom"
        outputs = code_outputs(notebook)
        assert not [o for o in outputs if o.output_type == "error"], f"{name} is stored with an error"
        text = printed(notebook) + "".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
        assert not re.search(r"/(tmp|work|home|Users)/", text), f"{name} shows a path of the machine it ran on"
        assert (REPO_ROOT / name).stat().st_size < 1_000_000, f"{name} is too big for a readable diff"
    play, benchmark = read_notebook("play.ipynb"), read_notebook("benchmark.ipynb")
    assert len(images(play)) >= 3  # loss, learning rate and gradient norm, throughput (and more)
    assert "last val: 4.9" in printed(play)  # the quick start's 150 steps end near 5
    assert len(images(benchmark)) == 1 and "HellaSwag on 500 of 10,042 examples" in printed(benchmark)


def test_the_readme_picture_is_one_of_plays():
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"]({README_PICTURE.relative_to(REPO_ROOT)})" in readme
    assert README_PICTURE.read_bytes() in images(read_notebook("play.ipynb"))


def test_the_reference_run_is_the_quick_start():
    """reference_run/quick_start holds the quick start's log and settings, and no checkpoint: the settings
    are those `--preset shakespeare` gives today, so the reference is the run a user gets."""
    assert sorted(p.name for p in REFERENCE_RUN.iterdir()) == ["log.txt", "train_config.json"]
    recorded = json.loads((REFERENCE_RUN / "train_config.json").read_text())
    preset = settings.PRESETS["shakespeare"]
    assert {key: recorded[key] for key in preset} == preset and recorded["log_dir"] == "reference_run/quick_start"
    log = (REFERENCE_RUN / "log.txt").read_text().splitlines()
    assert log[-1].startswith(f"{preset['max_steps'] - 1} ")  # finished: the last step's lines


def test_notebooks_read_the_one_table_of_baselines():
    """The published scores live in settings.py (BASELINES, with their sources), where the end-of-run
    summary reads them too; no notebook keeps a copy that could drift."""
    for name in NOTEBOOKS:
        sources = [cell.source for cell in read_notebook(name).cells if cell.cell_type == "code"]
        assert any("from settings import" in s and "baselines_table" in s for s in sources), name
        assert not any(re.search(r"^(BASELINES|PROTOCOLS|BASELINE_PROTOCOLS) = ", s, re.M) for s in sources), name
    for name, (params, val_loss, acc_norm) in settings.GPT2_SCORES.items():
        row = next(row for row in settings.BASELINES.values() if row["params"] == params)
        assert (row["val_loss"], row["completion"][1]) == (val_loss, acc_norm), name


def test_kernel_runs_this_python():
    """nbclient starts the `python3` kernel; it must be this environment's Python, not another install."""
    argv = KernelSpecManager().get_kernel_spec("python3").argv
    # jupyter_client runs a kernel whose command is plain `python` with sys.executable.
    assert argv[0] in ("python", "python3", sys.executable), f"the python3 kernel runs {argv[0]}, not {sys.executable}"


def test_play_draws_the_reference_run_of_a_fresh_clone(tmp_path):
    """A fresh clone has no log/: play.ipynb draws the committed reference run, and its sections on the
    model, which need a checkpoint, say so instead of failing."""
    notebook = execute("play.ipynb", {"RUN_DIR": str(REFERENCE_RUN.relative_to(REPO_ROOT)), "OUT_DIR": str(tmp_path)})
    text = printed(notebook)
    assert "the reference run" in text and "no checkpoint in reference_run/quick_start/" in text
    assert re.search(r"last val: 4\.9\d+ at step 149", text)
    assert_png(tmp_path / "loss.png")


def test_play_draws_the_run(run_dir):
    for figure in PLAY_FIGURES:
        (run_dir / figure).unlink(missing_ok=True)
    notebook = execute("play.ipynb", {"RUN_DIR": str(run_dir)})
    for figure in PLAY_FIGURES:
        assert_png(run_dir / figure)
    text = printed(notebook)
    assert re.search(r"hella \(3 steps\)", text)  # steps 0, 2 and 3
    assert "last val: 9.8765 at step 3" in text  # the later line for step 3 won
    assert re.search(r"last train: [\d.]+ at step 3\n", text)  # the half-written line of step 4 was left out
    assert "ckpt_000004.pt (step 4)" in text  # the newest checkpoint
    assert "ROMEO:" in text  # the samples continue the run's prompt


def test_benchmark_measures_the_model(run_dir, shared_data):
    """Benchmark the step-2 checkpoint: the training loop evaluated those very weights at step 2 (before
    that step's update), on the same val tokens and HellaSwag examples, so the numbers must agree."""
    (run_dir / "benchmark.json").unlink(missing_ok=True)
    env = {
        "MODEL": str(run_dir / "ckpt_000002.pt"),
        "HELLASWAG_LIMIT": str(HELLASWAG_LIMIT),
        "HELLASWAG_DATA": str(shared_data / "hellaswag_val.jsonl"),
    }
    notebook = execute("benchmark.ipynb", env)
    assert f"HellaSwag on {HELLASWAG_LIMIT} of 10,042 examples" in printed(notebook)
    assert_png(run_dir / "benchmark.png")  # the run folder of the checkpoint
    results = json.loads((run_dir / "benchmark.json").read_text())
    logged = {}  # (step, stream) -> value, from the training's own log
    for line in (run_dir / "log.txt").read_text().splitlines():
        if len(line.split()) == 3:  # not the half-written last line
            step, stream, value = line.split()
            logged[int(step), stream] = float(value)
    assert results["step"] == 2

    # The val shards were found beside the run folder, where the training prepared them.
    assert results["val"]["data_dir"] == str(run_dir.parent / "tinyshakespeare_tokens")
    assert results["val"]["tokens"] == 4096  # the run's val_tokens
    # 2 steps from a uniform guess (ln 50257 = 10.8): the loss has barely moved, but it is the training's loss.
    assert math.isfinite(results["val"]["loss"])
    assert results["val"]["loss"] == pytest.approx(logged[(2, "val")], abs=1e-4)

    hellaswag = results["hellaswag"]
    assert hellaswag["n"] == HELLASWAG_LIMIT
    assert 0 <= hellaswag["acc"] <= 1 and 0 <= hellaswag["acc_norm"] <= 1
    assert round(hellaswag["acc_norm"], 4) == logged[(2, "hella")]

    assert results["throughput"]["median_tok_s"] > 0 and results["throughput"]["steps"] == 4
    assert len(results["samples"]) == 4 and all(s.startswith("ROMEO:") for s in results["samples"])
