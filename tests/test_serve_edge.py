"""The server's edge and operations against a real uvicorn (tiny model, CPU): API keys, CORS
headers, the body limit, hostile JSON, Retry-After, /metrics through a Prometheus parser,
cancelling a non-streaming request whose client left, and a 4 MB prompt beside a stream."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.serve.config import HTTPConfig  # noqa: E402
from gpt2.serve.server import ServeConfig, ServerThread, build_service, warm_up  # noqa: E402

MODEL = "tiny-edge"
KEY = "sk-test-0123456789"
ORIGIN = "http://127.0.0.1:9"  # a page's origin that the server allows


def tiny_service(http: HTTPConfig | None = None, warm: bool = True, **config):
    torch.manual_seed(0)
    service = build_service(GPT(GPTConfig.from_name("tiny")).eval(), MODEL, ServeConfig(**config), http)
    if warm:
        warm_up(service)
    return service


@pytest.fixture(scope="module")
def guarded():
    http = HTTPConfig(api_keys=(KEY, "second-key"), allowed_origins=(ORIGIN,), max_body_bytes=64 << 10)
    service = tiny_service(http, max_batch=4)
    with ServerThread(service) as url:
        yield url, service


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_closes_the_api_and_leaves_health_and_metrics_open(guarded):
    url, _ = guarded
    body = {"prompt": "hi", "max_tokens": 2}
    missing = httpx.post(f"{url}/v1/completions", json=body)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(f"{url}/v1/completions", json=body, headers=auth("sk-wrong"))
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "invalid_api_key"
    for key in (KEY, "second-key"):
        assert httpx.post(f"{url}/v1/completions", json=body, headers=auth(key)).status_code == 200
    for path in ("/v1/models", "/tokenizer_info"):
        assert httpx.get(f"{url}{path}").status_code == 401
    assert httpx.post(f"{url}/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, headers=auth("x")).status_code == 403
    for path in ("/health", "/metrics", "/"):
        assert httpx.get(f"{url}{path}").status_code == 200
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert [m.id for m in openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).models.list()] == [MODEL]


def test_cors_preflight_and_headers(guarded):
    url, _ = guarded
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{url}/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    denied = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers={"Origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN  # readable by the page


def test_body_limit_answers_413_before_reading(guarded):
    url, _ = guarded
    big = json.dumps({"prompt": "x" * (100 << 10)}).encode()
    r = httpx.post(f"{url}/v1/completions", content=big, headers=auth())
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert "65,536 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * 4096

    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers=auth())
    assert r.status_code == 413
    # Content-Length says 10 GB and the body never comes: answered at once
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize(
    "raw, code",
    [
        (b"[" * 30_000 + b"]" * 30_000, "invalid_json"),  # parsed in a worker thread
        (b"[" * 4_000 + b"]" * 4_000, "invalid_json"),  # small enough to be parsed on the event loop
        (b'{"prompt": "\xff"}', "invalid_json"),
        (b"", "invalid_json"),
    ],
    ids=["nested", "nested-small", "not-utf8", "empty"],
)
def test_hostile_json_is_a_400(guarded, raw, code):
    url, _ = guarded
    r = httpx.post(f"{url}/v1/completions", content=raw, headers=auth())
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_metrics_parse_as_prometheus_text(guarded):
    url, service = guarded
    before = _samples(url)
    body = {"prompt": "Hello there", "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 1, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=auth())
    assert r.status_code == 200
    httpx.post(f"{url}/v1/completions", json={"prompt": ""}, headers=auth())  # a 400
    after = _samples(url)
    delta = lambda name, **labels: after[_key(name, labels)] - before.get(_key(name, labels), 0)  # noqa: E731
    assert delta("vllm:prompt_tokens_total") == 2 * 2  # "Hello there" is 2 tokens, 2 sequences
    assert delta("vllm:generation_tokens_total") == 10
    assert delta("vllm:request_success_total", finished_reason="length") == 2
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:inter_token_latency_seconds_count") == 8
    assert delta("vllm:e2e_request_latency_seconds_count") == 1  # per request; the 400 never reached the engine
    assert delta("gpt2:http_requests_total", route="/v1/completions", code="200") == 1
    assert delta("gpt2:http_requests_total", route="/v1/completions", code="400") == 1
    assert after[_key("gpt2:kv_slots", {})] == 4 and after[_key("vllm:num_requests_running", {})] == 0
    assert after[_key("gpt2:engine_healthy", {})] == 1
    assert after[_key("gpt2:engine_step_seconds_count", {})] > 0
    families = {f.name for f in parser.text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "gpt2:engine_steps"} <= families


def _samples(url: str) -> dict:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k not in ("model_name", "le")}
            if "le" not in s.labels:
                assert s.labels.get("model_name") == MODEL
                out[_key(s.name, labels)] = s.value
    return out


def _key(name: str, labels: dict) -> tuple:
    return (name, tuple(sorted(labels.items())))


def slow_engine(service, seconds: float):
    """Make every step boundary take a while (a stream then runs long enough to watch)."""
    engine = service.engine
    iterate = engine.iterate
    engine.iterate = lambda: (time.sleep(seconds), iterate())
    return lambda: setattr(engine, "iterate", iterate)


def test_a_non_streaming_request_is_cancelled_when_its_client_leaves():
    service = tiny_service(max_batch=2)
    with ServerThread(service) as url:
        restore = slow_engine(service, 0.02)  # ~50 tokens/s: 60 tokens take over a second
        try:
            engine = service.engine
            before = engine.stats()["tokens"]
            body = {"prompt": "Hi", "max_tokens": 60, "ignore_eos": True}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
            deadline = time.monotonic() + 5
            while engine.stats()["running"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.stats()["running"] == 0 and engine.stats()["tokens"] - before < 40
        finally:
            restore()
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_full_queue_says_when_to_retry():
    service = tiny_service(warm=False, max_batch=1, max_queue=1)
    engine, release = service.engine, threading.Event()
    iterate = engine.iterate
    engine.iterate = lambda: (release.wait(), iterate())
    with ServerThread(service) as url, ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.post, f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1}, timeout=30)
        deadline = time.monotonic() + 5
        while engine.stats()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "b", "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        release.set()
        assert held.result().status_code == 200


@pytest.mark.slow
def test_a_4mb_prompt_does_not_stall_a_stream():
    """A stream's inter-token gaps stay under 50 ms while 4 MB prompts (one string; 1,000 strings)
    arrive beside it: they are refused by their size in bytes and the first prompt's tokens, parsed
    off the event loop (this used to stall every stream for 1.8 s)."""
    service = tiny_service(max_batch=4)
    with ServerThread(service) as url:
        restore = slow_engine(service, 0.004)  # ~60 tokens over ~0.4 s
        try:
            _gaps_beside_big_requests(url)  # the first time pays for the worker threads' start
            gaps, errors = _gaps_beside_big_requests(url)
        finally:
            restore()
    assert errors == [400, 400], errors
    assert len(gaps) > 40 and max(gaps) < 0.050, f"largest gap {max(gaps) * 1e3:.1f} ms"


def _gaps_beside_big_requests(url: str) -> tuple[list[float], list[int]]:
    body = {"prompt": "Once", "max_tokens": 60, "ignore_eos": True, "stream": True, "temperature": 0}
    one = json.dumps({"prompt": "word " * 800_000, "max_tokens": 1}).encode()  # 4 MB in one prompt
    many = json.dumps({"prompt": ["word " * 800] * 1000, "max_tokens": 1}).encode()  # 4 MB in 1000 prompts
    arrivals, errors = [], []
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break  # streaming: now send the big ones beside it
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/completions", content=b, timeout=60) for b in (one, many)]
            for line in lines:
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter())
            errors = [f.result().status_code for f in futures]
    return [b - a for a, b in zip(arrivals, arrivals[1:])], errors
