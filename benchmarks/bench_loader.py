"""Batches per second of DataLoaderLite from memory-mapped shards (it must never be the bottleneck of a
~100 ms GPU step).

    python benchmarks/bench_loader.py                          # B=64, T=1024, synthetic 100M-token shards, CPU (+ CUDA)
    python benchmarks/bench_loader.py --data /tmp/gutenberg_shards --world-size 8
    python benchmarks/bench_loader.py --shard-tokens 2M --steps 20 --no-record     # smoke check

Without --data it writes two synthetic shards of --shard-tokens random tokens (default 100M, like
edu_fineweb10B) to a temporary directory. Each configuration reads --steps batches after a few warm-up
batches (warm page cache; a cold read is bounded by the disk). On CUDA a batch counts once it is on the
GPU (synchronized). Appends a block to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS, append_block, command_line, git_sha, machine  # noqa: E402
from gpt2.commands.prepare import _count  # noqa: E402
from gpt2.data import DataLoaderLite, LoaderConfig, write_shard  # noqa: E402
from gpt2.prepare import default_workers  # noqa: E402


def measure(cfg: LoaderConfig, device: str, steps: int) -> float:
    """Batches per second."""
    loader = DataLoaderLite(cfg, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        loader.next_batch()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        x, y = loader.next_batch()
    sync()
    return steps / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a directory of shards (default: synthetic shards in a temporary directory)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--world-size", type=int, default=1, help="measure rank 0 of this many")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--shard-tokens", type=_count, default=100_000_000, help="synthetic shard size")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    B, T, W = args.batch_size, args.seq_len, args.world_size

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        if not args.data:
            rng = np.random.default_rng(0)
            for i in range(2):
                write_shard(root / f"synthetic_train_{i:06d}.bin", rng.integers(0, 50257, args.shard_tokens, np.uint16))
        rows = []
        for device in devices:
            for shuffle in (False, True):
                cfg = LoaderConfig(root, B, T, split=args.split, world_size=W, shuffle=shuffle)
                rate = measure(cfg, device, args.steps)
                rows.append((device, shuffle, rate))

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    table = [
        f"| device | shuffle | batches/s (B={B}, T={T}, rank 0 of {W}) | ms/batch | tokens/s |",
        "|---|---|---:|---:|---:|",
        *[f"| {d} | {s} | {r:,.0f} | {1000 / r:.2f} | {r * B * T / 1e6:,.0f}M |" for d, s, r in rows],
    ]
    worst = min(r for _, _, r in rows)
    summary = [
        f"data: {args.data or f'2 synthetic shards of {args.shard_tokens:,} tokens'}; {args.steps} batches per row",
        f"slowest row: {1000 / worst:.2f} ms per batch = {100 / (1000 / worst):.0f}x faster than a 100 ms GPU step",
        f"GPU: {name}",
    ]
    print("\n".join(table + [""] + summary))
    if args.no_record:
        return
    block = "\n".join(
        [
            f"## bench_loader: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            "",
            f"- command: `{command_line()}` (git {git_sha()})",
            f"- machine: {machine()}; {name}",
            f"- python {platform.python_version()}, torch {torch.__version__}, {default_workers()} cores",
            "",
            *table,
            "",
            *[f"- {line}" for line in summary],
            "",
        ]
    )
    print(f"appended to {append_block(RESULTS, block)}")


if __name__ == "__main__":
    main()
