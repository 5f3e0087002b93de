"""Do the fused training kernels train the same model? Loss curves of real `gpt2 train` runs, fused vs torch.

Runs a recipe (default: the proxy speedrun's baseline, 300 steps of 65,536 tokens) through `gpt2 train`
with `--train_kernels torch` under two seeds (their difference is the run-to-run noise: data order is
fixed, so it is the initialization's) and with `--train_kernels fused` under the first seed, each a
fresh process, then compares the per-step training losses (means over windows of 50 steps), the
validation losses, and each run's median tokens/s (the real loop: data loading, logging, optimizer).

  python benchmarks/speedrun.py prepare                                   # the proxy's shards, once
  python benchmarks/kernels_loss_curves.py --out runs/kernels --results benchmarks/RESULTS.md
  python benchmarks/kernels_loss_curves.py --fused-seeds 1337,1 --out runs/kernels   # two seeds of each
  python benchmarks/kernels_loss_curves.py --recipe muon-full --steps 100 --seeds 1337 --out runs/kernels-muon
  python benchmarks/kernels_loss_curves.py --steps 6 --data data/shakespeare --train-args "--model tiny \
      --seq_len 64 --micro_batch_size 2 --device cpu --compile false --val_steps 1"  # CPU smoke
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import append_block, command_line, table  # noqa: E402
from gpt2.checkpoint import read_metrics  # noqa: E402

WINDOW = 50


def train(recipe: str, kernels: str, seed: int, args: argparse.Namespace) -> Path:
    """One `gpt2 train` run; returns its run directory."""
    out = args.out / f"{recipe}-{kernels}-seed{seed}"
    cmd = [sys.executable, "-m", "gpt2", "train", "--config", str(REPO / "configs" / "speedrun" / f"{recipe}.toml")]
    cmd += ["--data_root", str(args.data), "--out_dir", str(out), "--max_steps", str(args.steps)]
    cmd += ["--total_batch_size", "65536", "--warmup_steps", str(max(1, args.steps // 10))]
    cmd += ["--eval_interval", str(args.steps // 3), "--train_kernels", kernels, "--seed", str(seed)]
    cmd += args.train_args.split()
    t0 = time.perf_counter()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=f, stderr=f).returncode
    print(f"{out.name}: exit {code} in {time.perf_counter() - t0:.0f} s", flush=True)
    if code != 0:
        raise SystemExit(log.read_text()[-3000:])
    return out


def summary(run: Path) -> dict:
    records = read_metrics(run / "metrics.jsonl")
    train = sorted((r for r in records if r["type"] == "train"), key=lambda r: r["step"])
    evals = [r["val_loss"] for r in records if r["type"] == "eval" and "val_loss" in r]
    losses = [r["loss"] for r in train]
    windows = [sum(losses[i : i + WINDOW]) / len(losses[i : i + WINDOW]) for i in range(0, len(losses), WINDOW)]
    rates = sorted(r["tokens_per_sec"] for r in train[1:])
    return dict(name=run.name, windows=windows, val=evals, tok_s=rates[len(rates) // 2])


def compare(runs: list[dict]) -> str:
    base = runs[0]
    headers = ["run"] + [f"loss {i * WINDOW}-{(i + 1) * WINDOW - 1}" for i in range(len(base["windows"]))]
    headers += ["val losses", "max |window diff| vs first", "tokens/s"]
    rows = []
    for r in runs:
        diff = max(abs(a - b) for a, b in zip(r["windows"], base["windows"]))
        rows.append(
            [r["name"]]
            + [f"{w:.4f}" for w in r["windows"]]
            + [" / ".join(f"{v:.4f}" for v in r["val"]), f"{diff:.4f}", f"{r['tok_s'] / 1e3:.1f}K"]
        )
    return table(headers, rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="baseline", help="a configs/speedrun/*.toml name")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="1337,1", help="torch runs' seeds (the first run is the reference)")
    p.add_argument("--fused-seeds", default=None, help="fused runs' seeds (default: the first torch seed)")
    p.add_argument("--data", type=Path, default=REPO / "runs" / "speedrun" / "data")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "kernels")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--train-args", default="", help="more `gpt2 train` flags (e.g. a CPU smoke run's)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    fused_seeds = [int(s) for s in (args.fused_seeds or args.seeds.split(",")[0]).split(",")]
    runs = [train(args.recipe, "torch", seeds[0], args), train(args.recipe, "fused", fused_seeds[0], args)]
    runs += [train(args.recipe, "torch", s, args) for s in seeds[1:]]
    runs += [train(args.recipe, "fused", s, args) for s in fused_seeds[1:]]
    text = compare([summary(r) for r in runs])
    print(text)
    if args.results is not None:
        title = f"## Fused vs torch training kernels: loss curves ({time.strftime('%Y-%m-%d')})"
        append_block(args.results, f"{title}\n\n`{command_line()}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
