"""Penalties through `gpt2 serve`'s HTTP stack (tiny model, CPU, real uvicorn): the openai
client's own penalty fields and vLLM's through `extra_body`, on /v1/completions and
/v1/chat/completions, give the engine's (and so the reference's) tokens; stop_token_ids end a
choice with the token in its text; min_tokens holds off end of text and stop strings; every bad
value is a 400 naming its field, from the openai client too."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from gpt2 import GPT  # noqa: E402
from gpt2.generation import generate_batch  # noqa: E402
from gpt2.serve.server import ServeConfig, ServerThread, build_service, warm_up  # noqa: E402
from gpt2.serve.text import ChoiceText, token_table  # noqa: E402
from gpt2.tokenizer import Tokenizer  # noqa: E402

MODEL = "tiny-pen"
PROMPT = "The cat sat on the"
PENALTIES = dict(presence_penalty=1.0, frequency_penalty=0.5)  # OpenAI's fields
VLLM = dict(repetition_penalty=1.5, min_p=0.05)  # vLLM's, sent in extra_body


@pytest.fixture(scope="module")
def model(make_tiny) -> GPT:
    return make_tiny()


@pytest.fixture(scope="module")
def url(model):
    service = build_service(model, MODEL, ServeConfig(max_batch=8))
    warm_up(service)
    with ServerThread(service) as url:
        yield url


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def tokens_of(text: str) -> list[int]:
    return Tokenizer().encode(text)


def test_penalties_from_the_openai_client_equal_the_reference(client, model):
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={**VLLM, "ignore_eos": True}, **PENALTIES
    )
    reference = generate_batch(model, [tokens_of(PROMPT)], 12, temperature=0.0, **PENALTIES, **VLLM)[0]
    assert r.choices[0].text == Tokenizer().decode(reference)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert plain.choices[0].text != r.choices[0].text


def test_chat_takes_the_same_penalties(client, url):
    messages = [{"role": "user", "content": "Say something."}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body=VLLM, **PENALTIES
    )
    rendered = "User: Say something.\n\nAssistant:"
    body = {"prompt": rendered, "max_tokens": 10, "temperature": 0, "stop": ["\nUser:", "\nAssistant:", "\nSystem:"]}
    plain = httpx.post(f"{url}/v1/completions", json={**body, **PENALTIES, **VLLM}, timeout=30).json()
    assert r.choices[0].message.content == plain["choices"][0]["text"].lstrip()


def test_logit_bias_from_the_openai_client(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={"262": 100})
    assert r.choices[0].text == " the" * 4
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.9, seed=1, logit_bias={"262": 100}
    )
    assert r.choices[0].text == " the" * 4  # sampled rows too


def test_stop_token_ids_end_the_choice_with_the_token(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0)
    tokens = tokens_of(plain.choices[0].text)
    stop = tokens[5]
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"stop_token_ids": [stop]}
    )
    (choice,) = r.choices
    assert choice.finish_reason == "stop" and r.usage.completion_tokens == tokens.index(stop) + 1
    assert choice.text == Tokenizer().decode(tokens[: tokens.index(stop) + 1])  # vLLM returns it
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True, extra_body={"stop_token_ids": [stop]}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == choice.text and chunks[-1].choices[0].finish_reason == "stop"


def test_min_tokens_holds_off_end_of_text(url, model):
    """The tiny model, with `<|endoftext|>` pushed up by logit_bias, ends at once; min_tokens makes it wait."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logit_bias": {"50256": 100}}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
    assert r["usage"]["completion_tokens"] == 0 and r["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(f"{url}/v1/completions", json={**body, "min_tokens": 5}, timeout=30).json()
    assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "stop"
    ids = generate_batch(
        model, [tokens_of(PROMPT)], 12, temperature=0.0, eos_id=50256, min_tokens=5, logit_bias={50256: 100.0}
    )[0]
    assert r["choices"][0]["text"] == Tokenizer().decode(ids[:-1])


def test_stop_strings_count_only_after_min_tokens():
    table = token_table(50257)
    tok = Tokenizer()
    ids = tok.encode(" a b a b a b")  # six tokens
    text = ChoiceText(table, stop=(" b",), min_tokens=3)
    out = "".join(text.add([t]) for t in ids)
    assert text.stopped and text.text == " a b a"  # " b" in tokens 1-3 does not count; the one ending token 4 does
    assert out == text.text
    assert ChoiceText(table, stop=(" b",)).add(ids[:2]) == " a"  # without min_tokens the first one stops it


BAD = [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"50257": 5}}, "logit_bias"),
    ({"logit_bias": {"12": 150}}, "logit_bias"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"min_p": 1.01}}, "min_p"),
    ({"extra_body": {"min_tokens": -2}}, "min_tokens"),
    ({"extra_body": {"min_tokens": 9}}, "min_tokens"),  # more than max_tokens
    ({"extra_body": {"stop_token_ids": [70000]}}, "stop_token_ids"),
    ({"extra_body": {"stop_token_ids": "13"}}, "stop_token_ids"),
]


@pytest.mark.parametrize("fields, param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_values_are_400s_naming_the_field_in_the_openai_client(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=8, **fields)
    assert e.value.body["param"] == param and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8, **fields)
    assert e.value.body["param"] == param


def test_penalized_requests_ignore_the_batch(url):
    """A penalized greedy and a penalized seeded request alone and among 20 others (some penalized)."""

    def complete(body):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "repetition_penalty": 1.3, **PENALTIES}
    seeded = {"prompt": "Once", "max_tokens": 10, "temperature": 1.0, "seed": 4, "min_p": 0.1, "logit_bias": {"11": 5}}
    alone = [complete(greedy), complete(seeded)]
    others = [
        {"prompt": f"Number {i}", "max_tokens": 3 + i % 7, "temperature": i % 2, "seed": i, "presence_penalty": i % 3}
        for i in range(20)
    ]
    with ThreadPoolExecutor(22) as pool:
        together = list(pool.map(complete, [greedy, *others[:10], seeded, *others[10:]]))
    assert [together[0], together[11]] == alone
