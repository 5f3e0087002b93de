"""How the model is spread over the processes, decided once: the loop calls these methods and has
no `if fsdp` of its own (the habit of litgpt's strategies and torchtitan's parallelize).

    Replicate  one process, or DDP over N: every rank holds the whole model; gradients are
               all-reduced on the last micro-step only (no_sync on the others); rank 0 writes
               HF-format checkpoints.
    Shard      FSDP2 over N: each rank holds 1/N of the parameters, gradients and optimizer state;
               every rank writes its part of a sharded (DCP) checkpoint.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2.checkpoint import CHECKPOINTS, TRAIN_CONFIG, checkpoint_name, is_sharded
from gpt2.distributed import DistInfo, barrier
from gpt2.model import GPT


@dataclass
class Snapshot:
    """What a checkpoint holds: the state after `step` optimizer updates."""

    step: int
    model: GPT  # the plain (unwrapped) model
    optimizer: torch.optim.Optimizer
    trainer_state: dict[str, Any]  # gpt2.training.state.TrainerState.state_dict
    train_config: dict[str, Any]


class Replicate:
    """The whole model on every rank: a plain module on one process, DDP on several."""

    name = "ddp"
    shares_evaluation = True  # each rank scores its share of the HellaSwag examples

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.ddp: nn.Module | None = None

    def prepare(self, model: GPT, *, compile: bool, amp_dtype: torch.dtype | None) -> GPT:
        """Before the optimizer is built: nothing to do when the whole model is replicated."""
        return model

    def wrap(self, model: GPT, *, compile: bool) -> nn.Module:
        """The module the training step calls: compiled first, then DDP-wrapped (nanoGPT's order).
        Evaluation and sampling keep using `model` itself: no second compilation for eval mode and
        its shapes, no DDP hooks; checkpoints come from it, so they carry no `_orig_mod.`/`module.`.
        Static shapes: training's only change of shape is a sequence-length warmup's few lengths, each
        compiled once as its own graph (dynamo would otherwise compile the full length as a dynamic one)."""
        train_model: nn.Module = torch.compile(model, dynamic=False) if compile else model
        if self.info.distributed and self.info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device = self.info.device
            self.ddp = DistributedDataParallel(
                train_model, device_ids=[device.index] if device.type == "cuda" else None
            )
            train_model = self.ddp
        return train_model

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients in backward; only the last micro-step of an accumulation needs that."""
        if self.ddp is None or last_micro_step:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def save(self, run_dir: Path, snap: Snapshot) -> Path | None:
        """Rank 0 writes the HF-format checkpoint (the optimizer state inside trainer_state.pt); every
        rank waits, so none leaves (and lets torchrun tear down the group) before the save is done."""
        from gpt2.checkpoint import save_checkpoint

        path = None
        if self.info.is_main:
            state = {**snap.trainer_state, "optimizer": snap.optimizer.state_dict()}
            path = save_checkpoint(run_dir, snap.step, snap.model, state, snap.train_config)
        barrier()
        return path

    def load(self, ckpt: Path, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Weights and optimizer state from `ckpt` into this rank's model; returns the trainer state.
        A sharded checkpoint loads too: each rank reads it whole."""
        if is_sharded(ckpt):
            from gpt2.fsdp import load_sharded

            return load_sharded(ckpt, model, optimizer)
        from gpt2.checkpoint import load_trainer_state, load_weights

        state = load_trainer_state(ckpt)
        load_weights(model, ckpt)
        optimizer.load_state_dict(state["optimizer"])
        return state

    def sampling_model(self, model: GPT) -> GPT | None:
        """The plain model rank 0 samples from (None on the other ranks); every rank calls it."""
        return model if self.info.is_main else None


class Shard(Replicate):
    """FSDP2: each Block (and the root: embeddings, ln_f, tied head) sharded over all ranks."""

    name = "fsdp"
    shares_evaluation = False  # every rank runs the same forwards (they gather parameters together)

    def __init__(self, info: DistInfo, *, activation_checkpointing: bool) -> None:
        super().__init__(info)
        self.activation_checkpointing = activation_checkpointing

    def prepare(self, model: GPT, *, compile: bool, amp_dtype: torch.dtype | None) -> GPT:
        """Shard before the optimizer is built, so it holds the sharded parameters. Compiling is per
        Block, before sharding, so FSDP's hooks stay outside the compiled graphs."""
        from gpt2.fsdp import shard_model

        if compile:
            for block in model.transformer.h:
                block.compile()
        return shard_model(
            model, mixed_precision=amp_dtype == torch.bfloat16, activation_checkpointing=self.activation_checkpointing
        )

    def wrap(self, model: GPT, *, compile: bool) -> nn.Module:
        return model  # compiled per Block in prepare; FSDP's hooks do the communication

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # gradients are reduce-scattered on every micro-step

    def save(self, run_dir: Path, snap: Snapshot) -> Path | None:
        """Every rank writes its shard; rank 0 the metadata, trainer state and the final rename."""
        from torch.distributed.checkpoint.api import CheckpointException

        from gpt2.fileio import WriteError, as_write_error
        from gpt2.fsdp import save_sharded

        final = Path(run_dir) / CHECKPOINTS / checkpoint_name(snap.step)
        json_files = {TRAIN_CONFIG: snap.train_config}
        try:
            return save_sharded(final, snap.model, snap.optimizer, snap.trainer_state, json_files=json_files)
        except CheckpointException as e:  # a BaseException wrapping each failed rank's error
            failures = [as_write_error(final, pair[0]) for pair in e.failures.values()]
            raise next((f for f in failures if f is not None), WriteError(final, "a rank's write failed")) from None

    def load(self, ckpt: Path, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not is_sharded(ckpt):
            raise ValueError(f"{ckpt} was saved by a ddp run; resume it with --parallelism ddp")
        from gpt2.fsdp import load_sharded

        return load_sharded(ckpt, model, optimizer)

    def sampling_model(self, model: GPT) -> GPT | None:
        """A plain copy gathered on rank 0 (a collective: every rank takes part)."""
        from gpt2.fsdp import gather_full_model

        full = gather_full_model(model)
        return full.to(self.info.device) if full is not None else None


def make_strategy(parallelism: str, info: DistInfo, *, activation_checkpointing: bool = False) -> Replicate:
    """The strategy for `--parallelism` on this process group."""
    if parallelism == "fsdp":
        if not info.distributed:
            raise ValueError("parallelism fsdp needs torchrun (even --nproc_per_node=1)")
        return Shard(info, activation_checkpointing=activation_checkpointing)
    return Replicate(info)
