"""The HTTP side: a Starlette app with OpenAI's /v1/completions, /v1/chat/completions and /v1/models,
vLLM's tokenizer routes, /health, /metrics and the page.

Handlers never touch the model. A request is checked (gpt2.serve.protocol, .chat, .tokenization),
split into one engine sequence per (prompt, choice), queued, and then read from its own Mailbox,
which the event loop fills from what the engine thread hands over through `Service.on_outputs`: the
engine appends each step's outputs to a deque and wakes the loop only when no wake-up is pending, so
a loop that is behind drains several steps at once, and each handler then writes all its new tokens
in one go. Streaming answers are server-sent events, one `data:` event per token (several events
share one write when the client is behind), ending with `data: [DONE]`.

Nothing slow runs on the event loop: a body larger than handling.INLINE_BYTES is decoded, checked
and tokenized in a worker thread (tiktoken releases the GIL), so a 4 MB prompt never stalls the other
streams; the edge (body limit, API key, CORS) is gpt2.serve.guard's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from gpt2.inference.engine import EngineClient
from gpt2.serve import guard, handling, tokenization
from gpt2.serve.chat import ChatCompletion, ChatTemplate
from gpt2.serve.config import HTTPConfig
from gpt2.serve.metrics import CONTENT_TYPE, ServingMetrics
from gpt2.serve.protocol import APIError
from gpt2.serve.stream import Completion
from gpt2.serve.text import token_table
from gpt2.tokenizer import Tokenizer

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
ROUTES += ("/tokenize", "/detokenize", "/tokenizer_info")


class Service:
    """What the handlers share: the engine, the tokenizer, the model's name and context, the metrics.

    The engine is given at construction (tests, benchmarks) or attached later by `loader(service)`,
    which the app runs in a thread once the server listens (`gpt2 serve`): until then every route
    but /health, /metrics and the page answers 503, and /health says "starting"."""

    def __init__(
        self,
        engine: EngineClient | None,
        model_id: str,
        block_size: int = 0,
        vocab_size: int = 0,
        *,
        http: HTTPConfig | None = None,
    ) -> None:
        self.model_id, self.http = model_id, http or HTTPConfig()
        self.chat_template: ChatTemplate = self.http.chat_template or ChatTemplate()
        self.tok = Tokenizer()
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready: deque[list] = deque()  # steps' outputs the loop has not taken yet
        self._woken = False  # a drain is scheduled on the loop and has not started
        self.engine: EngineClient | None = None
        self.ready = False  # the engine is attached and started: requests are accepted
        self.loader = None  # callable(service) that attaches the engine (run after the server listens)
        self.pending = None  # an engine the loader is starting (stopped if the server stops first)
        self.start_error: str | None = None
        self.on_start_failed = None  # callable() (run_server: stop the server)
        self.workers: ThreadPoolExecutor | None = None  # parsing and tokenizing of large bodies
        self.metrics = ServingMetrics(model_id, self._engine_stats, lambda: self.health() is None)
        if engine is not None:
            self.attach(engine, block_size, vocab_size)

    def attach(self, engine: EngineClient, block_size: int, vocab_size: int) -> None:
        self.engine, self.block_size, self.vocab_size = engine, block_size, vocab_size
        self.table = token_table(vocab_size)

    def health(self) -> str | None:
        """None while requests can be served; else why not (the 503's reason)."""
        if self.start_error is not None:
            return f"the engine failed to start: {self.start_error}"
        if not self.ready:
            return "starting: the engine is loading the model and warming up"
        return self.engine.health(self.http.stall_timeout_s)

    def _engine_stats(self) -> dict:
        return self.engine.stats() if self.ready else {}

    def on_outputs(self, outputs) -> None:
        """Engine thread: hand one step's outputs to the event loop; wake it only if no wake-up
        is pending (the pending drain takes these too)."""
        if self.loop is None:
            return  # warm-up before serving: nobody is waiting
        self._ready.append(outputs)
        if not self._woken:
            self._woken = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """Event loop: every step's outputs that arrived, into their requests' mailboxes."""
        self._woken = False  # from here on a new step wakes the loop again (at worst one idle drain)
        ready = self._ready
        while ready:
            _dispatch(ready.popleft())


def _dispatch(outputs) -> None:
    for out in outputs:
        out.request.handle.put(out)


def create_app(service: Service) -> Starlette:
    """The ASGI app; its lifespan binds the event loop and starts (or loads, then starts) the engine."""
    page = resources.files("gpt2.serve").joinpath("playground.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def health(request: Request) -> Response:
        reason = service.health()
        if reason is not None:
            status = "starting" if not (service.ready or service.start_error) else "unavailable"
            body = {"status": status, "reason": reason, "model": service.model_id}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        stats = {k: v for k, v in service.engine.stats().items() if not isinstance(v, list)}
        return JSONResponse({"status": "ok", "model": service.model_id, **stats, "http_cpu_s": time.process_time()})

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), headers={"content-type": CONTENT_TYPE})

    async def models(request: Request) -> Response:
        return handling.answer(lambda: {"object": "list", "data": [_model_card(service)]})

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        if name != service.model_id:
            message = f"the model '{name}' does not exist; this server has '{service.model_id}'"
            return handling.error_response(APIError(404, message, param="model", code="model_not_found"))
        return handling.answer(lambda: _model_card(service))

    async def completions(request: Request) -> Response:
        return await handling.generate(service, request, handling.completion_params, Completion, "cmpl-")

    async def chat(request: Request) -> Response:
        kind = functools.partial(ChatCompletion, strip_leading=service.chat_template.strip_leading)
        return await handling.generate(service, request, handling.chat_params, kind, "chatcmpl-")

    async def tokenize(request: Request) -> Response:
        return await handling.tokenizer_route(service, request, handling.tokenize_body)

    async def detokenize(request: Request) -> Response:
        return await handling.tokenizer_route(service, request, handling.detokenize_body)

    async def tokenizer_info(request: Request) -> Response:
        return handling.answer(
            lambda: tokenization.tokenizer_info(service.chat_template, handling.ready(service).block_size)
        )

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/models/{name:path}", model),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info),
    ]
    handlers = {HTTPException: _http_error, Exception: _server_error}
    lifespan = functools.partial(_lifespan, service)
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers, middleware=_middleware(service))


@contextlib.asynccontextmanager
async def _lifespan(service: Service, app):
    """Bind the event loop; start the engine, or its loader in a thread; stop them at shutdown."""
    service.loop = asyncio.get_running_loop()
    service.workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gpt2-serve-parse")
    if service.engine is not None:
        _go_live(service)
    elif service.loader is not None:
        threading.Thread(target=_load, args=(service,), name="gpt2-serve-load", daemon=True).start()
    try:
        await _warm_up_http(app)
        yield
    finally:
        if service.ready:
            service.engine.stop()
        elif service.pending is not None:
            service.pending.stop()  # shut down while starting: the loader's wait ends too
        service.workers.shutdown(wait=False, cancel_futures=True)


def _middleware(service: Service) -> list[Middleware]:
    """The edge, outermost first (gpt2.serve.guard)."""
    http = service.http
    stack = []
    if http.allowed_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(http.allowed_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                max_age=600,
            )
        )
    stack.append(Middleware(guard.StatusCounter, count=service.metrics.answered, routes=ROUTES))
    stack.append(Middleware(guard.BodyLimit, max_bytes=http.max_body_bytes))
    if http.api_keys:
        stack.append(Middleware(guard.APIKeyAuth, keys=http.api_keys))
    return stack


def _go_live(service: Service) -> None:
    service.engine.start()
    service.ready = True


def _load(service: Service) -> None:
    """The loader thread: attach the engine, start it; on failure record why and stop the server."""
    try:
        service.loader(service)
        _go_live(service)
    except Exception as e:
        service.start_error = f"{type(e).__name__}: {e}"
        print(f"gpt2 serve: the engine failed to start: {service.start_error}", file=sys.stderr, flush=True)
        if service.on_start_failed is not None:
            service.on_start_failed()


def _model_card(service: Service) -> dict:
    card = {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "gpt2"}
    return {**card, "max_model_len": handling.ready(service).block_size}


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    error = APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code=str(exc.status_code))
    return JSONResponse(error.body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
    return JSONResponse(error.body(), status_code=500)


async def _warm_up_http(app) -> None:
    """Before the first client, in process and without the engine: a bad completion request through
    the whole app (Starlette builds its middleware stack on the first request) and an event
    stream (it imports anyio's backend on the first one): ~100 ms on a CPU that would otherwise
    be the first client's time to first token. Not counted in /metrics."""
    await _asgi_call(app, "POST", "/v1/completions", b"{}")

    async def one_event():
        yield "data: [DONE]\n\n"

    await _asgi_call(handling.EventStream(one_event(), lambda: None, media_type="text/event-stream"), "GET", "/", b"")


async def _asgi_call(app, method: str, path: str, body: bytes) -> None:
    """One HTTP request through an ASGI app, as uvicorn makes it; the answer is dropped."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        guard.WARM_UP: True,
    }
    done = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await app(scope, receive, send)
