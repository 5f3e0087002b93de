"""Fast versions of plain PyTorch computations: same mathematics, less memory or fewer launches.

linear_cross_entropy: the mean cross-entropy of `x @ weight.T` computed a chunk of rows at a time,
so the (N, V) logits of a training batch never exist at once. For GPT-2 124M at B*T = 65,536 the
plain path holds bf16 logits (6.6 GB), their gradient and float32 temporaries; this holds one
chunk (8192 rows) and the (V, C) weight gradient: peak memory of a compiled training step 53.0
-> 24.4 GiB, and with its Triton softmax kernel (gpt2.kernels.loss) 11% faster (benchmarks/NOTES.md).

attention_backends: the scaled_dot_product_attention kernels to prefer on a device.

Shape key: N rows (B*T), C n_embd, V vocab_size, Vp V padded to a multiple of `pad_multiple`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2 import kernels


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -1,
    chunk_size: int = 8192,
    pad_multiple: int = 128,
) -> Tensor:
    """Mean cross-entropy of logits = x @ weight.T against targets, rows with targets == ignore_index
    skipped: the value and gradients of F.cross_entropy(x @ weight.T, targets) up to float rounding.

    x (..., C), weight (V, C), targets (...) int. Under autocast the matmuls run in the autocast
    dtype and the softmax in float32, as `F.cross_entropy(logits.float(), ...)` does. The weight
    is padded internally with zero rows to Vp (a multiple of pad_multiple: aligned, faster matmuls)
    and the padded logits are set to -inf, so they carry no probability and no gradient.
    """
    C = x.size(-1)
    if weight.dim() != 2 or weight.size(1) != C:
        raise ValueError(f"weight must have shape (V, {C}) to match x (..., {C}), got {tuple(weight.shape)}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal x's leading shape {tuple(x.shape[:-1])}")
    x2, t = x.reshape(-1, C), targets.reshape(-1)  # (N, C), (N,)
    dtype = _compute_dtype(x)
    args = (ignore_index, chunk_size, pad_multiple, dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x2, weight, t, *args)
    loss_sum, n_valid, _, _ = _chunked_loss(x2, weight, t, *args, grad_x=False, grad_w=False)
    return loss_sum / n_valid


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a Linear layer would compute x @ w.T in: autocast's when it is on, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _chunked_loss(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int,
    chunk_size: int,
    pad_multiple: int,
    dtype: torch.dtype,
    *,
    grad_x: bool,
    grad_w: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Summed CE, number of counted rows and, when asked, d(sum CE)/dx (N, C) and d(sum CE)/dweight
    (V, C), going over the rows chunk_size at a time.

    The gradients are computed here, in the forward pass, because each chunk's logits are at hand
    now; recomputing them in backward would cost a third more lm_head matmuls.
    """
    N, C = x.shape
    V = weight.size(0)
    Vp = -(-V // pad_multiple) * pad_multiple
    w = F.pad(weight.to(dtype), (0, 0, 0, Vp - V))  # (Vp, C), zero rows past V
    xc = x.to(dtype)  # (N, C)
    acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: float32, or float64 for float64
    loss_sum = torch.zeros((), dtype=acc, device=x.device)
    dx = torch.empty_like(x) if grad_x else None  # (N, C)
    dw = torch.zeros((Vp, C), dtype=acc, device=x.device) if grad_w else None  # (Vp, C)
    with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit here
        for start in range(0, N, chunk_size):
            rows = slice(start, min(start + chunk_size, N))
            logits = xc[rows] @ w.t()  # (n, Vp)
            chunk_loss, dlogits = _cross_entropy_sum_and_grad(logits, targets[rows], ignore_index, V)
            loss_sum = loss_sum + chunk_loss
            if dx is not None:
                dx[rows] = dlogits @ w  # (n, C)
            if dw is not None:
                dw += dlogits.t() @ xc[rows]  # (Vp, C); summed over chunks in float32
    n_valid = (targets != ignore_index).sum().to(acc)
    return loss_sum, n_valid, dx, dw[:V] if dw is not None else None


def _cross_entropy_sum_and_grad(
    logits: Tensor, targets: Tensor, ignore_index: int, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """Summed CE of logits (n, Vp) over their first vocab_size columns (float32 softmax) and its
    gradient softmax - onehot (n, Vp) in logits' dtype, zero in the padded columns; ignored rows
    contribute neither. One Triton kernel on CUDA, PyTorch operations elsewhere."""
    if logits.is_cuda and kernels.HAS_TRITON:
        from gpt2.kernels.loss import cross_entropy_rows

        rows, grad = cross_entropy_rows(logits, targets, vocab_size, ignore_index)
        return rows.sum(), grad
    return cross_entropy_sum_and_grad_reference(logits, targets, ignore_index, vocab_size)


def cross_entropy_sum_and_grad_reference(
    logits: Tensor, targets: Tensor, ignore_index: int, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """_cross_entropy_sum_and_grad in PyTorch operations: the CPU path and the Triton kernel's
    reference (it writes -inf into logits' padded columns)."""
    if logits.size(1) != vocab_size:
        logits[:, vocab_size:] = float("-inf")  # padding: no probability, no gradient
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (n, Vp)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    valid = (targets != ignore_index)[:, None]  # (n, 1)
    safe = torch.where(valid, targets[:, None], 0)  # (n, 1) an index gather can use
    loss = torch.where(valid, lse - z.gather(1, safe), 0.0).sum()
    grad = torch.exp(z - lse)  # (n, Vp) softmax
    grad = grad.scatter_add(1, safe, -valid.to(grad.dtype))  # minus the one-hot target
    grad = torch.where(valid, grad, 0.0)
    return loss, grad.to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper: forward computes loss and gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk_size, pad_multiple, dtype):
        loss_sum, n_valid, dx, dw = _chunked_loss(
            x,
            weight,
            targets,
            ignore_index,
            chunk_size,
            pad_multiple,
            dtype,
            grad_x=ctx.needs_input_grad[0],
            grad_w=ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(dx, dw, n_valid)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid  # d(mean)/d(sum), times the incoming gradient
        grad_x = dx * scale if dx is not None else None
        grad_w = dw * scale if dw is not None else None
        return grad_x, grad_w, None, None, None, None, None


# Fastest first, for training and prefill at GPT-2's head size 64 on Hopper (see benchmarks/NOTES.md).
_PREFERRED_SDPA = {
    "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "efficient": ("EFFICIENT_ATTENTION", "MATH"),
    "math": ("MATH",),
}


@contextlib.contextmanager
def attention_backends(kind: str = "cudnn") -> Iterator[None]:
    """Within the block, F.scaled_dot_product_attention tries the backends of `kind` ("cudnn":
    cuDNN, then flash, efficient, math; "flash": flash first; "efficient", "math": those; "default":
    PyTorch's own order), each falling back to the next when it cannot take the inputs. Enter it
    around the first call of a compiled model too: the backend is chosen when the graph is traced."""
    if kind == "default":
        yield
        return
    if kind not in _PREFERRED_SDPA:
        raise ValueError(
            f"unknown attention backend preference {kind!r}; choose default or {', '.join(_PREFERRED_SDPA)}"
        )
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, name) for name in _PREFERRED_SDPA[kind]]
    with sdpa_kernel(backends, set_priority=True):
        yield
