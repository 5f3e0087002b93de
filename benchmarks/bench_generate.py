"""`gpt2 generate` as a user runs it: a fresh process per run, side by side for several source trees.

Builds a random-weight GPT-2 124M HF-format checkpoint in a temporary directory (once), then runs
`python -m gpt2 generate` on it --runs times per source tree (--repo, repeatable; PYTHONPATH=<repo>),
greedy by default. The first run of each tree warms Triton's on-disk kernel cache; the table's
medians are over the runs after it. Per run it records what the command says:

  this tree (issue 20)   [N tokens, R tokens/s decoding, S s since the model was loaded (loading took
                         L s; G CUDA graphs captured in C s); device, step]  -> decode tok/s R,
                         after-load s S, load s L (trees that report it), graphs, capture s
  older trees            [N tokens in S s, R tokens/s on device] -> end-to-end tok/s R over S (generation
                         timed, loading not: the same span as "since the model was loaded")

and the wall time of the whole process (Python start, imports and loading included). The greedy
text of every run is compared with the first tree's first run.

  python benchmarks/bench_generate.py --repo . --repo .devcarry/base          # GPU: the issue's targets
  python benchmarks/bench_generate.py --repo . --device cpu --model tiny --new-tokens 32 --runs 2  # CPU smoke

Targets (issue 20, one H100, 124M, 256 new tokens): decode >= 2,000 tokens/s and <= 0.5 s after the
model is loaded (graph capture included, warm kernel cache).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, environment, table  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402

NEW = re.compile(
    r"\[(\d+) tokens, (?:([\d.]+) tokens/s decoding|no decoding steps), ([\d.]+) s since the model was loaded"
    r"(?: \((?:loading took ([\d.]+) s)?(?:; )?(?:(\d+) CUDA graphs captured in ([\d.]+) s)?\))?; ([^\]]*)\]"
)
OLD = re.compile(r"\[(\d+) tokens in ([\d.]+) s, ([\d.]+) tokens/s on ([^\]]*)\]")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", action="append", default=None, help="source tree to run (repeatable; default: this one)")
    p.add_argument("--runs", type=int, default=4, help="processes per tree and variant (the first warms caches)")
    p.add_argument("--model", default="gpt2", help="GPTConfig preset of the random checkpoint")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt", default="The meaning of life is")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the texts are compared)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--variants",
        default="auto",
        help="comma-separated --decode-kernels values for trees whose gpt2 generate has that option "
        "(auto, fused, torch); older trees run once per variant list as they are",
    )
    p.add_argument("--timeout", type=float, default=120, help="seconds per process")
    args = p.parse_args()
    repos = [Path(r).resolve() for r in (args.repo or [str(ROOT)])]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if args.device == "auto" and device.type != "cuda":
        device = torch.device("cpu")
    print(f"# gpt2 generate, {args.new_tokens} new tokens, {args.model} random weights; {environment(device)}")
    print(f"# {command_line()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        GPT(GPTConfig.from_name(args.model)).save_pretrained(model_dir)
        rows, texts = [], {}
        for repo in repos:
            print(f"## {repo}: imports {_package_of(repo, tmp)}", flush=True)
            variants = args.variants.split(",") if _has_option(repo, tmp, "--decode-kernels") else ["-"]
            for variant in variants:
                runs = [_run(repo, model_dir, tmp, args, variant) for _ in range(args.runs)]
                for i, r in enumerate(runs):
                    print(f"  {repo.name} {variant} run {i + 1}: {r['summary']}", flush=True)
                    texts.setdefault("first", r["text"])
                rows.append(_row(repo, variant, runs, texts["first"]))
    head = ["tree", "decode kernels", "format", "tokens", "tok/s", "s after load", "load s", "graphs", "capture s"]
    head += ["process s", "1st process s", "same text"]
    print()
    print(table(head, rows))
    print(
        "\ntok/s: decoding rate (this tree) or end-to-end rate after loading (older trees); medians over runs 2..N;"
        " 'same text': greedy output equal to the first tree's (bf16 rounding may differ between decode steps)"
    )
    return 0


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"}


def _package_of(repo: Path, cwd: str) -> str:
    """Which gpt2 package the tree's processes import (PYTHONPATH must win over an installed one)."""
    cmd = [sys.executable, "-c", "import gpt2; print(gpt2.__file__)"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(repo), cwd=cwd, timeout=120)
    return r.stdout.strip() or r.stderr.strip()[-200:]


def _has_option(repo: Path, cwd: str, option: str) -> bool:
    cmd = [sys.executable, "-m", "gpt2", "generate", "--help"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(repo), cwd=cwd, timeout=120)
    return option in r.stdout


def _run(repo: Path, model_dir: Path, cwd: str, args, variant: str) -> dict:
    cmd = [sys.executable, "-m", "gpt2", "generate", "--model", str(model_dir), "--prompt", args.prompt]
    cmd += ["--max-new-tokens", str(args.new_tokens), "--temperature", str(args.temperature), "--no-stop"]
    cmd += ["--device", args.device, "--dtype", args.dtype]
    if variant != "-":
        cmd += ["--decode-kernels", variant]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(repo), cwd=cwd, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"summary": "timed out", "text": None, "process_s": float("nan")}
    out = {"process_s": time.perf_counter() - t0, "text": r.stdout if r.returncode == 0 else None}
    new, old = NEW.search(r.stderr), OLD.search(r.stderr)
    if r.returncode != 0 or not (new or old):
        return {**out, "summary": f"failed (exit {r.returncode}): {r.stderr.strip()[-300:]}"}
    if new:
        tokens, rate, after, loading, graphs, capture, where = new.groups()
        out.update(format="new", tokens=int(tokens), rate=float(rate or "nan"), after_load_s=float(after))
        out.update(load_s=float(loading) if loading else None)
        out.update(graphs=int(graphs or 0), capture_s=float(capture or 0.0), where=where)
    else:
        tokens, seconds, rate, where = old.groups()
        out.update(format="old", tokens=int(tokens), rate=float(rate), after_load_s=float(seconds))
        out.update(graphs=None, capture_s=None, load_s=None, where=where)
    out["summary"] = r.stderr.strip().splitlines()[-1] + f" (process {out['process_s']:.2f} s)"
    return out


def _row(repo: Path, variant: str, runs: list[dict], first_text: str | None) -> list:
    ok = [r for r in runs if "tokens" in r]
    warm = ok[1:] or ok
    if not warm:
        return [repo.name, variant, "failed", "-", "-", "-", "-", "-", "-", "-", "-", "-"]

    def med(key: str, fmt: str) -> str:
        values = [r[key] for r in warm if r.get(key) is not None]
        return format(statistics.median(values), fmt) if values else "-"

    same = all(r["text"] == first_text for r in ok) if first_text is not None else "-"
    first_process = f"{runs[0]['process_s']:.2f}"
    return [
        repo.name,
        variant,
        warm[0]["format"],
        warm[0]["tokens"],
        med("rate", ",.0f"),
        med("after_load_s", ".3f"),
        med("load_s", ".3f"),
        med("graphs", ".0f"),
        med("capture_s", ".3f"),
        med("process_s", ".2f"),
        first_process,
        "yes" if same is True else "no" if same is False else same,
    ]


if __name__ == "__main__":
    raise SystemExit(main())
