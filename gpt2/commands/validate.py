"""`gpt2 validate`: our GPT against HuggingFace transformers on the same checkpoint."""

from __future__ import annotations

import argparse

from gpt2.commands.common import add_model_arguments

PROMPTS = [
    "Hello, I'm a language model,",
    "The capital of France is",
    "In 1905, Albert Einstein published",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, device=False, dtype=False)  # fp32 on the CPU, as transformers' reference
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed max |logit difference| (fp32)")
    parser.add_argument("--greedy-tokens", type=int, default=20, help="greedy tokens compared per prompt (>= 1)")


def run(args: argparse.Namespace) -> int:
    import math

    import torch

    if not (math.isfinite(args.atol) and args.atol >= 0):
        raise ValueError(f"--atol must be a finite number >= 0, got {args.atol}")
    if args.greedy_tokens < 1:
        raise ValueError(f"--greedy-tokens must be >= 1, got {args.greedy_tokens}")

    from gpt2.commands.common import load_for_inference
    from gpt2.inference.load import ModelSpec
    from gpt2.loading import model_dir
    from gpt2.tokenizer import Tokenizer

    try:
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        raise RuntimeError("gpt2 validate needs transformers: pip install 'gpt2[hf]'") from e
    directory = model_dir(args.model).path
    ours, _ = load_for_inference(ModelSpec(str(directory), "cpu", "fp32"))
    theirs = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).eval()
    tok = Tokenizer()
    worst, tokens_equal = 0.0, True
    print(f"{'prompt':<40} {'max |dlogit|':>12}  greedy tokens")
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            a, _ = ours(ids)
            b = theirs(ids).logits
            diff = (a - b).abs().max().item()
            g_ours = ours.generate(ids, args.greedy_tokens, temperature=0.0)[0].tolist()
            g_theirs = theirs.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.greedy_tokens,
                min_new_tokens=args.greedy_tokens,
                do_sample=False,
                pad_token_id=tok.eot_id,
            )[0].tolist()
        same = g_ours == g_theirs
        worst, tokens_equal = max(worst, diff), tokens_equal and same
        print(f"{prompt[:40]:<40} {diff:>12.3e}  {'equal' if same else 'DIFFERENT'}")
    ok = worst <= args.atol and tokens_equal
    verdict = "PASS" if ok else "FAIL"
    same = "equal" if tokens_equal else "differ"
    print(f"{verdict}: max |dlogit| {worst:.3e} (atol {args.atol:g}); greedy tokens {same}")
    return 0 if ok else 1
