"""One inference path: `gpt2 generate` runs on the serving engine, and its greedy tokens equal the
server's and gpt2.generation's reference, token for token (CPU, tiny models); a seeded sample equals
the server's answer to a request with that seed; it captures only the decode shapes it runs."""

from __future__ import annotations

import pytest

from gpt2 import GPT
from gpt2.generation import generate_batch
from gpt2.inference.generate import _decode_shapes, run, sequences
from gpt2.inference.runner import BatchDecoder
from gpt2.inference.sampling import GREEDY, SAMPLE, choice_seed

VOCAB = 512
EOS = VOCAB - 1


@pytest.fixture(scope="module")
def model(make_tiny) -> GPT:
    return make_tiny(vocab_size=VOCAB)


@pytest.fixture(scope="module")
def served(model, engine_tokens):
    """served(seqs): what gpt2 serve's engine (its own decoder, default buckets) answers."""
    return lambda seqs: engine_tokens(BatchDecoder(model, 8), seqs, eos_id=EOS)


PROMPTS = [[5, 6, 7], [100, 200, 30, 40, 50, 60, 70, 80], [42]]


@pytest.mark.parametrize("n", [1, 2, 30, 56, 57, 80])  # tiny's context is 64: 8 + 57 passes it, 80 slides
def test_greedy_generate_equals_the_server_and_the_reference(model, served, n):
    seqs = sequences(PROMPTS, n, temperature=0, stop_at_eos=False)
    ours = run(model, seqs, eos_id=EOS)
    reference = generate_batch(model, PROMPTS, n, pad_id=0, temperature=0.0)
    assert ours.tokens == reference
    if all(len(p) + n <= model.config.block_size for p in PROMPTS):  # what a server accepts
        assert ours.tokens == served(seqs)
    assert ours.finish_reasons == ["length"] * 3


def test_seeded_samples_equal_the_servers_choices(model, served):
    seqs = sequences(PROMPTS[:2], 20, num_samples=3, temperature=0.9, top_p=0.9, seed=5, stop_at_eos=False)
    assert [s.seed for s in seqs] == [choice_seed(5, k) for k in range(6)]  # as a request's n=3 choices
    ours = run(model, seqs, eos_id=EOS)
    assert ours.tokens == served(seqs)
    assert ours.tokens[0] != ours.tokens[1]  # the samples of one prompt differ
    assert run(model, seqs, eos_id=EOS).tokens == ours.tokens  # and the seed fixes them


def test_sampling_past_the_context_continues_the_same_random_stream(model):
    """Past the cache, tokens keep the engine's (seed, index) draws: a longer run extends a shorter one."""
    short = run(model, sequences(PROMPTS, 40, temperature=1.0, seed=3, stop_at_eos=False), eos_id=EOS).tokens
    long = run(model, sequences(PROMPTS, 70, temperature=1.0, seed=3, stop_at_eos=False), eos_id=EOS).tokens
    assert [t[:40] for t in long] == short and all(len(t) == 70 for t in long)


def test_generation_stops_at_end_of_text_and_streams_what_it_returns(model):
    first = run(model, sequences(PROMPTS, 30, temperature=0, stop_at_eos=False), eos_id=EOS).tokens
    eos = first[0][4]  # a token the first sequence produces early: call it the end of text
    streamed = {i: [] for i in range(3)}
    out = run(
        model,
        sequences(PROMPTS, 30, temperature=0),
        eos_id=eos,
        on_tokens=lambda i, new: streamed[i].extend(new),
    )
    assert out.tokens[0] == first[0][: first[0].index(eos)] and out.finish_reasons[0] == "stop"
    assert [streamed[i] for i in range(3)] == out.tokens


def test_generate_captures_only_the_decode_shapes_it_runs(model):
    dec = BatchDecoder(model, 3, min_length_bucket=16, batch_buckets=[3])  # length buckets 16, 32, 64
    assert dec.length_buckets == [16, 32, 64]
    greedy = sequences(PROMPTS, 10, temperature=0)  # columns 2..17: buckets 16 and 32
    assert _decode_shapes(dec, greedy) == [(3, 16, GREEDY), (3, 32, GREEDY)]
    sampled = sequences([[1] * 20], 5, temperature=1.0)  # columns 21..24: one bucket, one mode
    assert _decode_shapes(dec, sampled) == [(3, 32, SAMPLE)]
    assert _decode_shapes(dec, sequences([[1]], 1)) == []  # one token: the prefill makes it
    assert run(model, greedy, eos_id=EOS).graphs == 0  # and none at all without CUDA


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(num_samples=0), "num_samples and max_new_tokens must be >= 1"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sequences(PROMPTS, 5, **kwargs)


def test_a_prompt_longer_than_the_context_is_refused(model):
    with pytest.raises(ValueError, match="prompt has 65 tokens but the model's context is 64"):
        run(model, sequences([[1] * 65], 2), eos_id=EOS)


@pytest.mark.slow
def test_the_command_prints_what_the_server_answers_and_the_reference_makes(tmp_path, capsys, make_tiny):
    """`gpt2 generate` (in process, through gpt2.cli.main) against gpt2 serve over HTTP and the
    reference, on a checkpoint with GPT-2's vocabulary: greedy text, and seeded samples."""
    pytest.importorskip("starlette")
    httpx = pytest.importorskip("httpx")
    from gpt2.cli import main
    from gpt2.serve.config import ServeConfig
    from gpt2.serve.server import ServerThread, build_service, warm_up
    from gpt2.tokenizer import Tokenizer

    tiny = make_tiny()
    tiny.save_pretrained(tmp_path)
    tok, prompt = Tokenizer(), "Once upon a time"
    common = ["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "12", "--no-stop"]
    assert main([*common, "--temperature", "0"]) == 0
    greedy = capsys.readouterr()
    reference = generate_batch(tiny, [tok.encode(prompt)], 12, temperature=0.0)[0]
    assert greedy.out == prompt + tok.decode(reference) + "\n"
    assert "12 tokens" in greedy.err and "tokens/s decoding" in greedy.err
    assert "s since the model was loaded (loading took" in greedy.err
    assert main([*common, "--temperature", "0.9", "--top-k", "40", "--seed", "5", "--num-samples", "2"]) == 0
    sampled = capsys.readouterr().out
    service = build_service(tiny, "m", ServeConfig(max_batch=4))
    warm_up(service)
    request = {"prompt": prompt, "max_tokens": 12, "ignore_eos": True}
    with ServerThread(service) as url:
        served_greedy = httpx.post(f"{url}/v1/completions", json={**request, "temperature": 0}, timeout=60).json()
        settings = {"temperature": 0.9, "top_k": 40, "seed": 5, "n": 2}
        served_samples = httpx.post(f"{url}/v1/completions", json={**request, **settings}, timeout=60).json()
    assert served_greedy["choices"][0]["text"] == tok.decode(reference)
    texts = [c["text"] for c in sorted(served_samples["choices"], key=lambda c: c["index"])]
    assert sampled == "".join(f"--- sample {i + 1} ---\n{prompt}{t}\n" for i, t in enumerate(texts))


def test_loading_with_the_warm_up_thread_gives_the_checkpoint(make_tiny, tmp_path):
    """load_model's warm-up (a thread on CUDA while the weights load), here on the CPU: the model is the
    checkpoint's, in eval mode, whether the warm-up runs beside the loading or not; it runs in either dtype."""
    import torch

    from gpt2.inference.load import ModelSpec, load_model, warm_up

    tiny = make_tiny(vocab_size=VOCAB)
    tiny.save_pretrained(tmp_path)
    for warm, decode in ((True, False), (True, None), (False, None)):  # decode: the one-layer rehearsal too
        model, device = load_model(ModelSpec(str(tmp_path), "cpu"), warm=warm, decode=decode)
        assert device.type == "cpu" and not model.training
        for (name, ours), theirs in zip(model.state_dict().items(), tiny.state_dict().values()):
            assert torch.equal(ours, theirs), name
    for dtype in (torch.float32, torch.bfloat16):
        state = torch.get_rng_state()
        warm_up(torch.device("cpu"), dtype)
        warm_up(torch.device("cpu"), dtype, shapes=tiny.config)  # a prefill and decode steps of its shapes
        assert torch.equal(torch.get_rng_state(), state)  # a caller's seeded stream is left as it was


def test_loading_with_the_warm_up_checks_a_sealed_checkpoint_once(make_tiny, tmp_path, monkeypatch):
    """The warm-up reads the checkpoint's config from the source load_model resolved: the weights are
    hashed against checkpoint.json once per load, not once more for the rehearsal."""
    import gpt2.loading
    from gpt2.checkpoint.layout import seal_checkpoint
    from gpt2.inference.load import ModelSpec, load_model

    make_tiny(vocab_size=VOCAB).save_pretrained(tmp_path)
    seal_checkpoint(tmp_path)
    checks = []
    real = gpt2.loading.verified
    monkeypatch.setattr(gpt2.loading, "verified", lambda *a, **k: checks.append(a) or real(*a, **k))
    load_model(ModelSpec(str(tmp_path), "cpu"), warm=True, decode=False)
    assert len(checks) == 1


@pytest.mark.gpu
def test_loading_on_cuda_warms_up_alongside_and_generates_the_reference(make_tiny, tmp_path):
    """load_model on CUDA (the first-use warm-up thread, Triton's included) gives the checkpoint's
    weights, and the engine's greedy tokens on it equal the reference's."""
    import torch

    from gpt2.inference.load import ModelSpec, load_model, warm_up

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tiny = make_tiny(vocab_size=VOCAB)
    tiny.save_pretrained(tmp_path)
    warm_up(torch.device("cuda"), torch.float32, triton=True, shapes=tiny.config)  # what load_model runs beside
    model, device = load_model(ModelSpec(str(tmp_path), "cuda", "fp32"), warm=True, decode=True)
    assert device.type == "cuda" and not model.training
    for (name, ours), theirs in zip(model.state_dict().items(), tiny.state_dict().values()):
        assert torch.equal(ours.cpu(), theirs), name
    seqs = sequences(PROMPTS, 20, temperature=0, stop_at_eos=False)
    reference = generate_batch(model, PROMPTS, 20, pad_id=0, temperature=0.0)
    assert run(model, seqs, eos_id=EOS, fused=False).tokens == reference
