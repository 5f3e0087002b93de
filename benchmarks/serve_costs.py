"""Where a served token's host time goes: CPU time per delivered token of each part of `gpt2 serve`.

The server runs in this process on a CPU (engine thread + uvicorn's event loop thread, as
`gpt2 serve --engine-thread` runs them; --engine-process: the engine in a child process, as
`gpt2 serve` runs it by default); N streaming clients run in a child process on raw sockets (cheap,
so the client is not the bottleneck). Each part is timed with its thread's CPU clock by wrapping the
functions that do it; the rest of each thread's CPU time (read from /proc) is uvicorn, asyncio,
Starlette and the GIL hand-offs. Divided by the tokens delivered: microseconds of host CPU per
token, which is what limits a GPU server once its decode step is a single graph launch. The table
and what it showed are in benchmarks/NOTES.md.

The default model is the tiny preset with a 512-token vocabulary and a 512-token context: its
decode step on one CPU core (~1-2 ms) is close to GPT-2 124M's on an H200 (0.65-1.0 ms), so the
server's host work is not hidden behind a slow model.

  OMP_NUM_THREADS=1 python benchmarks/serve_costs.py                   # 1, 8, 32 clients x 256 tokens
  OMP_NUM_THREADS=1 python benchmarks/serve_costs.py --clients 32 --new-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.inference import engine as engine_module  # noqa: E402
from gpt2.serve import app as app_module  # noqa: E402
from gpt2.serve import handling as handling_module  # noqa: E402
from gpt2.serve import stream as stream_module  # noqa: E402
from gpt2.serve.server import ServeConfig, ServerThread, build_service, warm_up  # noqa: E402

COSTS: dict[str, float] = defaultdict(float)  # part -> CPU seconds, exclusive of the parts inside it
_stack = threading.local()


def timed(owner, name: str, part: str) -> None:
    """Wrap owner.name so its thread CPU time adds to COSTS[part]; a timed part called inside
    another one is charged to itself only (exclusive times)."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        stack = _stack.__dict__.setdefault("parts", [])
        now = time.thread_time()
        if stack:
            outer, since = stack[-1]
            COSTS[outer] += now - since
        stack.append((part, now))
        try:
            return fn(*args, **kwargs)
        finally:
            end = time.thread_time()
            COSTS[part] += end - stack.pop()[1]
            if stack:
                stack[-1] = (stack[-1][0], end)

    setattr(owner, name, wrapper)


def instrument(service) -> None:
    """Time the parts; every name here exists in the engine / app / handling / stream modules (the engine's
    parts only when it runs in this process)."""
    if isinstance(service.engine, engine_module.Engine):
        decoder = service.engine.decoder
        timed(decoder, "prefill", "model: prefill")
        timed(decoder, "step", "model: decode step")
        E = engine_module.Engine
        for name in ("_admit", "_launch_decode", "_collect", "_apply_cancels"):
            if hasattr(E, name):
                timed(E, name, f"engine: {name.strip('_')}")
        timed(service, "on_outputs", "bridge: on_outputs (engine thread)")
    else:
        timed(service, "on_outputs", "bridge: reader thread -> on_outputs (HTTP process)")
    timed(app_module, "_dispatch", "bridge: dispatch to request queues (loop)")
    C = stream_module.Completion
    timed(C, "_apply", "stream: outputs -> text -> SSE events")
    timed(handling_module, "parse_completion", "http: parse the request (loop)")
    timed(service.engine, "submit", "http: submit to the engine (loop)")


def thread_cpu(tid: int) -> float:
    """CPU seconds of a thread of this process so far (schedstat: ns on CPU)."""
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def process_cpu(pid: int) -> float:
    """CPU seconds of another process so far (all its threads)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that just ended
    return total / 1e9


def engine_cpu(service) -> float:
    """CPU seconds of the engine so far: its thread here, or its whole process."""
    engine = service.engine
    if isinstance(engine, engine_module.Engine):
        return thread_cpu(engine._thread.native_id)
    return process_cpu(engine._process.pid) + thread_cpu(engine._reader.native_id)


# ---------------------------------------------------------------------------------------------------
# the client process


def client_main(port: int, clients: int, new_tokens: int, prompt_len: int, t0: float, out) -> None:
    out.put(asyncio.run(_clients(port, clients, new_tokens, prompt_len, t0)))


async def _clients(port, clients, new_tokens, prompt_len, t0):
    await asyncio.sleep(max(0.0, t0 - time.time()))
    return await asyncio.gather(*[_one(port, i, new_tokens, prompt_len) for i in range(clients)])


async def _one(port: int, i: int, new_tokens: int, prompt_len: int) -> dict:
    g = torch.Generator().manual_seed(i)
    body = {
        "model": "bench",
        "prompt": torch.randint(0, 500, (prompt_len,), generator=g).tolist(),
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sent = time.perf_counter()
    writer.write(head.encode() + payload)
    times, buffer, reads = [], b"", 0
    while True:
        data = await reader.read(1 << 16)
        if not data:
            break
        now, reads = time.perf_counter(), reads + 1
        buffer += data
        *events, buffer = buffer.split(b"\n\n")
        times += [now] * sum(b'"finish_reason": null' in e for e in events)
        if any(b"[DONE]" in e for e in events):
            break
    writer.close()
    return {"sent": sent, "times": times, "reads": reads}


# ---------------------------------------------------------------------------------------------------


def pct(xs: list[float], q: int) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def run_level(service, port: int, clients: int, args) -> dict:
    loop_tid = next(t.native_id for t in threading.enumerate() if t.name == "gpt2-serve-http")
    COSTS.clear()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    t0 = time.time() + 1.0
    proc = ctx.Process(target=client_main, args=(port, clients, args.new_tokens, args.prompt_len, t0, results))
    proc.start()
    while time.time() < t0:
        time.sleep(0.01)
    cpu0 = {"engine": engine_cpu(service), "loop": thread_cpu(loop_tid)}
    steps0, tokens0 = service.engine.stats()["steps"], service.engine.stats()["tokens"]
    wall0 = time.perf_counter()
    records = results.get()
    wall = time.perf_counter() - wall0
    proc.join()
    time.sleep(0.05)  # the last step's counters
    cpu = {"engine": engine_cpu(service) - cpu0["engine"], "loop": thread_cpu(loop_tid) - cpu0["loop"]}
    tokens = service.engine.stats()["tokens"] - tokens0
    steps = service.engine.stats()["steps"] - steps0
    delivered = sum(len(r["times"]) for r in records)
    start = min(r["sent"] for r in records)
    end = max(r["times"][-1] for r in records if r["times"])
    ttft = [(r["times"][0] - r["sent"]) * 1e3 for r in records if r["times"]]
    itl = [(b - a) * 1e3 for r in records for a, b in zip(r["times"], r["times"][1:])]
    return {
        "clients": clients,
        "tokens": tokens,
        "delivered": delivered,
        "steps": steps,
        "tok/s": delivered / (end - start),
        "wall": wall,
        "ttft_p50": pct(ttft, 50),
        "itl_p50": pct(itl, 50),
        "itl_p99": pct(itl, 99),
        "reads/token": sum(r["reads"] for r in records) / max(1, delivered),
        "cpu": cpu,
        "costs": dict(COSTS),
    }


def report(levels: list[dict]) -> str:
    """One column per level: microseconds of CPU per delivered token for every part."""
    parts = sorted({p for lv in levels for p in lv["costs"]})
    engine_parts = [p for p in parts if p.startswith(("model", "engine", "bridge: on_outputs", "bridge: reader"))]
    loop_parts = [p for p in parts if p not in engine_parts]
    cols = [f"{lv['clients']} clients" for lv in levels]
    lines = ["| us of CPU per token | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def row(name, values):
        lines.append(f"| {name} | " + " | ".join(values) + " |")

    def per_token(lv, seconds):
        return f"{seconds / max(1, lv['tokens']) * 1e6:,.1f}"

    for p in engine_parts:
        row(p, [per_token(lv, lv["costs"].get(p, 0.0)) for lv in levels])
    row(
        "engine thread: rest (loop, waits, GIL)",
        [per_token(lv, lv["cpu"]["engine"] - sum(lv["costs"].get(p, 0.0) for p in engine_parts)) for lv in levels],
    )
    row(
        "**engine total** (its thread, or its process + the reader thread)",
        [per_token(lv, lv["cpu"]["engine"]) for lv in levels],
    )
    for p in loop_parts:
        row(p, [per_token(lv, lv["costs"].get(p, 0.0)) for lv in levels])
    row(
        "event loop: rest (uvicorn, asyncio, Starlette, writes)",
        [per_token(lv, lv["cpu"]["loop"] - sum(lv["costs"].get(p, 0.0) for p in loop_parts)) for lv in levels],
    )
    row("**event loop thread total**", [per_token(lv, lv["cpu"]["loop"]) for lv in levels])
    row("tokens/step", [f"{lv['tokens'] / max(1, lv['steps']):.1f}" for lv in levels])
    row("client reads/token", [f"{lv['reads/token']:.2f}" for lv in levels])
    row("new tok/s (2 shared cores)", [f"{lv['tok/s']:,.0f}" for lv in levels])
    row("TTFT p50 ms", [f"{lv['ttft_p50']:.1f}" for lv in levels])
    row("ITL p50 / p99 ms", [f"{lv['itl_p50']:.2f} / {lv['itl_p99']:.2f}" for lv in levels])
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--engine-process", action="store_true", help="the engine in its own process (gpt2 serve's default)")
    p.add_argument("--no-tune", action="store_true", help="skip gpt2 serve's process settings (GIL interval, gc)")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    config = GPTConfig.from_name("tiny", vocab_size=args.vocab_size, block_size=args.block_size)
    serve_config = ServeConfig(max_batch=args.max_batch)
    tmp = tempfile.TemporaryDirectory()
    if args.engine_process:
        from gpt2.inference.load import ModelSpec
        from gpt2.serve.process import build_process_service

        GPT(config).save_pretrained(Path(tmp.name))
        service = build_process_service(ModelSpec(tmp.name, "cpu"), "bench", serve_config)
    else:
        service = build_service(GPT(config).eval(), "bench", serve_config)
        warm_up(service)
    instrument(service)
    if not args.no_tune:
        from gpt2.commands.serve import tune_process

        tune_process()
    levels = []
    with ServerThread(service) as url:
        port = int(url.rsplit(":", 1)[1])
        for n in [int(c) for c in args.clients.split(",")]:
            levels.append(run_level(service, port, n, args))
            lv = levels[-1]
            print(f"{n} clients: {lv['tok/s']:,.0f} tok/s, {lv['tokens']} tokens in {lv['steps']} steps", flush=True)
    print(report(levels))
    if args.json:
        args.json.write_text(json.dumps(levels, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
