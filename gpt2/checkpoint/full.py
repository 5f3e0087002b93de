"""HF-format training checkpoints, written by one process: the model as config.json +
model.safetensors and the tokenizer files (so GPT.from_pretrained, `gpt2 generate --model`,
transformers' AutoModel/AutoTokenizer and `lm_eval --model hf` load it as it is), trainer_state.pt
(plain tensors, dicts and lists, read with weights_only=True) and the training config. The
directory layout and the completeness rule are gpt2.checkpoint.layout's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2.checkpoint.layout import (
    CHECKPOINTS,
    SEALED,
    STATE_FILE,
    TRAIN_CONFIG,
    checkpoint_name,
    prune_checkpoints,
    seal_checkpoint,
)
from gpt2.config import GPTConfig
from gpt2.fileio import atomic_write, atomic_write_json, fresh_tmp_dir, publish_dir, read_json_object
from gpt2.hf import load_state_dict_checked, read_config, read_weights, save_pretrained, state_dict_from_hf

STATE_FORMAT = 1


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    trainer_state: dict[str, Any],
    train_config: dict[str, Any],
    *,
    keep_last_k: int = 0,
) -> Path:
    """Write RUN_DIR/checkpoints/step_XXXXXXXX atomically; then delete all but the newest keep_last_k
    (0 keeps all). `model` must be the plain GPT (not DDP-wrapped or compiled). Returns the directory."""
    final = Path(run_dir) / CHECKPOINTS / checkpoint_name(step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_tmp_dir(final)
    try:
        save_pretrained(model, tmp)  # with the tokenizer files: AutoTokenizer reads a checkpoint
        state = {"format": STATE_FORMAT, "step": step, **trainer_state, SEALED: True}
        write_trainer_files(tmp, state, train_config)
        seal_checkpoint(tmp)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last_k > 0:
        prune_checkpoints(run_dir, keep_last_k)
    return final


def write_trainer_files(directory: Path, trainer_state: dict[str, Any], train_config: dict[str, Any]) -> None:
    """trainer_state.pt and train_config.json of a checkpoint being built in `directory`."""
    atomic_write(directory / STATE_FILE, lambda tmp: torch.save(trainer_state, tmp))
    atomic_write_json(directory / TRAIN_CONFIG, train_config)


def load_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    """trainer_state.pt of a checkpoint, read without unpickling code (weights_only=True)."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {ckpt_dir} is not a training checkpoint (it cannot be resumed)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} could not be read safely ({type(e).__name__}); the checkpoint is corrupt") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} has format {found!r}; this gpt2 reads format {STATE_FORMAT}")
    return state


def load_train_config(ckpt_dir: Path) -> dict[str, Any]:
    """The resolved training config saved with a checkpoint."""
    path = Path(ckpt_dir) / TRAIN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {ckpt_dir} is not a training checkpoint")
    return read_json_object(path, "the checkpoint is corrupt")


def checkpoint_model_config(ckpt_dir: Path) -> GPTConfig:
    """The GPTConfig of a checkpoint's weights (from its config.json)."""
    return read_config(Path(ckpt_dir))


def load_weights(model: nn.Module, ckpt_dir: Path) -> None:
    """Copy an HF-format checkpoint's weights into the GPT `model` (same config), exactly
    (safetensors keeps every bit)."""
    device = next(model.parameters()).device
    sd = state_dict_from_hf(read_weights(Path(ckpt_dir)))
    load_state_dict_checked(model, {k: v.to(device) for k, v in sd.items()}, str(ckpt_dir))
