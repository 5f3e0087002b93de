"""Fully sharded data parallel training (FSDP2) with PyTorch's own engine: sharding the GPT and
saving / loading its sharded checkpoints.

DDP keeps the whole model, its gradients and AdamW's two moments on every GPU: 16 bytes per
parameter, 25 GB for gpt2-xl before any activation. FSDP2 (`torch.distributed.fsdp.fully_shard`)
keeps 1/N of each on each of N ranks and all-gathers one Block's weights just before that Block
runs (forward, and again in backward), then frees them; gradients are reduce-scattered so each
rank updates only its shard. The loss and the gradients are those of DDP up to float rounding.

A sharded checkpoint (its layout: gpt2.checkpoint.sharded) is written into `.step_00000500.tmp`
beside its final name by every rank and renamed by rank 0 once every rank's data is on disk, so a
crash mid-save leaves earlier checkpoints as they were. With several nodes the directory must be on
a filesystem that all of them share (each rank writes its own file). `load_consolidated` turns it
back into one plain GPT in one process, without a process group, for `gpt2 export`.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from gpt2.checkpoint.layout import MODEL_CONFIG, STATE_FILE, seal_checkpoint
from gpt2.checkpoint.sharded import (
    MODEL_KEY,
    OPTIMIZER_KEY,
    SafeLoadPlanner,
    SafeReader,
    checkpoint_config,
    consolidate,
    is_sharded_checkpoint,
    read_extra_state,
    read_metadata,
    retie,
    single_process_quietly,
    untie,
)
from gpt2.config import GPTConfig
from gpt2.distributed import get_rank, get_world_size, is_distributed, on_main_rank
from gpt2.fileio import atomic_write, atomic_write_json, publish_dir
from gpt2.hf import config_to_hf
from gpt2.model import GPT, unwrap_model
from gpt2.tokenizer import fits_vocab, write_hf_tokenizer_files

__all__ = [
    "checkpoint_config",
    "consolidate",
    "gather_full_model",
    "is_sharded_checkpoint",
    "load_consolidated",
    "load_sharded",
    "mixed_precision_policy",
    "read_extra_state",
    "save_sharded",
    "shard_model",
]


# ---------------------------------------------------------------------------------------------
# Sharding


def mixed_precision_policy(device_type: str, enabled: bool) -> MixedPrecisionPolicy:
    """bf16 parameters and compute with fp32 gradient reduction on CUDA (the sharded fp32 master
    weights and AdamW state stay fp32); plain fp32 elsewhere, or when disabled.

    Reducing in fp32 keeps the sum of N ranks' gradients as exact as DDP's (a bf16 sum of 8
    gradients loses 3 of its 8 mantissa bits); CPUs have no fast bf16 matmul to gain from.
    """
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
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the full tensors land on rank 0 only
    sd = get_model_state_dict(unwrap_model(model), options=options)
    if get_rank() != 0:
        return None
    return _model_from_state_dict(unwrap_model(model).config, sd, "the sharded model")


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints


def save_sharded(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra_state: Mapping[str, Any],
    *,
    json_files: Mapping[str, Any] | None = None,
) -> Path:
    """Write model + optimizer as a sharded checkpoint at `directory`, atomically; every rank calls it.

    `model` is the sharded GPT (or a plain one in a single process). `extra_state` (rank 0's is
    written, as trainer_state.pt) must hold only tensors, numbers, strings, lists and dicts, so it
    loads with weights_only=True: data-loader position, RNG states, step. `json_files` maps a
    file name to a JSON-serializable value written beside it (e.g. train_config.json).
    Returns the directory. Raises on every rank if any rank fails.
    """
    final = Path(directory)
    tmp = final.with_name(f".{final.name}.tmp")
    config = unwrap_model(model).config

    def prepare() -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp)

    on_main_rank(prepare, f"prepare {tmp}")
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state = {MODEL_KEY: untie(model_sd)}
    if optimizer is not None:
        state[OPTIMIZER_KEY] = optim_sd
    # Returns on each rank once rank 0 holds every rank's write result and has written .metadata
    # (an error on any rank is raised on all of them).
    with single_process_quietly():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not is_distributed())

    def finish() -> None:
        atomic_write_json(tmp / MODEL_CONFIG, config_to_hf(config))
        if fits_vocab(config.vocab_size):  # AutoTokenizer reads the checkpoint directory as it is
            write_hf_tokenizer_files(tmp, config.block_size)
        atomic_write(tmp / STATE_FILE, lambda path: torch.save(dict(extra_state), path))
        for name, value in (json_files or {}).items():
            atomic_write_json(tmp / name, value)
        seal_checkpoint(tmp)  # every rank's data file is in tmp by now (dcp.save returned on all)
        publish_dir(tmp, final)

    def finish_or_clean_up() -> None:
        try:
            finish()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # Also the barrier that keeps other ranks from reading `final` before the rename.
    on_main_rank(finish_or_clean_up, f"write the checkpoint {final}")
    return final


def load_sharded(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load a save_sharded checkpoint into `model` (sharded over any number of ranks, or plain in a
    single process) and `optimizer` (built for `model`; None: weights only); every rank calls it.
    Returns the saved extra_state. DCP reshards, so N ranks' checkpoints load on M ranks."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    differ = checkpoint_config(directory).diff(unwrap_model(model).config)
    if differ:
        raise ValueError(
            f"{directory} holds another model shape ({'; '.join(differ)}); build the model from its config.json"
        )
    if optimizer is not None and not any(k.startswith(OPTIMIZER_KEY + ".") for k in metadata.state_dict_metadata):
        raise ValueError(f"{directory} was saved without optimizer state; load it with optimizer=None")
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state = {MODEL_KEY: untie(model_sd)}
    if optimizer is not None:
        state[OPTIMIZER_KEY] = optim_sd
    with single_process_quietly():
        dcp.load(
            state, storage_reader=SafeReader(str(directory)), planner=SafeLoadPlanner(), no_dist=not is_distributed()
        )
    model_sd = retie(state[MODEL_KEY])
    if optimizer is None:
        set_state_dict(unwrap_model(model), [], model_state_dict=model_sd, optim_state_dict={})
    else:
        set_state_dict(unwrap_model(model), optimizer, model_state_dict=model_sd, optim_state_dict=state[OPTIMIZER_KEY])
    return read_extra_state(directory)


def load_consolidated(directory: str | Path) -> GPT:
    """The GPT (fp32, CPU) of a sharded checkpoint: config.json + consolidate(directory)."""
    return _model_from_state_dict(checkpoint_config(directory), consolidate(directory), str(directory))


# ---------------------------------------------------------------------------------------------
# Helpers


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """(model, optimizer) state dicts keyed by GPT's own parameter names: DTensor shards when
    sharded, plain tensors otherwise (DCP reshards either way on load)."""
    model = unwrap_model(model)
    if optimizer is None:
        return get_state_dict(model, [])[0], {}
    return get_state_dict(model, optimizer)


def _model_from_state_dict(config: GPTConfig, sd: dict[str, Tensor], source: str) -> GPT:
    """GPT(config) holding exactly the tensors of `sd` (no copy), the wte/lm_head tie intact."""
    with torch.device("meta"):  # no random init of weights about to be replaced (seconds for gpt2-xl)
        model = GPT(config)
    try:
        model.load_state_dict(retie(sd), strict=True, assign=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ValueError(f"{source}: the weights do not match the model config ({lines[-1].strip()})") from e
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made them two Parameters
    return model
