"""`gpt2 serve`'s HTTP API against a real uvicorn server on a free localhost port (tiny model, CPU):
OpenAI client shapes, streaming, stop strings, echo + logprobs against the project's own scoring,
every bad input, 404 / 405 / 429 / 500, client disconnect, and batching never changing results."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from gpt2 import GPT  # noqa: E402
from gpt2.evaluation import score_continuations  # noqa: E402
from gpt2.serve.server import ServeConfig, ServerThread, build_service, warm_up  # noqa: E402
from gpt2.tokenizer import Tokenizer  # noqa: E402

MODEL = "tiny-test"


@pytest.fixture(scope="module")
def model(make_tiny) -> GPT:
    return make_tiny()


@pytest.fixture(scope="module")
def server(model):
    service = build_service(model, MODEL, ServeConfig(max_batch=32, max_queue=64))
    warm_up(service)
    with ServerThread(service) as url:
        yield url, service


@pytest.fixture
def url(server) -> str:
    return server[0]


def post(url: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{url}/v1/completions", content=content, timeout=60, **kwargs)


def complete(url: str, **body) -> dict:
    r = post(url, {"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def wait_until(condition, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_models_and_health(url):
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["running"] == 0


def test_page_is_served(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/completions" in r.text and "://" not in r.text  # nothing fetched from elsewhere: works offline


def test_openai_client_shapes(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model=MODEL, prompt="Hello, I am", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert isinstance(choice.text, str) and choice.finish_reason == "length" and choice.index == 0
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 5, 9)
    assert [m.id for m in client.models.list()] == [MODEL]
    stream = client.completions.create(model=MODEL, prompt="Hello, I am", max_tokens=5, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1]) and len(chunks) == 6  # a token each
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_stream_events_end_with_done_and_usage(url):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and text.endswith("data: [DONE]\n\n")
    usage = json.loads(events[-2][len("data: ") :])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_token_prompts_several_prompts_and_n(url):
    r = complete(url, prompt=[[15496, 11], [40, 716, 257]], n=2, max_tokens=4, temperature=0.9, seed=3)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["usage"] == {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}
    single = complete(url, prompt=[15496, 11], max_tokens=4, temperature=0)
    assert (
        single["choices"][0]["text"]
        == complete(url, prompt="Hello,", max_tokens=4, temperature=0)["choices"][0]["text"]
    )
    again = complete(url, prompt=[[15496, 11], [40, 716, 257]], n=2, max_tokens=4, temperature=0.9, seed=3)
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in r["choices"]]  # seeded: reproducible


def test_stop_strings_cut_the_text(url):
    full = complete(url, prompt="The", max_tokens=20, temperature=0)["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    r = complete(url, prompt="The", max_tokens=20, temperature=0, stop=[stop, "never-seen"])
    assert r["choices"][0]["text"] == expected and r["choices"][0]["finish_reason"] == "stop"
    body = {"model": MODEL, "prompt": "The", "max_tokens": 20, "temperature": 0, "stop": stop, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
        events = [json.loads(e[6:]) for e in resp.read().decode().split("\n\n") if e.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_echo_logprobs_equal_the_projects_scoring(url, model):
    tok = Tokenizer()
    context, continuation = tok.encode("The capital of France"), tok.encode(" is Paris")
    ids = context + continuation
    r = complete(url, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == "The capital of France is Paris"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(ids)
    assert "".join(lp["tokens"]) == r["choices"][0]["text"] and lp["text_offset"][1] == len(lp["tokens"][0])
    scores = score_continuations(model, [(context, continuation)], rows_per_batch=1)
    ours = lp["token_logprobs"][len(context) :]
    assert sum(ours) == pytest.approx(scores.logprob[0].item(), abs=1e-4)
    tops = lp["top_logprobs"][len(context) :]
    assert all(len(t) >= 1 for t in tops)
    assert all(t == max(top.values()) for t, top in zip(ours, tops)) == bool(scores.greedy[0])
    # lm-eval's local-completions asks with max_tokens=1 and drops the last entry
    r1 = complete(url, prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert r1["choices"][0]["logprobs"]["token_logprobs"][:-1] == lp["token_logprobs"]


BAD = [
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "invalid_type", None),
    ({"prompt": ""}, "empty_prompt", "prompt"),
    ({"prompt": []}, "invalid_type", "prompt"),
    ({"prompt": [[]]}, "empty_prompt", "prompt"),
    ({"prompt": [1.5]}, "invalid_type", "prompt"),
    ({"prompt": [50257]}, "invalid_value", "prompt"),
    ({}, "missing", "prompt"),
    ({"prompt": "hi", "temperature": "hot"}, "invalid_type", "temperature"),
    ({"prompt": "hi", "temperature": -0.5}, "invalid_value", "temperature"),
    (b'{"prompt": "hi", "temperature": NaN}', "invalid_value", "temperature"),
    (b'{"prompt": "hi", "temperature": Infinity}', "invalid_value", "temperature"),
    ({"prompt": "hi", "top_p": 0}, "invalid_value", "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "invalid_value", "top_p"),
    ({"prompt": "hi", "top_k": 0}, "invalid_value", "top_k"),
    ({"prompt": "hi", "top_k": 2.5}, "invalid_type", "top_k"),
    ({"prompt": "hi", "n": 0}, "invalid_value", "n"),
    ({"prompt": "hi", "n": True}, "invalid_type", "n"),
    ({"prompt": "hi", "max_tokens": -1}, "invalid_value", "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, "invalid_type", "max_tokens"),
    ({"prompt": [1] * 65}, "context_length_exceeded", "prompt"),
    ({"prompt": [1] * 60, "max_tokens": 10}, "context_length_exceeded", "max_tokens"),
    ({"prompt": "hi", "stop": 5}, "invalid_type", "stop"),
    ({"prompt": "hi", "stop": [""]}, "invalid_value", "stop"),
    ({"prompt": "hi", "stream": "yes"}, "invalid_type", "stream"),
    ({"prompt": "hi", "echo": 1}, "invalid_type", "echo"),
    ({"prompt": "hi", "logprobs": 50}, "invalid_value", "logprobs"),
    ({"prompt": "hi", "seed": "x"}, "invalid_type", "seed"),
    ({"prompt": "hi", "suffix": "!"}, "unsupported", "suffix"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "invalid_value", "presence_penalty"),
    ({"prompt": "hi", "presence_penalty": "1"}, "invalid_type", "presence_penalty"),
    (b'{"prompt": "hi", "presence_penalty": NaN}', "invalid_value", "presence_penalty"),
    ({"prompt": "hi", "frequency_penalty": -2.01}, "invalid_value", "frequency_penalty"),
    ({"prompt": "hi", "frequency_penalty": True}, "invalid_type", "frequency_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, "invalid_value", "repetition_penalty"),
    ({"prompt": "hi", "repetition_penalty": -1.1}, "invalid_value", "repetition_penalty"),
    (b'{"prompt": "hi", "repetition_penalty": Infinity}', "invalid_value", "repetition_penalty"),
    ({"prompt": "hi", "repetition_penalty": [1]}, "invalid_type", "repetition_penalty"),
    ({"prompt": "hi", "min_p": 1.5}, "invalid_value", "min_p"),
    ({"prompt": "hi", "min_p": -0.1}, "invalid_value", "min_p"),
    ({"prompt": "hi", "min_p": "0.1"}, "invalid_type", "min_p"),
    ({"prompt": "hi", "min_tokens": -1}, "invalid_value", "min_tokens"),
    ({"prompt": "hi", "min_tokens": 1.5}, "invalid_type", "min_tokens"),
    ({"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "invalid_value", "min_tokens"),
    ({"prompt": "hi", "logit_bias": [1, 2]}, "invalid_type", "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"50257": 1}}, "invalid_value", "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"-1": 1}}, "invalid_value", "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"hello": 1}}, "invalid_value", "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"1": 1, "01": 2}}, "invalid_value", "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"13": 101}}, "invalid_value", "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"13": "5"}}, "invalid_value", "logit_bias"),
    (b'{"prompt": "hi", "logit_bias": {"13": NaN}}', "invalid_value", "logit_bias"),
    ({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, "invalid_value", "logit_bias"),
    ({"prompt": "hi", "stop_token_ids": 13}, "invalid_type", "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [13, "14"]}, "invalid_type", "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [50257]}, "invalid_value", "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [-3]}, "invalid_value", "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": list(range(65))}, "invalid_value", "stop_token_ids"),
]


@pytest.mark.parametrize("body, code, param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_400_with_a_message(url, body, code, param):
    r = post(url, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == code and error["param"] == param
    assert len(error["message"]) > 10


def test_context_messages_say_which_limit(url):
    too_long = post(url, {"prompt": [1] * 65}).json()["error"]["message"]
    assert "65 tokens" in too_long and "context of 64" in too_long
    too_many = post(url, {"prompt": [1] * 60, "max_tokens": 10}).json()["error"]["message"]
    assert "max_tokens (10)" in too_many and "at most 4" in too_many


def test_routes_and_models_errors(url):
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = post(url, {"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_no_slot_is_stuck_after_errors(url, server):
    service = server[1]
    for body, _, _ in BAD[:5]:
        post(url, body)
    assert wait_until(lambda: service.engine.stats()["running"] == 0 and service.engine.stats()["waiting"] == 0)
    assert complete(url, prompt="ok", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_disconnect_mid_stream_frees_the_slot(url, server):
    service = server[1]
    engine = service.engine
    iterate = engine.iterate
    engine.iterate = lambda: (time.sleep(0.02), iterate())  # ~50 steps/s: the stream is still running
    try:
        before = engine.stats()["tokens"]
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 60, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one token arrived: now drop the connection
        assert wait_until(lambda: engine.stats()["running"] == 0, timeout=5)
        assert engine.stats()["tokens"] - before < 60
    finally:
        engine.iterate = iterate
    assert complete(url, prompt="after", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_batching_never_changes_results(url):
    greedy = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "logprobs": 0}
    seeded = {"prompt": "In the beginning", "max_tokens": 8, "temperature": 1.0, "top_k": 40, "top_p": 0.9, "seed": 7}
    alone = [complete(url, **greedy), complete(url, **seeded)]
    others = [
        {"prompt": f"Request number {i} says", "max_tokens": 4 + i % 9, "temperature": [0, 0.7, 1.2][i % 3], "seed": i}
        for i in range(30)
    ]
    bodies = [greedy, *others[:15], seeded, *others[15:]]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: complete(url, **b), bodies))
    assert together[0]["choices"][0]["text"] == alone[0]["choices"][0]["text"]
    assert together[16]["choices"][0]["text"] == alone[1]["choices"][0]["text"]
    a, t = alone[0]["choices"][0]["logprobs"], together[0]["choices"][0]["logprobs"]
    assert a["tokens"] == t["tokens"]
    torch.testing.assert_close(torch.tensor(a["token_logprobs"]), torch.tensor(t["token_logprobs"]), atol=1e-5, rtol=0)


def small_server(model, **config):
    service = build_service(model, MODEL, ServeConfig(**config))
    return service, ServerThread(service)


def test_full_queue_answers_429(make_tiny):
    service, thread = small_server(make_tiny(), max_batch=1, max_queue=2)
    engine, release = service.engine, threading.Event()
    iterate = engine.iterate
    engine.iterate = lambda: (release.wait(), iterate())  # hold the engine: requests stay queued
    with thread as url, ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(post, url, {"prompt": "hi", "max_tokens": 2}) for _ in range(2)]
        assert wait_until(lambda: engine.stats()["waiting"] == 2)
        r = post(url, {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        release.set()
        assert [f.result().status_code for f in queued] == [200, 200]


def test_internal_error_answers_500_and_the_server_recovers(make_tiny):
    service, thread = small_server(make_tiny(), max_batch=2)
    decoder = service.engine.decoder
    prefill = decoder.prefill

    def broken(*args, **kwargs):
        decoder.prefill = prefill  # fail once
        raise RuntimeError("simulated device failure")

    decoder.prefill = broken
    with thread as url:
        r = post(url, {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "server_error" and "simulated device failure" in error["message"]
        assert service.engine.stats()["running"] == 0
        assert post(url, {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_start_up_warms_the_http_path_without_running_the_engine(make_tiny):
    service, thread = small_server(make_tiny(), max_batch=2)
    warm_up(service)
    steps = service.engine.stats()["steps"]
    with thread as url:
        assert service.engine.stats()["steps"] == steps  # the in-process warm-up request never reached the engine
        assert post(url, {"prompt": "hi", "max_tokens": 2}).status_code == 200
