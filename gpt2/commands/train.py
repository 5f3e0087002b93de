"""`gpt2 train`: train a GPT-2 on one CPU/GPU, or under torchrun on several.

    gpt2 train --quickstart                                  # a small GPT on Python's docs, minutes on a CPU
    gpt2 train --quickstart --data my.txt                    # the same on your own text
    gpt2 train --config configs/gpt2-124M-fineweb-edu.toml   # the GPT-2 124M recipe
    gpt2 train --config FILE.toml --max_steps 100 --micro-batch-size 16
    gpt2 train --resume runs/gpt2-124M                       # continue exactly where it stopped
    torchrun --nproc_per_node=8 -m gpt2 train --config FILE.toml

Every TrainingConfig field is an option (--field_name VALUE; dashes work too); a TOML file fills the
same fields, and the command line wins. The work is in gpt2.training.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dataclasses import MISSING, fields

    from gpt2.training.config import TrainingConfig
    from gpt2.training.settings import base_type, field_types

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--config", metavar="FILE.toml", help="a TOML file of the settings below")
    parser.add_argument(
        "--quickstart",
        action="store_true",
        help="start from the quickstart settings (configs/quickstart.toml): a small GPT on CPython's docs",
    )
    types = field_types()
    group = parser.add_argument_group("training settings (defaults: the GPT-2 124M recipe)")
    for f in fields(TrainingConfig):
        kind, _ = base_type(types[f.name])
        names = [f"--{f.name}"]
        if "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        extra = {"nargs": "?", "const": "true"} if kind is bool else {}
        group.add_argument(
            *names,
            dest=f"cfg_{f.name}",
            default=argparse.SUPPRESS,
            metavar=kind.__name__.upper(),
            help=help_text.replace("%", "%%"),
            **extra,
        )


def run(args: argparse.Namespace) -> int:
    import os

    from gpt2.training import build_config, main

    overrides = {k.removeprefix("cfg_"): v for k, v in vars(args).items() if k.startswith("cfg_")}
    cfg = build_config(args.config, overrides, quickstart=args.quickstart)
    return main(cfg, os.environ)
