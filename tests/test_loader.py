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
    return [int(loader.next_batch()[0][0, 0]) for _ in range(loader.windows_per_epoch)]


def global_stream(data_dir, world_size, n, seed=1):
    """The first n windows the ranks read together, in the order of the stream (window g is rank g %
    world_size's (g // world_size)-th batch)."""
    loaders = [t.TrainLoader(data_dir, B, T, rank, world_size, seed=seed) for rank in range(world_size)]
    per_rank = [[int(loader.next_batch()[0][0, 0]) for _ in range(-(-n // world_size))] for loader in loaders]
    return [per_rank[g % world_size][g // world_size] for g in range(n)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_read_disjoint_windows_the_same_stream_for_any_world_size(window_shards, world_size):
    """Together the ranks read the stream one rank reads: each epoch every full window once, then the
    next epoch's. 3 ranks do not divide the 20 windows of an epoch: the epochs run on across batches."""
    data_dir, all_windows = window_shards
    assert all(isinstance(s, np.memmap) for s in t.TrainLoader(data_dir, B, T).shards)  # never a whole shard in RAM
    one_rank = global_stream(data_dir, 1, 50)
    assert sorted(one_rank[:20]) == sorted(all_windows) == sorted(one_rank[20:40])  # epochs 1 and 2
    assert one_rank[:20] != one_rank[20:40]  # reshuffled
    assert global_stream(data_dir, world_size, 50) == one_rank


def test_batches_are_inputs_and_targets_shifted_by_one(tmp_path):
    """Every token a distinct value: y is x shifted by one, and a window's last target is the next
    window's first input (consecutive windows share one token)."""
    np.save(tmp_path / "n_train_000001.npy", np.arange(10 * WINDOW + 1, dtype=np.uint16))
    loader = t.TrainLoader(tmp_path, B, T, seed=3)
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == torch.long
        start = int(x[0, 0])
        assert start % WINDOW == 0  # a whole window, from its start
        assert torch.equal(x.flatten(), torch.arange(start, start + WINDOW))
        assert torch.equal(y.flatten(), torch.arange(start + 1, start + WINDOW + 1))


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


@pytest.mark.parametrize("k", [3, 9, 13])  # within the first epoch, at its end, into the second (10 per epoch and rank)
@pytest.mark.parametrize("resume_world_size", [2, 1])
def test_state_dict_resumes_the_exact_batches(window_shards, k, resume_world_size):
    """Stop two ranks after k batches each; resume on two ranks (the same batches) or one (the same stream)."""
    data_dir, _ = window_shards
    loaders = [t.TrainLoader(data_dir, B, T, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(k):
        for loader in loaders:
            loader.next_batch()
    state = loaders[0].state_dict()
    expected = [loader.next_batch()[0] for _ in range(6) for loader in loaders]  # in stream order
    resumed = [t.TrainLoader(data_dir, B, T, rank=r, world_size=resume_world_size, seed=5) for r in range(resume_world_size)]
    for loader in resumed:
        loader.load_state_dict(state)
    again = [loader.next_batch()[0] for _ in range(12 // resume_world_size) for loader in resumed]
    assert all(torch.equal(a, b) for a, b in zip(expected, again, strict=True))


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
