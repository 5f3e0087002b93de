"""The per-slot device buffers a decode step reads and updates in place (DecodeState), and the
host <-> device copies around them that never wait.

One row per cache slot (the scratch slot included): the step's input token, its position and the
token index, one buffer per sampling setting (gpt2.inference.sampling.ROW_SETTINGS), all (rows,),
and the penalties' (rows, V) and (rows, W) buffers (gpt2.inference.penalties). The engine fills a
newcomer's rows at admission; the model runner's steps (gpt2.inference.runner) read and advance
them on the device, so the host touches nothing between two steps of the same sequences.

Shape key: V vocab_size, W penalties.WIDTH, n slots written at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpt2.inference import penalties
from gpt2.inference.sampling import ROW_SETTINGS

_PENALTY_BUFFERS = (*penalties.VOCAB_BUFFERS, *penalties.TABLE)


class DecodeState:
    """The per-slot buffers of `rows` cache slots (the module docstring lists them), as attributes
    named as in ROW_SETTINGS, penalties.VOCAB_BUFFERS and penalties.TABLE."""

    def __init__(self, rows: int, device: torch.device, vocab_size: int) -> None:
        long = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(rows, **long)  # input token of the next step
        self.pos = torch.zeros(rows, **long)  # its position = its cache column
        self.index = torch.zeros(rows, **long)  # tokens generated so far (the RNG counter)
        self.ids = torch.arange(rows, **long)  # 0, 1, 2, ...: the rows a step records tokens for
        for name, (dtype, unused) in ROW_SETTINGS.items():
            setattr(self, name, torch.full((rows,), unused, dtype=dtype, device=device))
        for name, dtype in penalties.VOCAB_BUFFERS.items():
            setattr(self, name, torch.zeros((rows, vocab_size), dtype=dtype, device=device))
        for name, dtype in penalties.TABLE.items():
            setattr(self, name, torch.zeros((rows, penalties.WIDTH), dtype=dtype, device=device))

    def settings(self, rows: int | Tensor, penalized: bool = False) -> dict[str, Tensor]:
        """The sampling settings of rows 0..rows-1 (views) or of the slots in a (n,) tensor (copies):
        ROW_SETTINGS' names -> (B,), and with penalized the penalties' buffers (B, V), (B, W)."""
        names = [*ROW_SETTINGS, *(_PENALTY_BUFFERS if penalized else ())]
        if isinstance(rows, int):
            return {name: getattr(self, name)[:rows] for name in names}
        return {name: getattr(self, name).index_select(0, rows) for name in names}

    def start_penalties(self, slots: Tensor, table: dict[str, Tensor], prompt: tuple[Tensor, Tensor]) -> None:
        """Newcomers at slots (n,) on the device: their tables (host (n, W), penalties.encode_table),
        counts and offsets cleared, `seen` = the (row, token) prompt entries (host, prompt_entries)."""
        self.write(slots, **table)
        for name in penalties.VOCAB_BUFFERS:
            getattr(self, name).index_fill_(0, slots, 0)
        rows, tokens = (to_device(t, self.seen.device) for t in prompt)
        if rows.numel():
            self.seen.index_put_((rows, tokens), torch.ones_like(rows, dtype=torch.bool))

    def count(self, rows: Tensor, tokens: Tensor) -> None:
        """Record the tokens (n,) just drawn for rows (n,) in the penalties' buffers."""
        penalties.count(vars(self), rows, tokens)

    def write(self, slots: Tensor, **values: Tensor) -> None:
        """Set fields at slots (n,) (on the device) from host tensors (n, ...), in stream order: no
        synchronization (on CUDA the host tensors are pinned first, so the copy is asynchronous)."""
        for name, value in values.items():
            buf = getattr(self, name)
            buf.index_copy_(0, slots, to_device(value.to(buf.dtype), buf.device))


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """t on device without waiting for the copy (pinned staging on CUDA; the caching host
    allocator keeps the pinned block until the copy is done)."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Asynchronous copies of device tensors into pinned host memory (plain copies on a CPU)."""
    if tensors[0].device.type != "cuda":
        return tuple(t.clone() for t in tensors)
    out = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.append(host.copy_(t, non_blocking=True))
    return tuple(out)
