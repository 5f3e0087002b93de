"""The engine: one thread owns the model and the cache and runs continuous batching for every
way of generating fast (gpt2 serve's HTTP server, in its thread or its own process, and gpt2
generate in process).

Sequences wait in the scheduler's bounded FIFO (gpt2.inference.scheduler: queue, slots,
cancellation, outputs; no tensors). At every step boundary the engine (1) drops cancelled
sequences, (2) admits waiting ones into free cache slots, prefilling them together in one pass
(capped at the runner's max_prefill_tokens, padded shape included, so a burst of long prompts is
spread over several steps instead of stalling the running streams), (3) launches one decode step
for every live slot and (4) hands the tokens of the previous step to the caller. The tensor work
(prefill, sampling the first tokens, writing the newcomers' settings into the runner's buffers,
the decode step, the copies to the host) is this module's; the passes themselves are the model
runner's (gpt2.inference.runner).

On CUDA, steps are pipelined: the decode step samples on the device and feeds its tokens straight
into the next step, so the engine launches step n+1 before it reads step n's tokens back (one
asynchronous copy into a reused pinned buffer each). The host's work for step n (stop checks,
delivery) then overlaps the device's work for step n+1; a sequence that stopped at step n runs
once more, and that token is dropped. On a CPU nothing runs asynchronously, so each pass's tokens
are delivered as soon as it has run (a newcomer's first token does not wait for the next step).

Everything the caller sees goes through `on_outputs(list[Output])`, called from the engine thread
once per step; the HTTP layer hands that list over to its event loop.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from gpt2.inference import penalties
from gpt2.inference.runner import BatchDecoder
from gpt2.inference.sampling import PENALIZE, encode_settings, logprob_list, mode_of, sample, top_logprobs
from gpt2.inference.scheduler import Output, QueueFull, Running, Scheduler, Sequence, union
from gpt2.inference.state import to_device, to_host

__all__ = ["STEP_BUCKETS_S", "Engine", "EngineClient", "Output", "QueueFull", "Sequence"]

# Upper bounds (seconds) of the step-boundary duration histogram that /metrics shows.
STEP_BUCKETS_S = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class EngineClient(Protocol):
    """What the HTTP layer drives: the Engine in a thread of this process, or
    gpt2.serve.process.EngineProcess, the same engine in a process of its own."""

    def submit(self, requests: list[Sequence]) -> list[int]:
        """Queue the sequences (all or none); their ids. Raises QueueFull, or ValueError for too many."""
        ...

    def cancel(self, ids: list[int]) -> None:
        """Stop these sequences at the next step boundary (unknown ids: no-op)."""
        ...

    @property
    def max_queue(self) -> int:
        """The most sequences one request may have (more is a ValueError, not a QueueFull)."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters for /health and /metrics."""
        ...

    def health(self, stall_timeout: float) -> str | None:
        """None while the engine runs and steps; else why not (/health's 503 reason)."""
        ...

    def start(self) -> None:
        """Start delivering outputs to the on_outputs callback."""
        ...

    def stop(self) -> None: ...


@dataclass
class _Pending:
    """A launched pass whose tokens are on their way to the host."""

    seqs: list[tuple[int, Running]]  # (row in the pass's output, sequence)
    tokens: Tensor  # (n,) long, a view of one of the engine's (pinned) host buffers
    logprobs: tuple[Tensor, Tensor, Tensor] | None  # chosen (n,), top values (n, K), top ids (n, K)
    prompt_logprobs: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # per row
    event: torch.cuda.Event | None = None
    first: bool = False  # a prefill pass: prompt logprobs go with its tokens


class Engine:
    """Continuous batching over a BatchDecoder (the model runner); start() runs it in its own
    thread, or a caller steps it itself with iterate() (gpt2 generate, tests)."""

    def __init__(
        self,
        decoder: BatchDecoder,
        on_outputs: Callable[[list[Output]], None],
        *,
        eos_id: int,
        max_queue: int = 1024,
        batch_invariant: bool = False,
    ) -> None:
        self.decoder, self.on_outputs, self.eos_id = decoder, on_outputs, eos_id
        self.vocab_size = V = decoder.model.config.vocab_size
        self.device = decoder.device
        self.scheduler = Scheduler(
            decoder.max_batch,
            eos_id=eos_id,
            mode_of=lambda s: mode_of(s, V),
            max_queue=max_queue,
            batch_invariant=batch_invariant,
        )
        self._pending: deque[_Pending] = deque()
        self._dirty: set[int] = set()  # slots whose penalty buffers a penalized sequence left non-neutral
        # Passes in flight are few (a decode step, a prefill, the next decode step): their tokens come
        # back into a ring of host buffers (pinned on CUDA) and their events are reused, so a step
        # allocates nothing.
        self.asynchronous = self.device.type == "cuda"
        pinned = dict(dtype=torch.long, pin_memory=self.asynchronous)
        self._host = [torch.zeros(decoder.max_batch, **pinned) for _ in range(_RING)]
        self._events = [torch.cuda.Event() for _ in range(_RING)] if self.asynchronous else [None] * _RING
        self._ring = itertools.cycle(range(_RING))
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps launched
        self.tokens = 0  # tokens delivered
        self.busy_s = 0.0  # seconds the engine thread spent in step boundaries (waits included)
        self.wait_s = 0.0  # of which waiting for the device: busy - wait is the host's own work
        self.step_counts = [0] * (len(STEP_BUCKETS_S) + 1)  # step boundaries per duration bucket (metrics)
        self._beat: float | None = None  # when the running step boundary began; None while idle (health)

    # --- called from other threads -------------------------------------------------------------

    def submit(self, requests: list[Sequence]) -> list[int]:
        """Queue the sequences (all or none); returns their ids for cancel(). Raises QueueFull, or
        ValueError for settings that make no sense (a token id outside the vocabulary, ...)."""
        for s in requests:
            penalties.check(s, self.vocab_size)
        return self.scheduler.submit(requests)

    def cancel(self, ids: list[int]) -> None:
        """Stop these sequences at the next step boundary and free their slots (unknown ids: no-op)."""
        self.scheduler.cancel(ids)

    @property
    def max_queue(self) -> int:
        """The most sequences one request may have (the scheduler's queue bound)."""
        return self.scheduler.max_queue

    def stats(self) -> dict[str, float]:
        """Counts for /health and /metrics; on CUDA also the peak memory allocated (GiB)."""
        sched = self.scheduler
        out = {"running": len(sched.live), "waiting": sched.waiting, "steps": self.steps, "tokens": self.tokens}
        out["engine_busy_s"], out["engine_wait_s"] = round(self.busy_s, 4), round(self.wait_s, 4)
        out["slots"], out["step_counts"] = self.decoder.max_batch, list(self.step_counts)
        beat = self._beat
        out["stalled_s"] = 0.0 if beat is None else round(time.perf_counter() - beat, 3)
        out["alive"] = self._stop or self._thread is None or self._thread.is_alive()
        if self.device.type == "cuda":
            out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return out

    def health(self, stall_timeout: float) -> str | None:
        """None while the engine thread runs and no step boundary has taken stall_timeout seconds;
        else why not (/health's 503 reason)."""
        stats = self.stats()
        if not stats["alive"]:
            return "the engine thread has stopped"
        if stats["stalled_s"] > stall_timeout:
            return f"the engine is wedged: one step boundary has run for {stats['stalled_s']:.0f} s"
        return None

    @property
    def idle(self) -> bool:
        """Nothing waiting, running or in flight."""
        return not (self.scheduler.has_work or self._pending)

    def sync(self) -> None:
        """Wait for the device (timing, warm-up)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gpt2-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.scheduler.changed:
            self._stop = True
            self.scheduler.changed.notify()
        if self._thread is not None:
            self._thread.join()

    # --- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        changed = self.scheduler.changed
        while True:
            with changed:
                while not (self._stop or not self.idle):
                    self._beat = None  # waiting for work is not being stuck
                    changed.wait()
                if self._stop:
                    return
            t0 = self._beat = time.perf_counter()
            try:
                self.iterate()
            except Exception as e:  # a failed pass: fail what is running, keep serving
                self._fail_all(f"{type(e).__name__}: {e}")
            dt = time.perf_counter() - t0
            self.busy_s += dt
            self.step_counts[bisect.bisect_left(STEP_BUCKETS_S, dt)] += 1

    def iterate(self) -> None:
        """One step boundary: cancels, admissions (prefill), one decode step, deliveries."""
        outputs = self.scheduler.take_cancelled()
        with torch.no_grad():
            self._admit()
            if not self.asynchronous:  # the prefill has run: its first tokens go out before the step runs
                self._collect_older(outputs, keep=0)
                self._deliver(outputs)
                outputs = []
            launched = self._launch_decode()
        # On CUDA keep one pass in flight: read back everything older than the pass just launched.
        self._collect_older(outputs, keep=1 if launched and self.asynchronous else 0)
        self._deliver(outputs)

    def _collect_older(self, outputs: list[Output], keep: int) -> None:
        """Collect the passes in flight, oldest first, until `keep` are left."""
        while len(self._pending) > keep:
            self._collect(self._pending.popleft(), outputs)

    def _deliver(self, outputs: list[Output]) -> None:
        if outputs:
            self.tokens += sum(len(o.tokens) for o in outputs)
            self.on_outputs(outputs)

    def _admit(self) -> None:
        """Prefill newcomers into their slots; their first tokens come back as a pending pass.
        They are live once admitted: a failing pass below fails them too (none is left hanging)."""
        d = self.decoder
        seqs = self.scheduler.admit(d.prefill_fits)
        if not seqs:
            return
        reqs = [s.request for s in seqs]
        echo = [i for i, r in enumerate(reqs) if r.prompt_logprobs is not None and len(r.prompt) > 1]
        last, hidden = d.prefill([s.slot for s in seqs], [r.prompt for r in reqs], hidden=bool(echo))  # (n, V)
        slots = to_device(torch.tensor([s.slot for s in seqs]), self.device)
        mode = union(s.mode for s in seqs)
        d.state.write(slots, **encode_settings(reqs, self.vocab_size))
        self._start_penalties(seqs)
        index = torch.zeros(len(seqs), dtype=torch.long, device=self.device)
        tokens = sample(last, d.state.settings(slots, penalized=bool(mode & PENALIZE)), index, mode)  # (n,)
        if mode & PENALIZE:
            d.state.count(slots, tokens)
        d.state.write(slots, token=tokens, pos=torch.tensor([len(r.prompt) for r in reqs]))
        d.state.index.index_fill_(0, slots, 1)
        pending = self._pending_for(list(enumerate(seqs)), tokens, last, first=True)
        for i in echo:  # the prompt's own log-probabilities: logits at every position but the last
            r = reqs[i]
            target = to_device(torch.tensor(r.prompt[1:]), self.device)
            logits = d.logits_of(hidden[i, : len(r.prompt) - 1])  # (P - 1, V)
            pending.prompt_logprobs[i] = to_host(top_logprobs(logits, target, max(1, r.prompt_logprobs)))
        self._record(pending)

    def _start_penalties(self, seqs: list[Running]) -> None:
        """Penalized newcomers get their tables, counts and prompt tokens; a newcomer without
        penalties only needs neutral buffers, so only a slot a penalized sequence has left is
        cleared for it (a server that sees no penalties does none of this)."""
        new = [s for s in seqs if s.mode & PENALIZE or s.slot in self._dirty]
        if not new:
            return
        reqs, slots = [s.request for s in new], [s.slot for s in new]
        table = penalties.encode_table(reqs, self.eos_id, self.vocab_size)
        prompt = penalties.prompt_entries(reqs, slots)
        self.decoder.state.start_penalties(to_device(torch.tensor(slots), self.device), table, prompt)
        self._dirty.difference_update(slots)
        self._dirty.update(s.slot for s in new if s.mode & PENALIZE)

    def _launch_decode(self) -> bool:
        """One decode step for every live slot that wants a token; False when none does."""
        stepping = self.scheduler.stepping()
        if not stepping:
            return False
        rows, columns, mode = self.scheduler.step_extent(stepping)
        B, L = self.decoder.shape_for(rows, columns)
        tokens, logits = self.decoder.step(B, L, mode)
        self._record(self._pending_for([(s.slot, s) for s in stepping], tokens, logits))
        self.scheduler.launched(stepping)
        self.steps += 1
        return True

    def _pending_for(
        self, seqs: list[tuple[int, Running]], tokens: Tensor, logits: Tensor, first: bool = False
    ) -> _Pending:
        """Start copying a pass's tokens (and, when asked for, log-probabilities) to the host."""
        want = [s.request.logprobs for _, s in seqs if s.request.logprobs is not None]
        logprobs = to_host(top_logprobs(logits, tokens, max(1, *want))) if want else None
        if len(self._pending) >= _RING - 1:  # the ring would overwrite a pass not read yet: a bug, not a load
            raise RuntimeError(f"{len(self._pending)} passes in flight; the host buffer ring holds {_RING}")
        i = next(self._ring)
        host = self._host[i][: tokens.size(0)]
        host.copy_(tokens, non_blocking=self.asynchronous)
        return _Pending(seqs, host, logprobs, event=self._events[i], first=first)

    def _record(self, pending: _Pending) -> None:
        if pending.event is not None:
            pending.event.record()
        self._pending.append(pending)

    def _collect(self, p: _Pending, outputs: list[Output]) -> None:
        """Wait for a pass and hand its tokens (and logprobs, as lists) to the scheduler."""
        if p.event is not None:
            t0 = time.perf_counter()
            p.event.synchronize()
            self.wait_s += time.perf_counter() - t0
        tokens = p.tokens.tolist()
        live = [(row, s.request) for row, s in p.seqs if not s.done]
        logprobs = {
            row: logprob_list(p.logprobs, r.logprobs, [tokens[row]], rows=[row])
            for row, r in live
            if r.logprobs is not None
        }
        prompt_logprobs = {
            row: logprob_list(p.prompt_logprobs.get(row), r.prompt_logprobs, r.prompt[1:])
            for row, r in live
            if p.first and r.prompt_logprobs is not None
        }
        outputs += self.scheduler.receive(p.seqs, tokens, logprobs, prompt_logprobs, p.first)

    def _fail_all(self, message: str) -> None:
        self._pending.clear()
        self.on_outputs(self.scheduler.fail_all(message))


_RING = 8  # host buffers / events for passes in flight (at most 3 at once)
