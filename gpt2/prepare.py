"""Text -> GPT-2 token shards: `prepare(sources, out_dir)`, behind `gpt2 prepare` and `gpt2 train --data`.

Sources (strings)
  PATH, GLOB or DIR   .txt/.text/.md (a file is one document), .jsonl/.ndjson (a JSON object per line,
                      text in `text_field`), .json (an array of objects or strings, or JSON lines), each
                      optionally compressed: .gz, .xz, .zst, .bz2. A directory means every such file in it.
  hf:NAME[:CONFIG][?split=S&text_field=F&data_files=A,B&revision=R]
                      a HuggingFace dataset, streamed (never loaded whole); split/text_field default to the
                      `split`/`text_field` arguments. `hf:json?data_files=x.jsonl` reads local files through
                      `datasets`.
  fineweb-edu-10B     preset: FineWeb-Edu sample-10BT as build-nanogpt's edu_fineweb10B: shards
                      edufineweb_{val,train}_NNNNNN.bin of 100M tokens, the first shard (index 0) is val.

Every document is preceded by <|endoftext|> (50256), as GPT-2 and build-nanogpt do, and encoded as
ordinary text (a literal "<|endoftext|>" inside a document is not a boundary). Empty documents are
skipped. Undecodable UTF-8 bytes become U+FFFD; the number of replaced sequences is counted and reported.

Validation split, the first rule that applies:
  1. `val_sources` given: their documents are the val split, all other sources are train.
  2. `val_tokens` or `val_fraction` given: the first tokens of the token stream (sources in the order
     given) are val: `val_tokens` of them (over as many shards as needed), or floor(val_fraction x
     total) capped at one shard.
  3. a source whose file name is val/valid/validation (`val.jsonl.xz`, `wiki_valid.txt`,
     `validation-00000.jsonl`), or an hf source with split=validation, is a val source (rule 1).
  4. otherwise as rule 2 with val_fraction=0.1: the first 10% of the tokens, at most one shard
     (`shard_tokens`). A single-document corpus (tiny Shakespeare) is cut inside its one document.
     Until the split point is known (the end of the corpus, or 10 shards' worth of tokens) the
     tokens are held in memory; pass val_tokens to stream with constant memory.
Val shards come first: shard index 0 (and up) is val, train continues the numbering.

Output is a pure function of the sources and settings (not of `workers` or timing): workers encode
batches of documents in parallel and the results are consumed in order. Each shard is written under
a temporary name and renamed when complete; manifest.json (rewritten atomically after every shard)
records each shard's tokens, sha256 and the input position after it. Rerunning after an interruption
checks the finished shards and continues from the last good one, so the result is byte-identical to
an uninterrupted run; rerunning a complete output is a no-op. An output directory with shards of
another corpus, tokenizer or settings is refused unless `overwrite`.
"""

from __future__ import annotations

import bz2
import glob
import hashlib
import json
import lzma
import math
import multiprocessing as mp
import os
import re
import signal
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from gpt2.data import HEADER_BYTES, read_shard_header, write_shard
from gpt2.tokenizer import EOT_ID, RANKS_SHA256, VOCAB_SIZE, encoding

MANIFEST = "manifest.json"
FORMAT = "gpt2-token-shards"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_FRACTION = 0.1
PIECE_BYTES = 1 << 20  # a large .txt file is cut into pieces of about this size (see _safe_cut)
TASK_CHARS = 2 << 20  # text per worker task: large enough to amortize IPC, small enough to balance load
TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
JSON_SUFFIXES = {".json"}
COMPRESSED = {".gz", ".xz", ".zst", ".bz2"}
VAL_NAME = re.compile(r"(?i)(^|[._-])(val|valid|validation)([._-]|$)")


@dataclass(frozen=True)
class Preset:
    """A named corpus recipe."""

    source: str
    prefix: str
    shard_tokens: int
    val_tokens: int  # the first val_tokens of the stream are val
    out_dir: str  # the directory the seed's training config reads by default


PRESETS = {
    "fineweb-edu-10B": Preset(
        source="hf:HuggingFaceFW/fineweb-edu:sample-10BT?split=train",
        prefix="edufineweb",
        shard_tokens=100_000_000,
        val_tokens=100_000_000,
        out_dir="edu_fineweb10B",
    ),
}


@dataclass
class PrepareResult:
    """What `prepare` wrote (or found already written)."""

    out_dir: Path
    shards: list[str]
    train_tokens: int
    val_tokens: int
    docs: int
    replaced: int  # undecodable UTF-8 sequences replaced by U+FFFD
    seconds: float
    tokens_per_second: float  # tokens encoded in this call / seconds
    resumed_shards: int = 0  # shards found finished and kept
    already_done: bool = False


# -- sources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One input: a local file or a HuggingFace dataset."""

    spec: str  # as the user wrote it (a glob or directory expands into several Sources)
    path: Path | None = None
    fmt: str = "hf"  # "text" | "jsonl" | "json" | "hf"
    text_field: str = "text"
    name: str = ""  # hf dataset name
    config: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] = ()
    revision: str | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else self.spec

    def describe(self) -> dict[str, Any]:
        """Identity of the input for the manifest (a different description means a different corpus)."""
        if self.path is not None:
            d: dict[str, Any] = {"path": str(self.path), "bytes": self.path.stat().st_size, "format": self.fmt}
            if self.fmt != "text":
                d["text_field"] = self.text_field
            return d
        return {
            "hf": self.name,
            "config": self.config,
            "split": self.split,
            "text_field": self.text_field,
            "data_files": list(self.data_files),
            "revision": self.revision,
        }

    def looks_like_val(self) -> bool:
        if self.path is not None:
            return bool(VAL_NAME.search(_stem(self.path)))
        return bool(VAL_NAME.search(self.split))


def _stem(path: Path) -> str:
    """File name without compression and format suffixes: data/wiki_val.jsonl.gz -> wiki_val."""
    name = path.name
    for suffixes in (COMPRESSED, TEXT_SUFFIXES | JSONL_SUFFIXES | JSON_SUFFIXES):
        for s in suffixes:
            if name.lower().endswith(s):
                name = name[: -len(s)]
                break
    return name


def _file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in TEXT_SUFFIXES:
        return "text"
    if last in JSONL_SUFFIXES:
        return "jsonl"
    if last in JSON_SUFFIXES:
        return "json"
    return None


def resolve_sources(specs: Iterable[str], *, text_field: str = "text", split: str = "train") -> list[Source]:
    """Expand source strings (files, globs, directories, hf: references) into Sources, checking they exist."""
    sources: list[Source] = []
    for spec in specs:
        if spec.startswith("hf:"):
            sources.append(_hf_source(spec, text_field=text_field, split=split))
            continue
        if spec in PRESETS:
            raise ValueError(f"the preset {spec} must be the only source; prepare other sources separately")
        expanded = os.path.expanduser(spec)
        if glob.has_magic(expanded):
            paths = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
            if not paths:
                raise FileNotFoundError(f"{spec} matched no files")
        elif Path(expanded).is_dir():
            paths = sorted(p for p in Path(expanded).rglob("*") if p.is_file() and _file_format(p))
            if not paths:
                raise FileNotFoundError(f"directory {spec} has no .txt/.jsonl/.json files (optionally .gz/.xz/.zst)")
        elif Path(expanded).is_file():
            paths = [Path(expanded)]
        else:
            raise FileNotFoundError(f"no such file: {spec} (give files, globs, directories or hf:NAME sources)")
        for p in paths:
            fmt = _file_format(p)
            if fmt is None:
                raise ValueError(
                    f"{p}: unsupported file type; use .txt, .jsonl or .json, optionally compressed .gz/.xz/.zst/.bz2"
                )
            sources.append(Source(spec=spec, path=p.resolve(), fmt=fmt, text_field=text_field))
    return sources


def _hf_source(spec: str, *, text_field: str, split: str) -> Source:
    ref, _, query = spec[3:].partition("?")
    name, _, config = ref.partition(":")
    if not name:
        raise ValueError(f"{spec}: expected hf:NAME[:CONFIG][?split=S&text_field=F&data_files=A,B]")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - {"split", "text_field", "data_files", "revision"}
    if unknown:
        raise ValueError(
            f"{spec}: unknown option(s) {', '.join(sorted(unknown))}; use split, text_field, data_files, revision"
        )
    data_files = tuple(f for f in options.get("data_files", "").split(",") if f)
    resolved = []
    for f in data_files:  # local data files must exist; remote ones (hf://, https://) are datasets' business
        local = Path(os.path.expanduser(f))
        if "://" not in f and not glob.has_magic(f):
            if not local.is_file():
                raise FileNotFoundError(f"{spec}: no such data file: {f}")
            f = str(local.resolve())
        resolved.append(f)
    return Source(
        spec=spec,
        fmt="hf",
        name=name,
        config=config or None,
        split=options.get("split", split),
        text_field=options.get("text_field", text_field),
        data_files=tuple(resolved),
        revision=options.get("revision") or None,
    )


READ_BYTES = 1 << 20  # compressed bytes per read


def iter_blocks(path: str | Path) -> Iterator[bytes]:
    """The decompressed bytes of a file (.gz/.xz/.bz2/.zst by suffix, else as is), in blocks of a few MB.

    Decompressor objects fed 1 MB at a time: about 25% less CPU than line iteration over lzma.open, which
    matters because on a 2-core machine decompression competes with the tokenizer workers."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise RuntimeError(f"reading {path} needs the zstandard package: pip install zstandard") from None
        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as f:
            while block := f.read(4 * READ_BYTES):
                yield block
        return
    factory = {
        ".gz": lambda: zlib.decompressobj(wbits=zlib.MAX_WBITS | 16),
        ".xz": lzma.LZMADecompressor,
        ".bz2": bz2.BZ2Decompressor,
    }.get(suffix)
    with open(path, "rb") as f:
        if factory is None:
            while block := f.read(4 * READ_BYTES):
                yield block
            return
        decompressor = factory()
        started = False
        while data := f.read(READ_BYTES):
            while data:
                if decompressor.eof:  # another stream/member follows (concatenated files; zero padding between)
                    data = data.lstrip(b"\0")
                    if not data:
                        break
                    decompressor = factory()
                started = True
                out = decompressor.decompress(data)
                data = decompressor.unused_data if decompressor.eof else b""
                if out:
                    yield out
        if started and not decompressor.eof:
            raise ValueError(f"{path} is truncated (the compressed stream ends early); download or copy it again")


def iter_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines (without the newline) of a stream of byte blocks, independent of where the blocks end."""
    rest = b""
    for block in blocks:
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text of `raw` with undecodable sequences replaced by U+FFFD, and how many were replaced."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD already present in the input is encoded as EF BF BD; everything else was inserted.
        return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def _safe_cut(buf: bytes, limit: int) -> int:
    """The last index i <= limit where `buf` can be cut into buf[:i] + buf[i:] without changing its tokens, or -1.

    i must hold a newline followed by a printable ASCII character. GPT-2's pre-tokenizer regex then has
    a piece boundary just before that newline (the whitespace run before it is a piece of its own, the
    newline is a one-character piece), and at the end of the first part `\\s++$` yields the same piece.
    A newline byte never occurs inside a multi-byte UTF-8 character, so both parts decode independently.
    """
    i = buf.rfind(b"\n", 1, min(limit + 1, len(buf) - 1))
    while i > 0:
        if 0x21 <= buf[i + 1] <= 0x7E:
            return i
        i = buf.rfind(b"\n", 1, i)
    return -1


def _text_pieces(blocks: Iterable[bytes], piece_bytes: int) -> Iterator[bytes]:
    """A text file's bytes in pieces of about piece_bytes, cut only where tokenization is unaffected.

    The cut points depend only on the content (never on where the blocks end), so the pieces, and hence
    a resumed run, are deterministic."""
    blocks = iter(blocks)
    buf = b""
    eof = False
    first = True

    def more() -> bool:
        nonlocal buf, eof
        block = next(blocks, None)
        eof = block is None
        buf += block or b""
        return not eof

    while True:
        while not eof and len(buf) < piece_bytes + 2:  # limit + 2 bytes: every cut candidate <= limit is decidable
            more()
        if first:
            first = False
            if buf.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not text
                buf = buf[3:]
        cut = _safe_cut(buf, piece_bytes) if len(buf) > piece_bytes else -1
        if cut < 0 and len(buf) > piece_bytes:  # no cut point yet: take the first one after the limit
            while True:
                j = buf.find(b"\n", piece_bytes)
                while j >= 0 and not (j + 1 < len(buf) and 0x21 <= buf[j + 1] <= 0x7E):
                    j = buf.find(b"\n", j + 1)
                if j >= 0 or not more():
                    cut = j
                    break
        if cut <= 0:
            if buf:
                yield buf
            return
        yield buf[:cut]
        buf = buf[cut:]


# A unit is the smallest piece of input that is encoded on its own: a JSON line, a document, or a piece
# of a large text file. kind says how a worker turns its payload into text.
Unit = tuple[str, Any, bool, int, int]  # (kind, payload, starts_doc, line_no, replaced_while_reading)


def _units(source: Source, piece_bytes: int) -> Iterator[Unit]:
    if source.fmt == "hf":
        yield from _hf_units(source)
        return
    assert source.path is not None
    blocks = iter_blocks(source.path)
    if source.fmt == "text":
        for i, piece in enumerate(_text_pieces(blocks, piece_bytes)):
            yield ("bytes", piece, i == 0, 0, 0)
    elif source.fmt == "jsonl":
        for line_no, line in enumerate(iter_lines(blocks), 1):
            yield ("line", line, True, line_no, 0)
    else:
        text, bad = _decode(b"".join(blocks))
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):
                raise ValueError(f"{source.path} is not valid JSON ({e.msg} at line {e.lineno})") from None
            for line_no, line in enumerate(text.splitlines(), 1):  # JSON lines in a .json file
                yield ("json-line", line, True, line_no, bad if line_no == 1 else 0)
            return
        items = obj if isinstance(obj, list) else [obj]
        for i, item in enumerate(items):
            where = f"{source.path} item {i}"
            yield ("text", _text_of(item, source.text_field, where), True, i, bad if i == 0 else 0)


def _hf_units(source: Source) -> Iterator[Unit]:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"{source.spec} needs the datasets package: pip install 'gpt2[data]'") from None
    kwargs: dict[str, Any] = {"split": source.split, "streaming": True}
    if source.data_files:
        kwargs["data_files"] = list(source.data_files)
    if source.revision:
        kwargs["revision"] = source.revision
    try:
        rows = datasets.load_dataset(source.name, source.config, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"cannot open {source.spec}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from e
    except Exception as e:  # network, hub and builder errors: one line the user can act on
        raise RuntimeError(f"cannot open {source.spec}: {type(e).__name__}: {str(e).strip()[:200]}") from e
    for i, row in enumerate(rows):
        yield ("text", _text_of(row, source.text_field, f"{source.spec} row {i}"), True, i, 0)


def _text_of(obj: Any, text_field: str, where: str) -> str:
    """The document text of one parsed JSON value or dataset row."""
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is a JSON {type(obj).__name__}, not an object with a {text_field!r} field")
    if text_field not in obj:
        fields = ", ".join(map(str, list(obj)[:10])) or "none"
        raise ValueError(f"{where} has no field {text_field!r} (fields: {fields}); choose one with --text-field")
    text = obj[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} holds {type(text).__name__}, not text; choose --text-field")
    return text


# -- parallel encoding ----------------------------------------------------------------------------


@dataclass
class _Task:
    kind: str
    label: str
    text_field: str
    first_unit: int
    items: list = field(default_factory=list)
    starts: list = field(default_factory=list)
    lines: list = field(default_factory=list)
    replaced: list = field(default_factory=list)
    chars: int = 0


@dataclass
class _Encoded:
    """Tokens of consecutive units; per unit: token count, whether it started a document, bytes replaced."""

    first_unit: int
    tokens: np.ndarray  # (n,) uint16
    lens: np.ndarray  # (units,) int64
    docs: np.ndarray  # (units,) bool
    replaced: np.ndarray  # (units,) int64
    first_offset: int = 0  # tokens of the first unit dropped (already written before a resume)


def _tasks(sources: list[Source], skip_units: int, piece_bytes: int, task_chars: int) -> Iterator[_Task]:
    """Units of the sources, numbered through the stream, grouped into tasks; the first skip_units are skipped."""
    unit = 0
    for source in sources:
        task: _Task | None = None
        for kind, payload, starts, line_no, bad in _units(source, piece_bytes):
            if unit < skip_units:  # resuming: finished units are read but not encoded
                unit += 1
                continue
            if task is not None and (task.kind != kind or task.chars >= task_chars):
                yield task
                task = None
            if task is None:
                task = _Task(kind, source.label, source.text_field, unit)
            task.items.append(payload)
            task.starts.append(starts)
            task.lines.append(line_no)
            task.replaced.append(bad)
            task.chars += len(payload)
            unit += 1
        if task is not None:
            yield task


def _encode_task(task: _Task) -> _Encoded:
    """Runs in a worker: decode, parse and tokenize one task's units."""
    enc = encoding()
    n = len(task.items)
    lens = np.zeros(n, dtype=np.int64)
    docs = np.zeros(n, dtype=np.bool_)
    replaced = np.array(task.replaced, dtype=np.int64)
    parts: list[np.ndarray] = []
    for i, item in enumerate(task.items):
        if task.kind in ("line", "json-line"):
            if task.kind == "line":
                item, bad = _decode(item)
                replaced[i] += bad
            if not item.strip():
                continue
            where = f"{task.label} line {task.lines[i]}"
            try:
                obj = json.loads(item)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e.msg}); fix or remove that line") from None
            text = _text_of(obj, task.text_field, where)
        elif task.kind == "bytes":
            text, bad = _decode(item)
            replaced[i] += bad
        else:
            text = item
        if not text:
            continue
        if task.starts[i]:
            parts.append(_EOT)
            docs[i] = True
        ids = _encode_ordinary(enc, text)
        parts.append(ids)
        lens[i] = ids.size + docs[i]
    tokens = np.concatenate(parts).astype(np.uint16) if parts else np.zeros(0, dtype=np.uint16)
    return _Encoded(task.first_unit, tokens, lens, docs, replaced)


_EOT = np.array([EOT_ID], dtype=np.uint32)


def _encode_ordinary(enc: Any, text: str) -> np.ndarray:
    """enc.encode_ordinary(text) as a uint32 array; tiktoken >= 0.7 writes it straight into a buffer, which
    skips building a python list of ints. With no special token allowed, and none disallowed, encode treats
    "<|endoftext|>" as ordinary text, exactly like encode_ordinary (checked in tests)."""
    if hasattr(enc, "encode_to_numpy"):
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    return np.array(enc.encode_ordinary(text), dtype=np.uint32)


def _ordered_map(fn: Callable[[_Task], _Encoded], tasks: Iterator[_Task], workers: int) -> Iterator[_Encoded]:
    """fn over tasks in `workers` processes, results in input order, at most 2*workers+2 tasks in flight."""
    if workers <= 1:
        for task in tasks:
            yield fn(task)
        return
    encoding()  # build (and checksum) the BPE once; forked workers inherit it
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) > 2 * workers + 1:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _worker_init() -> None:
    """Ctrl-C is the main process's to handle (it stops the pool); workers would only print tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- writing --------------------------------------------------------------------------------------


@dataclass
class Cursor:
    """A position in the input: where the next shard starts, and totals up to it."""

    stream: int = 0  # index of the stream (val sources, then train sources; or the one stream)
    unit: int = 0  # next unit of that stream
    offset: int = 0  # tokens of that unit already written
    tokens: int = 0  # tokens of that stream written
    docs: int = 0  # documents started, all streams
    replaced: int = 0  # undecodable UTF-8 sequences replaced, all streams


def _tokenizer_info() -> dict[str, Any]:
    return {"name": "gpt2", "ranks_sha256": RANKS_SHA256, "vocab_size": VOCAB_SIZE, "eot_id": EOT_ID, "dtype": "uint16"}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Writer:
    """Cuts the encoded token stream into shards, switching split where the plan says, and keeps the manifest."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int, manifest: dict, on_shard: Callable | None):
        self.out_dir = out_dir
        self.prefix = prefix
        self.shard_tokens = shard_tokens
        self.manifest = manifest
        self.on_shard = on_shard
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.split: str | None = None
        records = manifest["shards"]
        self.cursor = Cursor(**records[-1]["end"]) if records else Cursor()
        self.written_now = 0  # tokens written by this call

    def feed(self, e: _Encoded, split_at: Callable[[int], tuple[str, float]]) -> None:
        """Append one encoded chunk; split_at(stream token index) -> (split, index where that split ends)."""
        start = self.cursor
        cum = np.cumsum(e.lens)  # (units,)
        n, k = e.tokens.size, 0
        while k < n:
            split, limit = split_at(self.cursor.tokens)
            if split != self.split and self.fill:
                self._flush(self._cursor_at(start, e, cum, k))
            self.split = split
            take = int(min(n - k, self.shard_tokens - self.fill, limit - self.cursor.tokens))
            self.buf[self.fill : self.fill + take] = e.tokens[k : k + take]
            self.fill += take
            k += take
            self.cursor = self._cursor_at(start, e, cum, k)
            if self.fill == self.shard_tokens or self.cursor.tokens == limit:
                self._flush(self.cursor)
        self.cursor = self._cursor_at(start, e, cum, n)

    def end_stream(self, next_stream: int) -> None:
        """The current stream is exhausted: write its partial shard; the next one starts fresh."""
        self.cursor = Cursor(
            self.cursor.stream, self.cursor.unit, 0, self.cursor.tokens, self.cursor.docs, self.cursor.replaced
        )
        if self.fill:
            self._flush(self.cursor)
        self.cursor = Cursor(next_stream, 0, 0, 0, self.cursor.docs, self.cursor.replaced)

    @staticmethod
    def _cursor_at(start: Cursor, e: _Encoded, cum: np.ndarray, k: int) -> Cursor:
        """The input position after the first k tokens of e (which began at `start`)."""
        i = int(np.searchsorted(cum, k, side="right"))  # units [0, i) are complete
        inside = k - (int(cum[i - 1]) if i > 0 else 0)  # tokens of unit i already taken
        started = i + (1 if inside > 0 and i < len(cum) else 0)
        return Cursor(
            stream=start.stream,
            unit=e.first_unit + i,
            offset=inside + (e.first_offset if i == 0 else 0),
            tokens=start.tokens + k,
            docs=start.docs + int(e.docs[:started].sum()),
            replaced=start.replaced + int(e.replaced[:started].sum()),
        )

    def _flush(self, end: Cursor) -> None:
        records = self.manifest["shards"]
        name = f"{self.prefix}_{self.split}_{len(records):06d}.bin"
        sha = write_shard(self.out_dir / name, self.buf[: self.fill], vocab_size=VOCAB_SIZE)
        record = {"name": name, "split": self.split, "tokens": int(self.fill), "sha256": sha, "end": asdict(end)}
        records.append(record)
        _write_json_atomic(self.out_dir / MANIFEST, self.manifest)
        self.written_now += self.fill
        self.fill = 0
        if self.on_shard is not None:
            self.on_shard(dict(record))


def _check_out_dir(out_dir: Path, tokenizer: dict, settings: dict, overwrite: bool) -> dict | None:
    """The existing manifest to resume or re-use, None to start fresh; refuses foreign shards unless overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; give a directory")
    if not out_dir.is_dir():
        return None
    manifest_path = out_dir / MANIFEST
    shard_files = [p for p in out_dir.iterdir() if re.search(r"_(train|val)_.*\.(bin|npy)$", p.name)]
    old = None
    reason = None
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
            if not isinstance(old, dict) or old.get("format") != FORMAT:
                raise ValueError("not a gpt2 shard manifest")
        except (ValueError, UnicodeDecodeError):
            old, reason = None, f"its {MANIFEST} is not a gpt2 shard manifest"
        if old is not None:
            differ = [k for k in ("tokenizer",) if old.get(k) != tokenizer]
            differ += [k for k in settings if old.get("settings", {}).get(k) != settings[k]]
            if old.get("version") != FORMAT_VERSION:
                differ.append("format version")
            if differ:
                reason = f"its shards were made from another corpus or with other settings ({', '.join(differ)} differ)"
    elif shard_files:
        reason = f"it holds shards ({shard_files[0].name}, ...) without a {MANIFEST}"
    if reason is None:
        return old
    if not overwrite:
        raise FileExistsError(f"{out_dir}: {reason}; pass --overwrite to replace them or choose another --out")
    for p in shard_files:
        if p.suffix == ".bin":
            p.unlink()
    if manifest_path.is_file():
        manifest_path.unlink()
    return None


def _verified_prefix(out_dir: Path, records: list[dict]) -> list[dict]:
    """The longest prefix of recorded shards that exist with the recorded size and sha256."""
    good = []
    for r in records:
        path = out_dir / r["name"]
        try:
            header = read_shard_header(path)
        except (ValueError, FileNotFoundError):
            break
        if header.num_tokens != r["tokens"] or header.header_bytes != HEADER_BYTES or _sha256_file(path) != r["sha256"]:
            break
        good.append(r)
    return good


def prepare(
    sources: list[str],
    out_dir: str | Path | None = None,
    *,
    shard_tokens: int | None = None,
    val_sources: list[str] | None = None,
    val_tokens: int | None = None,
    val_fraction: float | None = None,
    text_field: str = "text",
    split: str = "train",
    prefix: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Any = None,
    log: Callable[[str], None] | None = None,
    on_shard: Callable[[dict], None] | None = None,
    piece_bytes: int = PIECE_BYTES,
    task_chars: int = TASK_CHARS,
) -> PrepareResult:
    """Tokenize `sources` into `out_dir` (see the module docstring for sources, the val rule and resuming).

    progress: a tqdm-like object (update(n_tokens), set_postfix_str(text)); log: receives one-line notes;
    on_shard: called with each finished shard's manifest record. Raises ValueError / FileNotFoundError /
    FileExistsError with one line for inputs a user can fix."""
    t0 = time.perf_counter()
    sources = list(sources)
    if not sources:
        raise ValueError("no sources given; pass files, globs, hf:NAME datasets or a preset (fineweb-edu-10B)")
    if sources[0] in PRESETS:
        if len(sources) > 1:
            raise ValueError(f"the preset {sources[0]} must be the only source; prepare other sources separately")
        preset = PRESETS[sources[0]]
        sources = [preset.source]
        out_dir = preset.out_dir if out_dir is None else out_dir
        prefix = preset.prefix if prefix is None else prefix
        shard_tokens = preset.shard_tokens if shard_tokens is None else shard_tokens
        if val_sources is None and val_tokens is None and val_fraction is None:
            val_tokens = shard_tokens  # the first shard is val, as in edu_fineweb10B
    if out_dir is None:
        raise ValueError("no output directory given; pass --out DIR")
    out_dir = Path(out_dir).expanduser()
    shard_tokens = DEFAULT_SHARD_TOKENS if shard_tokens is None else int(shard_tokens)
    prefix = "shard" if prefix is None else prefix
    workers = default_workers() if workers is None else int(workers)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", prefix):
        raise ValueError(f"prefix {prefix!r} must be letters, digits, '.' or '-' (no '_', which separates the split)")
    if val_tokens is not None and val_fraction is not None:
        raise ValueError("give val_tokens or val_fraction, not both")
    if val_sources is not None and (val_tokens is not None or val_fraction is not None):
        raise ValueError("give val sources or val_tokens/val_fraction, not both")
    if val_tokens is not None and val_tokens < 0:
        raise ValueError(f"val_tokens must be >= 0, got {val_tokens}")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if piece_bytes < 2:
        raise ValueError(f"piece_bytes must be >= 2, got {piece_bytes}")

    # Which documents are val: sources (rules 1 and 3) or the first tokens of one stream (rules 2 and 4).
    resolved = resolve_sources(sources, text_field=text_field, split=split)
    if val_sources is not None:
        val = resolve_sources(val_sources, text_field=text_field, split=split)
        val_ids = {(s.path, s.spec if s.path is None else None) for s in val}
        train = [s for s in resolved if (s.path, s.spec if s.path is None else None) not in val_ids]
    elif val_tokens is None and val_fraction is None and any(s.looks_like_val() for s in resolved):
        val = [s for s in resolved if s.looks_like_val()]
        train = [s for s in resolved if not s.looks_like_val()]
    else:
        val, train = [], resolved
    by_sources = bool(val)
    if by_sources and not train:
        raise ValueError(
            "every source is a validation source; give a training source too, "
            "or split these by --val-tokens/--val-fraction"
        )
    if by_sources:
        streams = [("val", val), ("train", train)]
        val_rule: dict[str, Any] = {"rule": "sources"}
    else:
        streams = [("val+train", train)]
        fraction = DEFAULT_VAL_FRACTION if val_tokens is None and val_fraction is None else val_fraction
        val_rule = {"rule": "first_tokens", "tokens": val_tokens, "fraction": fraction}

    tokenizer = _tokenizer_info()
    settings = {
        "streams": [{"split": name, "sources": [s.describe() for s in srcs]} for name, srcs in streams],
        "val": val_rule,
        "shard_tokens": shard_tokens,
        "prefix": prefix,
        "piece_bytes": piece_bytes,
    }
    settings = json.loads(json.dumps(settings))  # the form it has when read back
    old = _check_out_dir(out_dir, tokenizer, settings, overwrite)

    good = _verified_prefix(out_dir, old.get("shards", [])) if old is not None else []
    if old is not None and old.get("complete"):
        if len(good) == len(old["shards"]):
            return _result(out_dir, old, t0, 0, resumed=len(good), already_done=True)
        if log is not None:
            log(f"{out_dir}: {len(old['shards']) - len(good)} shard(s) missing or changed; re-creating them")
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": False,
        "tokenizer": tokenizer,
        "settings": settings,
        "val_tokens": None,
        "shards": [],
        "totals": None,
    }
    if good:
        manifest["shards"] = good
        manifest["val_tokens"] = old.get("val_tokens")
        if log is not None:
            done = sum(r["tokens"] for r in good)
            log(f"{out_dir}: resuming after {len(good)} finished shard(s) ({done:,} tokens)")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in out_dir.glob(".*.tmp"):  # leftovers of an interrupted write
        p.unlink()

    writer = _Writer(out_dir, prefix, shard_tokens, manifest, on_shard)
    resumed = len(manifest["shards"])
    docs_seen = writer.cursor.docs

    def encoded_stream(srcs: list[Source], cursor: Cursor) -> Iterator[_Encoded]:
        nonlocal docs_seen
        tasks = _tasks(srcs, cursor.unit, piece_bytes, task_chars)
        first = True
        for e in _ordered_map(_encode_task, tasks, workers):
            if first and cursor.offset:  # resume inside a unit: drop its tokens already written
                first = False
                if e.first_unit != cursor.unit or e.lens[0] < cursor.offset:
                    raise ValueError(f"{out_dir}/{MANIFEST} does not match the input; rerun with --overwrite")
                e.tokens = e.tokens[cursor.offset :]
                e.lens[0] -= cursor.offset
                e.docs[0] = False
                e.replaced[0] = 0
                e.first_offset = cursor.offset
            first = False
            docs_seen += int(e.docs.sum())
            if progress is not None:
                progress.update(int(e.tokens.size))
                progress.set_postfix_str(f"{docs_seen:,} docs", refresh=False)
            yield e

    try:
        for index in range(writer.cursor.stream, len(streams)):
            name, srcs = streams[index]
            with closing(encoded_stream(srcs, writer.cursor)) as encoded:
                if name == "val+train":
                    _write_cut_stream(writer, encoded, manifest, val_rule, shard_tokens)
                else:
                    for e in encoded:
                        writer.feed(e, lambda t, name=name: (name, math.inf))
            if writer.cursor.tokens == 0:
                labels = ", ".join(s.label for s in srcs)
                what = "sources" if name == "val+train" else f"{name} sources"
                raise ValueError(f"no text in the {what} ({labels}); check the files and --text-field")
            writer.end_stream(index + 1)
    finally:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # nothing was written: leave no trace

    totals = _totals(manifest["shards"], writer.cursor)
    if totals["train_tokens"] == 0:
        raise ValueError(
            f"all {totals['tokens']:,} tokens went to the val split, none to train; "
            "lower --val-tokens/--val-fraction and rerun with --overwrite"
        )
    manifest["complete"] = True
    manifest["totals"] = totals
    _write_json_atomic(out_dir / MANIFEST, manifest)
    if log is not None and totals["replaced"]:
        log(f"replaced {totals['replaced']:,} undecodable UTF-8 sequence(s) with U+FFFD")
    return _result(out_dir, manifest, t0, writer.written_now, resumed=resumed)


def _write_cut_stream(
    writer: _Writer, encoded: Iterator[_Encoded], manifest: dict, rule: dict, shard_tokens: int
) -> None:
    """One stream whose first V tokens are val. V is known up front (val_tokens), or is
    min(shard_tokens, floor(fraction x total)): decided at the end, or as soon as the stream is long
    enough for the cap to win (total >= shard_tokens / fraction), holding the tokens until then."""
    if manifest["val_tokens"] is None and rule["tokens"] is not None:
        manifest["val_tokens"] = int(rule["tokens"])
    if manifest["val_tokens"] is None and rule["fraction"] == 0:
        manifest["val_tokens"] = 0

    def split_at(t: int) -> tuple[str, float]:
        v = manifest["val_tokens"]
        return ("val", v) if t < v else ("train", math.inf)

    held: list[_Encoded] = []
    seen = 0
    for e in encoded:
        if manifest["val_tokens"] is None:
            held.append(e)
            seen += e.tokens.size
            if seen * rule["fraction"] < shard_tokens:
                continue
            manifest["val_tokens"] = shard_tokens
            for h in held:
                writer.feed(h, split_at)
            held = []
            continue
        writer.feed(e, split_at)
    if manifest["val_tokens"] is None:
        manifest["val_tokens"] = min(shard_tokens, math.floor(seen * rule["fraction"]))
        for h in held:
            writer.feed(h, split_at)


def _totals(records: list[dict], end: Cursor) -> dict[str, int]:
    return {
        "docs": end.docs,
        "replaced": end.replaced,
        "tokens": sum(r["tokens"] for r in records),
        "train_tokens": sum(r["tokens"] for r in records if r["split"] == "train"),
        "val_tokens": sum(r["tokens"] for r in records if r["split"] == "val"),
    }


def _result(out_dir: Path, manifest: dict, t0: float, written: int, *, resumed: int, already_done: bool = False):
    totals = manifest["totals"]
    seconds = time.perf_counter() - t0
    return PrepareResult(
        out_dir=out_dir,
        shards=[r["name"] for r in manifest["shards"]],
        train_tokens=totals["train_tokens"],
        val_tokens=totals["val_tokens"],
        docs=totals["docs"],
        replaced=totals["replaced"],
        seconds=seconds,
        tokens_per_second=written / seconds if seconds > 0 else 0.0,
        resumed_shards=resumed,
        already_done=already_done,
    )
