"""The `gpt2` command: parses arguments, then hands over to one module per subcommand.

Every subcommand module in gpt2/commands/ defines `add_arguments(parser)` and `run(args) -> int`.
Errors a user can fix (ValueError, FileNotFoundError, ...) print as one line and exit 2;
set GPT2_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "train": "train a GPT-2 (CPU, GPU, or torchrun on several)",
    "prepare": "tokenize a corpus into token shards",
    "generate": "generate text from a model",
    "serve": "serve a model over HTTP: OpenAI-compatible completions with continuous batching",
    "eval": "evaluate a model (hellaswag, loss, lambada)",
    "validate": "compare a checkpoint's logits and greedy tokens with HuggingFace transformers",
    "export": "write a checkpoint as a HuggingFace directory",
    "plot": "plot a run's loss curves to PNG",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2", description="A modular, fast, tested GPT-2 in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"gpt2.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("gpt2: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("GPT2_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"gpt2 {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
