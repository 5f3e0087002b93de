"""Fully sharded data parallel training (FSDP2) and sharded checkpoints, with PyTorch's own engine.

DDP keeps the whole model, its gradients and AdamW's two moments on every GPU: 16 bytes per
parameter, 25 GB for gpt2-xl before any activation. FSDP2 (`torch.distributed.fsdp.fully_shard`)
keeps 1/N of each on each of N ranks and all-gathers one Block's weights just before that Block
runs (forward, and again in backward), then frees them; gradients are reduce-scattered so each
rank updates only its shard. The loss and the gradients are those of DDP up to float rounding.

Sharded checkpoint (one directory, written by every rank, resumable on any number of ranks):

    step_00000500/
        .metadata, __0_0.distcp, __1_0.distcp   torch.distributed.checkpoint (DCP) of
                                                {"model": weights, "optimizer": AdamW state}: one data
                                                file per rank, names without `module.` / `_orig_mod.`
        config.json                             the model's HF config (gpt2.hf.config_to_hf): its shape
        trainer_state.pt                        `extra_state` of rank 0 (torch.save; weights_only=True)
        train_config.json, ...                  `json_files` given to save_sharded

It is written into `.step_00000500.tmp` beside it and renamed by rank 0 once every rank's data
is on disk, so a crash mid-save leaves earlier checkpoints as they were. With several nodes the
directory must be on a filesystem that all of them share (each rank writes its own file).
`consolidate` turns it back into one full state dict in one process, without a process group,
for `gpt2 export`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from gpt2.config import GPTConfig
from gpt2.fileio import fsync_path, fsync_tree
from gpt2.hf import config_from_hf, config_to_hf
from gpt2.model import GPT

METADATA_FILE = ".metadata"  # DCP's index of a checkpoint: its presence marks a sharded checkpoint
STATE_FILE = "trainer_state.pt"  # the same name as in gpt2.checkpoint, so its listings see sharded ones
MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"
TIED_KEY, EMBEDDING_KEY = "lm_head.weight", "transformer.wte.weight"  # one Parameter, two names


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
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard_model needs a process group: launch with torchrun (even --nproc_per_node=1)")
    if not isinstance(model, GPT):
        raise ValueError(f"shard_model takes the plain GPT (not compiled or DDP-wrapped), got {type(model).__name__}")
    device = model.transformer.wte.weight.device
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
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
    sd = get_model_state_dict(_unwrap(model), options=options)
    if _distributed() and dist.get_rank() != 0:
        return None
    return _model_from_state_dict(_unwrap(model).config, sd, "the sharded model")


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
    config = _unwrap(model).config
    rank = dist.get_rank() if _distributed() else 0

    def prepare() -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp)

    _on_rank0(prepare, rank, f"could not prepare {tmp}")
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state = {MODEL_KEY: _untie(model_sd)}
    if optimizer is not None:
        state[OPTIMIZER_KEY] = optim_sd
    # Returns on each rank once rank 0 holds every rank's write result and has written .metadata
    # (an error on any rank is raised on all of them).
    with _single_process_quietly():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())

    def finish() -> None:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n", encoding="utf-8")
        torch.save(dict(extra_state), tmp / STATE_FILE)
        for name, value in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        _replace_dir(tmp, final)

    # Also the barrier that keeps other ranks from reading `final` before the rename.
    _on_rank0(finish, rank, f"could not write the checkpoint {final}", cleanup=lambda: shutil.rmtree(tmp, True))
    return final


def load_sharded(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load a save_sharded checkpoint into `model` (sharded over any number of ranks, or plain in a
    single process) and `optimizer` (built for `model`; None: weights only); every rank calls it.
    Returns the saved extra_state. DCP reshards, so N ranks' checkpoints load on M ranks."""
    directory = Path(directory)
    metadata = _read_metadata(directory)
    differ = checkpoint_config(directory).diff(_unwrap(model).config)
    if differ:
        raise ValueError(
            f"{directory} holds another model shape ({'; '.join(differ)}); build the model from its config.json"
        )
    if optimizer is not None and not any(k.startswith(OPTIMIZER_KEY + ".") for k in metadata.state_dict_metadata):
        raise ValueError(f"{directory} was saved without optimizer state; load it with optimizer=None")
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state = {MODEL_KEY: _untie(model_sd)}
    if optimizer is not None:
        state[OPTIMIZER_KEY] = optim_sd
    with _single_process_quietly():
        dcp.load(
            state, storage_reader=_SafeReader(str(directory)), planner=_SafeLoadPlanner(), no_dist=not _distributed()
        )
    model_sd = _retie(state[MODEL_KEY])
    if optimizer is None:
        set_state_dict(_unwrap(model), [], model_state_dict=model_sd, optim_state_dict={})
    else:
        set_state_dict(_unwrap(model), optimizer, model_state_dict=model_sd, optim_state_dict=state[OPTIMIZER_KEY])
    return read_extra_state(directory)


def is_sharded_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` is a sharded (DCP) checkpoint rather than an HF-format one."""
    return (Path(directory) / METADATA_FILE).is_file()


def _read_metadata(directory: Path) -> dcp.Metadata:
    """DCP's index of a complete sharded checkpoint, or a one-line FileNotFoundError / ValueError."""
    if not directory.is_dir():
        raise FileNotFoundError(f"sharded checkpoint {directory} does not exist")
    for name in (METADATA_FILE, "config.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} not found; {directory} is not a complete sharded checkpoint (see save_sharded)"
            )
    return _SafeReader(str(directory)).read_metadata()


def checkpoint_config(directory: str | Path) -> GPTConfig:
    """The GPTConfig of a sharded checkpoint (its config.json)."""
    path = Path(directory) / "config.json"
    try:
        return config_from_hf(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); the checkpoint is corrupt") from e


def read_extra_state(directory: str | Path) -> dict[str, Any]:
    """The extra_state saved with a sharded checkpoint, read without unpickling code."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the checkpoint {directory} is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} could not be read safely ({type(e).__name__}); the checkpoint is corrupt") from e


def consolidate(directory: str | Path) -> dict[str, Tensor]:
    """The full state dict (GPT's names, lm_head.weight included, fp32 on CPU) of a sharded checkpoint,
    read in this one process without a process group: `GPT(config).load_state_dict(sd)` takes it.
    Holds the whole model in memory (6.2 GB for gpt2-xl); the optimizer state is not read."""
    directory = Path(directory)
    _read_metadata(directory)
    state: dict[str, Any] = {}
    # dcp.load fills only the keys its state dict already has; this private entry point (the one
    # format_utils.dcp_to_torch_save uses) lets the planner build the dict from .metadata instead.
    _load_state_dict(
        state, storage_reader=_SafeReader(str(directory)), planner=_SafeEmptyPlanner(keys={MODEL_KEY}), no_dist=True
    )
    if MODEL_KEY not in state:
        raise ValueError(f"{directory} has no model weights; it was not written by save_sharded")
    return _retie(dict(state[MODEL_KEY]))


def load_consolidated(directory: str | Path) -> GPT:
    """The GPT (fp32, CPU) of a sharded checkpoint: config.json + consolidate(directory)."""
    return _model_from_state_dict(checkpoint_config(directory), consolidate(directory), str(directory))


# ---------------------------------------------------------------------------------------------
# Helpers


def _unwrap(model: nn.Module) -> GPT:
    """The GPT inside torch.compile / DDP wrappers (fully_shard keeps the GPT itself)."""
    while not isinstance(model, GPT):
        inner = getattr(model, "_orig_mod", None)
        inner = inner if inner is not None else getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            raise ValueError(f"expected a GPT (possibly sharded or compiled), got {type(model).__name__}")
        model = inner
    return model


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """(model, optimizer) state dicts keyed by GPT's own parameter names: DTensor shards when
    sharded, plain tensors otherwise (DCP reshards either way on load)."""
    model = _unwrap(model)
    if optimizer is None:
        return get_state_dict(model, [])[0], {}
    return get_state_dict(model, optimizer)


def _model_from_state_dict(config: GPTConfig, sd: dict[str, Tensor], source: str) -> GPT:
    """GPT(config) holding exactly the tensors of `sd` (no copy), the wte/lm_head tie intact."""
    with torch.device("meta"):  # no random init of weights about to be replaced (seconds for gpt2-xl)
        model = GPT(config)
    try:
        model.load_state_dict(_retie(sd), strict=True, assign=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ValueError(f"{source}: the weights do not match the model config ({lines[-1].strip()})") from e
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made them two Parameters
    return model


def _untie(model_sd: dict) -> dict:
    """The state dict without lm_head.weight: it is wte's tensor, which DCP would store twice."""
    return {k: v for k, v in model_sd.items() if k != TIED_KEY}


def _retie(model_sd: dict) -> dict:
    return {**model_sd, TIED_KEY: model_sd[EMBEDDING_KEY]}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns that it "assumes" a single process when there is no process group: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _on_rank0(fn: Callable[[], None], rank: int, what: str, cleanup: Callable[[], None] | None = None) -> None:
    """Run fn on rank 0 while the others wait; if it fails, every rank raises (none hangs)."""
    error: BaseException | None = None
    if rank == 0:
        try:
            fn()
        except BaseException as e:  # re-raised below, once the other ranks know
            error = e
            if cleanup is not None:
                cleanup()
    failed = _any_rank(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank 0 {what}; see its error")


def _any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (one all-reduce; also a barrier)."""
    if not _distributed():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() > 0)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an existing final (the same step saved again) is moved aside first."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(final.parent)


# DCP's reader unpickles .metadata and its planners unpickle non-tensor values with
# weights_only=False. A checkpoint may come from elsewhere (`gpt2 export` of someone's run), so
# here both are read through allow-lists: DCP's metadata dataclasses, torch's dtypes, sizes and
# layouts, paths; and torch.load(weights_only=True) for the values. Nothing else can be built.
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"  # dataclasses and enums only
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module, name) in _ALLOWED_GLOBALS
            or (module == _METADATA_MODULE and not name.startswith("__"))
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's .metadata")
        found = super().find_class(module, name)
        if module == _METADATA_MODULE and not isinstance(found, type):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's .metadata")
        return found


class _SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose .metadata is unpickled through an allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp.Metadata:
        path = Path(self.path) / METADATA_FILE
        try:
            with open(path, "rb") as f:
                metadata = _RestrictedUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}; the checkpoint is corrupt or not a gpt2 checkpoint") from e
        if not isinstance(metadata, dcp.Metadata):
            raise ValueError(f"{path} is not DCP metadata; the checkpoint is corrupt")
        for info in (metadata.storage_data or {}).values():  # data files must lie in the directory itself
            name = getattr(info, "relative_path", "")
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"{path} points outside its directory ({name!r}); the checkpoint is corrupt")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor values (AdamW's hyper-parameters) with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes_safely(self, read_item, value)


class _SafeEmptyPlanner(_EmptyStateDictLoadPlanner):
    """The planner of a no-process-group load that builds the state dict from the metadata, reading
    non-tensor values with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes_safely(self, read_item, value)


def _load_bytes_safely(planner: DefaultLoadPlanner, read_item: ReadItem, value: io.BytesIO) -> None:
    obj = torch.load(value, weights_only=True)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj
