"""LAMBADA (OpenAI version, GPT-2's zero-shot benchmark): predict the last word of a passage; accuracy
of greedy decoding and perplexity of the word (conventions in the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gpt2.evaluation.loss import perplexity
from gpt2.evaluation.scoring import Progress, model_config, resolve_rank, score_continuations, sum_over_ranks
from gpt2.evaluation.task_data import LambadaExample
from gpt2.tokenizer import EOT_ID, Tokenizer


def lambada_requests(
    examples: Sequence[LambadaExample], block_size: int, *, tokenizer=None
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """((context, target) token requests; number of contexts truncated from the left to fit block_size)."""
    tok = tokenizer or Tokenizer()
    ctx_ids = tok.encode_batch([ex.context for ex in examples], allow_special=False)
    tgt_ids = tok.encode_batch([ex.target for ex in examples], allow_special=False)
    requests, truncated = [], 0
    for ex, ctx, tgt in zip(examples, ctx_ids, tgt_ids):
        if len(tgt) > block_size:
            raise ValueError(f"LAMBADA target {ex.target!r} has {len(tgt)} tokens; the model's context is {block_size}")
        keep = block_size + 1 - len(tgt)
        if len(ctx) > keep:
            ctx, truncated = ctx[-keep:], truncated + 1
        requests.append((ctx, tgt))
    return requests, truncated


def evaluate_lambada(
    model: nn.Module,
    examples: Sequence[LambadaExample],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    per_example: bool = False,
    pad_id: int = EOT_ID,
    pad_multiple: int = 8,
    progress: Progress | None = None,
) -> dict:
    """LAMBADA last-word accuracy and target perplexity: {"acc", "ppl", "ppl_token", "n", "n_truncated",
    "correct", "target_tokens", "logprob_sum"} over all ranks (sharding and reduction as evaluate_hellaswag);
    per_example=True adds this rank's [{"index", "logprob", "num_tokens", "greedy"}] under "examples"."""
    if not examples:
        raise ValueError("no LAMBADA examples to evaluate")
    rank, world_size = resolve_rank(rank, world_size)
    indices = list(range(rank, len(examples), world_size))
    requests, truncated = lambada_requests([examples[i] for i in indices], model_config(model).block_size)
    scores = score_continuations(
        model,
        requests,
        rows_per_batch=batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        pad_id=pad_id,
        pad_multiple=pad_multiple,
        progress=progress,
    )
    sums = torch.tensor(
        [
            len(indices),
            scores.greedy.sum().item(),
            scores.logprob.sum().item(),
            scores.num_tokens.sum().item(),
            truncated,
        ],
        dtype=torch.float64,
    )
    n, correct, logprob_sum, target_tokens, n_truncated = sum_over_ranks(sums, world_size).tolist()
    result = {
        "acc": correct / n if n else math.nan,  # n == 0: a rank with an empty shard
        "ppl": perplexity(-logprob_sum / n) if n else math.nan,
        "ppl_token": perplexity(-logprob_sum / target_tokens) if n else math.nan,
        "n": int(n),
        "n_truncated": int(n_truncated),
        "correct": int(correct),
        "target_tokens": int(target_tokens),
        "logprob_sum": logprob_sum,
    }
    if per_example:
        result["examples"] = [
            {
                "index": idx,
                "logprob": float(scores.logprob[j]),
                "num_tokens": int(scores.num_tokens[j]),
                "greedy": bool(scores.greedy[j]),
            }
            for j, idx in enumerate(indices)
        ]
    return result
