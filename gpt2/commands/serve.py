"""`gpt2 serve`: an OpenAI-compatible completions server with continuous batching (needs `.[serve]`).

The model is loaded, warmed up and, on CUDA, its decode and prefill passes are captured as CUDA
graphs once at start-up, in an engine process of its own (gpt2.serve.process; --engine-thread
keeps it in this one); then uvicorn serves /v1/completions, /v1/models, /health and a playground
page at /.
docs/serving.md describes the API, the flags and how batching works.
"""

from __future__ import annotations

import argparse
import gc
import socket
import sys

from gpt2.commands.common import add_decode_kernels_argument, add_model_arguments

# The engine thread and the event loop share the GIL. When the loop is busy (writing events), a
# thread waiting for the GIL gets it only after the switch interval: Python's default of 5 ms
# showed up as 5-7 ms inter-token gaps. 0.2 ms bounds that wait well under one decode step.
SWITCH_INTERVAL_S = 2e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gpt2.serve.config import ServeConfig

    defaults = ServeConfig()  # the engine settings' defaults are the flags'
    add_model_arguments(parser)
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--max-batch", type=int, default=defaults.max_batch, help="sequences decoded together (KV-cache slots)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=defaults.max_queue, help="sequences that may wait; more get HTTP 429"
    )
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=defaults.max_prefill_tokens,
        help="prompt tokens prefilled per step (bounds the stall)",
    )
    add_decode_kernels_argument(parser)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the PyTorch decode step before capturing it"
    )
    parser.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly on CUDA too")
    parser.add_argument(
        "--batch-invariant",
        action="store_true",
        help="bit-identical results whatever else is running: every decode step at --max-batch rows, "
        "prompts prefilled one at a time (slower; see docs/serving.md)",
    )
    parser.add_argument(
        "--engine-thread",
        action="store_true",
        help="run the engine as a thread of the HTTP process (default: its own process, so it never waits "
        "for the event loop's GIL)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")


def run(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise RuntimeError("gpt2 serve needs the serve extra: pip install 'gpt2[serve]' (starlette, uvicorn)") from None
    check_arguments(args)
    import torch

    from gpt2 import kernels
    from gpt2.commands.common import load_for_inference, model_spec
    from gpt2.device import pick_device
    from gpt2.serve.config import ServeConfig
    from gpt2.serve.server import run_server

    device = pick_device(args.device)  # checked here; the engine process opens it
    fused = {"auto": None, "fused": True, "torch": False}[args.decode_kernels]
    if fused:
        kernels.use_fused(fused, args.compile, device)  # what cannot run is refused before loading
    config = ServeConfig(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens,
        cuda_graph=False if args.no_cuda_graph else None,
        compile=args.compile,
        fused=fused,
        batch_invariant=args.batch_invariant,
    )
    torch.set_grad_enabled(False)
    model_id = args.served_model_name or args.model
    spec = model_spec(args, str(device))
    if args.engine_thread:
        service, info = _engine_in_this_process(spec, model_id, config)
    else:
        from gpt2.serve.process import build_process_service

        service = build_process_service(spec, model_id, config, load=load_for_inference)
        info = service.engine.info
    where = "engine thread" if args.engine_thread else "engine process"
    print(
        f"gpt2 serve: {service.model_id} on {info['device']} ({info['dtype']}, {where}), max batch "
        f"{args.max_batch}, decode step: {info['decode']}; warm-up {info['warmup_s']:.1f} s, "
        f"{info['graphs']} CUDA graphs in {info['capture_s']:.1f} s; {http_stack()}; http://{args.host}:{args.port}/",
        file=sys.stderr,
        flush=True,
    )
    tune_process()
    run_server(service, args.host, args.port, access_log=args.access_log)
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """One-line errors for flags that cannot work, before the model loads (which takes a while)."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for name in ("max_batch", "max_queue", "max_prefill_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:  # the port is free and the address ours, now rather than after the model has loaded
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as e:
        reason = e.strerror or e
        raise OSError(f"cannot listen on {args.host}:{args.port} ({reason}); choose another --port or --host") from None


def _engine_in_this_process(spec, model_id: str, config):
    from gpt2.commands.common import load_for_inference
    from gpt2.serve.server import build_service, warm_up

    model, device = load_for_inference(spec)
    service = build_service(model, model_id, config)
    info = {"device": str(device), "dtype": str(next(model.parameters()).dtype), **warm_up(service)}
    return service, info


def http_stack() -> str:
    """What uvicorn will run on: its "auto" picks uvloop and httptools when they are installed
    (both much cheaper per event than asyncio's loop and h11)."""
    from importlib.util import find_spec

    loop = "uvloop" if find_spec("uvloop") else "asyncio (pip install uvloop)"
    http = "httptools" if find_spec("httptools") else "h11 (pip install httptools)"
    return f"{loop} + {http}"


def tune_process() -> None:
    """Process-wide settings for serving, once start-up is done: the short GIL switch interval
    above, and every object made so far frozen out of the garbage collector, so a full
    collection walks only what serving allocates (over torch's ~170K start-up objects it took
    ~100 ms on a CPU: a pause every stream would see)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()
