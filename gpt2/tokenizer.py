"""GPT-2's byte-level BPE through tiktoken, working offline.

Decision: the package ships OpenAI's rank file `assets/gpt2.tiktoken` (835,554 bytes, MIT,
notice in `assets/LICENSE-gpt2-bpe.txt`; taken from the `openai-whisper` sdist on PyPI) and
builds the encoding from it, so a fresh machine without network tokenizes exactly like
`tiktoken.get_encoding("gpt2")` (ids identical; checked in tests). Its sha256 is verified
on first load.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import tiktoken

from gpt2.config import VOCAB_SIZE
from gpt2.fileio import atomic_write_json, atomic_write_text

ASSETS = Path(__file__).parent / "assets"
RANKS_FILE = ASSETS / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenizer regex (contractions, letters, digits, other, whitespace).
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@lru_cache(maxsize=1)
def mergeable_ranks() -> dict[bytes, int]:
    """OpenAI's BPE ranks: token bytes -> id (0..50255)."""
    data = RANKS_FILE.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(f"{RANKS_FILE} is corrupt (sha256 {digest}); reinstall the gpt2 package")
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    """The tiktoken Encoding for GPT-2, built from the shipped rank file."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=PATTERN,
        mergeable_ranks=mergeable_ranks(),
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


class Tokenizer:
    """GPT-2 BPE: text <-> token ids. `<|endoftext|>` in text is encoded as the special id 50256."""

    eot_id: int = EOT_ID
    vocab_size: int = VOCAB_SIZE

    def __init__(self) -> None:
        self.enc = encoding()

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of `text`. With allow_special=False, '<|endoftext|>' is encoded as plain text."""
        if allow_special:
            return self.enc.encode(text, allowed_special={EOT_TOKEN})
        return self.enc.encode_ordinary(text)

    def encode_batch(
        self, texts: Iterable[str], *, allow_special: bool = True, num_threads: int = 8
    ) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel threads (tiktoken releases the GIL)."""
        texts = list(texts)
        if allow_special:
            return self.enc.encode_batch(texts, num_threads=num_threads, allowed_special={EOT_TOKEN})
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. Ids outside the vocabulary (e.g. a padded vocab's extra rows) decode to
        nothing, and a split multi-byte character decodes to U+FFFD, so decoding never fails."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of `ids` (for streaming: join bytes, then decode complete characters)."""
        return self.enc.decode_bytes([int(i) for i in ids if 0 <= int(i) < VOCAB_SIZE])


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (used by vocab.json)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)  # ~0.8 s: computed once per process, however many checkpoints it saves
def hf_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The HuggingFace files' contents (vocab.json dict, merges.txt lines), derived from the ranks.

    Every multi-byte token of rank r is the merge of the two parts that BPE with ranks < r
    leaves; the merges, in rank order, are those pairs.
    """
    ranks = mergeable_ranks()
    b2u = byte_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    vocab[EOT_TOKEN] = EOT_ID
    merges = []
    for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = [bytes([b]) for b in tok]
        while len(parts) > 2:  # replay BPE: merge the lowest-ranked adjacent pair
            best = min(
                range(len(parts) - 1),
                key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 30),
            )
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        merges.append(f"{to_str(parts[0])} {to_str(parts[1])}")
    return vocab, merges


def fits_vocab(vocab_size: int) -> bool:
    """Whether a model with this many embedding rows can use GPT-2's BPE (a padded vocabulary such as
    50304 can; a small test vocabulary cannot, and gets no tokenizer files)."""
    return vocab_size >= VOCAB_SIZE


def write_hf_tokenizer_files(directory: str | Path, model_max_length: int = 1024) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json so AutoTokenizer loads GPT-2's BPE
    (the directory is made if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = hf_vocab_and_merges()
    atomic_write_text(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "bos_token": EOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "unk_token": EOT_TOKEN,
        "add_prefix_space": False,
    }
    atomic_write_json(directory / "tokenizer_config.json", config)
