"""The decode step of GPT-2 in fused kernels: one new token per sequence, five kernels per layer.

Per block (x the residual stream, (M, C)):
    qkv = LayerNorm_1(x) @ c_attn + b           one kernel (LayerNorm in the matmul's prologue)
    y   = attention(qkv, cache, pos)            one kernel (writes the new key and value too)
    x   = x + y @ attn.c_proj + b               one kernel (bias and residual in the epilogue)
    h   = gelu(LayerNorm_2(x) @ c_fc + b)       one kernel
    x   = x + h @ mlp.c_proj + b                one kernel
then logits = LayerNorm_f(x) @ wte^T (one kernel), after the embedding (one kernel): 5 * n_layer + 2
kernels instead of ~14 * n_layer. It is the model's forward for that case, on its own parameters
(eval mode: no dropout), tested equal to GPT.forward with a cache up to rounding.
"""

from __future__ import annotations

from torch import Tensor

from gpt2.kernels import ops
from gpt2.model import GPT


def decode_logits(
    model: GPT, k_cache: list[Tensor], v_cache: list[Tensor], tokens: Tensor, pos: Tensor, split: bool = False
) -> Tensor:
    """Logits (M, V) of tokens (M,) at positions pos (M,), row b being cache slot b; each layer's
    key and value go to column pos[b] of k_cache[layer], v_cache[layer] (>= M, nh, S, hs).
    split: attention spread over the cache columns (ops.attention; see gpt2.kernels.split_attention)."""
    t = model.transformer
    x = ops.embed(tokens, pos, t.wte.weight, t.wpe.weight)  # (M, C)
    for i, block in enumerate(t.h):
        attn, mlp = block.attn, block.mlp
        qkv = ops.linear(x, attn.c_attn.weight, attn.c_attn.bias, norm=_norm(block.ln_1))  # (M, 3C)
        y = ops.attention(qkv, k_cache[i], v_cache[i], pos, attn.n_head, split)  # (M, C)
        x = ops.linear(y, attn.c_proj.weight, attn.c_proj.bias, residual=x)
        h = ops.linear(x, mlp.c_fc.weight, mlp.c_fc.bias, norm=_norm(block.ln_2), gelu=True)  # (M, 4C)
        x = ops.linear(h, mlp.c_proj.weight, mlp.c_proj.bias, residual=x)
    return ops.linear(x, model.lm_head.weight, None, norm=_norm(t.ln_f))  # (M, V)


def _norm(ln) -> tuple[Tensor, Tensor | None, float]:
    return ln.weight, ln.bias, ln.eps
