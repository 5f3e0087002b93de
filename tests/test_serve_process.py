"""`gpt2 serve`'s default: the engine in its own process (tiny model, CPU). Answers equal the
in-process engine's, streams and disconnects work across the pipes, the queue is bounded, and a
dead engine process fails its requests instead of hanging them."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from gpt2.inference.load import ModelSpec  # noqa: E402
from gpt2.serve.app import Service  # noqa: E402
from gpt2.serve.config import HTTPConfig  # noqa: E402
from gpt2.serve.process import build_process_service, process_loader  # noqa: E402
from gpt2.serve.server import ServeConfig, ServerThread, build_service, warm_up  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_tiny):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    service = build_process_service(ModelSpec(str(checkpoint), "cpu"), "m", ServeConfig(max_batch=4, max_queue=8))
    with ServerThread(service) as url:
        yield url, service


BODIES = [
    {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "logprobs": 2},
    {"prompt": [[15496, 11], [40, 716]], "n": 2, "max_tokens": 6, "temperature": 0.9, "top_p": 0.9, "seed": 5},
    {"prompt": "The capital", "max_tokens": 0, "echo": True, "logprobs": 1},
    {  # every sampling field crosses the pipe
        "prompt": "Penalties",
        "max_tokens": 10,
        "temperature": 0.8,
        "seed": 2,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "repetition_penalty": 1.2,
        "logit_bias": {"11": 3},
        "min_tokens": 3,
        "stop_token_ids": [13],
    },
]


def test_answers_equal_the_in_process_engines(server, make_tiny):
    url, _ = server
    reference = build_service(make_tiny(), "m", ServeConfig(max_batch=4, max_queue=8))
    warm_up(reference)
    with ServerThread(reference) as ref_url:
        for body in BODIES:
            ours = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
            theirs = httpx.post(f"{ref_url}/v1/completions", json=body, timeout=60).json()
            for key in ("id", "created"):
                ours.pop(key), theirs.pop(key)
            assert_same(ours, theirs)


def assert_same(ours, theirs, path: str = "answer") -> None:
    """Equal answers: the same text, tokens and structure; log-probabilities equal up to float32
    rounding (the engine process's matmuls may block a batch differently from this process's, and
    some CPUs' BLAS then round differently in the last bits)."""
    if isinstance(ours, float) and isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6), path
    elif isinstance(ours, dict) and isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), path
        for key in ours:
            assert_same(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert ours == theirs, path


def test_streams_and_health_across_the_pipes(server):
    url, service = server
    body = {"prompt": "Hi", "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) == 7  # 5 tokens, the finish chunk, DONE
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    health = httpx.get(f"{url}/health").json()
    assert health["running"] == 0 and health["tokens"] > 0


def test_the_queue_bound_counts_slots_and_queue(server):
    url, service = server
    from gpt2.inference import QueueFull, Sequence

    engine = service.engine
    with engine._lock:  # pretend 4 running + 8 waiting sequences are unfinished
        saved = dict(engine._seqs)
        engine._seqs.update({-i: None for i in range(1, 13)})
    try:
        with pytest.raises(QueueFull):
            engine.submit([Sequence([1], 2)])
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429
    finally:
        with engine._lock:
            engine._seqs.clear()
            engine._seqs.update(saved)


def test_a_dead_engine_process_fails_requests_and_health_answers_503(checkpoint):
    service = build_process_service(ModelSpec(str(checkpoint), "cpu"), "m", ServeConfig(max_batch=2))
    with ServerThread(service) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        os.kill(service.engine._process.pid, signal.SIGKILL)  # kill -9
        service.engine._process.join()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and "engine process" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "unavailable" and "engine process" in health.json()["reason"]
        assert 'gpt2:engine_healthy{model_name="m"} 0.0' in httpx.get(f"{url}/metrics").text


def test_a_stopped_engine_process_is_reported_wedged_until_it_runs_again(checkpoint):
    http = HTTPConfig(stall_timeout_s=1.5)
    service = build_process_service(ModelSpec(str(checkpoint), "cpu"), "m", ServeConfig(max_batch=2), http)
    with ServerThread(service) as url:
        pid = service.engine._process.pid
        assert httpx.get(f"{url}/health").status_code == 200
        os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing: what a hung driver call looks like
        try:
            assert wait_for(lambda: httpx.get(f"{url}/health").status_code == 503, timeout=10)
            assert "not answered" in httpx.get(f"{url}/health").json()["reason"]
        finally:
            os.kill(pid, signal.SIGCONT)
        assert wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=10)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200


def test_health_answers_503_while_the_engine_starts(checkpoint):
    service = Service(None, "m")
    service.loader = process_loader(ModelSpec(str(checkpoint), "cpu"), ServeConfig(max_batch=2))
    with ServerThread(service) as url:  # listening before the engine process has loaded anything
        first = httpx.get(f"{url}/health")
        assert first.status_code == 503 and first.json()["status"] == "starting", first.text
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=120)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_gpt2_serve_starts_answers_and_stops_cleanly(checkpoint):
    import subprocess
    import sys
    from pathlib import Path

    from gpt2.serve.server import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "gpt2", "serve", "--model", str(checkpoint), "--device", "cpu", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "gpt2 serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    assert server.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal after a clean shutdown
    assert "engine process" in out and "Application shutdown complete" in out
