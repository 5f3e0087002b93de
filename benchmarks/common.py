"""What the benchmark scripts share: the environment line, timing, tables, RESULTS.md sections."""

from __future__ import annotations

import datetime
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
# Dense bf16 tensor-core peak of an H100 SXM (the H200 has the same chip): the MFU basis.
PEAK_BF16_FLOPS = 989.4e12


def environment(device: torch.device) -> str:
    """Card, torch/CUDA versions and host: one line for the table's header."""
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
        cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        card, cuda = f"CPU ({platform.processor() or platform.machine()})", "no CUDA"
    return f"{card}; torch {torch.__version__}; {cuda}; Python {platform.python_version()}"


def command_line() -> str:
    """The exact command, its script named from the repository root (as RESULTS.md quotes commands)."""
    script = os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else ""
    return "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])


def git_sha() -> str:
    """The checkout's short commit, or "unknown" outside a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def machine() -> str:
    """The CPU model, the cores this process may use and the kernel: one line for CPU-bound results."""
    from gpt2.prepare import default_workers

    cpu = platform.processor() or platform.machine()
    try:
        names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    return f"{cpu}, {default_workers()} cores usable, {platform.system()} {platform.release()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of fn, each call timed alone (synchronized before and after) after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def free_memory(device: torch.device) -> None:
    """Drop what the previous measurement left so the next one's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def append_results(path: Path, title: str, device: torch.device, body: str) -> None:
    """Append one section (title, date, environment, exact command, body) to RESULTS.md."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"## {title} ({now})\n\n- environment: {environment(device)}\n- command: `{command_line()}`\n\n{body}\n"
    append_block(path, section)


def append_block(path: Path, block: str) -> Path:
    """Append one block to a results file after a blank line: RESULTS.md, or a GPU call's own file that the lead
    merges into it (made if missing, without a title)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("\n" + block)
    return path


@torch.no_grad()
def time_decode_step(dec, B: int, L: int, pos: int, mode: int, device: torch.device, n: int = 200) -> float:
    """Median ms of one decode step of a gpt2.inference.runner.BatchDecoder at shape (B, L, mode), every
    row at position pos: CUDA events around a step (a graph replay where captured), else wall time."""
    for _ in range(10):
        dec.state.pos.fill_(pos)
        dec.step(B, L, mode)
    times = []
    for _ in range(n if device.type == "cuda" else 20):
        dec.state.pos.fill_(pos)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dec.step(B, L, mode)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            dec.step(B, L, mode)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
