"""`gpt2 generate`: sample text from a model on the inference engine, in this process.

The prompts (--prompt, repeatable), each --num-samples times, run as one batch on gpt2.inference's
engine: gpt2 serve's scheduler, model runner, fused decode kernels (CUDA) and sampler, so a prompt,
its settings and --seed give the text that a server request with that seed gives (sample j of
prompt i is the request's choice i * num-samples + j). On CUDA only the decode shapes this run
reaches are captured as CUDA graphs. One sample streams to the terminal as it is made; several print
when all are done. Then one line on stderr: tokens generated, the decoding rate, the seconds since
the model was loaded (graph capture included) and those loading it took (on CUDA the process's
first-use costs are paid while the weights load: gpt2.inference.load).
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import time

from gpt2.commands.common import add_decode_kernels_argument, add_model_arguments

START = "<|endoftext|>"  # the default prompt: the start of a document


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="text to continue; repeat it for several prompts, generated together (default: start of a document)",
    )
    parser.add_argument(
        "--num-samples", type=int, default=1, help="independent samples per prompt, generated as one batch"
    )
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens below MIN_P x the most likely one's probability (0..1)"
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages tokens of the prompt and the text so far (HF / vLLM's; 1 = none)",
    )
    parser.add_argument(
        "--presence-penalty", type=float, default=0.0, help="subtracted from tokens generated so far (-2..2, OpenAI's)"
    )
    parser.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="x how often a token was generated, subtracted (-2..2, OpenAI's)",
    )
    parser.add_argument("--min-tokens", type=int, default=0, help="no <|endoftext|> before this many new tokens")
    parser.add_argument("--seed", type=int, default=1337, help="as a server request's seed: same seed, same text")
    parser.add_argument("--no-stop", action="store_true", help="keep going past <|endoftext|>")
    parser.add_argument(
        "--cuda-graph",
        choices=["auto", "on", "off"],
        default="auto",
        help="replay the decode steps as CUDA graphs, captured for the shapes this run needs (auto: on CUDA)",
    )
    add_decode_kernels_argument(parser)


def run(args: argparse.Namespace) -> int:
    from gpt2 import kernels
    from gpt2.commands.common import load_for_inference, model_spec
    from gpt2.device import pick_device
    from gpt2.inference.generate import run as generate
    from gpt2.inference.generate import sequences
    from gpt2.tokenizer import Tokenizer

    texts = args.prompt or [START]
    if not all(texts):
        raise ValueError("empty prompt; pass some text, or omit --prompt to start a new document")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise ValueError("--num-samples and --max-new-tokens must be >= 1")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in 0..{2**63 - 1}, got {args.seed}")
    if args.min_tokens > args.max_new_tokens:
        raise ValueError(f"--min-tokens ({args.min_tokens}) must be at most --max-new-tokens ({args.max_new_tokens})")
    tok = Tokenizer()
    seqs = sequences(  # checks the sampling settings before anything is loaded
        [tok.encode(t) for t in texts],
        args.max_new_tokens,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_eos=not args.no_stop,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        min_tokens=args.min_tokens,
    )
    device = pick_device(args.device)
    graph = {"auto": None, "on": True, "off": False}[args.cuda_graph]
    if graph and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device (device: {device}); use --cuda-graph auto or off")
    fused = {"auto": None, "fused": True, "torch": False}[args.decode_kernels]
    triton = kernels.use_fused(fused, False, device)  # what cannot run is refused before loading
    start = time.perf_counter()
    model, device = load_for_inference(model_spec(args, str(device)), decode=triton)
    loaded = time.perf_counter()
    top = max(max(s.prompt) for s in seqs)
    if top >= model.config.vocab_size:
        raise ValueError(
            f"the prompt holds token id {top}, outside the model's vocabulary of "
            f"{model.config.vocab_size}; this model was trained on other token ids than GPT-2's tokenizer gives"
        )
    busy = busy_cpu_note(device)  # measured before our own threads load the machine
    shown = [("" if t == START else t) for t in texts for _ in range(args.num_samples)]
    stream = _Stream(tok, shown[0]) if len(seqs) == 1 else None
    result = generate(model, seqs, eos_id=tok.eot_id, cuda_graph=graph, fused=fused, on_tokens=stream and stream.write)
    if stream is not None:
        stream.close()
    for i, (prefix, row) in enumerate(zip(shown, result.tokens)):
        if stream is None:
            print(f"--- sample {i + 1} ---\n{prefix}{tok.decode(row)}")
    sys.stdout.flush()
    print(_report(result, time.perf_counter() - loaded, loaded - start, device, busy), file=sys.stderr)
    return 0


class _Stream:
    """One sample written to the terminal token by token (UTF-8 split across tokens held back)."""

    def __init__(self, tok, prefix: str) -> None:
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(prefix)
        sys.stdout.flush()

    def write(self, index: int, tokens: list[int]) -> None:
        sys.stdout.write(self.decoder.decode(self.tok.decode_bytes(tokens)))
        sys.stdout.flush()

    def close(self) -> None:
        sys.stdout.write(self.decoder.decode(b"", final=True) + "\n")


def _report(result, seconds: float, loading: float, device, note: str = "") -> str:
    """The line after the text: tokens, decoding rate, seconds since the model was loaded (and
    what loading it took)."""
    rate = result.decode_tokens_per_s
    rate_text = f"{rate:.1f} tokens/s decoding" if rate is not None else "no decoding steps"
    graphs = f"; {result.graphs} CUDA graphs captured in {result.capture_s:.2f} s" if result.graphs else ""
    step = "fused kernels" if result.fused else "PyTorch step"
    return (
        f"[{result.num_tokens} tokens, {rate_text}, {seconds:.2f} s since the model was loaded "
        f"(loading took {loading:.2f} s{graphs}); {device}, {step}{note}]"
    )


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
