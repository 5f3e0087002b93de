"""Training checkpoints: one directory per step, written atomically, the last K kept.

    RUN_DIR/checkpoints/step_00000500/
        config.json, model.safetensors   HF format (gpt2.hf.save_pretrained): GPT.from_pretrained,
                                         `gpt2 generate --model` and transformers load it directly
        trainer_state.pt                 optimizer, grad scaler, data-loader position, RNG states,
                                         step: plain tensors/dicts/lists, read with weights_only=True
        train_config.json                the resolved TrainingConfig

A checkpoint is written into `checkpoints/.step_00000500.tmp` and renamed when complete, so a crash
or a kill mid-save leaves the previous checkpoints as they were; readers (gpt2.hf.latest_checkpoint)
only see complete `step_*` directories.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gpt2.config import GPTConfig
from gpt2.fileio import fsync_path, fsync_tree
from gpt2.hf import config_from_hf, latest_checkpoint, load_state_dict_checked, read_weights, save_pretrained
from gpt2.hf import state_dict_from_hf as _from_hf
from gpt2.model import GPT

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
STATE_FORMAT = 1


def checkpoint_name(step: int) -> str:
    """step_00000500 for the checkpoint taken after 500 optimizer steps."""
    return f"step_{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: GPT,
    trainer_state: dict[str, Any],
    train_config: dict[str, Any],
    *,
    keep_last_k: int = 0,
) -> Path:
    """Write RUN_DIR/checkpoints/step_XXXXXXXX atomically; then delete all but the newest keep_last_k
    (0 keeps all). `model` must be the plain GPT (not DDP-wrapped or compiled). Returns the directory."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final, tmp = root / name, root / f".{name}.tmp"
    if tmp.exists():  # left by a save that was killed
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_pretrained(model, tmp, tokenizer=False)
        torch.save({"format": STATE_FORMAT, "step": step, **trainer_state}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(train_config, indent=2) + "\n", encoding="utf-8")
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
        old = root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(root)
    if keep_last_k > 0:
        prune_checkpoints(run_dir, keep_last_k)
    return final


def prune_checkpoints(run_dir: Path, keep_last_k: int) -> list[Path]:
    """Delete all complete checkpoints but the newest keep_last_k; return the deleted paths."""
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep_last_k] if keep_last_k > 0 else []
    for path in doomed:
        # rename first so a half-deleted directory is never mistaken for a checkpoint
        trash = path.with_name(f".{path.name}.deleting")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file())


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint a --resume PATH means: PATH itself if it is one, else a run directory's newest."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None and (latest / STATE_FILE).is_file():
        return latest
    ckpts = list_checkpoints(path)  # latest_checkpoint may have skipped one without weights
    return ckpts[-1] if ckpts else None


def load_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    """trainer_state.pt of a checkpoint, read without unpickling code (weights_only=True)."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {ckpt_dir} is not a training checkpoint (it cannot be resumed)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} could not be read safely ({type(e).__name__}); the checkpoint is corrupt") from e
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} has format {state.get('format')!r}; this gpt2 reads format {STATE_FORMAT}")
    return state


def load_train_config(ckpt_dir: Path) -> dict[str, Any]:
    """The resolved training config saved with a checkpoint."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {ckpt_dir} is not a training checkpoint")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); the checkpoint is corrupt") from e


def checkpoint_model_config(ckpt_dir: Path) -> GPTConfig:
    """The GPTConfig of a checkpoint's weights (from its config.json)."""
    path = Path(ckpt_dir) / "config.json"
    try:
        return config_from_hf(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} not found; the checkpoint {ckpt_dir} is incomplete") from e


def load_weights(model: GPT, ckpt_dir: Path) -> None:
    """Copy a checkpoint's weights into `model` (same config), exactly (safetensors keeps every bit)."""
    sd = _from_hf(read_weights(Path(ckpt_dir)), model.config)
    with torch.no_grad():
        load_state_dict_checked(
            model, {k: v.to(model.transformer.wte.weight.device) for k, v in sd.items()}, str(ckpt_dir)
        )
