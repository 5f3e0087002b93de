"""The engine in its own process, so it never waits for the HTTP process's GIL.

In one process the engine thread and the event loop share the GIL: while the loop formats and
writes a step's events (~15 us per token on a CPU, ~0.5 ms per step at 32 streams) the engine
cannot launch the next step, and the GPU idles once that exceeds the step's ~1 ms. Here a child
process (spawned, so CUDA starts fresh in it) loads the model, warms it up, captures the graphs and
runs the Engine; the HTTP process talks to it through two pipes:

    HTTP process                                   engine process
    EngineProcess.submit / cancel  --commands-->   main thread: Engine.submit / cancel
    reader thread -> on_outputs    <--outputs---   engine thread: one message per step

Each outputs message is one step's outputs as plain tuples (sequence id, tokens, logprobs, prompt
logprobs, finish reason, error) plus the engine's counters for /health. Once a second a ping goes
down and the child's main thread answers with the counters, so `health()` knows the child is alive
and whether its engine thread is stuck even when nothing is being generated. EngineProcess has the
Engine's interface (submit, cancel, stats, start, stop), so the Service and the app do not know
which one they hold. Bounds: a request is refused (QueueFull) when the sequences not finished yet
would exceed max_queue + max_batch (the queue plus the slots), counted here without asking the
child. If the child dies, every unfinished sequence ends with an error and new requests get one.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, fields

from gpt2.inference.load import ModelSpec, load_model
from gpt2.inference.scheduler import Output, QueueFull, Sequence
from gpt2.serve.app import Service
from gpt2.serve.config import HTTPConfig, ServeConfig

PING_S = 1.0  # heartbeat period (health)
STATS_S = 0.05  # outputs carry the engine's counters at most this often, and whenever a sequence ends
_FIELDS = tuple(f.name for f in fields(Sequence) if f.name != "handle")  # what a submit message carries


# Loads the model in the child: a module-level function (the child imports it by name), e.g.
# gpt2.commands.common.load_for_inference, which also sets the shell's matmul precision.
Loader = Callable[[ModelSpec], tuple]


class EngineProcess:
    """The Engine's interface over a child process that owns the model (see the module docstring).

    Construction starts the child and waits until it is warmed up (`info`: block_size, vocab_size,
    device, dtype, warm-up times; with wait=False wait_ready() does that); start() starts delivering
    outputs to on_outputs."""

    def __init__(
        self,
        spec: ModelSpec,
        config: ServeConfig,
        on_outputs,
        timeout: float = 1800,
        load: Loader = load_model,
        wait: bool = True,
    ) -> None:
        """Start the child, which loads the model with `load`; with wait=True also wait_ready(timeout)."""
        ctx = mp.get_context("spawn")  # CUDA starts fresh in the child
        child_commands, self._commands = ctx.Pipe(duplex=False)  # (receiving end, sending end)
        self._outputs, child_outputs = ctx.Pipe(duplex=False)
        self.on_outputs, self.config = on_outputs, config
        self._process = ctx.Process(
            target=_child_main, args=(spec, load, asdict(config), child_commands, child_outputs), daemon=True
        )
        self._process.start()
        child_commands.close()
        child_outputs.close()
        self._lock = threading.Lock()  # guards _seqs (loop thread: submit; reader thread: finishes)
        self._seqs: dict[int, Sequence] = {}  # unfinished sequences by id
        self._ids = itertools.count()
        self._dead: str | None = None
        self._reader: threading.Thread | None = None
        self._stopping = threading.Event()
        self._heard = time.monotonic()  # when the child last sent anything (health)
        self.info: dict = {}
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 1800) -> dict:
        """Block until the child has loaded and warmed up the model; its start-up report."""
        self.info = self._wait_until_ready(timeout)
        self._stats = self.info.pop("stats")  # the engine's counters as of its last message
        self._heard = time.monotonic()
        return self.info

    def _wait_until_ready(self, timeout: float) -> dict:
        """The child's start-up report; a RuntimeError if it failed, died or took too long."""
        deadline = time.monotonic() + timeout
        while not self._outputs.poll(1.0):
            if not self._process.is_alive() or time.monotonic() > deadline or self._stopping.is_set():
                self._process.kill()
                self._process.join(timeout=10)
                raise RuntimeError(f"the engine process did not start (exit code {self._process.exitcode})")
        try:
            kind, info = self._outputs.recv()
        except EOFError:
            self._process.join(timeout=10)
            raise RuntimeError(f"the engine process exited at start-up (code {self._process.exitcode})") from None
        if kind == "failed":
            self._process.join(timeout=10)
            raise RuntimeError(f"the engine process failed to start: {info}")
        return info

    # --- the Engine's interface (called from the event loop) ---------------------------------------

    def submit(self, requests: list[Sequence]) -> list[int]:
        """Queue the requests (all or none) in the child; returns their ids. Raises QueueFull."""
        c = self.config
        if len(requests) > c.max_queue:
            raise ValueError(f"{len(requests)} sequences in one request; this server queues at most {c.max_queue}")
        if self._dead is not None:
            raise RuntimeError(f"the engine process is gone ({self._dead})")
        with self._lock:
            if len(self._seqs) + len(requests) > c.max_queue + c.max_batch:
                waiting = max(0, len(self._seqs) - c.max_batch)
                raise QueueFull(f"the queue is full (about {waiting} sequences waiting); retry later")
            ids = [next(self._ids) for _ in requests]
            self._seqs.update(zip(ids, requests))
        try:
            self._commands.send(("submit", [(i, *(getattr(r, f) for f in _FIELDS)) for i, r in zip(ids, requests)]))
        except OSError as e:  # the child is gone and the reader has not noticed yet
            with self._lock:
                for i in ids:
                    self._seqs.pop(i, None)
            raise RuntimeError(f"the engine process is gone ({type(e).__name__})") from None
        return ids

    def cancel(self, ids: list[int]) -> None:
        if self._dead is None:
            try:
                self._commands.send(("cancel", list(ids)))
            except OSError:
                pass  # the child is gone: the reader fails what was running

    @property
    def max_queue(self) -> int:
        """Sequences one request may have (as Engine.max_queue)."""
        return self.config.max_queue

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def health(self, stall_timeout: float) -> str | None:
        """None while the engine process answers and steps; else why not (/health's 503 reason)."""
        if self._dead is not None:
            return self._dead
        if not self._process.is_alive():
            return f"the engine process exited with code {self._process.exitcode}"
        silent = time.monotonic() - self._heard
        if silent > stall_timeout:
            return f"the engine process has not answered for {silent:.0f} s (stopped or wedged)"
        stats = self._stats
        if not stats.get("alive", True):
            return "the engine thread of the engine process has stopped"
        if stats.get("stalled_s", 0) > stall_timeout:
            return f"the engine is wedged: one step boundary has run for {stats['stalled_s']:.0f} s"
        return None

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="gpt2-serve-engine-reader", daemon=True)
        self._reader.start()
        threading.Thread(target=self._ping, name="gpt2-serve-engine-ping", daemon=True).start()

    def _ping(self) -> None:
        """Ask the child for its counters every PING_S seconds (its answer is the heartbeat)."""
        while not self._stopping.wait(PING_S) and self._dead is None:
            try:
                self._commands.send(("ping", None))
            except OSError:
                return  # the child is gone: the reader notices

    def stop(self) -> None:
        self._stopping.set()  # also ends a wait_ready in progress (start-up interrupted)
        if self._process.is_alive() and self.info:  # ready: ask it to finish cleanly
            try:
                self._commands.send(("stop", None))
            except OSError:
                pass
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)

    # --- the reader thread ---------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                kind, payload, stats = self._outputs.recv()
            except (EOFError, OSError):
                self._fail_all(
                    "the engine process exited"
                    if self._process.exitcode is None
                    else f"the engine process exited with code {self._process.exitcode}"
                )
                return
            if kind == "stopped":
                return
            self._heard = time.monotonic()
            if stats is not None:  # outputs carry them only now and then (STATS_S)
                self._stats = stats
            if kind == "pong":
                continue
            outputs = []
            with self._lock:
                for sid, tokens, logprobs, prompt_logprobs, finish_reason, error in payload:
                    request = self._seqs.pop(sid) if finish_reason is not None else self._seqs.get(sid)
                    if request is not None:
                        outputs.append(Output(request, tokens, logprobs, prompt_logprobs, finish_reason, error))
            if outputs:
                self.on_outputs(outputs)

    def _fail_all(self, message: str) -> None:
        self._dead = message
        with self._lock:
            failed = [Output(r, [], finish_reason="error", error=message) for r in self._seqs.values()]
            self._seqs.clear()
        if failed:
            self.on_outputs(failed)


def build_process_service(
    spec: ModelSpec, model_id: str, config: ServeConfig, http: HTTPConfig | None = None, load: Loader = load_model
) -> Service:
    """The Service over an engine process (started and warmed up; outputs flow after start()),
    whose model `load` loads (default: gpt2.inference.load.load_model)."""
    service = Service(None, model_id, http=http)
    engine = EngineProcess(spec, config, service.on_outputs, load=load)
    service.attach(engine, engine.info["block_size"], engine.info["vocab_size"])
    return service


def process_loader(spec: ModelSpec, config: ServeConfig, on_ready=None, load: Loader = load_model):
    """A Service loader (see Service.loader) that starts the engine process after the server listens:
    /health answers 503 "starting" until the model is loaded and warmed up; on_ready(info) then."""

    def start(service: Service) -> None:
        engine = EngineProcess(spec, config, service.on_outputs, load=load, wait=False)
        service.pending = engine  # so that a shutdown during start-up stops it
        info = engine.wait_ready()
        service.attach(engine, info["block_size"], info["vocab_size"])
        if on_ready is not None:
            on_ready(info)

    return start


# --- the child process -----------------------------------------------------------------------------


def _child_main(spec: ModelSpec, load: Loader, config: dict, commands, outputs) -> None:
    """The engine process's entry point (its application shell): load, warm up, then run the
    engine until told to stop."""
    try:
        import torch

        from gpt2.device import pick_device
        from gpt2.serve.server import build_engine, warm_up_engine

        t0 = time.perf_counter()
        torch.set_grad_enabled(False)
        device = pick_device(spec.device)
        if device.type == "cuda" and device.index is not None:  # "cuda" alone: the current device
            torch.cuda.set_device(device)
        model, _ = load(spec)
        load_s = time.perf_counter() - t0
        send_lock = threading.Lock()  # the engine thread sends outputs, the main thread the last message
        live = threading.Event()  # off during warm-up: its outputs have nobody to go to

        sent = [0.0]  # when outputs last carried the counters (building and pickling them: ~5 us a step)

        def on_outputs(outs: list[Output]) -> None:
            if live.is_set():
                payload = [
                    (o.request.handle, o.tokens, o.logprobs, o.prompt_logprobs, o.finish_reason, o.error) for o in outs
                ]
                now, stats = time.perf_counter(), None
                if now - sent[0] >= STATS_S or any(o.finish_reason is not None for o in outs):
                    sent[0], stats = now, engine.stats()
                with send_lock:
                    outputs.send(("outputs", payload, stats))

        # the HTTP process bounds the queue; this one must never refuse what it was sent
        config = ServeConfig(**{**config, "max_queue": config["max_queue"] + config["max_batch"]})
        engine = build_engine(model, config, on_outputs)
        info = {
            "block_size": model.config.block_size,
            "vocab_size": model.config.vocab_size,
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype),
            "load_s": load_s,
            **warm_up_engine(engine),
        }
        gc.collect()  # start-up objects out of the garbage collector's walks, as gpt2 serve does
        gc.freeze()
        live.set()
        engine.start()
        outputs.send(("ready", {**info, "stats": engine.stats()}))
    except Exception as e:  # tell the parent instead of leaving it waiting
        outputs.send(("failed", f"{type(e).__name__}: {e}"))
        return
    _serve_commands(engine, commands, outputs, send_lock, on_outputs)


def _serve_commands(engine, commands, outputs, send_lock: threading.Lock, on_outputs) -> None:
    """The child's main thread once the engine runs: submit, cancel and ping (health's heartbeat)
    from the HTTP process, until it says stop or goes away."""
    while True:
        try:
            kind, payload = commands.recv()
        except (EOFError, OSError):  # the HTTP process is gone
            kind = "stop"
        if kind == "submit":
            requests = [Sequence(**dict(zip(_FIELDS, item[1:])), handle=item[0]) for item in payload]
            try:
                engine.submit(requests)
            except Exception as e:
                on_outputs([Output(r, [], finish_reason="error", error=f"{type(e).__name__}: {e}") for r in requests])
        elif kind == "cancel":
            engine.cancel(payload)
        elif kind == "ping":
            with send_lock:
                outputs.send(("pong", None, engine.stats()))
        else:
            engine.stop()
            with send_lock:
                try:
                    outputs.send(("stopped", None, engine.stats()))
                except OSError:
                    pass
            return
