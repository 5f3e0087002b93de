"""Where `gpt2 generate`'s time after loading goes: the engine run profiled in process.

Builds a random-weight model on the device, then runs gpt2.inference.generate.run (what `gpt2
generate` runs after loading) twice in this process: the first run pays every first-use cost
(Triton kernels loaded from the on-disk cache, cuBLAS and attention set-up, graph capture); the
second shows the steady state. The first run is profiled with cProfile (host time: on a GPU
machine that is where first-use costs live). Run it twice in a row so the first process warms
Triton's on-disk cache, as the issue's target assumes.

  python benchmarks/profile_generate.py --new-tokens 256                      # GPU
  python benchmarks/profile_generate.py --device cpu --model tiny --new-tokens 16   # CPU smoke
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.inference.generate import run, sequences  # noqa: E402
from gpt2.tokenizer import Tokenizer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt", default="The meaning of life is")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--decode-kernels", choices=["auto", "fused", "torch"], default="auto")
    p.add_argument("--top", type=int, default=30, help="profile rows shown per ordering")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = GPT(GPTConfig.from_name(args.model)).to(device, dtype).eval()
    tok = Tokenizer()
    graph = {"auto": None, "on": True, "off": False}[args.cuda_graph]
    fused = {"auto": None, "fused": True, "torch": False}[args.decode_kernels]

    def once() -> tuple[float, object]:
        seqs = sequences([tok.encode(args.prompt)], args.new_tokens, temperature=0.0, stop_at_eos=False)
        t0 = time.perf_counter()
        result = run(model, seqs, eos_id=tok.eot_id, cuda_graph=graph, fused=fused)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, result

    profile = cProfile.Profile()
    profile.enable()
    first, r1 = once()
    profile.disable()
    second, r2 = once()
    what = f"graphs {args.cuda_graph}, kernels {args.decode_kernels}"
    print(f"# {args.model} on {device}, {args.new_tokens} new tokens, {what}")
    for name, s, r in (("first run (profiled)", first, r1), ("second run", second, r2)):
        rate = r.decode_tokens_per_s or float("nan")
        print(
            f"{name}: {s:.3f} s; {r.graphs} graphs captured in {r.capture_s:.3f} s; decoding {r.decode_s:.3f} s "
            f"({rate:,.0f} tok/s); fused {r.fused}"
        )
    for order in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(profile, stream=buf).sort_stats(order).print_stats(args.top)
        print(f"\n## first run by {order}\n" + buf.getvalue().split("\n\n", 2)[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
