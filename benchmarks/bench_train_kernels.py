"""The training kernels of gpt2.kernels, alone: each against the PyTorch it replaces, same shapes, one card.

For each model width, at M = B*T rows, bf16:
  forward   cuBLAS x @ W_fc^T (+ bias, inductor's GELU after it, compiled)  vs  fc_gelu (one Triton kernel)
  backward  cuBLAS dy @ W_proj then inductor's GELU backward + bias sum + h    vs  fc_gelu_backward
  MLP       the whole MLP forward + backward under bf16 autocast: compiled gpt2.block.MLP vs compiled FusedMLP
and the matmuls' TFLOP/s. Timed with CUDA events (triton.testing.do_bench's median, L2 flushed
between calls; the autotuner picks the Triton configurations on first use).

  python benchmarks/bench_train_kernels.py                       # GPT-2 124M, medium, xl widths
  python benchmarks/bench_train_kernels.py --widths 768 --rows 65536
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, append_results, environment, table  # noqa: E402
from gpt2 import GPTConfig  # noqa: E402
from gpt2.block import MLP  # noqa: E402
from gpt2.kernels import mlp as kmlp  # noqa: E402
from gpt2.kernels.training import FusedMLP  # noqa: E402

ROWS = {768: 65536, 1024: 32768, 1600: 16384}  # the micro-batch x 1024 each size trains at


def ms(fn, device) -> float:
    """Median ms per call, CUDA events, L2 flushed between calls (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def gelu_backward_torch(dh, pre):
    """What inductor runs after the dgrad matmul: dpre, h (for dW_proj) and the bias gradient."""
    pre32 = pre.float().requires_grad_()
    h = F.gelu(pre32, approximate="tanh")
    (dpre,) = torch.autograd.grad(h, pre32, dh.float())
    return dpre.to(pre.dtype), h.to(pre.dtype), dpre.sum(0)


def row(width: int, M: int, device: torch.device) -> list:
    C, N = width, 4 * width
    g = torch.Generator(device=device).manual_seed(width)
    x = torch.randn(M, C, device=device, generator=g).bfloat16()
    w_fc = (torch.randn(N, C, device=device, generator=g) * C**-0.5).bfloat16()
    b_fc = torch.randn(N, device=device, generator=g) * 0.1
    w_proj = (torch.randn(C, N, device=device, generator=g) * N**-0.5).bfloat16()
    dy = torch.randn(M, C, device=device, generator=g).bfloat16()
    fwd_torch = torch.compile(lambda: F.gelu(F.linear(x, w_fc, b_fc.bfloat16()), approximate="tanh"))
    bwd_gelu = torch.compile(gelu_backward_torch)
    pre, _ = kmlp.fc_gelu(x, w_fc, b_fc)
    t_gemm = ms(lambda: x @ w_fc.t(), device)
    t_fwd_torch = ms(fwd_torch, device)
    t_fwd = ms(lambda: kmlp.fc_gelu(x, w_fc, b_fc), device)
    t_dgrad = ms(lambda: dy @ w_proj, device)
    t_bwd_torch = ms(lambda: bwd_gelu(dy @ w_proj, pre), device)
    t_bwd = ms(lambda: kmlp.fc_gelu_backward(dy, w_proj, pre), device)
    t_mlp_torch, t_mlp = mlp_step_ms(width, M, device)
    err = fused_error(x, w_fc, b_fc, w_proj, dy, pre)
    tflops = 2 * M * C * N / 1e9  # GFLOP of one matmul -> TFLOP/s at t ms
    return [
        C,
        M,
        f"{t_gemm:.3f} ({tflops / t_gemm:.0f})",
        f"{t_fwd_torch:.3f}",
        f"{t_fwd:.3f} ({tflops / t_fwd:.0f})",
        f"{t_dgrad:.3f}",
        f"{t_bwd_torch:.3f}",
        f"{t_bwd:.3f} ({tflops / t_bwd:.0f})",
        f"{t_mlp_torch:.3f}",
        f"{t_mlp:.3f}",
        f"{t_mlp_torch / t_mlp:.2f}x",
        f"{err:.1e}",
    ]


def fused_error(x, w_fc, b_fc, w_proj, dy, pre) -> float:
    """Largest relative error of the kernels' outputs against PyTorch on the same (rounded) inputs."""
    p, h = kmlp.fc_gelu(x, w_fc, b_fc)
    ref_pre = (x.float() @ w_fc.float().t() + b_fc).bfloat16()
    dpre, h2, part = kmlp.fc_gelu_backward(dy, w_proj, pre)
    ref_dpre, ref_h, ref_db = gelu_backward_torch((dy.float() @ w_proj.float()), pre)
    pairs = [(p, ref_pre), (h, F.gelu(ref_pre.float(), approximate="tanh")), (dpre, ref_dpre), (h2, ref_h)]
    pairs.append((part.sum(0), ref_db))
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in pairs)


def mlp_step_ms(width: int, M: int, device: torch.device) -> tuple[float, float]:
    """Forward + backward of the whole MLP, compiled, bf16 autocast: gpt2.block.MLP vs FusedMLP."""
    torch.manual_seed(0)
    plain = MLP(GPTConfig(n_embd=width, n_head=width // 64)).to(device)
    fused = FusedMLP(plain)
    x = torch.randn(M // 1024, 1024, width, device=device, requires_grad=True)
    out = []
    for module in (plain, fused):
        step = torch.compile(module)

        def fwd_bwd(step=step):
            with torch.autocast("cuda", torch.bfloat16):
                y = step(x)
            y.float().pow(2).mean().backward()

        out.append(ms(fwd_bwd, device))
    return out[0], out[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="768,1024,1600", help="n_embd values (GPT-2 124M, medium, xl)")
    p.add_argument("--rows", type=int, default=None, help="M = B*T (default: the micro-batch each size trains at)")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    device = torch.device("cuda")
    print(environment(device))
    rows = []
    for width in [int(w) for w in args.widths.split(",")]:
        rows.append(row(width, args.rows or ROWS.get(width, 16384), device))
        print(rows[-1], flush=True)
    headers = ["C", "M", "GEMM ms (TFLOP/s)", "fwd torch", "fwd fused (TFLOP/s)", "dgrad GEMM", "bwd torch"]
    headers += ["bwd fused (TFLOP/s)", "MLP torch", "MLP fused", "MLP speed-up", "max rel err"]
    body = table(headers, rows)
    for name, k in (("forward", kmlp._forward_tuned), ("backward", kmlp._backward_tuned)):
        body += f"\n- {name} kernel configurations chosen: " + "; ".join(
            f"{key}: {cfg}" for key, cfg in getattr(k, "cache", {}).items()
        )
    print("\n" + body)
    append_results(args.results, "bench_train_kernels: the fused MLP against PyTorch", device, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
