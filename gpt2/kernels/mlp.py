"""The MLP of a training step with GELU fused into the matmuls around it (Triton, forward and backward).

GPT-2's MLP is y = gelu(x @ W_fc^T + b_fc) @ W_proj^T + b_proj. Compiled PyTorch computes its
element-wise parts in kernels of their own, each a full pass over the (N, 4C) activations:

    forward   pre = x @ W_fc^T + b          matmul, writes pre
              h = gelu(pre)                 reads pre, writes h
    backward  dh = dy @ W_proj              matmul, writes dh
              dpre = dh * gelu'(pre)        reads dh and pre, writes dpre and h (recomputed for dW_proj),
              db_fc = sum(dpre)             and reads dpre again for the bias gradient

Here the element-wise parts run in the epilogues of the two matmuls that produce their inputs:
the forward matmul writes pre and h together, the backward one multiplies by gelu'(pre) before
its single write and leaves per-tile column sums for the bias gradient. At (N, 4C) bf16 that is
24 bytes per token per C saved: 14.5 GB a step for GPT-2 124M at 65,536 tokens (benchmarks/NOTES.md).
The other matmuls (c_proj forward, the weight gradients, dx) stay cuBLAS.

Memory: the backward keeps x and pre, as compiled PyTorch does (it recomputes h from pre).

Shape key: M rows (B*T), K input features, N output features, C n_embd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

SQRT_2_OVER_PI = 0.7978845608028654
BLOCK_M_BACKWARD = 128  # fixed, so the bias-gradient partial sums have a known number of rows


@triton.jit
def _gelu_and_slope(z):
    """gelu(z) and gelu'(z), GPT-2's tanh approximation, z float32. With s = (1 + tanh(u)) / 2 =
    sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3): gelu = z s, gelu' = s + 2 z s (1 - s) u'."""
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    s = tl.sigmoid(2.0 * u)
    du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    return z * s, s + 2.0 * z * s * (1.0 - s) * du


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid, GROUP_M row blocks walked together so their B tiles stay in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _mm_gelu_kernel(
    a_ptr, b_ptr, bias_ptr, pre_ptr, h_ptr, dpre_ptr, part_ptr,
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
    BIAS: tl.constexpr, BACKWARD: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """acc = A (M, K) @ B (K, N) in float32, then per element of the (M, N) output (row-major):
    forward   pre = acc + bias; store pre and h = gelu(pre)
    backward  acc is dh; load pre; store dpre = acc * gelu'(pre) and h = gelu(pre), and the column
              sums of dpre over this tile's rows at part[pid_m, :] (the bias gradient, summed later)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + rk < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    ok = m_ok[:, None] & n_ok[None, :]
    out = rm[:, None] * N + rn[None, :]
    dtype = h_ptr.dtype.element_ty
    if BACKWARD:
        pre = tl.load(pre_ptr + out, mask=ok, other=0.0).to(tl.float32)
        h, slope = _gelu_and_slope(pre)
        dpre = tl.where(ok, acc * slope, 0.0)
        tl.store(dpre_ptr + out, dpre.to(dtype), mask=ok)
        tl.store(h_ptr + out, h.to(dtype), mask=ok)
        tl.store(part_ptr + pid_m * N + rn, tl.sum(dpre, axis=0), mask=n_ok)
    else:
        if BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        pre = acc.to(dtype)  # h is computed from the rounded pre, as PyTorch's gelu(pre) would
        h, _ = _gelu_and_slope(pre.to(tl.float32))
        tl.store(pre_ptr + out, pre, mask=ok)
        tl.store(h_ptr + out, h.to(dtype), mask=ok)


def _configs(backward: bool) -> list[triton.Config]:
    """Launch configurations autotuned per (M, N, K) on the first call: Hopper-sized tiles (wgmma
    wants 4 or 8 warps and BLOCK_K 64 for bf16). The backward keeps BLOCK_M fixed (partial sums)."""
    shapes = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 64, 3, 8), (128, 64, 64, 4, 4)]
    if not backward:
        shapes += [(256, 128, 64, 3, 8), (64, 256, 64, 4, 4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in shapes
    ]


_KEY = ["M", "N", "K", "IEEE"]
_forward_tuned = triton.autotune(_configs(False), key=_KEY)(_mm_gelu_kernel)
_backward_tuned = triton.autotune(_configs(True), key=_KEY)(_mm_gelu_kernel)


def _launch(backward: bool, a: Tensor, b: Tensor, bias, pre, h, dpre, part) -> None:
    """Launch the autotuned kernel on CUDA (bf16/fp16); fixed configurations for float32 and for
    Triton's interpreter (TRITON_INTERPRET=1, which the CPU tests of the kernels use)."""
    M, K = a.shape
    N = b.size(1)
    args = (
        a,
        b,
        bias if bias is not None else b,
        pre,
        h,
        dpre if dpre is not None else h,
        part if part is not None else h,
    )
    args += (M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1))
    flags = dict(BIAS=bias is not None, BACKWARD=backward, IEEE=a.dtype == torch.float32)
    if a.is_cuda and not flags["IEEE"]:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        (_backward_tuned if backward else _forward_tuned)[grid](*args, **flags)
    elif a.is_cuda:  # float32 (the tests' reference precision): one configuration, no autotuning
        grid = (triton.cdiv(M, BLOCK_M_BACKWARD) * triton.cdiv(N, 64),)
        _mm_gelu_kernel[grid](*args, **flags, BLOCK_M=BLOCK_M_BACKWARD, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
    else:
        bm = BLOCK_M_BACKWARD if backward else 32
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, 32),)
        _mm_gelu_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)


@torch.library.custom_op("gpt2::fc_gelu", mutates_args=())
def fc_gelu(x: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """pre = x @ w^T + b and h = gelu(pre) (tanh), x (M, K), w (N, K) as nn.Linear, both (M, N) in x's dtype."""
    M, N = x.size(0), w.size(0)
    pre = x.new_empty((M, N))
    h = x.new_empty((M, N))
    _launch(False, x, w.t(), b, pre, h, None, None)
    return pre, h


@fc_gelu.register_fake
def _(x: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    return x.new_empty((x.size(0), w.size(0))), x.new_empty((x.size(0), w.size(0)))


@torch.library.custom_op("gpt2::fc_gelu_backward", mutates_args=())
def fc_gelu_backward(dy: Tensor, w_proj: Tensor, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient through GELU from the MLP's output gradient dy (M, C) and c_proj's weight
    w_proj (C, N): dpre = (dy @ w_proj) * gelu'(pre) (M, N), h = gelu(pre) (M, N), and float32
    column sums of dpre per 128-row block (ceil(M / 128), N), whose sum is the bias gradient."""
    M, N = pre.shape
    dpre, h = torch.empty_like(pre), torch.empty_like(pre)
    part = pre.new_empty((triton.cdiv(M, BLOCK_M_BACKWARD), N), dtype=torch.float32)
    _launch(True, dy, w_proj, None, pre, h, dpre, part)
    return dpre, h, part


@fc_gelu_backward.register_fake
def _(dy: Tensor, w_proj: Tensor, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    M, N = pre.shape
    part = pre.new_empty((triton.cdiv(M, BLOCK_M_BACKWARD), N), dtype=torch.float32)
    return torch.empty_like(pre), torch.empty_like(pre), part


class _MLP(torch.autograd.Function):
    """y = gelu(x @ w_fc^T + b_fc) @ w_proj^T + b_proj on 2-D x (M, C), all in one dtype except
    the biases (any float dtype; their gradients come back in it)."""

    @staticmethod
    def forward(ctx, x, w_fc, b_fc, w_proj, b_proj):
        pre, h = fc_gelu(x, w_fc, b_fc)  # (M, 4C) each
        y = h @ w_proj.t()  # (M, C)
        if b_proj is not None:
            y = y + b_proj.to(y.dtype)
        ctx.save_for_backward(x, w_fc, w_proj, pre)
        ctx.bias_dtypes = (b_fc.dtype if b_fc is not None else None, b_proj.dtype if b_proj is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_fc, w_proj, pre = ctx.saved_tensors
        dy = dy.contiguous()
        dpre, h, part = fc_gelu_backward(dy, w_proj, pre)  # (M, 4C), (M, 4C), (M / 128, 4C)
        dw_proj = dy.t() @ h  # (C, 4C)
        dw_fc = dpre.t() @ x  # (4C, C)
        dx = dpre @ w_fc  # (M, C)
        fc_dtype, proj_dtype = ctx.bias_dtypes
        db_fc = part.sum(0).to(fc_dtype) if fc_dtype is not None else None
        db_proj = dy.sum(0, dtype=torch.float32).to(proj_dtype) if proj_dtype is not None else None
        return dx, dw_fc, db_fc, dw_proj, db_proj


def mlp(x: Tensor, w_fc: Tensor, b_fc: Tensor | None, w_proj: Tensor, b_proj: Tensor | None) -> Tensor:
    """gpt2.block.MLP's function (before dropout) on x (..., C) through the fused kernels: in the
    autocast dtype when autocast is on (as nn.Linear would compute), else in x's dtype."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(dtype)  # (M, C)
    with torch.autocast(x.device.type, enabled=False):
        y = _MLP.apply(x2, w_fc.to(dtype), b_fc, w_proj.to(dtype), b_proj)
    return y.view(*shape[:-1], y.size(-1))
