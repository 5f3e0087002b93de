"""What the inference subcommands share: the --model/--device/--dtype options and loading a model
for inference through the project's one loader (GPT.from_pretrained) and device policy (gpt2.device)."""

from __future__ import annotations

import argparse

import torch

MODEL_HELP = (
    "hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), an HF-format directory, "
    "a checkpoint directory, or a training run directory (its newest checkpoint)"
)
DTYPE_HELP = "compute precision: auto (bf16 on GPUs that support it, else fp16; fp32 on CPU and MPS), fp32, bf16, fp16"
DEVICE_HELP = "auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps"


def add_model_arguments(parser: argparse.ArgumentParser, *, dtype_help: str = DTYPE_HELP) -> None:
    """--model, --device and --dtype, with the same meaning in every command."""
    from gpt2.device import DTYPE_CHOICES

    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=dtype_help)


def load_for_inference(args: argparse.Namespace):
    """(model in eval mode, device): weights cast to --dtype on --device, TF32 for fp32 matmuls on CUDA."""
    from gpt2 import GPT
    from gpt2.device import compute_dtype, pick_device

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    model = GPT.from_pretrained(args.model, device=device, dtype=compute_dtype(args.dtype, device))
    return model.eval(), device
