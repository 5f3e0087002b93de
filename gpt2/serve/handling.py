"""From an HTTP request to its answer, for the app's handlers: the body parsed (in a worker thread
when it is large, so tokenizing a long prompt never stalls the event loop), sequences queued in the
engine, and the answer collected (JSON, cancelled if the client leaves first) or streamed (SSE).
Errors are APIErrors answered in OpenAI's shape; 429 and 503 say when to retry.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gpt2.inference.sampling import choice_seed
from gpt2.inference.scheduler import QueueFull, Sequence
from gpt2.serve import tokenization
from gpt2.serve.chat import parse_chat
from gpt2.serve.protocol import APIError, CompletionParams, invalid, parse_completion
from gpt2.serve.stream import Completion, Mailbox

INLINE_BYTES = 8192  # bodies up to this are parsed on the loop (~1 ms of tokenizing at most); larger in a thread


def ready(service):
    """The service, or a 503 while its engine is not running (starting, or failed to start)."""
    if not service.ready:
        raise APIError(503, service.health() or "the engine is not running", code="engine_unavailable")
    return service


def answer(make) -> Response:
    try:
        return JSONResponse(make())
    except APIError as e:
        return error_response(e)


def error_response(e: APIError) -> Response:
    """An APIError's JSON answer; 429 and 503 say when to retry."""
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


# --- parsing, off the event loop when it is large -----------------------------------------------


async def _parsed(service, request: Request, parse):
    """parse(decoded JSON body), in a worker thread when the body is large."""
    raw = await request.body()
    work = functools.partial(_decode_and_parse, raw, parse)
    if len(raw) <= INLINE_BYTES:
        return work()
    return await service.loop.run_in_executor(service.workers, work)


def _decode_and_parse(raw: bytes, parse):
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    except RecursionError:
        raise invalid("the request body is nested too deeply to be a request", None, "invalid_json") from None
    return parse(body)


def completion_params(service, body) -> CompletionParams:
    s = service
    return parse_completion(
        body,
        model_id=s.model_id,
        tokenizer=s.tok,
        block_size=s.block_size,
        vocab_size=s.vocab_size,
        max_sequences=s.engine.max_queue,
    )


def chat_params(service, body) -> CompletionParams:
    s = service
    return parse_chat(
        body,
        model_id=s.model_id,
        template=s.chat_template,
        tokenizer=s.tok,
        block_size=s.block_size,
        vocab_size=s.vocab_size,
    )


def tokenize_body(service, body) -> dict:
    s = service
    return tokenization.tokenize(
        body, model_id=s.model_id, template=s.chat_template, tokenizer=s.tok, block_size=s.block_size
    )


def detokenize_body(service, body) -> dict:
    return tokenization.detokenize(
        body, model_id=service.model_id, tokenizer=service.tok, vocab_size=service.vocab_size
    )


async def tokenizer_route(service, request: Request, work) -> Response:
    try:
        ready(service)
        return JSONResponse(await _parsed(service, request, functools.partial(work, service)))
    except APIError as e:
        return error_response(e)


# --- generation ----------------------------------------------------------------------------------


async def generate(service, request: Request, parse, kind, prefix: str) -> Response:
    """Check, queue and answer one completion (kind: Completion or ChatCompletion)."""
    arrival = time.perf_counter()
    try:
        ready(service)
        params = await _parsed(service, request, functools.partial(parse, service))
        inbox = Mailbox()
        seqs = _sequences(params, inbox)
        ids = _submit(service, seqs)
    except APIError as e:
        return error_response(e)
    completion = kind(service, params, seqs, ids, inbox, f"{prefix}{secrets.token_hex(12)}", arrival)
    if params.stream:
        return EventStream(completion.events(), completion.close, media_type="text/event-stream")
    return await _collect(completion, request)


def _submit(service, seqs: list[Sequence]) -> list[int]:
    try:
        return service.engine.submit(seqs)
    except QueueFull as e:
        raise APIError(429, str(e), code="queue_full") from None
    except ValueError as e:
        raise APIError(400, str(e), param="n") from None
    except RuntimeError as e:  # the engine process is gone
        raise APIError(503, str(e), code="engine_unavailable") from None


async def _collect(completion: Completion, request: Request) -> Response:
    """The JSON answer; if the client goes away first, its sequences are cancelled like a stream's."""
    collect = asyncio.ensure_future(completion.collect())
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((collect, gone), return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():
            collect.cancel()
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        body = collect.result()
    finally:
        gone.cancel()
        completion.close()
    if body.get("error"):
        return error_response(APIError(500, body["error"], code="internal_error"))
    return JSONResponse(body)


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sequences(p: CompletionParams, inbox: Mailbox) -> list[Sequence]:
    """One engine sequence per (prompt, choice); choice i of a seeded request gets its own seed."""
    seqs = []
    for i, prompt in enumerate(p.prompts):
        for j in range(p.n):
            index = i * p.n + j
            seed = secrets.randbits(63) if p.seed is None else choice_seed(p.seed, index)
            seqs.append(
                Sequence(
                    prompt=prompt,
                    max_tokens=p.max_tokens,
                    temperature=p.temperature,
                    top_k=p.top_k,
                    top_p=p.top_p,
                    min_p=p.min_p,
                    seed=seed,
                    logprobs=p.logprobs,
                    prompt_logprobs=p.logprobs if p.echo else None,
                    stop_at_eos=not p.ignore_eos,
                    presence_penalty=p.presence_penalty,
                    frequency_penalty=p.frequency_penalty,
                    repetition_penalty=p.repetition_penalty,
                    logit_bias=p.logit_bias,
                    min_tokens=p.min_tokens,
                    stop_token_ids=p.stop_token_ids,
                    handle=inbox,
                )
            )
    return seqs


class EventStream(StreamingResponse):
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
