"""From token ids to what a completion choice shows: streamed text, stop strings, logprobs.

Text is decoded incrementally from bytes, so a character split across tokens appears once it is
complete. With stop strings, text that could still turn into a stop string is held back until it
cannot; when one appears, the text is cut before it and the choice stops (OpenAI's behaviour).
With min_tokens, a stop string counts only where it ends after the first min_tokens tokens (vLLM's
rule: no stop is looked for before them).
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from functools import lru_cache

from gpt2.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenTable:
    """Per token id, made once: its bytes, its text when it is whole UTF-8 (else None), and that
    text as a JSON string: streaming a token is then a list lookup, not a decode and an encode."""

    bytes: list[bytes]
    text: list[str | None]
    json: list[str | None]


@lru_cache(maxsize=4)
def token_table(vocab_size: int) -> TokenTable:
    """The table of ids 0..vocab_size-1 (GPT-2's BPE)."""
    tok = Tokenizer()
    data = [tok.decode_bytes([t]) if t < tok.vocab_size else b"" for t in range(vocab_size)]  # padded vocab: no text
    text = []
    for b in data:
        try:
            text.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            text.append(None)
    return TokenTable(data, text, [None if t is None else json.dumps(t) for t in text])


def token_string(tok: Tokenizer, token: int) -> str:
    """A token as text; a token that is not whole UTF-8 is written as OpenAI does, 'bytes:\\xe2\\x80'."""
    data = tok.decode_bytes([token])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class ChoiceText:
    """The text of one choice, fed token by token; `stopped` once a stop string has appeared (one
    that ends after the first min_tokens tokens)."""

    def __init__(self, table: TokenTable, stop: tuple[str, ...] = (), min_tokens: int = 0) -> None:
        self.table, self.stop = table, stop
        self.min_tokens, self.tokens = min_tokens, 0  # tokens fed so far
        self.floor = 0 if min_tokens == 0 else None  # a stop string must end past this character; None: not yet
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = False  # the decoder holds the first bytes of a character
        self.text = ""  # decoded so far (cut at a stop string)
        self.emitted = 0  # characters of text handed out
        self.stopped = False

    def add(self, tokens: list[int]) -> str:
        """Feed new tokens; return the text that can be shown now. Without stop strings, a whole
        UTF-8 token after whole characters returns the table's own string for that token."""
        if self.stopped:
            return ""
        self.tokens += len(tokens)
        if len(tokens) == 1 and not (self.stop or self.partial):
            piece = self.table.text[tokens[0]]
            if piece is not None:
                self.text += piece
                self.emitted = len(self.text)
                return piece
        self.text += self.decoder.decode(b"".join([self.table.bytes[t] for t in tokens]))
        self.partial = bool(self.decoder.getstate()[0])
        if self.floor is None and self.tokens >= self.min_tokens:
            self.floor = len(self.text)  # the text of the first min_tokens tokens
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the choice."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        safe = len(self.text)
        if self.stop and not self.stopped:
            hits = self._hits() if self.floor is not None else []
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                safe = len(self.text)
            elif not final:
                safe -= self._held_back()
        out = self.text[self.emitted : safe]
        self.emitted = safe
        return out

    def _hits(self) -> list[int]:
        """Where stop strings start that end in text not handed out yet and past the floor."""
        start = max(0, self.emitted - max(len(s) for s in self.stop) + 1)
        found = (self.text.find(s, max(start, self.floor - len(s) + 1)) for s in self.stop)
        return [i for i in found if i >= 0]

    def _held_back(self) -> int:
        """Length of the longest end of text that is the start of a stop string."""
        for n in range(min(len(self.text), max(len(s) for s in self.stop) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


def text_offsets(tok: Tokenizer, tokens: list[int], start: int = 0) -> list[int]:
    """Character offset of each token in the decoded text of `tokens` (plus start)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, n = [], start
    for t in tokens:
        offsets.append(n)
        n += len(decoder.decode(tok.decode_bytes([t])))
    return offsets


def logprobs_block(
    tok: Tokenizer,
    tokens: list[int],
    entries: list[tuple[float, list[tuple[int, float]]] | None],
    k: int,
    offset_start: int = 0,
) -> dict:
    """OpenAI's choice.logprobs: tokens, token_logprobs, top_logprobs, text_offset; an entry of
    None (the first prompt token, which nothing predicts) gives null log p and null top list."""
    token_logprobs, top = [], []
    for token, entry in zip(tokens, entries):
        if entry is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        lp, alternatives = entry
        token_logprobs.append(lp)
        d = {token_string(tok, t): v for t, v in alternatives[:k]}
        d.setdefault(token_string(tok, token), lp)  # the chosen token is always listed (OpenAI: up to k+1)
        top.append(d)
    return {
        "tokens": [token_string(tok, t) for t in tokens],
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": text_offsets(tok, tokens, offset_start),
    }
