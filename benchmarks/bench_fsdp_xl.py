"""FSDP2 training step of GPT-2 XL (1.5B) at T=1024 on N GPUs: memory per GPU, tokens/s, MFU.

One step = forward + backward of a micro-batch per GPU (bf16 parameters and compute, fp32 gradient
reduce-scatter: gpt2.training.parallel.shard_model's mixed precision), gradient clipping at 1.0, AdamW (fused on
CUDA, weight decay on 2-D parameters), zero_grad. Random tokens, rotated among a few batches.
Each Block is one FSDP unit; optionally compiled (before sharding, so FSDP's hooks stay eager) and
activation-checkpointed.

  torchrun --standalone --nproc_per_node=2 benchmarks/bench_fsdp_xl.py                 # gpt2-xl, B=16/GPU
  torchrun --standalone --nproc_per_node=2 benchmarks/bench_fsdp_xl.py --activation-checkpointing --batch-size 32
  torchrun --standalone --nproc_per_node=2 benchmarks/bench_fsdp_xl.py --save-dir /tmp/ckpt   # + time a DCP save
  torchrun --standalone --nproc_per_node=1 benchmarks/bench_fsdp_xl.py --train-kernels fused  # one GPU, fused MLP
  # CPU smoke check (gloo):
  torchrun --standalone --nproc_per_node=2 benchmarks/bench_fsdp_xl.py --device cpu --model tiny --seq-len 64 \
      --batch-size 2 --steps 2 --warmup 1 --compile none --results /tmp/RESULTS.md

MFU = (6N + 12*L*H*Q*T) * tokens/s per GPU / the card's dense bf16 peak (gpt2.training.metrics), N the
parameters without the position embeddings. Rank 0 prints the table and appends it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, append_block, environment, table  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.checkpoint.sharded import save_sharded  # noqa: E402
from gpt2.distributed import all_gather_objects, barrier, destroy_distributed, init_distributed  # noqa: E402
from gpt2.kernels.training import fuse_mlps, use_training_kernels  # noqa: E402
from gpt2.training.metrics import flops_per_token, mfu, peak_flops  # noqa: E402
from gpt2.training.parallel import shard_model  # noqa: E402


def build_optimizer(model: torch.nn.Module, fused: bool) -> torch.optim.AdamW:
    """AdamW as gpt2 training builds it: decay on matrices and embeddings, not biases or LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-xl", help="GPTConfig preset")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per GPU per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first compiles)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each Block in backward")
    p.add_argument("--compile", choices=["blocks", "none"], default=None, help="default: blocks on CUDA, none on CPU")
    p.add_argument("--no-mixed-precision", action="store_true", help="fp32 parameters and compute")
    p.add_argument("--logits", action="store_true", help="loss from full logits instead of the chunked loss")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (gloo)")
    p.add_argument(
        "--train-kernels", default="torch", choices=["torch", "fused"], help="as gpt2 train's (fused: CUDA, Triton)"
    )
    p.add_argument("--save-dir", type=Path, default=None, help="also time one save_sharded here (deleted after)")
    p.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the section is appended to")
    args = p.parse_args()

    if "WORLD_SIZE" not in os.environ:
        p.error("run under torchrun, e.g. torchrun --standalone --nproc_per_node=2 benchmarks/bench_fsdp_xl.py")
    info = init_distributed(os.environ, args.device)
    try:
        row = run(args, info)
    except ValueError as e:  # e.g. --train-kernels fused without CUDA
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    except torch.OutOfMemoryError:
        # Exit at once: torchrun then stops the other ranks (they would wait in a collective).
        print(
            f"rank {info.rank}: CUDA out of memory at micro-batch {args.batch_size}; lower --batch-size "
            "or add --activation-checkpointing",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)
    rows = all_gather_objects(row)
    if info.is_main:
        report(args, info.device, info.world_size, rows)
    barrier()
    destroy_distributed()
    return 0


def run(args: argparse.Namespace, info) -> dict:
    """Build, shard, (compile,) time the steps on this rank; its numbers as a dict."""
    device = info.device
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compile_blocks = (args.compile or ("blocks" if cuda else "none")) == "blocks"
    config = GPTConfig.from_name(args.model)
    fused, _ = use_training_kernels(args.train_kernels, device)  # "fused" off CUDA: a one-line ValueError, first
    torch.manual_seed(0)  # the same initial weights on every rank
    t0 = time.perf_counter()
    with torch.device(device):  # 6.2 GB of fp32 weights for gpt2-xl, freed by sharding
        model = GPT(config)
    n_params, n_matmul = model.num_params(), model.num_params(non_embedding=True)
    if fused:
        fuse_mlps(model)  # as gpt2 train applies it: before compiling and sharding
    if compile_blocks:  # before sharding: only the Block's math is compiled, FSDP's hooks run eagerly
        for block in model.transformer.h:
            block.compile()
    shard_model(
        model, mixed_precision=not args.no_mixed_precision, activation_checkpointing=args.activation_checkpointing
    )
    optimizer = build_optimizer(model, fused=cuda)
    setup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator(device=device).manual_seed(1000 + info.rank)
    data = torch.randint(0, config.vocab_size, (4, args.batch_size, args.seq_len + 1), device=device, generator=gen)

    def step(i: int) -> torch.Tensor:
        x, y = data[i % 4, :, :-1], data[i % 4, :, 1:]
        _, loss = model(x, y, return_logits=args.logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    first_loss = step(0).item()  # compiles
    first_s = time.perf_counter() - t0
    for i in range(1, args.warmup):
        step(i)
    times = []
    for i in range(args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        loss = step(i)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    times.sort()
    dt = times[len(times) // 2]
    tok_s_gpu = args.batch_size * args.seq_len / dt
    peak = peak_flops(torch.cuda.get_device_name(device)) if cuda and not args.no_mixed_precision else None
    row = dict(
        rank=info.rank,
        card=torch.cuda.get_device_name(device) if cuda else "cpu",
        n_params=n_params,
        ms=dt * 1e3,
        spread=(times[-1] - times[0]) / dt,
        tok_s_gpu=tok_s_gpu,
        mfu=mfu(flops_per_token(config, n_matmul, args.seq_len), tok_s_gpu, peak),
        peak_alloc=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
        peak_reserved=torch.cuda.max_memory_reserved(device) / 2**30 if cuda else float("nan"),
        first_loss=first_loss,
        last_loss=loss.item(),
        setup_s=setup_s,
        first_s=first_s,
        compile=compile_blocks,
        fused=fused,
    )
    if args.save_dir is not None:
        directory = args.save_dir / "step_00000001"
        barrier()
        t0 = time.perf_counter()
        save_sharded(directory, model, optimizer, {"step": 1})
        row["save_s"] = time.perf_counter() - t0
        if info.is_main:
            row["save_gib"] = sum(f.stat().st_size for f in directory.iterdir()) / 2**30
            shutil.rmtree(args.save_dir / "step_00000001", ignore_errors=True)
    return row


def report(args: argparse.Namespace, device: torch.device, world: int, rows: list[dict]) -> None:
    r0 = rows[0]
    mixed = device.type == "cuda" and not args.no_mixed_precision  # gpt2.training.parallel.mixed_precision_policy
    precision = "bf16 params/compute, fp32 reduce" if mixed else "fp32"
    slowest = max(r["ms"] for r in rows) / 1e3
    total = world * args.batch_size * args.seq_len / slowest  # every rank waits for the slowest
    info = (
        f"model {args.model} ({r0['n_params']:,} parameters), T={args.seq_len}, micro-batch {args.batch_size}/GPU, "
        f"{world} ranks, FSDP2 ({precision}), activation checkpointing "
        f"{'on' if args.activation_checkpointing else 'off'}, compile {'per Block' if r0['compile'] else 'off'}, "
        f"training kernels {'fused' if r0['fused'] else 'torch'}, "
        f"{'full logits' if args.logits else 'chunked loss'}; {args.steps} timed steps after {args.warmup} "
        "(median; spread = (max-min)/median); MFU = (6N + 12*L*H*Q*T) * tokens/s per GPU / the card's bf16 peak"
    )
    body = table(
        ["rank", "tokens/s/GPU", "ms/step", "spread", "MFU", "peak alloc GiB", "reserved GiB"],
        [
            [
                r["rank"],
                f"{r['tok_s_gpu']:,.0f}",
                f"{r['ms']:.1f}",
                f"{r['spread']:.0%}",
                "-" if r["mfu"] is None else f"{r['mfu']:.1%}",
                f"{r['peak_alloc']:.1f}",
                f"{r['peak_reserved']:.1f}",
            ]
            for r in rows
        ],
    )
    extra = [
        f"tokens/s on all {world} ranks: {total:,.0f} ({world} x {args.batch_size} x {args.seq_len} tokens per "
        f"{slowest * 1e3:.1f} ms, the slowest rank's median step)",
        f"loss first/last {r0['first_loss']:.3f}/{r0['last_loss']:.3f}",
        f"build+shard {r0['setup_s']:.0f} s, first step {r0['first_s']:.0f} s",
    ]
    if "save_s" in r0:
        extra.append(f"save_sharded (model + AdamW) {r0['save_s']:.1f} s, {r0['save_gib']:.1f} GiB on disk")
    body = f"{info}\n\n{body}\n\n- " + "\n- ".join(extra)
    print("\n" + body, flush=True)
    command = f"torchrun --standalone --nproc_per_node={world} " + " ".join(shlex.quote(a) for a in sys.argv)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"## bench_fsdp_xl: {args.model} on {world} x {r0['card']} ({now})\n\n"
        f"- environment: {environment(device)}\n- command: `{command}`\n\n{body}\n"
    )
    append_block(args.results, section)


if __name__ == "__main__":
    raise SystemExit(main())
