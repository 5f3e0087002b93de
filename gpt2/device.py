"""Device and precision policy: the one place every command chooses where and in what it computes.

    --device auto | cpu | cuda | cuda:N | mps      auto: CUDA if available, else Apple's MPS, else CPU
    --dtype  auto | fp32 | bf16 | fp16             the precision the model computes in

`--dtype` means the same in every command: the arithmetic precision of the forward (and backward)
pass. How it is reached depends on whether the command trains. Training and evaluation keep fp32
weights and run the matmuls under autocast (fp32 master weights are what AdamW needs, and scores
stay comparable with fp32 runs); generation and serving cast the weights themselves, which halves
their memory and is what a decode step wants. `gpt2 export` stores weights and so has
`--weights-dtype` instead.

auto is bf16 on CUDA GPUs that support it, fp16 on older CUDA GPUs (training adds a GradScaler), and
fp32 on CPUs and MPS (neither has fast half-precision matmuls for this model in PyTorch).
"""

from __future__ import annotations

import torch

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps if available, else cpu; otherwise the named device,
    checked to exist (one-line ValueError naming what to pass instead)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type == "mps" and not mps_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The precision `--dtype name` means on `device` (auto resolved as the module docstring says)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def fp32_matmul_precision(device: torch.device) -> str:
    """What torch.set_float32_matmul_precision is set to for a command on device (by its shell):
    TF32 for float32 matmuls on CUDA ("high"; float32 leftovers under bf16 autocast and fp32 runs),
    exact float32 elsewhere, so every command computes fp32 alike on one device."""
    return "high" if device.type == "cuda" else "highest"


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--dtype name` (None: plain fp32, no autocast)."""
    dtype = compute_dtype(name, device)
    return None if dtype == torch.float32 else dtype


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), e.g. before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
