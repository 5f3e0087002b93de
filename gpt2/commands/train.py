"""`gpt2 train` (not implemented yet)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise RuntimeError("gpt2 train is not implemented yet")
