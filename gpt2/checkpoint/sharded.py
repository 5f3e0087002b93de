"""Sharded (DCP) checkpoints: writing them from every rank of an FSDP run, and reading them safely,
into a sharded model or without a process group or a model (consolidation).

A sharded checkpoint (written by save_sharded, one data file per rank) is

    step_00000500/
        .metadata, __0_0.distcp, __1_0.distcp   torch.distributed.checkpoint of {"model": weights,
                                                "optimizer": AdamW state}, GPT's own parameter names
        config.json                             the model's HF config (its shape)
        vocab.json, merges.txt, tokenizer_config.json   GPT-2's BPE (AutoTokenizer; GPT-2-sized vocabularies)
        trainer_state.pt                        rank 0's extra state (torch.save; weights_only=True)
        train_config.json, ...

DCP's reader unpickles .metadata and its planners unpickle non-tensor values with
weights_only=False. A checkpoint may come from elsewhere (`gpt2 export` of someone's run), so here
both are read through allow-lists: DCP's metadata dataclasses, torch's dtypes, sizes and layouts,
paths; and torch.load(weights_only=True) for the values. Nothing else can be built.

A checkpoint is written into `.step_00000500.tmp` beside its final name by every rank and renamed by
rank 0 once every rank's data is on disk, so a crash mid-save leaves earlier checkpoints as they
were. With several nodes the directory must be on a filesystem that all of them share (each rank
writes its own file). GPT.from_pretrained reads one back as one plain model in one process.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from gpt2.checkpoint.layout import SEALED, SHARDED_INDEX, STATE_FILE, seal_checkpoint
from gpt2.config import GPTConfig
from gpt2.distributed import is_distributed, on_main_rank
from gpt2.fileio import atomic_write, atomic_write_json, publish_dir
from gpt2.hf import CONFIG_FILE, EMBEDDING_KEY, TIED_KEY, config_to_hf, read_config
from gpt2.tokenizer import fits_vocab, write_hf_tokenizer_files

MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"


def is_sharded_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` is a sharded (DCP) checkpoint rather than an HF-format one."""
    return (Path(directory) / SHARDED_INDEX).is_file()


def read_metadata(directory: Path) -> dcp.Metadata:
    """DCP's index of a complete sharded checkpoint, or a one-line FileNotFoundError / ValueError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"sharded checkpoint {directory} does not exist")
    for name in (SHARDED_INDEX, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} not found; {directory} is not a complete sharded checkpoint (see save_sharded)"
            )
    return SafeReader(str(directory)).read_metadata()


def checkpoint_config(directory: str | Path) -> GPTConfig:
    """The GPTConfig of a sharded checkpoint (its config.json)."""
    return read_config(Path(directory))


def read_extra_state(directory: str | Path) -> dict[str, Any]:
    """The extra state saved with a sharded checkpoint, read without unpickling code."""
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
    read_metadata(directory)
    state: dict[str, Any] = {}
    # dcp.load fills only the keys its state dict already has; this private entry point (the one
    # format_utils.dcp_to_torch_save uses) lets the planner build the dict from .metadata instead.
    with single_process_quietly():
        _load_state_dict(
            state, storage_reader=SafeReader(str(directory)), planner=SafeEmptyPlanner(keys={MODEL_KEY}), no_dist=True
        )
    if MODEL_KEY not in state:
        raise ValueError(f"{directory} has no model weights; it was not written by save_sharded")
    return retie(dict(state[MODEL_KEY]))


def save_sharded(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra_state: Mapping[str, Any],
    *,
    json_files: Mapping[str, Any] | None = None,
) -> Path:
    """Write model + optimizer as a sharded checkpoint at `directory`, atomically; every rank calls it.

    `model` is the sharded GPT (or a plain one in a single process), not compiled or DDP-wrapped.
    `extra_state` (rank 0's is written, as trainer_state.pt) must hold only tensors, numbers,
    strings, lists and dicts, so it loads with weights_only=True: data-loader position, RNG states,
    step. `json_files` maps a file name to a JSON-serializable value written beside it (e.g.
    train_config.json).
    Returns the directory. Raises on every rank if any rank fails.
    """
    final = Path(directory)
    tmp = final.with_name(f".{final.name}.tmp")
    config = model.config

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
        atomic_write_json(tmp / CONFIG_FILE, config_to_hf(config))
        if fits_vocab(config.vocab_size):  # AutoTokenizer reads the checkpoint directory as it is
            write_hf_tokenizer_files(tmp, config.block_size)
        atomic_write(tmp / STATE_FILE, lambda path: torch.save({**extra_state, SEALED: True}, path))
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
    """Load a save_sharded checkpoint into the GPT `model` (sharded over any number of ranks, or plain
    in a single process; not compiled or DDP-wrapped) and `optimizer` (built for `model`; None:
    weights only); every rank calls it. Returns the saved extra_state. DCP reshards, so N ranks'
    checkpoints load on M ranks."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    differ = checkpoint_config(directory).diff(model.config)
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
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=state[OPTIMIZER_KEY])
    return read_extra_state(directory)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """(model, optimizer) state dicts keyed by GPT's own parameter names: DTensor shards when
    sharded, plain tensors otherwise (DCP reshards either way on load)."""
    if optimizer is None:
        return get_state_dict(model, [])[0], {}
    return get_state_dict(model, optimizer)


def untie(model_sd: dict) -> dict:
    """The state dict without lm_head.weight: it is wte's tensor, which DCP would store twice."""
    return {k: v for k, v in model_sd.items() if k != TIED_KEY}


def retie(model_sd: dict) -> dict:
    return {**model_sd, TIED_KEY: model_sd[EMBEDDING_KEY]}


@contextlib.contextmanager
def single_process_quietly() -> Iterator[None]:
    """DCP warns that it "assumes" a single process when there is no process group: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


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


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose .metadata is unpickled through an allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp.Metadata:
        path = Path(self.path) / SHARDED_INDEX
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


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor values (AdamW's hyper-parameters) with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes_safely(self, read_item, value)


class SafeEmptyPlanner(_EmptyStateDictLoadPlanner):
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
