"""A run directory's history: one writer at a time, one live timeline, and nothing ever lost.

    RUN_DIR/run.json        {"format": 1, "current": "step_00000500" | null, "updated": time}: the
                            checkpoint the run continues from (null: started, no checkpoint yet)
    RUN_DIR/.lock           held (fcntl) by the one `gpt2 train` writing the run; pid and host inside
    RUN_DIR/checkpoints/abandoned-<time>/
                            a timeline left behind: the checkpoints newer than the one a resume
                            branched from, and their metrics.jsonl records and train_config.json
    RUN_DIR/failed-start-<time>/
                            what a start that died before its first checkpoint left (metrics,
                            config, TensorBoard events), moved aside when the run is started again

Resuming from a checkpoint older than the newest starts a new branch: the newer checkpoints move
into `abandoned-<time>/` (never deleted), so "the newest checkpoint" always means the live
timeline's, for resume, export, generate and eval alike. The same happens to metrics records of
steps after the checkpoint (a killed run's last steps are redone), so metrics.jsonl holds one
timeline. All of this runs only after the run has been fully validated and set up.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpt2.checkpoint.layout import (
    CHECKPOINTS,
    METRICS,
    RUN_STATE,
    TRAIN_CONFIG,
    checkpoint_dirs,
    checkpoint_step,
    parse_record,
)
from gpt2.fileio import atomic_write_bytes, atomic_write_json

LOCK_FILE = ".lock"
RUN_STATE_FORMAT = 1
LEFTOVERS = (METRICS, TRAIN_CONFIG, RUN_STATE, "tensorboard", "loss.png")  # what a failed start may leave


def read_run_state(run_dir: Path) -> dict[str, Any] | None:
    """run.json, or None when the run has none (not started by this version, or not a run)."""
    path = Path(run_dir) / RUN_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(
            f"{path} is not valid JSON; it records the run's current checkpoint, fix or remove it"
        ) from None
    return state if isinstance(state, dict) else None


def write_run_state(run_dir: Path, current: Path | None) -> None:
    """Record `current` (a checkpoint directory, or None before the first) as the run's current checkpoint."""
    state = {"format": RUN_STATE_FORMAT, "current": current.name if current is not None else None}
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(Path(run_dir) / RUN_STATE, state)


def failed_start(run_dir: Path) -> bool:
    """Whether run_dir holds only what a start that died before its first checkpoint left."""
    state = read_run_state(run_dir)
    return state is not None and state.get("current") is None and not checkpoint_dirs(run_dir)


def holds_run(run_dir: Path) -> bool:
    """Whether run_dir already holds a training run (we never start a new one over it). A failed
    start (no checkpoint yet, run.json says so) does not count: rerunning the command starts afresh."""
    run_dir = Path(run_dir)
    if checkpoint_dirs(run_dir):
        return True
    if failed_start(run_dir):
        return False
    return any((run_dir / name).exists() for name in (CHECKPOINTS, METRICS, TRAIN_CONFIG))


def stamp() -> str:
    """A sortable local time for names of moved-aside things: 20261201-213005."""
    return time.strftime("%Y%m%d-%H%M%S")


def _unique(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def set_aside_failed_start(run_dir: Path) -> Path | None:
    """Move a failed start's leftovers into failed-start-<time>/; returns that directory (or None)."""
    run_dir = Path(run_dir)
    present = [name for name in LEFTOVERS if (run_dir / name).exists()]
    if not present:
        return None
    side = _unique(run_dir / f"failed-start-{stamp()}")
    side.mkdir()
    for name in present:
        os.rename(run_dir / name, side / name)
    return side


def begin_timeline(run_dir: Path, start_step: int, log: Callable[[str], None]) -> Path | None:
    """Make the live timeline end at `start_step` before a run (re)starts there: newer checkpoints and
    the metrics records of later steps move into checkpoints/abandoned-<time>/ (with the config they
    were trained with). Returns that directory, or None when nothing was newer (continuing from the
    newest checkpoint, e.g. to extend a finished run, moves nothing)."""
    run_dir = Path(run_dir)
    newer = [c for c in checkpoint_dirs(run_dir) if checkpoint_step(c) > start_step]
    kept, moved = _split_metrics(run_dir / METRICS, start_step)
    if not newer and not moved:
        return None
    side = _unique(run_dir / CHECKPOINTS / f"abandoned-{stamp()}")
    side.mkdir(parents=True)
    for ckpt in newer:
        os.rename(ckpt, side / ckpt.name)
    if (run_dir / TRAIN_CONFIG).is_file():
        shutil.copy2(run_dir / TRAIN_CONFIG, side / TRAIN_CONFIG)
    kind = "branch" if newer else "redo"
    if moved:
        atomic_write_bytes(side / METRICS, b"".join(moved))
        event = {"type": "event", "event": kind, "step": start_step, "abandoned": str(side.relative_to(run_dir))}
        atomic_write_bytes(run_dir / METRICS, b"".join([*kept, json.dumps(event).encode() + b"\n"]))
    if newer:
        log(
            f"new branch from step {start_step}: moved {len(newer)} newer checkpoint(s) ({newer[0].name} .. "
            f"{newer[-1].name}) and {len(moved)} metrics record(s) of later steps to {side}"
        )
    else:
        log(
            f"continuing from step {start_step}: {len(moved)} metrics record(s) of later steps "
            f"(redone now) moved to {side}"
        )
    return side


def _split_metrics(path: Path, start_step: int) -> tuple[list[bytes], list[bytes]]:
    """metrics.jsonl's lines as (the timeline up to start_step, the records of later steps). A train
    record of step s is the update s -> s+1, redone after a resume from s; an evaluation at step s is of
    the weights after s updates, the checkpoint's own, so it stays. Lines that are not records (a torn
    last line, or anything else) stay where they are, byte for byte."""
    if not path.is_file():
        return [], []
    kept, moved = [], []
    for line in path.read_bytes().splitlines(keepends=True):
        record = parse_record(line)
        step = record.get("step") if record is not None else None
        later = isinstance(step, int) and (step >= start_step if record.get("type") == "train" else step > start_step)
        (moved if later else kept).append(line if line.endswith(b"\n") else line + b"\n")
    return kept, moved


class RunLock:
    """The exclusive right to write a run directory, held for a whole `gpt2 train` (fcntl.flock on
    RUN_DIR/.lock). The kernel releases it when the process ends, however it ends, so a lock left by
    a killed run is never stale. Where flock is unavailable (Windows) the run is not locked. On a
    network filesystem flock works where the filesystem supports it (NFSv4, Lustre with flock)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open while the lock is held)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(
                f"{self.path.parent} is being written by another gpt2 train ({holder}); wait for it to end, "
                "or stop it (Ctrl-C saves a checkpoint) and resume"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RunLockedError(RuntimeError):
    """Another process is writing this run directory."""
