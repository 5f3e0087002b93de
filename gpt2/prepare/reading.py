"""Reading sources: decompression, lines, UTF-8 decoding, cutting large text files where tokenization is
unaffected, and the units (JSON lines, documents, text pieces) that workers encode one by one."""

from __future__ import annotations

import bz2
import json
import lzma
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gpt2.prepare.sources import Source

READ_BYTES = 1 << 20  # compressed bytes per read
PIECE_BYTES = 1 << 20  # a large .txt file is cut into pieces of about this size (see _safe_cut)
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark (U+FEFF)
REPLACEMENT = b"\xef\xbf\xbd"  # U+FFFD in UTF-8

# A unit is the smallest piece of input that is encoded on its own: a JSON line, a document, or a piece
# of a large text file. kind says how a worker turns its payload into text.
Unit = tuple[str, Any, bool, int, int]  # (kind, payload, starts_doc, line_no, replaced_while_reading)

_DECOMPRESSORS = {
    ".gz": lambda: zlib.decompressobj(wbits=zlib.MAX_WBITS | 16),
    ".xz": lzma.LZMADecompressor,
    ".bz2": bz2.BZ2Decompressor,
}


def iter_blocks(path: str | Path) -> Iterator[bytes]:
    """The decompressed bytes of a file (.gz/.xz/.bz2/.zst by suffix, else as is), in blocks of a few MB.

    Decompressor objects fed 1 MB at a time: about 25% less CPU than line iteration over lzma.open, which
    matters because on a 2-core machine decompression competes with the tokenizer workers."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".zst":
        yield from _zstd_blocks(path)
        return
    factory = _DECOMPRESSORS.get(suffix)
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


def _zstd_blocks(path: Path) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError:
        raise RuntimeError(f"reading {path} needs the zstandard package: pip install zstandard") from None
    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as f:
        while block := f.read(4 * READ_BYTES):
            yield block


def iter_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines (without the newline) of a stream of byte blocks, independent of where the blocks end."""
    rest = b""
    for block in blocks:
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text of `raw` with undecodable sequences replaced by U+FFFD, and how many were replaced."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD already present in the input is encoded as EF BF BD; everything else was inserted.
        return text, text.count("\ufffd") - raw.count(REPLACEMENT)


def _cuttable(buf: bytes, i: int) -> bool:
    """Whether the newline at buf[i] is followed by a printable ASCII character (see _safe_cut)."""
    return i + 1 < len(buf) and 0x21 <= buf[i + 1] <= 0x7E


def _safe_cut(buf: bytes, limit: int) -> int:
    """The last index i <= limit where `buf` can be cut into buf[:i] + buf[i:] without changing its tokens, or -1.

    i must hold a newline followed by a printable ASCII character. GPT-2's pre-tokenizer regex then has
    a piece boundary just before that newline (the whitespace run before it is a piece of its own, the
    newline is a one-character piece), and at the end of the first part `\\s++$` yields the same piece.
    A newline byte never occurs inside a multi-byte UTF-8 character, so both parts decode independently.
    """
    i = buf.rfind(b"\n", 1, min(limit + 1, len(buf) - 1))
    while i > 0:
        if _cuttable(buf, i):
            return i
        i = buf.rfind(b"\n", 1, i)
    return -1


def _first_cut_after(buf: bytes, start: int) -> int:
    """The first index >= start where `buf` can be cut (as _safe_cut), or -1 if none is decidable yet."""
    j = buf.find(b"\n", start)
    while j >= 0 and not _cuttable(buf, j):
        j = buf.find(b"\n", j + 1)
    return j


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
            if buf.startswith(BOM):  # a UTF-8 byte-order mark is not text
                buf = buf[3:]
        cut = _safe_cut(buf, piece_bytes) if len(buf) > piece_bytes else -1
        if cut < 0 and len(buf) > piece_bytes:  # no cut point yet: take the first one after the limit
            cut = _first_cut_after(buf, piece_bytes)
            while cut < 0 and more():
                cut = _first_cut_after(buf, piece_bytes)
        if cut <= 0:
            if buf:
                yield buf
            return
        yield buf[:cut]
        buf = buf[cut:]


def units(source: Source, piece_bytes: int) -> Iterator[Unit]:
    """The units of one source, in order."""
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
        yield from _json_units(source, blocks)


def _json_units(source: Source, blocks: Iterator[bytes]) -> Iterator[Unit]:
    """A .json file: an array of documents (or one), or JSON lines under a .json name."""
    text, bad = decode(b"".join(blocks))
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
        yield ("text", text_of(item, source.text_field, where), True, i, bad if i == 0 else 0)


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
        yield ("text", text_of(row, source.text_field, f"{source.spec} row {i}"), True, i, 0)


def text_of(obj: Any, text_field: str, where: str) -> str:
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
