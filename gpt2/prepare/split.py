"""The validation split (rules 1-4 of the package docstring): which sources are val, or how many of the
first tokens of the one stream are, decided up front or as soon as the stream shows it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gpt2.prepare.encode import Encoded
from gpt2.prepare.sources import Source, resolve_sources
from gpt2.prepare.writer import Writer

DEFAULT_VAL_FRACTION = 0.1
CUT_STREAM = "val+train"  # the name of the one stream whose first tokens are val


@dataclass(frozen=True)
class SplitPlan:
    """The streams to encode in order, (split name or CUT_STREAM, sources), and the val rule for the manifest."""

    streams: list[tuple[str, list[Source]]]
    val_rule: dict[str, Any]  # {"rule": "sources"} or {"rule": "first_tokens", "tokens", "fraction"}


def split_plan(
    sources: list[str],
    val_sources: list[str] | None,
    val_tokens: int | None,
    val_fraction: float | None,
    *,
    text_field: str,
    split: str,
) -> SplitPlan:
    """Resolve the sources and decide which documents are val: sources (rules 1 and 3) or the first
    tokens of one stream (rules 2 and 4)."""
    resolved = resolve_sources(sources, text_field=text_field, split=split)
    if val_sources is not None:
        val = resolve_sources(val_sources, text_field=text_field, split=split)
    elif val_tokens is None and val_fraction is None:
        val = [s for s in resolved if s.looks_like_val()]
    else:
        val = []
    val_keys = {s.key for s in val}
    train = [s for s in resolved if s.key not in val_keys]
    if not val:
        fraction = DEFAULT_VAL_FRACTION if val_tokens is None and val_fraction is None else val_fraction
        return SplitPlan([(CUT_STREAM, train)], {"rule": "first_tokens", "tokens": val_tokens, "fraction": fraction})
    if not train:
        raise ValueError(
            "every source is a validation source; give a training source too, "
            "or split these by --val-tokens/--val-fraction"
        )
    return SplitPlan([("val", val), ("train", train)], {"rule": "sources"})


def write_stream(writer: Writer, name: str, encoded: Iterator[Encoded], manifest: dict, rule: dict) -> None:
    """Feed one stream to the writer: all of it to split `name`, or for CUT_STREAM cut by the val rule."""
    if name == CUT_STREAM:
        _write_cut_stream(writer, encoded, manifest, rule)
        return
    for e in encoded:
        writer.feed(e, lambda t: (name, math.inf))


def _write_cut_stream(writer: Writer, encoded: Iterator[Encoded], manifest: dict, rule: dict) -> None:
    """One stream whose first V tokens are val. V is known up front (val_tokens), or is
    min(shard_tokens, floor(fraction x total)): decided at the end, or as soon as the stream is long
    enough for the cap to win (total >= shard_tokens / fraction), holding the tokens until then."""
    shard_tokens = writer.shard_tokens
    if manifest["val_tokens"] is None and rule["tokens"] is not None:
        manifest["val_tokens"] = int(rule["tokens"])
    if manifest["val_tokens"] is None and rule["fraction"] == 0:
        manifest["val_tokens"] = 0

    def split_at(t: int) -> tuple[str, float]:
        v = manifest["val_tokens"]
        return ("val", v) if t < v else ("train", math.inf)

    held: list[Encoded] = []
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
