"""Time to first token: one generation of max_new_tokens=1 (KV cache allocation, prefill of the
prompt, sampling the first token) on the engine (gpt2 generate's path) and in the reference loop,
and the prompt tokens/s that prefill reaches.

  python benchmarks/bench_prefill.py                      # gpt2 bf16, prompts of 128/512/1024, batch 1 and 16
  python benchmarks/bench_prefill.py --device cpu --model tiny --dtype fp32 --prompt-lens 16,64 --batch-sizes 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, append_results, environment, median, table, time_calls  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.generation import generate_tokens  # noqa: E402
from gpt2.inference.generate import run, sequences  # noqa: E402
from gpt2.ops import attention_backends  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="GPTConfig preset (random weights: speed only)")
    p.add_argument("--prompt-lens", default="128,512,1024")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--paths", default="engine,plain", help="engine (gpt2 generate's) and/or plain (the reference)")
    p.add_argument("--attention", default="default", help="gpt2.ops.attention_backends kind: default, cudnn, flash")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(GPTConfig.from_name(args.model))
    model = model.to(DTYPES[args.dtype]).eval()
    print(f"{environment(device)}\nmodel {args.model} {args.dtype}")
    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        for P in [int(n) for n in args.prompt_lens.split(",")]:
            if P > model.config.block_size:
                continue
            prompt = torch.randint(0, model.config.vocab_size, (B, P), device=device)
            valid = torch.ones_like(prompt, dtype=torch.bool)
            for path in args.paths.split(","):

                def first_token(prompt=prompt, valid=valid, path=path) -> object:
                    with attention_backends(args.attention):
                        if path == "plain":
                            return generate_tokens(model, prompt, valid, 1, temperature=0)
                        return run(model, sequences(prompt.tolist(), 1, temperature=0), eos_id=-1)

                dt = median(time_calls(first_token, device, args.warmup, args.repeats))
                rows.append([B, P, path, f"{dt * 1e3:.2f}", f"{B * P / dt / 1e3:,.0f}K"])
                print(f"  B={B} P={P} {path}: {dt * 1e3:.2f} ms", flush=True)
    info = (
        f"model {args.model} (random weights) in {args.dtype}, attention backends: {args.attention}; "
        f"one new token, synchronized, median of {args.repeats} after {args.warmup}"
    )
    body = f"{info}\n\n" + table(["batch", "prompt", "path", "time to first token ms", "prompt tokens/s"], rows)
    print("\n" + body)
    append_results(args.results, f"bench_prefill: {args.model}", device, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
