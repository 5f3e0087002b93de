"""/v1/chat/completions: messages rendered by a chat template into one prompt for the same engine.

GPT-2 is a base model with no chat format of its own, so the default template writes the
conversation as plain text turns and generation stops where the model starts the next turn:

    System: You are terse.

    User: Hello!

    Assistant: Hi.<- the reply; "\\nUser:", "\\nAssistant:" or "\\nSystem:" ends it

(the space GPT-2 writes after "Assistant:" is dropped from the reply). `--chat-template FILE` takes
a Jinja template as HuggingFace and vLLM define them (variables `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`; the function `raise_exception`), rendered in Jinja's sandbox; such a
template adds no stop strings (the model's `<|endoftext|>` and the request's `stop` end a reply).
The answer is OpenAI's chat shape (`message` / `delta`, logprobs as `content` entries); everything
else (sampling, n, seed, stop, usage, streaming, disconnects) is /v1/completions' machinery.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gpt2.serve.protocol import (
    MAX_LOGPROBS,
    CompletionParams,
    check_min_tokens,
    check_model,
    check_object,
    check_text_length,
    invalid,
    json_type,
    max_tokens,
    refuse_unsupported,
    sampling_fields,
)
from gpt2.serve.stream import Completion, _Choice
from gpt2.serve.text import token_string
from gpt2.tokenizer import EOT_TOKEN

ROLES = ("system", "developer", "user", "assistant", "tool")

DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_STOPS = ("\nUser:", "\nAssistant:", "\nSystem:")


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template, the stop strings that end a reply in its format, and whether the
    reply's leading whitespace is dropped."""

    source: str = DEFAULT_TEMPLATE
    stops: tuple[str, ...] = DEFAULT_STOPS
    strip_leading: bool = True

    def __post_init__(self) -> None:
        compiled = _environment().from_string(self.source)  # a syntax error is the caller's (start-up) error
        object.__setattr__(self, "_compiled", compiled)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=EOT_TOKEN, eos_token=EOT_TOKEN
        )


def load_chat_template(spec: str) -> ChatTemplate:
    """`--chat-template`: a file holding a Jinja template, or (as vLLM accepts) the template itself.
    Raises ValueError with a one-line reason."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template {spec}: cannot read it ({e})") from None
    elif "{{" in spec or "{%" in spec:
        source = spec
    else:
        raise ValueError(f"--chat-template {spec}: no such file (pass a Jinja template file, or the template text)")
    try:
        return ChatTemplate(source, stops=(), strip_leading=False)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template {spec}: not a valid Jinja template (line {e.lineno}: {e.message})") from None


def _environment() -> ImmutableSandboxedEnvironment:
    """HF's template environment: sandboxed, trim_blocks / lstrip_blocks, loop controls, raise_exception."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env


def parse_chat(
    body: Any, *, model_id: str, template: ChatTemplate, tokenizer, block_size: int, vocab_size: int
) -> CompletionParams:
    """Check a /v1/chat/completions body and render its messages into the prompt's token ids."""
    model = check_model(check_object(body), model_id)
    refuse_unsupported(body)
    _refuse_chat_unsupported(body)
    messages = check_messages(body.get("messages"))
    add_generation_prompt = body.get("add_generation_prompt", True)
    if not isinstance(add_generation_prompt, bool):
        raise invalid("'add_generation_prompt' must be a boolean", "add_generation_prompt", "invalid_type")
    text = render(template, messages, add_generation_prompt)
    check_text_length(text, block_size, "messages")
    ids = tokenizer.encode(text)
    if not ids:
        raise invalid("the messages render to an empty prompt", "messages", "empty_prompt")
    if len(ids) > block_size:
        raise invalid(
            f"the messages are {len(ids)} tokens, more than the model's context of {block_size} tokens; "
            "send fewer or shorter messages",
            "messages",
            "context_length_exceeded",
        )
    p = CompletionParams(model=model, prompts=[ids], max_tokens=0)
    sampling_fields(body, p, vocab_size)
    p.stop = tuple(dict.fromkeys(p.stop + template.stops))  # the request's, then the template's turn ends
    p.logprobs = _logprobs(body)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    p.max_tokens = max_tokens(body, p.prompts, block_size, name, None)  # default: the rest of the context
    check_min_tokens(p)
    return p


def render(template: ChatTemplate, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The prompt text of checked messages; a template error (or its raise_exception) is a 400."""
    try:
        return template.render(messages, add_generation_prompt)
    except jinja2.TemplateError as e:
        raise invalid(f"the chat template cannot render these messages: {e}", "messages") from None


def _refuse_chat_unsupported(body: dict) -> None:
    if body.get("tools") or body.get("functions") or body.get("tool_choice") not in (None, "none", "auto"):
        raise invalid("tools and function calling are not supported by this server", "tools", "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise invalid('only \'response_format\': {"type": "text"} is supported', "response_format", "unsupported")
    if body.get("chat_template") is not None:
        raise invalid(
            "a per-request 'chat_template' is not accepted; start the server with --chat-template FILE",
            "chat_template",
            "unsupported",
        )


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The messages as {role, content} with text content; a 400 naming the first bad one."""
    if messages is None:
        raise invalid("'messages' is required", "messages", "missing")
    if not isinstance(messages, list) or not messages:
        raise invalid(f"'messages' must be a non-empty array, got {json_type(messages)}", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"'messages[{i}]'"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object with 'role' and 'content'", "messages", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where} has role {role!r}; use one of {', '.join(ROLES)}", "messages", "invalid_value")
        out.append({"role": role, "content": _content(m.get("content"), where, role)})
    return out


def _content(content: Any, where: str, role: str) -> str:
    """A message's text: a string, or text parts joined by newlines (as vLLM does)."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else json_type(part)
                raise invalid(f"{where} has a content part of type {kind!r}; only text parts are supported", "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(f"{where} content must be a string or an array of text parts", "messages", "invalid_type")


def _logprobs(body: dict) -> int | None:
    """The chat form (logprobs: bool, top_logprobs: 0..20) as the engine's count of alternatives."""
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise invalid(
            f"'logprobs' must be a boolean in chat completions, got {json_type(want)}", "logprobs", "invalid_type"
        )
    top = body.get("top_logprobs")
    if top is None:
        return 0 if want else None
    if not isinstance(top, int) or isinstance(top, bool):
        raise invalid(f"'top_logprobs' must be an integer, got {json_type(top)}", "top_logprobs", "invalid_type")
    if not 0 <= top <= MAX_LOGPROBS:
        raise invalid(f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}, got {top}", "top_logprobs")
    if not want:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return top


class ChatCompletion(Completion):
    """A Completion in the chat shapes: `message` (JSON) or role, content and finish `delta`s (stream)."""

    OBJECT, CHUNK_OBJECT = "chat.completion", "chat.completion.chunk"
    TOKEN_EVENT_END = '}, "logprobs": null, "finish_reason": null}]}\n\n'

    def __init__(self, service, params, seqs, ids, inbox, cid, arrival=None, *, strip_leading: bool = False):
        super().__init__(service, params, seqs, ids, inbox, cid, arrival)
        self._leading = {c.index for c in self.choices.values()} if strip_leading else set()

    def _event_start(self, c: _Choice) -> str:
        return f'data: {self._head}{{"index": {c.index}, "delta": {{"content": '

    def _opening(self) -> str:
        return "".join(
            self._event({"index": c.index, "delta": {"role": "assistant", "content": ""}})
            for c in sorted(self.choices.values(), key=lambda c: c.index)
        )

    def _event(self, choice: dict) -> str:
        choice = {"logprobs": None, "finish_reason": None, **choice}
        return f"data: {self._head}{json.dumps(choice)}]}}\n\n"

    def _strip(self, c: _Choice, text: str) -> str:
        """The reply without its leading whitespace (default template): strip until a character shows."""
        if c.index in self._leading:
            text = text.lstrip()
            if text:
                self._leading.discard(c.index)
        return text

    def _chunk(self, c: _Choice, text: str, logprobs: dict | None, finish: str | None = None) -> str:
        text = self._strip(c, text)
        if logprobs is None and finish is None:
            return f"{c.event_start}{json.dumps(text)}{self.TOKEN_EVENT_END}" if text else ""
        delta = {"content": text} if text else {}
        return self._event({"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})

    def _logprobs(self, tokens: list[int], entries: list, offset: int) -> dict:
        """OpenAI's chat logprobs: per token its text, log p, bytes and the top_logprobs alternatives."""
        tok, k, content = self.service.tok, self.p.logprobs, []
        for token, entry in zip(tokens, entries):
            lp, alternatives = entry
            top = [_token_entry(tok, t, v) for t, v in alternatives[:k]]
            content.append({**_token_entry(tok, token, lp), "top_logprobs": top})
        return {"content": content}

    def _choice_json(self, c: _Choice) -> dict:
        logprobs = self._logprobs(c.tokens, c.entries, 0) if self.want_lp else None
        text = c.text.text.lstrip() if c.index in self._leading else c.text.text  # JSON answers never stream
        return {
            "index": c.index,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }


def _token_entry(tok, token: int, logprob: float) -> dict:
    return {"token": token_string(tok, token), "logprob": logprob, "bytes": list(tok.decode_bytes([token]))}
