"""The `gpt2` command: parses arguments, then hands over to one module per subcommand.

Every subcommand module in gpt2/commands/ defines `add_arguments(parser)` and `run(args) -> int`.
Errors a user can fix (ValueError, FileNotFoundError, ...) print as one line and exit 2;
set GPT2_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

COMMANDS = {
    "train": "train a GPT-2 (CPU, GPU, or torchrun on several)",
    "prepare": "tokenize a corpus into token shards",
    "generate": "generate text from a model",
    "serve": "serve a model over HTTP: OpenAI-compatible completions and chat with continuous batching",
    "eval": "evaluate a model (hellaswag, loss, lambada)",
    "validate": "compare a checkpoint's logits and greedy tokens with HuggingFace transformers",
    "export": "write a checkpoint as a HuggingFace directory",
    "plot": "plot a run's loss curves to PNG",
}


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a typo such as --max_step is an error, not silently --max_steps.
    parser = argparse.ArgumentParser(
        prog="gpt2", description="A modular, fast, tested GPT-2 in PyTorch.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"gpt2.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def version_line() -> str:
    """`gpt2 --version`: this package's version, and the torch and Python it runs on."""
    import platform

    import torch

    from gpt2 import __version__

    return f"gpt2 {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def unknown_arguments_message(extra: list[str], parser: argparse.ArgumentParser) -> str:
    """One line for arguments a subcommand does not know, with the closest option it does know."""
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    flags = [a.split("=", 1)[0] for a in extra if a.startswith("-")]
    close = difflib.get_close_matches(flags[0], options, n=1, cutoff=0.6) if flags else []
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unrecognized argument(s) {' '.join(extra)}{hint} (`{parser.prog} --help` lists the options)"


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError, OSError)


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        print(f"gpt2 {args.command}: error: {unknown_arguments_message(extra, args._parser)}", file=sys.stderr)
        return 2
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
