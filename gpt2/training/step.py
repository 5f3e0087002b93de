"""One optimizer step: gradients accumulated over micro-batches, clipped, then applied. The
training loop and benchmarks/bench_train.py call these same functions."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gpt2.ops import attention_backends
from gpt2.training.optim import MuonAdamW, optimizers_of


@dataclass(frozen=True)
class StepKernels:
    """How a step computes (never what): both choices give the same mathematics.

    chunked_loss: the loss chunk by chunk without (B, T, V) logits (gpt2.ops.linear_cross_entropy):
    less memory and faster on CUDA, but ~30% slower on a CPU, which keeps the plain loss.
    attention: the SDPA backends to prefer (gpt2.ops.attention_backends): cuDNN first on CUDA.
    """

    chunked_loss: bool = False
    attention: str = "default"

    @classmethod
    def for_device(cls, device: torch.device) -> StepKernels:
        """The fastest choices measured for a device (benchmarks/NOTES.md)."""
        if device.type == "cuda":
            return cls(chunked_loss=True, attention="cudnn")
        return cls()


def forward_backward(
    model: nn.Module,
    next_batch: Callable[[], tuple[Tensor, Tensor]],
    accum: int,
    *,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
    kernels: StepKernels = StepKernels(),
    no_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
) -> Tensor:
    """Accumulate the gradients of `accum` micro-batches into .grad (call zero_grad first);
    returns this rank's mean loss over them (on the device, detached). `no_sync(last)` is the
    parallelism strategy's context for micro-step `last` or not (DDP synchronizes only the last)."""
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = next_batch()  # (B, T), (B, T); already on CUDA, moved here for other devices (MPS)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync = no_sync(micro == accum - 1) if no_sync is not None else contextlib.nullcontext()
        with sync:
            with (
                torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
                attention_backends(kernels.attention),
            ):
                _, loss = model(x, y, return_logits=not kernels.chunked_loss)
            loss = loss / accum  # the mean over the whole batch, not the sum of micro-batch means
            loss_sum += loss.detach()
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
    return loss_sum


def clip_gradients(
    optimizer: torch.optim.Optimizer | MuonAdamW, max_norm: float, scaler: torch.amp.GradScaler | None = None
) -> Tensor:
    """Clip the global gradient norm to max_norm (0: no clipping); returns the norm before clipping.
    Under FSDP the parameters are DTensors and the norm is the global one."""
    if scaler is not None:
        for opt in optimizers_of(optimizer):
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)


def apply_gradients(optimizer: torch.optim.Optimizer | MuonAdamW, scaler: torch.amp.GradScaler | None = None) -> None:
    """The optimizer update (through the GradScaler under fp16, which skips steps with inf gradients)."""
    if scaler is not None:
        for opt in optimizers_of(optimizer):
            scaler.step(opt)
        scaler.update()
    else:
        optimizer.step()
