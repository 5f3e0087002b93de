"""How the model is spread over the processes, decided once: the loop calls these methods and has
no `if fsdp` of its own (the habit of litgpt's strategies and torchtitan's parallelize).

    Replicate  one process, or DDP over N: every rank holds the whole model; gradients are
               all-reduced on the last micro-step only (no_sync on the others); rank 0 writes
               HF-format checkpoints.
    Shard      FSDP2 over N: each rank holds 1/N of the parameters, gradients and optimizer state;
               every rank writes its part of a sharded (DCP) checkpoint (gpt2.checkpoint.sharded).

FSDP2 (`torch.distributed.fsdp.fully_shard`): DDP keeps the whole model, its gradients and AdamW's
two moments on every GPU, 16 bytes per parameter, 25 GB for gpt2-xl before any activation. FSDP2
keeps 1/N of each on each of N ranks and all-gathers one Block's weights just before that Block runs
(forward, and again in backward), then frees them; gradients are reduce-scattered so each rank
updates only its shard. The loss and the gradients are those of DDP up to float rounding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from gpt2.checkpoint import CHECKPOINTS, TRAIN_CONFIG, checkpoint_name, is_sharded
from gpt2.distributed import DistInfo, barrier, get_rank, get_world_size, is_distributed
from gpt2.model import GPT, unwrap_model

if TYPE_CHECKING:  # torch.distributed's FSDP modules are imported where they are used (Shard only)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy


@dataclass
class Snapshot:
    """What a checkpoint holds: the state after `step` optimizer updates."""

    step: int
    model: GPT  # the plain (unwrapped) model
    optimizer: torch.optim.Optimizer
    trainer_state: dict[str, Any]  # gpt2.training.state.TrainerState.state_dict
    train_config: dict[str, Any]


class ParallelStrategy(Protocol):
    """What the training loop asks of the way the model is spread over the processes."""

    name: str  # the --parallelism value
    shares_evaluation: bool  # whether each rank scores its own share of the evaluation examples

    def prepare(self, model: GPT, *, compile: bool, amp_dtype: torch.dtype | None) -> GPT:
        """The model the optimizer is built for (sharded, where the strategy shards)."""
        ...

    def wrap(self, model: GPT, *, compile: bool) -> nn.Module:
        """The module the training step calls."""
        ...

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-step's forward and backward (gradient synchronization)."""
        ...

    def save(self, run_dir: Path, snap: Snapshot) -> Path | None: ...

    def load(self, ckpt: Path, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Weights and optimizer state from a checkpoint; returns the trainer state."""
        ...

    def sampling_model(self, model: GPT) -> GPT | None:
        """The plain model rank 0 samples from (None on the other ranks); every rank calls it."""
        ...


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
            from gpt2.checkpoint.sharded import load_sharded

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

        from gpt2.checkpoint.sharded import save_sharded
        from gpt2.fileio import WriteError, as_write_error

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
        from gpt2.checkpoint.sharded import load_sharded

        return load_sharded(ckpt, model, optimizer)

    def sampling_model(self, model: GPT) -> GPT | None:
        """A plain copy gathered on rank 0 (a collective: every rank takes part)."""
        full = gather_full_model(model)
        return full.to(self.info.device) if full is not None else None


def mixed_precision_policy(device_type: str, enabled: bool) -> MixedPrecisionPolicy:
    """bf16 parameters and compute with fp32 gradient reduction on CUDA (the sharded fp32 master
    weights and AdamW state stay fp32); plain fp32 elsewhere, or when disabled.

    Reducing in fp32 keeps the sum of N ranks' gradients as exact as DDP's (a bf16 sum of 8
    gradients loses 3 of its 8 mantissa bits); CPUs have no fast bf16 matmul to gain from.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if enabled and device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(
    model: GPT, *, mixed_precision: bool, activation_checkpointing: bool, mesh: DeviceMesh | None = None
) -> GPT:
    """Shard `model` in place over `mesh` (default: all ranks, on the device its parameters are on)
    and return it: each Block is one FSDP unit, the root holds wte/wpe/ln_f and the tied lm_head.

    Call it on every rank after the process group starts, with identical initial weights, and
    build the optimizer afterwards (sharding replaces every parameter with a sharded DTensor).
    activation_checkpointing=True keeps only each Block's input in forward and recomputes the rest
    in backward: about a third more compute for activation memory of one Block instead of all.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not is_distributed():
        raise ValueError("shard_model needs a process group: launch with torchrun (even --nproc_per_node=1)")
    if not isinstance(model, GPT):
        raise ValueError(f"shard_model takes the plain GPT (not compiled or DDP-wrapped), got {type(model).__name__}")
    device = model.transformer.wte.weight.device
    if mesh is None:
        mesh = init_device_mesh(device.type, (get_world_size(),))
    policy = mixed_precision_policy(device.type, mixed_precision)
    blocks = model.transformer.h
    for i in range(len(blocks)):
        if activation_checkpointing:
            # Non-reentrant checkpointing (works with FSDP's hooks and keyword arguments). The wrapper
            # adds `_checkpoint_wrapped_module.` to parameter names; the DCP state-dict functions and
            # the wrapper's own state_dict hooks take it out again, so checkpoints never see it.
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            blocks[i] = checkpoint_wrapper(blocks[i])
        fully_shard(blocks[i], mesh=mesh, mp_policy=policy)
    # The root unit: embeddings, final LayerNorm and lm_head. wte and lm_head are one Parameter, so
    # FSDP shards it once and both modules see the same DTensor (the tie survives).
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise RuntimeError("fully_shard broke the wte/lm_head weight tie; this torch version is not supported")
    return model


def gather_full_model(model: nn.Module) -> GPT | None:
    """A plain, unsharded copy of a sharded GPT (fp32, on CPU) on rank 0, None on the other ranks;
    every rank calls it (it all-gathers every weight). For what one process does alone with the
    model, where the sharded one would wait for the other ranks: sampling (CUDA-graph decoding)
    and writing an HF directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the full tensors land on rank 0 only
    sd = get_model_state_dict(unwrap_model(model), options=options)
    if get_rank() != 0:
        return None
    return GPT.from_state_dict(unwrap_model(model).config, sd, source="the sharded model")


def make_strategy(parallelism: str, info: DistInfo, *, activation_checkpointing: bool = False) -> ParallelStrategy:
    """The strategy for `--parallelism` on this process group."""
    if parallelism == "fsdp":
        if not info.distributed:
            raise ValueError("parallelism fsdp needs torchrun (even --nproc_per_node=1)")
        return Shard(info, activation_checkpointing=activation_checkpointing)
    return Replicate(info)
