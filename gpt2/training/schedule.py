"""The learning-rate schedule, its one home: the learning rate of every optimizer step."""

from __future__ import annotations

import math

from gpt2.training.config import TrainingConfig


def lr_at(step: int, cfg: TrainingConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from max_lr/warmup_steps to
    max_lr over warmup_steps, then cosine decay to min_lr_ratio * max_lr at max_steps (held after)."""
    max_lr, min_lr = cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps or cfg.max_steps == cfg.warmup_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
