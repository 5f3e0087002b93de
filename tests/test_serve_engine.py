"""The serving engine on a CPU with the tiny model: continuous batching gives each request what it
gets alone, slots are reused, sampling noise ignores the batch, echo logprobs equal the project's
own scoring."""

from __future__ import annotations

import pytest
import torch

from gpt2 import GPT, GPTConfig
from gpt2.evaluation import score_continuations
from gpt2.generation import filter_logits, generate_batch
from gpt2.inference.engine import Engine, QueueFull
from gpt2.inference.runner import BatchDecoder, buckets
from gpt2.inference.sampling import FILTER, SAMPLE, filter_rows, sample_rows, uniforms
from gpt2.inference.scheduler import Sequence

VOCAB = 512


@pytest.fixture(scope="module")
def model(make_tiny) -> GPT:
    """The tiny shape with a 512-token vocabulary (sampling over 50,257 ids is what costs on a CPU)."""
    return make_tiny(vocab_size=VOCAB)


def make_engine(model, max_batch=32, **kwargs):
    outputs = []
    engine = Engine(BatchDecoder(model, max_batch, min_length_bucket=16), outputs.extend, eos_id=VOCAB - 1, **kwargs)
    return engine, outputs


def run(model, requests, max_batch=32, **kwargs):
    """Submit all requests at once, step until idle; new tokens (and logprobs) per request."""
    engine, outputs = make_engine(model, max_batch, **kwargs)
    engine.submit(requests)
    while not engine.idle:
        engine.iterate()
    tokens = {id(r): [] for r in requests}
    logprobs = {id(r): [] for r in requests}
    finish = {}
    for o in outputs:
        tokens[id(o.request)] += o.tokens
        logprobs[id(o.request)] += o.logprobs or []
        if o.finish_reason:
            finish[id(o.request)] = o.finish_reason
    return [tokens[id(r)] for r in requests], [logprobs[id(r)] for r in requests], [finish[id(r)] for r in requests]


def prompts(n, seed=0, max_len=20):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lengths]


# Penalties every other request has (i % 4): none, OpenAI's and vLLM's penalties, logit_bias and min_p.
PENALTIES = [{}, dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2), {}]
PENALTIES.append(dict(logit_bias={7: 3.0, 11: -5.0}, min_p=0.05, repetition_penalty=0.9))


def mixed_requests(n, seed=0):
    """Greedy, plain sampling and filtered sampling, with and without penalties, different lengths
    and budgets."""
    out = []
    for i, p in enumerate(prompts(n, seed)):
        kind = i % 3
        out.append(
            Sequence(
                p,
                max_tokens=8 + (i * 7) % 30,
                temperature=[0.0, 1.0, 0.8][kind],
                top_k=[None, None, 50][kind],
                top_p=[None, None, 0.9][kind],
                seed=1000 + i,
                logprobs=2,
                stop_at_eos=False,
                **PENALTIES[i % 4],
            )
        )
    return out


def test_greedy_equals_plain_generation(model):
    ps = prompts(4, seed=3)
    (tokens, _, finish) = run(model, [Sequence(p, 12, stop_at_eos=False) for p in ps])
    ref = generate_batch(model, ps, 12, pad_id=0, temperature=0.0)
    assert tokens == ref
    assert finish == ["length"] * 4


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_alone_equals_among_31_others(model, batch_invariant):
    requests = mixed_requests(32)
    together, lp_together, _ = run(model, requests, batch_invariant=batch_invariant)
    for i in (0, 1, 2, 3, 9, 17, 31):  # greedy, sampled, filtered; with penalties (1, 3, 9, 17, 31) ...
        alone, lp_alone, _ = run(model, [requests[i]], batch_invariant=batch_invariant)
        assert alone[0] == together[i], f"request {i} changed with the batch"
        a = torch.tensor([lp for lp, _ in lp_alone[0]])
        t = torch.tensor([lp for lp, _ in lp_together[i]])
        if batch_invariant:  # bit for bit
            assert torch.equal(a, t)
        else:  # MKL's sgemm rounds a 1-row product differently from a 32-row one (~1e-7)
            torch.testing.assert_close(a, t, rtol=0, atol=1e-5)


def test_more_requests_than_slots_all_finish_with_their_own_tokens(model):
    requests = mixed_requests(20, seed=5)
    few_slots, _, finish = run(model, requests, max_batch=4)
    many_slots, _, _ = run(model, requests, max_batch=32, batch_invariant=False)
    assert few_slots == many_slots
    assert [len(t) for t in few_slots] == [r.max_tokens for r in requests]
    assert set(finish) == {"length"}


def test_cancel_frees_the_slot_and_later_requests_run(model):
    engine, outputs = make_engine(model, max_batch=2)
    ids = engine.submit([Sequence([1, 2, 3], 50, stop_at_eos=False), Sequence([4], 50, stop_at_eos=False)])
    for _ in range(3):
        engine.iterate()
    assert engine.stats()["running"] == 2
    engine.cancel(ids[:1])
    engine.iterate()
    assert engine.stats()["running"] == 1
    later = Sequence([5, 6], 4, stop_at_eos=False)
    engine.submit([later])
    while not engine.idle:
        engine.iterate()
    reasons = {id(o.request): o.finish_reason for o in outputs if o.finish_reason}
    assert reasons[id(later)] == "length" and "cancelled" in reasons.values()
    assert sum(len(o.tokens) for o in outputs if o.request is later) == 4


def test_queue_bound(model):
    engine, _ = make_engine(model, max_batch=1, max_queue=2)
    engine.submit([Sequence([1], 4), Sequence([2], 4)])
    with pytest.raises(QueueFull):
        engine.submit([Sequence([3], 4)])
    with pytest.raises(ValueError, match="at most 2"):
        engine.submit([Sequence([3], 4)] * 3)


def test_echo_logprobs_equal_continuation_scores(model):
    context, continuation = [464, 313, 286], [204, 318, 257, 132]
    engine, outputs = make_engine(model)
    engine.submit([Sequence(context + continuation, 0, prompt_logprobs=1)])
    while not engine.idle:
        engine.iterate()
    (out,) = outputs
    assert out.finish_reason == "length" and out.tokens == []
    lps = [lp for lp, _ in out.prompt_logprobs]  # log p of prompt tokens 1..
    scores = score_continuations(model, [(context, continuation)], rows_per_batch=1, pad_id=0)
    ours = sum(lps[len(context) - 1 :])
    assert ours == pytest.approx(scores.logprob[0].item(), abs=1e-4)
    greedy = all(top[0][0] == tok for (_, top), tok in zip(out.prompt_logprobs[len(context) - 1 :], continuation))
    assert greedy == bool(scores.greedy[0])


def test_filter_rows_is_filter_logits_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    settings = [(None, None), (5, None), (None, 0.5), (10, 0.8), (1, None), (100, 0.999)]
    top_k = torch.tensor([100 if k is None else k for k, _ in settings])
    top_p = torch.tensor([1.0 if p is None else p for _, p in settings])
    out = filter_rows(logits, top_k, top_p)
    for i, (k, p) in enumerate(settings):
        assert torch.equal(out[i], filter_logits(logits[i : i + 1], k, p)[0])


def test_random_numbers_depend_only_on_seed_and_index():
    seeds, index = torch.tensor([7, 8, 2**62 + 5, 7]), torch.tensor([0, 3, 9, 1])
    u = uniforms(seeds, index)
    for i in range(4):
        assert torch.equal(uniforms(seeds[i : i + 1], index[i : i + 1]), u[i : i + 1])
    assert len(set(u.tolist())) == 4 and ((u > 0) & (u < 1)).all()


def test_unfiltered_rows_draw_the_same_in_both_modes():
    torch.manual_seed(0)
    logits, n = torch.randn(64, 300), 64
    args = (torch.full((n,), 0.9), torch.full((n,), 300), torch.ones(n), torch.arange(n), torch.arange(n))
    assert torch.equal(sample_rows(logits, *args, SAMPLE), sample_rows(logits, *args, FILTER))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 20000
    logits = probs.log().expand(n, 4)
    ones = torch.ones(n)
    draws = sample_rows(logits, ones, torch.full((n,), 4), ones, torch.full((n,), 42), torch.arange(n), FILTER)
    freq = torch.bincount(draws, minlength=4).float() / n
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_buckets():
    assert buckets(32) == [1, 2, 4, 8, 16, 32]
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert buckets(1024, start=64) == [64, 128, 256, 512, 1024]


def test_hidden_states_are_what_the_lm_head_turns_into_logits(model):
    idx = torch.randint(0, VOCAB, (2, 7))
    logits, _ = model(idx)
    torch.testing.assert_close(model.lm_head(model.hidden_states(idx)), logits, rtol=0, atol=0)


def test_padded_prefill_gives_each_prompts_last_logits_and_spares_other_slots(model):
    dec = BatchDecoder(model, 8, min_length_bucket=16, max_prefill_tokens=64)
    assert dec.prefill_shape(3, 5) == (4, 16) and dec.prefill_fits(4, 16) and not dec.prefill_fits(8, 16)
    assert all(R == 1 or R * T <= 64 for R, T in dec.prefill_shapes()) and (1, 64) in dec.prefill_shapes()
    untouched = [k[5].clone() for k in dec.cache.k]
    ps = prompts(3, seed=4, max_len=15)
    last, hidden = dec.prefill([0, 2, 7], ps, hidden=True)  # padded to 4 rows: the fourth goes to the scratch slot
    for i, p in enumerate(ps):
        ref, _ = model(torch.tensor([p]))  # (1, T, V) alone, unpadded
        torch.testing.assert_close(last[i], ref[0, -1], rtol=0, atol=1e-5)
        torch.testing.assert_close(dec.logits_of(hidden[i, : len(p)]), ref[0], rtol=0, atol=1e-5)
    assert all(torch.equal(k[5], u) for k, u in zip(dec.cache.k, untouched))  # slot 5 is no newcomer's


def test_admission_budget_counts_the_padded_shape(model):
    engine, _ = make_engine(model, max_batch=8)
    engine.decoder.max_prefill_tokens = 64  # rows bucket x prompt bucket <= 64
    engine.submit([Sequence(p, 2) for p in ([1] * 20, [2] * 3, [3] * 3, [4] * 3)])
    fits = engine.decoder.prefill_fits
    taken = engine.scheduler.admit(fits)
    assert len(taken) == 2  # 2 rows x 32 columns fit; 3 rows pad to 4 x 32 = 128
    assert len(engine.scheduler.admit(fits)) == 2


def test_on_a_cpu_a_newcomers_first_token_goes_out_before_the_next_step(model):
    engine, outputs = make_engine(model)
    step = engine.decoder.step
    seen_at_step = []
    engine.decoder.step = lambda *a: (seen_at_step.append(sum(len(o.tokens) for o in outputs)), step(*a))[1]
    engine.submit([Sequence([1, 2, 3], 5, stop_at_eos=False)])
    engine.iterate()
    assert seen_at_step == [1]  # the prefill's token was delivered when the decode step ran
    assert sum(len(o.tokens) for o in outputs) == 2  # and the step's own token right after it


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@requires_cuda
@pytest.mark.gpu
def test_graphs_are_all_captured_at_start_up_and_equal_eager_on_gpu():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", vocab_size=VOCAB)).cuda().eval()
    requests = mixed_requests(12)
    results = []
    for graph in (False, True):
        dec = BatchDecoder(model, 8, cuda_graph=graph, min_length_bucket=16, max_prefill_tokens=256)
        n = dec.capture_all()
        outputs = []
        engine = Engine(dec, outputs.extend, eos_id=VOCAB - 1)
        engine.submit(requests)
        while not engine.idle:
            engine.iterate()
        assert len(dec.graphs) + len(dec.prefill_graphs) == n  # nothing captured while serving
        tokens = {id(r): [] for r in requests}
        for o in outputs:
            tokens[id(o.request)] += o.tokens
        results.append([tokens[id(r)] for r in requests])
    assert results[0] == results[1]


def test_the_pipelined_order_cuda_uses_gives_the_same_answers(model):
    """On CUDA a pass's tokens are read one step later; run that order on the CPU (no events)."""
    requests = mixed_requests(20, seed=7) + [Sequence([5], 0, prompt_logprobs=1)]
    sync = run(model, requests, max_batch=8)
    engine, outputs = make_engine(model, max_batch=8)
    engine.asynchronous = True
    engine.submit(requests)
    while not engine.idle:
        engine.iterate()
        assert len(engine._pending) <= 1  # one pass in flight between boundaries
    tokens = {id(r): [] for r in requests}
    for o in outputs:
        tokens[id(o.request)] += o.tokens
    assert [tokens[id(r)] for r in requests] == sync[0]


def test_no_step_slice_spans_a_whole_buffer(model):
    """torch.compile guards on a slice that covers its whole buffer and compiles again for it: the
    scratch slot and the spare column keep [:B] and [:L] short of every buffer's end."""
    dec = BatchDecoder(model, 8, min_length_bucket=16)
    assert all(
        B < dec.state.pos.numel() and B < dec.out.numel() and B < dec.cache.k[0].size(0) for B in dec.batch_buckets
    )
    assert all(L < dec.cache.k[0].size(2) and L < dec.cache.columns.numel() for L in dec.length_buckets)
