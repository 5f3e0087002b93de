"""Penalties, logit_bias, min_p, min_tokens and stop_token_ids in the engine (CPU, tiny model):
each one's greedy tokens equal gpt2.generation's reference token for token, the batched device
expressions equal the reference's row by row bit for bit, stop tokens and min_tokens behave as
vLLM documents them, and `gpt2 generate` (past the context too) gives the server's tokens. On
CUDA: the fused and the PyTorch step, graphs captured, give the same tokens with penalties."""

from __future__ import annotations

import pytest
import torch

from gpt2 import GPT, GPTConfig, kernels
from gpt2.generation import filter_logits, generate_batch, penalize_logits
from gpt2.inference import Engine, Sequence
from gpt2.inference.generate import run, sequences
from gpt2.inference.penalties import encode_table, penalize, prompt_entries
from gpt2.inference.runner import BatchDecoder
from gpt2.inference.sampling import FILTER, GREEDY, MODES, PENALIZE, SAMPLE, encode_settings, filter_rows, mode_of
from gpt2.inference.state import DecodeState

VOCAB = 512
EOS = VOCAB - 1
PROMPTS = [[5, 6, 7, 5, 5], [100, 200, 30, 40], [42]]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(make_tiny) -> GPT:
    return make_tiny(vocab_size=VOCAB)


@pytest.fixture(scope="module")
def engine(model, engine_tokens):
    """engine(seqs, eos_id): the engine's tokens over a fresh decoder of 4 slots."""
    return lambda seqs, eos_id=EOS: engine_tokens(BatchDecoder(model, 4, min_length_bucket=16), seqs, eos_id=eos_id)


PENALTIES = [
    dict(presence_penalty=1.5),
    dict(presence_penalty=-2.0),
    dict(frequency_penalty=0.7),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),
    dict(logit_bias={3: 50.0, 7: -100.0, 0: 0.5}),
    dict(presence_penalty=-1.0, frequency_penalty=1.0, repetition_penalty=1.3, logit_bias={9: 2.0}),
]


@pytest.mark.parametrize("settings", PENALTIES, ids=[str(i) for i in range(len(PENALTIES))])
def test_greedy_penalties_equal_the_reference_and_change_the_tokens(model, engine, settings):
    ours = engine([Sequence(p, 24, stop_at_eos=False, **settings) for p in PROMPTS])
    reference = generate_batch(model, PROMPTS, 24, pad_id=0, temperature=0.0, **settings)
    assert ours == reference
    assert ours != generate_batch(model, PROMPTS, 24, pad_id=0, temperature=0.0)  # they do something


def test_a_bias_of_100_picks_the_token_and_minus_100_bans_it(engine):
    assert engine([Sequence([1, 2], 6, stop_at_eos=False, logit_bias={77: 100.0})]) == [[77] * 6]
    plain = engine([Sequence([1, 2], 6, stop_at_eos=False)])[0]
    banned = engine([Sequence([1, 2], 6, stop_at_eos=False, logit_bias={t: -100.0 for t in set(plain)})])[0]
    assert not set(banned) & set(plain)


def test_stop_token_ids_end_the_sequence_and_are_part_of_it(model, engine):
    plain = engine([Sequence(p, 20, stop_at_eos=False) for p in PROMPTS])
    stop = plain[0][3]  # a token the first sequence produces early
    ours = engine([Sequence(p, 20, stop_at_eos=False, stop_token_ids=(stop,)) for p in PROMPTS])
    reference = generate_batch(model, PROMPTS, 20, pad_id=0, temperature=0.0, stop_token_ids=(stop,))
    assert ours == reference
    assert ours[0] == plain[0][: plain[0].index(stop) + 1]  # the stop token is the last one returned


def test_min_tokens_holds_off_end_of_text_and_stop_ids(model, engine):
    plain = engine([Sequence(p, 20, stop_at_eos=False) for p in PROMPTS])
    eos, stop = plain[0][2], plain[0][5]  # call an early token the end of text, a later one a stop id
    seqs = [Sequence(p, 20, min_tokens=8, stop_token_ids=(stop,)) for p in PROMPTS]
    ours = engine(seqs, eos_id=eos)
    reference = generate_batch(
        model, PROMPTS, 20, pad_id=0, temperature=0.0, eos_id=eos, stop_token_ids=(stop,), min_tokens=8
    )
    assert ours == [r[:-1] if r[-1] == eos else r for r in reference]  # end of text is not returned
    assert len(ours[0]) >= 8 and eos not in ours[0][:8] and stop not in ours[0][:8]
    first = plain[0].index(eos)
    assert engine([Sequence(PROMPTS[0], 20)], eos_id=eos) == [plain[0][:first]]  # without min_tokens: stops there


def test_min_tokens_with_an_end_of_text_the_model_cannot_draw(engine):
    """The tokenizer's end of text (50256) is outside a small model's vocabulary: nothing to hold off."""
    plain = engine([Sequence(PROMPTS[0], 12, stop_at_eos=False)])
    assert engine([Sequence(PROMPTS[0], 12, min_tokens=4)], eos_id=50256) == plain


def test_end_of_text_as_a_stop_token_id_is_not_returned(engine):
    plain = engine([Sequence(PROMPTS[1], 20, stop_at_eos=False)])[0]
    eos = plain[4]
    ours = engine([Sequence(PROMPTS[1], 20, stop_at_eos=False, stop_token_ids=(eos,))], eos_id=eos)
    assert ours == [plain[: plain.index(eos)]]


def test_penalize_equals_the_reference_row_by_row_bit_for_bit():
    torch.manual_seed(0)
    B, V, P = 5, 300, 7
    logits = torch.randn(B, V) * 4
    prompt = torch.randint(0, V, (B, P))
    generated = torch.randint(0, 40, (B, 12))  # repeats: counts > 1
    rows = [
        dict(),
        dict(presence_penalty=0.5, frequency_penalty=-0.3),
        dict(repetition_penalty=1.7),
        dict(logit_bias={1: 3.0, 299: -50.0}, presence_penalty=2.0, repetition_penalty=0.5),
        dict(frequency_penalty=1.25, min_tokens=20),
    ]
    seqs = [Sequence(prompt[b].tolist(), 20, **s) for b, s in enumerate(rows)]
    state = _state_after(seqs, generated, V)
    index = torch.full((B,), generated.size(1))
    ours = penalize(logits, state.settings(B, penalized=True), index)
    for b, s in enumerate(rows):
        suppress = (EOS % V,) if s.get("min_tokens", 0) > generated.size(1) else ()
        settings = {k: v for k, v in s.items() if k != "min_tokens"}
        ref = penalize_logits(
            logits[b : b + 1], prompt[b : b + 1], torch.ones(1, P, dtype=torch.bool), generated[b : b + 1],
            suppress=suppress, **settings,
        )  # fmt: skip
        assert torch.equal(ours[b], ref[0]), f"row {b}: {s}"
    assert torch.equal(ours[0], logits[0])  # a row without penalties keeps its logits exactly
    assert ours[4, EOS % V] == float("-inf")


def _state_after(seqs, generated, V):
    """A DecodeState whose rows hold the sequences after they generated `generated` (B, n)."""
    B = len(seqs)
    state, ids = DecodeState(B + 1, torch.device("cpu"), V), torch.arange(B)
    state.write(ids, **encode_settings(seqs, V))
    state.start_penalties(ids, encode_table(seqs, EOS % V, V), prompt_entries(seqs, list(range(B))))
    for j in range(generated.size(1)):
        state.count(ids, generated[:, j])
    return state


def test_min_p_filters_as_the_reference_row_by_row():
    torch.manual_seed(1)
    logits = torch.randn(6, 200) * 3
    settings = [
        (None, None, 0.0),
        (None, None, 0.1),
        (10, None, 0.05),
        (None, 0.8, 0.3),
        (50, 0.9, 1.0),
        (1, None, 0.5),
    ]
    top_k = torch.tensor([200 if k is None else k for k, _, _ in settings])
    top_p = torch.tensor([1.0 if p is None else p for _, p, _ in settings])
    min_p = torch.tensor([m for _, _, m in settings])
    out = filter_rows(logits, top_k, top_p, min_p)
    for i, (k, p, m) in enumerate(settings):
        assert torch.equal(out[i], filter_logits(logits[i : i + 1], k, p, m)[0]), i
    kept = (out[1] > float("-inf")).sum()
    probs = torch.softmax(logits[1], -1)
    assert kept == (probs >= 0.1 * probs.max()).sum() and 1 < kept < 200


def test_modes_say_what_rows_need():
    assert len(set(MODES)) == 6 and GREEDY | SAMPLE == SAMPLE and SAMPLE | FILTER == FILTER
    V = 100
    assert mode_of(Sequence([1], 4), V) == GREEDY
    assert mode_of(Sequence([1], 4, temperature=1.0, min_p=0.1), V) == FILTER
    assert mode_of(Sequence([1], 4, repetition_penalty=1.2), V) == GREEDY | PENALIZE
    assert mode_of(Sequence([1], 4, temperature=1.0, logit_bias={3: 1.0}), V) == SAMPLE | PENALIZE
    assert mode_of(Sequence([1], 4, min_tokens=3), V) == GREEDY | PENALIZE  # end of text held off
    assert mode_of(Sequence([1], 4, min_tokens=3, stop_at_eos=False), V) == GREEDY  # nothing to hold off


def test_a_slot_left_by_a_penalized_sequence_is_neutral_for_the_next(model, engine_tokens):
    """One slot: a penalized sequence, then a plain one in the same slot gives its plain tokens."""
    dec = BatchDecoder(model, 1, min_length_bucket=16)
    plain = Sequence(PROMPTS[1], 12, stop_at_eos=False)
    alone = engine_tokens(BatchDecoder(model, 1, min_length_bucket=16), [plain], eos_id=EOS)
    penalized = Sequence(PROMPTS[0], 12, stop_at_eos=False, frequency_penalty=2.0, logit_bias={5: -20.0})
    both = engine_tokens(dec, [penalized, Sequence(PROMPTS[1], 12, stop_at_eos=False)], eos_id=EOS)
    assert both[1] == alone[0]


def test_bad_settings_are_refused_at_submit(model):
    engine = Engine(BatchDecoder(model, 2), lambda outputs: None, eos_id=EOS)
    for bad in (
        dict(logit_bias={VOCAB: 1.0}),
        dict(stop_token_ids=(-1,)),
        dict(presence_penalty=3.0),
        dict(repetition_penalty=0.0),
        dict(min_p=1.5),
        dict(min_tokens=-1),
        dict(logit_bias={i: 1.0 for i in range(301)}),
    ):
        with pytest.raises(ValueError):
            engine.submit([Sequence([1], 4, **bad)])
    assert engine.idle


@pytest.mark.parametrize("n", [20, 80])  # tiny's context is 64: 80 slides past it
def test_generate_with_penalties_equals_the_reference_and_the_server(model, engine, n):
    settings = dict(repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.25)
    seqs = sequences(PROMPTS, n, temperature=0, stop_at_eos=False, **settings)
    ours = run(model, seqs, eos_id=EOS).tokens
    assert ours == generate_batch(model, PROMPTS, n, pad_id=0, temperature=0.0, **settings)
    if n == 20:
        assert ours == engine(seqs)


def test_generate_samples_with_penalties_continue_the_same_stream_past_the_context(model):
    settings = dict(temperature=1.0, min_p=0.02, repetition_penalty=1.2, frequency_penalty=0.5, seed=3)
    short = run(model, sequences(PROMPTS, 40, stop_at_eos=False, **settings), eos_id=EOS).tokens
    long = run(model, sequences(PROMPTS, 70, stop_at_eos=False, **settings), eos_id=EOS).tokens
    assert [t[:40] for t in long] == short and all(len(t) == 70 for t in long)


requires_kernels = pytest.mark.skipif(not kernels.available("cuda"), reason="needs CUDA and triton")


@requires_kernels
@pytest.mark.gpu
def test_fused_and_pytorch_steps_give_the_same_tokens_with_penalties(engine_tokens):
    """Graphs captured for every mode; greedy rows with penalties take the fused argmax on the
    penalized logits, and equal the reference."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", vocab_size=VOCAB)).cuda().eval()
    kinds = [
        dict(repetition_penalty=1.5, presence_penalty=0.5, stop_at_eos=False),  # greedy + penalties
        dict(temperature=0.9, frequency_penalty=0.8, logit_bias={3: 2.0}, seed=5),
        dict(temperature=1.0, min_p=0.05, top_k=40, repetition_penalty=1.2, min_tokens=6, seed=6),
        dict(),  # a plain greedy row beside them
    ]
    requests = [Sequence([3 + i, 7, 11 + i][: 1 + i % 3], 20 + 3 * i, **kinds[i % 4]) for i in range(10)]
    results = []
    for fused in (False, True):
        dec = BatchDecoder(model, 4, cuda_graph=True, fused=fused, min_length_bucket=16, max_prefill_tokens=64)
        dec.capture_all()
        results.append(engine_tokens(dec, requests, eos_id=EOS))
    assert results[0] == results[1]
    first = requests[0]
    settings = dict(repetition_penalty=1.5, presence_penalty=0.5)
    assert results[1][0] == generate_batch(model, [first.prompt], first.max_tokens, temperature=0.0, **settings)[0]
