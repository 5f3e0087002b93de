"""Triton kernels of the fused decode step, and the functions that launch them.

Every launcher takes and returns plain tensors (rows of the decode batch first) and allocates its
output, so a step built from them can be captured as a CUDA graph like any PyTorch code. All
arithmetic is float32; inputs and outputs keep the model's dtype.

Shape key: M rows (the decode batch), K input features, N output features, C n_embd, nh heads,
hs head size, S cache columns, V vocab_size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _mac(acc, x, w, BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += x (BLOCK_M, BLOCK_K) @ w (BLOCK_N, BLOCK_K)^T, x in w's dtype. One
    row is a dot product per column on the CUDA cores (tl.dot needs 16 rows; a lone row then
    allows narrower column blocks, hence more programs streaming the weights)."""
    if BLOCK_M == 1:
        return acc + tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
    if IEEE:
        return acc + tl.dot(x, tl.trans(w), input_precision="ieee")
    return acc + tl.dot(x, tl.trans(w))


@triton.jit
def _layer_norm(x, ok, g_ptr, beta_ptr, kk, k_ok, mean, rstd, LN_BIAS: tl.constexpr):
    """(x - mean) * rstd * weight (+ bias) over columns kk, float32; masked entries 0."""
    xn = tl.where(ok, x.to(tl.float32) - mean[:, None], 0.0) * rstd[:, None]
    xn *= tl.load(g_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    if LN_BIAS:
        xn += tl.load(beta_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    return xn


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, res_ptr, g_ptr, beta_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_om, eps,
    LN: tl.constexpr, LN_BIAS: tl.constexpr, BIAS: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr,
    IEEE: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[m, n] = act(sum_k xn[m, k] * w[n, k] + b[n]) (+ res[m, n]); xn = LayerNorm(x) if LN.

    With K <= BLOCK_K (ONE_BLOCK) the weights and inputs are loaded once, together (one trip to memory: the
    step is latency-bound), and LayerNorm's statistics come from the loaded rows; otherwise K is
    walked in blocks (and LayerNorm takes two more passes over x for its mean and variance)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if ONE_BLOCK:
        k_ok = rk < K
        ok = m_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=ok, other=0.0)
        if LN:  # the rows' mean, then the biased variance about it, as nn.LayerNorm; float32
            mean = tl.sum(x.to(tl.float32), axis=1) / K
            dev = tl.where(ok, x.to(tl.float32) - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(dev * dev, axis=1) / K + eps)
            x = _layer_norm(x, ok, g_ptr, beta_ptr, rk, k_ok, mean, rstd, LN_BIAS)
        acc = _mac(acc, x.to(w.dtype), w, BLOCK_M, IEEE)
    else:
        if LN:
            total = tl.zeros((BLOCK_M,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ok = m_ok[:, None] & (k0 + rk[None, :] < K)
                x = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + rk[None, :], mask=ok, other=0.0)
                total += tl.sum(x.to(tl.float32), axis=1)
            mean = total / K
            sq = tl.zeros((BLOCK_M,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ok = m_ok[:, None] & (k0 + rk[None, :] < K)
                x = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + rk[None, :], mask=ok, other=0.0)
                dev = tl.where(ok, x.to(tl.float32) - mean[:, None], 0.0)
                sq += tl.sum(dev * dev, axis=1)
            rstd = 1.0 / tl.sqrt(sq / K + eps)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            ok = m_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=ok, other=0.0)
            if LN:
                x = _layer_norm(x, ok, g_ptr, beta_ptr, kk, k_ok, mean, rstd, LN_BIAS)
            acc = _mac(acc, x.to(w.dtype), w, BLOCK_M, IEEE)
    if BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:  # tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both ends (exp -> 0 or inf)
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)  # sqrt(2 / pi): GPT-2's tanh GELU
        acc = 0.5 * acc * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    out_ok = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        acc += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=out_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_ok)


def linear_blocks(M: int, N: int, K: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an (M, K) x (K, N) product of the
    decode step, from benchmarks/tune_kernels.py on an H200 (GPT-2 124M shapes; NOTES.md). The
    step is bound by reading the weights and by memory latency: one row reads all of K at once (up
    to 1024) in narrow column blocks, so every SM streams a part of the weights in one trip; more
    rows use tl.dot (blocks of at least 16)."""
    if M == 1:
        if N > 4096:  # the LM head: 3,000+ programs, K in four trips
            return 1, 16, min(256, triton.next_power_of_2(K)), 1, 5
        if K > 1024:  # mlp.c_proj: K walked in 1024-wide blocks by 8 warps, 4 columns each
            return 1, 4, 1024, 8, 3
        return 1, 8 if N <= 1024 else 16, triton.next_power_of_2(K), 4, 3
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    if N > 4096:
        return block_m, 64, min(64, max(16, triton.next_power_of_2(K))), 4, 3
    block_n = 16 if N <= 1024 else 32
    return block_m, block_n, min(256, max(16, triton.next_power_of_2(K))), 4, 3


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm: tuple[Tensor, Tensor | None, float] | None = None,
    gelu: bool = False,
    residual: Tensor | None = None,
    blocks: tuple[int, int, int, int, int] | None = None,
) -> Tensor:
    """x (M, K) -> (M, N) with weight (N, K) as nn.Linear: optionally LayerNorm first (norm =
    (weight, bias, eps) over K), GELU (tanh) after the bias, and residual (M, N) added last.
    blocks: launch configuration (default linear_blocks'; benchmarks/tune_kernels.py tries others)."""
    M, K = x.shape
    N = weight.size(0)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    block_m, block_n, block_k, warps, stages = blocks or linear_blocks(M, N, K)
    g, beta, eps = norm if norm is not None else (weight, None, 0.0)
    res = residual if residual is not None else out
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    _linear_kernel[grid](
        x, weight, bias if bias is not None else weight, res, g, beta if beta is not None else g, out,
        M, N, K, x.stride(0), weight.stride(0), res.stride(0), out.stride(0), eps,
        LN=norm is not None, LN_BIAS=beta is not None, BIAS=bias is not None, GELU=gelu,
        RESIDUAL=residual is not None, IEEE=x.dtype == torch.float32, ONE_BLOCK=K <= block_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


@triton.jit
def _attention_kernel(
    qkv_ptr, k_ptr, v_ptr, pos_ptr, out_ptr,
    C, stride_qkv, stride_cb, stride_ch, stride_cs, stride_o, scale, CHUNK,
    HS: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """Row b, head h, columns [s * CHUNK, (s + 1) * CHUNK) for s = program_id(2): the program whose
    range holds pos[b] stores the new key and value there (and takes that column from registers);
    every program attends the query to its columns below pos[b] with an online softmax. Without
    SPLIT (one program per row and head) it writes the output; with SPLIT, its running max, sum
    of weights and weighted values (HS + 2 floats) for _attention_combine_kernel."""
    b, h, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = tl.load(pos_ptr + b)
    lo = part * CHUNK
    hi = tl.minimum(lo + CHUNK, p)  # old columns of this range: [lo, hi)
    mine = (lo <= p) & (p < lo + CHUNK)  # whether the new column is in this range
    d = tl.arange(0, HS)
    row = qkv_ptr + b * stride_qkv + h * HS
    q = tl.load(row + d).to(tl.float32) * scale
    k_new = tl.load(row + C + d).to(k_ptr.dtype.element_ty)
    v_new = tl.load(row + 2 * C + d).to(v_ptr.dtype.element_ty)
    k_row = k_ptr + b * stride_cb + h * stride_ch
    v_row = v_ptr + b * stride_cb + h * stride_ch
    tl.store(k_row + p * stride_cs + d, k_new, mask=mine & (d < HS))
    tl.store(v_row + p * stride_cs + d, v_new, mask=mine & (d < HS))
    # running max, normalizer and weighted sum, starting from the new column if it is ours
    m = tl.where(mine, tl.sum(q * k_new.to(tl.float32), axis=0), float("-inf"))
    den = tl.where(mine, 1.0, 0.0)
    acc = tl.where(mine, v_new.to(tl.float32), 0.0)
    for s0 in range(lo, hi, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        ok = cols < hi
        keys = tl.load(k_row + cols[:, None] * stride_cs + d[None, :], mask=ok[:, None], other=0.0)
        s = tl.where(ok, tl.sum(keys.to(tl.float32) * q[None, :], axis=1), float("-inf"))  # (BLOCK_S,)
        m_new = tl.maximum(m, tl.max(s, axis=0))  # finite: the block holds at least one column
        alpha = tl.exp(m - m_new)
        prob = tl.exp(s - m_new)
        vals = tl.load(v_row + cols[:, None] * stride_cs + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha + tl.sum(prob[:, None] * vals.to(tl.float32), axis=0)
        den = den * alpha + tl.sum(prob, axis=0)
        m = m_new
    if SPLIT:
        out = out_ptr + ((b * tl.num_programs(1) + h) * tl.num_programs(2) + part) * (HS + 2)
        tl.store(out + d, acc)
        tl.store(out + HS, m)
        tl.store(out + HS + 1, den)
    else:
        tl.store(out_ptr + b * stride_o + h * HS + d, (acc / den).to(out_ptr.dtype.element_ty))


@triton.jit
def _attention_combine_kernel(part_ptr, out_ptr, stride_o, PARTS, HS: tl.constexpr, PARTS_P2: tl.constexpr):
    """Row b, head h: merge the PARTS partial softmaxes of _attention_kernel (SPLIT) into the output."""
    b, h = tl.program_id(0), tl.program_id(1)
    i, d = tl.arange(0, PARTS_P2), tl.arange(0, HS)
    ok = i < PARTS
    base = part_ptr + (b * tl.num_programs(1) + h) * PARTS * (HS + 2) + i * (HS + 2)
    m = tl.load(base + HS, mask=ok, other=float("-inf"))  # (PARTS_P2,); -inf: a range past pos[b]
    den = tl.load(base + HS + 1, mask=ok, other=0.0)
    acc = tl.load(base[:, None] + d[None, :], mask=ok[:, None], other=0.0)  # (PARTS_P2, HS)
    w = tl.exp(m - tl.max(m, axis=0))  # the range holding pos[b] is finite, so the max is
    y = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * den, axis=0)
    tl.store(out_ptr + b * stride_o + h * HS + d, y.to(out_ptr.dtype.element_ty))


ATTENTION_CHUNK = 128  # columns per program when attention is split (and the single kernel's block)


def attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, n_head: int, split: bool = False) -> Tensor:
    """Causal attention of one new token per row: qkv (M, 3C) is c_attn's output for rows 0..M-1,
    whose slots are cache rows 0..M-1 (k_cache, v_cache (>= M, nh, S, hs)); row b's key and value
    are written at column pos[b] (M,) and its query attends to columns 0..pos[b]. Returns (M, C).

    split: spread each row and head over ceil(S / ATTENTION_CHUNK) programs and merge them in a
    second kernel (flash-decoding): worth it for long rows at small M, where one program per row
    and head would walk every column alone (GPT-2 at M=1: 12 programs on 132 SMs)."""
    M, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    out = torch.empty((M, C), device=qkv.device, dtype=qkv.dtype)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and qkv.stride(1) == 1
    parts = triton.cdiv(k_cache.size(2), ATTENTION_CHUNK) if split else 1
    chunk = ATTENTION_CHUNK if split else k_cache.size(2)
    dest = torch.empty((M, n_head, parts, hs + 2), device=qkv.device, dtype=torch.float32) if split else out
    _attention_kernel[(M, n_head, parts)](
        qkv, k_cache, v_cache, pos, dest,
        C, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), hs**-0.5, chunk,
        HS=hs, BLOCK_S=ATTENTION_CHUNK, SPLIT=split, num_warps=4,
    )  # fmt: skip
    if split:
        _attention_combine_kernel[(M, n_head)](
            dest, out, out.stride(0), parts, HS=hs, PARTS_P2=triton.next_power_of_2(parts), num_warps=1
        )
    return out


@triton.jit
def _embed_kernel(tok_ptr, pos_ptr, wte_ptr, wpe_ptr, out_ptr, C, BLOCK_C: tl.constexpr):
    """out[b] = wte[tok[b]] + wpe[pos[b]]."""
    b = tl.program_id(0)
    t, p = tl.load(tok_ptr + b), tl.load(pos_ptr + b)
    c = tl.arange(0, BLOCK_C)
    ok = c < C
    e = tl.load(wte_ptr + t * C + c, mask=ok, other=0.0).to(tl.float32)
    e += tl.load(wpe_ptr + p * C + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * C + c, e.to(out_ptr.dtype.element_ty), mask=ok)


def embed(tokens: Tensor, pos: Tensor, wte: Tensor, wpe: Tensor) -> Tensor:
    """Token plus position embedding of tokens (M,) at positions pos (M,): (M, C)."""
    M, C = tokens.size(0), wte.size(1)
    out = torch.empty((M, C), device=wte.device, dtype=wte.dtype)
    _embed_kernel[(M,)](tokens, pos, wte, wpe, out, C, BLOCK_C=triton.next_power_of_2(C), num_warps=4)
    return out


ARGMAX_BLOCK = 2048  # vocabulary entries per program of the first argmax stage


@triton.jit
def _argmax_part_kernel(x_ptr, val_ptr, idx_ptr, V, stride, BLOCK: tl.constexpr):
    """Row b, block j: the largest value of x[b, j*BLOCK : (j+1)*BLOCK] and its first index."""
    b, j = tl.program_id(0), tl.program_id(1)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + b * stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    tl.store(val_ptr + b * tl.num_programs(1) + j, tl.max(x, axis=0))
    tl.store(idx_ptr + b * tl.num_programs(1) + j, j * BLOCK + tl.argmax(x, axis=0))


@triton.jit
def _argmax_final_kernel(
    val_ptr, idx_ptr, out_ptr, token_ptr, pos_ptr, count_ptr, PARTS, max_pos,
    PARTS_P2: tl.constexpr, ADVANCE: tl.constexpr,
):  # fmt: skip
    """Row b: the first block holding the row's largest value gives the first index of it, as
    torch.argmax. With ADVANCE it is also the row's next input token, and its position
    (capped at max_pos) and token count move one on: the whole end of a greedy decode step."""
    b = tl.program_id(0)
    i = tl.arange(0, PARTS_P2)
    vals = tl.load(val_ptr + b * PARTS + i, mask=i < PARTS, other=float("-inf"))
    best = tl.load(idx_ptr + b * PARTS + tl.argmax(vals, axis=0))  # tl.argmax: the first maximum
    tl.store(out_ptr + b, best.to(out_ptr.dtype.element_ty))
    if ADVANCE:
        tl.store(token_ptr + b, best.to(token_ptr.dtype.element_ty))
        tl.store(pos_ptr + b, tl.minimum(tl.load(pos_ptr + b) + 1, max_pos))
        tl.store(count_ptr + b, tl.load(count_ptr + b) + 1)


def _argmax_into(logits: Tensor, out: Tensor, advance: tuple[Tensor, Tensor, Tensor, int] | None) -> None:
    M, V = logits.shape
    parts = triton.cdiv(V, ARGMAX_BLOCK)
    vals = torch.empty((M, parts), device=logits.device, dtype=torch.float32)
    idx = torch.empty((M, parts), device=logits.device, dtype=torch.int32)
    _argmax_part_kernel[(M, parts)](logits, vals, idx, V, logits.stride(0), BLOCK=ARGMAX_BLOCK, num_warps=4)
    token, pos, count, max_pos = advance if advance is not None else (out, out, out, 0)
    _argmax_final_kernel[(M,)](
        vals, idx, out, token, pos, count, parts, max_pos,
        PARTS_P2=triton.next_power_of_2(parts), ADVANCE=advance is not None, num_warps=1,
    )  # fmt: skip


def argmax(logits: Tensor) -> Tensor:
    """Row-wise argmax of logits (M, V) as int64 (M,), the first index of the maximum (as torch)."""
    out = torch.empty(logits.size(0), device=logits.device, dtype=torch.long)
    _argmax_into(logits, out, None)
    return out


def greedy_advance(logits: Tensor, out: Tensor, token: Tensor, pos: Tensor, count: Tensor, max_pos: int) -> None:
    """The end of a greedy step in two kernels: out[b] = token[b] = argmax(logits[b]) for logits
    (M, V) and the first M entries of out, token, pos, count (int64); pos[b] = min(pos[b] + 1,
    max_pos); count[b] += 1."""
    _argmax_into(logits, out, (token, pos, count, max_pos))
