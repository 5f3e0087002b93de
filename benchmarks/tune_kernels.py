"""Launch configurations of gpt2.kernels' decode-step kernels: time each candidate, print the best.

For every matmul shape of a decode step (c_attn, attn.c_proj, c_fc, mlp.c_proj, the LM head) at a
few batch sizes, and for the attention kernel at a few lengths, time every configuration in a
small grid as a CUDA graph of 20 launches (triton.testing.do_bench_cudagraph), next to the
default that gpt2.kernels.ops.linear_blocks picks. The table it prints is what linear_blocks
encodes.

  python benchmarks/tune_kernels.py                      # gpt2 124M shapes, bf16
  python benchmarks/tune_kernels.py --model gpt2-medium --batches 1,32
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2 import GPTConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--lengths", default="128,512,1000", help="attention: positions of every row")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("tune_kernels.py needs CUDA")
        return 1
    c = GPTConfig.from_name(args.model)
    C = c.n_embd
    shapes = {  # name: (N, K, fused parts)
        "c_attn+ln": (3 * C, C, "ln"),
        "attn.c_proj+res": (C, C, "res"),
        "c_fc+ln+gelu": (4 * C, C, "ln_gelu"),
        "mlp.c_proj+res": (C, 4 * C, "res"),
        "lm_head+ln": (c.vocab_size, C, "ln"),
    }
    for M in [int(b) for b in args.batches.split(",")]:
        for name, (N, K, kind) in shapes.items():
            tune_linear(M, N, K, kind, name)
        for S in [int(s) for s in args.lengths.split(",")]:
            tune_attention(c, M, min(S, c.block_size - 1))
    return 0


def bench(fn) -> float:
    """Microseconds per call, timed as a CUDA graph of repeated calls."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn) * 1e3


def tune_linear(M: int, N: int, K: int, kind: str, name: str) -> None:
    from gpt2.kernels import ops

    dt, dev = torch.bfloat16, "cuda"
    x = torch.randn(M, K, device=dev, dtype=dt)
    w = torch.randn(N, K, device=dev, dtype=dt) * 0.02
    kw = dict(
        bias=None if name.startswith("lm_head") else torch.zeros(N, device=dev, dtype=dt),
        norm=(torch.ones(K, device=dev, dtype=dt), torch.zeros(K, device=dev, dtype=dt), 1e-5)
        if "ln" in kind
        else None,
        gelu="gelu" in kind,
        residual=torch.randn(M, N, device=dev, dtype=dt) if kind == "res" else None,
    )

    def time_all(cfgs) -> list[tuple[float, tuple]]:
        out = []
        for cfg in cfgs:
            try:
                out.append((bench(lambda: ops.linear(x, w, blocks=cfg, **kw)), cfg))  # noqa: B023 (called at once)
            except Exception as e:  # out of shared memory or registers for this shape
                print(f"  {cfg}: {type(e).__name__}")
        return out

    default = ops.linear_blocks(M, N, K)
    block_m = default[0]
    if block_m == 1:  # a lone row: CUDA-core dot products, narrow column blocks, K in one or few trips
        grid = itertools.product([4, 8, 16, 32], [256, 512, 1024], [1, 2, 4, 8])
    else:
        grid = itertools.product([16, 32, 64], [64, 128, 256], [2, 4, 8])
    timed = sorted(time_all([(block_m, bn, bk, wp, 3) for bn, bk, wp in grid if bk <= max(K, 256)]))
    top = timed[0][1]
    timed = sorted(timed + time_all([top[:4] + (st,) for st in (2, 4, 5)]))
    base = time_all([default])[0][0]
    mb = N * K * 2 / 1e6
    best = ", ".join(f"{cfg[1:]} {us:.2f}" for us, cfg in timed[:3])
    print(f"M={M:3d} {name:16s} default {default[1:]} {base:6.2f} us; best {best}; {mb / timed[0][0]:.2f} TB/s at best")


def tune_attention(c: GPTConfig, M: int, pos_value: int) -> None:
    from gpt2.kernels import ops

    dt, dev = torch.bfloat16, "cuda"
    qkv = torch.randn(M, 3 * c.n_embd, device=dev, dtype=dt)
    kc = torch.randn(M + 1, c.n_head, c.block_size + 1, c.head_dim, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    pos = torch.full((M,), pos_value, device=dev, dtype=torch.long)
    rows = []
    for cfg in itertools.product([16, 32, 64, 128], [1, 2, 4, 8]):
        rows.append((bench(lambda: ops.attention(qkv, kc, vc, pos, c.n_head, cfg)), cfg))  # noqa: B023
    rows.sort()
    print(f"M={M:3d} attention pos {pos_value:4d}: best " + ", ".join(f"{cfg} {us:.2f}" for us, cfg in rows[:3]))


if __name__ == "__main__":
    sys.exit(main())
