"""Hand-written Triton kernels (CUDA; optional: needs the `triton` package), the one home of Triton code.

  ops, decode  the decode step of serving and generation in 5 kernels per layer (below)
  mlp          the training step's MLP with GELU in the epilogues of its matmuls, forward and backward
  training     FusedMLP and the choice of training kernels (`train_kernels`)
  loss         the softmax of the chunked cross-entropy (gpt2.ops.linear_cross_entropy)

Each kernel computes the same function as the PyTorch expression it replaces, which stays as the
reference its tests compare to. Which kernels run is a value passed where a step is built
(`train_kernels`, `--decode-kernels`), never a module-level switch.

The decode step:

A decode step feeds one token per sequence, so each of its ~170 PyTorch kernels does almost
nothing and costs its launch: on an H200 a GPT-2 124M step at batch 1 was 170 kernels, 584 us of
GPU time for 248 MB of weights that the card reads in ~75 us (benchmarks/NOTES.md). gpt2.kernels
computes the same step in 5 kernels per layer (LayerNorm fused into the matmul that reads it,
bias, GELU and the residual add fused into the matmul that makes them, attention for one query
fused with the write of its key and value into the cache), reading the model's own parameters:
the architecture and the weights are untouched, only the order of floating-point operations
differs (tested against the model's forward on the same inputs).

`ops` holds the kernels and their launchers; `decode` the step built from them.
"""

from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None  # what is installed; nothing here changes it


def available(device: torch.device | str) -> bool:
    """Whether the kernels can run on device: CUDA with triton installed."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and HAS_TRITON


def supports(config) -> bool:
    """Whether the kernels handle a model of this GPTConfig: the attention kernel holds one head
    (head_dim values) in a power-of-two block, as every GPT-2 size (64) and preset has."""
    hs = config.head_dim
    return hs >= 16 and hs & (hs - 1) == 0


def use_fused(fused: bool | None, compile: bool, device: torch.device | str, config=None) -> bool:
    """Resolve the choice of decode step: None means the fused kernels wherever they run (and
    compile is off); True where they cannot run raises ValueError saying why. config (a GPTConfig)
    is checked when given (gpt2 serve checks the rest before loading the model)."""
    if fused is None:
        return not compile and available(device) and (config is None or supports(config))
    if not fused:
        return False
    if compile:
        raise ValueError(
            "compile applies to the PyTorch decode step, not the fused kernels: use --decode-kernels torch"
        )
    if not available(device):
        raise ValueError(
            f"the fused decode kernels need a CUDA device and the triton package (device: {device}); "
            "use --decode-kernels torch"
        )
    if config is not None and not supports(config):
        raise ValueError(
            f"the fused decode kernels need a power-of-two head size >= 16, not {config.head_dim}; "
            "use --decode-kernels torch"
        )
    return True


SHORT_ROWS = 256  # rows no longer than this attend in one program per row and head (see split_attention)


def split_attention(M: int, n_head: int, length: int, device: torch.device) -> bool:
    """Whether M rows of up to `length` columns should split attention over the columns: only when
    rows are long and M * n_head programs would leave most SMs idle (measured on an H200, GPT-2
    124M at M=1: one program per head takes 3.4 us at 128 columns but 16 us at 1,000; split, ~5)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return length > SHORT_ROWS and M * n_head < 2 * sms
