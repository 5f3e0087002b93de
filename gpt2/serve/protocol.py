"""The OpenAI completions protocol: parsing and checking a request body, and the error shape
(/v1/chat/completions adds its messages in gpt2.serve.chat and shares the rest).

Every field the server knows is checked for type and range here, with a message that names the
field (`param`), so a bad request is one 400 answer and never reaches the engine. Unknown fields
are ignored, as most OpenAI-compatible servers do; known OpenAI features this server does not
have (suffix, best_of > n) are refused with a 400 that says so. The penalties follow OpenAI
(presence_penalty, frequency_penalty, logit_bias) and vLLM's extensions (repetition_penalty,
min_p, min_tokens, stop_token_ids) by name, range and meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gpt2.inference.penalties import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_TOKEN_BYTES = 128  # bytes of the longest GPT-2 token (tested against the rank file)
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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
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


def parse_completion(
    body: Any, *, model_id: str, tokenizer, block_size: int, vocab_size: int, max_sequences: int | None = None
) -> CompletionParams:
    """Check a decoded JSON body; raise APIError (400, or 404 for another model's name). A request
    of more than max_sequences (prompts x n) is refused before any prompt is tokenized."""
    model = check_model(check_object(body), model_id)
    refuse_unsupported(body)
    if max_sequences is not None:
        _check_sequences(body, max_sequences)
    if body.get("suffix") not in (None, ""):
        raise invalid("'suffix' (insertion) is not supported by this server", "suffix", "unsupported")
    prompts = _prompts(body.get("prompt"), tokenizer, vocab_size, block_size)
    p = CompletionParams(model=model, prompts=prompts, max_tokens=0)
    sampling_fields(body, p, vocab_size)
    p.echo = _field(body, "echo", lambda x: isinstance(x, bool), "a boolean", False)
    p.logprobs = _field(body, "logprobs", _is_int, "an integer")
    if p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS:
        raise invalid(f"'logprobs' must be between 0 and {MAX_LOGPROBS}, got {p.logprobs}", "logprobs")
    p.max_tokens = max_tokens(body, prompts, block_size, "max_tokens", DEFAULT_MAX_TOKENS)
    check_min_tokens(p)
    return p


def _check_sequences(body: dict, max_sequences: int) -> None:
    prompt, n = body.get("prompt"), body.get("n", 1)
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not _is_int(prompt[0]) else 1
    n = n if _is_int(n) and n > 0 else 1  # a bad n is named by its own check
    if prompts * n > max_sequences:
        raise invalid(
            f"{prompts} prompts x n={n} is {prompts * n} sequences; this server queues at most {max_sequences} "
            "(--max-queue): send fewer prompts per request",
            "prompt",
        )


def check_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {json_type(body)}", None, "invalid_type")
    return body


def check_model(body: dict, model_id: str) -> str:
    """The request's model (default: the server's); 404 for any other name."""
    model = _field(body, "model", lambda x: isinstance(x, str), "a string", model_id)
    if model != model_id:
        raise APIError(
            404,
            f"the model '{model}' does not exist; this server has '{model_id}'",
            param="model",
            code="model_not_found",
        )
    return model


def sampling_fields(body: dict, p: CompletionParams, vocab_size: int) -> None:
    """The fields /v1/completions and /v1/chat/completions share, checked into p."""
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
    p.ignore_eos = _field(body, "ignore_eos", lambda x: isinstance(x, bool), "a boolean", False)
    options = _field(body, "stream_options", lambda x: isinstance(x, dict), "an object", {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid("'stream_options.include_usage' must be a boolean", "stream_options", "invalid_type")
    p.include_usage = include_usage
    penalty_fields(body, p, vocab_size)


def _number_in(body: dict, name: str, low: float, high: float, default: float, what: str) -> float:
    """body[name] as a float in [low, high] (what says so in the message), else a 400 naming it."""
    value = float(_field(body, name, _is_number, "a number", default))
    if not low <= value <= high:  # also refuses nan and infinities
        raise invalid(f"'{name}' must be {what}, got {value}", name)
    return value


def penalty_fields(body: dict, p: CompletionParams, vocab_size: int) -> None:
    """OpenAI's penalties and logit_bias, vLLM's repetition_penalty, min_p, min_tokens and
    stop_token_ids, checked into p (min_tokens against max_tokens later: check_min_tokens)."""
    for name in ("presence_penalty", "frequency_penalty"):
        setattr(p, name, _number_in(body, name, -2.0, 2.0, 0.0, "between -2 and 2"))
    p.repetition_penalty = float(_field(body, "repetition_penalty", _is_number, "a number", 1.0))
    if not 0 < p.repetition_penalty < math.inf:  # also refuses nan
        raise invalid(
            f"'repetition_penalty' must be > 0 and finite (1 = none), got {p.repetition_penalty}", "repetition_penalty"
        )
    p.min_p = _number_in(body, "min_p", 0.0, 1.0, 0.0, "between 0 and 1")
    p.min_tokens = _field(body, "min_tokens", _is_int, "an integer", 0)
    if p.min_tokens < 0:
        raise invalid(f"'min_tokens' must be >= 0, got {p.min_tokens}", "min_tokens")
    p.logit_bias = _logit_bias(body.get("logit_bias"), vocab_size)
    p.stop_token_ids = _stop_token_ids(body.get("stop_token_ids"), vocab_size)


def _logit_bias(value: Any, vocab_size: int) -> dict[int, float] | None:
    """{"token id": bias in [-100, 100]} (at most MAX_LOGIT_BIAS entries) as {id: bias}."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(
            f"'logit_bias' must be an object of token ids to numbers, got {json_type(value)}",
            "logit_bias",
            "invalid_type",
        )
    if len(value) > MAX_LOGIT_BIAS:
        raise invalid(f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} tokens, got {len(value)}", "logit_bias")
    out: dict[int, float] = {}
    for key, bias in value.items():
        token = int(key) if key.isascii() and key.isdigit() else -1
        if not 0 <= token < vocab_size or token in out:
            raise invalid(
                f"'logit_bias' key {short(key)} is not a token id of the vocabulary [0, {vocab_size}) (each once)",
                "logit_bias",
            )
        if not _is_number(bias) or not -100 <= bias <= 100:
            raise invalid(
                f"'logit_bias' of token {token} must be a number between -100 and 100, got {short(bias)}", "logit_bias"
            )
        out[token] = float(bias)
    return out or None


def _stop_token_ids(value: Any, vocab_size: int) -> tuple[int, ...]:
    """A list of at most MAX_STOP_TOKEN_IDS token ids of the vocabulary."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise invalid(
            f"'stop_token_ids' must be an array of token ids, got {json_type(value)}", "stop_token_ids", "invalid_type"
        )
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise invalid(f"'stop_token_ids' may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(value)}", "stop_token_ids")
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise invalid(
            f"'stop_token_ids' has token id {bad[0]} outside the vocabulary [0, {vocab_size})", "stop_token_ids"
        )
    return tuple(dict.fromkeys(value))


def check_min_tokens(p: CompletionParams) -> None:
    """min_tokens can be at most max_tokens (vLLM's rule); called once max_tokens is known."""
    if p.min_tokens > p.max_tokens:
        raise invalid(f"'min_tokens' ({p.min_tokens}) must be at most max_tokens ({p.max_tokens})", "min_tokens")


def refuse_unsupported(body: dict) -> None:
    """400 for OpenAI features this server does not have (rather than silently ignoring them)."""
    best_of, n = body.get("best_of"), body.get("n", 1)
    if best_of is not None and best_of != n:
        raise invalid("'best_of' other than n is not supported by this server", "best_of", "unsupported")


def _prompts(prompt: Any, tokenizer, vocab_size: int, block_size: int) -> list[list[int]]:
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
            check_text_length(p, block_size, "prompt")
            ids = tokenizer.encode(p)
            if len(ids) > block_size:  # before tokenizing the other prompts
                raise _too_long(len(ids), block_size)
        elif isinstance(p, list) and all(_is_int(t) for t in p):
            if len(p) > block_size:  # before looking at every id of a huge list
                raise _too_long(len(p), block_size)
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


def _too_long(P: int, block_size: int) -> APIError:
    return invalid(
        f"the prompt has {P} tokens, more than the model's context of {block_size} tokens; shorten the prompt",
        "prompt",
        "context_length_exceeded",
    )


def check_text_length(text: str, block_size: int, param: str) -> None:
    """A text that cannot fit the context whatever its tokens (no token is longer than
    MAX_TOKEN_BYTES bytes) is refused before it is tokenized: a 4 MB prompt costs no tokenizer time."""
    limit = block_size * MAX_TOKEN_BYTES
    if len(text) > limit or len(text.encode("utf-8", errors="surrogatepass")) > limit:
        size = len(text.encode("utf-8", errors="surrogatepass"))
        raise invalid(
            f"the {param} has {size:,} bytes: more than the model's context of {block_size} tokens can hold "
            f"(a token is at most {MAX_TOKEN_BYTES} bytes); shorten the {param}",
            param,
            "context_length_exceeded",
        )


def max_tokens(body: dict, prompts: list[list[int]], block_size: int, name: str, default: int | None) -> int:
    """body[name] checked against the context: prompt + max_tokens must fit block_size (default None:
    the rest of the context)."""
    P = max(len(p) for p in prompts)
    if P > block_size:
        raise _too_long(P, block_size)
    requested = _field(body, name, _is_int, "an integer")
    if requested is None:
        return block_size - P if default is None else min(default, block_size - P)
    if requested < 0:
        raise invalid(f"'{name}' must be >= 0, got {requested}", name)
    if P + requested > block_size:
        raise invalid(
            f"the prompt ({P} tokens) plus {name} ({requested}) is {P + requested} tokens, more than the "
            f"model's context of {block_size}; lower {name} to at most {block_size - P}",
            name,
            "context_length_exceeded",
        )
    return requested
