"""The training scoreboard of .ci/gpu_checks.sh: our 124M training step against two public GPT-2 trainers
on the same card, the same token shards and the same step (B=64, T=1024, 2^19 tokens, bf16, compiled):
build-nanogpt's train_gpt2.py and llm.c's PyTorch reference train_gpt2.py.

    python .ci/scoreboard.py prepare --peers DIR --data .gpu    # (gpu_checks.sh --prepare) their scripts into .gpu/peers
    python .ci/scoreboard.py run --kind bng --steps 9 --stop --log LOG --cwd DIR -- CMD...  # one run, logged
    python .ci/scoreboard.py report --card "NVIDIA H200" LOGS   # the ratio lines, from the logs alone

Their code is never part of this repository: `prepare` copies it from checkouts the user names (DIR/build-nanogpt
and DIR/llm.c, each a work tree or a git directory) into .gpu/peers/, which git ignores, and patches as little
as a benchmark needs:
- build-nanogpt: `use_compile = False` becomes True (its only edit: it has no flag). Compiled, it skips its
  HellaSwag and its samples by itself; its `hellaswag` import gets a stub (its own module would import
  requests and transformers for functions that are never called). Its data folder, edu_fineweb10B, is a
  symlink to our shards in the folder it runs in (the same .npy format), and it is stopped after N steps,
  before its last step's val loss and checkpoint.
- llm.c: nothing. Its own flags give the shapes, compile, flash attention, TF32 and bf16, and N steps;
  `prepare` writes our train shards in its .bin format (a 256 x int32 header: magic 20240520, version 1,
  the token count; then the uint16 tokens), the same tokens.
Both get GPT-2's tokenizer from tiktoken, offline: gpu_checks.sh points TIKTOKEN_CACHE_DIR at a copy of
the shared cache in .gpu/.
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The first logged steps of each run are left out: step 0 compiles (build-nanogpt's also compiles its val
# loss), and the next ones still settle (the allocator, llm.c's coordinate-descent tuning).
WARMUP_STEPS = 3


@dataclass(frozen=True)
class Trainer:
    label: str  # as the summary names it
    step_line: re.Pattern  # a line of its output for one optimizer step; group "tok_s": its tokens a second


TRAINERS = {  # kind (as in the log names train_KIND_N.log) -> how its output reads
    # step     3 | loss 10.9 | lr 6.0e-06 | norm 1.2 | dt 1053.2ms | tok/s 497,497 | MFU 43.3% | ETA 2m
    "ours": Trainer("ours", re.compile(r"^step\s+\d+ \| loss .*\| tok/s (?P<tok_s>[\d,]+) \|")),
    # step     3 | loss: 10.9 | lr 3.3e-06 | norm: 1.2 | dt: 1053.20ms | tok/sec: 497497.12
    "bng": Trainer("build-nanogpt", re.compile(r"^step\s+\d+ \| loss: .*\| tok/sec: (?P<tok_s>[\d.]+)\s*$")),
    # step    4/9 | train loss 10.9 | norm 1.2 | lr 1.00e-04 | (1053.20 ms | 497497 tok/s)
    "llmc": Trainer("llm.c-pytorch", re.compile(r"^step\s+\d+/\d+ \| train loss .*\| \(\S+ ms \| (?P<tok_s>\d+) tok/s\)\s*$")),
}
PEERS = ("bng", "llmc")
MFU = re.compile(r"^step\s+\d+ \| loss .*\| MFU ([\d.]+)%", re.MULTILINE)  # ours only: 'MFU 43.3%', or 'MFU n/a'



# ---------------------------------------------------------------------------------------------------
# Reading the logs


def step_speeds(log: Path, kind: str) -> list[float]:
    """tok/s of every step a run logged, in order."""
    pattern = TRAINERS[kind].step_line
    speeds = []
    for line in log.read_text(errors="replace").splitlines():
        if match := pattern.match(line):
            speeds.append(float(match["tok_s"].replace(",", "")))
    return speeds


def steady_speeds(logs: list[Path], kind: str) -> list[list[float]]:
    """Each run's tok/s after its first WARMUP_STEPS steps."""
    return [step_speeds(log, kind)[WARMUP_STEPS:] for log in logs]


def report(logs_dir: Path, card: str) -> list[str]:
    """The scoreboard's summary lines: each trainer's median over the steady steps of all its runs (their
    spread and each run's median beside it), then a ratio line per peer: our median over theirs."""
    medians, lines = {}, []
    for kind, trainer in TRAINERS.items():
        logs = sorted(logs_dir.glob(f"train_{kind}_*.log"))
        if not logs:
            continue
        runs = steady_speeds(logs, kind)
        pooled = [s for run in runs for s in run]
        if not pooled:
            lines.append(f"scoreboard {trainer.label}: not measured (no step after the first {WARMUP_STEPS} in "
                         f"{', '.join(log.name for log in logs)})")
            continue
        medians[kind] = statistics.median(pooled)
        per_run = ", ".join(f"{statistics.median(run):,.0f}" if run else "-" for run in runs)
        mfu = [float(m) for log in logs for m in MFU.findall(log.read_text(errors="replace"))[WARMUP_STEPS:]]
        lines.append(f"scoreboard {trainer.label}: {medians[kind]:,.0f} tok/s"
                     + (f", MFU {statistics.median(mfu):.1f}%" if mfu else "")
                     + f", median of {len(pooled)} steady steps in {len(runs)} run(s) (spread {min(pooled):,.0f}-"
                     f"{max(pooled):,.0f}; each run's median: {per_run})")
    if "ours" not in medians:
        raise SystemExit(f"error: no steady step of ours in {logs_dir}/train_ours_*.log: no ratio to report")
    for kind in PEERS:
        if kind in medians:
            lines.append(f"ratio train 124M ours/{TRAINERS[kind].label}: {medians['ours'] / medians[kind]:.3f}x "
                         f"(ours {medians['ours']:,.0f} tok/s, theirs {medians[kind]:,.0f} tok/s, {card})")
    return lines


# ---------------------------------------------------------------------------------------------------
# Running one trainer


def stop(process: subprocess.Popen) -> None:
    """End the process and everything it started (torch.compile's workers): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(command: list[str], cwd: Path, kind: str, steps: int, log: Path, stop_after: bool) -> int:
    """Run `command` in `cwd`, its output into `log`. With stop_after, end it once it has logged `steps`
    steps (build-nanogpt would go on for 19,073). 0 when it logged them (and, left to end, ended well)."""
    pattern = TRAINERS[kind].step_line
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", start_new_session=True)  # its own group: stop() ends its children too
    # A time limit (gpu_checks.sh runs this under `timeout`) must end the trainer too, not leave it on the GPU.
    signal.signal(signal.SIGTERM, lambda *_: (stop(process), sys.exit(124)))
    logged = 0
    with open(log, "w") as out:
        for line in process.stdout:
            out.write(line)
            out.flush()
            logged += bool(pattern.match(line))
            if stop_after and logged >= steps:
                stop(process)
                return 0
    code = process.wait()
    if logged < steps or code:
        print(f"error: {' '.join(command[:2])} ended (exit {code}) after {logged} of {steps} steps: see {log.name}",
              file=sys.stderr)
        return code or 1
    return 0


# ---------------------------------------------------------------------------------------------------
# Preparing the peers (gpu_checks.sh --prepare --peers DIR)

LLMC_MAGIC, LLMC_VERSION = 20240520, 1


def write_llmc_shard(tokens: np.ndarray, path: Path) -> None:
    """Tokens in llm.c's .bin format: a header of 256 int32 (magic, version, token count), then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (LLMC_MAGIC, LLMC_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def peer_file(checkout: Path, name: str) -> tuple[str, str]:
    """(the text of `name`, where it came from) in a work tree, or at HEAD of a git directory."""
    if (checkout / name).is_file():
        return (checkout / name).read_text(), str(checkout / name)
    if (checkout / "HEAD").is_file() or (checkout / ".git").exists():  # a bare git directory, or a work tree's
        git_dir = checkout if (checkout / "HEAD").is_file() else checkout / ".git"
        show = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{name}"], capture_output=True, text=True)
        commit = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], capture_output=True, text=True)
        if show.returncode == 0:
            return show.stdout, f"{checkout} at {commit.stdout.strip()[:12]}"
    raise SystemExit(f"error: {checkout} has no {name} (expected a checkout of the peer, or its git directory)")


def substitute(text: str, old: str, new: str, peer: str) -> str:
    """Replace the one line that starts with `old` (a line of the peer's code) with `new`; exit if the peer's
    code has no such line, or several (another version: the benchmark would not be what it says)."""
    lines = text.split("\n")
    hits = [i for i, line in enumerate(lines) if line.startswith(old)]
    if len(hits) != 1:
        raise SystemExit(f"error: {peer}'s train_gpt2.py has {len(hits)} lines starting {old!r}, not 1 (another "
                         f"version?): cannot patch it for the benchmark")
    lines[hits[0]] = new
    return "\n".join(lines)


def require(text: str, fragments: tuple[str, ...], peer: str, why: str) -> None:
    for fragment in fragments:
        if fragment not in text:
            raise SystemExit(f"error: {peer}'s train_gpt2.py has no {fragment!r} (another version?): {why}")


HELLASWAG_STUB = '''"""Written by our .ci/scoreboard.py: build-nanogpt's train_gpt2.py imports these two, and compiled (as the
benchmark runs it) never calls them. Its own hellaswag.py would import requests and transformers."""


def render_example(example):
    raise RuntimeError("HellaSwag is not part of the benchmark")


def iterate_examples(split):
    raise RuntimeError("HellaSwag is not part of the benchmark")
'''

# The benchmark's shapes, as build-nanogpt sets them in its code (checked, never changed for the real run)
BNG_SHAPES = ("total_batch_size = 524288", "B = 64", "T = 1024", 'data_root = "edu_fineweb10B"')
# A toy build-nanogpt for --dry-run on a CPU: the lines replaced in a copy made at run time (`toy`)
BNG_TOY = (("total_batch_size = 524288", "total_batch_size = 256"), ("B = 64", "B = 4"), ("T = 1024", "T = 64"),
           ("model = GPT(GPTConfig(vocab_size=50304))", "model = GPT(GPTConfig(vocab_size=50304, n_layer=2, n_head=2, n_embd=64))"))
LLMC_FLAGS = ('"--input_bin"', '"--model"', '"--batch_size"', '"--sequence_length"', '"--total_batch_size"',
              '"--num_iterations"', '"--compile"', '"--flash"', '"--tensorcores"', '"--dtype"', '"--write_tensors"',
              '"--overfit_single_batch"', '"--val_loss_every"', '"--sample_every"', "20240520")


def prepare(peers: Path, data: Path) -> None:
    """Copy and patch the peers' scripts into data/peers/; write the train shards in llm.c's format."""
    out = data / "peers"
    shutil.rmtree(out, ignore_errors=True)
    (out / "build-nanogpt").mkdir(parents=True)
    (out / "llm.c").mkdir()

    text, source = peer_file(peers / "build-nanogpt", "train_gpt2.py")
    require(text, BNG_SHAPES, "build-nanogpt", "the benchmark relies on its shapes and data folder")
    require(text, ("tok/sec:",), "build-nanogpt", "its step lines would not parse")
    text = substitute(text, "use_compile = False", "use_compile = True  # .ci/scoreboard.py prepare: compiled", "build-nanogpt")
    (out / "build-nanogpt" / "train_gpt2.py").write_text(text)
    (out / "build-nanogpt" / "hellaswag.py").write_text(HELLASWAG_STUB)
    print(f"build-nanogpt: train_gpt2.py from {source}, use_compile = True")

    text, source = peer_file(peers / "llm.c", "train_gpt2.py")
    require(text, LLMC_FLAGS, "llm.c", "the benchmark runs it by its own flags")
    (out / "llm.c" / "train_gpt2.py").write_text(text)
    print(f"llm.c: train_gpt2.py from {source}, unchanged")

    (out / "llmc_data").mkdir()
    shards = sorted((data / "shards").glob("*_train_*.npy"))
    if not shards:
        raise SystemExit(f"error: {data / 'shards'} has no *_train_*.npy shards to convert for llm.c")
    for shard in shards:
        write_llmc_shard(np.load(shard), out / "llmc_data" / (shard.stem + ".bin"))
    print(f"llm.c: {len(shards)} train shards written as .bin in {out / 'llmc_data'}")


def make_toy(folder: Path) -> None:
    """In a run folder's copy of build-nanogpt's script: the toy shapes of a CPU dry run."""
    script = folder / "train_gpt2.py"
    text = script.read_text()
    for old, new in BNG_TOY:
        text = substitute(text, old, new, "build-nanogpt")
    script.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="action", required=True)
    c = commands.add_parser("prepare", help="copy and patch the peers into DATA/peers")
    c.add_argument("--peers", type=Path, required=True, help="a folder holding build-nanogpt/ and llm.c/")
    c.add_argument("--data", type=Path, required=True, help="the GPU data folder (.gpu), with shards/")
    c = commands.add_parser("toy", help="shrink the build-nanogpt copy in a run folder to toy shapes")
    c.add_argument("folder", type=Path)
    c = commands.add_parser("run", help="run a trainer, log its output, stop it after --steps steps")
    c.add_argument("--kind", choices=TRAINERS, required=True)
    c.add_argument("--steps", type=int, required=True)
    c.add_argument("--stop", action="store_true", help="end it once it has logged --steps steps")
    c.add_argument("--log", type=Path, required=True)
    c.add_argument("--cwd", type=Path, default=Path.cwd())
    c.add_argument("command", nargs=argparse.REMAINDER)
    c = commands.add_parser("report", help="the scoreboard lines from the train_*.log files of a folder")
    c.add_argument("--card", required=True)
    c.add_argument("logs", type=Path)
    args = p.parse_args(argv)
    if args.action == "prepare":
        prepare(args.peers, args.data)
    elif args.action == "toy":
        make_toy(args.folder)
    elif args.action == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        return run(command, args.cwd, args.kind, args.steps, args.log, args.stop)
    else:
        print("\n".join(report(args.logs, args.card)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
