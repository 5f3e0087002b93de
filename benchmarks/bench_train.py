"""Training-step throughput: tokens/s, MFU and peak memory of a full optimizer step.

One step is `gpt2 train`'s own optimizer step, by the same functions (gpt2.training.step):
zero_grad, forward_backward under bf16 autocast (one micro-step), clip_gradients at 1.0,
apply_gradients with the optimizer of gpt2.training.build_optimizer (fused AdamW, weight decay 0.1
on 2-D parameters only; `--optimizer muon` for the Muon recipe's). Only the StepKernels choices,
the training kernels (gpt2.kernels.training.fuse_mlps, as `train_kernels = "fused"`) and the
compile mode vary between variants, so the benchmark cannot drift from training. Random tokens,
rotated among a few batches.

Variants (all in one process, so every speed-up is a ratio on the same card):
  fast          torch.compile(model), chunked loss (no logits), cuDNN attention first: train_kernels torch
  fused         as fast, with gpt2.kernels' fused training kernels: train_kernels fused
  fast-tuned    as fast, with inductor's coordinate-descent tuning of its Triton kernels
  fast-autotune as fast, compiled with mode "max-autotune-no-cudagraphs" (Triton GEMM templates, fused epilogues)
  fast-autotune-tma as fast-autotune, with inductor's persistent TMA (Hopper) matmul templates as candidates
  fast-autotune-aten as fast, max-autotune choosing among cuBLAS's own kernels only: addmm with its bias
                as a cuBLASLt epilogue (inductor's "bias_addmm") where that is faster; seconds of compile
  fused-autotune as fused, compiled the same way
  fast-flash    as fast, flash attention first
  fast-blocks   as fast, but each Block compiled on its own (compiles in seconds: for gpt2-xl)
  compile-logits torch.compile(model), logits + F.cross_entropy (build-nanogpt's step)
  eager-chunked no compile, chunked loss, cuDNN attention first
  eager         no compile, logits + F.cross_entropy, PyTorch's attention order: the plain reference

  python benchmarks/bench_train.py                                   # gpt2, B=64, T=1024 on CUDA
  python benchmarks/bench_train.py --model gpt2-xl --variants fast-blocks --batch-size 32,24,16,12,8
  python benchmarks/bench_train.py --device cpu --model tiny --batch-size 4 --seq-len 64 --variants eager,eager-chunked
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    PEAK_BF16_FLOPS,
    RESULTS,
    append_results,
    environment,
    free_memory,
    is_oom,
    median,
    peak_gib,
    sync,
    table,
)
from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.kernels.training import fuse_mlps  # noqa: E402
from gpt2.training import TrainingConfig, build_optimizer  # noqa: E402
from gpt2.training.metrics import flops_per_token, mfu, peak_flops  # noqa: E402
from gpt2.training.step import StepKernels, apply_gradients, clip_gradients, forward_backward  # noqa: E402


@dataclass(frozen=True)
class Variant:
    compile: str  # "none", "model" (torch.compile of the whole model) or "blocks" (each Block)
    chunked_loss: bool  # model(x, y, return_logits=False): the loss without (B, T, V) logits
    attention: str  # gpt2.ops.attention_backends kind
    fused: bool = False  # gpt2.kernels.training.fuse_mlps: the MLP's GELU in its matmuls' epilogues
    tuning: bool = False  # torch._inductor.config.coordinate_descent_tuning (longer compile)
    mode: str | None = None  # torch.compile mode
    tma: bool = False  # inductor's persistent TMA matmul templates (Hopper) among max-autotune's choices
    gemm_backends: str | None = None  # max-autotune over only these GEMM backends (e.g. "ATEN": cuBLAS's own)


VARIANTS = {
    "fast": Variant("model", True, "cudnn"),
    "fused": Variant("model", True, "cudnn", fused=True),
    "fast-tuned": Variant("model", True, "cudnn", tuning=True),
    "fast-autotune": Variant("model", True, "cudnn", mode="max-autotune-no-cudagraphs"),
    "fast-autotune-tma": Variant("model", True, "cudnn", mode="max-autotune-no-cudagraphs", tma=True),
    "fast-autotune-aten": Variant("model", True, "cudnn", gemm_backends="ATEN"),
    "fused-autotune": Variant("model", True, "cudnn", fused=True, mode="max-autotune-no-cudagraphs"),
    "fused-blocks": Variant("blocks", True, "cudnn", fused=True),
    "fast-flash": Variant("model", True, "flash"),
    "fast-blocks": Variant("blocks", True, "cudnn"),
    "compile-logits": Variant("model", False, "flash"),
    "eager-chunked": Variant("none", True, "cudnn"),
    "eager": Variant("none", False, "default"),
}


def mfu_of(model: GPT, seq_len: int, tokens_per_s: float, device: torch.device) -> float:
    """MFU as `gpt2 train` logs it (gpt2.training.metrics: 6N + 12*L*H*Q*T, N without position embeddings),
    against the card's dense bf16 peak (989.4 TFLOP/s for H100/H200 SXM)."""
    if device.type != "cuda":
        return float("nan")
    fpt = flops_per_token(model.config, model.num_params(non_embedding=True), seq_len)
    return mfu(fpt, tokens_per_s, peak_flops(torch.cuda.get_device_name(device)) or PEAK_BF16_FLOPS) or float("nan")


def run_variant(name: str, args: argparse.Namespace, batch_size: int, device: torch.device) -> dict:
    """Build, compile and time one variant; returns its row's numbers."""
    v = VARIANTS[name]
    free_memory(device)
    torch._dynamo.reset()
    torch._inductor.config.coordinate_descent_tuning = v.tuning
    torch._inductor.config.triton.enable_persistent_tma_matmul = v.tma
    torch.manual_seed(0)
    config = GPTConfig.from_name(args.model)
    with torch.device(device):
        model = GPT(config)
    if v.fused:
        fuse_mlps(model)
    opt = build_optimizer(model, TrainingConfig(optimizer=args.optimizer), device)  # what `gpt2 train` builds
    if v.compile == "model" and v.gemm_backends:
        options = {"max_autotune": True, "max_autotune_gemm_backends": v.gemm_backends}
        step_model = torch.compile(model, options=options)
    elif v.compile == "model":
        step_model = torch.compile(model, mode=v.mode)
    elif v.compile == "blocks":
        for block in model.transformer.h:
            block.compile(mode=v.mode)
        step_model = model
    else:
        step_model = model
    T, V = args.seq_len, config.vocab_size
    data = torch.randint(0, V, (4, batch_size, T + 1), device=device)
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    kernels = StepKernels(chunked_loss=v.chunked_loss, attention=v.attention)

    def step(i: int) -> torch.Tensor:
        batch = (data[i % 4, :, :-1], data[i % 4, :, 1:])
        opt.zero_grad(set_to_none=True)
        loss = forward_backward(step_model, lambda: batch, 1, amp_dtype=amp_dtype, kernels=kernels)
        clip_gradients(opt, 1.0)
        apply_gradients(opt)
        return loss

    t0 = time.perf_counter()
    first_loss = step(0).item()  # compiles
    compile_s = time.perf_counter() - t0
    for i in range(1, args.warmup):
        step(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            loss = step(i)
            times.append(time.perf_counter() - t)
    dt = median(times)
    tok_s = batch_size * T / dt
    row = dict(
        variant=name,
        batch=batch_size,
        ms=dt * 1e3,
        spread=(max(times) - min(times)) / dt,
        tok_s=tok_s,
        mfu=mfu_of(model, T, tok_s, device),
        peak=peak_gib(device),
        first_loss=first_loss,
        last_loss=loss.item(),
        compile_s=compile_s,
    )
    if args.profile_dir and name in args.profile_variant.split(","):
        profile(step, device, Path(args.profile_dir) / f"profile_train_{args.model}_{name}.txt")
    return row


def profile(step, device: torch.device, path: Path) -> None:
    """Kernel-time table of 3 steps, and its share by kind (matmul, attention, fused Triton, ...)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(3):
            step(i)
        sync(device)
    events = prof.key_averages()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kinds: dict[str, float] = {}
    for e in events:
        t = getattr(e, "self_device_time_total", 0) or 0
        if t <= 0 or e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        n = e.key.lower()
        kind = next(
            (k for k, words in KINDS if any(w in n for w in words)),
            "other",
        )
        kinds[kind] = kinds.get(kind, 0.0) + t
    total = sum(kinds.values()) or 1.0
    share = table(
        ["kernel kind", "ms / step", "share"],
        [[k, f"{t / 3e3:.2f}", f"{t / total:.1%}"] for k, t in sorted(kinds.items(), key=lambda kv: -kv[1])],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(share + "\n\n" + events.table(sort_by=sort, row_limit=45, max_name_column_width=90))
    print(f"\nprofile of 3 steps -> {path}\n{share}")


KINDS = [
    ("loss softmax (gpt2.kernels.loss)", ("cross_entropy_rows",)),
    ("MLP matmul + GELU (gpt2.kernels.mlp)", ("_mm_gelu_kernel",)),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "cublas")),
    ("optimizer", ("adam", "foreach", "multi_tensor", "norm_kernel")),
    ("triton (fused pointwise/reduction)", ("triton",)),
    ("elementwise/reduce (eager)", ("elementwise", "reduce_kernel", "vectorized", "softmax", "layer_norm")),
    ("copy/fill", ("memcpy", "memset", "copy", "fill")),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="GPTConfig preset")
    p.add_argument("--batch-size", default="64", help="micro-batch; a list (32,24,16) takes the first that fits")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--variants", default="fast,fused,eager", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="as gpt2 train's (defaults)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (the first compiles)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="autocast dtype (fp32 = off)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile-dir", default=None, help="write a kernel profile of --profile-variant here")
    p.add_argument("--profile-variant", default="fast,fused", help="comma list")
    p.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the section is appended to")
    p.add_argument("--memory-limit-gib", type=float, default=None, help="cap the allocator (e.g. 79: an 80 GB card)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and args.memory_limit_gib:
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gib * 2**30 / total), index)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only float32 leftovers; bf16 autocast does the rest
        torch.backends.cudnn.allow_tf32 = True
    batch_sizes = [int(b) for b in args.batch_size.split(",")]
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    print(f"{environment(device)}\nmodel {args.model}, T={args.seq_len}, autocast {args.dtype}")
    rows, notes = [], []
    for name in names:
        for b in batch_sizes:
            try:
                row = run_variant(name, args, b, device)
            except Exception as e:  # one variant failing (OOM, missing backend) must not lose the others
                reason = "out of memory" if is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                notes.append(f"{name} at micro-batch {b}: {reason}")
                print(f"  {name} B={b}: {reason}", flush=True)
                torch._dynamo.reset()
                continue
            rows.append(row)
            print(
                f"  {name} B={b}: {row['tok_s'] / 1e3:.1f}K tok/s, {row['ms']:.1f} ms/step, "
                f"MFU {row['mfu']:.1%}, peak {row['peak']:.1f} GiB, compile+1st step {row['compile_s']:.0f} s",
                flush=True,
            )
            break
    ref = next((r for r in rows if r["variant"] == "eager"), None)
    headers = [
        "variant",
        "micro-batch",
        "tokens/s",
        "ms/step",
        "spread",
        "MFU",
        "peak GiB",
        "vs eager",
        "loss 1st/last",
    ]
    body = table(
        headers,
        [
            [
                r["variant"],
                r["batch"],
                f"{r['tok_s'] / 1e3:,.1f}K",
                f"{r['ms']:.1f}",
                f"{r['spread']:.0%}",
                f"{r['mfu']:.1%}",
                f"{r['peak']:.1f}",
                f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-",
                f"{r['first_loss']:.3f}/{r['last_loss']:.3f}",
            ]
            for r in rows
        ],
    )
    cap = f", allocator capped at {args.memory_limit_gib} GiB" if args.memory_limit_gib else ""
    info = (
        f"model {args.model}, T={args.seq_len}, autocast {args.dtype}{cap}, {args.steps} timed steps after "
        f"{args.warmup} (median; spread = (max-min)/median); MFU = (6N + 12*L*H*Q*T) * tokens/s / 989.4 TFLOP/s, "
        "N without position embeddings (gpt2.training.metrics)"
    )
    body = f"{info}\n\n{body}" + "".join(f"\n- not measured: {n}" for n in notes)
    print("\n" + body)
    append_results(args.results, f"bench_train: {args.model}", device, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
