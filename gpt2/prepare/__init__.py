"""Text -> GPT-2 token shards: `prepare(sources, out_dir)`, behind `gpt2 prepare` and `gpt2 train --data`.

Sources (strings)
  PATH, GLOB or DIR   .txt/.text/.md (a file is one document), .jsonl/.ndjson (a JSON object per line,
                      text in `text_field`), .json (an array of objects or strings, or JSON lines), each
                      optionally compressed: .gz, .xz, .zst, .bz2. A directory means every such file in it.
  hf:NAME[:CONFIG][?split=S&text_field=F&data_files=A,B&revision=R]
                      a HuggingFace dataset, streamed (never loaded whole); split/text_field default to the
                      `split`/`text_field` arguments. `hf:json?data_files=x.jsonl` reads local files through
                      `datasets`.
  fineweb-edu-10B     preset: FineWeb-Edu sample-10BT as build-nanogpt's edu_fineweb10B: shards
                      edufineweb_{val,train}_NNNNNN.bin of 100M tokens, the first shard (index 0) is val.

Every document is preceded by <|endoftext|> (50256), as GPT-2 and build-nanogpt do, and encoded as
ordinary text (a literal "<|endoftext|>" inside a document is not a boundary). Empty documents are
skipped. Undecodable UTF-8 bytes become U+FFFD; the number of replaced sequences is counted and reported.

Validation split, the first rule that applies:
  1. `val_sources` given: their documents are the val split, all other sources are train.
  2. `val_tokens` or `val_fraction` given: the first tokens of the token stream (sources in the order
     given) are val: `val_tokens` of them (over as many shards as needed), or floor(val_fraction x
     total) capped at one shard.
  3. a source whose file name is val/valid/validation (`val.jsonl.xz`, `wiki_valid.txt`,
     `validation-00000.jsonl`), or an hf source with split=validation, is a val source (rule 1).
  4. otherwise as rule 2 with val_fraction=0.1: the first 10% of the tokens, at most one shard
     (`shard_tokens`). A single-document corpus (tiny Shakespeare) is cut inside its one document.
     Until the split point is known (the end of the corpus, or 10 shards' worth of tokens) the
     tokens are held in memory; pass val_tokens to stream with constant memory.
Val shards come first: shard index 0 (and up) is val, train continues the numbering.

Output is a pure function of the sources and settings (not of `workers` or timing): workers encode
batches of documents in parallel and the results are consumed in order. Each shard is written under
a temporary name and renamed when complete; manifest.json (rewritten atomically after every shard)
records each shard's tokens, sha256 and the input position after it. Rerunning after an interruption
checks the finished shards and continues from the last good one, so the result is byte-identical to
an uninterrupted run; rerunning a complete output is a no-op. An output directory with shards of
another corpus, tokenizer or settings is refused unless `overwrite`.

Modules, in the order the text flows: sources (what to read) -> reading (bytes, lines, units) -> encode
(worker processes) -> writer (shards and manifest); split holds the val rule and pipeline the steps of
`prepare`. This package re-exports the public names.
"""

from gpt2.prepare.encode import TASK_CHARS, default_workers
from gpt2.prepare.pipeline import DEFAULT_SHARD_TOKENS, PrepareResult, prepare
from gpt2.prepare.reading import PIECE_BYTES, READ_BYTES, Unit, iter_blocks, iter_lines
from gpt2.prepare.sources import (
    COMPRESSED,
    JSON_SUFFIXES,
    JSONL_SUFFIXES,
    PRESETS,
    TEXT_SUFFIXES,
    VAL_NAME,
    Preset,
    Source,
    resolve_sources,
)
from gpt2.prepare.split import DEFAULT_VAL_FRACTION
from gpt2.prepare.writer import FORMAT, FORMAT_VERSION, MANIFEST, Cursor

__all__ = [
    "COMPRESSED",
    "DEFAULT_SHARD_TOKENS",
    "DEFAULT_VAL_FRACTION",
    "FORMAT",
    "FORMAT_VERSION",
    "JSONL_SUFFIXES",
    "JSON_SUFFIXES",
    "MANIFEST",
    "PIECE_BYTES",
    "PRESETS",
    "READ_BYTES",
    "TASK_CHARS",
    "TEXT_SUFFIXES",
    "VAL_NAME",
    "Cursor",
    "PrepareResult",
    "Preset",
    "Source",
    "Unit",
    "default_workers",
    "iter_blocks",
    "iter_lines",
    "prepare",
    "resolve_sources",
]
