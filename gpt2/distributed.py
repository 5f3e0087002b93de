"""Process-group setup: the same training code runs as one process (CPU, one GPU) or under
`torchrun` with N processes (NCCL on GPUs, gloo on CPUs).

The caller passes the environment (`os.environ`) in, so library code never reads it itself;
torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/MASTER_PORT, which
`init_process_group("env://")` reads).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size processes, its device, whether it logs."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    is_main: bool = True  # rank 0: the only process that prints and writes files

    @property
    def distributed(self) -> bool:
        """True when a process group is running (even with world_size 1 under torchrun)."""
        return dist.is_available() and dist.is_initialized()


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps if available, else cpu; otherwise the named device."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def init_distributed(env: Mapping[str, str], device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun (WORLD_SIZE in env), else a single process.

    Under torchrun on CUDA every process takes GPU `local_rank`; on CPU the backend is gloo.
    """
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return DistInfo(device=pick_device(device))
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", rank))
    base = pick_device(device)
    if base.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible; "
                "lower torchrun's --nproc_per_node"
            )
        base = torch.device("cuda", local_rank)
        torch.cuda.set_device(base)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        # device_id binds NCCL's communicator to this GPU eagerly (no guessing by the first collective).
        kwargs = {"device_id": base} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=base, is_main=rank == 0)


def destroy_distributed() -> None:
    """Tear down the process group if one is running (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum a tensor over all ranks (in place; a no-op without a process group). Returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each metric over all ranks, in one collective (identity on a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` (picklable, produced in this run), in rank order; [obj] on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for all ranks (no-op on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
