"""`gpt2 prepare SOURCE... --out DIR`: tokenize text into GPT-2 token shards (the work is in gpt2/prepare/)."""

from __future__ import annotations

import argparse
import re
import sys

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def _count(text: str) -> int:
    """A token count: 100000000, 100_000_000, 1e8, 100M, 64k, 2.5B."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kKmMbBgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (examples: 100000000, 1e8, 100M, 64k)")
    value = float(match.group(1).replace("_", "")) * _SUFFIXES[match.group(2).lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="files, globs or directories (.txt, .jsonl, .json; optionally .gz/.xz/.zst/.bz2), "
        "hf:NAME[:CONFIG][?split=S&text_field=F&data_files=A,B] datasets, or the preset fineweb-edu-10B",
    )
    parser.add_argument("--out", "-o", metavar="DIR", help="output directory (fineweb-edu-10B: edu_fineweb10B)")
    parser.add_argument("--shard-tokens", type=_count, metavar="N", help="tokens per shard, e.g. 100M (default 100M)")
    parser.add_argument(
        "--val-source",
        action="append",
        metavar="SOURCE",
        help="a source whose documents are the validation split (repeatable); "
        "by default a file named val/valid/validation.* is one",
    )
    parser.add_argument(
        "--val-tokens", type=_count, metavar="N", help="without val sources: the first N tokens are the val split"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="without val sources: the first F of all tokens are val, at most one shard (default 0.1)",
    )
    parser.add_argument("--text-field", default="text", metavar="F", help="JSON/dataset field with the text (text)")
    parser.add_argument("--split", default="train", metavar="S", help="split of hf: datasets (train)")
    parser.add_argument("--prefix", help="shard file prefix: PREFIX_train_000001.bin (shard)")
    parser.add_argument("--workers", type=int, metavar="N", help="tokenizer processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of another corpus/settings in --out")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gpt2.prepare import prepare

    bar = None
    if not args.quiet:
        bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def log(message: str) -> None:
        if bar is not None:
            bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    try:
        result = prepare(
            args.sources,
            args.out,
            shard_tokens=args.shard_tokens,
            val_sources=args.val_source,
            val_tokens=args.val_tokens,
            val_fraction=args.val_fraction,
            text_field=args.text_field,
            split=args.split,
            prefix=args.prefix,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=bar,
            log=log,
        )
    finally:
        if bar is not None:
            bar.close()
    n_train = sum("_train_" in s for s in result.shards)
    n_val = sum("_val_" in s for s in result.shards)
    summary = (
        f"{result.out_dir}: {result.train_tokens:,} train tokens in {n_train} shard(s), "
        f"{result.val_tokens:,} val tokens in {n_val} shard(s), {result.docs:,} docs"
    )
    if result.already_done:
        summary += "; already prepared, nothing to do"
    else:
        summary += f"; {result.tokens_per_second / 1e6:.2f}M tok/s over {result.seconds:.1f} s"
    if result.resumed_shards and not result.already_done:
        summary += f"; resumed after {result.resumed_shards} finished shard(s)"
    if result.replaced:
        summary += f"; {result.replaced:,} undecodable UTF-8 sequence(s) replaced with U+FFFD"
    print(summary)
    return 0
