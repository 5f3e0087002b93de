"""Batched sampling for the engine: per-row settings, random numbers that ignore the batch.

Each row of a decode batch has its own temperature, top-k, top-p, min-p, seed and penalties, held
in (B,) tensors (the penalties' per-row vocabulary buffers: gpt2.inference.penalties), so one
batched step serves requests with different settings. The filtering is gpt2.generation's
filter_logits applied row by row (same keep rule, tested equal). The draw is inverse-CDF sampling:
one uniform u per row, and the token is the first whose cumulative probability (in vocabulary
order) exceeds u, which draws exactly from softmax(logits / T) up to float32 rounding (u has 24
random bits: a token of probability below ~6e-8 is practically never drawn).

u comes from a counter-based hash of (seed, token index), not from a generator: a request's
random numbers depend only on its own seed and how many tokens it has produced, never on which
other requests share the batch or in which row it sits. The hash is plain integer tensor
arithmetic on (B,) values, so it runs inside a CUDA graph and on a CPU alike (no per-row generator
calls), and costs next to nothing; the per-token work is one softmax, one cumsum and one search.
Integers are 32-bit values held in int64, and every product stays below 2**63 (multipliers are
below 2**31), so nothing relies on overflow behaviour.

The settings live in one (rows,) device buffer each (ROW_SETTINGS; the runner's DecodeState holds
them), filled from a sequence's fields by encode_settings and read by sample: a new setting is one
entry in each of the three.

A step's mode says what its rows need, as bit flags: SAMPLE (some row draws), FILTER (some row
draws after top-k / top-p / min-p; includes SAMPLE), PENALIZE (some row's logits change first:
penalties, logit_bias, min_tokens). A step runs in the union of its rows' modes, and each mode is
its own CUDA graph, so rows without filters or penalties never pay for them; a row whose settings
are off in a mode computes exactly what it would without it.

Shape key: B rows, V vocab_size, K top logprobs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from gpt2.inference import penalties
from gpt2.inference.scheduler import Sequence

_DRAW, _FILTER = 1, 2
GREEDY, SAMPLE, FILTER = 0, _DRAW, _DRAW | _FILTER  # argmax only; + temperature; + top-k / top-p / min-p
PENALIZE = 4  # with any of them: penalties, logit_bias and min_tokens before the draw
MODES = tuple(draw | pen for pen in (0, PENALIZE) for draw in (GREEDY, SAMPLE, FILTER))  # every step mode
_M32 = 0xFFFFFFFF

TopLogprobs = list[tuple[int, float]]  # (token id, log p), most likely first

# Per-row settings of a decode batch: name -> (dtype, the value a row without a sequence holds).
ROW_SETTINGS: dict[str, tuple[torch.dtype, float]] = {
    "temperature": (torch.float32, 0.0),  # 0 = greedy
    "top_k": (torch.long, 0),  # V = no limit
    "top_p": (torch.float32, 1.0),  # 1.0 = no limit
    "min_p": (torch.float32, 0.0),  # 0.0 = no limit
    "seed": (torch.long, 0),  # with the token index, the only input of the sampling noise
    "presence": (torch.float32, 0.0),  # the penalties (gpt2.inference.penalties)
    "frequency": (torch.float32, 0.0),
    "repetition": (torch.float32, 1.0),
    "min_tokens": (torch.long, 0),
}


def encode_settings(seqs: list[Sequence], vocab_size: int) -> dict[str, Tensor]:
    """The sequences' settings as host tensors (n,) in ROW_SETTINGS' encoding."""
    V = vocab_size

    def f32(values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32)

    return {
        "temperature": f32([s.temperature for s in seqs]),
        "top_k": torch.tensor([s.top_k if s.top_k is not None else V for s in seqs]),
        "top_p": f32([s.top_p if s.top_p is not None else 1.0 for s in seqs]),
        "min_p": f32([s.min_p for s in seqs]),
        "seed": torch.tensor([s.seed for s in seqs]),
        "presence": f32([s.presence_penalty for s in seqs]),
        "frequency": f32([s.frequency_penalty for s in seqs]),
        "repetition": f32([s.repetition_penalty for s in seqs]),
        "min_tokens": torch.tensor([s.min_tokens for s in seqs]),
    }


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` (0, 1, ...) of a seeded request: choice 0 keeps the seed, the
    others are spread by the golden-ratio increment (gpt2 serve's n and gpt2 generate's samples)."""
    return (seed + choice * 0x9E3779B97F4A7C15) % 2**63


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche mix (xor-shift-multiply rounds) of x, elementwise; x in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def row_keys(seed: Tensor, index: Tensor) -> Tensor:
    """One 32-bit key per row (B,) from its seed (B,) int64 and token index (B,) int64."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    k = _mix32(lo ^ 0x2545F491)
    k = _mix32(k ^ hi)
    return _mix32(k ^ (index & _M32))


def uniforms(seed: Tensor, index: Tensor) -> Tensor:
    """One uniform (B,) float32 in (0, 1) per row, a pure function of (seed, index) (B,) int64."""
    x = row_keys(seed, index)
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)  # 24 bits; never 0 or 1


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Per row, the first index (B,) whose cumulative probability exceeds u * total; probs (B, V)."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = (u * cdf[:, -1])[:, None]  # (B, 1): scaled by the total, so rounding never runs off the end
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.size(-1) - 1)


def filter_rows(logits: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor | None = None) -> Tensor:
    """logits (B, V) float with, per row, everything below its min_p (B,) x the most likely token's
    probability (0 = no limit), outside its top_k (B,) long (V = no limit) and outside its top_p
    (B,) nucleus (1.0 = no limit) set to -inf; the rule of filter_logits."""
    V = logits.size(-1)
    if min_p is not None:
        probs = torch.softmax(logits, dim=-1)  # (B, V)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (B, V)
    kth = sorted_logits.gather(-1, (top_k.clamp(1, V) - 1)[:, None])  # (B, 1) k-th largest value
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the tokens ranked above it already hold top_p of the mass; the top token
    # always stays (a top_p below float32's smallest number would otherwise drop it too)
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop = drop | (sorted_logits == float("-inf"))
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample_rows(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    seed: Tensor,
    index: Tensor,
    mode: int,
    min_p: Tensor | None = None,
) -> Tensor:
    """Next tokens (B,) from logits (B, V): argmax where temperature (B,) is 0, else a draw at that
    temperature after min-p / top-k / top-p (FILTER modes only), from the uniform of (seed, index)
    (B,). A row without filters draws the same token in SAMPLE and FILTER mode."""
    greedy = logits.argmax(dim=-1)  # (B,)
    if not mode & _DRAW:
        return greedy
    t = torch.where(temperature > 0, temperature, 1.0)  # (B,) greedy rows: any finite divisor
    z = logits.float() / t[:, None]  # (B, V)
    if mode & _FILTER:
        z = filter_rows(z, top_k, top_p, min_p)
    sampled = inverse_cdf(torch.softmax(z, dim=-1), uniforms(seed, index))  # (B,)
    return torch.where(temperature > 0, sampled, greedy)


def sample(logits: Tensor, settings: Mapping[str, Tensor], index: Tensor, mode: int) -> Tensor:
    """Next tokens (B,) from logits (B, V) with per-row settings (ROW_SETTINGS' names -> (B,); in a
    PENALIZE mode also the penalties' buffers) at token index (B,): sample_rows on a decode batch's
    buffers, after the penalties in a PENALIZE mode."""
    s = settings
    if mode & PENALIZE:
        logits = penalties.penalize(logits, s, index)
    return sample_rows(logits, s["temperature"], s["top_k"], s["top_p"], s["seed"], index, mode, s["min_p"])


def top_logprobs(logits: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """From logits (B, V) of the model's own distribution (temperature 1, unfiltered): log p of
    chosen (B,), and the k most likely tokens' log p (B, K) and ids (B, K)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    picked = logp.gather(-1, chosen[:, None]).squeeze(-1)  # (B,)
    values, ids = torch.topk(logp, k, dim=-1)  # (B, K)
    return picked, values, ids


def mode_of(s: Sequence, vocab_size: int) -> int:
    """The cheapest step mode that serves one sequence's settings."""
    pen = PENALIZE if penalties.penalized(s) else 0
    if s.temperature == 0:
        return GREEDY | pen
    if (s.top_k is not None and s.top_k < vocab_size) or (s.top_p is not None and s.top_p < 1.0) or s.min_p > 0:
        return FILTER | pen
    return SAMPLE | pen


def logprob_list(
    lp: tuple[Tensor, Tensor, Tensor] | None, k: int, targets: list[int], rows: list[int] | None = None
) -> list[tuple[float, TopLogprobs]]:
    """[(log p of target, [(id, log p)] * k)] per target from (chosen, top values, top ids) tensors."""
    if lp is None:
        return [(float("nan"), []) for _ in targets]
    chosen, values, ids = lp
    if rows is not None:
        chosen, values, ids = chosen[rows], values[rows], ids[rows]
    chosen, values, ids = chosen.tolist(), values[:, :k].tolist(), ids[:, :k].tolist()
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids, values)]
