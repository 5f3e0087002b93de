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
    """Resolve `train_kernels`: (fused or not, a line saying which and why). "auto" is the faster
    path measured for the device, which today is the compiled PyTorch step everywhere: on an H100
    the fused MLP's Triton matmuls run at ~190-250 TFLOP/s against cuBLAS's ~720, so the step is
    6.5% slower for 18% less memory (benchmarks/NOTES.md). "fused" uses them where they run and
    raises ValueError saying why where they cannot; "torch" is the compiled PyTorch step."""
    if choice not in CHOICES:
        raise ValueError(f"unknown train_kernels {choice!r}; choose one of {', '.join(CHOICES)}")
    runs = device.type == "cuda" and HAS_TRITON
    if choice == "fused" and not runs:
        need = "the triton package" if device.type == "cuda" else f"a CUDA device (this run is on {device.type})"
        raise ValueError(f"train_kernels fused needs {need}; use --train_kernels torch or auto")
    if choice == "fused":
        return True, "training kernels: fused (Triton MLP with GELU in its matmuls' epilogues: less memory, slower)"
    if choice == "torch":
        return False, "training kernels: PyTorch (chosen)"
    why = "the faster step measured" if runs else _missing(device)
    return False, f"training kernels: PyTorch (auto: {why}; --train_kernels fused saves memory)"


def _missing(device: torch.device) -> str:
    return f"no fused kernels on {device.type}" if device.type != "cuda" else "the triton package is not installed"
