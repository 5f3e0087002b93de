"""Autoregressive generation with a KV cache: sampling (temperature, top-k, top-p), batched
prompts of different lengths (left-padded), stop at <|endoftext|>.

Context longer than block_size: a prompt longer than the context is an error. When prompt +
new tokens exceed block_size, generation goes on with a sliding window, as nanoGPT does: each
new token is predicted from the last block_size tokens, re-encoded at positions 0..block_size-1.
That invalidates the cache, so every step past the context length re-runs the window (slower,
but the same numbers as full recomputation).

Every `model` below is a gpt2.GPT (typed as nn.Module so this module does not import the model,
which calls into it from GPT.generate).

This is the readable reference: a plain KV cache, eager decoding and the sampling formula, used
by GPT.generate, training samples and the tests as the oracle. The fast path (continuous
batching, CUDA graphs, fused decode kernels: `gpt2 generate` and `gpt2 serve`) is gpt2.inference,
tested against this module token for token.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gpt2.attention import KVCache


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for sampling settings that make no sense."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or unset for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # also refuses nan
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """logits (B, V) with everything outside the top-k and outside the top-p nucleus set to -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass; the top token
        # always stays (a top_p below float32's smallest number would otherwise drop it too)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[..., 0] = False
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


def prefill(model: nn.Module, tokens: Tensor, valid: Tensor, cache: KVCache) -> Tensor:
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


def decode_step(
    model: nn.Module, token: Tensor, slot: int, position: Tensor, key_valid: Tensor, cache: KVCache
) -> Tensor:
    """Feed one token per sequence (B,) at cache column `slot` and `position` (B,); keys allowed
    are key_valid (B, S); return logits (B, V)."""
    cache.slots = torch.tensor([slot], device=token.device)
    cache.mask = additive_mask(key_valid[:, None, None, :], cache.dtype)  # (B, 1, 1, S)
    logits, _ = model(token[:, None], positions=position[:, None], cache=cache)
    return logits[:, -1, :]


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """0.0 where allowed, -inf elsewhere: the mask SDPA makes of a boolean one. Decoding passes it
    in this form, as gpt2.inference's runner does, so both run the same attention kernel (a
    boolean mask may send SDPA to another backend, with other rounding)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class EagerDecoder:
    """The plain decode loop's step (the reference): new index and mask tensors every step."""

    def __init__(self, model: nn.Module, cache: KVCache, valid: Tensor) -> None:
        B, P = valid.size()
        self.model, self.cache = model, cache
        self.slot = P - 1  # cache column of the last token fed
        self.position = valid.long().sum(-1) - 1  # (B,) position of each sequence's last token
        self.key_valid = torch.zeros(B, cache.max_len, dtype=torch.bool, device=valid.device)  # (B, S)
        self.key_valid[:, :P] = valid

    def __call__(self, token: Tensor) -> Tensor:
        """Feed token (B,) at the next cache column; return the next logits (B, V)."""
        self.slot += 1
        self.position = self.position + 1
        self.key_valid[:, self.slot] = True
        return decode_step(self.model, token, self.slot, self.position, self.key_valid, self.cache)


# Without streaming, whether every sequence has stopped is asked of the GPU only this often, so
# steps are not each held up by a device-to-host copy; the extra steps are cut off at the end.
EOS_CHECK_EVERY = 16


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
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
    **removed,
) -> Tensor:
    """Generate from left-padded tokens (B, P) with valid (B, P); return the new tokens (B, N),
    N <= max_new_tokens. With eos_id, a sequence that produced it gets eos_id from then on, and
    generation ends once every sequence has. on_tokens receives each step's tokens (B,).
    use_cache=False recomputes the whole window every step (the reference of the reference).
    """
    _warn_removed(removed)
    check_sampling_args(temperature, top_k, top_p)
    block_size = model.config.block_size
    B, P = tokens.size()
    if P > block_size:
        raise ValueError(f"prompt has {P} tokens but the model's context is {block_size}; shorten the prompt")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return tokens.new_zeros((B, 0))
    device = tokens.device
    dtype = next(model.parameters()).dtype
    S = min(P + max_new_tokens, block_size)  # positions the cache serves; past them the window slides
    # Cache columns rounded up to a multiple of 16 (never attended): SDPA's memory-efficient kernel
    # wants the mask's rows 16-aligned and would otherwise pad the mask in every layer of every step.
    cache = KVCache(model.config, B, -(-S // 16) * 16, device=device, dtype=dtype)
    logits = prefill(model, tokens, valid, cache)  # (B, V)
    decoder = EagerDecoder(model, cache, valid) if use_cache else None
    out = torch.empty((B, max_new_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        out[:, step] = nxt
        if on_tokens is not None:
            on_tokens(nxt)
        n = step + 1
        check_eos = eos_id is not None and (on_tokens is not None or n % EOS_CHECK_EVERY == 0)
        if n == max_new_tokens or (check_eos and bool(finished.all())):
            break
        if decoder is not None and P + step < S:
            logits = decoder(nxt)
        else:  # no cache, or past the context: re-run the last block_size tokens
            all_tokens = torch.cat([tokens, out[:, :n]], dim=1)  # (B, P + n)
            all_valid = torch.cat([valid, torch.ones_like(out[:, :n], dtype=torch.bool)], dim=1)
            window = slice(max(0, all_tokens.size(1) - block_size), None)
            cache = KVCache(model.config, B, min(all_tokens.size(1), block_size), device=device, dtype=dtype)
            logits = prefill(model, all_tokens[:, window], all_valid[:, window], cache)
    return _cut_after_all_stopped(out[:, :n], eos_id)


# Keywords of the fast path that lived here (StaticDecoder); it is gpt2.inference's engine now.
_REMOVED = ("fast", "cuda_graph", "compile")


def _warn_removed(removed: dict) -> None:
    """Accept the removed keywords for one release, with a warning; refuse anything else."""
    unknown = sorted(set(removed) - set(_REMOVED))
    if unknown:
        raise TypeError(f"generate_tokens() got unexpected keyword argument(s) {', '.join(unknown)}")
    if removed:
        warnings.warn(
            f"generate_tokens ignores {', '.join(sorted(removed))}: the reference always decodes eagerly; "
            "the fast path is gpt2.inference (gpt2 generate); these keywords go away in the next release",
            DeprecationWarning,
            stacklevel=3,
        )


def _cut_after_all_stopped(out: Tensor, eos_id: int | None) -> Tensor:
    """out (B, n) cut after the step at which the last sequence produced eos_id, if all have."""
    if eos_id is None:
        return out
    hit = out == eos_id  # (B, n)
    if not bool(hit.any(dim=1).all()):
        return out
    first = hit.int().argmax(dim=1)  # (B,) each sequence's first eos_id
    return out[:, : int(first.max()) + 1]


def generate(model: nn.Module, idx: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
    """idx (B, T) -> (B, T + N): idx followed by up to max_new_tokens sampled tokens.
    Keywords as generate_tokens (temperature, top_k, top_p, generator, eos_id, use_cache, on_tokens)."""
    valid = torch.ones_like(idx, dtype=torch.bool)
    new = generate_tokens(model, idx, valid, max_new_tokens, **kwargs)
    return torch.cat([idx, new], dim=1)


def generate_batch(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 50256, **kwargs
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
