"""What `--model` means, in one place, and reading a model's config and weights from any source.

    gpt2, gpt2-medium, gpt2-large, gpt2-xl, user/repo   a HuggingFace Hub model (downloaded once, cached)
    DIR with config.json + model.safetensors            an HF-format directory (`gpt2 export`, transformers)
    RUN_DIR/checkpoints/step_00000500                   one of our checkpoints (HF-format or sharded)
    RUN_DIR                                             a training run: its newest checkpoint

A hub name is a hub name unless the path is explicit (`./gpt2`, `/abs/path`, `~/m`) or a directory
of that name actually holds a model: standing in a checkout of this repository, `gpt2` is the
package's source folder, which never counts as a model. Every command loads through
GPT.from_pretrained, which calls read_model here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from gpt2.checkpoint.layout import CHECKPOINTS, MANIFEST, find_checkpoint, is_run_dir, is_sharded, verified
from gpt2.config import GPTConfig
from gpt2.hf import CONFIG_FILE, HUB_MODELS, WEIGHTS_FILE, read_config, read_weights, state_dict_from_hf

PACKAGE_DIR = Path(__file__).resolve().parent  # gpt2's own source folder: never a model


@dataclass(frozen=True)
class ModelSource:
    """Where a `--model` spec points: a hub repo id (`path` None until downloaded) or a local
    directory holding config.json and weights (HF-format or sharded)."""

    spec: str
    kind: str  # "hub", "hf" (an HF-format directory or checkpoint) or "sharded" (a DCP checkpoint)
    path: Path | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else self.spec


def resolve_model(spec: str | Path) -> ModelSource:
    """The source a `--model` spec names (no download); one-line errors for anything else."""
    name = str(spec)
    path = Path(name).expanduser()
    explicit = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    if path.is_dir() and path.resolve() != PACKAGE_DIR:
        local = _local_model(path)
        if local is not None:
            return local
        if explicit or not _hub_name(name):
            raise FileNotFoundError(
                f"{path} has no {CONFIG_FILE} and no {CHECKPOINTS}/; expected an HF-format directory "
                f"({CONFIG_FILE} + {WEIGHTS_FILE}), a checkpoint or a training run directory"
            )
    elif path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; pass the directory that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    elif explicit:
        raise FileNotFoundError(f"{path} does not exist; pass a model directory, a run directory or a hub name")
    if not _hub_name(name):
        raise ValueError(
            f"unknown model {name!r}: not a directory and not one of {', '.join(HUB_MODELS)} "
            "(or a HuggingFace repo id like 'user/model')"
        )
    return ModelSource(spec=name, kind="hub")


def model_dir(spec: str | Path | ModelSource) -> ModelSource:
    """The source with a local directory: hub models are downloaded (once; then the cache is used)."""
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    if source.kind != "hub":
        return source
    return ModelSource(spec=source.spec, kind="hf", path=_download(source.spec))


def read_model(spec: str | Path | ModelSource) -> tuple[GPTConfig, dict[str, Tensor], str]:
    """(config, state dict with GPT's names and the tied lm_head, a label for messages) of a model."""
    source = model_dir(spec)
    if source.kind == "sharded":
        from gpt2.checkpoint.sharded import checkpoint_config, consolidate

        return checkpoint_config(source.path), consolidate(source.path), source.label
    config = read_config(source.path)
    return config, state_dict_from_hf(read_weights(source.path)), source.label


def known_config(spec: str | Path | ModelSource) -> GPTConfig | None:
    """A model's config without reading its weights: the config.json of one on disk, the preset of one
    of OpenAI's (HUB_MODELS: the presets are their configs); None for another hub repo (this does not
    download)."""
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    if source.kind != "hub":
        return read_config(source.path)
    return GPTConfig.from_name(source.spec) if source.spec in HUB_MODELS else None


def _local_model(path: Path) -> ModelSource | None:
    """The model a local directory holds: a run's current checkpoint (whatever else lies in the run
    directory, e.g. a config.json an older version let `gpt2 export` write there), or itself
    (config.json); a checkpoint's weights are checked against its checkpoint.json first."""
    if is_run_dir(path):
        ckpt = find_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"the run {path} has no complete checkpoint yet; nothing to load")
        return _checked(ModelSource(spec=str(path), kind="sharded" if is_sharded(ckpt) else "hf", path=ckpt))
    if (path / CONFIG_FILE).is_file():
        return _checked(ModelSource(spec=str(path), kind="sharded" if is_sharded(path) else "hf", path=path))
    return None


def _checked(source: ModelSource) -> ModelSource:
    """The source, once the files the model is read from match the checkpoint's sha256 manifest
    (HF directories without one, and checkpoints older than it, are read as they are)."""
    if (source.path / MANIFEST).is_file():
        names = None if source.kind == "sharded" else [CONFIG_FILE, WEIGHTS_FILE]
        verified(source.path, names)
    return source


def _hub_name(name: str) -> bool:
    return name in HUB_MODELS or ("/" in name and name.count("/") == 1 and not name.startswith("/"))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise RuntimeError(
            f"downloading {repo_id!r} needs huggingface_hub: pip install 'gpt2[hf]' "
            "(or pass a local HF-format directory)"
        ) from e
    try:
        local = snapshot_download(repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise RuntimeError(
            f"could not download {repo_id!r} from the HuggingFace Hub ({type(e).__name__}); "
            "check the name and your network, or pass a local directory"
        ) from e
    return Path(local)
