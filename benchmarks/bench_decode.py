"""Decode throughput: new tokens/s of the engine's in-process generation (gpt2 generate's path,
gpt2.inference.generate) against the reference loop (gpt2.generation.generate_tokens).

Each timed call is a whole generation (engine and cache set-up, graph capture where there is one,
prefill of the prompt, then max-new-tokens steps), so tokens/s = batch * new tokens / wall time of
the call. Paths:
  engine        the engine with CUDA graphs and the fused decode kernels (gpt2 generate's default on CUDA)
  engine-torch  the same with the PyTorch decode step (--decode-kernels torch)
  engine-eager  the PyTorch step without graphs (--cuda-graph off): what the graphs buy
  plain         the reference: new index/mask tensors and ~200 kernel launches per step
Greedy unless --temperature > 0 (then the engine's seeded sampler and the reference's generator
draw differently); greedy tokens are compared with the reference's.

  python benchmarks/bench_decode.py                       # gpt2, bf16, batch 1 and 16, 512 new tokens
  python benchmarks/bench_decode.py --device cpu --model tiny --dtype fp32 --new-tokens 32 --batch-sizes 1,4 \
      --paths engine-eager,plain
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, append_results, environment, median, sync, table  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.generation import generate_tokens  # noqa: E402
from gpt2.inference.generate import run, sequences  # noqa: E402
from gpt2.ops import attention_backends  # noqa: E402


def _engine(**options):
    def call(model, prompt, valid, args, device) -> torch.Tensor:
        settings = dict(temperature=args.temperature, top_k=args.top_k, seed=0, stop_at_eos=False)
        seqs = sequences(prompt.tolist(), args.new_tokens, **settings)
        out = run(model, seqs, eos_id=model.config.vocab_size - 1, **options)
        return torch.tensor(out.tokens, device=device)

    return call


def _plain(model, prompt, valid, args, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, generator=g)
    return generate_tokens(model, prompt, valid, args.new_tokens, **kwargs)


PATHS = {
    "engine": _engine(),
    "engine-torch": _engine(fused=False),
    "engine-eager": _engine(fused=False, cuda_graph=False),
    "plain": _plain,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="GPTConfig preset (random weights: speed only)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--paths", default="engine,engine-torch,plain", help=f"comma list of {', '.join(PATHS)}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (median)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--attention", default="default", help="gpt2.ops.attention_backends kind for the whole call")
    p.add_argument("--profile-dir", default=None, help="write a kernel profile of one call per batch size here")
    p.add_argument("--device", default="cuda")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    device = torch.device(args.device)
    paths = args.paths.split(",")
    if any(name not in PATHS for name in paths):
        p.error(f"unknown path in {paths}; choose from {', '.join(PATHS)}")
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(GPTConfig.from_name(args.model))
    model = model.to(DTYPES[args.dtype]).eval()
    print(f"{environment(device)}\nmodel {args.model} {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new")
    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        prompt = torch.randint(0, model.config.vocab_size, (B, args.prompt_len), device=device)
        valid = torch.ones_like(prompt, dtype=torch.bool)
        outputs: dict[str, torch.Tensor] = {}
        results: dict[str, float] = {}
        for name in paths:
            with attention_backends(args.attention):
                outputs[name], dt, first_s = time_generation(model, prompt, valid, args, PATHS[name], device)
                if args.profile_dir and name == paths[0]:
                    profile_call(model, prompt, valid, args, PATHS[name], device, B, name)
            results[name] = dt
            n = outputs[name].numel()
            print(f"  B={B} {name}: {n / dt:,.0f} tok/s ({dt / args.new_tokens * 1e3:.3f} ms/step)", flush=True)
            rows.append([B, name, n, dt, first_s])
        ref = outputs.get("plain")
        for row in rows:
            if row[0] == B:
                out = outputs[row[1]]
                same = "-" if ref is None else _agreement(out, ref)
                base = results.get("plain")
                row.extend([f"{base / row[3]:.1f}x" if base else "-", same])
    body = table(
        ["batch", "path", "new tokens/s", "ms/step", "1st call s", "vs plain", "tokens == plain"],
        [
            [b, name, f"{n / dt:,.0f}", f"{dt / args.new_tokens * 1e3:.3f}", f"{first:.1f}", ratio, same]
            for b, name, n, dt, first, ratio, same in rows
        ],
    )
    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top_k {args.top_k}"
    info = (
        f"model {args.model} (random weights) in {args.dtype}, attention {args.attention}, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new, {mode}; a whole generation timed "
        f"(set-up, graph capture and prefill included), median of {args.repeats} after one warm-up call ('1st call s')"
    )
    body = f"{info}\n\n{body}"
    print("\n" + body)
    append_results(args.results, f"bench_decode: {args.model}", device, body)
    return 0


def time_generation(model, prompt, valid, args, path, device) -> tuple[torch.Tensor, float, float]:
    """(tokens, median seconds per call, seconds of the first call) of one path's generation."""

    def call() -> torch.Tensor:
        return path(model, prompt, valid, args, device)

    t0 = time.perf_counter()
    out = call()  # warm-up: compilation, cuBLAS/cuDNN handles
    sync(device)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, median(times), first_s


def profile_call(model, prompt, valid, args, path, device, B: int, name: str) -> None:
    """Kernel table (device time) of one generation, to see where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        path(model, prompt, valid, args, device)
        sync(device)
    events = prof.key_averages()
    path_out = Path(args.profile_dir) / f"profile_decode_{args.model}_B{B}_{name}_{args.attention}.txt"
    path_out.parent.mkdir(parents=True, exist_ok=True)
    path_out.write_text(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
    print(f"  profile -> {path_out}")


def _agreement(out: torch.Tensor, ref: torch.Tensor) -> str:
    """'yes', or where the first sequence that differs first differs (bf16 near-ties can flip)."""
    if out.shape == ref.shape and torch.equal(out, ref):
        return "yes"
    n = min(out.size(1), ref.size(1))
    diff = (out[:, :n] != ref[:, :n]).int()
    first = diff.argmax(dim=1)[diff.any(dim=1)]
    rows = int(diff.any(dim=1).sum())
    return f"no: {rows}/{out.size(0)} rows differ, first at step {int(first.min()) if rows else n}"


if __name__ == "__main__":
    raise SystemExit(main())
