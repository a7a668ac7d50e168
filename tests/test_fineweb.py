"""fineweb.py on real text: shards hold exactly the tokenized documents, in order, and survive kills.

The reference everywhere is the plain definition: for each document, <|endoftext|> followed by
tiktoken's encode_ordinary of its text, all concatenated, val shard first.
"""

import json
import signal
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT, assert_one_line_error, run_script
from fineweb import HUB_SOURCES, TEMP_GLOB, prepare_shakespeare, read_docs, read_hub_texts, split_shakespeare, write_shards
from train_gpt2 import EOT_TOKEN, UserError, get_tokenizer

LEGAL_SHARD_SIZE = 250_000  # ~18 shards for the 4.4M-token sample: enough to kill a run between two


def reference_tokens(texts) -> np.ndarray:
    tokenizer = get_tokenizer()
    tokens = []
    for text in texts:
        tokens.append(EOT_TOKEN)
        tokens.extend(tokenizer.encode_ordinary(text))
    return np.array(tokens, dtype=np.uint16)


def shard_files(out_dir):
    """The shard files in training order: val_000000, then train_000001, train_000002, ..."""
    return sorted(out_dir.glob("*.npy"), key=lambda p: p.stem.rsplit("_", 1)[1])


def concatenated(out_dir) -> np.ndarray:
    return np.concatenate([np.load(p, mmap_mode="r") for p in shard_files(out_dir)])


def file_bytes(out_dir) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


@pytest.fixture(scope="module")
def legal_path(shared_data):
    return shared_data / "fineweb_legal_sample.jsonl"


@pytest.fixture(scope="module")
def legal_texts(legal_path):
    with open(legal_path) as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def legal_tokens(legal_texts):
    return reference_tokens(legal_texts)


@pytest.fixture(scope="module")
def legal_run(legal_path, tmp_path_factory):
    """All 2,800 documents through the command line, 2 processes, never interrupted."""
    out_dir = tmp_path_factory.mktemp("legal") / "shards"
    result = run_script("fineweb.py", "--input", legal_path, "--out_dir", out_dir,
                        "--shard_size", LEGAL_SHARD_SIZE, "--num_proc", 2)
    assert result.returncode == 0, result.stderr
    return out_dir


# ---------------------------------------------------------------------------------------------------
# The shards are the documents


def test_all_documents_token_for_token(legal_run, legal_texts, legal_tokens):
    files = shard_files(legal_run)
    assert [p.name for p in files[:3]] == ["local_val_000000.npy", "local_train_000001.npy", "local_train_000002.npy"]
    assert len(files) == -(-len(legal_tokens) // LEGAL_SHARD_SIZE)  # ceil: full shards, then the rest
    assert all(np.load(p, mmap_mode="r").dtype == np.uint16 for p in files)
    np.testing.assert_array_equal(concatenated(legal_run), legal_tokens)

    meta = json.loads((legal_run / "meta.json").read_text())
    assert meta["complete"] is True
    assert (meta["tokenizer"], meta["eot"], meta["dtype"], meta["shard_size"]) == ("gpt2", EOT_TOKEN, "uint16", LEGAL_SHARD_SIZE)
    assert meta["total_tokens"] == len(legal_tokens) == 4_364_780
    assert meta["total_documents"] == len(legal_texts) == 2800
    assert [s["file"] for s in meta["shards"]] == [p.name for p in files]
    assert [s["split"] for s in meta["shards"]] == ["val"] + ["train"] * (len(files) - 1)
    for shard, path in zip(meta["shards"], files):
        tokens = np.load(path)
        assert shard["tokens"] == len(tokens)
        assert shard["documents"] == np.count_nonzero(tokens == EOT_TOKEN)  # documents that start here
    # Shard sizes never line up with documents here: each boundary cuts one in two.
    assert all(s["resume_at"]["token"] > 0 for s in meta["shards"][:-1])


def test_rerun_of_a_complete_folder_does_nothing(legal_run, legal_path):
    before = {p.name: p.stat().st_mtime_ns for p in legal_run.iterdir()}
    result = run_script("fineweb.py", "--input", legal_path, "--out_dir", legal_run,
                        "--shard_size", LEGAL_SHARD_SIZE, "--num_proc", 2)
    assert result.returncode == 0, result.stderr
    assert "already complete" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in legal_run.iterdir()} == before


def test_max_docs_and_a_small_val_shard(legal_texts, tmp_path):
    meta = write_shards(legal_texts, tmp_path, source={"test": "legal"}, prefix="legal",
                        shard_size=100_000, val_tokens=30_000, max_docs=120, num_proc=1)
    expected = reference_tokens(legal_texts[:120])
    np.testing.assert_array_equal(concatenated(tmp_path), expected)
    assert meta["total_documents"] == 120
    assert [s["tokens"] for s in meta["shards"]][:2] == [30_000, 100_000]


def test_importing_fineweb_does_no_work_and_no_datasets():
    result = run_script("-c", "import sys, fineweb; assert 'datasets' not in sys.modules; print(sorted(fineweb.HUB_SOURCES))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['edu100B', 'edu10B', 'fineweb10B']"


# ---------------------------------------------------------------------------------------------------
# Interrupted runs


def as_from_a_shell():
    """In the child, before exec: Ctrl-C and SIGTERM as a shell leaves them (default, not blocked). A
    process inherits an ignored or blocked signal, and a test worker may have one from an earlier test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def stop_when(args, shard_file, sig):
    """Start `python fineweb.py args`, send it `sig` as soon as `shard_file` exists; return (code, stderr).

    The whole run takes ~2 s: on a loaded machine it may finish before the signal lands. Then the shard
    folder is put back as it was and the run tried again (three times at most), so that the test sees
    a run stopped mid-way, never a race lost."""
    out_dir = shard_file.parent
    saved = out_dir.with_name(out_dir.name + "_before")
    shutil.rmtree(saved, ignore_errors=True)
    if out_dir.exists():
        shutil.copytree(out_dir, saved)
    for _ in range(3):
        process = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, text=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=as_from_a_shell)
        deadline = time.time() + 60
        while not shard_file.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        process.send_signal(sig)
        _, stderr = process.communicate()
        if process.returncode != 0:
            break
        shutil.rmtree(out_dir)  # it finished first: start over from the same state
        if saved.exists():
            shutil.copytree(saved, out_dir)
    return subprocess.CompletedProcess(args, process.returncode, "", stderr)


def test_interrupted_and_killed_runs_resume_to_the_same_bytes(legal_run, legal_path, tmp_path):
    out_dir = tmp_path / "shards"
    args = ["fineweb.py", "--input", legal_path, "--out_dir", out_dir, "--shard_size", LEGAL_SHARD_SIZE, "--num_proc", 2]

    # Ctrl-C: one line that says how to go on.
    assert_one_line_error(stop_when(args, out_dir / "local_train_000002.npy", signal.SIGINT), "interrupted", "run the same command")
    finished = len(json.loads((out_dir / "meta.json").read_text())["shards"])
    assert 2 <= finished < 17, "the run finished before the interrupt; the test proves nothing"

    # SIGTERM (a `kill`, a preemption): the same, workers included; no traceback from any of them.
    assert_one_line_error(stop_when(args, out_dir / "local_train_000005.npy", signal.SIGTERM), "interrupted")
    assert len(json.loads((out_dir / "meta.json").read_text())["shards"]) < 17

    # SIGKILL: no cleanup, no chance to finish the shard being filled.
    stop_when(args, out_dir / "local_train_000008.npy", signal.SIGKILL)
    meta = json.loads((out_dir / "meta.json").read_text())
    assert not meta["complete"], "the run finished before the kill; the test proves nothing"
    assert finished < len(meta["shards"]) < 17

    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    assert "resuming after" in result.stdout
    assert not list(out_dir.glob(TEMP_GLOB))
    assert file_bytes(out_dir) == file_bytes(legal_run)


def test_crash_mid_shard_then_resume_matches_an_uninterrupted_run(legal_texts, tmp_path):
    texts = legal_texts[:400]  # ~620K tokens
    options = dict(source={"test": "legal-400"}, prefix="legal", shard_size=70_000, num_proc=1)
    write_shards(texts, tmp_path / "whole", **options)

    def crashing(skip):  # a source that dies after 250 documents, mid-shard
        for i, text in enumerate(texts[skip:], start=skip):
            if i == 250:
                raise RuntimeError("network gone")
            yield text

    out_dir = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="network gone"):
        write_shards(crashing, out_dir, **options)
    meta = json.loads((out_dir / "meta.json").read_text())
    assert not meta["complete"] and len(meta["shards"]) >= 3
    assert meta["shards"][-1]["resume_at"]["token"] > 0  # the next run starts inside a document
    (out_dir / ".incomplete_123_456").write_bytes(b"left by a killed writer")

    write_shards(lambda skip: texts[skip:], out_dir, **options)
    assert file_bytes(out_dir) == file_bytes(tmp_path / "whole")
    np.testing.assert_array_equal(concatenated(out_dir), reference_tokens(texts))

    # A shard lost after the fact is written again, and so is everything after it.
    (out_dir / "legal_train_000004.npy").unlink()
    write_shards(texts, out_dir, **options)
    assert file_bytes(out_dir) == file_bytes(tmp_path / "whole")


def test_folder_of_another_run_is_refused(legal_texts, tmp_path):
    write_shards(legal_texts[:20], tmp_path, source={"test": "a"}, prefix="legal", shard_size=5_000, num_proc=1)
    with pytest.raises(UserError, match="another shard_size"):
        write_shards(legal_texts[:20], tmp_path, source={"test": "a"}, prefix="legal", shard_size=6_000, num_proc=1)


# ---------------------------------------------------------------------------------------------------
# Spawn (the macOS and Windows default)


def test_spawned_workers_give_the_same_tokens(legal_path, legal_tokens, legal_texts, tmp_path):
    result = run_script("fineweb.py", "--input", legal_path, "--out_dir", tmp_path, "--shard_size", 100_000,
                        "--max_docs", 300, "--num_proc", 2, "--start_method", "spawn")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(concatenated(tmp_path), reference_tokens(legal_texts[:300]))


# ---------------------------------------------------------------------------------------------------
# Tiny Shakespeare


def test_shakespeare_preset(tmp_path):
    text = (REPO_ROOT / "data" / "tinyshakespeare.txt").read_text()
    out_dir = prepare_shakespeare(tmp_path / "shakespeare")
    val = np.load(out_dir / "tinyshakespeare_val_000000.npy")
    train = np.load(out_dir / "tinyshakespeare_train_000001.npy")
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "meta.json", "tinyshakespeare_train_000001.npy", "tinyshakespeare_val_000000.npy"]
    assert 0.08 < len(val) / (len(val) + len(train)) < 0.12
    assert train[0] == val[0] == EOT_TOKEN
    tokenizer = get_tokenizer()
    train_text, val_text = tokenizer.decode(train[1:].tolist()), tokenizer.decode(val[1:].tolist())
    assert train_text + val_text == text
    assert val_text.startswith(split_shakespeare(text)[1][:40]) and train_text.endswith("\n\n")

    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert prepare_shakespeare(out_dir) == out_dir  # already there: nothing is written again
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before


# ---------------------------------------------------------------------------------------------------
# Local files: .txt, .jsonl, .parquet, globs


def test_local_txt_jsonl_parquet_and_globs(legal_texts, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = legal_texts[:6] + ["a literal <|endoftext|> is plain text", "broken UTF-16: \ud800 survives"]
    (tmp_path / "b.txt").write_text(docs[1])
    (tmp_path / "a.txt").write_text(docs[0])
    with open(tmp_path / "c.jsonl", "w") as f:
        for text in docs[2:4]:
            f.write(json.dumps({"id": 1, "text": text}) + "\n\n")  # blank lines are skipped
    pq.write_table(pa.table({"text": docs[4:6], "n": [1, 2]}), tmp_path / "d.parquet")
    with open(tmp_path / "e.jsonl", "w") as f:
        f.write("\n".join(json.dumps({"text": text}) for text in docs[6:]))

    inputs = [tmp_path / "*.txt", tmp_path / "c.jsonl", tmp_path / "d.parquet", tmp_path / "e.*"]
    assert list(read_docs(inputs)) == docs  # a glob's matches in sorted order: a.txt before b.txt

    result = run_script("fineweb.py", "--input", *inputs, "--out_dir", tmp_path / "shards", "--shard_size", 3_000)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(concatenated(tmp_path / "shards"), reference_tokens(docs))


def test_other_text_field(tmp_path):
    with open(tmp_path / "x.jsonl", "w") as f:
        f.write(json.dumps({"content": "To be, or not to be"}) + "\n")
    assert list(read_docs([tmp_path / "x.jsonl"], text_field="content")) == ["To be, or not to be"]


# ---------------------------------------------------------------------------------------------------
# Hub datasets (no network here: `datasets` gets the real documents from memory instead of the hub)


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_source_reads_in_order_and_skips(legal_path, legal_texts, streaming, monkeypatch):
    import datasets

    records = datasets.Dataset.from_json(str(legal_path))
    asked = {}

    def load_dataset(path, name, split, streaming, num_proc):
        asked.update(path=path, name=name, split=split)
        return records.to_iterable_dataset() if streaming else records

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    texts = list(read_hub_texts(HUB_SOURCES["edu10B"], streaming=streaming, skip=1234))
    assert asked == {"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"}
    assert texts == legal_texts[1234:]
    with pytest.raises(UserError, match=r"no field 'content' \(fields: .*text"):
        next(read_hub_texts(HUB_SOURCES["fineweb10B"], "content", streaming=streaming))


def test_hub_unreachable_is_one_line(tmp_path):
    result = run_script("fineweb.py", "--out_dir", tmp_path / "edu", "--max_docs", 10)  # HF_HUB_OFFLINE=1
    assert_one_line_error(result, "could not load HuggingFaceFW/fineweb-edu (sample-10BT)")
    assert not (tmp_path / "edu").exists()


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear line


def test_missing_input_path(tmp_path):
    assert_one_line_error(run_script("fineweb.py", "--input", tmp_path / "nope.jsonl"), "input not found", "nope.jsonl")
    assert_one_line_error(run_script("fineweb.py", "--input", tmp_path / "*.parquet"), "no files match")


def test_empty_input(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "empty.txt").write_text("")
    result = run_script("fineweb.py", "--input", tmp_path / "empty.jsonl", tmp_path / "empty.txt", "--out_dir", tmp_path / "out")
    assert_one_line_error(result, "no documents", "empty")
    assert not (tmp_path / "out").exists()


def test_wrong_text_field(legal_path, tmp_path):
    result = run_script("fineweb.py", "--input", legal_path, "--text_field", "content", "--out_dir", tmp_path)
    assert_one_line_error(result, "'content'", "fields: id, url, text", "--text_field")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match=r"no field 'text' .*fields: body"):
        list(read_docs([tmp_path / "x.parquet"]))
