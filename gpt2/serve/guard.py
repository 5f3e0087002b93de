"""The HTTP edge of `gpt2 serve`: ASGI middleware that runs before any handler.

From the outside in:

- CORS (`--allowed-origins`, Starlette's CORSMiddleware): answers browsers' preflight `OPTIONS`
  and adds the `Access-Control-*` headers, also to error answers so a page can read them;
- StatusCounter: counts every answer by route and status code for /metrics;
- BodyLimit (`--max-body-bytes`): a body whose Content-Length is over the limit gets 413 before a
  byte of it is read; a chunked body is counted as it arrives and cut off at the limit;
- APIKeyAuth (`--api-key`): `/v1/*` and the tokenizer routes need `Authorization: Bearer KEY`
  (401 without one, 403 with a wrong one; compared in constant time); `/health`, `/metrics` and the
  page stay open, so a load balancer and Prometheus need no key.

Pure ASGI classes (not BaseHTTPMiddleware, which would buffer every streamed event through a queue).
"""

from __future__ import annotations

import hmac
import json

from gpt2.serve.protocol import APIError

WARM_UP = "gpt2.warm_up"  # a scope key: the app's own start-up request, not counted
CLOSED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


async def send_error(send, error: APIError, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An APIError as a complete JSON answer, straight through ASGI."""
    body = json.dumps(error.body()).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": error.status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for bodies over max_bytes, decided before reading them where Content-Length says so."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await send_error(send, self._error(length))
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        def watched_send(message):  # a plain function handing back send's awaitable: no coroutine per event
            nonlocal started
            started = started or message["type"] == "http.response.start"
            return send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await send_error(send, self._error(f"more than {self.max_bytes}"))

    def _error(self, length: str) -> APIError:
        return APIError(
            413,
            f"the request body ({length} bytes) is over this server's limit of {self.max_bytes:,} bytes "
            "(--max-body-bytes); send a smaller request",
            code="body_too_large",
        )


class APIKeyAuth:
    """Bearer-key check on the API routes (see the module docstring)."""

    def __init__(self, app, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(CLOSED_PREFIXES):
            return await self.app(scope, receive, send)
        header = _header(scope, b"authorization")
        if header is None or not header.lower().startswith("bearer "):
            error = APIError(
                401, "this server needs an API key: send 'Authorization: Bearer KEY'", code="missing_api_key"
            )
            return await send_error(send, error, [(b"www-authenticate", b"Bearer")])
        given = header[7:].strip().encode()
        match = False
        for key in self.keys:  # every key compared, each in constant time
            match |= hmac.compare_digest(given, key)
        if not match:
            return await send_error(send, APIError(403, "the API key is not valid", code="invalid_api_key"))
        await self.app(scope, receive, send)


class StatusCounter:
    """Counts answers by (route, status) through count(route, status); unknown paths are "other"."""

    def __init__(self, app, count, routes: tuple[str, ...]) -> None:
        self.app, self.count, self.routes = app, count, frozenset(routes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get(WARM_UP):
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = 500  # unless an answer starts

        def watched_send(message):  # as BodyLimit's: called for every streamed event
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            self.count(route, status)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
