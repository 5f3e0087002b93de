"""Serving under load: `gpt2 serve` with 1 / 8 / 32 / 128 concurrent streaming clients, next to
HuggingFace transformers' generate, plus the raw decode step and `gpt2 generate`'s two paths.

1. load: the server runs as a subprocess on 127.0.0.1 (its own GIL); clients are httpx streams in
   several worker processes (so the client side is never the bottleneck), each sending
   --requests-per-client requests of --new-tokens tokens (ignore_eos) one after another. Reported:
   aggregate new tokens/s (all tokens / wall time of the level), TTFT and inter-token latency
   percentiles (one SSE event per token; events that arrive in one read have ~0 gaps, as a client
   sees them), and the server's peak GPU memory (/health).
2. step: the decode step alone (BatchDecoder, as the server captures it) at batch 1 and 32, every
   row at one position (the middle of the load test's answers, 512, and near the end of the
   context), fused kernels (the default) and the model's own forward: median of CUDA-event timed
   graph replays (eager steps on a CPU).
3. hf: transformers.GPT2LMHeadModel.generate (greedy, KV cache, min_new_tokens = max_new_tokens)
   on the same weights at batch 1 and 16.
4. generate (CUDA only): `gpt2 generate` end to end in a fresh process for a few answer lengths,
   --cuda-graph on vs off (benchmarks/bench_generate.py compares it across source trees).

Every section has a time budget (--budget-scale multiplies them): a section past its budget stops
and says what it skipped. Each section prints its rows as they finish and is appended to
--results as soon as it is done, so a run that is cut off keeps what it measured. The default
(full) preset takes ~3-4 min on an H200, --quick ~90 s.

--model gpt2-random (default) saves a random-init GPT-2 124M checkpoint to a temporary directory
(no network needed; speed does not depend on the weights); a directory uses that checkpoint.

  python benchmarks/bench_serve.py                                   # H200: gpt2 124M bf16
  python benchmarks/bench_serve.py --quick                           # ~90 s
  python benchmarks/bench_serve.py --compile                         # the decode step compiled before capture
  python benchmarks/bench_serve.py --penalties                       # every request penalized (PENALTY_PRESET)
  python benchmarks/bench_serve.py --quick --model tiny-random --device cpu --new-tokens 16 --prompt-len 8  # CPU smoke
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing as mp
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

from benchmarks.common import RESULTS, append_results, environment, table, time_decode_step  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.serve.server import free_port  # noqa: E402

TARGETS = "step B=1 <= 0.40 ms; 32 clients >= 30,000 tok/s, p50 TTFT <= 25 ms, p99 ITL <= 5 ms"
# --penalties: typical values on every request (the step benchmark adds the penalized modes)
PENALTY_PRESET = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}

# What each preset runs and how many seconds each section may take (server start-up included in load).
PRESETS = {
    "full": dict(
        concurrency="1,8,32,128",
        compare_thread="32",
        requests_per_client=2,
        new_tokens=256,
        step_batches="1,32",
        hf_batches="1,16",
        generate_lengths="16,256",
        budgets=dict(load=120, step=45, hf=30, generate=50),
    ),
    "quick": dict(
        concurrency="1,32",
        compare_thread="32",
        requests_per_client=1,
        new_tokens=128,
        step_batches="1,32",
        hf_batches="1",
        generate_lengths="16",
        budgets=dict(load=50, step=25, hf=10, generate=20),
    ),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the ~90 s preset (fewer levels, shorter answers)")
    p.add_argument("--model", default="gpt2-random", help="PRESET-random (random weights) or a checkpoint directory")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", default=None, help="client counts (preset: 1,8,32,128; quick 1,32)")
    p.add_argument("--requests-per-client", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None, help="preset: 256; quick 128")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument(
        "--penalties",
        action="store_true",
        help=f"send {PENALTY_PRESET} with every request, and time the penalized step modes too",
    )
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="pass --compile to the server and the step benchmark")
    p.add_argument("--client-processes", type=int, default=8)
    p.add_argument(
        "--compare-thread", default=None, help="levels also run with --engine-thread (preset: 32; empty: none)"
    )
    p.add_argument("--step-batches", default=None, help="empty: skip the decode-step benchmark")
    p.add_argument("--hf-batches", default=None, help="empty: skip transformers")
    p.add_argument("--generate-lengths", default=None, help="CUDA only; empty: skip")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    preset = PRESETS["quick" if args.quick else "full"]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    budgets = {k: v * args.budget_scale for k, v in preset["budgets"].items()}
    device = torch.device(args.device)
    info = (
        f"model {args.model}, dtype {args.dtype}, prompt {args.prompt_len} random tokens, {args.new_tokens} new tokens "
        f"({'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}), max batch {args.max_batch}"
        f"{', compiled step' if args.compile else ''}{f', penalties {PENALTY_PRESET}' if args.penalties else ''}; "
        f"targets: {TARGETS}"
    )
    print(f"{environment(device)}\n{info}", flush=True)
    t_start = time.perf_counter()
    sections = [("load", load_test)]
    if args.step_batches:
        sections.append(("step", step_benchmark))
    if args.hf_batches:
        sections.append(("hf", hf_benchmark))
    if args.generate_lengths and device.type == "cuda":
        sections.append(("generate", generate_paths))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = checkpoint(args.model, Path(tmp))
        for i, (name, section) in enumerate(sections):
            t0 = time.perf_counter()
            print(f"\n[{name}] budget {budgets[name]:.0f} s", flush=True)
            try:
                body = section(args, model_dir, device, deadline=t0 + budgets[name])
            except Exception as e:  # one broken section must not lose the others
                body = f"{name}: failed: {type(e).__name__}: {e}"
            took = time.perf_counter() - t0
            body = f"{body}\n\n({name}: {took:.0f} s)"
            print(body, flush=True)
            head = info + "\n\n" if i == 0 else ""
            append_results(
                args.results, f"bench_serve {i + 1}/{len(sections)} ({name}): {args.model}", device, head + body
            )
    print(
        f"\nbench_serve: done in {time.perf_counter() - t_start:.0f} s; results appended to {args.results}", flush=True
    )
    return 0


def checkpoint(name: str, tmp: Path) -> Path:
    """A checkpoint directory: `name` itself, or a random-init preset saved under tmp."""
    if not name.endswith("-random"):
        return Path(name)
    torch.manual_seed(0)
    out = tmp / name
    GPT(GPTConfig.from_name(name.removesuffix("-random"))).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------
# 1. load


def load_test(args, model_dir: Path, device: torch.device, deadline: float) -> str:
    """The levels against `gpt2 serve` as it runs by default (engine process), then --compare-thread's
    levels against `gpt2 serve --engine-thread` (engine and HTTP in one process)."""
    workers = args.client_processes
    pool = mp.get_context("spawn").Pool(workers)
    runs = [("process", [], args.concurrency)]
    if args.compare_thread:
        runs.append(("thread", ["--engine-thread"], args.compare_thread))
    rows, notes = [], []
    try:
        pool.map_async(time.sleep, [0.2] * 2 * workers, chunksize=1)  # workers spawn while the server starts
        for engine, flags, levels in runs:
            if time.perf_counter() > deadline:
                notes.append(f"engine {engine}: skipped (section budget)")
                continue
            try:
                startup, more, skipped = serve_levels(args, model_dir, flags, levels, pool, deadline)
            except Exception as e:  # one mode failing must not lose the other
                notes.append(f"engine {engine}: failed: {type(e).__name__}: {str(e)[-2000:]}")
                continue
            rows += [[engine, *row] for row in more]
            notes.append(
                f"engine {engine}: {startup}" + (f"; skipped (section budget): {skipped} clients" if skipped else "")
            )
    finally:
        pool.terminate()
    headers = ["engine", "clients", "requests", "new tokens", "tok/s", "TTFT p50 ms", "p90", "p99", "ITL p50 ms"]
    headers += ["p90", "p99", "tok/step", "host ms/step", "wait ms/step", "HTTP us/tok", "GPU peak GiB"]
    legend = (
        "tok/step: tokens per decode step; host ms/step: the engine thread's own work per step; wait ms/step: "
        "its wait for the GPU per step (near 0: the engine, not the GPU, sets the pace); HTTP us/tok: CPU of "
        "the HTTP process per token (with --engine-thread it includes the engine)"
    )
    notes.append(legend)
    return "Load:\n\n" + table(headers, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def serve_levels(args, model_dir: Path, flags: list[str], levels: str, pool, deadline: float):
    """Start `gpt2 serve` (with flags), run each level; (start-up line, rows, levels skipped)."""
    port = free_port()
    cmd = [sys.executable, "-m", "gpt2", "serve", "--model", str(model_dir), "--served-model-name", "bench"]
    cmd += ["--port", str(port), "--max-batch", str(args.max_batch), "--device", args.device, "--dtype", args.dtype]
    cmd += (["--compile"] if args.compile else []) + flags
    log = open(Path(tempfile.gettempdir()) / f"bench_serve_{port}.log", "w+")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    rows, skipped = [], []
    try:
        wait_for_server(url, server, log, timeout=max(1.0, deadline - time.perf_counter()))
        log.seek(0)
        startup = next((s.strip() for s in log if s.startswith("gpt2 serve:") and "decode step" in s), "")
        print(f"  {startup}", flush=True)
        for clients in [int(c) for c in levels.split(",")]:
            if time.perf_counter() > deadline:
                skipped.append(clients)
                continue
            rows.append(run_level(args, url, clients, pool, deadline))
            print(
                f"  {' '.join(flags) or 'default'}: {clients} clients: {rows[-1][3]} tok/s, "
                f"TTFT p50 {rows[-1][4]} ms, ITL p99 {rows[-1][9]} ms",
                flush=True,
            )
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return startup, rows, skipped


def wait_for_server(url: str, server: subprocess.Popen, log, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited ({server.returncode}):\n{log.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not come up in time")


def run_level(args, url: str, clients: int, pool, deadline: float) -> list:
    """All clients of one level at once, spread over the worker processes; one table row."""
    import httpx

    workers = min(clients, args.client_processes)
    plan = [list(range(w, clients, workers)) for w in range(workers)]
    before = httpx.get(f"{url}/health").json()
    t0 = time.time() + 0.5  # all start at the same moment
    jobs = pool.starmap_async(client_worker, [(url, ids, args_dict(args), t0) for ids in plan])
    parts = jobs.get(timeout=max(5.0, deadline - time.perf_counter()))
    records = [r for part in parts for r in part]
    start, end = min(r["sent"] for r in records), max(r["times"][-1] for r in records if r["times"])
    tokens = sum(len(r["times"]) for r in records)
    ttft = [(r["times"][0] - r["sent"]) * 1e3 for r in records if r["times"]]
    itl = [(b - a) * 1e3 for r in records for a, b in zip(r["times"], r["times"][1:])]
    time.sleep(0.1)  # the counters of the last steps
    health = httpx.get(f"{url}/health").json()
    d = {
        k: health.get(k, 0) - before.get(k, 0)
        for k in ("steps", "tokens", "engine_busy_s", "engine_wait_s", "http_cpu_s")
    }
    steps = max(1, d["steps"])
    return [
        clients,
        len(records),
        tokens,
        f"{tokens / (end - start):,.0f}",
        *pcts(ttft),
        *pcts(itl),
        f"{d['tokens'] / steps:.1f}",
        f"{(d['engine_busy_s'] - d['engine_wait_s']) / steps * 1e3:.3f}",
        f"{d['engine_wait_s'] / steps * 1e3:.3f}",
        f"{d['http_cpu_s'] / max(1, d['tokens']) * 1e6:.1f}",
        health.get("gpu_peak_gib", "-"),
    ]


def args_dict(args) -> dict:
    return {
        k: getattr(args, k) for k in ("requests_per_client", "new_tokens", "prompt_len", "temperature", "penalties")
    }


def pcts(xs: list[float]) -> list[str]:
    if len(xs) < 2:
        return [f"{xs[0]:.2f}"] * 3 if xs else ["-"] * 3
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return [f"{q[49]:.2f}", f"{q[89]:.2f}", f"{q[98]:.2f}"]


def client_worker(url: str, client_ids: list[int], a: dict, t0: float) -> list[dict]:
    """A worker process: its clients as asyncio tasks, each sending its requests one after another."""
    return asyncio.run(_clients(url, client_ids, a, t0))


async def _clients(url: str, client_ids: list[int], a: dict, t0: float) -> list[dict]:
    import httpx

    await asyncio.sleep(max(0.0, t0 - time.time()))
    limits = httpx.Limits(max_connections=len(client_ids) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        runs = [_one_client(client, url, c, a) for c in client_ids]
        return [r for records in await asyncio.gather(*runs) for r in records]


async def _one_client(client, url: str, cid: int, a: dict) -> list[dict]:
    records = []
    for i in range(a["requests_per_client"]):
        g = torch.Generator().manual_seed(cid * 1000 + i)
        body = {
            "model": "bench",
            "prompt": torch.randint(0, 50000, (a["prompt_len"],), generator=g).tolist(),
            "max_tokens": a["new_tokens"],
            "temperature": a["temperature"],
            "seed": cid,
            "stream": True,
            "ignore_eos": True,
            **(PENALTY_PRESET if a["penalties"] else {}),
        }
        times, buffer = [], b""
        sent = time.time()
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            async for chunk in r.aiter_bytes():
                now = time.time()
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                times += [now for e in events if e.startswith(b"data: {") and b'"finish_reason": null' in e]
        records.append({"sent": sent, "times": times})
    return records


# ---------------------------------------------------------------------------------------------------
# 2. the decode step alone


def step_benchmark(args, model_dir: Path, device: torch.device, deadline: float) -> str:
    from gpt2.device import compute_dtype
    from gpt2.inference.runner import BatchDecoder
    from gpt2.inference.sampling import GREEDY, PENALIZE, SAMPLE

    model = GPT.from_pretrained(model_dir, device=device, dtype=compute_dtype(args.dtype, device)).eval()
    batches = [int(b) for b in args.step_batches.split(",")]
    block = model.config.block_size
    # every row at one position: the middle of the load test's answers, and two longer ones
    positions = sorted({min(args.prompt_len + args.new_tokens // 2, block - 1), min(512, block - 1), block - 24})
    paths = [("fused", dict(cuda_graph=True)), ("torch", dict(cuda_graph=True, fused=False))]
    if device.type != "cuda":
        paths = [("eager", {})]
    elif args.compile:
        paths = [("torch-compile", dict(cuda_graph=True, compile=True))]
    rows = []
    modes = (GREEDY, SAMPLE) + ((GREEDY | PENALIZE, SAMPLE | PENALIZE) if args.penalties else ())
    for path, kwargs in paths:
        dec = BatchDecoder(model, max(batches), **kwargs)
        dec.state.presence.fill_(PENALTY_PRESET["presence_penalty"])  # what the penalized modes then apply
        dec.state.frequency.fill_(PENALTY_PRESET["frequency_penalty"])
        dec.state.repetition.fill_(PENALTY_PRESET["repetition_penalty"])
        for B, pos, mode in itertools.product(batches, positions, modes):
            name = ("greedy" if mode & ~PENALIZE == GREEDY else "sample") + ("+penalties" if mode & PENALIZE else "")
            if time.perf_counter() > deadline:
                rows.append([B, pos, name, path, "skipped"])
                continue
            Bb, L = dec.shape_for(B, pos + 1)
            if dec.use_graph and (Bb, L, mode) not in dec.graphs:
                dec._capture(Bb, L, mode, torch.cuda.graph_pool_handle())
            ms = time_decode_step(dec, Bb, L, pos, mode, device)
            rows.append([B, pos, name, path, f"{ms:.3f}"])
            print(f"  step B={B} pos={pos} {name} {path}: {ms:.3f} ms", flush=True)
        del dec
    note = (
        "median ms per decode step (a CUDA graph replay on CUDA) with every row at that position; fused: "
        "gpt2.kernels (the server's default on CUDA), torch: the model's own forward; +penalties: the "
        f"PENALIZE mode with {PENALTY_PRESET} on every row"
    )
    return f"Decode step ({note}):\n\n" + table(["batch", "position", "mode", "path", "ms/step"], rows)


# ---------------------------------------------------------------------------------------------------
# 3. transformers, 4. gpt2 generate


def hf_benchmark(args, model_dir: Path, device: torch.device, deadline: float) -> str:
    try:
        import transformers
    except ImportError:
        return "transformers: not installed here, skipped"

    from gpt2.device import compute_dtype

    dtype = compute_dtype(args.dtype, device)
    hf = transformers.GPT2LMHeadModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    new = min(args.new_tokens, hf.config.n_positions - args.prompt_len)
    rows = []
    for B in [int(b) for b in args.hf_batches.split(",")]:
        if time.perf_counter() > deadline:
            rows.append([B, "-", "skipped (section budget)", "-"])
            continue
        ids = torch.randint(0, 50000, (B, args.prompt_len), device=device)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=50256)
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        n = (out.size(1) - args.prompt_len) * B
        rows.append([B, n, f"{n / dt:,.0f}", f"{dt / new * 1e3:.2f}"])
        print(f"  transformers B={B}: {n / dt:,.0f} tok/s", flush=True)
    head = (
        f"transformers {transformers.__version__} generate (greedy, {new} new tokens, whole call timed after a warm-up)"
    )
    return f"{head}:\n\n" + table(["batch", "new tokens", "tok/s", "ms/step"], rows)


def generate_paths(args, model_dir: Path, device: torch.device, deadline: float) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows = []
    for n in [int(x) for x in args.generate_lengths.split(",")]:
        for graph in ("on", "off"):
            left = deadline - time.perf_counter()
            if left < 5:
                rows.append([n, graph, "skipped (section budget)", "-"])
                continue
            cmd = [sys.executable, "-m", "gpt2", "generate", "--model", str(model_dir), "--max-new-tokens", str(n)]
            cmd += ["--no-stop", "--temperature", "0", "--cuda-graph", graph, "--dtype", args.dtype]
            t0 = time.perf_counter()
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=left)
                m = re.search(r"\[(\d+) tokens, ([\d.]+) tokens/s decoding, ([\d.]+) s since the model", r.stderr)
                result = [m.group(3), m.group(2)] if m else ["failed", r.stderr.strip()[-80:]]
            except subprocess.TimeoutExpired:
                result = ["timed out (section budget)", "-"]
            rows.append([n, graph, *result, f"{time.perf_counter() - t0:.1f}"])
            print(f"  gpt2 generate {n} tokens, graph {graph}: {rows[-1][2:]}", flush=True)
    head = "`gpt2 generate` in a fresh process ('s': after loading, as it reports; 'process s': the whole command)"
    columns = ["new tokens", "cuda graph", "s", "decode tok/s", "process s"]
    return f"{head}, --cuda-graph on vs off:\n\n" + table(columns, rows)


if __name__ == "__main__":
    raise SystemExit(main())
