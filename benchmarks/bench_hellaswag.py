"""HellaSwag validation speed: our batched scorer vs one example (4 rows) per forward pass, same process.

Both sides are gpt2.evaluation.evaluate_hellaswag (tokenization included); the baseline just uses
batch_size=1, which is how build-nanogpt scores HellaSwag. The predictions of both runs are compared
(bf16 may flip a near-tie between differently padded shapes; the table says how many).

    # GPU (the issue's target: full validation set, 124M, bf16, <= 30 s)
    python benchmarks/bench_hellaswag.py --data ../shared/data/hellaswag/hellaswag_val.jsonl
    # CPU smoke check (tiny model, a few examples, nothing appended)
    python benchmarks/bench_hellaswag.py --device cpu --preset mini --limit 16 --batch-size 4 --no-results
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, before any installed gpt2
from benchmarks.common import RESULTS, append_results, environment, free_memory, peak_gib, sync, table  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.evaluation import evaluate_hellaswag, load_hellaswag  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint/HF dir or hub name (default: random init of --preset)")
    p.add_argument("--preset", default="gpt2", help="GPTConfig preset for the random-init model (default gpt2, 124M)")
    p.add_argument("--data", default=None, help=f"hellaswag jsonl (default: {SHARED} if present, else download)")
    p.add_argument("--limit", type=int, default=None, help="first N examples (default: all 10,042)")
    p.add_argument("--baseline-limit", type=int, default=None, help="score only N examples one at a time")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass of the batched scorer")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="also time the batched scorer on a torch.compile'd model")
    p.add_argument("--no-results", action="store_true", help=f"do not append to {RESULTS}")
    args = p.parse_args()

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    amp = torch.bfloat16 if use_bf16 else None
    if args.model is not None:
        model = GPT.from_pretrained(args.model).to(device).eval()
        model_name = args.model
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_name(args.preset)).to(device).eval()
        model_name = f"random-init {args.preset}"
    data = args.data or (SHARED if SHARED.exists() else None)
    examples = load_hellaswag(data)[: args.limit]
    baseline_examples = examples[: args.baseline_limit]
    n_params = model.num_params()
    print(f"{environment(device)} | {model_name} ({n_params / 1e6:.1f}M) | {'bf16' if amp else 'fp32'}")

    def run(m, exs, batch_size):
        free_memory(device)
        sync(device)
        t0 = time.perf_counter()
        r = evaluate_hellaswag(m, exs, batch_size=batch_size, device=device, autocast_dtype=amp, per_example=True)
        sync(device)
        return r, time.perf_counter() - t0

    run(model, examples[: 2 * args.batch_size], args.batch_size)  # warm up CUDA context, cuBLAS, allocator
    rows = []
    batched, t_batched = run(model, examples, args.batch_size)
    rows.append(_row(f"batched ({args.batch_size} examples/forward)", batched, t_batched, device))
    if args.compile:
        compiled = torch.compile(model)
        run(compiled, examples[: 4 * args.batch_size], args.batch_size)  # compile for the common shapes
        comp, t_comp = run(compiled, examples, args.batch_size)
        rows.append(_row(f"batched + torch.compile ({args.batch_size})", comp, t_comp, device))
    single, t_single = run(model, baseline_examples, 1)
    rows.append(_row("one example per forward", single, t_single, device))

    preds = {e["ind"]: e["pred_norm"] for e in batched["examples"]}
    differ = sum(preds[e["ind"]] != e["pred_norm"] for e in single["examples"])
    speedup = (t_single / len(baseline_examples)) / (t_batched / len(examples))
    headers = ["scorer", "examples", "seconds", "examples/s", "acc", "acc_norm", "acc_norm_chars", "peak GiB"]
    body = table(headers, rows)
    body += (
        f"\n\nmodel: {model_name} ({n_params:,} parameters), {'bf16 autocast' if amp else 'fp32'}, data: {data}. "
        f"Speedup per example: {speedup:.1f}x. acc_norm predictions that differ between the two scorers: "
        f"{differ} of {len(single['examples'])}."
    )
    print(body)
    if not args.no_results:
        append_results(RESULTS, "HellaSwag validation: batched vs one example per forward", device, body)
        print(f"appended to {RESULTS}")
    return 0


def _row(name: str, result: dict, seconds: float, device: torch.device) -> list[object]:
    return [
        name,
        result["n"],
        f"{seconds:.2f}",
        f"{result['n'] / seconds:.1f}",
        f"{result['acc']:.4f}",
        f"{result['acc_norm']:.4f}",
        f"{result['acc_norm_chars']:.4f}",
        f"{peak_gib(device):.2f}",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
