"""The HTTP side: a Starlette app with OpenAI's /v1/completions, /v1/models, /health and the page.

Handlers never touch the model. A request is checked (gpt2.serve.protocol), split into one engine
sequence per (prompt, choice), queued, and then read from its own asyncio.Queue, which the engine
thread fills through `Service.on_outputs` (one call_soon_threadsafe per engine step, not per
token). Streaming answers are server-sent events, one `data:` event per token (several events
may share one write when the client is behind), ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import time
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gpt2.serve.engine import Engine, QueueFull
from gpt2.serve.engine import Request as Sequence
from gpt2.serve.protocol import APIError, CompletionParams, parse_completion
from gpt2.serve.stream import Completion
from gpt2.tokenizer import Tokenizer


class Service:
    """What the handlers share: the engine, the tokenizer, the model's name and context."""

    def __init__(self, engine: Engine, model_id: str, block_size: int, vocab_size: int) -> None:
        self.engine, self.model_id = engine, model_id
        self.block_size, self.vocab_size = block_size, vocab_size
        self.tok = Tokenizer()
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None

    def on_outputs(self, outputs) -> None:
        """Engine thread: hand one step's outputs to the event loop in one call."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(_dispatch, outputs)


def _dispatch(outputs) -> None:
    for out in outputs:
        out.request.handle.put_nowait(out)


def create_app(service: Service) -> Starlette:
    """The ASGI app; its lifespan binds the event loop and runs the engine thread."""
    page = resources.files("gpt2.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.loop = asyncio.get_running_loop()
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": service.model_id, **service.engine.stats()})

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
    queue: asyncio.Queue = asyncio.Queue()
    seqs = _sequences(params, queue)
    try:
        ids = service.engine.submit(seqs)
    except QueueFull as e:
        raise APIError(429, str(e), code="queue_full") from None
    except ValueError as e:
        raise APIError(400, str(e), param="n") from None
    completion = Completion(service, params, seqs, ids, queue, f"cmpl-{secrets.token_hex(12)}")
    if params.stream:
        return _EventStream(completion.events(), completion.close, media_type="text/event-stream")
    try:
        body = await completion.collect()
    finally:
        completion.close()
    if body.get("error"):
        raise APIError(500, body["error"], code="internal_error")
    return JSONResponse(body)


def _sequences(p: CompletionParams, queue: asyncio.Queue) -> list[Sequence]:
    """One engine sequence per (prompt, choice); choice i of a seeded request gets its own seed."""
    seqs = []
    for i, prompt in enumerate(p.prompts):
        for j in range(p.n):
            index = i * p.n + j
            seed = random.getrandbits(63) if p.seed is None else (p.seed + index * 0x9E3779B97F4A7C15) % 2**63
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
                    handle=queue,
                )
            )
    return seqs


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
