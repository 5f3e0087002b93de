"""The OpenAI completions protocol: parsing and checking a request body, and the error shape.

Every field the server knows is checked for type and range here, with a message that names the
field (`param`), so a bad request is one 400 answer and never reaches the engine. Unknown fields
are ignored, as most OpenAI-compatible servers do; known OpenAI features this server does not
have (suffix, best_of > n, logit_bias, penalties) are refused with a 400 that says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOPS = 16


class APIError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class CompletionParams:
    """A checked /v1/completions request; prompts are token ids (strings already encoded)."""

    model: str
    prompts: list[list[int]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None
    ignore_eos: bool = False
    include_usage: bool = False


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float))) and not isinstance(x, bool)


def _field(body: dict, name: str, check, what: str, default: Any = None) -> Any:
    """body[name] (default when absent or null) after `check(value)` passes, else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise invalid(f"'{name}' must be {what}, got {json_type(value)} {short(value)}", name, "invalid_type")
    return value


def json_type(x: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(x), type(x).__name__)


def short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_completion(body: Any, *, model_id: str, tokenizer, block_size: int, vocab_size: int) -> CompletionParams:
    """Check a decoded JSON body; raise APIError (400, or 404 for another model's name)."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {json_type(body)}", None, "invalid_type")
    model = _field(body, "model", lambda x: isinstance(x, str), "a string", model_id)
    if model != model_id:
        raise APIError(
            404,
            f"the model '{model}' does not exist; this server has '{model_id}'",
            param="model",
            code="model_not_found",
        )
    _refuse_unsupported(body)
    prompts = _prompts(body.get("prompt"), tokenizer, vocab_size)
    p = CompletionParams(model=model, prompts=prompts, max_tokens=0)
    p.temperature = float(_field(body, "temperature", _is_number, "a number", 1.0))
    if not math.isfinite(p.temperature) or p.temperature < 0:
        raise invalid(f"'temperature' must be a finite number >= 0 (0 = greedy), got {p.temperature}", "temperature")
    p.top_p = _field(body, "top_p", _is_number, "a number")
    if p.top_p is not None and not (math.isfinite(p.top_p) and 0 < p.top_p <= 1):
        raise invalid(f"'top_p' must be in (0, 1], got {p.top_p}", "top_p")
    p.top_k = _field(body, "top_k", _is_int, "an integer")
    if p.top_k is not None and p.top_k < 1:
        raise invalid(f"'top_k' must be >= 1 (or null for no limit), got {p.top_k}", "top_k")
    p.n = _field(body, "n", _is_int, "an integer", 1)
    if not 1 <= p.n <= MAX_N:
        raise invalid(f"'n' must be between 1 and {MAX_N}, got {p.n}", "n")
    p.stop = _stops(body.get("stop"))
    seed = _field(body, "seed", _is_int, "an integer")
    p.seed = None if seed is None else seed % 2**63
    p.stream = _field(body, "stream", lambda x: isinstance(x, bool), "a boolean", False)
    p.echo = _field(body, "echo", lambda x: isinstance(x, bool), "a boolean", False)
    p.ignore_eos = _field(body, "ignore_eos", lambda x: isinstance(x, bool), "a boolean", False)
    p.logprobs = _field(body, "logprobs", _is_int, "an integer")
    if p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS:
        raise invalid(f"'logprobs' must be between 0 and {MAX_LOGPROBS}, got {p.logprobs}", "logprobs")
    options = _field(body, "stream_options", lambda x: isinstance(x, dict), "an object", {})
    p.include_usage = bool(options.get("include_usage", False))
    p.max_tokens = _max_tokens(body, prompts, block_size)
    return p


def _refuse_unsupported(body: dict) -> None:
    if body.get("suffix") not in (None, ""):
        raise invalid("'suffix' (insertion) is not supported by this server", "suffix", "unsupported")
    best_of, n = body.get("best_of"), body.get("n", 1)
    if best_of is not None and best_of != n:
        raise invalid("'best_of' other than n is not supported by this server", "best_of", "unsupported")
    if body.get("logit_bias"):
        raise invalid("'logit_bias' is not supported by this server", "logit_bias", "unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value not in (None, 0, 0.0):
            raise invalid(f"'{name}' is not supported by this server (only 0)", name, "unsupported")


def _prompts(prompt: Any, tokenizer, vocab_size: int) -> list[list[int]]:
    """The prompt as token-id lists: a string, a list of strings, a list of ids or a list of id lists."""
    what = "a string, an array of strings, an array of token ids or an array of token-id arrays"
    if prompt is None:
        raise invalid("'prompt' is required", "prompt", "missing")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_int(prompt[0])):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise invalid(f"'prompt' must be {what} (non-empty)", "prompt", "invalid_type")
    out = []
    for i, p in enumerate(prompt):
        where = "'prompt'" if len(prompt) == 1 else f"'prompt[{i}]'"
        if isinstance(p, str):
            ids = tokenizer.encode(p)
        elif isinstance(p, list) and all(_is_int(t) for t in p):
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise invalid(f"{where} has token id {bad[0]} outside the vocabulary [0, {vocab_size})", "prompt")
            ids = list(p)
        else:
            raise invalid(f"'prompt' must be {what}", "prompt", "invalid_type")
        if not ids:
            raise invalid(f"{where} is empty; send at least one token (e.g. '<|endoftext|>')", "prompt", "empty_prompt")
        out.append(ids)
    return out


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"'stop' must be a string or an array of strings, got {json_type(stop)}", "stop", "invalid_type")
    if len(stops) > MAX_STOPS or any(s == "" for s in stops):
        raise invalid(f"'stop' must hold 1 to {MAX_STOPS} non-empty strings", "stop")
    return tuple(stops)


def _max_tokens(body: dict, prompts: list[list[int]], block_size: int) -> int:
    """max_tokens checked against the context: prompt + max_tokens must fit block_size."""
    P = max(len(p) for p in prompts)
    if P > block_size:
        raise invalid(
            f"the prompt has {P} tokens, more than the model's context of {block_size} tokens; shorten the prompt",
            "prompt",
            "context_length_exceeded",
        )
    requested = _field(body, "max_tokens", _is_int, "an integer")
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, block_size - P)
    if requested < 0:
        raise invalid(f"'max_tokens' must be >= 0, got {requested}", "max_tokens")
    if P + requested > block_size:
        raise invalid(
            f"the prompt ({P} tokens) plus max_tokens ({requested}) is {P + requested} tokens, more than the "
            f"model's context of {block_size}; lower max_tokens to at most {block_size - P}",
            "max_tokens",
            "context_length_exceeded",
        )
    return requested
