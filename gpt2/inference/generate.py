"""Generating in process on the engine: what `gpt2 generate` runs.

The prompts (each `num_samples` times) go to an Engine that the caller's thread steps until every
sequence is done: the same scheduler, model runner, fused decode kernels and sampler as gpt2
serve, so the same prompt, settings and seed give the same tokens as a server request (greedy:
the tokens of gpt2.generation's reference too; tested on a CPU). Sample j of prompt i is choice
i * num_samples + j of a seeded request (gpt2.inference.sampling.choice_seed).

Only the shapes this run can reach are captured as CUDA graphs, before it starts: every decode
step runs over all its sequences (one batch shape, finished rows ride along), in the length
buckets its columns pass through, in the sampling mode of its settings. Its one prefill runs
without a graph. Past the model's context, where the cache ends, the sequences that go on
continue with gpt2.generation's sliding window (each token predicted from the last block_size
tokens, re-encoded at positions 0..block_size-1), sampled with the same per-row sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from gpt2.inference import penalties
from gpt2.inference.engine import Engine
from gpt2.inference.runner import BatchDecoder, bucket_for
from gpt2.inference.sampling import PENALIZE, choice_seed, encode_settings, mode_of, sample
from gpt2.inference.scheduler import Output, Sequence, stop_kind, union
from gpt2.inference.state import DecodeState
from gpt2.model import GPT


@dataclass
class Generation:
    """New tokens per sequence (sample j of prompt i at i * num_samples + j), why each ended
    ("stop": end of text, "length") and what the run took."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    fused: bool = False  # the decode step ran in gpt2.kernels' fused kernels
    graphs: int = 0  # CUDA graphs captured
    capture_s: float = 0.0  # seconds capturing them (their warm-up steps included)
    decode_s: float = 0.0  # seconds from the first tokens delivered to the last

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after each sequence's first (which the prefill makes) per second of decoding."""
        later = sum(max(0, len(t) - 1) for t in self.tokens)
        return later / self.decode_s if later and self.decode_s > 0 else None


def sequences(
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    **settings,
) -> list[Sequence]:
    """The engine sequences of a generation (checked; vocabulary ids are the engine's to check):
    num_samples per prompt, each its own seed. settings: Sequence's other sampling fields (min_p,
    presence_penalty, frequency_penalty, repetition_penalty, logit_bias, min_tokens, stop_token_ids)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty prompt can be '<|endoftext|>')")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples} and {max_new_tokens}")
    settings |= dict(temperature=temperature, top_k=top_k, top_p=top_p, stop_at_eos=stop_at_eos)
    seqs = [
        Sequence(p, max_new_tokens, seed=choice_seed(seed, i * num_samples + j), **settings)
        for i, p in enumerate(prompts)
        for j in range(num_samples)
    ]
    penalties.check(seqs[0])  # the settings are every sequence's; the engine checks the token ids
    return seqs


@torch.no_grad()
def run(
    model: GPT,
    seqs: list[Sequence],
    *,
    eos_id: int,
    cuda_graph: bool | None = None,
    fused: bool | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
) -> Generation:
    """Run the sequences (see `sequences`) on an engine over `model` (eval mode) until all are
    done. on_tokens(index in seqs, new tokens) streams them as they come.
    cuda_graph (default: on CUDA) and fused (default: where the kernels run) as gpt2 serve's."""
    block = model.config.block_size
    for s in seqs:
        if len(s.prompt) > block:
            raise ValueError(
                f"prompt has {len(s.prompt)} tokens but the model's context is {block}; shorten the prompt"
            )
    device = next(model.parameters()).device
    graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    n = len(seqs)
    decoder = BatchDecoder(model, n, cuda_graph=graph, fused=fused, batch_buckets=[n])
    # the cache ends at the context: a sequence gets what fits there (the last token predicted from
    # block_size tokens), and the sliding window the rest
    engine_seqs = [_within_context(s, block) for s in seqs]
    index = {id(s): i for i, s in enumerate(engine_seqs)}
    t0 = time.perf_counter()
    graphs = decoder.capture(_decode_shapes(decoder, engine_seqs))
    if graph:
        torch.cuda.synchronize(device)
    out = Generation([[] for _ in seqs], [""] * n, decoder.fused, graphs, capture_s=time.perf_counter() - t0)
    clock: list[float] = []

    def on_outputs(outputs: list[Output]) -> None:
        for o in outputs:
            i = index[id(o.request)]
            if o.tokens:
                clock.append(time.perf_counter())
                out.tokens[i] += o.tokens
                if on_tokens is not None:
                    on_tokens(i, o.tokens)
            if o.error is not None:
                raise RuntimeError(o.error)
            if o.finish_reason is not None:
                out.finish_reasons[i] = o.finish_reason

    engine = Engine(decoder, on_outputs, eos_id=eos_id, max_queue=n)
    engine.submit(engine_seqs)
    while not engine.idle:
        engine.iterate()
    _slide(model, seqs, out, eos_id, on_tokens, clock)
    out.decode_s = clock[-1] - clock[0] if clock else 0.0
    return out


def _within_context(s: Sequence, block_size: int) -> Sequence:
    """A copy of s (its own object, even where one is passed twice) with max_tokens cut to what the
    cache holds: tokens fed at columns up to block_size - 1."""
    return replace(s, max_tokens=min(s.max_tokens, block_size - len(s.prompt) + 1))


def _decode_shapes(decoder: BatchDecoder, seqs: list[Sequence]) -> list[tuple[int, int, int]]:
    """The decode shapes (B, L, mode) the engine will run for these sequences, all admitted at once:
    every step over all of them; columns from the shortest prompt's first step to the longest
    sequence's last; one sampling mode (the highest among them)."""
    stepped = [s for s in seqs if s.max_tokens >= 2]  # the first token comes from the prefill
    if not stepped:
        return []
    V = decoder.model.config.vocab_size
    mode = union(mode_of(s, V) for s in seqs)
    B = decoder.shape_for(len(seqs), 1)[0]
    first = bucket_for(min(len(s.prompt) for s in stepped) + 1, decoder.length_buckets)
    last = bucket_for(max(len(s.prompt) + s.max_tokens - 1 for s in stepped), decoder.length_buckets)
    return [(B, L, mode) for L in decoder.length_buckets if first <= L <= last]


def _slide(
    model: GPT,
    seqs: list[Sequence],
    out: Generation,
    eos_id: int,
    on_tokens: Callable[[int, list[int]], None] | None,
    clock: list[float],
) -> None:
    """Continue the sequences the context cut short (finish "length" before max_tokens) one token
    per step, each from its last block_size tokens, sampled as the engine samples (seed, index,
    penalties over the whole prompt and everything generated)."""
    block = model.config.block_size
    device = next(model.parameters()).device
    rows = [i for i, s in enumerate(seqs) if out.finish_reasons[i] == "length" and len(out.tokens[i]) < s.max_tokens]
    if not rows:
        return
    state, mode = _slide_state(model, [seqs[i] for i in rows], [out.tokens[i] for i in rows], eos_id)
    row_of = {i: r for r, i in enumerate(rows)}  # sequence -> its row of state
    while rows:
        window = torch.tensor([(seqs[i].prompt + out.tokens[i])[-block:] for i in rows], device=device)  # (R, block)
        logits = model.lm_head(model.hidden_states(window)[:, -1])  # (R, V)
        active = torch.tensor([row_of[i] for i in rows], device=device)
        index = torch.tensor([len(out.tokens[i]) for i in rows], device=device)
        nxt = sample(logits, state.settings(active, penalized=bool(mode & PENALIZE)), index, mode)
        if mode & PENALIZE:
            state.count(active, nxt)
        going = []
        for i, token in zip(rows, nxt.tolist()):
            stop = stop_kind(seqs[i], token, eos_id)
            if stop != "eos":
                out.tokens[i].append(token)
                clock.append(time.perf_counter())
                if on_tokens is not None:
                    on_tokens(i, [token])
            if stop is not None:
                out.finish_reasons[i] = "stop"
            elif len(out.tokens[i]) < seqs[i].max_tokens:
                going.append(i)
        rows = going


def _slide_state(model: GPT, seqs: list[Sequence], generated: list[list[int]], eos_id: int) -> tuple[DecodeState, int]:
    """Per-row sampling state of sequences (row r: seqs[r]) that have generated these tokens, as
    the engine's buffers hold it; and the sampling mode that serves them all."""
    V = model.config.vocab_size
    device = next(model.parameters()).device
    R = len(seqs)
    state, ids = DecodeState(R, device, V), torch.arange(R, device=device)
    state.write(ids, **encode_settings(seqs, V))
    mode = union(mode_of(s, V) for s in seqs)
    if mode & PENALIZE:
        table = penalties.encode_table(seqs, eos_id, V)
        state.start_penalties(ids, table, penalties.prompt_entries(seqs, list(range(R))))
        for j in range(max(len(g) for g in generated)):  # the tokens so far, in order
            have = [r for r, g in enumerate(generated) if j < len(g)]
            state.count(torch.tensor(have, device=device), torch.tensor([generated[r][j] for r in have], device=device))
    return state, mode
