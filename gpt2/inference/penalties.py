"""Penalties and biases per row of a decode batch, on the device: OpenAI's presence / frequency
penalties and logit_bias, vLLM's repetition_penalty and min_tokens (end of text and stop token ids
never drawn before it).

Applied before the draw in vLLM's order (gpt2.generation.penalize_logits is the reference, tested
equal token for token): logit_bias and the min_tokens suppression, then repetition (over the prompt
and the generated tokens: a positive logit divided by it, a negative one multiplied), then
frequency x count + presence x (count > 0) over the generated tokens subtracted.

Everything a step reads lives in device buffers of static shape, updated in place: the step stays
one CUDA graph and nothing goes to the host per token.

  (rows, V)  counts  int32  generated tokens per vocabulary entry
             offset  fp32   frequency x count + presence x (count > 0): what the step subtracts,
                            kept up to date at the B entries a step changes instead of recomputed
             seen    bool   in the prompt or generated (repetition_penalty)
  (rows, W)  a sparse table per row, W = 300 logit_bias entries + 64 stop ids + end of text:
             bias_ids int64, bias_values fp32, bias_stops bool (the entry is a stop token:
             -inf while fewer than min_tokens tokens are out), added with one scatter.

9 bytes x V per row: 14.9 MB for 33 rows (max_batch 32 + the scratch slot) at V = 50257, 58.3 MB for
129; the tables 13 bytes x W: 0.16 / 0.61 MB. A row without penalties holds neutral values (no
entries, repetition 1, offset 0), so a penalized step leaves its logits exactly as they were; steps
whose rows have no penalties skip all of this (the PENALIZE mode bit, see gpt2.inference.sampling).

Shape key: B rows, V vocab_size, W table width, n newcomers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from gpt2.generation import check_sampling_args, stop_ids
from gpt2.inference.scheduler import Sequence

MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias (OpenAI's limit)
MAX_STOP_TOKEN_IDS = 64  # entries of one request's stop_token_ids
WIDTH = MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS + 1  # W: + end of text

VOCAB_BUFFERS: dict[str, torch.dtype] = {"counts": torch.int32, "offset": torch.float32, "seen": torch.bool}
TABLE: dict[str, torch.dtype] = {"bias_ids": torch.long, "bias_values": torch.float32, "bias_stops": torch.bool}


def penalized(s: Sequence) -> bool:
    """Whether a sequence's logits change before its draw (its steps then run in PENALIZE mode)."""
    changes = s.presence_penalty != 0 or s.frequency_penalty != 0 or s.repetition_penalty != 1
    return changes or bool(s.logit_bias) or (s.min_tokens > 0 and (s.stop_at_eos or bool(s.stop_token_ids)))


def check(s: Sequence, vocab_size: int | None = None) -> None:
    """Raise ValueError for settings the engine cannot run (before they reach a device buffer);
    token ids are checked against vocab_size when it is given."""
    check_sampling_args(
        s.temperature,
        s.top_k,
        s.top_p,
        s.min_p,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        logit_bias=s.logit_bias,
        min_tokens=s.min_tokens,
    )
    bias, stops = s.logit_bias or {}, s.stop_token_ids
    if len(bias) > MAX_LOGIT_BIAS or len(stops) > MAX_STOP_TOKEN_IDS:
        raise ValueError(
            f"logit_bias holds at most {MAX_LOGIT_BIAS} tokens and stop_token_ids {MAX_STOP_TOKEN_IDS}, "
            f"got {len(bias)} and {len(stops)}"
        )
    bad = [t for t in (*bias, *stops) if vocab_size is not None and not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} (logit_bias / stop_token_ids) is outside the vocabulary [0, {vocab_size})")


def encode_table(seqs: list[Sequence], eos_id: int, vocab_size: int) -> dict[str, Tensor]:
    """The sequences' tables (n, W) as host tensors: logit_bias entries, then (with min_tokens) the
    tokens that stop it (end of text only where the model can draw it: a model with a smaller
    vocabulary than the tokenizer's never does); unused entries add 0.0 to token 0."""
    n = len(seqs)
    out = {name: torch.zeros((n, WIDTH), dtype=dtype) for name, dtype in TABLE.items()}
    for i, s in enumerate(seqs):
        bias = s.logit_bias or {}
        k = len(bias)
        if k:
            out["bias_ids"][i, :k] = torch.tensor(list(bias))
            out["bias_values"][i, :k] = torch.tensor(list(bias.values()), dtype=torch.float32)
        eos = eos_id if s.stop_at_eos and eos_id < vocab_size else None  # check() bounded stop_token_ids
        stops = stop_ids(eos, s.stop_token_ids) if s.min_tokens > 0 else ()
        if stops:
            out["bias_ids"][i, k : k + len(stops)] = torch.tensor(stops)
            out["bias_stops"][i, k : k + len(stops)] = True
    return out


def prompt_entries(seqs: list[Sequence], slots: list[int]) -> tuple[Tensor, Tensor]:
    """(row, token) host index tensors of every prompt token of the sequences with a repetition
    penalty, row = the sequence's slot: what `seen` starts with."""
    pairs = [(slot, t) for s, slot in zip(seqs, slots) if s.repetition_penalty != 1 for t in s.prompt]
    if not pairs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    rows, tokens = torch.tensor(pairs).unbind(1)
    return rows, tokens


def penalize(logits: Tensor, s: Mapping[str, Tensor], index: Tensor) -> Tensor:
    """Float logits (B, V) after the rows' table (logit_bias; stop tokens -inf while index (B,) <
    min_tokens), repetition over `seen`, and `offset` subtracted; s holds the rows' (B,) settings
    (ROW_SETTINGS) and their VOCAB_BUFFERS and TABLE views. logits itself is left as it is."""
    suppress = s["bias_stops"] & (index < s["min_tokens"])[:, None]  # (B, W)
    add = s["bias_values"].masked_fill(suppress, float("-inf"))
    z = logits.to(torch.float32, copy=True).scatter_add_(1, s["bias_ids"], add)  # (B, V)
    rep = s["repetition"][:, None]  # (B, 1)
    z = torch.where(s["seen"], torch.where(z > 0, z / rep, z * rep), z)
    return z - s["offset"]


def count(buffers: Mapping[str, Tensor], rows: Tensor, tokens: Tensor) -> None:
    """Record tokens (n,) just drawn for rows (n,) (distinct) in the full buffers: counts + 1,
    offset = frequency x count + presence, seen."""
    b = buffers
    c = b["counts"][rows, tokens] + 1  # (n,)
    b["counts"][rows, tokens] = c
    b["offset"][rows, tokens] = b["frequency"][rows] * c + b["presence"][rows]
    b["seen"][rows, tokens] = torch.ones_like(tokens, dtype=torch.bool)
