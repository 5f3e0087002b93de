"""The clients people point at an OpenAI-style server, against `gpt2 serve` (tiny model, CPU, real
uvicorn on localhost): the openai client's chat and completions (sync, async, streaming),
LangChain's ChatOpenAI and litellm.completion (each skipped when not installed), the chat template,
and the tokenizer routes in vLLM's shapes."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.serve.chat import DEFAULT_STOPS, ChatTemplate, load_chat_template  # noqa: E402
from gpt2.serve.server import ServeConfig, ServerThread, build_service, warm_up  # noqa: E402
from gpt2.tokenizer import Tokenizer  # noqa: E402

MODEL = "tiny-chat"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
RENDERED = "System: You are terse.\n\nUser: Say hello.\n\nAssistant:"


@pytest.fixture(scope="module")
def url():
    torch.manual_seed(0)
    service = build_service(GPT(GPTConfig.from_name("tiny")).eval(), MODEL, ServeConfig(max_batch=8))
    warm_up(service)
    with ServerThread(service) as url:
        yield url


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def completion_text(url: str, prompt: str, **body) -> str:
    """What /v1/completions says for the rendered prompt with the default template's stops."""
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "stop": list(DEFAULT_STOPS), **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"].lstrip()


def test_default_template_renders_plain_turns():
    assert ChatTemplate().render(MESSAGES) == RENDERED
    assert ChatTemplate().render(MESSAGES, add_generation_prompt=False) == RENDERED[: -len("Assistant:")]


def test_chat_equals_completions_on_the_rendered_prompt(url):
    r = client(url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert choice.message.content == completion_text(url, RENDERED, max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens == len(Tokenizer().encode(RENDERED))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage_n_seed_and_logprobs(url):
    c = client(url)
    args = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.9, seed=5, n=2)
    whole = c.chat.completions.create(**args, logprobs=True, top_logprobs=3)
    chunks = list(c.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [ch.message.content for ch in whole.choices]  # seeded: the same text
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens // 2 or whole.choices[0].finish_reason == "stop"
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace")
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6


def test_async_chat_and_completions(url):
    async def scenario():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chat = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
        text = await c.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0)
        stream = await c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, stream=True
        )
        streamed = "".join([ch.choices[0].delta.content or "" async for ch in stream])
        await c.close()
        return chat, text, streamed

    chat, text, streamed = asyncio.run(scenario())
    assert streamed == chat.choices[0].message.content
    assert (
        text.choices[0].text
        == client(url).completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0).choices[0].text
    )


def test_langchain_chat_openai(url):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=f"{url}/v1", api_key="unused", temperature=0, max_tokens=8, max_retries=0
    )
    reply = llm.invoke([("system", "You are terse."), ("human", "Say hello.")])
    assert reply.content == completion_text(url, RENDERED, max_tokens=8, temperature=0)
    assert "".join(chunk.content for chunk in llm.stream("Say hello.")) == llm.invoke("Say hello.").content


def test_litellm_completion(url, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: no price-list download at import
    litellm = pytest.importorskip("litellm")
    r = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=f"{url}/v1",
        api_key="unused",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
    )
    assert r.choices[0].message.content == completion_text(url, RENDERED, max_tokens=8, temperature=0)


def test_custom_chat_template_file(tmp_path):
    path = tmp_path / "chatml.jinja"
    path.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    template = load_chat_template(str(path))
    assert template.render(MESSAGES[1:]) == "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    assert template.stops == () and not template.strip_leading
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        load_chat_template("{% for %}")
    with pytest.raises(ValueError, match="no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))


BAD_CHAT = [
    ({"messages": None}, "missing", "messages"),
    ({"messages": []}, "invalid_type", "messages"),
    ({"messages": "hi"}, "invalid_type", "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "invalid_value", "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "invalid_type", "messages"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "invalid_value",
        "messages",
    ),
    ({"messages": [{"role": "user", "content": "x" * 9000}]}, "context_length_exceeded", "messages"),
    ({"logprobs": 3}, "invalid_type", "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "invalid_value", "top_logprobs"),
    ({"top_logprobs": 2}, "invalid_value", "top_logprobs"),
    ({"max_completion_tokens": -1}, "invalid_value", "max_completion_tokens"),
    ({"max_tokens": 100}, "context_length_exceeded", "max_tokens"),
    ({"temperature": -1}, "invalid_value", "temperature"),
    ({"n": 0}, "invalid_value", "n"),
    ({"stream_options": {"include_usage": "yes"}}, "invalid_type", "stream_options"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "unsupported", "tools"),
    ({"response_format": {"type": "json_object"}}, "unsupported", "response_format"),
    ({"chat_template": "{{ messages }}"}, "unsupported", "chat_template"),
    ({"frequency_penalty": 5}, "invalid_value", "frequency_penalty"),
    ({"presence_penalty": -3}, "invalid_value", "presence_penalty"),
    ({"repetition_penalty": 0}, "invalid_value", "repetition_penalty"),
    ({"min_p": 2}, "invalid_value", "min_p"),
    ({"logit_bias": {"x": 1}}, "invalid_value", "logit_bias"),
    ({"stop_token_ids": [1e9]}, "invalid_type", "stop_token_ids"),
    ({"min_tokens": 100, "max_tokens": 5}, "invalid_value", "min_tokens"),
    ({"add_generation_prompt": "yes"}, "invalid_type", "add_generation_prompt"),
]


@pytest.mark.parametrize("fields, code, param", BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
def test_bad_chat_requests_get_400_naming_the_field(url, fields, code, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body), timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error"), error


def test_tokenizer_routes_in_vllms_shapes(url):
    tok = Tokenizer()
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "Hello world<|endoftext|>"}).json()
    assert r == {"count": 3, "max_model_len": 64, "tokens": tok.encode("Hello world<|endoftext|>"), "token_strs": None}
    strs = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert strs["token_strs"] == ["Hello", " world"]
    chat = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == tok.encode(RENDERED)
    assert httpx.post(f"{url}/detokenize", json={"tokens": r["tokens"]}).json() == {
        "prompt": "Hello world<|endoftext|>"
    }
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
    assert info["tokenizer_class"] == "GPT2TokenizerFast" and "Assistant:" in info["chat_template"]
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [50257]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{url}/tokenize", json={"prompt": 5}).json()["error"]["param"] == "prompt"
    assert httpx.post(f"{url}/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
    card = httpx.get(f"{url}/v1/models/{MODEL}").json()
    assert card["id"] == MODEL and card["max_model_len"] == 64
    assert httpx.get(f"{url}/v1/models/gpt-4").json()["error"]["code"] == "model_not_found"
