"""Continuous batching's bookkeeping: the queue, the cache slots, cancellation and the outputs.

Sequences wait in a bounded FIFO. At every step boundary the engine asks the scheduler for the
cancelled sequences (their slots are freed), for newcomers (waiting sequences that get a free
slot, FIFO, within the runner's prefill budget), for the sequences that want a decode step and the
shape that step must cover, and hands it each pass's token ids, which become Outputs: new tokens,
and a finish reason on a sequence's last one. A finished sequence frees its slot at once; the next
waiting one takes it at the next boundary, so a long sequence never holds up a short one.

The scheduler knows sequences and token ids, never tensors or the model: gpt2.inference.engine
does the tensor work around it (prefill, sampling, the decode step, copies to the host), so the
policy here is tested without a model (tests/test_scheduler.py).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TopLogprobs = list[tuple[int, float]]  # (token id, log p), most likely first
Logprob = tuple[float, TopLogprobs]  # log p of a token, and the most likely alternatives


@dataclass
class Sequence:
    """One sequence to generate: a prompt and its settings. The engine never changes these fields."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float = 0.0  # drop tokens below min_p x the most likely one's probability (sampled rows)
    seed: int = 0  # with the token index, the only input of the sampling noise
    logprobs: int | None = None  # report log p of each new token and this many alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo)
    stop_at_eos: bool = True
    # penalties (gpt2.inference.penalties; the defaults change nothing)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # x how often it was generated, subtracted
    repetition_penalty: float = 1.0  # HF / CTRL's, over prompt and generated tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    min_tokens: int = 0  # end of text and stop_token_ids are not drawn before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # these end the sequence too, and are part of its tokens
    handle: Any = None  # the caller's; passed back in every Output


@dataclass(slots=True)
class Output:
    """New tokens of one sequence since the last Output; finish_reason set on its last one."""

    request: Sequence  # the submitted sequence (named `request` in the serving API it came from)
    tokens: list[int]
    logprobs: list[Logprob] | None = None  # per token in `tokens`
    prompt_logprobs: list[Logprob] | None = None  # prompt tokens 1.., first Output only
    finish_reason: str | None = None  # "stop" (end of text, a stop token id), "length", "cancelled", "error"
    error: str | None = None


class QueueFull(Exception):
    """The waiting queue cannot take the sequences now (HTTP 429)."""


@dataclass(eq=False)
class Running:
    """A submitted sequence's progress (waiting until it has a slot)."""

    request: Sequence
    id: int
    mode: int  # the cheapest decode-step mode for its sampling settings
    slot: int = -1
    launched: int = 0  # tokens whose computation has been launched
    received: int = 0  # tokens handed to the caller
    done: bool = False

    @property
    def next_column(self) -> int:
        """Cache column (= position) of the token the next decode step feeds."""
        return len(self.request.prompt) + self.launched - 1

    @property
    def wants_step(self) -> bool:
        return not self.done and self.launched < self.request.max_tokens


def stop_kind(r: Sequence, token: int, eos_id: int) -> str | None:
    """How `token` ends sequence r: "eos" (end of text: not one of its tokens), "id" (another of its
    stop_token_ids: one of its tokens, as vLLM returns stop tokens that are not special), or None."""
    if token == eos_id and (r.stop_at_eos or token in r.stop_token_ids):
        return "eos"
    return "id" if token in r.stop_token_ids else None


def union(modes) -> int:
    """The decode-step mode that serves every one of these modes (they are bit flags)."""
    out = 0
    for m in modes:
        out |= m
    return out


class Scheduler:
    """Queue, slots and outputs of continuous batching over max_batch cache slots.

    submit and cancel may be called from any thread; everything else from the engine's thread.
    `changed` is notified whenever there is new work; the engine thread waits on it when idle.
    mode_of gives a sequence's decode-step mode (gpt2.inference.sampling's bit flags); a decode step
    runs in the union (bitwise or) of its rows' modes. batch_invariant: one newcomer per prefill,
    every decode step over all max_batch rows (results then never depend on the batch).
    """

    def __init__(
        self,
        max_batch: int,
        *,
        eos_id: int,
        mode_of: Callable[[Sequence], int],
        max_queue: int = 1024,
        batch_invariant: bool = False,
    ) -> None:
        self.max_batch, self.eos_id, self.mode_of = max_batch, eos_id, mode_of
        self.max_queue, self.batch_invariant = max_queue, batch_invariant
        self.changed = threading.Condition()  # guards _waiting and _cancel
        self._waiting: deque[Running] = deque()
        self._cancel: set[int] = set()
        self.live: dict[int, Running] = {}  # slot -> sequence
        self._free = list(range(max_batch))  # a heap: the lowest free slot first
        self._ids = itertools.count()

    # --- any thread ----------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> list[int]:
        """Queue the sequences (all or none); returns their ids for cancel(). Raises QueueFull."""
        with self.changed:
            if len(seqs) > self.max_queue:
                raise ValueError(f"{len(seqs)} sequences in one request; this server queues at most {self.max_queue}")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._waiting)} sequences waiting); retry later")
            running = [Running(s, next(self._ids), self.mode_of(s)) for s in seqs]
            self._waiting.extend(running)
            self.changed.notify()
        return [r.id for r in running]

    def cancel(self, ids: list[int]) -> None:
        """Stop these sequences at the next step boundary and free their slots (unknown ids: no-op)."""
        with self.changed:
            self._cancel.update(ids)
            self.changed.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        """Something waiting, running or to cancel."""
        return bool(self._waiting or self.live or self._cancel)

    # --- the engine thread ---------------------------------------------------------------------

    def take_cancelled(self) -> list[Output]:
        """Drop the cancelled sequences, waiting or running; their final Outputs."""
        outputs: list[Output] = []
        with self.changed:
            cancel, self._cancel = self._cancel, set()
            if cancel:
                outputs += [Output(s.request, [], finish_reason="cancelled") for s in self._waiting if s.id in cancel]
                self._waiting = deque(s for s in self._waiting if s.id not in cancel)
        for seq in list(self.live.values()):
            if seq.id in cancel:
                self._finish(seq, Output(seq.request, [], finish_reason="cancelled"), outputs)
        return outputs

    def admit(self, fits: Callable[[int, int], bool]) -> list[Running]:
        """Waiting sequences that get a slot now, FIFO, as long as fits(rows, longest prompt) says
        the prefill of all of them fits its budget (one always does); they are live from here on,
        each with one token launched (its first comes from the prefill)."""
        taken: list[Running] = []
        longest = 0
        with self.changed:
            while self._waiting and self._free:
                n = max(longest, len(self._waiting[0].request.prompt))
                if taken and (self.batch_invariant or not fits(len(taken) + 1, n)):
                    break
                seq = self._waiting.popleft()
                seq.slot = heapq.heappop(self._free)
                taken.append(seq)
                longest = n
        for seq in taken:
            self.live[seq.slot] = seq
            seq.launched = min(1, seq.request.max_tokens)
        return taken

    def stepping(self) -> list[Running]:
        """The live sequences that want a decode step."""
        return [s for s in self.live.values() if s.wants_step]

    def step_extent(self, stepping: list[Running]) -> tuple[int, int, int]:
        """(rows, columns, mode) a decode step for these sequences must cover: slots 0..rows-1,
        cache columns 0..columns-1, the union of their sampling modes."""
        rows = self.max_batch if self.batch_invariant else max(s.slot for s in stepping) + 1
        return rows, max(s.next_column for s in stepping) + 1, union(s.mode for s in stepping)

    def launched(self, stepping: list[Running]) -> None:
        """A decode step for these sequences is on its way."""
        for s in stepping:
            s.launched += 1

    def receive(
        self,
        seqs: list[tuple[int, Running]],
        tokens: list[int],
        logprobs: dict[int, list[Logprob]],
        prompt_logprobs: dict[int, list[Logprob]],
        first: bool = False,
    ) -> list[Output]:
        """A pass's results: token ids by row of the pass, and per row (of sequences that asked)
        the new token's logprobs and, for a prefill pass (first), the prompt's. The Outputs they
        make; sequences that stop (end of text, a stop token id, max_tokens) are finished and free
        their slots. End of text is never part of the tokens; another stop token id is (vLLM's
        rule: stop tokens are returned unless they are special). A sequence that stopped earlier
        gets nothing (on CUDA it runs one step more than it needs)."""
        outputs: list[Output] = []
        for row, seq in seqs:
            if seq.done:
                continue
            r = seq.request
            out = Output(r, [])
            if first and r.prompt_logprobs is not None:
                out.prompt_logprobs = prompt_logprobs.get(row, [])
            if r.max_tokens == 0:
                self._finish(seq, out, outputs, "length")
                continue
            token = tokens[row]
            seq.received += 1
            stop = stop_kind(r, token, self.eos_id)
            if stop == "eos":
                self._finish(seq, out, outputs, "stop")
                continue
            out.tokens.append(token)
            if r.logprobs is not None:
                out.logprobs = logprobs[row]
            if stop is not None:
                self._finish(seq, out, outputs, "stop")
            elif seq.received == r.max_tokens:
                self._finish(seq, out, outputs, "length")
            else:
                outputs.append(out)
        return outputs

    def fail_all(self, message: str) -> list[Output]:
        """Finish every running sequence with an error (a pass failed); their final Outputs."""
        outputs: list[Output] = []
        for seq in list(self.live.values()):
            self._finish(seq, Output(seq.request, [], error=message), outputs, "error")
        return outputs

    def _finish(self, seq: Running, out: Output, outputs: list[Output], reason: str | None = None) -> None:
        seq.done = True
        if reason is not None:
            out.finish_reason = reason
        outputs.append(out)
        if self.live.get(seq.slot) is seq:
            del self.live[seq.slot]
            heapq.heappush(self._free, seq.slot)
