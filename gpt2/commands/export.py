"""`gpt2 export RUN_DIR|CHECKPOINT HF_DIR`: write a checkpoint as a HuggingFace-format directory
(config.json, model.safetensors, tokenizer files) that transformers and `gpt2 generate` load."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_DIR|CKPT", help="a training run (its newest checkpoint) or a checkpoint")
    parser.add_argument("out", metavar="HF_DIR", help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty HF_DIR")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights dtype to write (default fp32)"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from gpt2.hf import load_model, resolve_model_dir, save_pretrained

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; pass a directory for the HuggingFace files")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} is not empty; choose another HF_DIR or pass --overwrite to replace its files")
    source = Path(args.source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist; pass a training run directory or one of its checkpoints")
    ckpt = resolve_model_dir(source)
    if out.resolve() == ckpt.resolve():
        raise ValueError(f"HF_DIR {out} is the checkpoint itself; choose another directory")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = load_model(ckpt, dtype=dtype)
    save_pretrained(model, out, tokenizer=True)
    print(f"exported {ckpt} -> {out} ({model.num_params():,} parameters, {args.dtype})")
    print(f"load it with: transformers.GPT2LMHeadModel.from_pretrained({str(out)!r}) or gpt2 generate --model {out}")
    return 0
