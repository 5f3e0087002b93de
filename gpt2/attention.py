"""Causal self-attention, GPT-2 style: one fused QKV projection, then an output projection.

Shape key: B batch, T query length, S key length (cache slots), C n_embd, nh heads, hs head size.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.config import GPTConfig


class Cache(Protocol):
    """What an attention layer asks of a KV cache: KVCache below (gpt2.generation's reference) and
    gpt2.inference.runner.SlotCache (the engine's) are the two."""

    mask: Tensor | None  # (B, 1, T, S) or broadcastable: True / 0.0 where a query may see a key

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this pass's keys and values k, v (B, nh, T, hs) of `layer`; return the keys and
        values (B, nh, S, hs) its queries attend to."""
        ...


class KVCache:
    """Preallocated keys and values for every layer, written in place at given slots.

    Each layer has its own fixed-shape (B, nh, S, hs) key and value tensor, so a decode step
    has static shapes (it can be compiled and graph-captured); separate tensors rather than
    slices of one, because torch.compile copies a whole slice to update a view of a larger
    input but writes a whole tensor in place. A forward pass that uses the cache sets `slots`
    (T,) - the buffer columns its T tokens go to - and `mask` (B, 1, T, S), True (or 0.0 in an
    additive float mask) where a query may attend to a key; `gpt2.generation` builds both.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.slots: Tensor | None = None  # (T,) long
        self.mask: Tensor | None = None  # (B, 1, T, S) bool, or additive float

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nh, T, hs) at self.slots of `layer`; return all keys and values (B, nh, S, hs)."""
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.index_copy_(2, self.slots, k.to(k_all.dtype))
        v_all.index_copy_(2, self.slots, v.to(v_all.dtype))
        return k_all, v_all


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with fused QKV (`c_attn`) and output projection (`c_proj`)."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which slice of a KVCache this layer owns
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C). Without a cache, attention is causal over x itself."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask = None
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs)
            mask = cache.mask  # (B, 1, T, S)
            q = q.to(k.dtype)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))
