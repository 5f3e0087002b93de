"""The tokenizer routes, in vLLM's request and response shapes: `POST /tokenize`, `POST /detokenize`,
`GET /tokenizer_info`. lm-eval's `local-completions` model probes the last two and, when they
answer, tokenizes through the server (its "remote" tokenizer), so it needs no tokenizer files and
no HuggingFace download: only `model` and `base_url`.

    POST /tokenize    {"prompt": str} or {"messages": [...], "add_generation_prompt": bool}
                      (+ "model", "add_special_tokens" (GPT-2 adds none), "return_token_strs")
                      -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize  {"tokens": [int]} -> {"prompt": str}
    GET /tokenizer_info -> tokenizer_config.json's fields: tokenizer_class, eos/bos/unk/pad tokens,
                      model_max_length, chat_template, ...

Parsing and tokenizing are functions of the decoded body (no I/O), so the app runs them off the
event loop like every other request's.
"""

from __future__ import annotations

from typing import Any

from gpt2.serve.chat import ChatTemplate, check_messages, render
from gpt2.serve.protocol import check_model, check_object, check_text_length, invalid, json_type
from gpt2.serve.text import token_string
from gpt2.tokenizer import EOT_TOKEN


def tokenize(body: Any, *, model_id: str, template: ChatTemplate, tokenizer, block_size: int) -> dict:
    """The /tokenize answer for a decoded body (APIError 400 on a bad one)."""
    check_model(check_object(body), model_id)
    if body.get("messages") is not None:
        add = body.get("add_generation_prompt", True)
        if not isinstance(add, bool):
            raise invalid("'add_generation_prompt' must be a boolean", "add_generation_prompt", "invalid_type")
        text = render(template, check_messages(body["messages"]), add)
        param = "messages"
    else:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise invalid(f"'prompt' must be a string, got {json_type(text)}", "prompt", "invalid_type")
        param = "prompt"
    for flag in ("add_special_tokens", "return_token_strs"):
        if not isinstance(body.get(flag, False), bool):
            raise invalid(f"'{flag}' must be a boolean", flag, "invalid_type")
    check_text_length(text, 64 * block_size, param)  # longer than the context is allowed here, not unbounded
    tokens = tokenizer.encode(text)
    strs = [token_string(tokenizer, t) for t in tokens] if body.get("return_token_strs") else None
    return {"count": len(tokens), "max_model_len": block_size, "tokens": tokens, "token_strs": strs}


def detokenize(body: Any, *, model_id: str, tokenizer, vocab_size: int) -> dict:
    """The /detokenize answer for a decoded body."""
    check_model(check_object(body), model_id)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise invalid("'tokens' must be an array of token ids", "tokens", "invalid_type")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise invalid(f"'tokens' has token id {bad[0]} outside the vocabulary [0, {vocab_size})", "tokens")
    return {"prompt": tokenizer.decode(tokens)}


def tokenizer_info(template: ChatTemplate, block_size: int) -> dict:
    """What the HF tokenizer files say (gpt2.tokenizer.write_hf_tokenizer_files), plus the chat template."""
    return {
        "tokenizer_class": "GPT2TokenizerFast",
        "model_max_length": block_size,
        "bos_token": EOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "unk_token": EOT_TOKEN,
        "pad_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": template.source,
    }
