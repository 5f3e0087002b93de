"""Tail weight averaging: an exponential moving average of the weights over the end of a run (the
cooldown of a WSD schedule), which becomes the final weights. Averaging the last iterates cancels part
of the noise that the learning rate still injects (Polyak averaging; Sanyal et al. 2023, "Early Weight
Averaging meets High Learning Rates for LLM Pre-training")."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gpt2.training.config import TrainingConfig


class WeightAverage:
    """An EMA of a model's parameters from update `start` on: after update s >= start,
    avg <- beta avg + (1 - beta) w, begun as a copy of w. In float32 on the parameters' device (one
    more copy of the weights); saves and restores itself, so a resumed run averages the same weights."""

    def __init__(self, model: nn.Module, beta: float, start: int) -> None:
        self.params = list(model.parameters())  # model order; the tied embedding / LM head once
        self.beta, self.start = beta, start
        self.average: list[Tensor] | None = None

    @classmethod
    def from_config(cls, model: nn.Module, cfg: TrainingConfig) -> WeightAverage | None:
        """The average `cfg` asks for (weight_ema, ema_start), or None when it asks for none."""
        if not cfg.weight_ema:
            return None
        return cls(model, cfg.weight_ema, round(cfg.ema_start * cfg.max_steps))

    @torch.no_grad()
    def update(self, updates_done: int) -> None:
        """Fold in the weights after `updates_done` optimizer updates (nothing before `start`)."""
        if updates_done < self.start:
            return
        weights = [p.detach() for p in self.params]
        if self.average is None:
            self.average = [w.clone() for w in weights]
        else:
            torch._foreach_lerp_(self.average, weights, 1 - self.beta)

    @torch.no_grad()
    def copy_to(self) -> bool:
        """Make the average the model's weights; False (and nothing changed) when none was taken yet."""
        if self.average is None:
            return False
        torch._foreach_copy_([p.detach() for p in self.params], self.average)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "start": self.start, "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        average = state.get("average")
        if average is not None and [t.shape for t in average] != [p.shape for p in self.params]:
            raise ValueError("the checkpoint's weight average does not match the model's parameters")
        self.average = None if average is None else [t.to(p.device) for t, p in zip(average, self.params)]
