"""`--data FILE`: a run that tokenizes its own text into RUN_DIR/data at its first start, and the
quickstart's built-in corpus."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gpt2.fileio import atomic_write_text
from gpt2.training.config import BUILTIN_CORPUS

SMALL_FILE = 64 << 20  # below this, one tokenizer process beats starting a pool


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


def prepare_data(spec: str, out: Path, run_dir: Path, log: Callable[[str], None]) -> Path:
    """Tokenize --data (a file, or the built-in corpus) into `out` once; return `out`."""
    from gpt2.prepare import MANIFEST, prepare

    if (out / MANIFEST).is_file() and json.loads((out / MANIFEST).read_text()).get("complete"):
        return out  # prepared by an earlier start of this run
    if spec == BUILTIN_CORPUS:
        source = run_dir / "corpus" / "python-docs.jsonl"
        source.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(source, builtin_corpus())
        log(f"data: {BUILTIN_CORPUS} = CPython's documentation topics (pydoc_data), written to {source}")
    else:
        source = Path(spec).expanduser()
        if not source.is_file():
            raise FileNotFoundError(f"--data {spec}: no such file; pass a .txt/.jsonl file or {BUILTIN_CORPUS}")
    small = source.stat().st_size < SMALL_FILE
    result = prepare([str(source)], out, workers=1 if small else None, log=log)
    log(f"data: tokenized {source} into {out}: {result.train_tokens:,} train + {result.val_tokens:,} val tokens")
    return out
