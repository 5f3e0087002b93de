"""The schedules, their one home: the learning rate and the batch size of every optimizer step.

Learning rate, as a factor of each parameter group's peak (max_lr for AdamW's groups, muon_lr for
Muon's), after a linear warmup from 1/warmup_steps to 1 over warmup_steps:

    cosine  a cosine from 1 down to min_lr_ratio at max_steps (GPT-3, build-nanogpt)
    wsd     warmup-stable-decay: 1 until the last decay_fraction of the steps, then down to
            min_lr_ratio at max_steps, linearly or as 1 - sqrt (Hägele et al. 2024, "Scaling Laws and
            Compute-Optimal Training Beyond Fixed Training Durations"). The stable phase does not
            depend on the run's length, so a longer run continues a shorter one's curve.

Muon momentum: with muon_momentum_warmup_steps > 0 it rises linearly from muon_momentum_start to
muon_momentum over that many steps (modded-nanogpt's 0.85 -> 0.95: less memory of the random early
gradients).

Sequence length: with seq_len_warmup_steps > 0 the first steps train on shorter sequences,
seq_len_warmup_start doubling in equal stages up to seq_len (Li et al. 2022, "The Stability-Efficiency
Dilemma"). The tokens per step stay the same: a (B, T) micro-batch is read as (B T / t, t), so the data
order, the token counts and a resume do not change; positions beyond t are learned once t grows.

Batch size: with batch_warmup_steps > 0 the tokens per step grow linearly from
batch_warmup_tokens to total_batch_size over that many steps, in whole micro-steps (micro_batch_size
x seq_len x processes), and each step's learning rate is scaled by sqrt(tokens / total_batch_size),
the square-root rule for Adam-type updates (Malladi et al. 2022, "On the SDEs and Scaling Rules for
Adaptive Gradient Algorithms").
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from gpt2.training.config import TrainingConfig

LR_SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "sqrt")


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of the peak, schedule only."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr_ratio
    if cfg.lr_schedule == "wsd":
        return _wsd(step, cfg)
    if cfg.max_steps == cfg.warmup_steps:
        return cfg.min_lr_ratio
    progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)  # 0 -> 1
    return cfg.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - cfg.min_lr_ratio)


def _wsd(step: int, cfg: TrainingConfig) -> float:
    decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
    start = cfg.max_steps - decay_steps
    if step < start:
        return 1.0
    progress = (step - start) / decay_steps  # 0 at the first decay step, -> 1 at max_steps
    drop = math.sqrt(progress) if cfg.decay_shape == "sqrt" else progress
    return 1.0 - drop * (1.0 - cfg.min_lr_ratio)


def lr_at(step: int, cfg: TrainingConfig, per_micro: int | None = None) -> float:
    """The peak learning rate (max_lr's) of step `step`: the schedule times the batch-warmup scale.
    per_micro: tokens of one micro-step over all processes (default: one process's)."""
    return cfg.max_lr * lr_factor(step, cfg) * batch_lr_scale(step, cfg, per_micro)


def micro_steps(step: int, cfg: TrainingConfig, per_micro: int | None = None) -> int:
    """Micro-steps (forward/backward passes per process) of optimizer step `step`: total_batch_size /
    per_micro, or during a batch warmup the nearest whole number to a linear ramp in tokens from
    batch_warmup_tokens (at least one)."""
    per_micro = per_micro or cfg.micro_batch_size * cfg.seq_len
    full = cfg.total_batch_size // per_micro
    if step >= cfg.batch_warmup_steps:
        return full
    start = min(cfg.batch_warmup_tokens, cfg.total_batch_size)
    tokens = start + (cfg.total_batch_size - start) * step / cfg.batch_warmup_steps
    return max(1, min(full, round(tokens / per_micro)))


def batch_lr_scale(step: int, cfg: TrainingConfig, per_micro: int | None = None) -> float:
    """sqrt(tokens of this step / total_batch_size): 1 once the batch warmup is over."""
    if step >= cfg.batch_warmup_steps:
        return 1.0
    per_micro = per_micro or cfg.micro_batch_size * cfg.seq_len
    return math.sqrt(micro_steps(step, cfg, per_micro) * per_micro / cfg.total_batch_size)


def tokens_through(step: int, cfg: TrainingConfig, per_micro: int | None = None) -> int:
    """Tokens trained on by steps 0 .. step (all processes together)."""
    per_micro = per_micro or cfg.micro_batch_size * cfg.seq_len
    warm = min(step + 1, cfg.batch_warmup_steps)
    ramp = sum(micro_steps(s, cfg, per_micro) for s in range(warm)) * per_micro
    return ramp + (step + 1 - warm) * cfg.total_batch_size


def muon_momentum_at(step: int, cfg: TrainingConfig) -> float:
    """Muon's momentum at optimizer step `step`: the warmup's linear ramp, then muon_momentum."""
    if step >= cfg.muon_momentum_warmup_steps:
        return cfg.muon_momentum
    progress = step / cfg.muon_momentum_warmup_steps
    return cfg.muon_momentum_start + (cfg.muon_momentum - cfg.muon_momentum_start) * progress


def seq_len_at(step: int, cfg: TrainingConfig) -> int:
    """Tokens per training sequence at optimizer step `step`: seq_len_warmup_start x 2**stage during the
    warmup (equal stages), seq_len after."""
    if step >= cfg.seq_len_warmup_steps:
        return cfg.seq_len
    stages = (cfg.seq_len // cfg.seq_len_warmup_start).bit_length() - 1  # doublings from start to seq_len
    return cfg.seq_len_warmup_start * 2 ** (step * stages // cfg.seq_len_warmup_steps)


def batches_at(
    step: int, cfg: TrainingConfig, next_batch: Callable[[], tuple[Tensor, Tensor]]
) -> Callable[[], tuple[Tensor, Tensor]]:
    """The micro-batches of optimizer step `step`: the loader's (B, T), or during a sequence-length warmup
    the same tokens as (B T / t, t) rows of the step's shorter length t."""
    length = seq_len_at(step, cfg)
    if length == cfg.seq_len:
        return next_batch

    def shorter() -> tuple[Tensor, Tensor]:
        x, y = next_batch()
        return x.reshape(-1, length), y.reshape(-1, length)  # (B T / t, t)

    return shorter
