"""Small helpers shared by the subcommands: device/dtype choice and model loading."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_arguments(parser: argparse.ArgumentParser, default_dtype: str = "auto") -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), an HF-format directory, "
        "a checkpoint directory, or a training run directory (its newest checkpoint)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default=default_dtype,
        choices=["auto", *DTYPES],
        help="weights/compute dtype (auto: bf16 on GPUs that support it, else fp32)",
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return DTYPES[name]


def load_for_inference(args: argparse.Namespace):
    """(model in eval mode on the chosen device/dtype, device)."""
    from gpt2.hf import load_model

    device = pick_device(args.device)
    model = load_model(args.model, device=device, dtype=pick_dtype(args.dtype, device))
    return model.eval(), device
