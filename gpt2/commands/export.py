"""`gpt2 export RUN_DIR|CHECKPOINT HF_DIR`: write a checkpoint as a HuggingFace-format directory
(config.json, model.safetensors, tokenizer files) that transformers and `gpt2 generate` load."""

from __future__ import annotations

import argparse

WEIGHT_DTYPES = ("fp32", "bf16", "fp16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_DIR|CKPT", help="a training run (its newest checkpoint) or a checkpoint")
    parser.add_argument("out", metavar="HF_DIR", help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty HF_DIR")
    # Stored weights, not compute precision (what --dtype means elsewhere); --dtype is kept as an alias.
    parser.add_argument(
        "--weights-dtype",
        "--dtype",
        dest="weights_dtype",
        choices=WEIGHT_DTYPES,
        default="fp32",
        help="dtype of the written weights (default fp32; --dtype is an older name for this option)",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpt2.checkpoint.layout import part_of_run
    from gpt2.commands.common import load_for_inference
    from gpt2.hf import save_pretrained
    from gpt2.inference.load import ModelSpec
    from gpt2.loading import model_dir

    out = Path(args.out).expanduser()
    clash = part_of_run(out)
    if clash is not None:  # --model RUN would then find two models; a run's files are train's to write
        raise ValueError(f"HF_DIR {out} {clash}; choose a directory outside the run")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; pass a directory for the HuggingFace files")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} is not empty; choose another HF_DIR or pass --overwrite to replace its files")
    source = Path(args.source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist; pass a training run directory or one of its checkpoints")
    ckpt = model_dir(str(source)).path
    if out.resolve() == ckpt.resolve():
        raise ValueError(f"HF_DIR {out} is the checkpoint itself; choose another directory")
    model, _ = load_for_inference(ModelSpec(str(ckpt), "cpu", args.weights_dtype))
    save_pretrained(model, out, tokenizer=True)
    print(f"exported {ckpt} -> {out} ({model.num_params():,} parameters, {args.weights_dtype})")
    print(f"load it with: transformers.GPT2LMHeadModel.from_pretrained({str(out)!r}) or gpt2 generate --model {out}")
    return 0
