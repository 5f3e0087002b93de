"""The model runner: the engine's batched passes, prefill of newcomers and one decode step for every slot.

The KV cache is preallocated for max_batch slots x block_size columns, plus one scratch slot that
padded prefill rows write to. A slot is one sequence; its column c holds the key/value of its
token at position c, so each slot has its own length. A decode step feeds one token per slot:
slot b's new key/value go to column pos[b] of row b (not one shared column), and row b attends
to columns 0..pos[b] only (a per-row additive mask built from pos).

The step's state lives in fixed (max_batch,) buffers updated in place (tokens, positions, sampling
settings, token indices; the penalties' (max_batch, V) token counts): the step reads them, samples
the next tokens on the device, writes them back as the next input and advances every row's
position. The host therefore does not have to touch anything between two steps of the same sequences, and one CUDA
graph per (batch bucket, key-length bucket, sampling mode) replays a whole step: the live rows
are padded up to the batch bucket (rows past the last live slot are not computed), the keys are
read up to the length bucket (columns past every live row's length are not read). On CPUs the same
step runs eagerly; it is the same computation.

A prefill pass is padded to a (rows bucket, prompt-length bucket) shape too: prompts right-padded,
rows past the newcomers sent to the scratch slot. So the shapes a server ever runs are known at
start-up, where each is captured once as a CUDA graph (nothing is compiled, loaded or captured
while clients wait), and a prefill computes the logits of each prompt's last position only.
`gpt2 generate` knows its shapes before it starts too, and captures only the decode steps it runs
(capture); its one prefill runs without a graph.

The runner knows tensors and shapes, never requests: which sequence sits in which slot is the
scheduler's business (gpt2.inference.scheduler), and the engine passes between the two.

Shape key: B rows (a batch bucket), L key columns read (a length bucket), S cache columns, T prompt
length (a bucket), V vocab_size, C n_embd, nh heads, hs head size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpt2 import kernels
from gpt2.inference import penalties
from gpt2.inference.sampling import GREEDY, MODES, PENALIZE, sample
from gpt2.inference.state import DecodeState
from gpt2.model import GPT


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from start up to limit, and limit itself: the shapes graphs are captured for."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    """The smallest bucket that holds n."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


class SlotCache:
    """Keys and values of max_batch sequences, one slot each, plus a scratch slot (index max_batch):
    (max_batch + 1, nh, S + 1, hs) per layer, S = block_size. Column S is spare, never read: with it
    (and the scratch slot) no step's slice [:B] or [:L] spans a whole buffer, which torch.compile
    would guard on and compile once more for.

    The model calls update(layer, k, v) and reads mask (the contract: gpt2.attention.Cache). In a
    decode pass k, v are (B, nh, 1, hs) and go to column cols[b] of slot b; the pass attends to the
    first L columns. In a prefill pass k, v are (B, nh, T, hs) for the slots
    in `rows` at columns 0..T-1, and attention runs over the prompt itself.
    """

    def __init__(self, model: GPT, max_batch: int, device: torch.device, dtype: torch.dtype) -> None:
        c = model.config
        shape = (max_batch + 1, c.n_head, c.block_size + 1, c.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        self.scratch = max_batch  # the slot padded prefill rows write to; no sequence reads it
        self.block_size = c.block_size  # S: positions 0..S-1
        self.slot_ids = torch.arange(max_batch + 1, device=device)  # (max_batch + 1,) 0, 1, 2, ...
        self.columns = torch.arange(c.block_size + 1, device=device)  # (S + 1,) 0, 1, 2, ...
        self.zero = torch.zeros((), dtype=dtype, device=device)  # the additive mask's two values
        self.neg_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
        self.rows: Tensor | None = None  # (B,) slots of this pass
        self.cols: Tensor | None = None  # (B,) decode: column of each row's new token
        self.length = 0  # decode: columns read (L); 0 in a prefill pass
        self.mask: Tensor | None = None  # decode (B, 1, 1, L) additive; prefill (1, 1, T, T) bool

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k_all, v_all = self.k[layer], self.v[layer]
        if self.length == 0:  # prefill: store the prompt's keys, attend to them as they are
            T = k.size(2)
            k_all[self.rows, :, :T] = k.to(k_all.dtype)
            v_all[self.rows, :, :T] = v.to(v_all.dtype)
            return k, v
        B = k.size(0)
        k_all[self.rows, :, self.cols] = k[:, :, 0].to(k_all.dtype)  # (B, nh, hs): row b at its column
        v_all[self.rows, :, self.cols] = v[:, :, 0].to(v_all.dtype)
        return k_all[:B, :, : self.length], v_all[:B, :, : self.length]  # (B, nh, L, hs)


def decode_step(model: GPT, cache: SlotCache, state: DecodeState, out: Tensor, B: int, L: int, mode: int) -> Tensor:
    """One token for slots 0..B-1, keys read up to column L: next tokens go to out[:B] and to
    state.token, and every row advances. Rows of no live sequence compute garbage that nothing
    reads (their positions stop at the last column). Returns the logits (B, V)."""
    s = state
    pos = s.pos[:B]
    cache.rows, cache.cols, cache.length = cache.slot_ids[:B], pos, L
    # one mask for every layer, two kernels: 0.0 where column <= pos[b], -inf after
    allowed = cache.columns[None, :L] <= pos[:, None]  # (B, L)
    cache.mask = torch.where(allowed, cache.zero, cache.neg_inf)[:, None, None, :]  # (B, 1, 1, L)
    logits, _ = model(s.token[:B, None], positions=pos[:, None], cache=cache)  # (B, 1, V)
    logits = logits[:, -1, :]  # (B, V)
    nxt = sample(logits, s.settings(B, penalized=bool(mode & PENALIZE)), s.index[:B], mode)
    _advance(s, B, nxt, out, cache.block_size, mode)
    return logits


def fused_decode_step(
    model: GPT, cache: SlotCache, state: DecodeState, out: Tensor, B: int, L: int, mode: int
) -> Tensor:
    """decode_step in gpt2.kernels' fused kernels (CUDA + triton): 5 kernels per layer instead of
    ~14, and a greedy step's end (argmax, next input, positions) in two (after the penalties, in
    PyTorch ops, in a PENALIZE mode). Each row reads its own columns 0..pos[b]; L (a length
    bucket) only chooses whether attention is split over them."""
    from gpt2.kernels.decode import decode_logits
    from gpt2.kernels.ops import greedy_advance

    s = state
    split = kernels.split_attention(B, model.config.n_head, L, s.pos.device)
    logits = decode_logits(model, cache.k, cache.v, s.token[:B], s.pos[:B], split)  # (B, V)
    penalized = bool(mode & PENALIZE)
    if mode & ~PENALIZE == GREEDY:
        z = penalties.penalize(logits, s.settings(B, penalized=True), s.index[:B]) if penalized else logits
        greedy_advance(z, out, s.token, s.pos, s.index, cache.block_size - 1)
        if penalized:
            s.count(s.ids[:B], out[:B])
        return logits
    nxt = sample(logits, s.settings(B, penalized=penalized), s.index[:B], mode)
    _advance(s, B, nxt, out, cache.block_size, mode)
    return logits


def _advance(s: DecodeState, B: int, nxt: Tensor, out: Tensor, block_size: int, mode: int) -> None:
    """After a step: its tokens (B,) to out and to the next input (and, in a PENALIZE mode, to the
    penalties' counts); every row moves one column on."""
    if mode & PENALIZE:
        s.count(s.ids[:B], nxt)
    out[:B].copy_(nxt)
    s.token[:B].copy_(nxt)
    s.pos[:B].add_(1).clamp_(max=block_size - 1)  # a dead row never runs off the positions
    s.index[:B].add_(1)


class BatchDecoder:
    """Prefill and decode passes over one SlotCache; on CUDA each pass shape is one CUDA graph.

    cuda_graph: replay the shapes captured, every decode shape (batch bucket, length bucket, mode
    of gpt2.inference.sampling.MODES) and every prefill shape (rows bucket, prompt bucket, within
    max_prefill_tokens) by capture_all
    at a server's start-up, or the ones a run needs by capture; other shapes run eagerly.
    compile: torch.compile the decode step first (dynamic shapes: two compilations per mode,
    batch 1 and the rest). batch_buckets: the batch sizes decode steps are padded to (default:
    powers of two up to max_batch, as prefills; [max_batch]: every step over all slots, the one
    batch shape of gpt2 generate).
    """

    def __init__(
        self,
        model: GPT,
        max_batch: int,
        *,
        cuda_graph: bool = False,
        compile: bool = False,
        min_length_bucket: int = 64,
        max_prefill_tokens: int = 4096,
        min_prompt_bucket: int = 16,
        fused: bool | None = None,
        batch_buckets: list[int] | None = None,
    ) -> None:
        p = next(model.parameters())
        self.fused = fused = kernels.use_fused(fused, compile, p.device, model.config)
        self.model, self.device, self.dtype = model, p.device, p.dtype
        self.max_batch = max_batch
        self.block_size = model.config.block_size
        self.cache = SlotCache(model, max_batch, self.device, self.dtype)
        self.state = DecodeState(max_batch + 1, self.device, model.config.vocab_size)
        self.out = torch.zeros(max_batch + 1, dtype=torch.long, device=self.device)  # last step's tokens
        self.logits = torch.zeros(max_batch, model.config.vocab_size, dtype=self.dtype, device=self.device)
        self.row_buckets = buckets(max_batch)  # a prefill's rows: only the newcomers
        self.batch_buckets = self.row_buckets if batch_buckets is None else sorted(batch_buckets)  # a decode step's
        if self.batch_buckets[-1] != max_batch:
            raise ValueError(f"the largest batch bucket must be max_batch ({max_batch}), got {self.batch_buckets}")
        if fused:  # short rows, and the rest (where attention may be split over the columns)
            self.length_buckets = sorted({min(kernels.SHORT_ROWS, self.block_size), self.block_size})
        else:
            self.length_buckets = buckets(self.block_size, start=min(min_length_bucket, self.block_size))
        self.prompt_buckets = buckets(self.block_size, start=min(min_prompt_bucket, self.block_size))
        self.max_prefill_tokens = max_prefill_tokens
        # prefill inputs: tokens of the padded (rows, T) batch (flat, so every shape is a contiguous
        # view), each row's slot (scratch for padding) and last prompt column; its logits (rows, V)
        most = max(max_prefill_tokens, self.block_size)
        self.pf_tokens = torch.zeros(most, dtype=torch.long, device=self.device)
        self.pf_slots = torch.full((max_batch,), self.cache.scratch, dtype=torch.long, device=self.device)
        self.pf_last = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.pf_logits = torch.zeros(max_batch, model.config.vocab_size, dtype=self.dtype, device=self.device)
        self.causal: dict[int, Tensor] = {}  # prompt bucket T -> (1, 1, T, T) causal mask, made once
        self.use_graph = cuda_graph
        self.step_fn = (
            fused_decode_step if fused else torch.compile(decode_step, dynamic=True) if compile else decode_step
        )
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None  # the graphs' shared memory pool, made at the first capture

    def shape_for(self, rows: int, length: int) -> tuple[int, int]:
        """(batch bucket, length bucket) for the live slots 0..rows-1 and longest row `length`."""
        return bucket_for(rows, self.batch_buckets), bucket_for(length, self.length_buckets)

    def prefill_shape(self, rows: int, length: int) -> tuple[int, int]:
        """(rows bucket, prompt bucket) of a prefill of `rows` prompts, the longest `length` tokens."""
        return bucket_for(rows, self.row_buckets), bucket_for(length, self.prompt_buckets)

    def prefill_fits(self, rows: int, length: int) -> bool:
        """Whether that padded prefill stays within max_prefill_tokens (one prompt always fits)."""
        R, T = self.prefill_shape(rows, length)
        return rows == 1 or R * T <= self.max_prefill_tokens

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every padded prefill shape prefill_fits admits: the ones captured at start-up."""
        return [
            (R, T) for T in self.prompt_buckets for R in self.row_buckets if R == 1 or R * T <= self.max_prefill_tokens
        ]

    @torch.no_grad()
    def step(self, B: int, L: int, mode: int) -> tuple[Tensor, Tensor]:
        """Run one decode step for bucket shape (B, L); returns views of the tokens (B,) and logits
        (B, V) that the next step overwrites."""
        graph = self.graphs.get((B, L, mode))
        if graph is None:
            return self.out[:B], self._run(B, L, mode)
        graph.replay()
        return self.out[:B], self.logits[:B]

    def _run(self, B: int, L: int, mode: int) -> Tensor:
        return self.step_fn(self.model, self.cache, self.state, self.out, B, L, mode)

    @torch.no_grad()
    def prefill(self, slots: list[int], prompts: list[list[int]], hidden: bool = False) -> tuple[Tensor, Tensor | None]:
        """Run the prompts (right-padded to a prefill shape) into their slots. Returns the logits
        (n, V) that predict each prompt's next token and, with hidden=True, the hidden states
        (n, T, C) of every position (row i's prediction after its token t is logits(hidden[i, t])).
        The logits are a view the next prefill overwrites."""
        n = len(prompts)
        R, T = self.prefill_shape(n, max(len(p) for p in prompts))
        if R * T > self.pf_tokens.numel():
            raise ValueError(f"a prefill of {n} prompts padded to {R} x {T} exceeds max_prefill_tokens")
        tokens = torch.zeros((R, T), dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        rows = torch.full((R,), self.cache.scratch, dtype=torch.long)
        rows[:n] = torch.tensor(slots, dtype=torch.long)
        last = torch.zeros(R, dtype=torch.long)
        last[:n] = torch.tensor([len(p) - 1 for p in prompts])
        for buf, value in (
            (self.pf_tokens[: R * T], tokens.view(-1)),
            (self.pf_slots[:R], rows),
            (self.pf_last[:R], last),
        ):
            buf.copy_(_staged(value, self.device), non_blocking=True)
        graph = None if hidden else self.prefill_graphs.get((R, T))
        if graph is not None:
            graph.replay()
            return self.pf_logits[:n], None
        h = self._prefill_hidden(R, T)  # (R, T, C)
        logits = self.logits_of(h[self.cache.slot_ids[:R], self.pf_last[:R]])  # (R, V)
        return logits[:n], (h[:n] if hidden else None)

    def logits_of(self, hidden: Tensor) -> Tensor:
        """The LM head: hidden states (..., C) -> logits (..., V)."""
        return self.model.lm_head(hidden)

    def _prefill_hidden(self, R: int, T: int) -> Tensor:
        """The model over the staged prefill inputs of shape (R, T): hidden states (R, T, C)."""
        c = self.cache
        c.rows, c.cols, c.length = self.pf_slots[:R], None, 0
        if T not in self.causal:
            self.causal[T] = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()[None, None]
        # right padding sits after every real token, so causal attention keeps it out of real rows
        c.mask = self.causal[T]  # (1, 1, T, T)
        return self.model.hidden_states(self.pf_tokens[: R * T].view(R, T), cache=c)

    def capture_all(self) -> int:
        """Capture every decode and prefill shape as a CUDA graph (no-op without cuda_graph);
        returns how many."""
        decode = [(B, L, mode) for B in self.batch_buckets for L in self.length_buckets for mode in MODES]
        return self.capture(decode, self.prefill_shapes())

    @torch.no_grad()
    def capture(self, decode: list[tuple[int, int, int]], prefill: list[tuple[int, int]] = ()) -> int:
        """Capture these decode shapes (B, L, mode) and prefill shapes (R, T) as CUDA graphs, those
        not captured yet (no-op without cuda_graph); returns how many graphs there are. All graphs
        share one memory pool: they never run at once and keep nothing between replays but the
        persistent buffers. Captures before any sequence is admitted (the warm-up runs write to
        the cache)."""
        if not self.use_graph:
            return 0
        saved = {k: v.clone() for k, v in vars(self.state).items()}
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        for B, L, mode in decode:
            if (B, L, mode) not in self.graphs:
                self._capture(B, L, mode, self.pool)
        for R, T in prefill:
            if (R, T) not in self.prefill_graphs:
                self._capture_prefill(R, T, self.pool)
        for k, v in saved.items():  # the warm-up runs advanced the buffers: put them back
            getattr(self.state, k).copy_(v)
        return len(self.graphs) + len(self.prefill_graphs)

    def _capture(self, B: int, L: int, mode: int, pool) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: compilation, cuBLAS workspaces
            self._run(B, L, mode)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.logits[:B].copy_(self._run(B, L, mode))
        self.graphs[(B, L, mode)] = graph

    def _capture_prefill(self, R: int, T: int, pool) -> None:
        """The prefill of shape (R, T) as a graph; captured with every row on the scratch slot."""
        self.pf_slots.fill_(self.cache.scratch)

        def run() -> Tensor:
            h = self._prefill_hidden(R, T)
            return self.logits_of(h[self.cache.slot_ids[:R], self.pf_last[:R]])  # (R, V)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.pf_logits[:R].copy_(run())
        self.prefill_graphs[(R, T)] = graph


def _staged(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor ready for a non-blocking copy to device (pinned on CUDA)."""
    return t.pin_memory() if device.type == "cuda" else t
