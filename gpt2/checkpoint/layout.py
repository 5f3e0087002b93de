"""The run directory and its checkpoints: where everything of a training run lives, and the one
rule for what makes a checkpoint complete. Every tool (train, resume, export, generate, eval) asks
this module; nothing else knows these names.

    RUN_DIR/
        train_config.json           the resolved TrainingConfig of the run
        metrics.jsonl               one JSON record per step, evaluation and event (gpt2.metrics)
        tensorboard/                TensorBoard events (optional)
        data/                       shards of `--data FILE`, tokenized at the run's first start
        checkpoints/
            step_00000500/          the state after 500 optimizer steps

    step_00000500/
        config.json                 the model's HF config (its shape)
        model.safetensors           weights in HF layout, written by one process ...
        .metadata, __R_0.distcp     ... or weights and optimizer as DCP shards, written by every rank (FSDP)
        trainer_state.pt            optimizer (HF-format checkpoints), data-loader position, RNG states, step
        train_config.json           the resolved TrainingConfig

A checkpoint is built under a hidden name (`.step_00000500.tmp`) and renamed when complete, so a
crash mid-save leaves the earlier ones as they were; hidden names are never checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path

from gpt2.fileio import remove_dir

CHECKPOINTS = "checkpoints"
TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
STATE_FILE = "trainer_state.pt"
MODEL_CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SHARDED_INDEX = ".metadata"  # DCP's index: its presence marks a sharded checkpoint
_NAME = re.compile(r"step_(\d{8,})")


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
    """The files a complete checkpoint has and `ckpt` lacks (empty: complete). The one rule."""
    ckpt = Path(ckpt)
    weights = SHARDED_INDEX if is_sharded(ckpt) else WEIGHTS
    return [name for name in (MODEL_CONFIG, weights, STATE_FILE, TRAIN_CONFIG) if not (ckpt / name).is_file()]


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a complete checkpoint directory."""
    path = Path(path)
    return path.is_dir() and _NAME.fullmatch(path.name) is not None and not missing_files(path)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every step_* directory of a run, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)), key=checkpoint_step)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return [p for p in checkpoint_dirs(run_dir) if not missing_files(p)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint PATH means: PATH itself if it is one, else the newest of the run PATH."""
    path = Path(path).expanduser()
    if is_checkpoint(path):
        return path
    return latest_checkpoint(path)


def holds_run(run_dir: Path) -> bool:
    """Whether run_dir already holds a training run (we never start a new one over it)."""
    return any((Path(run_dir) / name).exists() for name in (CHECKPOINTS, METRICS, TRAIN_CONFIG))


def prune_checkpoints(run_dir: Path, keep_last_k: int) -> list[Path]:
    """Delete all complete checkpoints but the newest keep_last_k (0 keeps all); return the deleted paths."""
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep_last_k] if keep_last_k > 0 else []
    for path in doomed:
        remove_dir(path)
    return doomed
