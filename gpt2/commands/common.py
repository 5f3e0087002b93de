"""What the commands that load a model share: the --model/--device/--dtype options and loading a
model for inference through the project's one loader (gpt2.inference.load: GPT.from_pretrained
under the device policy of gpt2.device), with the process-wide matmul precision set here, in the
application shell."""

from __future__ import annotations

import argparse

import torch

MODEL_HELP = (
    "hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), an HF-format directory, "
    "a checkpoint directory, or a training run directory (its newest checkpoint)"
)
DTYPE_HELP = "compute precision: auto (bf16 on GPUs that support it, else fp16; fp32 on CPU and MPS), fp32, bf16, fp16"
DEVICE_HELP = "auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps"


def add_model_arguments(
    parser: argparse.ArgumentParser, *, device: bool = True, dtype: bool = True, device_help: str = DEVICE_HELP
) -> None:
    """--model, --device and --dtype (those asked for), with the same meaning in every command."""
    from gpt2.device import DTYPE_CHOICES

    parser.add_argument("--model", required=True, help=MODEL_HELP)
    if device:
        parser.add_argument("--device", default="auto", help=device_help)
    if dtype:
        parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)


def add_decode_kernels_argument(parser: argparse.ArgumentParser) -> None:
    """--decode-kernels: the engine's decode step (gpt2 generate, gpt2 serve)."""
    parser.add_argument(
        "--decode-kernels",
        choices=["auto", "fused", "torch"],
        default="auto",
        help="decode step: gpt2.kernels' fused Triton kernels (auto: on CUDA with triton) or the model's forward",
    )


def model_spec(args: argparse.Namespace, device: str | None = None):
    """The ModelSpec of a command's --model, --device (or `device`) and --dtype."""
    from gpt2.inference.load import ModelSpec

    return ModelSpec(str(args.model), device or args.device, args.dtype)


def load_for_inference(spec, *, cast_weights: bool = True, decode: bool | None = None):
    """(model in eval mode, device) of a ModelSpec, after setting this process's float32 matmul
    precision for that device (TF32 on CUDA): the one way every command (and gpt2 serve's engine
    process) loads a model, so fp32 results agree between them. On CUDA the process's first-use costs
    are paid while loading (gpt2.inference.load.load_model; decode: the caller decodes next, with the
    fused kernels or not, and that is rehearsed too)."""
    from gpt2.device import fp32_matmul_precision, pick_device
    from gpt2.inference.load import load_model

    device = pick_device(spec.device)
    torch.set_float32_matmul_precision(fp32_matmul_precision(device))
    return load_model(spec, cast_weights=cast_weights, warm=device.type == "cuda", decode=decode)
