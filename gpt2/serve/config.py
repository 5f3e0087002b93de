"""gpt2 serve's settings, importable without the serve extra (the command line reads its defaults):
the engine's (ServeConfig, also sent to the engine process) and the HTTP side's (HTTPConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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


@dataclass(frozen=True)
class HTTPConfig:
    """The HTTP side's settings (`gpt2 serve` flags of the same names)."""

    api_keys: tuple[str, ...] = ()  # --api-key: required on /v1/* and the tokenizer routes (empty: open)
    allowed_origins: tuple[str, ...] = ()  # --allowed-origins: CORS for pages on these origins ("*": any)
    max_body_bytes: int = 8 << 20  # --max-body-bytes: a larger body gets 413 before it is read
    # --chat-template: a gpt2.serve.chat.ChatTemplate (that module needs jinja2, the serve extra);
    # None: the default plain "Role: text" turns.
    chat_template: Any = None
    stall_timeout_s: float = 30.0  # --stall-timeout: /health calls an engine silent, or in one step, this long wedged
