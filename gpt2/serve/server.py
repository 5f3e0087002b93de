"""Putting the server together: engine + app from a model, warm-up, and running it with uvicorn
(in the foreground for `gpt2 serve`, or in a background thread for tests and benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

from gpt2.inference.engine import Engine
from gpt2.inference.runner import BatchDecoder
from gpt2.inference.scheduler import Sequence
from gpt2.model import GPT
from gpt2.serve.app import Service, create_app
from gpt2.serve.config import HTTPConfig, ServeConfig
from gpt2.tokenizer import EOT_ID


def build_engine(model: GPT, config: ServeConfig, on_outputs) -> Engine:
    """The engine (not started) over a model in eval mode."""
    if config.max_batch < 1 or config.max_queue < 1 or config.max_prefill_tokens < 1:
        raise ValueError("max_batch, max_queue and max_prefill_tokens must be >= 1")
    device = next(model.parameters()).device
    graph = device.type == "cuda" if config.cuda_graph is None else config.cuda_graph
    if graph and device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    decoder = BatchDecoder(
        model.eval(),
        config.max_batch,
        cuda_graph=graph,
        compile=config.compile,
        fused=config.fused,
        max_prefill_tokens=config.max_prefill_tokens,
    )
    return Engine(
        decoder, on_outputs, eos_id=EOT_ID, max_queue=config.max_queue, batch_invariant=config.batch_invariant
    )


def build_service(model: GPT, model_id: str, config: ServeConfig, http: HTTPConfig | None = None) -> Service:
    """Engine (not started, in this process) and the Service the HTTP handlers share."""
    service = Service(None, model_id, http=http)
    service.attach(build_engine(model, config, service.on_outputs), model.config.block_size, model.config.vocab_size)
    return service


def warm_up(service: Service) -> dict[str, float | int | str]:
    """warm_up_engine for a Service whose engine runs in this process."""
    return warm_up_engine(service.engine)


def warm_up_engine(engine: Engine) -> dict[str, float | int | str]:
    """Before serving: run a few requests through every sampling mode and capture the graphs, so
    the first client pays no one-time costs (Triton's kernels compile here too). Returns seconds
    spent per part, the number of graphs and which decode step runs."""
    times = {}
    t0 = time.perf_counter()
    block = engine.decoder.block_size
    prompt = [min(EOT_ID, engine.vocab_size - 1)] * min(8, block - 4)  # a small test vocabulary has no EOT_ID
    warm = [
        Sequence(prompt, 4),
        Sequence(prompt, 4, temperature=1.0, seed=1),
        Sequence(prompt, 4, temperature=0.8, top_k=5, top_p=0.9, seed=2, logprobs=2, prompt_logprobs=2),
        Sequence(prompt, 4, repetition_penalty=1.1, logit_bias={0: 1.0}, min_tokens=2),  # the penalized modes
        Sequence(prompt, 4, temperature=0.8, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5, seed=3),
    ]
    engine.submit(warm)
    while not engine.idle:
        engine.iterate()
    engine.sync()
    times["warmup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = engine.decoder.capture_all()
    engine.sync()
    times["graphs"], times["capture_s"] = n, time.perf_counter() - t0
    times["decode"] = "fused kernels" if engine.decoder.fused else "PyTorch"
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(service: Service, host: str, port: int, log_level: str = "info", access_log: bool = False) -> None:
    """Serve until interrupted (uvicorn handles SIGINT / SIGTERM). A service with a loader listens at
    once and loads its engine meanwhile; if that fails, the server stops and this raises RuntimeError."""
    import uvicorn

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level, access_log=access_log)
    server = uvicorn.Server(config)

    def stop() -> None:
        server.should_exit = True

    service.on_start_failed = stop
    server.run()
    if service.start_error is not None:
        raise RuntimeError(f"the engine failed to start: {service.start_error}")


class ServerThread:
    """uvicorn in a background thread on 127.0.0.1 (tests, benchmarks): `with ServerThread(s) as url:`."""

    def __init__(self, service: Service, port: int | None = None) -> None:
        """A service with a loader starts listening before its engine is ready (see run_server)."""
        import uvicorn

        self.port = port or free_port()
        config = uvicorn.Config(
            create_app(service), host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="gpt2-serve-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
