"""`gpt2 plot RUN_DIR`: draw a run's loss curves (train, val, HellaSwag if logged) to a PNG."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (with metrics.jsonl)")
    parser.add_argument("--out", "-o", metavar="FILE.png", help="output file (default: RUN_DIR/loss.png)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpt2.training.plotting import plot_run

    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory; pass a training run directory")
    out = plot_run(run_dir, Path(args.out).expanduser() if args.out else None)
    print(f"wrote {out}")
    return 0
