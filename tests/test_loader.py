"""The training loader: memory-mapped, shuffled per epoch, disjoint across ranks, resumable."""

import numpy as np
import pytest
import torch

import train_gpt2 as t

B, T = 2, 8
WINDOW = B * T


@pytest.fixture
def window_shards(tmp_path):
    """Train shards in which every token of window w holds the value w (unique across shards), so a
    batch tells which window it came from. Shard sizes leave tails shorter than one window."""
    sizes = [10 * WINDOW + 1, 7 * WINDOW + 5, 3 * WINDOW + 1]  # 10 + 7 + 3 = 20 full windows
    next_id = 1
    all_windows = set()
    for i, size in enumerate(sizes):
        n_windows = (size - 1) // WINDOW
        ids = np.arange(next_id, next_id + n_windows + 1)  # one more for the tail
        tokens = np.repeat(ids, WINDOW)[:size].astype(np.uint16)
        np.save(tmp_path / f"test_train_{i + 1:06d}.npy", tokens)
        all_windows |= set(range(next_id, next_id + n_windows))
        next_id += n_windows + 1
    np.save(tmp_path / "test_val_000000.npy", np.arange(100, 100 + 8 * T + 1).astype(np.uint16))
    return tmp_path, all_windows


def windows_of_epoch(loader):
    return [int(loader.next_batch()[0][0, 0]) for _ in range(loader.batches_per_epoch)]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_read_disjoint_windows_that_cover_the_epoch(window_shards, world_size):
    data_dir, all_windows = window_shards
    per_rank = []
    for rank in range(world_size):
        loader = t.TrainLoader(data_dir, B, T, rank, world_size, seed=1)
        assert all(isinstance(s, np.memmap) for s in loader.shards)  # never a whole shard in RAM
        per_rank.append(windows_of_epoch(loader))
    seen = [w for windows in per_rank for w in windows]
    assert len(seen) == len(set(seen)), "two ranks read the same window"
    assert set(seen) <= all_windows
    assert len(all_windows) - len(seen) < world_size  # only the last partial round is left out
    if world_size == 1:
        assert set(seen) == all_windows


def test_batches_are_inputs_and_targets_shifted_by_one(window_shards):
    data_dir, _ = window_shards
    x, y = t.TrainLoader(data_dir, B, T).next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == torch.long
    flat_x, flat_y = x.flatten(), y.flatten()
    assert torch.equal(flat_x[1:], flat_y[:-1])


def test_shuffle_depends_on_seed_and_epoch(window_shards):
    data_dir, _ = window_shards
    first = windows_of_epoch(t.TrainLoader(data_dir, B, T, seed=1))
    assert first == windows_of_epoch(t.TrainLoader(data_dir, B, T, seed=1))
    assert first != windows_of_epoch(t.TrainLoader(data_dir, B, T, seed=2))
    assert first != sorted(first)  # not the file order
    loader = t.TrainLoader(data_dir, B, T, seed=1)
    windows_of_epoch(loader)
    second_epoch = windows_of_epoch(loader)
    assert sorted(second_epoch) == sorted(first) and second_epoch != first


@pytest.mark.parametrize("k", [3, 19, 25])  # within the first epoch, at its end, into the second
def test_state_dict_resumes_the_exact_batches(window_shards, k):
    data_dir, _ = window_shards
    loader = t.TrainLoader(data_dir, B, T, rank=1, world_size=2, seed=5)
    for _ in range(k):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(12)]
    resumed = t.TrainLoader(data_dir, B, T, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(12))):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_val_set_is_the_same_for_any_world_size(window_shards):
    data_dir, _ = window_shards
    totals, sequences = [], []
    for world_size in (1, 2, 3):
        ranks = [t.ValLoader(data_dir, 3, T, val_tokens=6 * T, rank=r, world_size=world_size) for r in range(world_size)]
        totals.append(ranks[0].total_tokens)
        sequences.append(sorted(int(x[i, 0]) for v in ranks for x, _ in v.batches() for i in range(x.size(0))))
    assert totals == [6 * T] * 3
    assert sequences[0] == sequences[1] == sequences[2] and len(sequences[0]) == 6


def test_clear_errors_for_bad_data(tmp_path, window_shards):
    with pytest.raises(t.UserError, match="run `python fineweb.py`"):
        t.TrainLoader(tmp_path / "empty", B, T)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    np.save(tiny / "tiny_train_000001.npy", np.zeros(WINDOW, dtype=np.uint16))  # one token short of a window
    with pytest.raises(t.UserError, match="fewer than one batch"):
        t.TrainLoader(tiny, B, T)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "x_train_000001.npy", np.full(4 * WINDOW + 1, 50300, dtype=np.uint16))
    with pytest.raises(t.UserError, match="token id 50300"):
        t.TrainLoader(bad, B, T, vocab_size=50257).next_batch()
    np.save(bad / "x_train_000001.npy", np.zeros(4 * WINDOW + 1, dtype=np.int32))
    with pytest.raises(t.UserError, match="not a shard of GPT-2 tokens"):
        t.TrainLoader(bad, B, T)
