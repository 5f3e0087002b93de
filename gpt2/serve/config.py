"""gpt2 serve's settings, importable without the serve extra (the command line reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """The engine's settings (`gpt2 serve` flags of the same names)."""

    max_batch: int = 32  # cache slots = sequences decoded together
    max_queue: int = 1024  # sequences waiting for a slot before requests get 429
    max_prefill_tokens: int = 4096  # prompt tokens prefilled per step boundary (bounds the stall)
    cuda_graph: bool | None = None  # None: on for CUDA
    compile: bool = False  # torch.compile the decode step before capture (the PyTorch step only)
    fused: bool | None = None  # the decode step in gpt2.kernels (None: where they run and compile is off)
    batch_invariant: bool = False  # exact results whatever the batch (fixed decode shape, prefill one by one)
