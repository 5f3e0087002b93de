"""HuggingFace format, in one place: GPT-2's config.json and weight layout <-> ours.

HF's GPT-2 stores the four projection matrices as `Conv1D` weights of shape (in, out); our
`nn.Linear` holds (out, in). Converting is therefore "transpose those four, copy the rest", and
loading checks every name and shape. Our own checkpoints are written in the same format
(config.json + model.safetensors), so `transformers.GPT2LMHeadModel.from_pretrained(dir)` reads
them too. This module converts and reads/writes the files; which directory a `--model` means is
gpt2.loading's business, and building the GPT is GPT.from_pretrained's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gpt2.config import VOCAB_SIZE, GPTConfig
from gpt2.fileio import atomic_write, atomic_write_json, read_json_object
from gpt2.tokenizer import EOT_ID, fits_vocab, write_hf_tokenizer_files

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "pytorch_model.bin"
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers that older transformers versions saved (causal mask); never needed.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
TIED_KEY, EMBEDDING_KEY = "lm_head.weight", "transformer.wte.weight"  # one Parameter, two names


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
        vocab_size=hf.get("vocab_size", VOCAB_SIZE),
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


def state_dict_from_hf(hf_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict (GPT's names, lm_head tied to wte) from an HF GPT-2 one (with or without the
    `transformer.` prefix)."""
    out = {}
    for key, value in hf_sd.items():
        if key.endswith(IGNORED_SUFFIXES) or key == TIED_KEY:
            continue  # buffers; lm_head is tied to wte
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        if name.endswith(CONV1D_WEIGHTS):
            value = value.t()
        out[name] = value
    if EMBEDDING_KEY in out:
        out[TIED_KEY] = out[EMBEDDING_KEY]
    return out


def state_dict_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF GPT2LMHeadModel's state dict (Conv1D layout; lm_head omitted because it is tied) from ours."""
    out = {}
    for name, value in sd.items():
        if name == TIED_KEY:
            continue
        value = value.detach()
        if name.endswith(CONV1D_WEIGHTS):
            value = value.t()
        out[name] = value.contiguous()
    return out


def load_state_dict_checked(model: nn.Module, sd: dict[str, Tensor], source: str, *, assign: bool = False) -> None:
    """Copy `sd` (GPT's names) into the GPT `model` (assign=True: make its tensors the parameters),
    naming the first missing, unexpected or mis-shaped key; the wte/lm_head tie is kept (re-tie
    the model after assign=True)."""
    own = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    given = {k: v for k, v in sd.items() if k != TIED_KEY}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    if missing:
        raise ValueError(
            f"{source}: missing weight {missing[0]!r} ({len(missing)} missing); is this a GPT-2 checkpoint?"
        )
    if unexpected:
        raise ValueError(f"{source}: unexpected weight {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for k, v in own.items():
        if tuple(given[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{source}: weight {k!r} has shape {tuple(given[k].shape)}, config.json implies {tuple(v.shape)}"
            )
    with torch.no_grad():
        model.load_state_dict({**given, TIED_KEY: given[EMBEDDING_KEY]}, strict=True, assign=assign)


def read_config(directory: Path) -> GPTConfig:
    """The GPTConfig of an HF-format directory's config.json (one-line errors for a missing or bad file)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {directory} is not an HF-format model directory")
    return config_from_hf(read_json_object(path, "the file is corrupt"))


def read_weights(directory: Path) -> dict[str, Tensor]:
    """Tensors of model.safetensors, or of pytorch_model.bin read without unpickling code (HF names)."""
    st, binfile = Path(directory) / WEIGHTS_FILE, Path(directory) / LEGACY_WEIGHTS_FILE
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
    raise FileNotFoundError(f"{directory} has config.json but no {WEIGHTS_FILE} or {LEGACY_WEIGHTS_FILE}")


def save_pretrained(model: nn.Module, directory: str | Path, *, tokenizer: bool | None = None) -> None:
    """Write the GPT `model` as an HF directory: config.json, model.safetensors (the model's dtype,
    HF layout), generation_config.json and the tokenizer files (vocab.json, merges.txt,
    tokenizer_config.json: AutoTokenizer and `lm_eval --model hf` read the directory as it is;
    tokenizer=None writes them when the vocabulary is GPT-2's, True always, False never); each file
    published atomically."""
    config: GPTConfig = model.config
    if not config.bias:
        raise ValueError("a model with bias=False has no HuggingFace GPT-2 equivalent; train with bias=True to export")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.cpu() for k, v in state_dict_to_hf(model.state_dict()).items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    hf_config = config_to_hf(config)
    hf_config["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    atomic_write_json(directory / CONFIG_FILE, hf_config)
    atomic_write_json(directory / "generation_config.json", {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID})
    if tokenizer or (tokenizer is None and fits_vocab(config.vocab_size)):
        write_hf_tokenizer_files(directory, model_max_length=config.block_size)
