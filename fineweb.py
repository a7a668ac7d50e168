"""
Turn a text corpus into GPT-2 token shards for train_gpt2.py: one command, resumable, any OS.

    python fineweb.py                                    # FineWeb-Edu sample-10BT -> edu_fineweb10B/
    python fineweb.py --source edu100B --streaming       # sample-100BT, no full parquet copy on disk
    python fineweb.py --input 'my_corpus/*.jsonl' --out_dir my_tokens
    python fineweb.py --source shakespeare               # the vendored Tiny Shakespeare, no network

What it writes, in out_dir:
    {prefix}_val_000000.npy, {prefix}_train_000001.npy, {prefix}_train_000002.npy, ...
        1-D np.uint16 arrays saved with np.save (np.load(path, mmap_mode="r") reads them lazily).
        Every document is <|endoftext|> (50256) followed by its tokens; documents run on across shard
        boundaries. Shard 0 is the validation split, every later shard is training data.
    meta.json
        the settings, one entry per finished shard, the totals, and "complete": true at the end.

The story, in the order it is told below:
  1. where the text comes from: Hugging Face presets, local files
  2. tokenizing in parallel, in order, with bounded memory
  3. shards on disk: atomic writes, and meta.json as the record of progress
  4. the writer: documents in, shards out, resumable after a kill
  5. Tiny Shakespeare, the quick-start corpus
  6. the command line
"""

import argparse
import collections
import glob
import itertools
import json
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from plumbing import ArgumentParser, UserError, check_writable_folder, run_main, shell_command, utf8_lines, write_failure
from train_gpt2 import DATA_DIR, EOT_TOKEN, get_tokenizer

SHARD_SIZE = 100_000_000  # tokens per shard: 200 MB of uint16, 100 shards for FineWeb-Edu 10B
BATCH_CHARS = 1 << 18  # text per task sent to a worker: big enough to hide the IPC, small enough to balance


# ---------------------------------------------------------------------------------------------------
# 1. Where the text comes from
#
# Every source is a function skip -> iterator over document texts, in a fixed order, after the first
# `skip` documents. The fixed order is what makes a rerun able to continue where a killed run stopped.


@dataclass(frozen=True)
class HubSource:
    """A FineWeb sample on the Hugging Face hub, and where its shards go by default."""

    dataset: str
    name: str
    out_dir: str
    prefix: str  # shard files are {prefix}_{split}_{index:06d}.npy


HUB_SOURCES = {
    "edu10B": HubSource("HuggingFaceFW/fineweb-edu", "sample-10BT", "edu_fineweb10B", "edufineweb"),
    "edu100B": HubSource("HuggingFaceFW/fineweb-edu", "sample-100BT", "edu_fineweb100B", "edufineweb"),
    "fineweb10B": HubSource("HuggingFaceFW/fineweb", "sample-10BT", "fineweb10B", "fineweb"),
}


def read_hub_texts(source: HubSource, text_field="text", streaming=False, num_proc=None, skip=0):
    """The documents of a hub dataset, after the first `skip`.

    Without streaming, `datasets` downloads the parquet files once into its cache (in parallel), and a
    rerun reads them from there. With streaming, it reads them over HTTP as we go: tokenizing starts at
    once and nothing but the shards lands on disk.
    """
    import datasets  # here, not at the top: the GPU machines that train have no `datasets`

    try:
        dataset = datasets.load_dataset(
            source.dataset, name=source.name, split="train", streaming=streaming,
            num_proc=None if streaming else num_proc,
        )
    except OSError as e:  # no network, a typo in a name, the hub down: one line, not a traceback
        raise UserError(f"could not load {source.dataset} ({source.name}): {str(e).splitlines()[0]}") from e
    fields = dataset.column_names
    if fields is not None and text_field not in fields:
        raise UserError(f"{source.dataset} has no field {text_field!r} (fields: {', '.join(fields)})")
    # A rerun skips what is done: the downloaded copy by index, at once; a stream by reading past the
    # skipped rows as Arrow tables (downloaded again, but neither converted to Python nor tokenized).
    for batch in dataset.select_columns([text_field]).skip(skip).iter(batch_size=1000):
        yield from batch[text_field]


LOCAL_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


def find_input_files(inputs) -> list[Path]:
    """Paths and glob patterns -> the files they name, in the order given (a glob's matches sorted)."""
    files = []
    for pattern in map(str, inputs):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise UserError(f"no files match {pattern}")
        elif not Path(pattern).exists():
            raise UserError(f"input not found: {pattern}")
        else:
            matches = [pattern]
        for match in map(Path, matches):
            if match.is_dir():
                raise UserError(f"{match} is a folder; name its files, e.g. '{match}/*.jsonl'")
            if not match.name.endswith(LOCAL_SUFFIXES):
                raise UserError(f"{match}: unsupported file type (expected one of {', '.join(LOCAL_SUFFIXES)})")
            if match not in files:
                files.append(match)
    return files


def read_docs(inputs, text_field="text"):
    """The documents in local files, in order: a .txt file is one document, a .jsonl line (also of a
    gzip-compressed .jsonl.gz) or a .parquet row is one document (its `text_field`). Missing paths are
    reported at once."""
    files = find_input_files(inputs)
    return itertools.chain.from_iterable(_read_file(path, text_field) for path in files)


def _read_file(path: Path, text_field: str):
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        if text:  # an empty file is no document, not an empty one
            yield text
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
        for line_number, line in jsonl_lines(path):  # a bad byte is reported with its line
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_number}: not a JSON line ({e.msg})") from e
            if text := _text_of(record, text_field, where=f"{path}:{line_number}"):  # an empty text is no document
                yield text
    else:
        import pyarrow.parquet  # comes with `datasets`; only needed for parquet inputs

        try:
            parquet = pyarrow.parquet.ParquetFile(path)
        except Exception as e:  # pyarrow's ArrowInvalid and friends: not a parquet file, or a damaged one
            raise UserError(f"{path} is not a readable parquet file ({e})") from e
        if text_field not in parquet.schema_arrow.names:
            fields = ", ".join(parquet.schema_arrow.names)
            raise UserError(f"{path}: no field {text_field!r} in the records (fields: {fields}); pick one with --text_field")
        for batch in parquet.iter_batches(batch_size=1000, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    raise UserError(f"{path}: field {text_field!r} of a row is {type(text).__name__}, not text")
                if text:
                    yield text


def jsonl_lines(path: Path):
    """(line number, line) of a .jsonl file, or of a .jsonl.gz file decompressed as it is read."""
    if not path.name.endswith(".gz"):
        yield from utf8_lines(path)
        return
    import gzip

    try:
        with gzip.open(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                try:
                    yield line_number, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{line_number}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (OSError, EOFError) as e:  # not gzip (gzip.BadGzipFile is an OSError), or cut short (EOFError)
        raise UserError(f"{path} is not a readable gzip file ({e})") from e


def _text_of(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise UserError(f"{where}: no field {text_field!r} in the record (fields: {fields}); pick one with --text_field")
    text = record[text_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
    return text


# ---------------------------------------------------------------------------------------------------
# 2. Tokenizing in parallel
#
# The main process reads documents and packs them into batches of ~BATCH_CHARS characters; workers
# turn a batch into one uint16 array (2 bytes a token through the pipe, not a pickled list of ints)
# plus each document's length. Results come back in input order, and at most a few batches per worker
# are in flight, so memory stays flat however big the dataset is.


def init_worker():
    """Runs once in each worker: Ctrl-C and SIGTERM are the main process's to handle (it stops the
    workers itself, quietly), and the tokenizer is built here (get_tokenizer is cached), not on the
    first batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    get_tokenizer()


def encode_document(text: str) -> np.ndarray:
    """A document's GPT-2 tokens as uint32, the same as encode_ordinary ("<|endoftext|>" in the text
    is plain text), without building a Python list of ints."""
    tokenizer = get_tokenizer()
    try:
        return tokenizer.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates (broken UTF-16 in the source): replace them, as encode_ordinary does
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return tokenizer.encode_to_numpy(text, disallowed_special=())


def tokenize_batch(texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """Texts -> (all their tokens, each preceded by <|endoftext|>, as one uint16 array; the length of each)."""
    encoded = [encode_document(text) for text in texts]
    doc_lengths = [len(tokens) + 1 for tokens in encoded]  # +1: the <|endoftext|> that opens each document
    out = np.empty(sum(doc_lengths), dtype=np.uint16)  # GPT-2's 50,257 ids fit in 16 bits
    start = 0
    for tokens, length in zip(encoded, doc_lengths):
        out[start] = EOT_TOKEN
        out[start + 1 : start + length] = tokens
        start += length
    return out, doc_lengths


def batched_texts(texts, max_chars=BATCH_CHARS):
    """Group texts into lists of about max_chars characters (a longer text is a batch of its own)."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_in_order(batches, num_proc=1, start_method=None):
    """Yield tokenize_batch(batch) for each batch, in order, using num_proc worker processes.

    Pool.imap keeps the workers fed however far the writer falls behind, and its results pile up in
    memory; here at most 4 * num_proc batches are in flight. Everything sent to a worker is a top-level function and plain
    data, so any start method works ("spawn" on macOS and Windows).
    """
    if num_proc == 1:  # no pool: simpler to debug, and nothing to gain from one worker
        yield from map(tokenize_batch, batches)
        return
    context = multiprocessing.get_context(start_method)
    with context.Pool(num_proc, initializer=init_worker) as pool:
        in_flight = collections.deque()
        for batch in batches:
            in_flight.append(pool.apply_async(tokenize_batch, (batch,)))
            if len(in_flight) >= 4 * num_proc:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


# ---------------------------------------------------------------------------------------------------
# 3. Shards on disk
#
# A file under a shard's final name is always complete: we write to a temporary name in the same
# folder, then os.replace it (atomic on POSIX and Windows). The temporary names contain neither "val"
# nor "train" and do not end in .npy, so no loader ever picks one up. meta.json is written the same
# way after every shard: it is the record a rerun resumes from.

TEMP_GLOB = ".incomplete_*"


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}_{split}_{index:06d}.npy"


def replace_atomically(path: Path, write, size: int | None = None) -> None:
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it to `path`. A
    failed write (a full disk: size is what the file takes) ends the run with one line; the finished
    shards stay, and the same command continues after them."""
    temp = path.with_name(f".incomplete_{os.getpid()}_{time.monotonic_ns()}")  # unique: no two writers collide
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name says it is finished
        os.replace(temp, path)
    except OSError as e:
        temp.unlink(missing_ok=True)  # first: the free space counted below is without it
        raise UserError(f"could not write {path}: {write_failure(e, path.parent, size)}. The shards finished before it "
                        "are kept: free space (or fix the folder), then run the same command again to continue after "
                        "them") from e
    finally:
        temp.unlink(missing_ok=True)


def save_shard(path: Path, tokens: np.ndarray) -> None:
    replace_atomically(path, lambda f: np.save(f, tokens), size=tokens.nbytes + 128)  # + the .npy header


def save_meta(out_dir: Path, meta: dict) -> None:
    replace_atomically(out_dir / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))


def shard_is_intact(path: Path, tokens: int) -> bool:
    try:
        array = np.load(path, mmap_mode="r")  # reads the header only
    except (OSError, ValueError):
        return False
    return array.dtype == np.uint16 and array.shape == (tokens,)


def update_totals(meta: dict) -> None:
    meta["total_tokens"] = sum(s["tokens"] for s in meta["shards"])
    meta["total_documents"] = sum(s["documents"] for s in meta["shards"])


def load_progress(out_dir: Path, settings: dict) -> dict:
    """The meta.json of an earlier run with the same settings, trimmed to its intact shards, or a new one.

    Whatever an interrupted run left beyond its last recorded shard (a temporary file, a shard saved
    just before the kill but not yet recorded) is deleted: the rerun writes it again.
    """
    meta_path = out_dir / "meta.json"
    if not meta_path.exists():
        if any(out_dir.glob("*.npy")):
            raise UserError(f"{out_dir} has .npy files but no meta.json (from another tool?); delete them or pick another --out_dir")
        return {**settings, "shards": [], "total_tokens": 0, "total_documents": 0, "complete": False}
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path} is not valid JSON ({e.msg}); delete {out_dir} to start over") from e
    for key, value in settings.items():
        if meta.get(key) != value:
            raise UserError(
                f"{out_dir} holds shards made with another {key} ({meta.get(key)} != {value}); "
                "delete it or pick another --out_dir"
            )
    intact = list(itertools.takewhile(lambda s: shard_is_intact(out_dir / s["file"], s["tokens"]), meta["shards"]))
    if len(intact) < len(meta["shards"]):
        print(f"{out_dir}: {meta['shards'][len(intact)]['file']} is missing or damaged; redoing from there")
        meta["shards"], meta["complete"] = intact, False
        update_totals(meta)
    if not meta["complete"]:
        recorded = {s["file"] for s in intact}
        leftovers = [p for p in out_dir.glob(f"{settings['prefix']}_*.npy") if p.name not in recorded]
        for path in leftovers + list(out_dir.glob(TEMP_GLOB)):
            path.unlink()
    return meta


# ---------------------------------------------------------------------------------------------------
# 4. The writer
#
# Documents are tokenized in order and poured into a shard-sized buffer; a document that does not fit
# runs on into the next shard. When a shard is saved, meta.json records where it ended: the document
# it ended in and how many of that document's tokens (counting its <|endoftext|>) were written. A
# rerun reads the record, skips that many documents, drops that many tokens of the next one and goes
# on: its shards are byte for byte those of a run that was never interrupted.


class ShardWriter:
    """Fills one shard at a time: shard 0 (val) holds val_tokens, every later one (train) shard_size."""

    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir, self.meta = out_dir, meta
        self.buffer = np.empty(max(meta["shard_size"], meta["val_tokens"]), dtype=np.uint16)
        self.filled = 0  # tokens in the buffer
        self.documents = 0  # documents whose <|endoftext|> is in the buffer

    @property
    def capacity(self) -> int:
        return self.meta["val_tokens"] if not self.meta["shards"] else self.meta["shard_size"]

    def add(self, tokens: np.ndarray, document: int, offset: int) -> None:
        """Write `tokens`, which are document number `document` from its token `offset` on."""
        if offset == 0:
            self.documents += 1
        while len(tokens):
            take = min(self.capacity - self.filled, len(tokens))
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled, offset, tokens = self.filled + take, offset + take, tokens[take:]
            if self.filled == self.capacity:
                # Where the data after this shard starts: inside this document, or at the next one.
                self.save(resume_at=(document, offset) if len(tokens) else (document + 1, 0))

    def save(self, resume_at: tuple[int, int]) -> None:
        shards = self.meta["shards"]
        index = len(shards)
        split = "val" if index == 0 else "train"
        name = shard_name(self.meta["prefix"], split, index)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_shard(self.out_dir / name, self.buffer[: self.filled])
        document, token = resume_at
        shards.append({"file": name, "split": split, "tokens": self.filled, "documents": self.documents,
                       "resume_at": {"document": document, "token": token}})
        update_totals(self.meta)
        save_meta(self.out_dir, self.meta)
        self.filled = self.documents = 0


def write_shards(
    texts,
    out_dir,
    *,
    source: dict,
    prefix: str,
    shard_size: int = SHARD_SIZE,
    val_tokens: int | None = None,
    max_docs: int | None = None,
    num_proc: int = 1,
    start_method: str | None = None,
) -> dict:
    """Tokenize documents into shards in out_dir (resuming an interrupted run there); return meta.json.

    texts: an iterable of document texts, or a function skip -> the texts after the first `skip`
        (lets a rerun skip cheaply, e.g. without downloading them again).
    source: a description of the input, recorded in meta.json; a rerun resumes only if it matches.
    val_tokens: the size of shard 0, the validation split (default: one full shard).
    """
    out_dir = Path(out_dir)
    val_tokens = shard_size if val_tokens is None else val_tokens
    if shard_size < 1 or val_tokens < 1:
        raise UserError(f"shard sizes must be at least 1 token (got {shard_size=}, {val_tokens=})")
    settings = {"source": source, "prefix": prefix, "tokenizer": "gpt2", "eot": EOT_TOKEN, "dtype": "uint16",
                "shard_size": shard_size, "val_tokens": val_tokens, "max_docs": max_docs}
    meta = load_progress(out_dir, settings)
    if meta["complete"]:
        print(f"{out_dir}: already complete ({len(meta['shards'])} shards, {meta['total_tokens']:,} tokens), nothing to do")
        return meta

    # Where to start: after the last finished shard, possibly in the middle of a document.
    last = meta["shards"][-1]["resume_at"] if meta["shards"] else {"document": 0, "token": 0}
    document, offset = last["document"], last["token"]
    if meta["shards"]:
        print(f"{out_dir}: resuming after {len(meta['shards'])} finished shards, at document {document:,}")
    remaining = texts(document) if callable(texts) else itertools.islice(texts, document, None)
    if max_docs is not None:
        remaining = itertools.islice(remaining, max(max_docs - document, 0))

    writer = ShardWriter(out_dir, meta)
    started = time.time()
    new_tokens = 0
    with tqdm(unit="tok", unit_scale=True, initial=meta["total_tokens"], desc=out_dir.name) as progress:
        for tokens, doc_lengths in tokenize_in_order(batched_texts(remaining), num_proc, start_method):
            progress.update(len(tokens) - offset)
            new_tokens += len(tokens) - offset
            start = 0
            for length in doc_lengths:
                writer.add(tokens[start + offset : start + length], document, offset)
                start, document, offset = start + length, document + 1, 0
    if writer.filled:
        writer.save(resume_at=(document, 0))
    if not meta["shards"]:
        raise UserError("no documents to tokenize: the input is empty")
    meta["complete"] = True
    save_meta(out_dir, meta)

    seconds = time.time() - started
    print(f"{out_dir}: {len(meta['shards'])} shards, {meta['total_tokens']:,} tokens, {meta['total_documents']:,} "
          f"documents ({new_tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    if len(meta["shards"]) == 1:
        print("note: all tokens went to the val shard; a smaller --shard_size or --val_tokens leaves some for training")
    return meta


# ---------------------------------------------------------------------------------------------------
# 5. Tiny Shakespeare
#
# One 1.1 MB text (~338K tokens) is too small for 100M-token shards, so it gets its own split: the last
# 10% of the text, starting at a speaker's turn, is val (shard 0), the first 90% is train (shard 1).
# A contiguous block rather than random lines, so that val measures unseen scenes, not the
# neighbours of lines the model trained on. Each part is one document, opened by <|endoftext|>.

SHAKESPEARE_VAL_FRACTION = 0.1


def split_shakespeare(text: str) -> tuple[str, str]:
    """(train, val): val starts at the first blank line (a new speaker) after 90% of the text."""
    cut = text.find("\n\n", int(len(text) * (1 - SHAKESPEARE_VAL_FRACTION)))
    cut = cut + 2 if cut != -1 else int(len(text) * (1 - SHAKESPEARE_VAL_FRACTION))
    return text[:cut], text[cut:]


def prepare_shakespeare(out_dir="tinyshakespeare_tokens") -> Path:
    """Tokenize the vendored Tiny Shakespeare into out_dir (a no-op if it is already there); return it.

    One process should call it at a time (under DDP: rank 0, then a barrier).
    """
    path = DATA_DIR / "tinyshakespeare.txt"
    train_text, val_text = split_shakespeare(path.read_text(encoding="utf-8"))
    val_tokens = 1 + len(get_tokenizer().encode_ordinary(val_text))  # shard 0 holds exactly the val document
    write_shards(
        [val_text, train_text], out_dir, source={"files": [path.name], "val": "last 10% of the text"},
        prefix="tinyshakespeare", shard_size=SHARD_SIZE, val_tokens=val_tokens,
    )
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------------
# 6. The command line


def default_num_proc() -> int:
    """The CPUs this process may use (a container's share, not the whole machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=[*HUB_SOURCES, "shakespeare"], default=None,
                        help="a FineWeb sample on the hub (default edu10B), or the vendored Tiny Shakespeare")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="local .txt / .jsonl / .jsonl.gz / .parquet files or globs instead of a --source")
    parser.add_argument("--text_field", default="text", help="the field that holds the text (.jsonl, .parquet, hub)")
    parser.add_argument("--out_dir", help="where the shards go (default: per source, local_tokens/ for --input)")
    parser.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="tokens per shard")
    parser.add_argument("--val_tokens", type=int, default=None, help="tokens in the val shard, shard 0 (default: --shard_size)")
    parser.add_argument("--num_proc", type=int, default=default_num_proc(), help="tokenizer processes (default: CPU count)")
    parser.add_argument("--max_docs", "--limit", type=int, default=None, help="stop after this many documents")
    parser.add_argument("--streaming", action="store_true", help="read the hub dataset as a stream, no parquet copy on disk")
    parser.add_argument("--start_method", choices=multiprocessing.get_all_start_methods(), default=None,
                        help="how worker processes start (default: the platform's)")
    return parser.parse_args(argv)


def make_shards(args: argparse.Namespace) -> Path:
    """Run what the command line asks for; return the folder of shards."""
    for name in ("num_proc", "max_docs", "shard_size", "val_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be at least 1")
    if args.input and (args.source or args.streaming):
        raise UserError("--source and --streaming are for hub datasets; --input reads local files")
    default_out_dir = ("tinyshakespeare_tokens" if args.source == "shakespeare" else "local_tokens" if args.input
                       else HUB_SOURCES[args.source or "edu10B"].out_dir)
    check_writable_folder(args.out_dir or default_out_dir, "--out_dir")  # now, not after tokenizing a shard
    if args.source == "shakespeare":
        return prepare_shakespeare(args.out_dir or default_out_dir)
    shard_options = dict(shard_size=args.shard_size, val_tokens=args.val_tokens, max_docs=args.max_docs,
                         num_proc=args.num_proc, start_method=args.start_method)
    if args.input:
        files = find_input_files(args.input)
        if next(read_docs(files, args.text_field), None) is None:  # also checks the field name, on the first record
            raise UserError(f"no documents in {', '.join(args.input)}: the input is empty (or holds only empty texts)")
        out_dir = Path(args.out_dir or "local_tokens")
        write_shards(
            lambda skip: itertools.islice(read_docs(files, args.text_field), skip, None), out_dir,
            # The sizes catch a file that changed since an interrupted run: resuming it would mix two inputs.
            source={"files": [str(f) for f in files], "bytes": [f.stat().st_size for f in files],
                    "text_field": args.text_field},
            prefix="local", **shard_options,
        )
    else:
        hub = HUB_SOURCES[args.source or "edu10B"]
        out_dir = Path(args.out_dir or hub.out_dir)
        write_shards(
            lambda skip: read_hub_texts(hub, args.text_field, args.streaming, args.num_proc, skip), out_dir,
            source={"dataset": hub.dataset, "name": hub.name, "split": "train", "text_field": args.text_field},
            prefix=hub.prefix, **shard_options,
        )
    return out_dir


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # a `kill` (or a preemption) stops the run as Ctrl-C does, workers and all


def main(argv=None) -> None:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        out_dir = make_shards(args)
    except KeyboardInterrupt:
        raise UserError("interrupted; run the same command again to continue after the last finished shard") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    preset = args.source == "shakespeare" and args.out_dir is None
    print(f"train on them: {shell_command('python', 'train_gpt2.py', *(['--preset', 'shakespeare'] if preset else ['--data_dir', out_dir]))}")


if __name__ == "__main__":
    run_main(main)
