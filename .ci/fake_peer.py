"""A stand-in for a peer trainer in gpu_checks.sh --dry-run where the real ones were not prepared (as in CI,
which has no copy of their code): it prints step lines in the peer's own format, so that the scoreboard's
running, stopping, parsing and ratio lines are exercised. Its figures mean nothing.

    python .ci/fake_peer.py bng                       # build-nanogpt's lines, until it is stopped
    python .ci/fake_peer.py llmc --num_iterations 5   # llm.c's lines (it takes, and ignores, llm.c's other flags)
"""

import argparse
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=("bng", "llmc"))
    p.add_argument("--num_iterations", type=int, default=10_000)  # llm.c's flag; build-nanogpt runs 19,073 steps
    args, _ = p.parse_known_args()
    tokens = 256  # the dry run's toy step: figures of the size of ours there
    for step in range(args.num_iterations):
        t0 = time.time()
        time.sleep(0.05 * (1 + step % 3))  # a step's "work": steps of different lengths, so a median means something
        dt = time.time() - t0
        if args.kind == "bng":
            print(f"step {step:5d} | loss: 10.950000 | lr 8.3916e-07 | norm: 1.0000 | dt: {dt * 1000:.2f}ms | "
                  f"tok/sec: {tokens / dt:.2f}", flush=True)
        else:
            print(f"step {step + 1:4d}/{args.num_iterations} | train loss 10.950000 | norm 1.0000 | lr 1.00e-04 | "
                  f"({dt * 1000:.2f} ms | {tokens / dt:.0f} tok/s)", flush=True)


if __name__ == "__main__":
    main()
