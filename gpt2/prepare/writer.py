"""The output directory: shards cut from the encoded stream, manifest.json (the record of every finished
shard and the input position after it), and the checks that decide whether to resume, re-use or refuse."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2.data import HEADER_BYTES, MANIFEST, read_shard_header, write_shard
from gpt2.fileio import atomic_write_json, sha256_file
from gpt2.prepare.encode import Encoded
from gpt2.tokenizer import EOT_ID, RANKS_SHA256, VOCAB_SIZE

FORMAT = "gpt2-token-shards"
FORMAT_VERSION = 1
SHARD_NAME = re.compile(r"_(train|val)_.*\.(bin|npy)$")


@dataclass
class Cursor:
    """A position in the input: where the next shard starts, and totals up to it."""

    stream: int = 0  # index of the stream (val sources, then train sources; or the one stream)
    unit: int = 0  # next unit of that stream
    offset: int = 0  # tokens of that unit already written
    tokens: int = 0  # tokens of that stream written
    docs: int = 0  # documents started, all streams
    replaced: int = 0  # undecodable UTF-8 sequences replaced, all streams


def tokenizer_info() -> dict[str, Any]:
    """The tokenizer's identity as the manifest records it."""
    return {"name": "gpt2", "ranks_sha256": RANKS_SHA256, "vocab_size": VOCAB_SIZE, "eot_id": EOT_ID, "dtype": "uint16"}


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Publish out_dir/manifest.json atomically (a reader sees the old or the new one, never half)."""
    atomic_write_json(out_dir / MANIFEST, manifest, sort_keys=True)


class Writer:
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

    def feed(self, e: Encoded, split_at: Callable[[int], tuple[str, float]]) -> None:
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
    def _cursor_at(start: Cursor, e: Encoded, cum: np.ndarray, k: int) -> Cursor:
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
        write_manifest(self.out_dir, self.manifest)
        self.written_now += self.fill
        self.fill = 0
        if self.on_shard is not None:
            self.on_shard(dict(record))


def start_manifest(
    out_dir: Path, settings: dict, overwrite: bool, log: Callable[[str], None] | None
) -> tuple[dict, bool]:
    """(the manifest to write into out_dir, whether it is already complete).

    A complete output whose shards all check out is returned as it is; otherwise a fresh manifest that
    keeps the longest verified prefix of finished shards (a resume). Foreign shards are refused unless
    overwrite (see check_out_dir)."""
    tokenizer = tokenizer_info()
    old = check_out_dir(out_dir, tokenizer, settings, overwrite)
    good = verified_prefix(out_dir, old.get("shards", [])) if old is not None else []
    if old is not None and old.get("complete"):
        if len(good) == len(old["shards"]):
            return old, True
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
    return manifest, False


def check_out_dir(out_dir: Path, tokenizer: dict, settings: dict, overwrite: bool) -> dict | None:
    """The existing manifest to resume or re-use, None to start fresh; refuses foreign shards unless overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; give a directory")
    if not out_dir.is_dir():
        return None
    manifest_path = out_dir / MANIFEST
    shard_files = [p for p in out_dir.iterdir() if SHARD_NAME.search(p.name)]
    old, reason = None, None
    if manifest_path.is_file():
        old, reason = _read_manifest(manifest_path, tokenizer, settings)
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


def _read_manifest(path: Path, tokenizer: dict, settings: dict) -> tuple[dict | None, str | None]:
    """(the manifest at path, None) if it matches tokenizer and settings, else (None, why not)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise ValueError("not a gpt2 shard manifest")
    except (ValueError, UnicodeDecodeError):
        return None, f"its {MANIFEST} is not a gpt2 shard manifest"
    differ = [k for k in ("tokenizer",) if old.get(k) != tokenizer]
    differ += [k for k in settings if old.get("settings", {}).get(k) != settings[k]]
    if old.get("version") != FORMAT_VERSION:
        differ.append("format version")
    if differ:
        return None, f"its shards were made from another corpus or with other settings ({', '.join(differ)} differ)"
    return old, None


def verified_prefix(out_dir: Path, records: list[dict]) -> list[dict]:
    """The longest prefix of recorded shards that exist with the recorded size and sha256."""
    good = []
    for r in records:
        path = out_dir / r["name"]
        try:
            header = read_shard_header(path)
        except (ValueError, FileNotFoundError):
            break
        if header.num_tokens != r["tokens"] or header.header_bytes != HEADER_BYTES or sha256_file(path) != r["sha256"]:
            break
        good.append(r)
    return good


def totals(records: list[dict], end: Cursor) -> dict[str, int]:
    """The manifest's totals: documents and replacements up to `end`, tokens per split over `records`."""
    return {
        "docs": end.docs,
        "replaced": end.replaced,
        "tokens": sum(r["tokens"] for r in records),
        "train_tokens": sum(r["tokens"] for r in records if r["split"] == "train"),
        "val_tokens": sum(r["tokens"] for r in records if r["split"] == "val"),
    }
