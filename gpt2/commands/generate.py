"""`gpt2 generate`: sample text from a model, streaming a single sample as it is produced.

On CUDA the decode step runs on a preallocated cache; it is captured once as a CUDA graph and
replayed only when there are enough new tokens to pay for the capture (--cuda-graph auto:
max-new-tokens >= gpt2.generation.GRAPH_MIN_NEW_TOKENS); short answers decode eagerly.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import time

from gpt2.commands.common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", default="<|endoftext|>", help="text to continue (default: start of a document)")
    parser.add_argument("--num-samples", type=int, default=1, help="independent samples, generated as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--no-stop", action="store_true", help="keep going past <|endoftext|>")
    parser.add_argument(
        "--cuda-graph",
        choices=["auto", "on", "off"],
        default="auto",
        help="CUDA only: replay the decode step as a CUDA graph; auto = only when --max-new-tokens is large "
        "enough to pay for capturing it (short answers decode eagerly)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from gpt2.commands.common import load_for_inference
    from gpt2.generation import check_sampling_args, generate_tokens
    from gpt2.tokenizer import Tokenizer

    check_sampling_args(args.temperature, args.top_k, args.top_p)
    if not args.prompt:
        raise ValueError("empty prompt; pass some text, or omit --prompt to start a new document")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise ValueError("--num-samples and --max-new-tokens must be >= 1")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in 0..{2**63 - 1}, got {args.seed}")
    tok = Tokenizer()
    prompt_ids = tok.encode(args.prompt)
    model, device = load_for_inference(args)
    if len(prompt_ids) > model.config.block_size:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens but the model's context is {model.config.block_size}; shorten it"
        )
    if max(prompt_ids) >= model.config.vocab_size:
        raise ValueError(
            f"the prompt holds token id {max(prompt_ids)}, outside the model's vocabulary of "
            f"{model.config.vocab_size}; this model was trained on other token ids than GPT-2's tokenizer gives"
        )
    busy = busy_cpu_note(device)  # measured before our own threads load the machine
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)
    valid = torch.ones_like(idx, dtype=torch.bool)
    stream = args.num_samples == 1
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def on_tokens(new: torch.Tensor) -> None:
        if stream:
            sys.stdout.write(decoder.decode(tok.decode_bytes(new.tolist())))
            sys.stdout.flush()

    shown_prompt = "" if args.prompt == "<|endoftext|>" else args.prompt
    if stream:
        sys.stdout.write(shown_prompt)
    t0 = time.perf_counter()
    new = generate_tokens(
        model,
        idx,
        valid,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
        eos_id=None if args.no_stop else tok.eot_id,
        on_tokens=on_tokens,
        cuda_graph={"auto": None, "on": True, "off": False}[args.cuda_graph],
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if stream:
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    else:
        for i, row in enumerate(new.tolist()):
            if not args.no_stop and tok.eot_id in row:
                row = row[: row.index(tok.eot_id)]
            print(f"--- sample {i + 1} ---\n{shown_prompt}{tok.decode(row)}")
    n_new = new.numel()
    print(f"[{n_new} tokens in {dt:.2f} s, {n_new / dt:.1f} tokens/s on {device}{busy}]", file=sys.stderr)
    return 0


def busy_cpu_note(device) -> str:
    """A note for the speed line when torch's CPU threads would oversubscribe a machine that other
    processes keep busy: OpenMP threads then wait on each other (measured on 2 busy cores: 12.9
    tokens/s with torch's default threads, 109 with OMP_NUM_THREADS=1)."""
    import torch

    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return ""
    threads, cores, load = torch.get_num_threads(), os.cpu_count() or 1, os.getloadavg()[0]
    if threads < 2 or load < 1 or load + threads <= cores:  # load < 1: no other process keeps a core busy
        return ""
    return f"; {threads} threads on {cores} busy cores (load {load:.1f}): OMP_NUM_THREADS=1 may be much faster"
