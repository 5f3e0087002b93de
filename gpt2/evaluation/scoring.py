"""The scoring primitive, the one home of log-likelihood scoring: `score_continuations`, plus what every
benchmark shares (the model's config and device, autocast, which examples this rank scores, summing
counts over ranks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.distributed import all_reduce_sum_cpu, get_rank, get_world_size, is_distributed
from gpt2.tokenizer import EOT_ID

Progress = Callable[[int, int], None]  # (done, total) in rows or examples; the CLI passes a progress bar


@dataclass
class ContinuationScores:
    """Per-request results of score_continuations, on the CPU, in request order."""

    logprob: Tensor  # (R,) float64: sum of log p(continuation token | everything before it)
    num_tokens: Tensor  # (R,) int64: continuation tokens scored
    greedy: Tensor  # (R,) bool: every continuation token was the argmax of its prediction


def score_continuations(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    rows_per_batch: int,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    pad_id: int = EOT_ID,
    pad_multiple: int = 8,
    progress: Progress | None = None,
) -> ContinuationScores:
    """Log-likelihood of each continuation given its context, for (context, continuation) token lists.

    Every context and continuation must be non-empty and len(context) + len(continuation) - 1 must fit the
    model's block_size (the last token is only a target). Rows are sorted by length (longest first, so an
    out-of-memory shows at once) and right-padded with pad_id to a multiple of pad_multiple (fewer distinct
    shapes for torch.compile); padding sits after every scored position, so causal attention keeps it out.
    """
    device = torch.device(device) if device is not None else model_device(model)
    block_size = model_config(model).block_size
    _check_requests(requests, block_size)
    if rows_per_batch < 1:
        raise ValueError(f"batch size must be >= 1, got {rows_per_batch}")
    R = len(requests)
    order = sorted(range(R), key=lambda r: -(len(requests[r][0]) + len(requests[r][1])))
    sums, greedies = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, autocast_dtype):
            for start in range(0, R, rows_per_batch):
                rows = [requests[r] for r in order[start : start + rows_per_batch]]
                s, g = _score_batch(model, rows, device, block_size, pad_id, pad_multiple)
                sums.append(s)
                greedies.append(g)
                if progress is not None:
                    progress(min(start + rows_per_batch, R), R)
    finally:
        model.train(was_training)
    logprob = torch.empty(R, dtype=torch.float64)
    greedy = torch.empty(R, dtype=torch.bool)
    if R:  # one device -> host copy for the whole run, not one sync per batch
        index = torch.tensor(order)
        logprob[index] = torch.cat(sums).cpu()
        greedy[index] = torch.cat(greedies).cpu()
    num_tokens = torch.tensor([len(cont) for _, cont in requests], dtype=torch.long)
    return ContinuationScores(logprob, num_tokens, greedy)


def _check_requests(requests: Sequence[tuple[Sequence[int], Sequence[int]]], block_size: int) -> None:
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both have at least one token")
        if len(ctx) + len(cont) - 1 > block_size:
            raise ValueError(f"request {i}: {len(ctx) + len(cont) - 1} input tokens exceed block_size={block_size}")


def _score_batch(
    model: nn.Module,
    rows: list[tuple[Sequence[int], Sequence[int]]],
    device: torch.device,
    block_size: int,
    pad_id: int,
    pad_multiple: int,
) -> tuple[Tensor, Tensor]:
    """(summed log-prob (B,) float64, all-greedy (B,) bool) for one batch of requests, left on device."""
    B = len(rows)
    longest = max(len(c) + len(k) - 1 for c, k in rows)
    T = min(-(-longest // pad_multiple) * pad_multiple, block_size)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    row_idx, pos_idx, targets = [], [], []
    for b, (ctx, cont) in enumerate(rows):
        seq = list(ctx) + list(cont)
        x[b, : len(seq) - 1] = torch.tensor(seq[:-1])
        # position p predicts token p + 1: the continuation is predicted at len(ctx)-1 .. len(seq)-2
        row_idx += [b] * len(cont)
        pos_idx += range(len(ctx) - 1, len(seq) - 1)
        targets += cont
    non_blocking = device.type == "cuda"
    x = x.to(device, non_blocking=non_blocking)
    row_idx_t = torch.tensor(row_idx).to(device, non_blocking=non_blocking)
    pos_idx_t = torch.tensor(pos_idx).to(device, non_blocking=non_blocking)
    targets_t = torch.tensor(targets).to(device, non_blocking=non_blocking)
    logits, _ = model(x)  # (B, T, V)
    picked = logits[row_idx_t, pos_idx_t]  # (N, V): only the scored positions
    picked = picked.float() if picked.dtype in (torch.bfloat16, torch.float16) else picked  # upcast, never down
    logprob = -F.cross_entropy(picked, targets_t, reduction="none")  # (N,) log p(target)
    hit = picked.argmax(dim=-1) == targets_t  # (N,)
    sums = torch.zeros(B, dtype=torch.float64, device=device).index_add_(0, row_idx_t, logprob.double())
    misses = torch.zeros(B, dtype=torch.long, device=device).index_add_(0, row_idx_t, (~hit).long())
    return sums, misses == 0


def model_config(model: nn.Module):
    """The GPTConfig behind a GPT, a torch.compile'd GPT (._orig_mod) or a DDP-wrapped one (.module)."""
    while not hasattr(model, "config"):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise ValueError(f"{type(model).__name__} has no .config; pass a gpt2.GPT (compiled or not)")
        model = inner
    return model.config


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (the default device for its inputs)."""
    return next(model.parameters()).device


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `device`'s type, or a no-op context for dtype=None."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) to shard examples by: the process group's where not given (0 / 1 without one).

    world_size=1 under a process group means this rank scores every example alone (no collective)."""
    if world_size is None:
        world_size = get_world_size()
    if rank is None:
        rank = get_rank() if world_size > 1 else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if is_distributed() and world_size > 1 and world_size != get_world_size():
        raise ValueError(f"world_size={world_size} but the process group has {get_world_size()} ranks")
    return rank, world_size


def sum_over_ranks(values: Tensor, world_size: int) -> Tensor:
    """`values` summed over the world_size ranks that shared the examples, on the CPU (as they are when
    world_size is 1: a rank scoring alone must not enter a collective the others never join)."""
    return values.cpu() if world_size == 1 else all_reduce_sum_cpu(values)
