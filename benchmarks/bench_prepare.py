"""Throughput of `gpt2.prepare` against tiktoken's own single-process speed on the same text.

    python benchmarks/bench_prepare.py                       # ../shared/data/gutenberg/train.jsonl.xz, all cores
    python benchmarks/bench_prepare.py --limit-docs 50 --no-record    # quick smoke check

Baseline: `encode_ordinary` of every document, one process, text already in memory (tiktoken's own
speed). Prepare: the whole pipeline end to end on the compressed file (decompress, parse JSON, encode in
`--workers` processes, write shards with sha256, manifest). Target (issue 3): prepare >= 80% of
baseline x cores. Wall-clock numbers need an otherwise idle machine, so the load average and the CPU
seconds (this process + its workers) are printed too. Appends a block to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import lzma
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpt2.prepare import default_workers, iter_blocks, iter_lines, prepare  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "gutenberg" / "train.jsonl.xz"


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the tokenizer workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def tiktoken_encoding():
    cache = REPO.parent / "shared" / "data" / "tiktoken-cache"
    if cache.is_dir():
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache))
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2"), "tiktoken.get_encoding('gpt2')"
    except Exception:  # offline without the cache: the package's encoding is the same tiktoken Encoding
        from gpt2.tokenizer import encoding

        return encoding(), "gpt2.tokenizer.encoding() (tiktoken)"


def fresh(texts: list[str]) -> list[str]:
    """New string objects: a str caches its UTF-8 form once tiktoken has asked for it, and a real run
    (prepare included) always pays for that conversion, so every measurement starts from fresh strings."""
    return [t[:1] + t[1:] for t in texts]


def baseline(texts: list[str]) -> tuple[int, float, float]:
    enc, _ = tiktoken_encoding()
    texts = fresh(texts)
    t, c = time.perf_counter(), cpu_seconds()
    n = sum(len(enc.encode_ordinary(text)) for text in texts)
    return n, time.perf_counter() - t, cpu_seconds() - c


def _encode_share(texts: list[str], ready) -> None:
    enc, _ = tiktoken_encoding()
    texts = fresh(texts)
    ready.wait()  # start together, after the copies
    for text in texts:
        enc.encode_ordinary(text)


def baseline_parallel(texts: list[str], procs: int) -> float:
    """Wall seconds for `procs` independent tiktoken processes to encode all texts (split evenly by size):
    the throughput "tiktoken x cores" that this machine actually delivers under its current load."""
    shares: list[list[str]] = [[] for _ in range(procs)]
    sizes = [0] * procs
    for text in sorted(texts, key=len, reverse=True):
        i = sizes.index(min(sizes))
        shares[i].append(text)
        sizes[i] += len(text)
    tiktoken_encoding()  # load once; forked processes inherit it
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ready = ctx.Barrier(procs + 1)
    workers = [ctx.Process(target=_encode_share, args=(share, ready)) for share in shares]
    for w in workers:
        w.start()
    ready.wait()
    t = time.perf_counter()
    for w in workers:
        w.join()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="a .jsonl[.xz/.gz/.zst] corpus with a text field")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--limit-docs", type=int, default=None, help="only the first N documents (smoke test)")
    parser.add_argument("--repeat", type=int, default=1, help="measure both N times, interleaved; keep the best")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    source = Path(args.source)
    if not source.is_file():
        raise SystemExit(f"no such corpus: {source} (the shared Gutenberg data is absent; pass --source)")

    with tempfile.TemporaryDirectory() as tmp:
        if args.limit_docs is not None:  # a smaller copy of the corpus, same format
            small = Path(tmp) / ("subset.jsonl.xz" if source.suffix == ".xz" else "subset.jsonl")
            with (lzma.open if small.suffix == ".xz" else open)(small, "wb") as g:
                for i, line in enumerate(iter_lines(iter_blocks(source))):
                    if i >= args.limit_docs:
                        break
                    g.write(line + b"\n")
            source = small
        t = time.perf_counter()
        texts = [json.loads(line)["text"] for line in iter_lines(iter_blocks(source)) if line.strip()]
        load_s = time.perf_counter() - t
        chars = sum(map(len, texts))

        load_before = os.getloadavg()[0]
        per_run: list[str] = []
        runs = []  # interleaved, so both see the same background load; the best of each is kept
        for r in range(args.repeat):
            n_base, wall_base, cpu_base = baseline(texts)
            wall_par = baseline_parallel(texts, args.workers)
            t, c = time.perf_counter(), cpu_seconds()
            result = prepare([str(source)], Path(tmp) / f"out{r}", workers=args.workers, val_tokens=0)
            wall_prep, cpu_prep = time.perf_counter() - t, cpu_seconds() - c
            runs.append((wall_base, cpu_base, wall_prep, cpu_prep, wall_par))
            rates = (
                f"tiktoken {n_base / wall_base / 1e6:.2f}M tok/s, x{args.workers} processes "
                f"{n_base / wall_par / 1e6:.2f}M tok/s, prepare {n_base / wall_prep / 1e6:.2f}M tok/s"
            )
            per_run.append(f"run {r + 1}: {rates} (load {os.getloadavg()[0]:.1f})")
            print(per_run[-1])
        load_after = os.getloadavg()[0]
        del texts
        wall_base, cpu_base = min((w, c) for w, c, _, _, _ in runs)
        wall_prep, cpu_prep = min((w, c) for _, _, w, c, _ in runs)
        wall_par = min(r[4] for r in runs)

    n_prep = result.train_tokens + result.val_tokens
    docs = result.docs
    assert n_prep == n_base + docs, (n_prep, n_base, docs)  # + one <|endoftext|> per document
    base_rate = n_base / wall_base
    prep_rate = n_prep / wall_prep
    target = 0.8 * base_rate * args.workers
    ratio = prep_rate / (base_rate * args.workers)
    par_rate = n_base / wall_par
    rows = [
        ("tiktoken encode_ordinary, 1 process (text in memory)", n_base, wall_base, cpu_base, base_rate),
        (
            f"tiktoken encode_ordinary, {args.workers} independent processes (text in memory)",
            n_base,
            wall_par,
            float("nan"),
            par_rate,
        ),
        (
            f"gpt2 prepare, {args.workers} workers (end to end from {source.name})",
            n_prep,
            wall_prep,
            cpu_prep,
            prep_rate,
        ),
    ]
    table = [
        "| what | tokens | wall s | CPU s | tokens/s |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {w} | {n:,} | {s:.1f} | {c:.1f} | {r / 1e6:.2f}M |".replace("| nan |", "| - |")
            for w, n, s, c, r in rows
        ],
    ]
    verdict = "met" if prep_rate >= target else "NOT met"
    summary = [
        f"prepare / (tiktoken x {args.workers} cores) = {ratio:.0%} "
        f"(target >= 80%: {target / 1e6:.2f}M tok/s, {verdict})",
        f"prepare / ({args.workers} independent tiktoken processes, run on this machine under the same load) "
        f"= {prep_rate / par_rate:.0%}",
        f"CPU cost per token: prepare {cpu_prep / n_prep * 1e9:.0f} ns, tiktoken {cpu_base / n_base * 1e9:.0f} ns",
        f"corpus: {docs:,} docs, {chars / 1e6:.1f}M characters "
        f"(reading + parsing it for the baseline: {load_s:.1f} s, not counted)",
        *per_run,
        f"best of {args.repeat} interleaved run(s); "
        f"load average (1 min) before/after: {load_before:.2f} / {load_after:.2f} on {default_workers()} cores",
    ]
    print("\n".join(table + [""] + summary))
    if args.no_record:
        return
    import tiktoken
    import torch

    from benchmarks.common import RESULTS, append_block, command_line, git_sha, machine  # imports torch: here only

    block = "\n".join(
        [
            f"## bench_prepare: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            "",
            f"- command: `{command_line()}` (git {git_sha()})",
            f"- machine: {machine()}",
            f"- python {platform.python_version()}, torch {torch.__version__}, tiktoken {tiktoken.__version__}, "
            f"encoding {tiktoken_encoding()[1]}",
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
