"""Autoregressive generation with a KV cache: sampling (temperature, top-k, top-p), batched
prompts of different lengths (left-padded), stop at <|endoftext|>.

Context longer than block_size: a prompt longer than the context is an error. When prompt +
new tokens exceed block_size, generation goes on with a sliding window, as nanoGPT does: each
new token is predicted from the last block_size tokens, re-encoded at positions 0..block_size-1.
That invalidates the cache, so every step past the context length re-runs the window (slower,
but the same numbers as full recomputation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gpt2.attention import KVCache
from gpt2.model import GPT


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for sampling settings that make no sense."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or unset for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """logits (B, V) with everything outside the top-k and outside the top-p nucleus set to -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (keeps >= 1)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V); greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Batch prompts of different lengths: tokens (B, P) left-padded with pad_id, valid (B, P)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty prompt can be '<|endoftext|>')")
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[i, P - len(p) :] = True
    return tokens, valid


def prefill(model: GPT, tokens: Tensor, valid: Tensor, cache: KVCache) -> Tensor:
    """Run tokens (B, T) (left-padded; valid (B, T)) into an empty cache; return last logits (B, V)."""
    B, T = tokens.size()
    S = cache.max_len
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) each sequence starts at 0
    causal = torch.ones(T, S, dtype=torch.bool, device=tokens.device).tril()  # (T, S)
    key_valid = torch.zeros(B, S, dtype=torch.bool, device=tokens.device)
    key_valid[:, :T] = valid
    mask = causal[None] & key_valid[:, None, :]  # (B, T, S)
    mask |= torch.eye(T, S, dtype=torch.bool, device=tokens.device)[None]  # pads see themselves: no NaN
    cache.slots = torch.arange(T, device=tokens.device)
    cache.mask = mask[:, None]  # (B, 1, T, S)
    logits, _ = model(tokens, positions=positions, cache=cache)
    return logits[:, -1, :]


def decode_step(model: GPT, token: Tensor, slot: int, position: Tensor, key_valid: Tensor, cache: KVCache) -> Tensor:
    """Feed one token per sequence (B,) at cache column `slot` and `position` (B,); keys allowed
    are key_valid (B, S); return logits (B, V)."""
    cache.slots = torch.tensor([slot], device=token.device)
    cache.mask = key_valid[:, None, None, :]  # (B, 1, 1, S)
    logits, _ = model(token[:, None], positions=position[:, None], cache=cache)
    return logits[:, -1, :]


@torch.no_grad()
def generate_tokens(
    model: GPT,
    tokens: Tensor,
    valid: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    on_tokens: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Generate from left-padded tokens (B, P) with valid (B, P); return the new tokens (B, N),
    N <= max_new_tokens. With eos_id, a sequence that produced it gets eos_id from then on, and
    generation ends once every sequence has. on_tokens receives each step's tokens (B,)."""
    check_sampling_args(temperature, top_k, top_p)
    block_size = model.config.block_size
    B, P = tokens.size()
    if P > block_size:
        raise ValueError(f"prompt has {P} tokens but the model's context is {block_size}; shorten the prompt")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = tokens.device
    dtype = next(model.parameters()).dtype
    S = min(P + max_new_tokens, block_size)
    cache = KVCache(model.config, B, S, device=device, dtype=dtype)
    all_tokens, all_valid = tokens, valid
    logits = prefill(model, tokens, valid, cache)
    position = valid.long().sum(-1) - 1  # (B,) position of each sequence's last token
    key_valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    key_valid[:, :P] = valid
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        out.append(nxt)
        if on_tokens is not None:
            on_tokens(nxt)
        if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
            break
        all_tokens = torch.cat([all_tokens, nxt[:, None]], dim=1)
        all_valid = torch.cat([all_valid, torch.ones_like(nxt[:, None], dtype=torch.bool)], dim=1)
        slot = P + step
        if use_cache and slot < S:
            position = position + 1
            key_valid[:, slot] = True
            logits = decode_step(model, nxt, slot, position, key_valid, cache)
        else:  # no cache, or past the context: re-run the last block_size tokens
            window = slice(max(0, all_tokens.size(1) - block_size), None)
            cache = KVCache(model.config, B, min(all_tokens.size(1), block_size), device=device, dtype=dtype)
            logits = prefill(model, all_tokens[:, window], all_valid[:, window], cache)
    if not out:
        return tokens.new_zeros((B, 0))
    return torch.stack(out, dim=1)


def generate(model: GPT, idx: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
    """idx (B, T) -> (B, T + N): idx followed by up to max_new_tokens sampled tokens.
    Keywords as generate_tokens (temperature, top_k, top_p, generator, eos_id, use_cache)."""
    valid = torch.ones_like(idx, dtype=torch.bool)
    new = generate_tokens(model, idx, valid, max_new_tokens, **kwargs)
    return torch.cat([idx, new], dim=1)


def generate_batch(
    model: GPT, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 50256, **kwargs
) -> list[list[int]]:
    """Continue prompts of different lengths in one batch; return each one's new tokens (cut
    after eos_id when given)."""
    device = next(model.parameters()).device
    tokens, valid = left_pad(prompts, pad_id)
    new = generate_tokens(model, tokens.to(device), valid.to(device), max_new_tokens, **kwargs).tolist()
    eos_id = kwargs.get("eos_id")
    if eos_id is not None:
        new = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in new]
    return new
