"""`--data FILE`: a run that tokenizes its own text into RUN_DIR/data at its first start, and the
quickstart's built-in corpus."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gpt2.fileio import atomic_write_json, atomic_write_text, remove_dir, sha256_file
from gpt2.training.config import BUILTIN_CORPUS

SMALL_FILE = 64 << 20  # below this, one tokenizer process beats starting a pool
SOURCE_RECORD = "source.json"  # in RUN_DIR/data: the size and sha256 of the file its shards hold


def builtin_corpus() -> str:
    """The quickstart corpus: CPython's documentation topics (`pydoc_data.topics`, about 465 kB of
    English about Python, ~139k GPT-2 tokens), which ships with every Python install, as JSON lines."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise FileNotFoundError(
            "this Python has no pydoc_data (its documentation topics were stripped); pass --data FILE.txt"
        ) from e
    return "".join(json.dumps({"text": topics[k].strip()}) + "\n" for k in sorted(topics))


def prepare_data(spec: str, out: Path, run_dir: Path, log: Callable[[str], None], *, new_run: bool = True) -> Path:
    """Tokenize --data (a file, or the built-in corpus) into `out` once; return `out`.

    A new run trains on exactly the file it names: shards in `out` from another file (or an earlier
    version of this one), left by a start that failed before its first checkpoint, are deleted and
    the file is tokenized afresh. A resumed run reads the shards it was trained on."""
    from gpt2.prepare import MANIFEST, prepare

    if not new_run and _complete(out / MANIFEST):
        return out
    source = _source_file(spec, run_dir, log)
    identity = {"data": spec, "bytes": source.stat().st_size, "sha256": sha256_file(source)}
    if out.exists() and _recorded_source(out) != identity:
        log(f"data: {out} holds the tokens of an earlier start's data; tokenizing {spec} afresh")
        remove_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SOURCE_RECORD, identity)
    small = source.stat().st_size < SMALL_FILE
    result = prepare([str(source)], out, workers=1 if small else None, log=log)
    log(f"data: tokenized {source} into {out}: {result.train_tokens:,} train + {result.val_tokens:,} val tokens")
    return out


def _source_file(spec: str, run_dir: Path, log: Callable[[str], None]) -> Path:
    """The file --data names; the built-in corpus is written into RUN_DIR/corpus first."""
    if spec == BUILTIN_CORPUS:
        source = run_dir / "corpus" / "python-docs.jsonl"
        source.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(source, builtin_corpus())
        log(f"data: {BUILTIN_CORPUS} = CPython's documentation topics (pydoc_data), written to {source}")
        return source
    source = Path(spec).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"--data {spec}: no such file; pass a .txt/.jsonl file or {BUILTIN_CORPUS}")
    return source


def _complete(manifest: Path) -> bool:
    try:
        return bool(json.loads(manifest.read_bytes()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def _recorded_source(out: Path) -> dict | None:
    """What RUN_DIR/data/source.json says the shards were tokenized from (None: unknown)."""
    try:
        return json.loads((out / SOURCE_RECORD).read_bytes())
    except (OSError, ValueError):
        return None
