"""The HTTP side: a Starlette app with OpenAI's /v1/completions, /v1/models, /health and the page.

Handlers never touch the model. A request is checked (gpt2.serve.protocol), split into one engine
sequence per (prompt, choice), queued, and then read from its own Mailbox, which the event loop
fills from what the engine thread hands over through `Service.on_outputs`: the engine appends each
step's outputs to a deque and wakes the loop only when no wake-up is pending, so a loop that is
behind drains several steps at once, and each handler then writes all its new tokens in one go.
Streaming answers are server-sent events, one `data:` event per token (several events share one
write when the client is behind), ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import time
from collections import deque
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gpt2.inference.engine import EngineClient
from gpt2.inference.sampling import choice_seed
from gpt2.inference.scheduler import QueueFull, Sequence
from gpt2.serve.protocol import APIError, CompletionParams, parse_completion
from gpt2.serve.stream import Completion, Mailbox
from gpt2.serve.text import token_table
from gpt2.tokenizer import Tokenizer


class Service:
    """What the handlers share: the engine, the tokenizer, the model's name and context."""

    def __init__(self, engine: EngineClient, model_id: str, block_size: int, vocab_size: int) -> None:
        self.engine, self.model_id = engine, model_id
        self.block_size, self.vocab_size = block_size, vocab_size
        self.tok = Tokenizer()
        self.table = token_table(vocab_size)
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready: deque[list] = deque()  # steps' outputs the loop has not taken yet
        self._woken = False  # a drain is scheduled on the loop and has not started

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
    """The ASGI app; its lifespan binds the event loop and runs the engine thread."""
    page = resources.files("gpt2.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.loop = asyncio.get_running_loop()
        service.engine.start()
        try:
            await _warm_up_http(app)
            yield
        finally:
            service.engine.stop()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def health(request: Request) -> Response:
        stats = service.engine.stats()
        return JSONResponse({"status": "ok", "model": service.model_id, **stats, "http_cpu_s": time.process_time()})

    async def models(request: Request) -> Response:
        card = {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "gpt2"}
        return JSONResponse({"object": "list", "data": [{**card, "max_model_len": service.block_size}]})

    async def completions(request: Request) -> Response:
        try:
            return await _complete(service, request)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    handlers = {HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    error = APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code=str(exc.status_code))
    return JSONResponse(error.body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
    return JSONResponse(error.body(), status_code=500)


async def _complete(service: Service, request: Request) -> Response:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    params = parse_completion(
        body,
        model_id=service.model_id,
        tokenizer=service.tok,
        block_size=service.block_size,
        vocab_size=service.vocab_size,
    )
    inbox = Mailbox()
    seqs = _sequences(params, inbox)
    try:
        ids = service.engine.submit(seqs)
    except QueueFull as e:
        raise APIError(429, str(e), code="queue_full") from None
    except ValueError as e:
        raise APIError(400, str(e), param="n") from None
    completion = Completion(service, params, seqs, ids, inbox, f"cmpl-{secrets.token_hex(12)}")
    if params.stream:
        return _EventStream(completion.events(), completion.close, media_type="text/event-stream")
    try:
        body = await completion.collect()
    finally:
        completion.close()
    if body.get("error"):
        raise APIError(500, body["error"], code="internal_error")
    return JSONResponse(body)


def _sequences(p: CompletionParams, inbox: Mailbox) -> list[Sequence]:
    """One engine sequence per (prompt, choice); choice i of a seeded request gets its own seed."""
    seqs = []
    for i, prompt in enumerate(p.prompts):
        for j in range(p.n):
            index = i * p.n + j
            seed = random.getrandbits(63) if p.seed is None else choice_seed(p.seed, index)
            seqs.append(
                Sequence(
                    prompt=prompt,
                    max_tokens=p.max_tokens,
                    temperature=p.temperature,
                    top_k=p.top_k,
                    top_p=p.top_p,
                    seed=seed,
                    logprobs=p.logprobs,
                    prompt_logprobs=p.logprobs if p.echo else None,
                    stop_at_eos=not p.ignore_eos,
                    handle=inbox,
                )
            )
    return seqs


async def _warm_up_http(app) -> None:
    """Before the first client, in process and without the engine: a bad completion request through
    the whole app (Starlette builds its middleware stack on the first request) and an event
    stream (it imports anyio's backend on the first one): ~100 ms on a CPU that would otherwise
    be the first client's time to first token."""
    await _asgi_call(app, "POST", "/v1/completions", b"{}")

    async def one_event():
        yield "data: [DONE]\n\n"

    await _asgi_call(_EventStream(one_event(), lambda: None, media_type="text/event-stream"), "GET", "/", b"")


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


class _EventStream(StreamingResponse):
    """A StreamingResponse that always runs `on_close` (client gone, error or done)."""

    def __init__(self, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close
        self.headers["cache-control"] = "no-cache"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
