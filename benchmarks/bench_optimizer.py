"""The optimizer step alone: clipping + apply_gradients of a recipe's optimizer, timed and profiled.

The real loop runs the Muon recipe (muon-full) 9.1 ms per step slower than the AdamW one on an H100
(RESULTS.md, bench_loop), while its Newton-Schulz FLOPs and memory passes budget ~3-4 ms (NOTES.md). This
splits that time: for each recipe (configs/speedrun/NAME.toml, the optimizer `gpt2 train` builds from it:
gpt2.training.build_optimizer), one real backward fills the gradients, then the step (clip_gradients +
apply_gradients, as the loop runs them) is timed alone --steps times (synchronized before and after; the
parameters move each time, which changes no kernel's work), and on CUDA a torch.profiler table of the
step's kernels (device time per step, by kernel name) is written to --profile-dir.

  python benchmarks/bench_optimizer.py --recipes baseline,muon-full --profile-dir $OUT          # GPU
  python benchmarks/bench_optimizer.py --device cpu --model tiny --recipes baseline,muon-short --steps 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, append_results, environment, median, table, time_calls  # noqa: E402
from gpt2 import GPT  # noqa: E402
from gpt2.training import build_optimizer  # noqa: E402
from gpt2.training.settings import build_config  # noqa: E402
from gpt2.training.step import apply_gradients, clip_gradients, forward_backward  # noqa: E402


def gradients(model: GPT, batch_size: int, seq_len: int, device: torch.device) -> None:
    """One forward and backward on random tokens, bf16 autocast on CUDA: every parameter gets a gradient."""
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len + 1), device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    forward_backward(model, lambda: (x[:, :-1], x[:, 1:]), 1, amp_dtype=amp)


def profile(step, device: torch.device, path: Path, rows: int = 30) -> str:
    """Kernel time per step (ms) of 3 steps, by kernel name, most first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
    # kernels only: the operators' and the step's own rows repeat their kernels' time (bench_train's filter)
    cuda = torch.autograd.DeviceType.CUDA
    events = [e for e in prof.key_averages() if e.device_type == cuda and (e.self_device_time_total or 0) > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / 3e3
    body = table(
        ["kernel", "calls / step", "ms / step"],
        [[e.key[:90], f"{e.count / 3:.0f}", f"{e.self_device_time_total / 3e3:.3f}"] for e in events[:rows]],
    )
    text = f"kernels' device time: {total:.2f} ms per step, {sum(e.count for e in events) / 3:.0f} kernels\n\n{body}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return text


def measure(recipe: str, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = build_config(
        ROOT / "configs" / "speedrun" / f"{recipe}.toml",
        {"model": args.model, "seq_len": args.seq_len, "device": str(device)},
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg.model_config())  # the recipe's model (its vocab_size, if it sets one)
    opt = build_optimizer(model, cfg, device)
    gradients(model, args.batch_size, args.seq_len, device)

    def step() -> None:
        clip_gradients(opt, cfg.grad_clip)
        apply_gradients(opt)

    ms = 1000 * median(time_calls(step, device, warmup=3, repeats=args.steps))
    row = {"recipe": recipe, "optimizer": cfg.optimizer, "ms": ms, "profile": ""}
    if args.profile_dir and device.type == "cuda":
        row["profile"] = profile(step, device, Path(args.profile_dir) / f"optimizer-{recipe}.txt")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="baseline,muon-full", help="configs/speedrun/NAME.toml, comma-separated")
    p.add_argument("--model", default="gpt2", help="GPTConfig preset")
    p.add_argument("--batch-size", type=int, default=8, help="rows of the backward that fills the gradients")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile-dir", default=None, help="write each recipe's kernel table here (CUDA)")
    p.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the section is appended to")
    args = p.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    missing = [r for r in recipes if not (ROOT / "configs" / "speedrun" / f"{r}.toml").is_file()]
    if missing:
        p.error(f"no such recipe: configs/speedrun/{missing[0]}.toml")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; pass --device cpu")
    rows = [measure(r, args, device) for r in recipes]
    body = table(
        ["recipe", "optimizer", "step ms (clip + update)"],
        [[r["recipe"], r["optimizer"], f"{r['ms']:.2f}"] for r in rows],
    )
    print(f"{environment(device)}\nmodel {args.model}\n\n{body}")
    for r in rows:
        if r["profile"]:
            print(f"\n{r['recipe']}:\n{r['profile']}")
    append_results(args.results, f"bench_optimizer: {args.model}", device, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
