"""`prepare(sources, out_dir)`: validate the arguments -> resolve the split plan -> check the output
directory -> encode and write -> finish the manifest. The package docstring documents sources, the val
rule and resuming."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2.prepare.encode import TASK_CHARS, Encoded, default_workers, encode_task, iter_tasks, ordered_map
from gpt2.prepare.reading import PIECE_BYTES
from gpt2.prepare.sources import PRESETS, Source
from gpt2.prepare.split import CUT_STREAM, SplitPlan, split_plan, write_stream
from gpt2.prepare.writer import MANIFEST, Cursor, Writer, start_manifest, totals, write_manifest

DEFAULT_SHARD_TOKENS = 100_000_000
MAX_SHARD_TOKENS = 1 << 31  # the writer holds a shard in memory: 4 GB of uint16 at most
PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


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


@dataclass(frozen=True)
class _Options:
    """prepare's arguments with the preset and the defaults applied."""

    sources: list[str]
    out_dir: Path
    shard_tokens: int
    val_sources: list[str] | None
    val_tokens: int | None
    val_fraction: float | None
    text_field: str
    split: str
    prefix: str
    workers: int
    piece_bytes: int
    task_chars: int


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
    """Tokenize `sources` into `out_dir` (see the package docstring for sources, the val rule and resuming).

    progress: a tqdm-like object (update(n_tokens), set_postfix_str(text)); log: receives one-line notes;
    on_shard: called with each finished shard's manifest record. Raises ValueError / FileNotFoundError /
    FileExistsError with one line for inputs a user can fix."""
    t0 = time.perf_counter()
    opts = _options(  # the settings (all but overwrite and the callbacks), in this signature's order
        sources, out_dir, shard_tokens, val_sources, val_tokens, val_fraction, text_field, split, prefix, workers,
        piece_bytes, task_chars,
    )  # fmt: skip
    plan = split_plan(
        opts.sources, opts.val_sources, opts.val_tokens, opts.val_fraction, text_field=opts.text_field, split=opts.split
    )
    manifest, complete = start_manifest(opts.out_dir, _settings(opts, plan), overwrite, log)
    resumed = len(manifest["shards"])
    if complete:
        return _result(opts.out_dir, manifest, t0, 0, resumed=resumed, already_done=True)
    writer = Writer(opts.out_dir, opts.prefix, opts.shard_tokens, manifest, on_shard)
    _encode_and_write(writer, plan, opts, progress)
    _finish(writer, log)
    return _result(opts.out_dir, manifest, t0, writer.written_now, resumed=resumed)


def _options(
    sources: list[str],
    out_dir: str | Path | None,
    shard_tokens: int | None,
    val_sources: list[str] | None,
    val_tokens: int | None,
    val_fraction: float | None,
    text_field: str,
    split: str,
    prefix: str | None,
    workers: int | None,
    piece_bytes: int,
    task_chars: int,
    /,
) -> _Options:
    """The arguments with a preset (the only source) expanded and the defaults filled in, checked."""
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
    opts = _Options(
        sources=sources,
        out_dir=Path(out_dir).expanduser(),
        shard_tokens=DEFAULT_SHARD_TOKENS if shard_tokens is None else int(shard_tokens),
        val_sources=val_sources,
        val_tokens=val_tokens,
        val_fraction=val_fraction,
        text_field=text_field,
        split=split,
        prefix="shard" if prefix is None else prefix,
        workers=default_workers() if workers is None else int(workers),
        piece_bytes=piece_bytes,
        task_chars=task_chars,
    )
    _check(opts)
    return opts


def _check(opts: _Options) -> None:
    """One-line ValueErrors for settings out of range or given together where they exclude each other."""
    if not 1 <= opts.shard_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(
            f"shard_tokens must be in 1..{MAX_SHARD_TOKENS:,} (a shard is built in memory), got {opts.shard_tokens:,}"
        )
    if not PREFIX.fullmatch(opts.prefix):
        raise ValueError(
            f"prefix {opts.prefix!r} must be letters, digits, '.' or '-' (no '_', which separates the split)"
        )
    by_tokens = opts.val_tokens is not None or opts.val_fraction is not None
    if opts.val_tokens is not None and opts.val_fraction is not None:
        raise ValueError("give val_tokens or val_fraction, not both")
    if opts.val_sources is not None and by_tokens:
        raise ValueError("give val sources or val_tokens/val_fraction, not both")
    if opts.val_tokens is not None and opts.val_tokens < 0:
        raise ValueError(f"val_tokens must be >= 0, got {opts.val_tokens}")
    if opts.val_fraction is not None and not 0.0 <= opts.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.workers < 1:
        raise ValueError(f"workers must be >= 1, got {opts.workers}")
    if opts.piece_bytes < 2:
        raise ValueError(f"piece_bytes must be >= 2, got {opts.piece_bytes}")


def _settings(opts: _Options, plan: SplitPlan) -> dict[str, Any]:
    """What the output depends on besides the tokenizer, in the form it has when read back from the manifest."""
    settings = {
        "streams": [{"split": name, "sources": [s.describe() for s in srcs]} for name, srcs in plan.streams],
        "val": plan.val_rule,
        "shard_tokens": opts.shard_tokens,
        "prefix": opts.prefix,
        "piece_bytes": opts.piece_bytes,
    }
    return json.loads(json.dumps(settings))


def _encode_and_write(writer: Writer, plan: SplitPlan, opts: _Options, progress: Any) -> None:
    """Encode each stream not finished yet and feed it to the writer; an output directory this call
    created is removed again if nothing was written into it."""
    out_dir = opts.out_dir
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in out_dir.glob(".*.tmp"):  # leftovers of an interrupted write
        p.unlink()
    try:
        for index in range(writer.cursor.stream, len(plan.streams)):
            name, srcs = plan.streams[index]
            with closing(_encoded_stream(srcs, writer.cursor, opts, progress)) as encoded:
                write_stream(writer, name, encoded, writer.manifest, plan.val_rule)
            if writer.cursor.tokens == 0:
                labels = ", ".join(s.label for s in srcs)
                what = "sources" if name == CUT_STREAM else f"{name} sources"
                raise ValueError(f"no text in the {what} ({labels}); check the files and --text-field")
            writer.end_stream(index + 1)
    finally:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # nothing was written: leave no trace


def _encoded_stream(srcs: list[Source], cursor: Cursor, opts: _Options, progress: Any) -> Iterator[Encoded]:
    """One stream's encoded chunks from `cursor` on (in input order), reported to `progress`."""
    docs_seen = cursor.docs
    tasks = iter_tasks(srcs, cursor.unit, opts.piece_bytes, opts.task_chars)
    for i, e in enumerate(ordered_map(encode_task, tasks, opts.workers)):
        if i == 0 and cursor.offset:  # resume inside a unit: drop its tokens already written
            _drop_written(e, cursor, opts.out_dir)
        docs_seen += int(e.docs.sum())
        if progress is not None:
            progress.update(int(e.tokens.size))
            progress.set_postfix_str(f"{docs_seen:,} docs", refresh=False)
        yield e


def _drop_written(e: Encoded, cursor: Cursor, out_dir: Path) -> None:
    """Remove from e, the first chunk after a resume, the cursor.offset tokens of its first unit already written."""
    if e.first_unit != cursor.unit or e.lens[0] < cursor.offset:
        raise ValueError(f"{out_dir}/{MANIFEST} does not match the input; rerun with --overwrite")
    e.tokens = e.tokens[cursor.offset :]
    e.lens[0] -= cursor.offset
    e.docs[0] = False
    e.replaced[0] = 0
    e.first_offset = cursor.offset


def _finish(writer: Writer, log: Callable[[str], None] | None) -> None:
    """Record the totals and mark the manifest complete, refusing an output with no train tokens."""
    manifest = writer.manifest
    done = totals(manifest["shards"], writer.cursor)
    if done["train_tokens"] == 0:
        raise ValueError(
            f"all {done['tokens']:,} tokens went to the val split, none to train; "
            "lower --val-tokens/--val-fraction and rerun with --overwrite"
        )
    manifest["complete"] = True
    manifest["totals"] = done
    write_manifest(writer.out_dir, manifest)
    if log is not None and done["replaced"]:
        log(f"replaced {done['replaced']:,} undecodable UTF-8 sequence(s) with U+FFFD")


def _result(
    out_dir: Path, manifest: dict, t0: float, written: int, *, resumed: int, already_done: bool = False
) -> PrepareResult:
    counts = manifest["totals"]
    seconds = time.perf_counter() - t0
    return PrepareResult(
        out_dir=out_dir,
        shards=[r["name"] for r in manifest["shards"]],
        train_tokens=counts["train_tokens"],
        val_tokens=counts["val_tokens"],
        docs=counts["docs"],
        replaced=counts["replaced"],
        seconds=seconds,
        tokens_per_second=written / seconds if seconds > 0 else 0.0,
        resumed_shards=resumed,
        already_done=already_done,
    )
