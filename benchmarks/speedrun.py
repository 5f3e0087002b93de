"""The proxy speedrun: time to GPT-2-quality loss for training recipes that keep GPT-2's architecture.

The full 10B-token recipe is out of reach of a benchmark, so every recipe runs on one fixed proxy:

  data   the first 330 books of ../shared/data/gutenberg/train.jsonl.xz (~27.7M GPT-2 tokens) for
         training, the 28 books of val.jsonl.xz for validation, tokenized on the GPU machine with `gpt2
         prepare` from .devcarry/speedrun (made here by `carry`: the first 700 books, xz -9e, under the
         device's 64 MiB; `prepare` takes the first 330 of them, `prepare --all` every one) into
         runs/speedrun/data (never carried: prepare there, not here)
  model  GPT-2 124M, T = 1024, bf16 autocast, torch.compile, one GPU
  runs   `gpt2 train --config configs/speedrun/RECIPE.toml` itself, one fresh process per recipe, all
         sharing one inductor cache (the first run compiles, the rest hit the cache)

Training wall-clock is the sum of the logged step times, compilation excluded (speedrun_report.py says
how). For every recipe the report gives val loss against tokens and against that wall-clock, the
wall-clock at which the val loss first reaches the baseline's final val loss (linear in time between two
evaluations), and the val loss at the baseline's full wall-clock. A 115M-token proxy is not a 10B-token
run: docs/training.md says what the numbers do and do not show.

  python benchmarks/speedrun.py carry --books 700                       # here: .devcarry/speedrun (slow: xz -9e)
  python benchmarks/speedrun.py prepare [--all]                         # there: .devcarry/speedrun -> shards
  python benchmarks/speedrun.py run baseline muon-short                 # configs/speedrun/*.toml
  python benchmarks/speedrun.py run muon-short@muon_lr=6e-3,max_steps=150   # a variant of a recipe
  python benchmarks/speedrun.py report baseline muon-short --png benchmarks/speedrun.png
  python benchmarks/speedrun.py plan levers --budget-s 540 --pack $OUT/levers.json --png $OUT/levers.png
  python benchmarks/speedrun.py report --pack $OUT/levers.json --results benchmarks/RESULTS.md
  python benchmarks/speedrun.py plan levers --smoke --budget-s 300      # CPU: a tiny model, the whole pipeline

  python benchmarks/speedrun.py plan adamw --resume $OLD/adamw.json ...  # a series over several GPU calls

`plan NAME` (speedrun_plans.PLANS: levers, adamw, regime2, final) prepares the data (inside its budget),
measures the baseline (--baseline-mode full: trained now; timing: 30 steps timed, its final val given
with --baseline-val; skip: --baseline-val and --baseline-seconds given), then runs the plan's series until
the budget is spent (speedrun_series says how runs are chosen and kept), packing every finished run's
metrics into one JSON file after each run, and ends with the report. With --resume PACK (an earlier call's
pack of the same plan) every run that finished there is taken from it instead of trained again (same label,
recipe and settings), the baseline's included, so the greedy choices replay and the series goes on where the
earlier call's budget ended; its new pack holds both calls' runs. A pack whose runs ran on another card is
refused (wall-clock ratios compare one card only). `report --pack` makes the same report from that file
alone, here, also when the GPU call was cut off.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

START = time.monotonic()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import append_block, command_line  # noqa: E402
from benchmarks.speedrun_plans import PLANS  # noqa: E402
from benchmarks.speedrun_report import load_curve, plot, report, report_pack  # noqa: E402
from benchmarks.speedrun_series import Series, parse_recipe, run_name, train_command, train_process  # noqa: E402

SOURCE = REPO / ".devcarry" / "speedrun"  # what is carried to the GPU machine: the compressed books only
DATA = REPO / "runs" / "speedrun" / "data"  # what is made there (ignored, never carried): shards, the 330 books
SHARED = REPO.parent / "shared" / "data" / "gutenberg"
PROXY_BOOKS = 330
CARRY_LIMIT = 64 * 2**20  # the device's working-tree limit, carried files included


def proxy_source(source: Path, scratch: Path) -> Path:
    """train330.jsonl.xz, or the first 330 books of train.jsonl.xz written out as scratch/train330.jsonl."""
    if (source / "train330.jsonl.xz").is_file():
        return source / "train330.jsonl.xz"
    books = source / "train.jsonl.xz"
    if not books.is_file():
        raise SystemExit(f"neither {source}/train330.jsonl.xz nor {books} exists; make them with `speedrun.py carry`")
    out = scratch / "train330.jsonl"
    if not out.is_file():
        scratch.mkdir(parents=True, exist_ok=True)
        with lzma.open(books, "rt", encoding="utf-8") as f, open(out.with_suffix(".tmp"), "w", encoding="utf-8") as g:
            for _, line in zip(range(PROXY_BOOKS), f):
                g.write(line)
        out.with_suffix(".tmp").rename(out)
    return out


def prepare(source: Path, out: Path, all_books: bool = False) -> Path:
    """Tokenize the proxy (its 330 training books, or with all_books every carried one) and the validation
    books with `gpt2 prepare`; a no-op when already done."""
    train = source / "train.jsonl.xz" if all_books else proxy_source(source, out.parent)
    val = source / "val.jsonl.xz"
    for path in (train, val):
        if not path.is_file():
            raise SystemExit(f"{path} not found; make it with `speedrun.py carry` (see this script's docstring)")
    args = [sys.executable, "-m", "gpt2", "prepare", str(train), "--val-source", str(val), "--out", str(out), "-q"]
    subprocess.run(args, check=True, cwd=REPO)
    return out


def carry(books: int, shared: Path, dest: Path) -> None:
    """Write dest/train.jsonl.xz (the first `books` training books, xz -9e: the smallest form to carry)
    and dest/val.jsonl.xz, and say whether they fit the device's 64 MiB with the repository."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "train.jsonl.xz.tmp"
    with lzma.open(shared / "train.jsonl.xz", "rb") as f, lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as g:
        for _, line in zip(range(books), f):
            g.write(line)
    tmp.rename(dest / "train.jsonl.xz")
    shutil.copyfile(shared / "val.jsonl.xz", dest / "val.jsonl.xz")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    repo = sum((REPO / name).stat().st_size for name in tracked.decode().split("\0") if (REPO / name).is_file())
    carried = sum(p.stat().st_size for p in dest.glob("*.xz"))
    verdict = "fits" if repo + carried < CARRY_LIMIT else "does NOT fit: carry fewer --books"
    print(f"{dest}: {carried / 2**20:.1f} MiB carried + {repo / 2**20:.1f} MiB repository = "
          f"{(repo + carried) / 2**20:.1f} MiB of 64 MiB: {verdict}")  # fmt: skip


def run(recipes: list[str], data: Path, out: Path, smoke: bool) -> None:
    """Train each recipe (or RECIPE@key=value,... variant) in a fresh `gpt2 train` process; its log goes to
    OUT/NAME.log."""
    out.mkdir(parents=True, exist_ok=True)
    for name in recipes:
        recipe, changes = parse_recipe(name)
        log_path = out / f"{run_name(name)}.log"
        args = train_command(recipe, changes, data, out / run_name(name), smoke)
        code, wall = train_process(args, log_path, None, out / "inductor-cache")
        print(f"{name}: exit {code} in {wall:.0f} s (log {log_path})", flush=True)
        if code != 0:
            print(log_path.read_text()[-3000:])
            raise SystemExit(code or 1)


def series(args: argparse.Namespace, pack_path: Path) -> None:
    """`plan NAME`: the data, the baseline, the plan's series under the budget, packed into pack_path."""
    plan = PLANS[args.recipes[0]]
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in {lever.label for lever in plan.levers}]
        if unknown:
            raise SystemExit(f"--only: plan {plan.name} has no lever {', '.join(unknown)}")
        plan = replace(plan, levers=tuple(lever for lever in plan.levers if lever.label in wanted))
    prior = read_prior(args.resume, plan.name, this_card(args.smoke)) if args.resume else None
    needs_all = any(lever.data == "all" for lever in plan.levers)
    data = {"proxy": args.data, "all": args.data.parent / "data-all"}
    if not args.smoke:
        prepare(args.source, data["proxy"])
        if needs_all:
            prepare(args.source, data["all"], all_books=True)
    out = args.out / f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    meta = {"budget_s": args.budget_s, "min_gain": args.min_gain, "command": command_line()}
    if args.resume:
        meta["resumed_from"] = str(args.resume)
    if prior and "migrated" in prior:  # a note on runs taken by hand from elsewhere stays with those runs
        meta["migrated"] = prior["migrated"]
    best = json.loads(args.changes_from.read_text()).get("best") if args.changes_from else None
    run_series = Series(plan, data, out, pack_path, START + args.budget_s, smoke=args.smoke, min_gain=args.min_gain,
                        meta=meta, prior=prior)  # fmt: skip
    if plan.greedy:
        target, _ = run_series.baseline(args.baseline_mode, args.baseline_val, args.baseline_seconds)
        run_series.greedy(target)
    else:
        run_series.each(best)


def read_prior(path: Path, plan: str, card: str) -> dict:
    """An earlier call's pack of the same plan (--resume), checked before anything runs."""
    try:
        prior = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        why = f"--resume {path}: not a readable series pack ({e}); pass an earlier call's --pack file"
        raise SystemExit(why) from None
    if not isinstance(prior, dict) or prior.get("plan") != plan or not isinstance(prior.get("runs"), list):
        found = prior.get("plan") if isinstance(prior, dict) else None
        raise SystemExit(f"--resume {path}: a pack of plan {found!r}, not {plan!r}; resume a series with its own plan")
    starts = [r for e in prior["runs"] for r in e.get("records", []) if r.get("event") == "start"]
    cards = sorted({str(r.get("device_name")) for r in starts})
    if cards and cards != [card]:
        # Wall-clock ratios only compare runs of one card: a series is resumed on the card it began on.
        raise SystemExit(f"--resume {path}: its runs ran on {', '.join(cards)}, this call trains on {card}; "
                         "resume it on that card or start the series afresh without --resume")  # fmt: skip
    return prior


def this_card(smoke: bool) -> str:
    """The device name this call's runs record (the run log's own environment_info): the GPU's, or the CPU's
    in a smoke run."""
    import torch

    from gpt2.training.metrics import environment_info

    cuda = not smoke and torch.cuda.is_available()
    return environment_info(torch.device("cuda" if cuda else "cpu"))["device_name"]


def report_from_pack(pack_path: Path, png: Path | None, results: Path | None) -> None:
    pack = json.loads(pack_path.read_text())
    text, shown, target, budget = report_pack(pack)
    print(text)
    if png is not None and shown:
        device = next((c.env.get("device_name") for c in shown if c.env), "?")
        try:
            plot(shown, target, budget, png, f"GPT-2 proxy speedrun, series {pack['plan']} ({device})")
            print(f"wrote {png}")
        except ImportError:  # the GPU machine may lack matplotlib: plot here later with `report --pack`
            print(f"note: no matplotlib, so no {png}; run `speedrun.py report --pack {pack_path} --png ...` elsewhere")
    if results is not None:
        head = f"## Proxy speedrun series `{pack['plan']}` ({time.strftime('%Y-%m-%d')})\n\n`{pack.get('command')}`\n\n"
        append_block(results, head + text + "\n")
        print(f"appended to {results}")


def report_from_runs(args: argparse.Namespace) -> None:
    """`report NAME ...`: the comparison of run directories against the baseline run."""
    curves = [load_curve(args.out / run_name(name)) for name in args.recipes]
    base = next(c for c in curves if c.name == args.baseline)
    note = f"baseline final val loss {base.final:.4f} after {base.seconds[-1]:.1f} s of training"
    text = report(curves, base.final, base.seconds[-1], f"{note} ({base.steps[-1]} steps)")
    print(text)
    if args.png is not None:
        plot(
            curves, base.final, base.seconds[-1], args.png, f"GPT-2 124M proxy speedrun ({base.env.get('device_name')})"
        )
    if args.results is not None:
        head = ", ".join(f"{k} {base.env.get(k)}" for k in ("device_name", "torch", "cuda", "git_sha"))
        title = f"## Proxy speedrun ({time.strftime('%Y-%m-%d')})"
        append_block(args.results, f"{title}\n\n{head}\n\n`{command_line()}`\n\n{text}\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["carry", "prepare", "run", "plan", "report"])
    p.add_argument(
        "recipes", nargs="*", help="run/report: names of configs/speedrun/*.toml (or variants); plan: one plan"
    )
    p.add_argument("--source", type=Path, default=SOURCE, help="train.jsonl.xz (or train330.jsonl.xz) and val.jsonl.xz")
    p.add_argument("--data", type=Path, default=DATA, help="the proxy's shards (--all: beside it, data-all)")
    p.add_argument("--all", action="store_true", help="prepare: also every carried book (the second regime)")
    p.add_argument("--books", type=int, default=700, help="carry: how many training books (700 fit the 64 MiB)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "speedrun", help="one run directory per recipe")
    p.add_argument("--smoke", action="store_true", help="a tiny CPU run of each recipe (checks the pipeline)")
    p.add_argument("--baseline", default="baseline", help="report: the baseline run's name")
    p.add_argument(
        "--baseline-mode", default="full", choices=["full", "timing", "skip"], help="plan: how to measure it"
    )
    p.add_argument("--baseline-val", type=float, default=None, help="plan: the baseline's final val loss, if not run")
    p.add_argument("--baseline-seconds", type=float, default=None, help="plan --baseline skip: its training seconds")
    p.add_argument("--budget-s", type=float, default=540.0, help="plan: seconds from start to the last run's end")
    p.add_argument("--min-gain", type=float, default=0.005, help="plan: nats a lever must gain to be kept")
    p.add_argument("--only", default=None, help="plan: run only these levers (comma-separated labels), in plan order")
    p.add_argument("--changes-from", type=Path, default=None, help="plan regime2: a levers pack's best changes")
    p.add_argument("--pack", type=Path, default=None, help="plan: the series' JSON file; report: read it")
    p.add_argument(
        "--resume", type=Path, default=None, help="plan: an earlier call's pack; its finished runs are taken, not rerun"
    )
    p.add_argument("--png", type=Path, default=None, help="plot the curves here")
    p.add_argument("--results", type=Path, default=None, help="append the report to this file (benchmarks/RESULTS.md)")
    args = p.parse_args()
    if args.action == "carry":
        carry(args.books, SHARED, args.source)
    elif args.action == "prepare":
        prepare(args.source, args.data)
        if args.all:
            prepare(args.source, args.data.parent / "data-all", all_books=True)
    elif args.action == "run":
        run(args.recipes, args.data, args.out, args.smoke)
    elif args.action == "plan":
        if len(args.recipes) != 1 or args.recipes[0] not in PLANS:
            p.error(f"plan takes one of {', '.join(PLANS)}")
        if args.baseline_mode != "full" and args.baseline_val is None:
            p.error(f"plan --baseline-mode {args.baseline_mode} needs --baseline-val (the baseline's final val loss)")
        if args.baseline_mode == "skip" and args.baseline_seconds is None:
            p.error("plan --baseline-mode skip needs --baseline-seconds (the baseline's training seconds)")
        if args.changes_from and not any(lever.carry_best for lever in PLANS[args.recipes[0]].levers):
            p.error(f"plan {args.recipes[0]} runs its recipes as shipped; drop --changes-from (only regime2 takes it)")
        pack_path = args.pack or args.out / f"{args.recipes[0]}.json"
        try:
            series(args, pack_path)
        finally:  # also when a run failed or the call is being stopped: report what finished
            if pack_path.is_file():
                report_from_pack(pack_path, args.png, args.results)
    elif args.pack is not None:
        report_from_pack(args.pack, args.png, args.results)
    else:
        report_from_runs(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
