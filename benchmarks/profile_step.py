"""Where the server's decode step spends its time: the kernels of one step, grouped by name.

Runs gpt2.inference.runner.BatchDecoder's decode step eagerly under torch.profiler (CUDA kernels
only) and prints, per kernel name, how many launches one step makes and their GPU time; then the
step's time as a CUDA-graph replay. The difference between the replay and the kernels' sum is what
the launches themselves cost inside the graph (gaps between tiny kernels).

  python benchmarks/profile_step.py                      # gpt2 124M random, bf16, B=1 and 32, position 160
  python benchmarks/profile_step.py --batches 1 --position 900 --mode sample --fused off
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import time_decode_step  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.inference.runner import BatchDecoder  # noqa: E402
from gpt2.inference.sampling import FILTER, GREEDY, PENALIZE, SAMPLE  # noqa: E402

MODES = {"greedy": GREEDY, "sample": SAMPLE, "filter": FILTER}
MODES |= {f"{name}+penalties": mode | PENALIZE for name, mode in MODES.items()}  # the penalties' kernels too


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2", help="a GPTConfig preset (random weights)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--position", type=int, default=160, help="every row's position (its columns: position + 1)")
    p.add_argument("--mode", choices=list(MODES), default="greedy")
    p.add_argument("--fused", choices=["auto", "on", "off"], default="auto", help="BatchDecoder's fused decode path")
    p.add_argument("--top", type=int, default=25, help="kernel names to list")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("profile_step.py needs CUDA")
        return 1
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(args.model)).to("cuda", torch.bfloat16).eval()
    mode = MODES[args.mode]
    for B in [int(b) for b in args.batches.split(",")]:
        dec = BatchDecoder(model, B, cuda_graph=True, fused={"auto": None, "on": True, "off": False}[args.fused])
        pos = args.position
        _, L = dec.shape_for(B, pos + 1)
        kernels = profile(dec, B, L, pos, mode)
        n = sum(c for c, _ in kernels.values())
        total = sum(t for _, t in kernels.values())
        dec._capture(B, L, mode, torch.cuda.graph_pool_handle())
        replay = time_decode_step(dec, B, L, pos, mode, torch.device("cuda"), n=300)
        print(f"\nB={B} pos={pos} L={L} {args.mode}: {n} kernels, {total:.1f} us of kernel time; ", end="")
        print(f"graph replay {replay * 1e3:.1f} us")
        print(f"{'launches':>8} {'us':>8}  kernel")
        for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[: args.top]:
            print(f"{count:8d} {us:8.1f}  {name[:110]}")
    return 0


@torch.no_grad()
def profile(dec: BatchDecoder, B: int, L: int, pos: int, mode: int) -> dict[str, tuple[int, float]]:
    """Kernels of one eager step: name -> (launches, GPU microseconds)."""
    dec.state.pos.fill_(pos)
    for _ in range(3):
        dec.step(B, L, mode)
    torch.cuda.synchronize()
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.state.pos.fill_(pos)
            dec.step(B, L, mode)
        torch.cuda.synchronize()
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memset"):
            out[e.name][0] += 1
            out[e.name][1] += e.device_time_total
    return {k: (round(c / steps), t / steps) for k, (c, t) in out.items()}


if __name__ == "__main__":
    sys.exit(main())
