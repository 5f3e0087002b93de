"""The run directory and its checkpoints: where everything of a training run lives, and the one
rule for what makes a checkpoint complete. Every tool (train, resume, export, generate, eval) asks
this module; nothing else knows these names.

    RUN_DIR/
        train_config.json           the resolved TrainingConfig of the run
        run.json                    the current checkpoint (gpt2.checkpoint.history)
        metrics.jsonl               one JSON record per step, evaluation and event (gpt2.training.metrics)
        tensorboard/                TensorBoard events (optional)
        data/                       shards of `--data FILE`, tokenized at the run's first start;
                                    data/source.json: the size and sha256 of the file they hold
        checkpoints/
            step_00000500/          the state after 500 optimizer steps

    step_00000500/
        config.json                 the model's HF config (its shape)
        model.safetensors           weights in HF layout, written by one process ...
        .metadata, __R_0.distcp     ... or weights and optimizer as DCP shards, written by every rank (FSDP)
        trainer_state.pt            optimizer (HF-format checkpoints), data-loader position, RNG states, step
        train_config.json           the resolved TrainingConfig
        checkpoint.json             written last: every other file's size and sha256

A checkpoint is built under a hidden name (`.step_00000500.tmp`) and renamed when complete, so a
crash mid-save leaves the earlier ones as they were; hidden names are never checkpoints. Loading
verifies the files it reads against checkpoint.json (streaming sha256, about a second per GB), so a
damaged checkpoint is named, with the newest intact one, instead of being trained on or skipped.
Checkpoints written before checkpoint.json existed are checked for their files only; a checkpoint
whose trainer_state.pt is marked `sealed` (all since) without its checkpoint.json is incomplete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpt2.fileio import atomic_write_json, remove_dir, sha256_file
from gpt2.hf import CONFIG_FILE, WEIGHTS_FILE  # the model's two files: HF format's names

CHECKPOINTS = "checkpoints"
TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
RUN_STATE = "run.json"
STATE_FILE = "trainer_state.pt"
SHARDED_INDEX = ".metadata"  # DCP's index: its presence marks a sharded checkpoint
MANIFEST = "checkpoint.json"
MANIFEST_FORMAT = 1
SEALED = "sealed"  # trainer_state.pt's mark of a checkpoint written with a checkpoint.json
_NAME = re.compile(r"step_(\d{8,})")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file. Lines that are not records are skipped: a torn last line from
    a killed run, and anything else that is not a JSON object (an edit, bytes that are not UTF-8)."""
    lines = Path(path).read_bytes().splitlines()
    return [record for record in map(parse_record, lines) if record is not None]


def parse_record(line: bytes) -> dict[str, Any] | None:
    """One metrics.jsonl line as its record, or None when it is not a JSON object."""
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return None
    return record if isinstance(record, dict) else None


def checkpoint_name(step: int) -> str:
    """step_00000500 for the checkpoint taken after 500 optimizer steps."""
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The optimizer steps a checkpoint directory holds, from its name."""
    match = _NAME.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like step_00000500)")
    return int(match.group(1))


def is_sharded(ckpt: Path) -> bool:
    """Whether `ckpt` holds DCP shards (FSDP) rather than one model.safetensors."""
    return (Path(ckpt) / SHARDED_INDEX).is_file()


def missing_files(ckpt: Path) -> list[str]:
    """The files a complete checkpoint has and `ckpt` lacks (empty: complete). The one rule: the
    files its checkpoint.json lists, or, for checkpoints older than checkpoint.json, the four names
    (and checkpoint.json itself when trainer_state.pt is marked sealed)."""
    ckpt = Path(ckpt)
    manifest = _read_manifest(ckpt)
    if manifest is not None:
        names = list(manifest)
    else:
        names = [CONFIG_FILE, SHARDED_INDEX if is_sharded(ckpt) else WEIGHTS_FILE, STATE_FILE, TRAIN_CONFIG]
    missing = [name for name in names if not (ckpt / name).is_file()]
    if manifest is None and not missing and _sealed(ckpt):
        missing.append(MANIFEST)  # written with one, so it is incomplete, not old
    return missing


def _sealed(ckpt: Path) -> bool:
    """Whether trainer_state.pt says a checkpoint.json was written with it (an unreadable one: assume so)."""
    import torch

    try:
        state = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return True
    return not isinstance(state, dict) or bool(state.get(SEALED))


class DamagedCheckpointError(ValueError):
    """A checkpoint lacks a file, or a file does not match its checkpoint.json."""


def check_checkpoint(ckpt: Path, names: Iterable[str] | None = None, *, full: bool = True) -> None:
    """Raise DamagedCheckpointError (one line, naming the file) unless `ckpt` is complete and the files
    `names` (default: all) match their recorded size and, with full=True, their sha256."""
    ckpt = Path(ckpt)
    missing = missing_files(ckpt)
    if not ckpt.is_dir() or missing:
        what = "does not exist" if not ckpt.is_dir() else f"lacks {missing[0]}"
        raise DamagedCheckpointError(f"checkpoint {ckpt} {what}")
    manifest = _read_manifest(ckpt) or {}
    for name in manifest if names is None else names:
        record = manifest.get(name)
        if record is None:
            continue
        path = ckpt / name
        if path.stat().st_size != record["bytes"]:
            raise DamagedCheckpointError(
                f"{path} has {path.stat().st_size:,} bytes, checkpoint.json says {record['bytes']:,}: it is damaged"
            )
        if full and sha256_file(path) != record["sha256"]:
            raise DamagedCheckpointError(f"{path} does not match its sha256 in checkpoint.json: it is damaged")


def newest_intact(run_dir: Path, *, before: int | None = None) -> Path | None:
    """The newest checkpoint of a run (older than step `before`, if given) that passes a full check."""
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        if before is not None and checkpoint_step(ckpt) >= before:
            continue
        try:
            check_checkpoint(ckpt)
        except (DamagedCheckpointError, OSError, ValueError):
            continue
        return ckpt
    return None


def damaged_message(ckpt: Path, problem: str) -> str:
    """The one-line error for a damaged checkpoint: what is wrong, and which older one is intact."""
    run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else None
    intact = newest_intact(run_dir, before=checkpoint_step(ckpt)) if run_dir is not None else None
    if intact is None:
        return f"{problem}; no older intact checkpoint in this run"
    return (
        f"{problem}; the newest intact checkpoint is {intact}: load it with --model {intact}, or continue "
        f"training from it with gpt2 train --resume {intact} (the newer ones are moved aside, not deleted)"
    )


def verified(ckpt: Path, names: Iterable[str] | None = None) -> Path:
    """`ckpt`, after check_checkpoint; on damage a one-line DamagedCheckpointError naming the newest
    intact checkpoint of the run."""
    try:
        check_checkpoint(ckpt, names)
    except DamagedCheckpointError as e:
        raise DamagedCheckpointError(damaged_message(Path(ckpt), str(e))) from None
    return Path(ckpt)


def seal_checkpoint(directory: Path) -> None:
    """Write checkpoint.json into a checkpoint being built: the size and sha256 of every file in it,
    so loading can tell a damaged file. Call it last, just before the directory is published."""
    files = {}
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and path.name != MANIFEST and not path.name.endswith(".tmp"):
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    atomic_write_json(Path(directory) / MANIFEST, {"format": MANIFEST_FORMAT, "files": files})


def _read_manifest(ckpt: Path) -> dict[str, dict] | None:
    """The files checkpoint.json lists (None for checkpoints written before it existed)."""
    path = Path(ckpt) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return dict(manifest["files"])
    except (ValueError, KeyError, TypeError):
        raise DamagedCheckpointError(f"{path} is not a valid checkpoint manifest: the checkpoint is damaged") from None


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a training run's directory (checkpoints/, run.json or metrics.jsonl in it; a
    checkpoint has a train_config.json too, so that file alone does not make a run)."""
    path = Path(path)
    return (path / CHECKPOINTS).is_dir() or (path / RUN_STATE).is_file() or (path / METRICS).is_file()


def part_of_run(path: Path) -> str | None:
    """Why writing a model into `path` would change a training run or a checkpoint ("is a training run
    directory", ...; None: it would not): a run directory, anything in a run's checkpoints/, a checkpoint."""
    path = Path(path).expanduser().resolve()
    if is_run_dir(path):
        return "is a training run directory"
    for folder in (path, *path.parents):
        if folder.name == CHECKPOINTS and is_run_dir(folder.parent):
            return f"is inside the checkpoints of the run {folder.parent}"
    if (path / MANIFEST).is_file() or (path / STATE_FILE).is_file():
        return "is a training checkpoint"
    return None


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint directory (by name) with all its files."""
    path = Path(path)
    return path.is_dir() and _NAME.fullmatch(path.name) is not None and not missing_files(path)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every step_* directory of a run's live timeline, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)), key=checkpoint_step)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return [p for p in checkpoint_dirs(run_dir) if not missing_files(p)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's current checkpoint: its newest one, or None before the first. A newest checkpoint
    that lacks a file is an error naming the newest intact one (never silently skipped)."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        return None
    missing = missing_files(dirs[-1])
    if missing:
        raise DamagedCheckpointError(damaged_message(dirs[-1], f"checkpoint {dirs[-1]} lacks {missing[0]}"))
    return dirs[-1]


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint PATH means: PATH itself if it is a checkpoint directory, else the run PATH's current one."""
    path = Path(path).expanduser()
    if path.is_dir() and _NAME.fullmatch(path.name) and path.parent.name == CHECKPOINTS:
        missing = missing_files(path)
        if missing:
            raise DamagedCheckpointError(damaged_message(path, f"checkpoint {path} lacks {missing[0]}"))
        return path
    return latest_checkpoint(path)


def prune_checkpoints(run_dir: Path, keep_last_k: int) -> list[Path]:
    """Delete all complete checkpoints but the newest keep_last_k (0 keeps all); return the deleted paths."""
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep_last_k] if keep_last_k > 0 else []
    for path in doomed:
        remove_dir(path)
    return doomed
