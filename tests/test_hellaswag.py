"""HellaSwag: the batched, fixed-shape scoring against a plain one-ending-at-a-time reference written
here, against Hugging Face's GPT-2 carrying the same weights, across ranks, and its error messages."""

import json
from itertools import islice

import pytest
import torch
from torch.nn import functional as F

from plumbing import UserError, download
from train_gpt2 import (GPT, NUM_ENDINGS, GPTConfig, find_hellaswag_data, get_tokenizer, hellaswag_counts, hellaswag_losses,
                        load_hellaswag, make_batches, save_hf)
from conftest import assert_one_line_error, run_script

N_EXAMPLES = 200  # the first 200 validation examples; their longest rendering is 93 tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Other processes share this machine's cores: with two threads, every small op can wait for one
    that is descheduled (20x slower here). The subprocesses get OMP_NUM_THREADS=1 from run_script."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_path(shared_data):
    return shared_data / "hellaswag_val.jsonl"


@pytest.fixture(scope="module")
def raw_rows(data_path):
    with open(data_path) as f:
        return [json.loads(line) for line in islice(f, N_EXAMPLES)]


@pytest.fixture(scope="module")
def examples(data_path):
    return load_hellaswag(data_path, limit=N_EXAMPLES)


def tiny_gpt(block_size=256, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=64)).eval()


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_gpt()


@pytest.fixture(scope="module")
def tiny_hf_dir(tiny_model, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tiny_hf")
    save_hf(tiny_model, out_dir)
    return out_dir


@torch.no_grad()
def reference_losses(model, row: dict, block_size: int):
    """The plainest scoring there is: one forward pass per ending, (sum, mean) of its token losses."""
    tokenizer = get_tokenizer()
    context = tokenizer.encode(row["ctx"])
    sums, means = [], []
    for ending in row["endings"]:
        ending_tokens = tokenizer.encode(" " + ending)
        tokens = (context + ending_tokens)[-block_size:]  # too long: drop context from the left
        n = min(len(ending_tokens), len(tokens) - 1)  # the first token is predicted by nothing
        logits, _ = model(torch.tensor([tokens]))
        # logits[t] predicts tokens[t + 1]: the last n tokens are predicted by positions -n-1 .. -2
        losses = F.cross_entropy(logits[0, -n - 1 : -1], torch.tensor(tokens[-n:]), reduction="none")
        sums.append(losses.sum().item())
        means.append(losses.mean().item())
    return sums, means


@pytest.mark.parametrize("block_size, n", [(256, N_EXAMPLES), (48, 40)], ids=["fits", "truncated"])
def test_batched_scores_equal_one_ending_at_a_time(raw_rows, examples, block_size, n):
    model = tiny_gpt(block_size)
    reference = [reference_losses(model, row, block_size) for row in raw_rows[:n]]
    ref_sums = torch.tensor([sums for sums, _ in reference])
    ref_means = torch.tensor([means for _, means in reference])

    sum_losses, mean_losses = hellaswag_losses(model, examples[:n], "cpu", batch_size=8)
    torch.testing.assert_close(sum_losses, ref_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_losses, ref_means, rtol=1e-5, atol=1e-5)
    assert mean_losses.min() > 9.0  # a random model is near ln(50257) = 10.8 per token, not zero

    # The same picks, hence the same counts (checked on a share, to keep the test fast).
    assert torch.equal(sum_losses.argmin(1), ref_sums.argmin(1))
    assert torch.equal(mean_losses.argmin(1), ref_means.argmin(1))
    labels = torch.tensor([row["label"] for row in raw_rows[:40]])
    assert hellaswag_counts(model, examples[:40], "cpu", batch_size=8) == dict(
        correct=int((ref_sums[:40].argmin(1) == labels).sum()),
        correct_norm=int((ref_means[:40].argmin(1) == labels).sum()),
        total=40,
    )


def test_batches_have_few_fixed_shapes_and_padding_changes_no_score(tiny_model, examples, data_path):
    batches = list(make_batches(examples[:42], batch_size=8, block_size=256))
    assert sorted(r for batch in batches for r in batch.rows) == list(range(42 * NUM_ENDINGS))  # each row once
    for batch in batches:
        rows, length = batch.tokens.shape
        assert rows == 8 * NUM_ENDINGS and length % 16 == 0
        assert batch.scored.shape == batch.tokens.shape
        # The ending closes each row, so its last scored token ends the row: the longest row fills
        # the batch's length up to the multiple of 16.
        longest = max(int(row.nonzero().max()) + 1 for row in batch.scored if row.any())
        assert length - 16 < longest <= length
    last = batches[-1]  # 168 rows = 5 * 32 + 8: eight rows and 24 empty ones, which score nothing
    assert len(last.rows) == 8 and not last.scored[8:].any()
    # The baseline of one example per forward: its four rows, in order.
    plain = list(make_batches(examples[:3], 1, block_size=256, pad_to_multiple=1, sort_by_length=False))
    assert [b.rows for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]

    # The whole validation set at GPT-2's block size: a handful of shapes, all with the same number of
    # rows, and hardly more tokens than the examples hold (one example per forward needs 1.10x).
    all_examples = load_hellaswag(data_path)
    all_batches = list(make_batches(all_examples, 16, block_size=1024))
    shapes = {tuple(b.tokens.shape) for b in all_batches}
    assert {rows for rows, _ in shapes} == {16 * NUM_ENDINGS} and len(shapes) <= 10
    real_tokens = sum(len(e.context) + len(ending) for e in all_examples for ending in e.endings)
    assert sum(b.tokens.numel() for b in all_batches) < 1.10 * real_tokens

    # One example per pass without extra padding, or 5 or 16 per pass (the last batch partial, filled
    # with dummy rows): the same losses.
    plain_losses = hellaswag_losses(tiny_model, examples[:42], "cpu", 1, pad_to_multiple=1, sort_by_length=False)
    for batch_size in (5, 16):
        losses = hellaswag_losses(tiny_model, examples[:42], "cpu", batch_size=batch_size)
        torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-5)


def test_hugging_face_gpt2_with_the_same_weights_scores_the_same(tiny_model, tiny_hf_dir, examples):
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    counts = hellaswag_counts(tiny_model, examples[:60], "cpu")
    assert hellaswag_counts(hf_model, examples[:60], "cpu") == counts  # its output's .logits is read
    assert counts["total"] == 60 and 5 < counts["correct_norm"] < 30  # chance is 15
    ours = hellaswag_losses(tiny_model, examples[:20], "cpu")
    torch.testing.assert_close(hellaswag_losses(hf_model, examples[:20], "cpu"), ours, rtol=1e-4, atol=1e-4)


def test_compiled_model_scores_the_same(tiny_model, examples):
    # The aot_eager backend traces the model as inductor does, without generating C++ (slow on CPU).
    compiled = torch.compile(tiny_model, backend="aot_eager")
    expected = hellaswag_losses(tiny_model, examples[:16], "cpu", batch_size=4)
    torch.testing.assert_close(hellaswag_losses(compiled, examples[:16], "cpu", batch_size=4), expected)


def test_two_ranks_count_the_same_as_one(tiny_model, tiny_hf_dir, examples, data_path, tmp_path):
    args = ["hellaswag.py", "--model", tiny_hf_dir, "--data", data_path, "--limit", 41, "--batch_size", 4]
    one = run_script(*args, "--json", tmp_path / "one.json")
    two = run_script(*args, "--json", tmp_path / "two.json", torchrun_procs=2)  # shares of 21 and 20
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "acc_norm" in one.stdout and two.stdout.count("acc_norm") == 1  # only rank 0 prints
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    expected = hellaswag_counts(tiny_model, examples[:41], "cpu")
    expected_counts = (expected["correct"], expected["correct_norm"])
    for result, world_size in ((one, 1), (two, 2)):
        assert result["world_size"] == world_size
        assert (result["n"], result["correct"], result["correct_norm"]) == (41, *expected_counts)
        assert result["acc_norm"] == pytest.approx(expected["correct_norm"] / 41)
        assert result["examples_per_s"] > 0 and result["data"] == str(data_path.resolve())
        assert {"model", "acc", "timestamp", "dtype"} <= result.keys()


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": ', "not valid JSON"),
        ('{"ctx": "A man", "label": 0}', "missing field 'endings'"),
        ('{"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}', "'endings' must be a list of 4 strings"),
        ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}', "label 4 is out of range"),
    ],
)
def test_malformed_line_is_named_in_the_error(tmp_path, bad_line, message):
    good_line = '{"ctx": "A man is sitting on a roof. he", "endings": ["a", "b", "c", "d"], "label": "3"}'
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(good_line + "\n" + bad_line + "\n")
    with pytest.raises(UserError, match=f"line 2: {message}"):
        load_hellaswag(path)
    assert load_hellaswag(path, limit=1)[0].label == 3  # the good line reads fine, string label and all


def test_bad_data_ends_the_script_with_one_line(tiny_hf_dir, tmp_path):
    missing = run_script("hellaswag.py", "--model", tiny_hf_dir, "--data", tmp_path / "nowhere.jsonl")
    assert_one_line_error(missing, "nowhere.jsonl", "does not exist")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 7}\n')
    assert_one_line_error(run_script("hellaswag.py", "--model", tiny_hf_dir, "--data", bad), "line 1", "label 7")


def test_data_comes_from_the_environment_or_a_download(data_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HELLASWAG_DATA", str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match=r"\$HELLASWAG_DATA"):
        find_hellaswag_data()
    monkeypatch.setenv("HELLASWAG_DATA", str(data_path))
    assert find_hellaswag_data() == data_path
    assert find_hellaswag_data(str(data_path), cache_dir=tmp_path) == data_path  # --data wins

    # Neither given: downloaded into the cache, whole, with no partial file left beside it.
    monkeypatch.delenv("HELLASWAG_DATA")
    monkeypatch.setattr("train_gpt2.HELLASWAG_URL", data_path.as_uri())
    cached = find_hellaswag_data(cache_dir=tmp_path / "cache")
    assert cached.read_bytes() == data_path.read_bytes()
    assert [p.name for p in cached.parent.iterdir()] == ["hellaswag_val.jsonl"]

    # A download that fails leaves nothing behind and says how to work offline.
    monkeypatch.setattr("train_gpt2.HELLASWAG_URL", (tmp_path / "offline.jsonl").as_uri())
    with pytest.raises(UserError, match="--data"):
        find_hellaswag_data(cache_dir=tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
    with pytest.raises(OSError):
        download((tmp_path / "offline.jsonl").as_uri(), tmp_path / "x.jsonl")
