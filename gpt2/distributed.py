"""Process groups and ranks, in one place: the same code runs as one process (CPU, one GPU) or
under `torchrun` with N processes (NCCL on GPUs, gloo on CPUs).

The caller passes the environment (`os.environ`) in, so library code never reads it itself;
torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/MASTER_PORT, which
`init_process_group("env://")` reads). Every helper below is a no-op or the identity without a
process group, so callers need no `if distributed` of their own.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from gpt2.device import pick_device


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
        return is_distributed()


def is_distributed() -> bool:
    """Whether a process group is running in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(env: Mapping[str, str], device: str = "auto", *, timeout_s: float | None = None) -> DistInfo:
    """Start the process group when launched by torchrun (WORLD_SIZE in env), else a single process.

    Under torchrun on CUDA every process takes GPU `local_rank`; on CPU the backend is gloo.
    `timeout_s` bounds how long a collective waits for a rank that stalled (PyTorch's default: 10 min).
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
        _import_world_capturing_modules()  # before the group exists: see destroy_distributed
        # device_id binds NCCL's communicator to this GPU eagerly (no guessing by the first collective).
        kwargs = {"device_id": base} if backend == "nccl" else {}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=base, is_main=rank == 0)


def destroy_distributed() -> None:
    """Tear down the process group if one is running (safe to call always), for good: the last
    reference to the group goes here, so its backend's threads are joined now, not left running
    while the interpreter exits.

    That matters for gloo: its worker threads release each finished collective's tensors, and
    releasing a tensor Python also holds takes the GIL (torch's PyObject preservation). A worker
    that asks for the GIL while the interpreter finalizes is made to exit by CPython
    (pthread_exit), unwinding through a noexcept C++ destructor (ProcessGroupGloo::AsyncWork):
    std::terminate, "terminate called without an active exception", SIGABRT after a finished run
    (torchrun then exits 1). dist.destroy_process_group only drops torch's registry of groups;
    the group object (and its threads) lives on while anything else holds it. Freed from Python,
    its destructor releases the GIL and joins the threads cleanly. In torch 2.13 three things keep
    it: torch.distributed.nn's default arguments (see _import_world_capturing_modules), garbage
    cycles not yet collected (an FSDP-sharded model and its optimizer: FSDP's state holds the
    group), and the DeviceMesh that DTensor's caches keep alive (see _release_device_meshes).
    """
    if is_distributed():
        # Cycles first, while torch's registry still holds the group (so its destructor, which joins
        # threads, runs below, in destroy_process_group, and not inside the collection).
        gc.collect()
        _release_device_meshes()
        dist.destroy_process_group()


def _import_world_capturing_modules() -> None:
    """Import torch.distributed.nn now, before init_process_group: its collectives take
    `group=group.WORLD` as a default argument, evaluated at import. Imported later (DDP's
    constructor does, through torch._dynamo), those defaults hold the default group for the rest
    of the process, past destroy_process_group; imported first, they hold None (the default)."""
    import torch.distributed.nn  # noqa: F401


def _release_device_meshes() -> None:
    """Drop every DeviceMesh's references to its process groups (a no-op unless FSDP/DTensor ran).

    A mesh holds its groups in `_pg_registry`, and DTensor's sharding and redistribution caches
    (Python lru_caches and a C++ fast-path cache, never cleared by torch) keep every mesh that was
    used alive; emptying the registries frees the groups whoever holds the meshes. A mesh is
    unusable after destroy_process_group anyway; without a registry it resolves groups by name."""
    if "torch.distributed.device_mesh" not in sys.modules:
        return
    from torch.distributed.device_mesh import DeviceMesh

    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()


def collective_device(device: torch.device | None = None) -> torch.device:
    """Where a tensor must live for the running backend's collectives: NCCL reduces only CUDA
    tensors (this rank's GPU), gloo is happiest with CPU ones."""
    if is_distributed() and dist.get_backend() == "nccl":
        if device is not None and device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum a tensor over all ranks (in place; a no-op without a process group). Returns it."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_sum_cpu(values: Tensor) -> Tensor:
    """`values` summed over all ranks, returned on the CPU (moved to the backend's device for the
    collective and back); the values themselves without a process group."""
    if not is_distributed():
        return values.cpu()
    on = collective_device(values.device)
    summed = values.to(on)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.cpu()


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (one all-reduce, so also a barrier)."""
    if not is_distributed():
        return flag
    t = torch.tensor([float(flag)], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() > 0)


def on_main_rank(fn: Callable[[], object], what: str) -> object:
    """Run fn on rank 0 while the others wait; if it fails there, every rank raises (none is left
    waiting in a collective). Returns fn's result on rank 0, None elsewhere. `what` completes the
    other ranks' message "rank 0 could not ..."."""
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except BaseException as e:  # re-raised below, once the other ranks know
            error = e
    failed = any_rank(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank 0 could not {what}; see its error")
    return result


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` (picklable, produced in this run), in rank order; [obj] on one process."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s `obj` on every rank (itself on one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for all ranks (no-op on one process)."""
    if is_distributed():
        dist.barrier()
