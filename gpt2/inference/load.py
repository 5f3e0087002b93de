"""A model for inference from what the commands' --model, --device and --dtype say.

The command-line shell wraps load_model with the process-wide matmul precision
(gpt2.commands.common.load_for_inference), which every command that loads a model uses: generate,
eval, validate, export and both ways of serving. This half has no process-global effect, so library
code (an engine process started without a loader, tests) can call it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2.device import compute_dtype, pick_device
from gpt2.model import GPT


@dataclass(frozen=True)
class ModelSpec:
    """A model to load: --model (hub name, HF-format directory, checkpoint or run directory),
    --device (auto, cpu, cuda, cuda:N, mps) and --dtype (auto, fp32, bf16, fp16; see gpt2.device)."""

    model: str
    device: str = "auto"
    dtype: str = "auto"


def load_model(spec: ModelSpec, *, cast_weights: bool = True) -> tuple[GPT, torch.device]:
    """(model in eval mode, device) of spec: on its device, weights cast to its compute dtype
    (cast_weights=False keeps them as stored, for commands that compute under autocast)."""
    device = pick_device(spec.device)
    dtype = compute_dtype(spec.dtype, device) if cast_weights else None
    model = GPT.from_pretrained(spec.model, device=device, dtype=dtype)
    return model.eval(), device
