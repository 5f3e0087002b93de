"""`gpt2 serve`: an OpenAI-compatible server with continuous batching (needs `.[serve]`).

uvicorn listens at once (/health answers 503 "starting" meanwhile) while the model is loaded, warmed
up and, on CUDA, its decode and prefill passes are captured as CUDA graphs, in an engine process of
its own (gpt2.serve.process; --engine-thread keeps it in this one); then it serves /v1/completions,
/v1/chat/completions, /v1/models, the tokenizer routes, /health, /metrics and a playground page at /.
docs/serving.md describes the API, the flags and how batching works.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
from pathlib import Path

from gpt2.commands.common import add_decode_kernels_argument, add_model_arguments

# The engine thread and the event loop share the GIL. When the loop is busy (writing events), a
# thread waiting for the GIL gets it only after the switch interval: Python's default of 5 ms
# showed up as 5-7 ms inter-token gaps. 0.2 ms bounds that wait well under one decode step.
SWITCH_INTERVAL_S = 2e-4
API_KEY_ENV = "GPT2_API_KEY"  # the API key when --api-key is not given (keeps it out of `ps`)
MIN_BODY_BYTES = 1024  # --max-body-bytes below this would refuse ordinary requests


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
    add_http_arguments(parser)


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """The HTTP side's flags (gpt2.serve.config.HTTPConfig)."""
    from gpt2.serve.config import HTTPConfig

    defaults = HTTPConfig()
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template (HF/vLLM style) for /v1/chat/completions (default: plain 'Role: text' turns)",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on /v1/* and the tokenizer routes (repeat for several keys; "
        f"default: ${API_KEY_ENV} if set)",
    )
    parser.add_argument(
        "--allowed-origins",
        default=None,
        metavar="ORIGINS",
        help="CORS: origins whose pages may call the API, comma-separated or a JSON list ('*': any; default: none)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        help=f"largest request body; larger ones get 413 before they are read (default {defaults.max_body_bytes})",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=defaults.stall_timeout_s,
        metavar="SECONDS",
        help="/health answers 503 once the engine has been silent, or inside one step, this long (raise it for "
        f"models whose longest prefill or first compilation takes longer; default {defaults.stall_timeout_s:g})",
    )


def run(args: argparse.Namespace) -> int:
    try:
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"gpt2 serve needs the serve extra ({e.name} is missing): pip install 'gpt2[serve]'") from e
    check_arguments(args)
    http = http_config(args)  # bad flags are refused before anything loads or listens
    import torch

    from gpt2 import kernels
    from gpt2.commands.common import load_for_inference, model_spec
    from gpt2.device import pick_device
    from gpt2.loading import resolve_model
    from gpt2.serve.app import Service
    from gpt2.serve.config import ServeConfig
    from gpt2.serve.server import run_server

    device = pick_device(args.device)  # checked here; the engine process opens it
    fused = {"auto": None, "fused": True, "torch": False}[args.decode_kernels]
    if fused:
        kernels.use_fused(fused, args.compile, device)  # what cannot run is refused before loading
    if not Path(args.model).expanduser().is_dir():  # a missing path or unknown name, at once (a directory's
        resolve_model(args.model)  # files are checked where they are read, not twice)
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
    service = Service(None, args.served_model_name or args.model, http=http)
    spec = model_spec(args, str(device))
    where = "engine thread" if args.engine_thread else "engine process"

    def on_ready(info: dict) -> None:
        print(
            f"gpt2 serve: {service.model_id} on {info['device']} ({info['dtype']}, {where}), max batch "
            f"{args.max_batch}, decode step: {info['decode']}; warm-up {info['warmup_s']:.1f} s, "
            f"{info['graphs']} CUDA graphs in {info['capture_s']:.1f} s; {http_stack()}; "
            f"http://{args.host}:{args.port}/",
            file=sys.stderr,
            flush=True,
        )
        tune_process()

    if args.engine_thread:
        service.loader = _thread_loader(spec, config, on_ready)
    else:
        from gpt2.serve.process import process_loader

        service.loader = process_loader(spec, config, on_ready, load=load_for_inference)
    print(f"gpt2 serve: loading {args.model}; /health answers 503 until it is ready", file=sys.stderr, flush=True)
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


def http_config(args: argparse.Namespace):
    """The HTTP settings from the flags (and $GPT2_API_KEY); ValueError for a bad one."""
    from gpt2.serve.chat import load_chat_template
    from gpt2.serve.config import HTTPConfig

    if args.max_body_bytes < MIN_BODY_BYTES:
        raise ValueError(f"--max-body-bytes must be at least {MIN_BODY_BYTES}, got {args.max_body_bytes}")
    if not args.stall_timeout > 0:  # also refuses nan
        raise ValueError(f"--stall-timeout must be a positive number of seconds, got {args.stall_timeout}")
    keys = args.api_key if args.api_key is not None else [os.environ.get(API_KEY_ENV, "")]
    keys = tuple(k for k in keys if k)
    if args.api_key is not None and len(keys) != len(args.api_key):
        raise ValueError("--api-key must not be empty")
    template = None if args.chat_template is None else load_chat_template(args.chat_template)
    return HTTPConfig(
        api_keys=keys,
        allowed_origins=parse_origins(args.allowed_origins),
        max_body_bytes=args.max_body_bytes,
        chat_template=template,
        stall_timeout_s=args.stall_timeout,
    )


def parse_origins(value: str | None) -> tuple[str, ...]:
    """--allowed-origins: 'https://a.example,http://localhost:3000', a JSON list as vLLM takes, or '*'."""
    if value is None or not value.strip():
        return ()
    text = value.strip()
    if text.startswith("["):
        try:
            origins = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--allowed-origins {value!r} is not a valid JSON list ({e.msg})") from None
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise ValueError(f"--allowed-origins {value!r}: a JSON list must hold strings")
    else:
        origins = [o.strip() for o in text.split(",") if o.strip()]
    for o in origins:
        if o != "*" and ("://" not in o or o.endswith("/") or o.count("/") != 2):
            raise ValueError(
                f"--allowed-origins: {o!r} is not an origin; write scheme://host[:port], e.g. http://localhost:3000"
            )
    return tuple(origins)


def _thread_loader(spec, config, on_ready):
    """--engine-thread: load the model and run the engine in this process (a Service loader)."""

    def load(service) -> None:
        from gpt2.commands.common import load_for_inference
        from gpt2.serve.server import build_engine, warm_up_engine

        model, device = load_for_inference(spec)
        live = []  # the warm-up's outputs have nobody to go to

        def deliver(outputs) -> None:
            if live:
                service.on_outputs(outputs)

        engine = build_engine(model, config, deliver)
        info = {"device": str(device), "dtype": str(next(model.parameters()).dtype), **warm_up_engine(engine)}
        live.append(True)
        service.attach(engine, model.config.block_size, model.config.vocab_size)
        on_ready(info)

    return load


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
