"""Parallel encoding: units grouped into tasks, tokenized by worker processes, results consumed in input
order (so the output never depends on the number of workers or on timing)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpt2.prepare.reading import decode, text_of, units
from gpt2.prepare.sources import Source
from gpt2.tokenizer import EOT_ID, encoding

TASK_CHARS = 2 << 20  # text per worker task: large enough to amortize IPC, small enough to balance load
_EOT = np.array([EOT_ID], dtype=np.uint32)


@dataclass
class Task:
    """Consecutive units of one kind from one source, numbered from first_unit in their stream."""

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
class Encoded:
    """Tokens of consecutive units; per unit: token count, whether it started a document, bytes replaced."""

    first_unit: int
    tokens: np.ndarray  # (n,) uint16
    lens: np.ndarray  # (units,) int64
    docs: np.ndarray  # (units,) bool
    replaced: np.ndarray  # (units,) int64
    first_offset: int = 0  # tokens of the first unit dropped (already written before a resume)


def iter_tasks(sources: list[Source], skip_units: int, piece_bytes: int, task_chars: int) -> Iterator[Task]:
    """Units of the sources, numbered through the stream, grouped into tasks; the first skip_units are skipped."""
    unit = 0
    for source in sources:
        task: Task | None = None
        for kind, payload, starts, line_no, bad in units(source, piece_bytes):
            if unit < skip_units:  # resuming: finished units are read but not encoded
                unit += 1
                continue
            if task is not None and (task.kind != kind or task.chars >= task_chars):
                yield task
                task = None
            if task is None:
                task = Task(kind, source.label, source.text_field, unit)
            task.items.append(payload)
            task.starts.append(starts)
            task.lines.append(line_no)
            task.replaced.append(bad)
            task.chars += len(payload)
            unit += 1
        if task is not None:
            yield task


def encode_task(task: Task) -> Encoded:
    """Runs in a worker: decode, parse and tokenize one task's units."""
    enc = encoding()
    n = len(task.items)
    lens = np.zeros(n, dtype=np.int64)
    docs = np.zeros(n, dtype=np.bool_)
    replaced = np.array(task.replaced, dtype=np.int64)
    parts: list[np.ndarray] = []
    for i, item in enumerate(task.items):
        text, bad = _unit_text(task, i, item)
        replaced[i] += bad
        if not text:
            continue
        if task.starts[i]:
            parts.append(_EOT)
            docs[i] = True
        ids = _encode_ordinary(enc, text)
        parts.append(ids)
        lens[i] = ids.size + docs[i]
    tokens = np.concatenate(parts).astype(np.uint16) if parts else np.zeros(0, dtype=np.uint16)
    return Encoded(task.first_unit, tokens, lens, docs, replaced)


def _unit_text(task: Task, i: int, item: Any) -> tuple[str, int]:
    """The document text of unit i of a task ("" for a blank line), and the sequences replaced decoding it."""
    bad = 0
    if task.kind == "bytes":
        return decode(item)
    if task.kind not in ("line", "json-line"):
        return item, bad
    if task.kind == "line":
        item, bad = decode(item)
    if not item.strip():
        return "", bad
    where = f"{task.label} line {task.lines[i]}"
    try:
        obj = json.loads(item)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg}); fix or remove that line") from None
    return text_of(obj, task.text_field, where), bad


def _encode_ordinary(enc: Any, text: str) -> np.ndarray:
    """enc.encode_ordinary(text) as a uint32 array; tiktoken >= 0.7 writes it straight into a buffer, which
    skips building a python list of ints. With no special token allowed, and none disallowed, encode treats
    "<|endoftext|>" as ordinary text, exactly like encode_ordinary (checked in tests)."""
    if hasattr(enc, "encode_to_numpy"):
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    return np.array(enc.encode_ordinary(text), dtype=np.uint32)


def ordered_map(fn: Callable[[Task], Encoded], tasks: Iterator[Task], workers: int) -> Iterator[Encoded]:
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
