"""The softmax of the chunked cross-entropy (gpt2.ops.linear_cross_entropy) as one Triton kernel.

Per row of a logits chunk: one pass for the log-sum-exp (online max and sum, Milakov & Gimelshein
2018), one more to write the gradient softmax - onehot, where the compiled PyTorch version makes
three (max, sum, gradient): +6.7% on the 124M training step (benchmarks/NOTES.md). Registered as
a custom op, so torch.compile calls it as it is.

Shape key: n rows of a chunk, V vocab_size, Vp V padded (the padded columns get zero gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, grad_ptr, targets_ptr, loss_ptr, stride, V, Vp, ignore_index, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride
    g_row = grad_ptr + row * stride
    target = tl.load(targets_ptr + row)
    # Pass 1: running max m and sum d of exp(x - m) over the row's first V columns (column 0
    # is real, so m is finite after the first block and no -inf - -inf arises).
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    valid = target != ignore_index
    x_target = tl.load(x_row + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
    # Pass 2: gradient softmax - onehot (zero for ignored rows and padded columns).
    for start in range(0, Vp, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        g = tl.where(valid, g, 0.0)
        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < Vp)


@torch.library.custom_op("gpt2::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(logits: Tensor, targets: Tensor, vocab_size: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-row CE (n,) float32 of logits (n, Vp) over their first vocab_size columns, rows whose
    target is ignore_index giving 0, and the gradient softmax - onehot (n, Vp) in logits' dtype."""
    logits, targets = logits.contiguous(), targets.contiguous()
    n, Vp = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits)
    _cross_entropy_rows_kernel[(n,)](
        logits, grad, targets, loss, Vp, vocab_size, Vp, ignore_index, BLOCK=4096, num_warps=16
    )
    return loss, grad


@cross_entropy_rows.register_fake
def _(logits: Tensor, targets: Tensor, vocab_size: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    return logits.new_empty(logits.size(0), dtype=torch.float32), torch.empty_like(logits)
