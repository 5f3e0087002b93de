"""The event-loop side of `gpt2 serve` without HTTP: the engine-to-loop bridge wakes the loop once
for any number of steps, a Mailbox hands over everything at once, the per-token fast paths (token
table, plain events) give exactly what the general path gives, and the process settings."""

from __future__ import annotations

import asyncio
import gc
import sys
from types import SimpleNamespace

import pytest

from gpt2.inference import Output, Sequence
from gpt2.serve.protocol import CompletionParams
from gpt2.serve.stream import Completion, Mailbox
from gpt2.serve.text import ChoiceText, token_table
from gpt2.tokenizer import Tokenizer

pytest.importorskip("starlette")

from gpt2.serve.app import Service  # noqa: E402


class _Loop:
    """Records call_soon_threadsafe instead of running it."""

    def __init__(self) -> None:
        self.calls = []

    def call_soon_threadsafe(self, fn, *args) -> None:
        self.calls.append((fn, args))


def test_the_loop_is_woken_once_for_steps_that_arrive_before_it_drains():
    service = Service(SimpleNamespace(), "m", 64, 512)
    service.loop = _Loop()
    boxes = [Mailbox(), Mailbox()]
    reqs = [Sequence([1], 4, handle=b) for b in boxes]
    for step in range(3):  # three engine steps while the loop is busy elsewhere
        service.on_outputs([Output(r, [10 + step]) for r in reqs])
    assert len(service.loop.calls) == 1
    fn, args = service.loop.calls[0]
    fn(*args)
    assert [o.tokens for o in boxes[0].items] == [[10], [11], [12]]
    service.on_outputs([Output(reqs[0], [13])])  # after the drain: a new wake-up
    assert len(service.loop.calls) == 2


def test_a_mailbox_hands_over_everything_that_arrived_in_one_take():
    async def scenario():
        box = Mailbox()
        taker = asyncio.create_task(box.take())
        await asyncio.sleep(0)  # waiting now
        box.put("a")
        box.put("b")
        first = await taker
        box.put("c")
        return first, await box.take()

    assert asyncio.run(scenario()) == (["a", "b"], ["c"])


def test_token_table_text_equals_incremental_decoding():
    tok, table = Tokenizer(), token_table(50257)
    assert table.text[tok.encode("hello")[0]] == "hello" and table.json[tok.encode('"')[0]] == '"\\""'
    ids = tok.encode("naïve café — 日本語 emoji 🤖 done") + [50256]
    split = [t for t in range(50257) if table.text[t] is None][:5]  # tokens that are parts of characters
    for stream in (ids, split + ids, ids[:3] + split[:1] + ids[3:]):
        fast = ChoiceText(table)
        text = "".join(fast.add([t]) for t in stream) + fast.finish()
        assert text == tok.decode_bytes(stream).decode("utf-8", errors="replace") == fast.text
    assert token_table(50304).bytes[50300] == b""  # a padded vocabulary's extra ids have no text


def _completion(stop=(), logprobs=None, echo=False):
    params = CompletionParams(model="m", prompts=[[40]], max_tokens=8, stream=True, stop=stop)
    params.logprobs, params.echo = logprobs, echo
    from gpt2.serve.metrics import ServingMetrics

    service = SimpleNamespace(
        tok=Tokenizer(),
        table=token_table(50257),
        engine=SimpleNamespace(cancel=lambda ids: 0),
        metrics=ServingMetrics("m", dict, lambda: True),
    )
    seq = Sequence([40], 8, handle=Mailbox())
    return Completion(service, params, [seq], [0], seq.handle, "cmpl-x"), seq


def test_plain_stream_events_are_the_general_paths_events():
    tok = Tokenizer()
    tokens = tok.encode("Hi — 日本 ok") + [t for t in range(50257) if token_table(50257).text[t] is None][:2]
    plain, seq = _completion()
    general, seq2 = _completion()
    general._plain = False
    assert plain._plain
    a = [e for t in tokens for e in plain._apply(Output(seq, [t]), stream=True)]
    b = [e for t in tokens for e in general._apply(Output(seq2, [t]), stream=True)]
    assert a == b and len(a) == len(tokens)
    end = Output(seq, [], finish_reason="length")
    assert plain._apply(end, stream=True) == general._apply(Output(seq2, [], finish_reason="length"), stream=True)


def test_serve_process_settings():
    from gpt2.commands.serve import SWITCH_INTERVAL_S, tune_process

    before = sys.getswitchinterval()
    try:
        tune_process()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S) and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        sys.setswitchinterval(before)
