"""The real training loop's speed: `gpt2 train` as a user runs it, a fresh process per (tree, recipe).

bench_train.py times forward, backward and the optimizer step as one unit. What lies around them in
`gpt2 train` (the schedule, reading the loss for the log, the stop vote, the weight average, when the
host waits for the GPU) is only in the real loop, so this runs it: random token shards (written once,
in a temporary directory), then `python -m gpt2 train --config configs/speedrun/NAME.toml` for each
--repo tree (PYTHONPATH=<repo>, run inside it) and each recipe, with evaluations off. It reports the
median tokens/s and step time over the steps after --skip (compilation and warm-up), and peak memory,
from each run's metrics.jsonl.

  python benchmarks/bench_loop.py --repo . --repo .devcarry/loopbase --recipes baseline,muon-full   # GPU
  python benchmarks/bench_loop.py --repo . --recipes muon-short --steps 6 --skip 2 \\
      --train-args "--device cpu --model tiny --seq_len 64 --micro_batch_size 2 --total_batch_size 128"  # CPU smoke

Issue 18's loop target: the Muon recipe's tokens/s within 3% of the AdamW recipe's (baseline).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_results, median, table  # noqa: E402
from gpt2.checkpoint import read_metrics  # noqa: E402
from gpt2.config import VOCAB_SIZE  # noqa: E402
from gpt2.data import write_shard  # noqa: E402


def write_random_shards(root: Path, train_tokens: int) -> Path:
    """Uniformly random GPT-2 token ids: a train shard of train_tokens and a small val shard."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root / "random_val_000000.bin", rng.integers(0, VOCAB_SIZE, size=200_000))
    write_shard(root / "random_train_000001.bin", rng.integers(0, VOCAB_SIZE, size=train_tokens))
    return root


def run_once(repo: Path, recipe: str, data: Path, out: Path, args) -> dict:
    """One `gpt2 train` of `recipe` inside `repo`; its medians after --skip, or why it failed."""
    cmd = [sys.executable, "-m", "gpt2", "train", "--config", f"configs/speedrun/{recipe}.toml"]
    cmd += ["--data_root", str(data), "--out_dir", str(out), "--max_steps", str(args.steps)]
    cmd += ["--warmup_steps", "2", "--eval_interval", "0", "--log_interval", "1", *shlex.split(args.train_args)]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no end within --timeout {args.timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if r.get("type") == "train" and r["step"] >= args.skip]
    if not steps:
        return {"error": f"no training step at or after --skip {args.skip} in its metrics.jsonl", "wall_s": wall}
    memory = [r["peak_memory_gib"] for r in records if r.get("peak_memory_gib") is not None]
    return {
        "tokens_per_s": median([r["tokens_per_sec"] for r in steps]),
        "step_ms": 1000 * median([r["step_time"] for r in steps]),
        "peak_gib": max(memory) if memory else None,
        "steps": len(steps),
        "wall_s": wall,
    }


def results_table(rows: list[tuple[str, str, dict]]) -> str:
    headers = ["tree", "recipe", "tokens/s", "step ms", "steps timed", "peak GiB", "process s"]
    cells = []
    for tree, recipe, r in rows:
        if "error" in r:
            cells.append([tree, recipe, f"failed: {r['error']}", "", "", "", f"{r['wall_s']:.0f}"])
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        cells.append(
            [tree, recipe, f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f}", r["steps"], peak, f"{r['wall_s']:.0f}"]
        )
    return table(headers, cells)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", action="append", type=Path, help="a source tree to run (repeatable; default: this one)")
    p.add_argument("--recipes", default="baseline,muon-full", help="configs/speedrun/NAME.toml, comma-separated")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=10, help="steps left out of the medians (compilation, warm-up)")
    p.add_argument("--train-tokens", type=int, default=6_000_000, help="random tokens in the train shard")
    p.add_argument("--train-args", default="", help="more `gpt2 train` options, e.g. for a CPU smoke run")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    p.add_argument("--results", type=Path, default=None, help="append the table to this Markdown file")
    args = p.parse_args()
    if args.skip >= args.steps:
        p.error(f"--skip ({args.skip}) must be below --steps ({args.steps})")
    repos = [r.resolve() for r in (args.repo or [ROOT])]
    recipes = [r for r in args.recipes.split(",") if r]
    missing = [
        f"{r}/configs/speedrun/{n}.toml"
        for r in repos
        for n in recipes
        if not (r / "configs/speedrun" / f"{n}.toml").is_file()
    ]
    if missing:
        p.error(f"no such recipe file: {missing[0]}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_random_shards(Path(tmp) / "data", args.train_tokens)
        for recipe in recipes:  # the trees side by side for each recipe
            for i, repo in enumerate(repos):
                result = run_once(repo, recipe, data, Path(tmp) / f"run-{recipe}-{i}", args)
                rows.append((repo.name if repo != ROOT else "this", recipe, result))
                print(f"{rows[-1][0]} {recipe}: {result}", flush=True)
    text = results_table(rows)
    print(text)
    if args.results:
        device = torch.device("cpu" if "--device cpu" in args.train_args or not torch.cuda.is_available() else "cuda")
        append_results(args.results, "bench_loop: gpt2 train's own loop", device, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
