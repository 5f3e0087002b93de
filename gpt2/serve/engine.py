"""The serving engine: one thread owns the model and the cache and runs continuous batching.

Requests wait in a bounded FIFO. At every step boundary the engine (1) drops cancelled sequences,
(2) admits waiting ones into free cache slots, prefilling them together in one pass (capped at the
decoder's max_prefill_tokens, padded shape included, so a burst of long prompts is spread over
several steps instead of stalling the running streams), (3) launches one decode step for every
live slot and (4) hands the tokens of the previous step to the caller. A finished sequence frees
its slot at once; the next waiting one takes it at the next boundary, so a long request never
holds up a short one.

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
import heapq
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gpt2.serve.batch import BatchDecoder, to_device, to_host
from gpt2.serve.sampling import TopLogprobs, logprob_list, mode_of, sample_rows, top_logprobs


@dataclass
class Request:
    """One sequence to generate. The engine reads these fields and never changes them."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0  # with the token index, the only input of the sampling noise
    logprobs: int | None = None  # report log p of each new token and this many alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo)
    stop_at_eos: bool = True
    handle: Any = None  # the caller's; passed back in every Output


@dataclass(slots=True)
class Output:
    """New tokens of one sequence since the last Output; finish_reason set on its last one."""

    request: Request
    tokens: list[int]
    logprobs: list[tuple[float, TopLogprobs]] | None = None  # per token in `tokens`
    prompt_logprobs: list[tuple[float, TopLogprobs]] | None = None  # prompt tokens 1.., first Output only
    finish_reason: str | None = None  # "stop" (end of text), "length", "cancelled", "error"
    error: str | None = None


class QueueFull(Exception):
    """The waiting queue cannot take the request now (HTTP 429)."""


@dataclass(eq=False)
class _Seq:
    request: Request
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


@dataclass
class _Pending:
    """A launched pass whose tokens are on their way to the host."""

    seqs: list[tuple[int, _Seq]]  # (row in the pass's output, sequence)
    tokens: Tensor  # (n,) long, a view of one of the engine's (pinned) host buffers
    logprobs: tuple[Tensor, Tensor, Tensor] | None  # chosen (n,), top values (n, K), top ids (n, K)
    prompt_logprobs: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # per row
    event: torch.cuda.Event | None = None
    first: bool = False  # a prefill pass: prompt logprobs go with its tokens


class Engine:
    """Continuous batching over a BatchDecoder; start() runs it in its own thread."""

    def __init__(
        self,
        decoder: BatchDecoder,
        on_outputs,
        *,
        eos_id: int,
        max_queue: int = 1024,
        batch_invariant: bool = False,
    ) -> None:
        self.decoder, self.on_outputs, self.eos_id = decoder, on_outputs, eos_id
        self.max_queue = max_queue
        self.batch_invariant = batch_invariant
        self.vocab_size = decoder.model.config.vocab_size
        self.device = decoder.device
        self._lock = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._cancel: set[int] = set()
        self._live: dict[int, _Seq] = {}  # slot -> sequence
        self._free = list(range(decoder.max_batch))  # a heap: the lowest free slot first
        self._ids = itertools.count()
        self._pending: deque[_Pending] = deque()
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

    def submit(self, requests: list[Request]) -> list[int]:
        """Queue the requests (all or none); returns their ids for cancel(). Raises QueueFull."""
        with self._lock:
            if len(requests) > self.max_queue:
                raise ValueError(
                    f"{len(requests)} sequences in one request; this server queues at most {self.max_queue}"
                )
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._waiting)} sequences waiting); retry later")
            V = self.vocab_size
            seqs = [_Seq(r, next(self._ids), mode_of(r.temperature, r.top_k, r.top_p, V)) for r in requests]
            self._waiting.extend(seqs)
            self._lock.notify()
        return [s.id for s in seqs]

    def cancel(self, ids: list[int]) -> None:
        """Stop these sequences at the next step boundary and free their slots (unknown ids: no-op)."""
        with self._lock:
            self._cancel.update(ids)
            self._lock.notify()

    def stats(self) -> dict[str, float]:
        """Counts for /health and /metrics; on CUDA also the peak memory allocated (GiB)."""
        out = {"running": len(self._live), "waiting": len(self._waiting), "steps": self.steps, "tokens": self.tokens}
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
        return not (self._waiting or self._live or self._pending or self._cancel)

    def sync(self) -> None:
        """Wait for the device (timing, warm-up)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gpt2-serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    # --- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or not self.idle):
                    self._beat = None  # waiting for work is not being stuck
                    self._lock.wait()
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
        outputs: list[Output] = []
        self._apply_cancels(outputs)
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

    def _apply_cancels(self, outputs: list[Output]) -> None:
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            if cancel:
                kept = [s for s in self._waiting if s.id not in cancel]
                for s in self._waiting:
                    if s.id in cancel:
                        outputs.append(Output(s.request, [], finish_reason="cancelled"))
                self._waiting = deque(kept)
        for seq in list(self._live.values()):
            if seq.id in cancel:
                self._finish(seq, Output(seq.request, [], finish_reason="cancelled"), outputs)

    def _take_newcomers(self) -> list[_Seq]:
        """Waiting sequences that get a slot now, FIFO, within the prefill token budget."""
        taken, longest = [], 0
        with self._lock:
            while self._waiting and self._free:
                n = max(longest, len(self._waiting[0].request.prompt))
                if taken and (self.batch_invariant or not self.decoder.prefill_fits(len(taken) + 1, n)):
                    break
                seq = self._waiting.popleft()
                seq.slot = heapq.heappop(self._free)
                taken.append(seq)
                longest = n
        return taken

    def _admit(self) -> None:
        """Prefill newcomers into their slots; their first tokens come back as a pending pass."""
        seqs = self._take_newcomers()
        if not seqs:
            return
        for s in seqs:  # live from here on: a failing pass below fails them too (no request is left hanging)
            self._live[s.slot] = s
        d = self.decoder
        reqs = [s.request for s in seqs]
        echo = [i for i, r in enumerate(reqs) if r.prompt_logprobs is not None and len(r.prompt) > 1]
        last, hidden = d.prefill([s.slot for s in seqs], [r.prompt for r in reqs], hidden=bool(echo))  # (n, V)
        slots = to_device(torch.tensor([s.slot for s in seqs]), self.device)
        index = torch.zeros(len(seqs), dtype=torch.long, device=self.device)
        mode = max(s.mode for s in seqs)
        p = {k: to_device(v, self.device) for k, v in self._params(reqs).items()}
        tokens = sample_rows(last, p["temperature"], p["top_k"], p["top_p"], p["seed"], index, mode)  # (n,)
        d.state.write(slots, token=tokens, pos=torch.tensor([len(r.prompt) for r in reqs]), **p)
        d.state.index.index_fill_(0, slots, 1)
        pending = self._pending_for(list(enumerate(seqs)), tokens, last, first=True)
        for i in echo:  # the prompt's own log-probabilities: logits at every position but the last
            r = reqs[i]
            target = to_device(torch.tensor(r.prompt[1:]), self.device)
            logits = d.logits_of(hidden[i, : len(r.prompt) - 1])  # (P - 1, V)
            pending.prompt_logprobs[i] = to_host(top_logprobs(logits, target, max(1, r.prompt_logprobs)))
        self._record(pending)
        for s in seqs:
            s.launched = min(1, s.request.max_tokens)

    def _params(self, reqs: list[Request]) -> dict[str, Tensor]:
        """Per-row sampling settings (host tensors) in DecodeState's encoding."""
        V = self.vocab_size
        return {
            "temperature": torch.tensor([r.temperature for r in reqs], dtype=torch.float32),
            "top_k": torch.tensor([r.top_k if r.top_k is not None else V for r in reqs]),
            "top_p": torch.tensor([r.top_p if r.top_p is not None else 1.0 for r in reqs], dtype=torch.float32),
            "seed": torch.tensor([r.seed for r in reqs]),
        }

    def _launch_decode(self) -> bool:
        """One decode step for every live slot that wants a token; False when none does."""
        stepping = [s for s in self._live.values() if s.wants_step]
        if not stepping:
            return False
        d = self.decoder
        rows = d.max_batch if self.batch_invariant else max(s.slot for s in stepping) + 1
        B, L = d.shape_for(rows, max(s.next_column for s in stepping) + 1)
        mode = max(s.mode for s in stepping)
        tokens, logits = d.step(B, L, mode)
        self._record(self._pending_for([(s.slot, s) for s in stepping], tokens, logits))
        for s in stepping:
            s.launched += 1
        self.steps += 1
        return True

    def _pending_for(
        self, seqs: list[tuple[int, _Seq]], tokens: Tensor, logits: Tensor, first: bool = False
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
        """Hand a finished pass's tokens to their sequences; finish those that stop."""
        if p.event is not None:
            t0 = time.perf_counter()
            p.event.synchronize()
            self.wait_s += time.perf_counter() - t0
        tokens = p.tokens.tolist()
        for row, seq in p.seqs:
            if seq.done:
                continue  # stopped earlier: this was its one extra step
            r = seq.request
            out = Output(r, [])
            if p.first and r.prompt_logprobs is not None:
                out.prompt_logprobs = logprob_list(p.prompt_logprobs.get(row), r.prompt_logprobs, r.prompt[1:])
            if r.max_tokens == 0:
                self._finish(seq, out, outputs, "length")
                continue
            token = tokens[row]
            seq.received += 1
            if token == self.eos_id and r.stop_at_eos:
                self._finish(seq, out, outputs, "stop")
                continue
            out.tokens.append(token)
            if r.logprobs is not None:
                out.logprobs = logprob_list(p.logprobs, r.logprobs, [token], rows=[row])
            if seq.received == r.max_tokens:
                self._finish(seq, out, outputs, "length")
            else:
                outputs.append(out)

    def _finish(self, seq: _Seq, out: Output, outputs: list[Output], reason: str | None = None) -> None:
        seq.done = True
        if reason is not None:
            out.finish_reason = reason
        outputs.append(out)
        if self._live.get(seq.slot) is seq:
            del self._live[seq.slot]
            heapq.heappush(self._free, seq.slot)

    def _fail_all(self, message: str) -> None:
        outputs = []
        self._pending.clear()
        for seq in list(self._live.values()):
            self._finish(seq, Output(seq.request, [], error=message), outputs, "error")
        self.on_outputs(outputs)


_RING = 8  # host buffers / events for passes in flight (at most 3 at once)
# Upper bounds (seconds) of the step-boundary duration histogram that /metrics shows.
STEP_BUCKETS_S = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
