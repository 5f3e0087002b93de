"""Validation loss and perplexity: over a loader of token shards, or over a text file cut into
(sliding) windows so that each token is predicted exactly once."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gpt2.distributed import all_reduce_sum_cpu
from gpt2.evaluation.scoring import autocast, model_device
from gpt2.tokenizer import EOT_ID, Tokenizer


@dataclass(frozen=True)
class LossResult:
    """Mean cross-entropy per predicted token (nats), its perplexity, and how many tokens it covers."""

    loss: float
    ppl: float
    tokens: int


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats); inf instead of an OverflowError for a diverged model."""
    return math.exp(loss) if loss < 700 else math.inf


def loss_stats(
    model: nn.Module,
    batches,
    steps: int | None = None,
    *,
    autocast_dtype: torch.dtype | None = None,
    reset: bool = True,
) -> LossResult:
    """Token-weighted mean cross-entropy of model over `steps` (x, y) batches (B, T) (targets == -1 are not
    counted), all-reduced over ranks when torch.distributed is initialized.

    `batches` is a loader with next_batch() (e.g. gpt2.data.DataLoaderLite; reset() first when reset=True,
    so every evaluation sees the same batches; steps is required) or any iterable of (x, y) (steps=None:
    all of it). Every rank must call this, even with no batches of its own.
    """
    device = model_device(model)
    if hasattr(batches, "next_batch"):
        if steps is None:
            raise ValueError("steps is required for a loader with next_batch() (it never runs out)")
        if reset and hasattr(batches, "reset"):
            batches.reset()
        source: Iterable = (batches.next_batch() for _ in range(steps))
    else:
        source = batches if steps is None else (b for _, b in zip(range(steps), batches))
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, autocast_dtype):
            for x, y in source:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                n_valid = (y != -1).sum()
                # mean over the valid targets (nan if none), chunked so the (B, T, V) logits never exist
                _, loss = model(x, y, return_logits=False)
                # where(), not an `if`: reading n_valid on the host would sync the GPU every batch
                nll_sum += torch.where(n_valid > 0, loss.double() * n_valid, 0.0)
                count += n_valid
    finally:
        model.train(was_training)
    nll_sum, count = all_reduce_sum_cpu(torch.stack([nll_sum, count])).tolist()
    if count == 0:
        raise ValueError("no tokens to evaluate the loss on; the data is empty or shorter than 2 tokens")
    loss = nll_sum / count
    return LossResult(loss=loss, ppl=perplexity(loss), tokens=int(count))


def evaluate_loss(
    model: nn.Module,
    loader,
    steps: int | None,
    *,
    autocast_dtype: torch.dtype | None = None,
    reset: bool = True,
) -> float:
    """Mean cross-entropy per token over `steps` batches of `loader`; see loss_stats."""
    return loss_stats(model, loader, steps, autocast_dtype=autocast_dtype, reset=reset).loss


def text_tokens(path: str | Path, *, tokenizer=None) -> list[int]:
    """A UTF-8 text file as one document: <|endoftext|> then its tokens (as training shards start documents)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found; pass a .txt file or a directory of token shards")
    if path.name.endswith((".jsonl", ".xz", ".gz", ".zst", ".bin", ".json")):
        raise ValueError(f"{path} is not plain text; tokenize it with `gpt2 prepare` and pass the shard directory")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); pass a UTF-8 .txt file") from None
    tok = tokenizer or Tokenizer()
    return [EOT_ID] + tok.encode(text, allow_special=False)


def text_windows(tokens: Sequence[int], seq_len: int, *, stride: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """Cut a token stream into (x (T,), y (T,)) windows, T <= seq_len, so each token after the first is a
    target exactly once (unscored targets are -1).

    stride=None (or seq_len): non-overlapping windows. stride < seq_len: a window every `stride` tokens that
    scores only targets no earlier window scored, so each gets >= seq_len - stride tokens of context.
    """
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    data = torch.as_tensor(list(tokens) if not isinstance(tokens, Tensor) else tokens, dtype=torch.long)
    N = data.numel()
    windows, scored_upto, start = [], 0, 0  # targets are token indices 1..N-1; scored_upto = last one done
    while scored_upto < N - 1:
        end = min(start + seq_len, N - 1)  # last target index of this window
        x = data[start:end]
        y = data[start + 1 : end + 1].clone()
        y[: max(0, scored_upto - start)] = -1  # targets start+1 .. scored_upto were scored before
        windows.append((x, y))
        scored_upto = end
        start += stride
    return windows


def window_batches(
    windows: Sequence[tuple[Tensor, Tensor]],
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    pad_id: int = EOT_ID,
) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's windows (rank, rank + world_size, ...) as right-padded (x, y) batches (B, T); padded
    targets are -1 so they are never scored, and causal attention keeps padded inputs out of the rest."""
    mine = windows[rank::world_size]
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        T = max(x.numel() for x, _ in chunk)
        x = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)
        for b, (xs, ys) in enumerate(chunk):
            x[b, : xs.numel()] = xs
            y[b, : ys.numel()] = ys
        yield x, y
