"""One /v1/completions answer being built from engine outputs: JSON at the end, or SSE events.

Choices are numbered prompt-major (prompt i, sample j -> index i * n + j), as OpenAI does. The
response shapes are a few methods (`_chunk`, `_choice_json`, `_logprobs`, ...) that
gpt2.serve.chat's ChatCompletion replaces with /v1/chat/completions' shapes; the bookkeeping (text,
stop strings, finish reasons, cancelling, latency metrics) is shared.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gpt2.inference.scheduler import Output, Sequence
from gpt2.serve.protocol import APIError, CompletionParams
from gpt2.serve.text import ChoiceText, logprobs_block

DONE = "data: [DONE]\n\n"
_TOKEN_EVENT_END = ', "logprobs": null, "finish_reason": null}]}\n\n'  # after the text of a per-token event


class Mailbox:
    """One request's engine outputs, filled on the event loop: the handler takes everything that
    arrived since it last looked in one go (a client that fell behind gets several tokens at once)."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[Output] = []
        self.waiter: asyncio.Future | None = None

    def put(self, out: Output) -> None:
        self.items.append(out)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[Output]:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        self.waiter = None
        items, self.items = self.items, []
        return items


@dataclass(eq=False)
class _Choice:
    index: int
    seq_id: int
    prompt: list[int]
    prompt_text: str
    text: ChoiceText
    tokens: list[int] = field(default_factory=list)
    entries: list = field(default_factory=list)  # per token: (log p, [(id, log p)]) or None
    prompt_entries: list | None = None
    finish_reason: str | None = None
    echoed: bool = False
    event_start: str = ""  # a per-token event up to its text
    last: float | None = None  # when its latest token reached the event loop (latency metrics)


class Completion:
    """The choices of one request; `collect()` for a JSON answer, `events()` for a stream."""

    OBJECT, CHUNK_OBJECT = "text_completion", "text_completion"  # the JSON answer's and the chunks' "object"
    TOKEN_EVENT_END = _TOKEN_EVENT_END

    def __init__(
        self,
        service,
        params: CompletionParams,
        seqs: list[Sequence],
        ids: list[int],
        inbox,
        cid: str,
        arrival: float | None = None,
    ):
        self.service, self.p, self.inbox, self.id = service, params, inbox, cid
        self.metrics = service.metrics
        self.arrival = time.perf_counter() if arrival is None else arrival  # perf_counter seconds
        self._now = self.arrival  # when the outputs being applied reached the loop
        self.created = int(time.time())
        tok, table = service.tok, service.table
        self.choices = {
            id(s): _Choice(i, sid, s.prompt, tok.decode(s.prompt), ChoiceText(table, params.stop, params.min_tokens))
            for i, (s, sid) in enumerate(zip(seqs, ids))
        }
        self.open = len(self.choices)
        self.error: str | None = None
        self.closed = False
        head = {"id": cid, "object": self.CHUNK_OBJECT, "created": self.created, "model": params.model}
        self._head = json.dumps(head)[:-1] + ', "choices": ['  # every chunk's constant start
        for c in self.choices.values():
            c.event_start = self._event_start(c)
        # the common stream: per token only the text changes, and the table has it as JSON
        self._plain = params.stream and not params.echo and params.logprobs is None and not params.stop
        self.metrics.prompt_tokens(sum(len(s.prompt) for s in seqs))

    def _event_start(self, c: _Choice) -> str:
        return f'data: {self._head}{{"index": {c.index}, "text": '

    def close(self) -> None:
        """Stop whatever is still generating (client gone, or the answer is complete); once."""
        if self.closed:
            return
        self.closed = True
        running = [c for c in self.choices.values() if c.finish_reason is None]
        if running:
            self.service.engine.cancel([c.seq_id for c in running])
            self.metrics.finished("abort", len(running))
        self.metrics.request_done(time.perf_counter() - self.arrival)

    async def collect(self) -> dict:
        while self.open:
            outputs = await self.inbox.take()
            self._now = time.perf_counter()
            for out in outputs:
                self._apply(out, stream=False)
        if self.error:
            return {"error": self.error}
        choices = [self._choice_json(c) for c in sorted(self.choices.values(), key=lambda c: c.index)]
        return {
            "id": self.id,
            "object": self.OBJECT,
            "created": self.created,
            "model": self.p.model,
            "choices": choices,
            "usage": self._usage(),
        }

    async def events(self) -> AsyncIterator[str]:
        opening = self._opening()
        if opening:
            yield opening
        while self.open:
            chunks = []
            outputs = await self.inbox.take()  # all that arrived: one write
            self._now = time.perf_counter()
            for out in outputs:
                chunks += self._apply(out, stream=True)
            if chunks:
                yield "".join(chunks)
        tail = []
        if self.error:
            error = APIError(500, self.error, code="internal_error")
            tail.append(f"data: {json.dumps(error.body())}\n\n")
        elif self.p.include_usage:
            tail.append(f'data: {self._head}], "usage": {json.dumps(self._usage())}}}\n\n')
        yield "".join(tail) + DONE

    def _opening(self) -> str:
        """Events before the first token (the chat stream's role chunks)."""
        return ""

    def _tick(self, c: _Choice) -> None:
        """Latency metrics of a choice's new token(s): time to the first, or the gap since the last."""
        if c.last is None:
            self.metrics.first_token(self._now - self.arrival)
        else:
            self.metrics.inter_token(self._now - c.last)
        c.last = self._now

    def _apply(self, out: Output, stream: bool) -> list[str]:
        """Take one engine output into its choice; the SSE events it makes (when streaming)."""
        c = self.choices[id(out.request)]
        if c.finish_reason is not None:
            return []  # e.g. tokens that were on their way when a stop string ended the choice
        if out.tokens:
            self._tick(c)
        if self._plain:
            events = self._plain_events(c, out.tokens)
            if out.finish_reason is not None:
                events += self._finish_output(c, out, stream)
            return events
        events = []
        if out.prompt_logprobs is not None:
            c.prompt_entries = out.prompt_logprobs
        if stream and self.p.echo and not c.echoed:
            c.echoed = True
            events.append(self._chunk(c, c.prompt_text, self._echo_logprobs(c)))
        for i, token in enumerate(out.tokens):
            offset = len(c.prompt_text) + len(c.text.text)
            piece = c.text.add([token])
            entry = out.logprobs[i] if out.logprobs else None
            c.tokens.append(token)
            c.entries.append(entry)
            if stream:
                lp = self._logprobs([token], [entry], offset) if self.want_lp else None
                events.append(self._chunk(c, piece, lp))
            if c.text.stopped:
                self.service.engine.cancel([c.seq_id])
                return events + self._finish(c, "stop", stream)
        if out.finish_reason is not None:
            events += self._finish_output(c, out, stream)
        return events

    def _plain_events(self, c: _Choice, tokens: list[int]) -> list[str]:
        """Per-token events of a stream without echo, logprobs or stop strings."""
        texts, jsons, events = self.service.table.text, self.service.table.json, []
        for token in tokens:
            piece = c.text.add([token])
            text = jsons[token] if piece is texts[token] else json.dumps(piece)
            events.append(f"{c.event_start}{text}{self.TOKEN_EVENT_END}")
        c.tokens += tokens
        return events

    def _finish_output(self, c: _Choice, out: Output, stream: bool) -> list[str]:
        if out.error:
            self.error = out.error
        reason = {"cancelled": "stop", "error": "error"}.get(out.finish_reason, out.finish_reason)
        return self._finish(c, reason, stream)

    @property
    def want_lp(self) -> bool:
        return self.p.logprobs is not None

    def _finish(self, c: _Choice, reason: str, stream: bool) -> list[str]:
        c.finish_reason = reason
        self.open -= 1
        self.metrics.finished(reason)
        rest = c.text.finish()
        return [self._chunk(c, rest, None, reason)] if stream else []

    def _chunk(self, c: _Choice, text: str, logprobs: dict | None, finish: str | None = None) -> str:
        if logprobs is None and finish is None:  # the per-token event: only the text needs encoding
            return f"{c.event_start}{json.dumps(text)}{self.TOKEN_EVENT_END}"
        choice = {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return f"data: {self._head}{json.dumps(choice)}]}}\n\n"

    def _logprobs(self, tokens: list[int], entries: list, offset: int) -> dict:
        return logprobs_block(self.service.tok, tokens, entries, self.p.logprobs, offset)

    def _echo_logprobs(self, c: _Choice) -> dict | None:
        if not self.want_lp:
            return None
        return self._logprobs(c.prompt, [None, *(c.prompt_entries or [])], 0)

    def _choice_json(self, c: _Choice) -> dict:
        prompt_text = c.prompt_text if self.p.echo else ""
        logprobs = None
        if self.want_lp:
            tokens, entries = c.tokens, c.entries
            if self.p.echo:
                tokens, entries = c.prompt + tokens, [None, *(c.prompt_entries or []), *entries]
            logprobs = self._logprobs(tokens, entries, 0 if self.p.echo else len(c.prompt_text))
        return {
            "index": c.index,
            "text": prompt_text + c.text.text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }

    def _usage(self) -> dict:
        prompt = sum(len(p) for p in self.p.prompts)
        completion = sum(len(c.tokens) for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
