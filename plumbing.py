"""
The run plumbing every script of this repo shares. Nothing here knows about GPT-2, and this module
imports no file of the project: the scripts import it, never the other way round.

  1. errors and command lines: one `error: ...` line instead of a traceback, and under torchrun the line
     of the process that failed, not the others' tracebacks; flags from a dataclass
  2. files: writable outputs checked up front (room included), written whole or not at all, a failed
     write (a full disk) named in one line; text read line by line, downloads, progress bars
  3. checkpoint files: written atomically and durably, rotated, the newest readable one found again
  4. a run folder: one run at a time, --resume / --overwrite, a stop request, skipped non-finite
     steps, the log (log.txt and TensorBoard behind one object)
  5. time, speed and memory: ETA, durations, MFU, what a run will hold
"""

import argparse
import contextlib
import errno
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

try:
    import fcntl  # run-folder locks
except ImportError:  # Windows: runs go unlocked
    fcntl = None

# ---------------------------------------------------------------------------------------------------
# 1. Errors and command lines


class UserError(Exception):
    """Bad input from the user (a missing file, a wrong size, a typo in a name).

    Command-line entry points print it as one line that says what to do, never as a traceback.
    """


def run_main(main) -> None:
    """Run a script's main(); a UserError ends it with `error: <message>` on stderr and exit code 1
    (under torchrun, its report of the failed process names that line too). A process that torchrun
    started ends right after, without the interpreter's teardown (end_torchrun_process)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun in the processes it starts
        end_torchrun_process(lambda: run_main_here(main))
    run_main_here(main)


def run_main_here(main) -> None:
    try:
        main()
    except UserError as e:
        tell_torchrun(f"error: {e}")
        sys.exit(f"error: {e}")


# A process group can outlive destroy_process_group: torch keeps FSDP2's device mesh, and with it the
# group, in caches of its own, and FSDP's module, imported once the group exists (transformers imports
# it), holds the group in default arguments. The interpreter's teardown then destroys the group last,
# and gloo's threads may abort the process ("terminate called without an active exception", SIGABRT):
# torchrun reports a failed run after a good one. (Measured on torch 2.13, CPU: a 4-process gloo run that holds
# its group past destroy_process_group aborted in 4 of 6 launches, then 2 of 6; in 0 of 20 ended as
# below.) So a torchrun process, its work done and its output flushed, ends with os._exit and the exit
# code Python would have given; nothing is left to do by then (no threads of ours; files are closed as
# they are written).


def end_torchrun_process(run) -> None:
    """run(), then end the process at once with the exit code (and message, or traceback) Python would
    have given: 0, the SystemExit's code (its text printed), 130 on Ctrl-C, 1 with a traceback on a bug."""
    code = 0
    try:
        run()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def tell_torchrun(line: str) -> None:
    """torchrun reports a process that failed, after its output; with this error file (the one torchrun's
    @record writes) the report names our line instead of "To enable traceback see: ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        message = dict(message=line, extraInfo=dict(py_callstack=line, timestamp=str(int(time.time()))))
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps(dict(message=message)))


# Under torchrun, a fault seen by one process (rank 0's disk, say) must reach the user as that process's
# one line, not as the tracebacks of the others, whose next collective fails when it exits ("Connection
# closed by peer"). So a process that stops with an error leaves its line in torchrun's store, which
# outlives it; another that stops because of it finds the line there and ends quietly (StoppedByPeer),
# with exit code 0, so that torchrun's report names the process that failed.


class StoppedByPeer(SystemExit):
    """This process stops because another stopped with an error, which that one reports: nothing to print."""

    def __init__(self):
        super().__init__(0)


def _error_key(rank: int) -> str:
    return f"run_error/{rank}"


def tell_peers(line: str) -> None:
    """Leave this process's error line where the others look for it (under torchrun)."""
    with contextlib.suppress(Exception):  # the store is gone: the others print their own error
        dist.distributed_c10d._get_default_store().set(_error_key(dist.get_rank()), line)


def peer_error(wait: float = 0.0, ranks=None) -> str | None:
    """The error line another process left (tell_peers), waiting up to `wait` seconds for one; None if none."""
    try:
        store, me = dist.distributed_c10d._get_default_store(), dist.get_rank()
        ranks = [r for r in (range(dist.get_world_size()) if ranks is None else ranks) if r != me]
        deadline = time.time() + wait
        while True:
            for rank in ranks:
                if store.check([_error_key(rank)]):
                    return store.get(_error_key(rank)).decode()
            if time.time() >= deadline:
                return None
            time.sleep(0.05)
    except Exception:  # no process group, or its store went with the process that held it
        return None


def stop_together(error: BaseException | None, master: bool) -> None:
    """Under torchrun, as a process stops with `error`: leave its line for the others, or, if it stops
    because another one did (its collective failed, or it raised the same UserError as rank 0, which
    prints it), raise StoppedByPeer to end quietly."""
    if error is None or isinstance(error, StoppedByPeer) or not (dist.is_available() and dist.is_initialized()):
        return
    if isinstance(error, UserError):
        line = str(error)
        if not master and peer_error(wait=5.0, ranks=[0]) == line:  # all ranks found it: rank 0 says it
            raise_quietly()
        tell_peers(line)
        return
    if peer_error(wait=5.0) is not None:  # another process stopped first, and said why
        raise_quietly()
    tell_peers(f"{type(error).__name__}: {error}".splitlines()[0])


def raise_quietly():
    # torchrun sends the processes left a SIGTERM once one has failed: this one is ending already.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise StoppedByPeer() from None


def rank0_decides(ddp: bool, master: bool, decide):
    """Rank 0 runs decide() (the checks and writes of the run folder, which rank 0 owns); every process
    gets its result, or stops with its UserError, which rank 0 prints (the others end quietly)."""
    verdict, problem = [None, None], None  # [decide()'s result (small: it is sent), its error line]
    if master:
        try:
            verdict[0] = decide()
        except UserError as e:
            verdict[1], problem = str(e), e
    if ddp:
        dist.broadcast_object_list(verdict, src=0)
    if problem is not None:
        raise problem
    if verdict[1] is not None:
        raise_quietly()
    return verdict[0]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported the same way: one `error: ...` line, exit code 2. Flags must
    be spelled out (no --max for --max_steps), so a typo can't silently set another flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


# What a setting may be. Every value is checked (check_rules) before any work starts, and a bad one is
# named in one line: `--max_steps 0` must not "train" on nothing, `--max_lr nan` must not run for an
# hour of NaNs.
RULES = {
    "positive": (lambda v: v >= 1, "must be at least 1"),
    "non_negative": (lambda v: v >= 0, "must be 0 or more"),
    "positive_number": (lambda v: math.isfinite(v) and v > 0, "must be a finite number above 0"),
    "non_negative_number": (lambda v: math.isfinite(v) and v >= 0, "must be a finite number, 0 or more"),
    "fraction": (lambda v: 0 <= v <= 1, "must be between 0 and 1"),
    "beta": (lambda v: 0 <= v < 1, "must be at least 0 and below 1"),
    "seed": (lambda v: 0 <= v < 2**63, "must be between 0 and 2^63 - 1"),
    # smaller is 0 in float32 arithmetic, where an optimizer's epsilon would divide by zero
    "float32_positive": (lambda v: math.isfinite(v) and v >= float(torch.finfo(torch.float32).tiny),
                         f"must be a finite number, at least {float(torch.finfo(torch.float32).tiny):.2g} (smaller is 0 in float32)"),
}


def setting(default, help: str, rule: str | None = None, choices: tuple | None = None):
    """A dataclass field that is also a command-line flag: its default, its --help text, and the rule
    (a key of RULES) or the choices its value must meet."""
    return field(default=default, metadata=dict(help=help, rule=rule, choices=choices))


def parse_dataclass(cls, argv, presets: dict, description: str, defaults=None):
    """An instance of the dataclass `cls` from the command line: one flag per field (--name value, or
    --name / --no-name for a bool), and --preset NAME for a named set of defaults (flags given beside
    it win). defaults(args), if given, returns defaults that depend on other flags (a model size's
    recipe, say), applied before the preset's. Returns (instance, the names of the flags given)."""
    def as_flag(name, value):
        return (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name} {value}"

    listed = "\n".join(f"  {name}: " + " ".join(as_flag(*kv) for kv in values.items()) for name, values in presets.items())
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=f"presets (--preset NAME sets these; flags given beside it win):\n{listed}")
    parser.add_argument("--preset", choices=sorted(presets), help="start from a named set of settings (listed below)")
    for f in fields(cls):
        kind = f.type if isinstance(f.type, type) else type(f.default)
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"] + f" (default: {'on' if f.default else 'off'})")
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, choices=f.metadata["choices"],
                                help=f.metadata["help"] + " (default: %(default)s)")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    known = parser.parse_known_args(argv)[0]
    if defaults:
        parser.set_defaults(**defaults(known))
    if known.preset:
        parser.set_defaults(**presets[known.preset])
    args = vars(parser.parse_args(argv))
    args.pop("preset")
    explicit = {a[2:].split("=")[0].removeprefix("no-") for a in argv if a.startswith("--")}
    return cls(**args), explicit


def check_rules(config) -> None:
    """One UserError for the first field of a dataclass made with setting() that breaks its rule."""
    for f in fields(config):
        value, rule = getattr(config, f.name), f.metadata.get("rule")
        if rule and not RULES[rule][0](value):
            raise UserError(f"--{f.name} {value} {RULES[rule][1]}")


def split_list(text: str) -> tuple[str, ...]:
    """"a, b,c" -> ("a", "b", "c"): the comma-separated values of a flag."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def shell_command(*words) -> str:
    """A command to paste into a shell, each word quoted where it must be (a path with a space)."""
    return " ".join(shlex.quote(str(word)) for word in words)


def shell_double_quoted(text: str) -> str:
    """text in double quotes for a shell, as one word: what the shell would expand there is escaped."""
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


def pick_device(requested: str = "auto") -> str:
    """'auto' picks cuda > mps > cpu; a device asked for by name must exist here."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", requested):
        raise UserError(f"--device {requested} is not a device: use auto, cpu, mps, cuda or cuda:N")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA GPU is visible here (try --device auto)")
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if requested == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's MPS backend is not available here (try --device auto)")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# ---------------------------------------------------------------------------------------------------
# 2. Files


def check_writable(path, flag: str) -> None:
    """Fail now, not after an hour of work, if a result cannot be written to the file `path` (its folder
    is checked as check_writable_folder checks one; nothing is created)."""
    if Path(path).expanduser().is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name")
    if problem := unwritable(Path(path).expanduser().parent):
        raise UserError(f"{flag} {path}: {problem}")


def check_writable_folder(path, flag: str) -> None:
    """Fail now, not after an hour of work, if results cannot be written into the folder `path`."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder: give a folder")
    if problem := unwritable(path):
        raise UserError(f"{flag} {path}: {problem}")


def unwritable(folder: Path) -> str | None:
    """Why nothing can be written into `folder` (or, if it does not exist yet, into the nearest folder
    above it, where it would be made), or None. A byte is written and removed again (an empty file needs
    no space, so a full disk would pass); nothing is left: a run that fails later for another reason
    leaves no empty folder behind."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder: give another path"
    probe = existing / f".write-probe-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with open(probe, "xb") as f:
            f.write(b"\0")
            f.flush()
    except OSError as e:
        if disk_full(e):
            return f"cannot write there: no space left on the device of {existing} ({format_bytes(free_bytes(existing))} free)"
        return f"cannot write there ({e.strerror} in {existing})"
    finally:
        probe.unlink(missing_ok=True)
    return None


def nearest_existing(path) -> Path:
    """path, or the nearest folder above it that exists (where it would be made)."""
    existing = Path(path).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    return existing


def free_bytes(path) -> int | None:
    """The bytes that may still be written where `path` is (or would be made); None if unknown."""
    try:
        return shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return None


def format_bytes(n: float | None) -> str:
    """19_682_523 -> "19.7 MB": a file's size at a glance."""
    if n is None:
        return "? bytes"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def disk_full(error: BaseException | None) -> bool:
    """Whether a failed write met a full disk (or quota), however it surfaced: an OSError, torch.save's
    RuntimeError raised after it ("unexpected pos"), safetensors' error in Rust's words."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_failure(error: BaseException, where, needed: int | None = None) -> str | None:
    """Why a write to `where` (a file or a folder) failed, in words; None if `error` is no failure to
    write (a bug, say: the caller lets it through). needed: the bytes it would take, if known.

    A full disk is named with what it takes and what is free. numpy's writer loses the errno ("500000
    requested and 466880 written"): a short write where less than `needed` is free is a full disk too."""
    free = free_bytes(where)
    cause, seen = error, set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if disk_full(error) or (cause is not None and needed and free is not None and free < needed):
        takes = f"it takes ~{format_bytes(needed)}, " if needed else ""
        return f"no space left on the device ({takes}{format_bytes(free)} free)"
    if cause is None:
        return None
    return cause.strerror or str(cause)


def utf8_lines(path):
    """(line number, line) of a text file, read as bytes and decoded line by line, so that a bad byte is
    reported with the file and the line it is on."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{line_number}: line {line_number} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def write_json_atomically(path, result: dict, flag: str | None = None) -> None:
    """path holds `result` whole, or is left as it was: a failed write (a full disk) leaves no partial
    file and ends with one line that names it (flag: the option that chose the path, e.g. --json)."""
    path, text = Path(path), json.dumps(result, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, text)
    except OSError as e:
        name = f"{flag} {path}" if flag else str(path)
        raise UserError(f"could not write {name}: {write_failure(e, path.parent, len(text))}; it is left as it was "
                        f"(the result is above): free space or give another path") from e


def replace_atomically(path: Path, text: str) -> None:
    """Write a text file whole or not at all (a temporary file beside it, renamed); OSError if it fails."""
    partial = path.with_name(path.name + ".part")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_written_whole(out_dir, needed: int | None = None, what: str = "folder"):
    """Yield a temporary folder to write into, on out_dir's disk; once the block ends well its files move
    into out_dir (made if need be; files of other names there are left alone). A failed write (a full
    disk) leaves out_dir as it was, no partial file, and ends with one line. needed: the bytes it takes."""
    out_dir = Path(out_dir).expanduser()
    check_writable_folder(out_dir, what)
    free = free_bytes(out_dir)
    if needed and free is not None and free < needed:
        raise UserError(f"cannot write {what} {out_dir}: it takes ~{format_bytes(needed)}, and {format_bytes(free)} "
                        "are free there: free space or give another path")
    existed = out_dir.is_dir()
    home = out_dir if existed else nearest_existing(out_dir)
    partial = Path(tempfile.mkdtemp(dir=home, prefix=f".{out_dir.absolute().name}.partial-"))
    try:
        yield partial
        if existed:
            for item in partial.iterdir():
                os.replace(item, out_dir / item.name)
        else:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, out_dir)
    except Exception as e:
        reason = write_failure(e, home, needed)
        if reason is None:
            raise
        raise UserError(f"could not write {what} {out_dir}: {reason}; nothing was written there: free space (or fix "
                        "the folder) and run it again") from e
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def download(url: str, dest: Path) -> None:
    """Download url to dest with a progress bar. The bytes go to a temporary file beside dest, renamed
    once complete, so an interrupted download never leaves a truncated file that looks finished."""
    import urllib.request

    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None  # None: tqdm counts without a total
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as progress:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    progress.update(len(chunk))
        os.replace(partial, dest)  # atomic: dest is either absent or complete
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def find_data_file(what: str, given: str | None, env_var: str, url: str, cache_path: Path) -> Path:
    """A data file: the one given (--data), else the one $env_var names, else a download kept at
    cache_path (fetched on first use). Each is refused in one line if it is missing."""
    for source, value in (("--data", given), (f"${env_var}", os.environ.get(env_var))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                problem = f"is a folder: give the {cache_path.name} file" if path.is_dir() else "does not exist"
                raise UserError(f"{what} data file {path} (from {source}) {problem}")
            return path
    if not cache_path.is_file():
        try:
            download(url, cache_path)
        except OSError as e:  # no network, DNS failure, HTTP error (URLError and HTTPError are OSErrors)
            raise UserError(f"could not download {what} from {url} ({e}); without internet, pass "
                            f"--data path/to/{cache_path.name} or set {env_var}") from e
    return cache_path


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' progress bars and warnings while it loads or saves weights for us: they
    describe its internals (shards, loss types), not anything a user of this repo should act on."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def progress_bar(iterable=None, enabled=True, desc="", **kwargs):
    """tqdm with an ETA, on a terminal only: a log file gets the result lines, not a thousand redraws."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=None if enabled else True, **kwargs)


# ---------------------------------------------------------------------------------------------------
# 3. Checkpoint files
#
# A checkpoint is written to a temp file, flushed to disk, then renamed: a kill or a full disk during a
# save leaves the previous checkpoint intact. Only the newest few are kept. Loaded with
# weights_only=True: a checkpoint downloaded from someone else cannot run code on load.

CHECKPOINT_GLOB = "ckpt_*.pt"  # run_dir/ckpt_000250.pt, ckpt_000500.pt, ...


def checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:06d}.pt"


def find_latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint in a run folder (by step number in its name), or None."""
    checkpoints = sorted(Path(run_dir).glob(CHECKPOINT_GLOB))
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by train_gpt2.py, with a one-line error if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)  # read as used
    except Exception as e:  # truncated file, not a zip, pickled objects we refuse to load, ...
        raise UserError(f"checkpoint {path} is unreadable (corrupt or truncated?): {type(e).__name__}") from e
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_config" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint written by train_gpt2.py (no 'model'/'model_config')")
    return checkpoint


def newest_readable_checkpoint(run_dir, set_aside=False) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of a run folder that loads, and its contents. One that does not (a disk
    that failed, a copy cut short) is named on stderr and skipped; set_aside renames it *.unreadable,
    so that nothing takes it for the newest again (the training run does this, rank 0 only)."""
    for path in sorted(Path(run_dir).glob(CHECKPOINT_GLOB), reverse=True):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            print(f"warning: {e}; using the checkpoint before it", file=sys.stderr)
            if set_aside:
                os.replace(path, path.with_name(path.name + ".unreadable"))
    return None, None


def resolve_reference(reference: str) -> str:
    """A run folder -> its newest readable checkpoint file; anything else as it is."""
    path = Path(reference)
    if path.is_dir() and not (path / "config.json").exists():  # a run folder (an HF dir has config.json)
        checkpoint, _ = newest_readable_checkpoint(path)
        if checkpoint is None:
            raise UserError(f"{reference} holds no readable {CHECKPOINT_GLOB} checkpoint and is not a Hugging Face directory")
        return str(checkpoint)
    return reference


def fsync_dir(folder: Path) -> None:
    """Make a rename in this folder durable (POSIX: the folder's entry is data too)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of all the tensors in a (nested) dict/list: what a checkpoint will weigh (a tensor that shares
    its memory with another, a tied weight, is saved once and counted once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.device) if obj.device.type != "meta" else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes() if obj.device.type != "meta" else obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def save_checkpoint_file(checkpoint: dict, path: Path, progress=False) -> None:
    """torch.save, atomically and durably: the file appears whole or not at all. A full disk (or any
    failure to write) leaves nothing behind and ends the run with one line saying nothing was lost,
    where to resume from and how much room a checkpoint takes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        from tqdm import tqdm

        with open(tmp, "wb") as f:
            with tqdm.wrapattr(f, "write", total=tensor_bytes(checkpoint), desc=f"saving {path.name}", leave=False,
                               disable=None if progress else True) as writer:  # GPT-2 XL: 19 GB to write
                torch.save(checkpoint, writer)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name says the checkpoint is complete
        os.replace(tmp, path)  # atomic: the checkpoint appears whole or not at all
        fsync_dir(path.parent)  # and the new name is on disk before an older checkpoint is deleted
    except BaseException as e:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        tmp.unlink(missing_ok=True)  # a partial file would only fill the disk further
        reason = write_failure(e, path.parent, tensor_bytes(checkpoint))
        if reason is None:
            raise
        raise UserError(f"could not write checkpoint {path}: {reason}. {resume_advice(path.parent)}") from e


def resume_advice(run_dir) -> str:
    """What a run stopped by a failed write keeps, and the command that goes on from it."""
    previous = find_latest_checkpoint(run_dir)
    if previous is None:
        return "No checkpoint was saved yet: free space (or fix the folder), then start over with --overwrite"
    return (f"Nothing was lost: free space (or fix the folder), then add --resume to continue from {previous} "
            "(exactly as if never stopped)")


def rotate_checkpoints(run_dir, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest `keep` checkpoints of a run folder, never `protect`."""
    for old in sorted(Path(run_dir).glob(CHECKPOINT_GLOB))[:-keep]:
        if old != protect:
            old.unlink()


def rng_states(device: str, ddp: bool = False) -> dict:
    """Every random generator's state. Under DDP every rank must call it: each GPU's generator is
    gathered, in rank order (training itself draws nothing on the GPU: no dropout; samples have their
    own generator; but an extension might)."""
    cuda = [torch.cuda.get_rng_state(device)] if device.startswith("cuda") else []
    if ddp and cuda:
        cuda = [None] * dist.get_world_size()
        dist.all_gather_object(cuda, torch.cuda.get_rng_state(device))
    np_state = np.random.get_state(legacy=False)
    return dict(
        python=random.getstate(),
        numpy=dict(key=torch.from_numpy(np_state["state"]["key"].astype(np.int64)), pos=np_state["state"]["pos"],
                   has_gauss=np_state["has_gauss"], gauss=np_state["gauss"]),
        torch=torch.get_rng_state(),
        cuda=cuda,
    )


def set_rng_states(states: dict, device: str, rank: int = 0) -> None:
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    n = states["numpy"]
    np.random.set_state(dict(bit_generator="MT19937", state=dict(key=n["key"].numpy().astype(np.uint32), pos=n["pos"]),
                             has_gauss=n["has_gauss"], gauss=n["gauss"]))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if device.startswith("cuda") and cuda:  # each rank its own; on more GPUs than were saved, the last one's
        torch.cuda.set_rng_state(cuda[min(rank, len(cuda) - 1)], device)


def load_state_dict_checked(model: torch.nn.Module, state: dict, source: str, padded=()) -> None:
    """load_state_dict with one-line errors. The tensors named in `padded` may have fewer rows than the
    model's (a vocabulary padded for speed): the rows beyond them are zeroed, the same way every time."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for key, value in state.items():
            target = ours[key]
            padded_rows = key in padded and value.size(0) < target.size(0)
            if value.shape[1:] != target.shape[1:] or (value.shape[0] != target.shape[0] and not padded_rows):
                raise UserError(
                    f"{source}: {key} has shape {tuple(value.shape)}, this model expects {tuple(target.shape)} "
                    "(was it saved from a model of another size?)"
                )
            target[: value.size(0)].copy_(value)
            target[value.size(0) :].zero_()  # padded rows (if any)


def weights_fingerprint(model: torch.nn.Module) -> float:
    """A number that changes when any weight changes: tells a model from another (a LoRA run's base)."""
    return sum(float(p.detach().double().sum()) for p in model.parameters())


# A model sharded by FSDP2 holds each tensor as a DTensor of which a rank keeps a slice. Its checkpoint
# file holds full tensors, gathered as it is saved, so that it is the same file as an unsharded run's;
# on resume each tensor of the optimizer's state is cut to this rank's slice again.


def is_sharded(model) -> bool:
    """Whether fully_shard made this model (or the one torch.compile wraps) an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def gathered(state, keep: bool):
    """A (nested) state dict whose tensors may be shards, with full tensors instead: on the CPU where
    keep (rank 0, which saves), dropped elsewhere. Every rank must call it: gathering is a collective."""
    if isinstance(state, dict):
        return {key: gathered(value, keep) for key, value in state.items()}
    if isinstance(state, list):
        return [gathered(value, keep) for value in state]
    if hasattr(state, "full_tensor"):
        full = state.full_tensor()
        return full.cpu() if keep else None
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict of a full (unsharded) state. For a sharded model, each tensor the size of
    its parameter (AdamW's moments, Muon's momentum) is first cut to this rank's shard."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(hasattr(p, "full_tensor") for p in params):
        state = dict(state, state={
            index: {key: distribute_tensor(value.to(params[index].device), params[index].device_mesh, params[index].placements)
                    if torch.is_tensor(value) and value.shape == params[index].shape else value
                    for key, value in param_state.items()}
            for index, param_state in state["state"].items()})
    optimizer.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# 4. A run folder


class RunLock:
    """One run at a time in a run folder: an exclusive lock on log_dir/.lock, held while the run lives.
    The OS lets go of it when the process ends, however it ends (kill -9 included), so a crashed run
    never leaves its folder locked. (flock: Linux and macOS.)"""

    def __init__(self, log_dir: Path):
        try:
            self.file = open(log_dir / ".lock", "a+")
        except OSError as e:
            raise UserError(f"--log_dir {log_dir}: cannot create its lock file .lock ({write_failure(e, log_dir)}): "
                            "free space (or fix the folder), or choose another --log_dir") from e
        if fcntl is None:
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"{log_dir}/ is in use by another run ({owner}): wait for it to end, stop it, or "
                            "choose another --log_dir") from None
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            self.file.flush()
        except OSError as e:
            self.file.close()
            raise UserError(f"--log_dir {log_dir}: cannot write its lock file .lock ({write_failure(e, log_dir)}): "
                            "free space (or fix the folder), or choose another --log_dir") from e

    def release(self):
        self.file.close()


def open_run_dir(log_dir, resume: bool, overwrite: bool, master: bool, say,
                 ddp: bool = False) -> tuple[RunLock | None, Path | None, dict | None]:
    """Create and lock log_dir (rank 0); return (lock, the checkpoint to resume from, its contents).

    Never mixes two runs: a folder that holds a run needs --resume or --overwrite. Deletes nothing:
    --overwrite's deleting happens only once every setting has been checked (clear_earlier_run).
    Rank 0 decides, and under torchrun every process gets its verdict: the checkpoint to load, or rank
    0's error (a folder in use), which stops them all."""
    log_dir, claimed = Path(log_dir), {}

    def claim() -> Path | None:
        claimed["lock"], path, claimed["checkpoint"] = claim_run_dir(log_dir, resume, overwrite, say)
        return path

    path = rank0_decides(ddp, master, claim)
    if master:
        return claimed["lock"], path, claimed["checkpoint"]
    return None, path, load_checkpoint(path) if path else None


def claim_run_dir(log_dir: Path, resume: bool, overwrite: bool, say) -> tuple[RunLock, Path | None, dict | None]:
    """open_run_dir's checks, on rank 0: the folder made, writable and locked; (lock, checkpoint, contents)."""
    check_writable_folder(log_dir, "--log_dir")  # first: a folder that cannot be used is not made
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--log_dir {log_dir} cannot be created: {e.strerror}") from e
    lock = RunLock(log_dir)
    try:
        for stale in log_dir.glob("ckpt_*.pt.tmp"):  # a save cut short by a kill or a full disk
            stale.unlink()
        # The files a run writes again must take it now, not after the data and the model are ready.
        for name in ("train_config.json",) + (() if overwrite else ("log.txt",)):
            if (log_dir / name).is_file():
                try:
                    with open(log_dir / name, "a"):
                        pass
                except OSError as e:
                    raise UserError(f"--log_dir {log_dir}: cannot write its {name} ({e.strerror}): make it writable "
                                    f"(chmod u+w {shlex.quote(str(log_dir / name))}), then run the same command again") from e
        if resume:
            path, checkpoint = newest_readable_checkpoint(log_dir, set_aside=True)
            if path is None and (log_dir / "log.txt").exists():
                raise UserError(f"{log_dir}/ holds a run's log but no checkpoint to resume from: add --overwrite (instead "
                                "of --resume) to start over there, or choose another --log_dir")
            if path is None:
                say(f"--resume: no checkpoint in {log_dir}/, starting a new run")
            return lock, path, checkpoint
        earlier = [p for p in (find_latest_checkpoint(log_dir), log_dir / "log.txt") if p is not None and p.exists()]
        if earlier and not overwrite:
            raise UserError(
                f"{log_dir}/ already holds a run ({earlier[0].name}): add --resume to continue it, --overwrite to "
                "start over, or choose another --log_dir"
            )
        return lock, None, None
    except BaseException:
        lock.release()
        raise


def check_room(log_dir: Path, checkpoint_size: int | None, keep: int, say) -> None:
    """Refuse a run whose next checkpoint cannot fit in log_dir now, rather than after its steps; say so if
    --keep_checkpoints will not fit (that run stops, losing nothing, at the save that finds the disk full)."""
    free = free_bytes(log_dir)
    if not checkpoint_size or free is None:
        return
    if free < checkpoint_size:
        raise UserError(f"--log_dir {log_dir}: {format_bytes(free)} free, and a checkpoint of this run takes "
                        f"~{format_bytes(checkpoint_size)}: free space (or choose another --log_dir) first")
    more = keep + 1 - len(list(log_dir.glob(CHECKPOINT_GLOB)))  # at a save, the new one and the `keep` before it
    if free < more * checkpoint_size:
        say(f"note: {log_dir}/ has room for {free // checkpoint_size} more checkpoint(s) of "
            f"~{format_bytes(checkpoint_size)}, and --keep_checkpoints {keep} needs {more}: unless space is freed, "
            "the run stops at the save that finds the disk full, losing nothing (--resume goes on)")


def clear_earlier_run(log_dir: Path) -> None:
    """--overwrite, once everything else is known to be fine: the earlier run's log and checkpoints go."""
    for path in list(log_dir.glob(CHECKPOINT_GLOB)) + list(log_dir.glob("ckpt_*.pt.*")) + [log_dir / "log.txt"]:
        path.unlink(missing_ok=True)
    shutil.rmtree(log_dir / "tensorboard", ignore_errors=True)


def compare_with_saved_run(config, saved: dict, fixed: tuple, say, ignored: tuple = ()) -> None:
    """Refuse a change --resume cannot honour (a setting named in `fixed`); print the ones it applies.
    `ignored`: settings that do not count (they have no effect in this run)."""
    ignored = ("resume", "overwrite", "stop_after_step", "seed", *ignored)  # seed: the model comes from the checkpoint
    changed = {k: (saved[k], v) for k, v in asdict(config).items() if k in saved and saved[k] != v and k not in ignored}
    for name in fixed:
        if name in changed:
            before, now = changed[name]
            raise UserError(f"--{name} was {before!r} in the saved run and cannot change on --resume (now {now!r}): "
                            "drop the flag, or start a new run in another --log_dir")
    if changed:
        say("resume: applying settings changed since the saved run: " +
            ", ".join(f"--{k} {before!r} -> {now!r}" for k, (before, now) in changed.items()))


class StopRequest:
    """SIGTERM (cloud preemption, SLURM, `kill`) or SIGINT (Ctrl-C): finish the current step, write a
    checkpoint and exit 0. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == signal.SIGTERM and peer_error() is not None:  # torchrun ends the rest of a run that failed
            raise_quietly()
        if self.requested and signum == signal.SIGINT:
            raise UserError("stopped at once by a second Ctrl-C, without a checkpoint of this step: the same command "
                            "with --resume continues from the newest checkpoint")
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: stopping after this step, with a checkpoint", flush=True)

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class TensorBoard:
    """--tensorboard: the streams of log.txt, the settings and the samples, as TensorBoard events in
    log_dir/tensorboard (`tensorboard --logdir log/`). log.txt stays the record the notebooks read."""

    def __init__(self, log_dir: Path, start_step: int, config):
        from torch.utils.tensorboard import SummaryWriter  # imported here: only --tensorboard needs it

        # purge_step: what an interrupted attempt logged after the checkpoint we resume from is dropped,
        # and the resumed run's own values take its place, as in log.txt.
        self.writer = SummaryWriter(log_dir / "tensorboard", purge_step=start_step or None)
        self.writer.add_text("settings", "\n".join(f"    {k} = {v!r}" for k, v in asdict(config).items()), start_step)

    def log(self, step: int, stream: str, value: str):
        if value != "nonfinite":
            self.writer.add_scalar(stream, float(value), step)

    def text(self, step: int, name: str, text: str):
        self.writer.add_text(name, text, step)

    def close(self):
        self.writer.close()


class Run:
    """A training run's folder and its bookkeeping, behind one-line calls, so that the training loop
    reads as training. Rank 0 owns the folder: it locks it (one run at a time), writes log.txt (and
    TensorBoard) and the checkpoints; every rank times the work for the ETA and takes part in a stop.

    config: the run's settings, a dataclass with log_dir, resume, overwrite, print_settings, tensorboard,
    keep_checkpoints, max_bad_steps, stop_after_step, max_steps and the eval/sample/checkpoint intervals.
    fixed_on_resume: the settings --resume cannot change (the model, the batch, the data order, ...);
    ignored_on_resume: those that have no effect in this run, so that a change to them means nothing.
    """

    def __init__(self, config, master: bool, ddp: bool, device: str, fixed_on_resume: tuple, ignored_on_resume: tuple = ()):
        self.config, self.master, self.ddp, self.device = config, master, ddp, device
        self.log_dir = Path(config.log_dir)
        self.say = print if master else (lambda *args, **kwargs: None)  # only rank 0 prints
        if config.print_settings:
            self.say("settings:\n" + "\n".join(f"  {k} = {v!r}" for k, v in asdict(config).items()))
        self.started = time.time()
        self.log_file = self.board = self.stop = self.lock = None
        try:
            self.lock, self.resume_from, self.checkpoint = open_run_dir(self.log_dir, config.resume, config.overwrite,
                                                                        master, self.say, ddp)
            if self.checkpoint is not None:
                self.say(f"resuming from {self.resume_from} (step {self.checkpoint['step']})")
                compare_with_saved_run(config, self.checkpoint["config"], fixed_on_resume, self.say, ignored_on_resume)
                rank0_decides(ddp, master, lambda: check_room(self.log_dir, self.resume_from.stat().st_size,
                                                              config.keep_checkpoints, self.say))
        except BaseException as e:
            self.close()
            stop_together(e, master)
            raise
        self.on_out_of_memory = None  # the trainer's advice for a run that runs out of memory: a function -> str
        self.seconds = dict(step=0.0, eval=0.0, sample=0.0, checkpoint=0.0)  # what each took last time, for the ETA
        self.step_times = []
        self.bad_steps = 0  # non-finite steps in a row

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        problem = self.close()
        if is_out_of_memory(error) and self.on_out_of_memory is not None:
            advice = UserError(self.on_out_of_memory())  # one line that says what to change, not a traceback
            stop_together(advice, self.master)
            raise advice from error
        stop_together(error, self.master)  # under torchrun: one process's line, the others quiet
        if error is None and problem:
            raise UserError(problem)

    def already_finished(self) -> bool:
        """Whether the run --resume continues has done its max_steps already (it says so: nothing to do)."""
        if self.checkpoint is None or self.checkpoint["step"] < self.config.max_steps:
            return False
        self.say(f"that run already finished its {self.config.max_steps} steps: nothing to do "
                 "(a larger --max_steps trains on)")
        return True

    def start(self, start_step: int, checkpoint_bytes: int | None = None) -> None:
        """Every setting, the data, the model and the checkpoint are known to be good: only now may an
        earlier run's files go (--overwrite), and the log (appended on --resume) and the stop request start.
        checkpoint_bytes: what a checkpoint of this run will take, if known: a disk without room for one
        stops the run now, not at its first save."""
        def begin():
            if self.config.overwrite and self.resume_from is None:
                clear_earlier_run(self.log_dir)
            if self.resume_from is None:  # (a resumed run's was checked as it opened)
                check_room(self.log_dir, checkpoint_bytes, self.config.keep_checkpoints, self.say)
            log = self.log_dir / "log.txt"
            try:
                replace_atomically(self.log_dir / "train_config.json", json.dumps(asdict(self.config), indent=2))
                self.log_file = open(log, "a")
                self.board = TensorBoard(self.log_dir, start_step, self.config) if self.config.tensorboard else None
            except OSError as e:
                for file in (self.log_file, self.board):
                    with contextlib.suppress(OSError):
                        file and file.close()
                self.log_file = self.board = None
                if self.resume_from is None and log.is_file() and not log.stat().st_size:
                    log.unlink()  # an empty log would stop the same command next time ("already holds a run")
                raise UserError(f"--log_dir {self.log_dir}: could not start the run's log there ({write_failure(e, self.log_dir)}): "
                                "free space (or fix the folder), then run the same command again") from e

        rank0_decides(self.ddp, self.master, begin)
        self.stop = StopRequest()
        # A checkpoint is "good" once the step after it was finite. The newest one may not be yet: the
        # update before it may have been the one that broke the weights.
        self.unconfirmed = self.resume_from
        earlier = [p for p in sorted(self.log_dir.glob(CHECKPOINT_GLOB))
                   if p != self.resume_from and (not self.resume_from or p < self.resume_from)]
        self.last_good = earlier[-1] if earlier else None

    def log(self, step: int, **values: str) -> None:
        """`step stream value` lines in log.txt, e.g. `250 val 3.8123`: easy to grep, plot, and append to
        on resume; the same values in TensorBoard with --tensorboard."""
        if not self.master:
            return
        with self.writing("log.txt"):
            for stream, value in values.items():
                self.log_file.write(f"{step} {stream} {value}\n")
            self.log_file.flush()
        for stream, value in values.items():
            if self.board:
                with self.writing("tensorboard/"):
                    self.board.log(step, stream, value)

    def text(self, step: int, name: str, text: str) -> None:
        """A text (the samples) for TensorBoard, with --tensorboard."""
        if self.board:
            with self.writing("tensorboard/"):
                self.board.text(step, name, text)

    @contextlib.contextmanager
    def writing(self, what: str):
        """A failed write to the log (a full disk) ends the run with one line: what the folder keeps."""
        try:
            yield
        except OSError as e:
            raise UserError(f"could not write {self.log_dir / what}: {write_failure(e, self.log_dir)}. "
                            f"{resume_advice(self.log_dir)}") from e

    @contextlib.contextmanager
    def timed(self, what: str):
        """Time an evaluation, a sample or a checkpoint: the ETA counts the ones still due at this price."""
        t0 = time.time()
        yield
        self.seconds[what] = time.time() - t0

    def eta(self, step: int, step_seconds: float) -> str:
        """The time left after this step, steps and the evaluations, samples and checkpoints still due."""
        self.step_times = (self.step_times + [step_seconds])[-20:]
        self.seconds["step"] = statistics.median(self.step_times[1:] or self.step_times)  # the first step compiles: left out
        return format_duration(eta_seconds(step, self.config, self.seconds))

    def check_step(self, step: int, loss: float, grad_norm: float, stepped: bool, loss_scale: float | None) -> None:
        """Count non-finite steps (their update was skipped); max_bad_steps in a row end the run.

        fp16's gradient scaler (loss_scale: its scale, None without one) overflows now and then by
        design, skips the update and lowers its scale; a non-finite loss, or non-finite gradients without
        a scaler, are a real problem."""
        if not stepped:
            self.log(step, skipped="nonfinite")
        if math.isfinite(loss) and (stepped or loss_scale is not None):
            self.bad_steps = 0
            self.last_good, self.unconfirmed = (self.unconfirmed or self.last_good), None
            if not stepped:
                self.say(f"step {step:5d} | fp16 gradients overflowed: update skipped, loss scale lowered to {loss_scale:g}")
            return
        self.bad_steps += 1
        self.say(f"step {step:5d} | non-finite loss {loss} or grad norm {grad_norm}: update skipped ({self.bad_steps} in a row)")
        if self.bad_steps < self.config.max_bad_steps:
            return
        # The checkpoint saved just before the streak (unconfirmed) led straight into it: it is renamed
        # aside, so that --resume starts from the last good one.
        note = ""
        if self.unconfirmed is not None:
            aside = self.unconfirmed.with_name(self.unconfirmed.name + ".nonfinite")
            if self.master:
                os.replace(self.unconfirmed, aside)
            note = f" ({self.unconfirmed.name}, saved just before, led straight into them: renamed {aside.name})"
        advice = ("Try a lower --max_lr (or --dtype bfloat16/float32) with --resume, which starts from it" if self.last_good
                  else "Start over with --overwrite and a lower --max_lr (or --dtype bfloat16/float32)")
        raise UserError(f"{self.bad_steps} non-finite steps in a row at step {step}: stopping. Last good checkpoint: "
                        f"{self.last_good or 'none'}{note}. {advice}")

    def stop_requested(self, step: int) -> bool:
        """SIGTERM, Ctrl-C or --stop_after_step: stop after this step, on every rank at once (the others
        would wait forever for a rank that stopped)."""
        requested = torch.tensor(float(self.stop.requested), device=self.device)
        if self.ddp:
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)
        return bool(requested.item()) or step + 1 == self.config.stop_after_step

    def weights_are_good(self, step: int, parameters) -> bool:
        """Whether the weights after this step may be saved: never from a non-finite step or weights
        (nor may such a checkpoint rotate good ones out)."""
        # (A sharded weight is checked shard by shard, then the verdicts of all ranks are combined.)
        finite = torch.stack([(p.to_local() if hasattr(p, "to_local") else p).isfinite().all() for p in parameters]).all()
        if self.ddp:
            finite = finite.to(self.device, torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if self.bad_steps or not finite.item():
            self.say(f"no checkpoint after step {step}: its loss or weights are not finite (last good: {self.last_good or 'none'})")
            return False
        return True

    def save_checkpoint(self, step: int, checkpoint: dict) -> None:
        """Rank 0 writes log_dir/ckpt_{step}.pt, then keeps the newest keep_checkpoints, never the last
        good one: it stays until this one has proved good too."""
        path = checkpoint_path(self.log_dir, step)

        def save():  # every process learns whether it worked: a full disk stops them all, with rank 0's line
            save_checkpoint_file(checkpoint, path, progress=True)
            rotate_checkpoints(self.log_dir, self.config.keep_checkpoints, protect=self.last_good)

        rank0_decides(self.ddp, self.master, save)
        self.unconfirmed = path
        self.say(f"saved {path}")

    def close(self) -> str | None:
        """Let go of the folder; returns what could not be written as the files closed (a full disk), if anything."""
        problem = None
        if self.stop is not None:
            self.stop.restore()
        for what, file in (("log.txt", self.log_file), ("tensorboard/", self.board)):
            try:
                if file is not None:
                    file.close()
            except OSError as e:
                problem = problem or (f"could not write {self.log_dir / what}: {write_failure(e, self.log_dir)}. "
                                      f"{resume_advice(self.log_dir)}")
        if self.lock is not None:
            self.lock.release()
        return problem


def is_out_of_memory(error) -> bool:
    """A GPU's out-of-memory error, or the CPU allocator's (a RuntimeError of its own words)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error))


def available_memory(device: str) -> int | None:
    """Bytes this process may use: a GPU's memory, or for a CPU the machine's, lowered by the limits of
    its container (cgroup) and of the process (ulimit); None if unknown."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        limits.append(int(Path("/sys/fs/cgroup/memory.max").read_text()))
    except (OSError, ValueError):  # no cgroup v2 limit ("max"), or not Linux
        pass
    try:
        import resource

        limits += [soft for soft, _ in map(resource.getrlimit, (resource.RLIMIT_AS, resource.RLIMIT_DATA))
                   if soft != resource.RLIM_INFINITY]
    except (ImportError, AttributeError, ValueError):
        pass
    return min(limits) if limits else None


def read_log(path) -> dict[str, dict[int, float]]:
    """{stream: {step: value}} from a run's log.txt (`step stream value` lines).

    A resumed run appends and redoes the steps after its checkpoint, so the later line for a step wins.
    A half-written last line (a run still writing) and lines that do not parse are left out; a skipped
    update (`skipped nonfinite`) reads as nan.
    """
    lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")
    lines.pop()  # "" when the file ends with a newline, else the line still being written
    streams = {}
    for line in lines:
        try:
            step, stream, value = line.split()
            streams.setdefault(stream, {})[int(step)] = math.nan if value == "nonfinite" else float(value)
        except ValueError:  # not three fields, or not numbers
            continue
    return streams


# ---------------------------------------------------------------------------------------------------
# 5. Time, speed and memory


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def human(n: float) -> str:
    """24576 -> "24.6K", 10_000_000_000 -> "10.0B": token counts at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:g}"


def events_left(step: int, max_steps: int, interval: int, offset: int = 0, first: int = 0) -> int:
    """How many of the steps after `step` do something every `interval` steps (at steps s with
    (s + offset) % interval == 0, s >= first) or at the last step."""
    if not interval or step >= max_steps - 1:
        return 0
    lo, hi = max(step + 1, first) + offset, max_steps - 1 + offset  # multiples of interval in [lo, hi]
    return max(0, hi // interval - (lo - 1) // interval) + ((max_steps - 1 + offset) % interval != 0)


def eta_seconds(step: int, config, seconds: dict) -> float:
    """The time left after `step`: the steps, and the evaluations, samples and checkpoints still due,
    each at the time it took last (seconds: {"step", "eval", "sample", "checkpoint"}). config has
    max_steps, eval_interval, sample_interval and checkpoint_interval."""
    n = config.max_steps
    return ((n - step - 1) * seconds["step"]
            + events_left(step, n, config.eval_interval) * seconds["eval"]
            + events_left(step, n, config.sample_interval, first=1) * seconds["sample"]
            + events_left(step, n, config.checkpoint_interval, offset=1) * seconds["checkpoint"])


@dataclass
class MemoryEstimate:
    """What a process holds while it trains, in bytes (settings.estimate_memory fills it in)."""
    weights: float
    gradients: float
    optimizer: float
    activations: float  # per micro-batch: what the backward pass needs, and the logits at their peak
    available: float | None  # the memory of the device (a GPU's, or the machine's for a CPU); None if unknown

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        gib = lambda n: f"{n / 2**30:.1f}"  # noqa: E731
        return (f"~{gib(self.total)} GiB per process: weights {gib(self.weights)}, gradients {gib(self.gradients)}, "
                f"optimizer {gib(self.optimizer)}, activations {gib(self.activations)} per micro-batch"
                + (f" (of {gib(self.available)} GiB)" if self.available else ""))


# Dense bf16/fp16 tensor-core peak FLOP/s from the datasheets. A GPU matches when every word of the key is
# a word of its name, most specific first: "NVIDIA L40" is not an "L4", "NVIDIA H100 PCIe" not an SXM H100.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def gpu_peak_flops(name: str) -> float | None:
    """The peak of a GPU by its name (torch.cuda.get_device_name), or None if it is not in PEAK_FLOPS."""
    words = set(re.split(r"[\s_-]+", name.upper()))
    return next((flops for key, flops in PEAK_FLOPS if set(key.upper().split()) <= words), None)


def peak_flops_for(device: str, dtype: torch.dtype) -> float | None:
    """The accelerator's peak for MFU, or None where we don't know it (CPU, fp32, unknown GPUs):
    better no MFU than a wrong one."""
    if not device.startswith("cuda") or dtype == torch.float32:
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))
