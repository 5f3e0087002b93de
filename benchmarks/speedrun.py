"""The proxy speedrun: time to GPT-2-quality loss for training recipes that keep GPT-2's architecture.

The full 10B-token recipe is out of reach of a benchmark, so every recipe runs on one fixed proxy:

  data   the first 330 books of ../shared/data/gutenberg/train.jsonl.xz (~27.7M GPT-2 tokens) for
         training, the 28 books of val.jsonl.xz for validation, tokenized with `gpt2 prepare`:
             xz -dc ../shared/data/gutenberg/train.jsonl.xz | head -n 330 | xz > .devcarry/speedrun/train330.jsonl.xz
             cp ../shared/data/gutenberg/val.jsonl.xz .devcarry/speedrun/
  model  GPT-2 124M, T = 1024, bf16 autocast, torch.compile, one GPU
  runs   `gpt2 train --config configs/speedrun/RECIPE.toml` itself, one fresh process per recipe

Training wall-clock is the sum of the logged step times (what an optimizer step costs: forward,
backward, update), with step 0's time (which includes compilation) replaced by the median of the
next ten; evaluation, checkpoints and start-up are not counted. For every recipe the report gives
val loss against tokens and against that wall-clock, the wall-clock at which the val loss first
reaches the baseline's final val loss (linear in time between two evaluations), and the val loss at
the baseline's full wall-clock. A 115M-token proxy is not a 10B-token run: docs/training.md says
what the numbers do and do not show.

  python benchmarks/speedrun.py prepare                                 # .devcarry/speedrun -> shards
  python benchmarks/speedrun.py run baseline muon-short                 # configs/speedrun/*.toml
  python benchmarks/speedrun.py report baseline muon-short --png benchmarks/speedrun.png
  python benchmarks/speedrun.py run muon-short@muon_lr=6e-3,max_steps=150   # a variant of a recipe
  python benchmarks/speedrun.py run baseline muon-short --smoke         # CPU: a tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, command_line, table  # noqa: E402
from gpt2.checkpoint import read_metrics  # noqa: E402

CONFIGS = REPO / "configs" / "speedrun"
SOURCE = REPO / ".devcarry" / "speedrun"
# A CPU smoke run keeps each recipe's batch geometry (accumulation steps) on a tiny model.
SMOKE = ["--model", "tiny", "--seq_len", "32", "--micro_batch_size", "2", "--device", "cpu", "--compile", "false"]
SMOKE += ["--max_steps", "6", "--warmup_steps", "1", "--eval_interval", "2", "--val_steps", "1"]


def prepare(source: Path, out: Path) -> Path:
    """Tokenize the proxy once (train330 + val) with `gpt2 prepare`; a no-op when already done."""
    train, val = source / "train330.jsonl.xz", source / "val.jsonl.xz"
    for path in (train, val):
        if not path.is_file():
            raise SystemExit(f"{path} not found; make it as this script's docstring says")
    args = [sys.executable, "-m", "gpt2", "prepare", str(train), "--val-source", str(val), "--out", str(out), "-q"]
    subprocess.run(args, check=True, cwd=REPO)
    return out


def run_name(name: str) -> str:
    """The run directory of a recipe or variant, in letters, digits, '.', '_' and '-' only (the device
    tool brings back no other names): muon-short@muon_lr=6e-3,max_steps=150 becomes
    muon-short__muon_lr-6e-3_max_steps-150."""
    return name.replace("@", "__").replace("=", "-").replace(",", "_")


def parse_recipe(name: str) -> tuple[Path, list[str]]:
    """RECIPE or RECIPE@key=value,key=value (a variant: the config with some settings changed)."""
    base, _, changes = name.partition("@")
    overrides = []
    for change in filter(None, changes.split(",")):
        key, _, value = change.partition("=")
        overrides += [f"--{key}", value]
    return CONFIGS / f"{base}.toml", overrides


def smoke_overrides(recipe: Path) -> list[str]:
    """Settings that shrink a recipe to a tiny CPU run with the same number of micro-steps."""
    from gpt2.training import build_config

    cfg = build_config(recipe)
    accum = cfg.total_batch_size // (cfg.micro_batch_size * cfg.seq_len)
    warm = ["--batch_warmup_tokens", "64", "--batch_warmup_steps", "2"] if cfg.batch_warmup_steps else []
    return [*SMOKE, "--total_batch_size", str(accum * 64), *warm]


def run(recipes: list[str], data: Path, out: Path, smoke: bool) -> None:
    """Train each recipe in a fresh `gpt2 train` process; its log goes to OUT/RECIPE.log."""
    out.mkdir(parents=True, exist_ok=True)
    for name in recipes:
        recipe, overrides = parse_recipe(name)
        args = [sys.executable, "-m", "gpt2", "train", "--config", str(recipe), "--data_root", str(data)]
        args += ["--out_dir", str(out / run_name(name)), *(smoke_overrides(recipe) if smoke else []), *overrides]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        log_path = out / f"{run_name(name)}.log"
        with open(log_path, "w") as log:
            code = subprocess.run(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{name}: exit {code} in {time.perf_counter() - t0:.0f} s (log {log_path})", flush=True)
        if code != 0:
            print(log_path.read_text()[-3000:])
            raise SystemExit(code)


@dataclass
class Curve:
    """One run's evaluations: val loss at tokens and at training wall-clock (seconds)."""

    name: str
    steps: list[int]
    tokens: list[int]
    seconds: list[float]
    val: list[float]
    step_time: float  # median seconds per optimizer step
    tokens_per_sec: float  # median
    env: dict

    @property
    def final(self) -> float:
        return self.val[-1]

    def time_to(self, target: float) -> float | None:
        """The wall-clock at which the val loss first reaches `target` (linear between evaluations)."""
        for i, v in enumerate(self.val):
            if v <= target:
                if i == 0:
                    return self.seconds[0]
                t0, t1, v0 = self.seconds[i - 1], self.seconds[i], self.val[i - 1]
                return t0 + (t1 - t0) * (v0 - target) / (v0 - v)
        return None

    def val_at(self, seconds: float) -> float | None:
        """Val loss at a wall-clock: interpolated; the final one if the run ended before it."""
        if seconds >= self.seconds[-1]:
            return self.final
        for i in range(1, len(self.seconds)):
            if self.seconds[i] >= seconds:
                t0, t1 = self.seconds[i - 1], self.seconds[i]
                return self.val[i - 1] + (self.val[i] - self.val[i - 1]) * (seconds - t0) / (t1 - t0)
        return None


def load_curve(run_dir: Path) -> Curve:
    records = read_metrics(run_dir / "metrics.jsonl")
    train = sorted((r for r in records if r["type"] == "train"), key=lambda r: r["step"])
    evals = sorted((r for r in records if r["type"] == "eval" and "val_loss" in r), key=lambda r: r["step"])
    times = [r["step_time"] for r in train]
    if len(times) > 1:
        later = sorted(times[1:11])
        times[0] = later[len(later) // 2]  # step 0 compiled the model: not training time
    elapsed = [0.0]
    for t in times:
        elapsed.append(elapsed[-1] + t)
    tokens = [0] + [r["tokens"] for r in train]
    env = next((r for r in records if r.get("event") == "start"), {})
    rates = sorted(r["tokens_per_sec"] for r in train[1:]) or [0.0]
    return Curve(
        name=run_dir.name,
        steps=[r["step"] for r in evals],
        tokens=[tokens[r["step"]] for r in evals],
        seconds=[elapsed[r["step"]] for r in evals],
        val=[r["val_loss"] for r in evals],
        step_time=sorted(times)[len(times) // 2],
        tokens_per_sec=rates[len(rates) // 2],
        env=env,
    )


def report(curves: list[Curve], baseline: str) -> str:
    """The comparison table (markdown) against the baseline's final val loss and full wall-clock."""
    base = next(c for c in curves if c.name == baseline)
    target, budget = base.final, base.seconds[-1]
    rows = []
    for c in curves:
        reach = c.time_to(target)
        at_budget = c.val_at(budget) if c.seconds[-1] >= 0.95 * budget else None
        rows.append(
            [
                c.name,
                c.steps[-1],
                f"{c.tokens[-1] / 1e6:.1f}M",
                f"{c.seconds[-1]:.1f}",
                f"{c.tokens_per_sec / 1e3:.0f}K",
                f"{c.final:.4f}",
                "-" if reach is None else f"{reach:.1f} s = {reach / budget:.3f}x",
                "-" if at_budget is None else f"{at_budget:.4f} ({at_budget - target:+.3f})",
            ]
        )
    headers = ["recipe", "steps", "tokens", "train s", "tok/s", "final val", "reaches baseline final"]
    headers.append("val at baseline's wall-clock (vs baseline)")
    note = f"baseline final val loss {target:.4f} after {budget:.1f} s of training ({base.steps[-1]} steps)"
    return note + "\n\n" + table(headers, rows)


def plot(curves: list[Curve], baseline: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(c for c in curves if c.name == baseline)
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(13, 4.8))
    for c in curves:
        style = dict(marker="o", markersize=3, linewidth=1.4, label=c.name)
        by_tokens.plot([t / 1e6 for t in c.tokens], c.val, **style)
        by_time.plot(c.seconds, c.val, **style)
    axes = ((by_tokens, "training tokens (millions)"), (by_time, "training wall-clock (s, compile excluded)"))
    for ax, xlabel in axes:
        ax.axhline(base.final, color="gray", linestyle=":", linewidth=1, label=f"baseline final {base.final:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    by_time.axvline(base.seconds[-1], color="gray", linestyle="--", linewidth=0.8)
    low = min(min(c.val) for c in curves)
    for ax in (by_tokens, by_time):  # the first evaluation (~11 nats) would flatten the rest
        ax.set_ylim(low - 0.2, max(7.0, base.final + 1.0))
    device = base.env.get("device_name", "?")
    fig.suptitle(f"GPT-2 124M proxy speedrun (330 Gutenberg books, {device})", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["prepare", "run", "report"])
    p.add_argument("recipes", nargs="*", help="names of configs/speedrun/*.toml")
    p.add_argument("--source", type=Path, default=SOURCE, help="train330.jsonl.xz and val.jsonl.xz")
    p.add_argument("--data", type=Path, default=SOURCE / "data", help="the proxy's shards")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "speedrun", help="one run directory per recipe")
    p.add_argument("--smoke", action="store_true", help="a tiny CPU run of each recipe (checks the pipeline)")
    p.add_argument("--baseline", default="baseline")
    p.add_argument("--png", type=Path, default=None, help="plot the curves here")
    p.add_argument("--results", type=Path, default=None, help=f"append the table to this file (e.g. {RESULTS})")
    p.add_argument("--json", type=Path, default=None, help="write every curve's numbers here")
    args = p.parse_args()
    if args.action == "prepare":
        prepare(args.source, args.data)
        return 0
    if args.action == "run":
        run(args.recipes, args.data, args.out, args.smoke)
        return 0
    curves = [load_curve(args.out / run_name(name)) for name in args.recipes]
    text = report(curves, args.baseline)
    print(text)
    if args.png is not None:
        plot(curves, args.baseline, args.png)
        print(f"wrote {args.png}")
    if args.results is not None:
        env = curves[0].env
        head = ", ".join(f"{k} {env.get(k)}" for k in ("device_name", "torch", "cuda", "git_sha"))
        block = f"\n## Proxy speedrun ({time.strftime('%Y-%m-%d')})\n\n{head}\n\n`{command_line()}`\n\n{text}\n"
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(block)
        print(f"appended to {args.results}")
    if args.json is not None:
        args.json.write_text(json.dumps({c.name: c.__dict__ for c in curves}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
