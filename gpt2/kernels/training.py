"""The training kernels' place in a model, and the choice of them (`train_kernels`).

`fuse_mlps(model)` gives every Block an MLP computed by gpt2.kernels.mlp (GELU in the epilogues
of the matmuls around it, forward and backward) over the very same parameter modules: the
state_dict, its keys, the checkpoints and the exports do not change, nor does the function (the
kernels are tested against gpt2.block.MLP). It is applied once, where the training step is built,
before compiling and wrapping; evaluation and sampling during training go through it too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpt2.block import MLP
from gpt2.kernels import HAS_TRITON

CHOICES = ("auto", "fused", "torch")


class FusedMLP(nn.Module):
    """gpt2.block.MLP's function through the fused kernels, on that MLP's own c_fc and c_proj."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.c_fc, self.c_proj, self.dropout = mlp.c_fc, mlp.c_proj, mlp.dropout

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        from gpt2.kernels.mlp import mlp

        return self.dropout(mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias))


def fuse_mlps(model: nn.Module) -> nn.Module:
    """Replace each Block's MLP by a FusedMLP on the same parameters (in place); returns model."""
    for block in model.transformer.h:
        if isinstance(block.mlp, MLP):
            block.mlp = FusedMLP(block.mlp)
    return model


def use_training_kernels(choice: str, device: torch.device) -> tuple[bool, str]:
    """Resolve `train_kernels`: (fused or not, a line saying which and why). "auto" takes the
    fused kernels wherever they run (CUDA with triton); "fused" where they cannot raises
    ValueError saying why; "torch" is the compiled PyTorch step."""
    if choice not in CHOICES:
        raise ValueError(f"unknown train_kernels {choice!r}; choose one of {', '.join(CHOICES)}")
    runs = device.type == "cuda" and HAS_TRITON
    if choice == "fused" and not runs:
        need = "the triton package" if device.type == "cuda" else f"a CUDA device (this run is on {device.type})"
        raise ValueError(f"train_kernels fused needs {need}; use --train_kernels torch or auto")
    if choice == "torch" or not runs:
        why = "chosen" if choice == "torch" else "auto: " + _missing(device)
        return False, f"training kernels: PyTorch ({why})"
    return True, f"training kernels: fused ({choice}: Triton MLP with GELU in its matmuls' epilogues)"


def _missing(device: torch.device) -> str:
    return f"no fused kernels on {device.type}" if device.type != "cuda" else "the triton package is not installed"
