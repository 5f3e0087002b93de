"""What `prepare` reads: source strings (files, globs, directories, hf: datasets, presets) resolved into
Sources, each with its format and its identity for the manifest."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
JSON_SUFFIXES = {".json"}
COMPRESSED = {".gz", ".xz", ".zst", ".bz2"}
VAL_NAME = re.compile(r"(?i)(^|[._-])(val|valid|validation)([._-]|$)")
HF_OPTIONS = {"split", "text_field", "data_files", "revision"}


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

    @property
    def key(self) -> tuple[Path | None, str | None]:
        """What makes two Sources the same input: the file, or the hf spec."""
        return (self.path, self.spec if self.path is None else None)

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
        for p in _local_paths(spec):
            fmt = _file_format(p)
            if fmt is None:
                raise ValueError(
                    f"{p}: unsupported file type; use .txt, .jsonl or .json, optionally compressed .gz/.xz/.zst/.bz2"
                )
            sources.append(Source(spec=spec, path=p.resolve(), fmt=fmt, text_field=text_field))
    return sources


def _local_paths(spec: str) -> list[Path]:
    """The files a path, glob or directory names (sorted), or FileNotFoundError."""
    expanded = os.path.expanduser(spec)
    if glob.has_magic(expanded):
        paths = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not paths:
            raise FileNotFoundError(f"{spec} matched no files")
        return paths
    if Path(expanded).is_dir():
        paths = sorted(p for p in Path(expanded).rglob("*") if p.is_file() and _file_format(p))
        if not paths:
            raise FileNotFoundError(f"directory {spec} has no .txt/.jsonl/.json files (optionally .gz/.xz/.zst)")
        return paths
    if Path(expanded).is_file():
        return [Path(expanded)]
    raise FileNotFoundError(f"no such file: {spec} (give files, globs, directories or hf:NAME sources)")


def _hf_source(spec: str, *, text_field: str, split: str) -> Source:
    ref, _, query = spec[3:].partition("?")
    name, _, config = ref.partition(":")
    if not name:
        raise ValueError(f"{spec}: expected hf:NAME[:CONFIG][?split=S&text_field=F&data_files=A,B]")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - HF_OPTIONS
    if unknown:
        raise ValueError(
            f"{spec}: unknown option(s) {', '.join(sorted(unknown))}; use split, text_field, data_files, revision"
        )
    data_files = tuple(f for f in options.get("data_files", "").split(",") if f)
    return Source(
        spec=spec,
        fmt="hf",
        name=name,
        config=config or None,
        split=options.get("split", split),
        text_field=options.get("text_field", text_field),
        data_files=tuple(_data_file(spec, f) for f in data_files),
        revision=options.get("revision") or None,
    )


def _data_file(spec: str, f: str) -> str:
    """A local data file, resolved and checked; remote ones (hf://, https://) and globs are datasets' business."""
    if "://" in f or glob.has_magic(f):
        return f
    local = Path(os.path.expanduser(f))
    if not local.is_file():
        raise FileNotFoundError(f"{spec}: no such data file: {f}")
    return str(local.resolve())
