"""HuggingFace interop, in one place: OpenAI/HF GPT-2 checkpoints <-> our GPT.

HF's GPT-2 stores the four projection matrices as `Conv1D` weights of shape (in, out); our
`nn.Linear` holds (out, in). Loading is therefore "transpose those four, copy the rest, assert
every shape". Our own checkpoints are written in the same format (config.json +
model.safetensors), so `transformers.GPT2LMHeadModel.from_pretrained(dir)` reads them too.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from gpt2.config import GPTConfig
from gpt2.model import GPT
from gpt2.tokenizer import EOT_ID, write_hf_tokenizer_files

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers that older transformers versions saved (causal mask); never needed.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
WEIGHTS_FILE = "model.safetensors"


def config_from_hf(hf: dict) -> GPTConfig:
    """GPTConfig from an HF config.json dict; refuses GPT-2 variants this architecture is not."""
    if "gpt2" in hf:  # written by us: the exact GPTConfig (bias=False etc.)
        return GPTConfig.from_dict(hf["gpt2"])
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; only GPT-2 ('gpt2') is supported")
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "reorder_and_upcast_attn": (False,),
        "add_cross_attention": (False,),
    }
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"config.json sets {key}={hf[key]!r}; gpt2 supports only {allowed[0]!r}")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"config.json sets n_inner={hf['n_inner']}; GPT-2's MLP is 4 * n_embd = {4 * n_embd}")
    return GPTConfig(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        dropout=float(hf.get("resid_pdrop", 0.0)),
        bias=True,
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    )


def config_to_hf(config: GPTConfig) -> dict:
    """An HF config.json dict for `config` (plus our exact GPTConfig under "gpt2")."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "torch_dtype": "float32",
        "gpt2": config.to_dict(),
    }


def state_dict_from_hf(hf_sd: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Our state dict from an HF GPT-2 one (with or without the `transformer.` prefix)."""
    out = {}
    for key, value in hf_sd.items():
        if key.endswith(IGNORED_SUFFIXES) or key == "lm_head.weight":
            continue  # buffers; lm_head is tied to wte
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        if name.endswith(CONV1D_WEIGHTS):
            value = value.t()
        out[name] = value
    return out


def state_dict_to_hf(model: GPT) -> dict[str, Tensor]:
    """HF GPT2LMHeadModel's state dict (Conv1D layout; lm_head omitted because it is tied)."""
    out = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        value = value.detach()
        if name.endswith(CONV1D_WEIGHTS):
            value = value.t()
        out[name] = value.contiguous()
    return out


def load_state_dict_checked(model: GPT, sd: dict[str, Tensor], source: str) -> None:
    """Copy `sd` into `model`, naming the first missing, unexpected or mis-shaped key."""
    own = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing:
        raise ValueError(
            f"{source}: missing weight {missing[0]!r} ({len(missing)} missing); is this a GPT-2 checkpoint?"
        )
    if unexpected:
        raise ValueError(f"{source}: unexpected weight {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{source}: weight {k!r} has shape {tuple(sd[k].shape)}, config.json implies {tuple(v.shape)}"
            )
    model.load_state_dict({**sd, "lm_head.weight": sd["transformer.wte.weight"]}, strict=True)


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory holding config.json + weights, for a hub name, an HF directory,
    one of our checkpoint directories, or a training run directory (its newest checkpoint)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
        raise FileNotFoundError(
            f"{path} has no config.json and no checkpoints/; expected an HF-format directory "
            "(config.json + model.safetensors) or a training run directory"
        )
    if path.exists():
        raise ValueError(f"{path} is a file; pass the directory that holds config.json and model.safetensors")
    name = str(name_or_path)
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    if looks_local or ("/" not in name and name not in HUB_MODELS):
        raise ValueError(
            f"unknown model {name!r}: not a directory and not one of {', '.join(HUB_MODELS)} "
            "(or a HuggingFace repo id like 'user/model')"
        )
    return _download(name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under run_dir/checkpoints (step_XXXXXXXX), or None."""
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    # complete = config.json plus weights: ours (model.safetensors) or FSDP's sharded ones (.metadata)
    ckpts = [
        p
        for p in ckpts
        if (p / "config.json").is_file() and any((p / f).is_file() for f in (WEIGHTS_FILE, ".metadata"))
    ]
    return ckpts[-1] if ckpts else None


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise RuntimeError(
            f"downloading {repo_id!r} needs huggingface_hub: pip install 'gpt2[hf]' "
            "(or pass a local HF-format directory)"
        ) from e
    try:
        local = snapshot_download(repo_id, allow_patterns=["config.json", WEIGHTS_FILE])
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise RuntimeError(
            f"could not download {repo_id!r} from the HuggingFace Hub ({type(e).__name__}); "
            "check the name and your network, or pass a local directory"
        ) from e
    return Path(local)


def load_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **config_overrides,
) -> GPT:
    """GPT loaded from a hub name, an HF directory, a checkpoint or a run directory."""
    directory = resolve_model_dir(name_or_path)
    if (directory / ".metadata").is_file():  # a sharded FSDP checkpoint: gather it on this process
        from gpt2.fsdp import load_consolidated

        return load_consolidated(directory).to(device=device, dtype=dtype)
    try:
        hf_config = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / 'config.json'} is not valid JSON ({e}); the checkpoint is corrupt") from e
    config = config_from_hf(hf_config)
    if config_overrides:
        config = GPTConfig.from_dict({**config.to_dict(), **config_overrides})
    sd = read_weights(directory)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    load_state_dict_checked(model, state_dict_from_hf(sd, config), str(directory))
    model.lm_head.weight = model.transformer.wte.weight  # to_empty broke the tie; restore it
    return model.to(device=device, dtype=dtype)


def read_weights(directory: Path) -> dict[str, Tensor]:
    """Tensors of model.safetensors, or of pytorch_model.bin read without unpickling code."""
    st, binfile = directory / WEIGHTS_FILE, directory / "pytorch_model.bin"
    if st.is_file():
        try:
            return load_file(st)
        except Exception as e:
            raise ValueError(f"{st} could not be read ({e}); the file is corrupt or truncated") from e
    if binfile.is_file():
        try:
            return torch.load(binfile, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{binfile} could not be read safely ({type(e).__name__}); convert it to safetensors"
            ) from e
    raise FileNotFoundError(f"{directory} has config.json but no {WEIGHTS_FILE} or pytorch_model.bin")


def save_pretrained(model: GPT, directory: str | Path, *, tokenizer: bool = True) -> None:
    """Write config.json, model.safetensors (fp32-or-model dtype, HF layout) and the tokenizer
    files to `directory`, each atomically (temporary file, then rename)."""
    if not model.config.bias:
        raise ValueError("a model with bias=False has no HuggingFace GPT-2 equivalent; train with bias=True to export")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = state_dict_to_hf(model)
    _atomic(
        directory / WEIGHTS_FILE, lambda p: save_file({k: v.cpu() for k, v in sd.items()}, p, metadata={"format": "pt"})
    )
    hf_config = config_to_hf(model.config)
    hf_config["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    _atomic(directory / "config.json", lambda p: Path(p).write_text(json.dumps(hf_config, indent=2)))
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}, indent=2)
    )
    if tokenizer:
        write_hf_tokenizer_files(directory, model_max_length=model.config.block_size)


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
