"""Autoregressive generation with a KV cache: sampling (temperature, top-k, top-p, min-p),
penalties (presence, frequency, repetition, logit bias, min_tokens), batched prompts of different
lengths (left-padded), stop at <|endoftext|> and at stop token ids.

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


def check_sampling_args(
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None = None,
    *,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[int, float] | None = None,
    min_tokens: int = 0,
) -> None:
    """Raise ValueError for sampling settings that make no sense (the ranges are OpenAI's and vLLM's)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or unset for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # also refuses nan
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not -2.0 <= value <= 2.0:
            raise ValueError(f"{name} must be in [-2, 2], got {value}")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be > 0 and finite (1 = none), got {repetition_penalty}")
    for token, bias in (logit_bias or {}).items():
        if not -100.0 <= bias <= 100.0:
            raise ValueError(f"logit_bias of token {token} must be in [-100, 100], got {bias}")
    if min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")


def filter_logits(
    logits: Tensor, top_k: int | None = None, top_p: float | None = None, min_p: float | None = None
) -> Tensor:
    """logits (B, V) with everything below min_p x the most likely token's probability, outside the
    top-k and outside the top-p nucleus (of what is left) set to -inf, in that order (vLLM's)."""
    if min_p is not None and min_p > 0:
        probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
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


def penalize_logits(
    logits: Tensor,
    prompt: Tensor,
    valid: Tensor,
    generated: Tensor,
    *,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[int, float] | None = None,
    suppress: tuple[int, ...] = (),
) -> Tensor:
    """Float logits (B, V) after, in vLLM's order: logit_bias added; the `suppress` ids set to -inf
    (end of text and stop ids before min_tokens); repetition_penalty over every token of the prompt
    (B, P; valid (B, P)) and of the generated tokens (B, n) (HF / CTRL: a positive logit divided by
    it, a negative one multiplied); frequency x count and presence x (count > 0) over the generated
    tokens subtracted (OpenAI's definition)."""
    B, V = logits.size()
    z = logits.float().clone()
    for token, bias in (logit_bias or {}).items():
        z[:, token] += bias
    if suppress:
        z[:, list(suppress)] = float("-inf")
    counts = torch.zeros(B, V, device=z.device).scatter_add_(1, generated, torch.ones_like(generated, dtype=z.dtype))
    in_prompt = torch.zeros(B, V, device=z.device).scatter_add_(1, prompt, valid.float())
    seen = (counts > 0) | (in_prompt > 0)  # (B, V)
    rep = torch.full((B, 1), repetition_penalty, device=z.device)  # per row, as the engine holds it
    z = torch.where(seen, torch.where(z > 0, z / rep, z * rep), z)
    frequency = torch.full((B, 1), frequency_penalty, device=z.device)
    presence = torch.full((B, 1), presence_penalty, device=z.device)
    return z - (frequency * counts + presence * (counts > 0))


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    min_p: float | None = None,
) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V); greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p, min_p)
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
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    stop_token_ids: tuple[int, ...] = (),
    min_tokens: int = 0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[int, float] | None = None,
    use_cache: bool = True,
    on_tokens: Callable[[Tensor], None] | None = None,
    **removed,
) -> Tensor:
    """Generate from left-padded tokens (B, P) with valid (B, P); return the new tokens (B, N),
    N <= max_new_tokens. With eos_id, a sequence that produced it gets eos_id from then on, and
    generation ends once every sequence has; a token of stop_token_ids ends a sequence the same
    way (it gets that token from then on). Before min_tokens new tokens, eos_id and the stop ids
    are never drawn. The penalties are penalize_logits'. on_tokens receives each step's tokens (B,).
    use_cache=False recomputes the whole window every step (the reference of the reference).
    """
    _warn_removed(removed)
    penalties = dict(
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty,
        logit_bias=logit_bias,
    )
    check_sampling_args(temperature, top_k, top_p, min_p, min_tokens=min_tokens, **penalties)
    block_size = model.config.block_size
    B, P = tokens.size()
    if P > block_size:
        raise ValueError(f"prompt has {P} tokens but the model's context is {block_size}; shorten the prompt")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return tokens.new_zeros((B, 0))
    device = tokens.device
    stops = stop_ids(eos_id, stop_token_ids)
    penalized = presence_penalty != 0 or frequency_penalty != 0 or repetition_penalty != 1 or bool(logit_bias)
    penalized = penalized or (min_tokens > 0 and bool(stops))
    S = min(P + max_new_tokens, block_size)  # positions the cache serves; past them the window slides
    logits, decoder = _start(model, tokens, valid, S, use_cache)  # (B, V)
    out = torch.empty((B, max_new_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    ended_by = torch.zeros(B, dtype=torch.long, device=device)  # the stop token of each finished row
    for step in range(max_new_tokens):
        if penalized:
            suppress = stops if step < min_tokens else ()
            logits = penalize_logits(logits, tokens, valid, out[:, :step], suppress=suppress, **penalties)
        nxt = sample_next(logits, temperature, top_k, top_p, generator, min_p)  # (B,)
        if stops:
            nxt = torch.where(finished, ended_by, nxt)
            ended_by = torch.where(finished, ended_by, nxt)
            finished |= torch.isin(nxt, torch.tensor(stops, device=device))
        out[:, step] = nxt
        if on_tokens is not None:
            on_tokens(nxt)
        n = step + 1
        check_eos = stops and (on_tokens is not None or n % EOS_CHECK_EVERY == 0)
        if n == max_new_tokens or (check_eos and bool(finished.all())):
            break
        if decoder is not None and P + step < S:
            logits = decoder(nxt)
        else:  # no cache, or past the context: re-run the last block_size tokens
            logits = _window_logits(model, tokens, valid, out[:, :n])
    return _cut_after_all_stopped(out[:, :n], stops)


def stop_ids(eos_id: int | None, stop_token_ids: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The tokens that end a sequence: eos_id (when given) and the stop ids, each once."""
    return tuple(dict.fromkeys(([] if eos_id is None else [eos_id]) + list(stop_token_ids)))


def _start(
    model: nn.Module, tokens: Tensor, valid: Tensor, S: int, use_cache: bool
) -> tuple[Tensor, EagerDecoder | None]:
    """Prefill a cache of S positions: the last logits (B, V) and the decoder that goes on from them."""
    dtype = next(model.parameters()).dtype
    # Cache columns rounded up to a multiple of 16 (never attended): SDPA's memory-efficient kernel
    # wants the mask's rows 16-aligned and would otherwise pad the mask in every layer of every step.
    cache = KVCache(model.config, tokens.size(0), -(-S // 16) * 16, device=tokens.device, dtype=dtype)
    logits = prefill(model, tokens, valid, cache)  # (B, V)
    return logits, (EagerDecoder(model, cache, valid) if use_cache else None)


def _window_logits(model: nn.Module, tokens: Tensor, valid: Tensor, new: Tensor) -> Tensor:
    """The next logits (B, V) from the last block_size tokens of prompt (B, P) + new (B, n), re-encoded."""
    block_size = model.config.block_size
    all_tokens = torch.cat([tokens, new], dim=1)  # (B, P + n)
    all_valid = torch.cat([valid, torch.ones_like(new, dtype=torch.bool)], dim=1)
    window = slice(max(0, all_tokens.size(1) - block_size), None)
    dtype = next(model.parameters()).dtype
    cache = KVCache(
        model.config, tokens.size(0), min(all_tokens.size(1), block_size), device=tokens.device, dtype=dtype
    )
    return prefill(model, all_tokens[:, window], all_valid[:, window], cache)


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


def _cut_after_all_stopped(out: Tensor, stops: tuple[int, ...]) -> Tensor:
    """out (B, n) cut after the step at which the last sequence produced a stop token, if all have."""
    if not stops:
        return out
    hit = torch.isin(out, torch.tensor(stops, device=out.device))  # (B, n)
    if not bool(hit.any(dim=1).all()):
        return out
    first = hit.int().argmax(dim=1)  # (B,) each sequence's first stop token
    return out[:, : int(first.max()) + 1]


def generate(model: nn.Module, idx: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
    """idx (B, T) -> (B, T + N): idx followed by up to max_new_tokens sampled tokens.
    Keywords as generate_tokens (temperature, top_k, top_p, min_p, penalties, generator, eos_id, ...)."""
    valid = torch.ones_like(idx, dtype=torch.bool)
    new = generate_tokens(model, idx, valid, max_new_tokens, **kwargs)
    return torch.cat([idx, new], dim=1)


def generate_batch(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 50256, **kwargs
) -> list[list[int]]:
    """Continue prompts of different lengths in one batch; return each one's new tokens (cut after
    the first stop token, eos_id or one of stop_token_ids, when given)."""
    device = next(model.parameters()).device
    tokens, valid = left_pad(prompts, pad_id)
    new = generate_tokens(model, tokens.to(device), valid.to(device), max_new_tokens, **kwargs).tolist()
    stops = set(stop_ids(kwargs.get("eos_id"), kwargs.get("stop_token_ids", ())))
    return [next((row[: i + 1] for i, t in enumerate(row) if t in stops), row) for row in new]
