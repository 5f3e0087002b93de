"""The trainer state: the parts of a run that a checkpoint restores besides the model and the
optimizer. Each part saves and restores itself (`state_dict` / `load_state_dict`); TrainerState
collects them into the one dict that every checkpoint stores as trainer_state.pt:

    {"format": 1, "step", "tokens_seen", "world_size", "parallelism",
     "loader": DataLoaderLite state, "scaler": GradScaler state or None, "rng": [every rank's RNG state],
     "average": the tail weight average (WeightAverage state) or None,
     "optimizer": AdamW state (only where the parallelism strategy stores it here, not in DCP shards)}

Everything in it is a tensor, number, string, list or dict, so it loads with weights_only=True.
Beside it: how a run is asked to stop (StopFlag) and how it ended (TrainResult).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from gpt2.checkpoint import STATE_FORMAT
from gpt2.distributed import DistInfo, all_gather_objects


class RngState:
    """This process's random streams (CPU, and CUDA on a GPU). Saving gathers every rank's (a
    collective: every rank calls it); restoring takes this rank's, or re-seeds when the number
    of processes changed."""

    def __init__(self, info: DistInfo, seed: int) -> None:
        self.info, self.seed = info, seed

    def state_dict(self) -> list[dict[str, Any]]:
        state: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if self.info.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.info.device)
        return all_gather_objects(state)

    def load_state_dict(self, states: list[dict[str, Any]], step: int) -> str | None:
        """Restore this rank's streams; returns a note when they had to be re-seeded instead."""
        if len(states) != self.info.world_size:
            torch.manual_seed(self.seed + self.info.rank + 1_000_003 * step)
            return f"checkpoint from {len(states)} process(es), now {self.info.world_size}: RNG streams re-seeded"
        mine = states[self.info.rank]
        torch.set_rng_state(mine["cpu"])
        if self.info.device.type == "cuda" and mine.get("cuda") is not None:
            torch.cuda.set_rng_state(mine["cuda"], self.info.device)
        return None


class TrainerState:
    """The stateful components of a run (loader, grad scaler, RNG) and its progress, as one dict."""

    def __init__(
        self,
        *,
        loader: Any,
        scaler: torch.amp.GradScaler | None,
        rng: RngState,
        info: DistInfo,
        parallelism: str,
        tokens_seen: Callable[[int], int],
        average: Any = None,
    ) -> None:
        self.loader, self.scaler, self.rng, self.average = loader, scaler, rng, average
        self.info, self.parallelism, self.tokens_seen = info, parallelism, tokens_seen

    def state_dict(self, step: int) -> dict[str, Any]:
        """The state after `step` optimizer steps; a collective (the RNG states are gathered)."""
        return {
            "format": STATE_FORMAT,
            "step": step,
            "tokens_seen": self.tokens_seen(step),
            "world_size": self.info.world_size,
            "parallelism": self.parallelism,
            "loader": self.loader.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": self.rng.state_dict(),
            "average": self.average.state_dict() if self.average is not None else None,
            "cpu_threads": torch.get_num_threads(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> tuple[int, str | None]:
        """Restore every component; returns (the step to continue from, a note for the log or None)."""
        step = int(state["step"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        if self.average is not None and state.get("average"):
            self.average.load_state_dict(state["average"])
        notes = [self.rng.load_state_dict(state.get("rng", []), step), self._threads_note(state.get("cpu_threads"))]
        return step, "; ".join(n for n in notes if n) or None

    def _threads_note(self, saved: int | None) -> str | None:
        """CPU kernels sum in an order that depends on the thread count: a resume is bit-exact only
        with the same number of threads (on GPUs the kernels do not depend on it)."""
        now = torch.get_num_threads()
        if self.info.device.type != "cpu" or saved is None or saved == now:
            return None
        return (
            f"the checkpoint was written with {saved} CPU threads, now {now}: losses match the uninterrupted run "
            f"to float rounding, not bit for bit (set OMP_NUM_THREADS={saved} for an exact resume)"
        )


class StopFlag(Protocol):
    """Asks the loop to stop after the current step (gpt2.training.shell.GracefulStop is one)."""

    signum: int | None

    @property
    def requested(self) -> bool: ...


class NeverStop:
    signum: int | None = None
    requested = False


@dataclass
class TrainResult:
    """How a run ended."""

    step: int  # optimizer steps done
    last_loss: float | None
    checkpoint: Path | None  # the newest checkpoint written
    stopped_by: int | None = None  # the signal that stopped it early, if any
    val_loss: float | None = None
