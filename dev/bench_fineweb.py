"""
Throughput and peak memory of fineweb.py against a straightforward baseline, on the same documents.

    python dev/bench_fineweb.py --input /path/to/docs.jsonl --num_proc 1 2 --rounds 2

The baseline is what most reproductions do: Pool.imap over documents (chunksize=16), each document
encoded to a list of ints, turned into a uint16 array in the worker, copied into a shard buffer in
the main process. Both run as fresh processes (`python fineweb.py ...` as a user would), back to back,
so that whatever else shares the machine affects both alike. Peak memory is sampled every 20 ms and
summed over the process and its workers: RSS (counts shared pages once per process) and PSS (shares
them out, the honest total; Linux only).
"""

import argparse
import json
import multiprocessing
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules, from dev/
from train_gpt2 import EOT_TOKEN, get_tokenizer


# ---------------------------------------------------------------------------------------------------
# The baseline


def encode(text: str) -> np.ndarray:
    tokens = [EOT_TOKEN]
    tokens.extend(get_tokenizer().encode_ordinary(text))
    return np.array(tokens, dtype=np.uint16)


def read_texts(path):
    with open(path) as f:
        for line in f:
            yield json.loads(line)["text"]


def baseline(path, out_dir, shard_size, num_proc) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    buffer = np.empty(shard_size, dtype=np.uint16)
    filled = index = total = 0
    with multiprocessing.Pool(num_proc) as pool:
        for tokens in pool.imap(encode, read_texts(path), chunksize=16):
            total += len(tokens)
            while len(tokens):
                take = min(shard_size - filled, len(tokens))
                buffer[filled : filled + take], tokens = tokens[:take], tokens[take:]
                filled += take
                if filled == shard_size:
                    np.save(out_dir / f"base_{'val' if index == 0 else 'train'}_{index:06d}.npy", buffer)
                    filled, index = 0, index + 1
    if filled:
        np.save(out_dir / f"base_{'val' if index == 0 else 'train'}_{index:06d}.npy", buffer[:filled])
    print(f"baseline: {total:,} tokens ({total / (time.time() - started):,.0f} tokens/s)")


# ---------------------------------------------------------------------------------------------------
# Measuring a command


def measure(command) -> dict:
    """Run a command; return its wall time, CPU time (all its processes) and the peak of its process
    tree's summed RSS and PSS (MB)."""
    import psutil

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    root = psutil.Process(process.pid)
    peak_rss = peak_pss = 0
    while process.poll() is None:
        rss = pss = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        except psutil.Error:  # a worker came or went while we looked
            pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.02)
    seconds = time.time() - started
    assert process.returncode == 0, f"{command} failed"
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # counts workers too: each parent waited for its own
    cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    rate_line = [line for line in process.stdout.read().splitlines() if "tokens/s" in line][-1]
    return {"seconds": seconds, "cpu_seconds": cpu, "rss_mb": peak_rss / 2**20, "pss_mb": peak_pss / 2**20,
            "own_rate": rate_line.rsplit("(", 1)[1].rstrip(")")}


def all_tokens(out_dir) -> np.ndarray:
    shards = sorted(Path(out_dir).glob("*.npy"), key=lambda p: p.stem.rsplit("_", 1)[1])  # by index: val first
    return np.concatenate([np.load(p) for p in shards])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a .jsonl file of documents (field text)")
    parser.add_argument("--repeat", type=int, default=1, help="use the input this many times over (a bigger run)")
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shard_size", type=int, default=1_000_000)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline(args.input, args.out_dir, args.shard_size, args.num_proc[0])
        return

    work = Path(tempfile.mkdtemp(prefix="bench-fineweb-"))
    path = Path(args.input)
    if args.repeat > 1:
        path = work / "input.jsonl"
        with open(path, "wb") as f:
            for _ in range(args.repeat):
                f.write(Path(args.input).read_bytes())
    total = sum(len(encode(t)) for t in read_texts(path))
    print(f"{path}: {total:,} tokens")
    here, repo = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
    for round_ in range(args.rounds):
        for num_proc in args.num_proc:
            commands = {
                "baseline": [sys.executable, str(here / "bench_fineweb.py"), "--baseline", "--input", str(path),
                             "--out_dir", str(work / "baseline"), "--shard_size", str(args.shard_size), "--num_proc", str(num_proc)],
                "fineweb.py": [sys.executable, str(repo / "fineweb.py"), "--input", str(path), "--out_dir", str(work / "ours"),
                               "--shard_size", str(args.shard_size), "--num_proc", str(num_proc)],
            }
            shutil.rmtree(work / "baseline", ignore_errors=True)
            shutil.rmtree(work / "ours", ignore_errors=True)
            for name, command in commands.items():
                r = measure(command)
                print(f"round {round_ + 1} num_proc {num_proc} {name:10s} {r['seconds']:6.2f} s wall "
                      f"({total / r['seconds'] / 1e6:4.2f} M tokens/s end to end, {r['own_rate']} after startup), "
                      f"{r['cpu_seconds']:5.2f} CPU s, peak RSS {r['rss_mb']:4.0f} MB, PSS {r['pss_mb']:4.0f} MB")
            assert np.array_equal(all_tokens(work / "baseline"), all_tokens(work / "ours")), "different tokens"
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
