"""Benchmark data: HellaSwag and LAMBADA examples loaded and checked from local jsonl files, or from a
cached download of the original files."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt2.fileio import atomic_write

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"


def default_cache_dir() -> Path:
    """Where downloaded evaluation data is kept: ~/.cache/gpt2."""
    return Path.home() / ".cache" / "gpt2"


@dataclass(frozen=True)
class HellaSwagExample:
    """One HellaSwag item: a context, 4 candidate endings and the index of the right one."""

    ind: int
    ctx: str
    endings: tuple[str, str, str, str]
    label: int
    activity_label: str = ""
    ctx_a: str | None = None  # present in the original jsonl and the HF dataset; used by prompt="lm-eval"
    ctx_b: str | None = None


@dataclass(frozen=True)
class LambadaExample:
    """One LAMBADA item: the passage without its last word, and that word with its leading space."""

    context: str
    target: str


def load_hellaswag(
    path: str | Path | None = None, *, cache_dir: str | Path | None = None, url: str = HELLASWAG_URL
) -> list[HellaSwagExample]:
    """HellaSwag validation examples from a local jsonl (one {"ind", "activity_label", "ctx", "label",
    "endings"} object a line, as in the original file or ../shared), or, with path=None, from the cached
    download of the original validation file (fetched from `url` into cache_dir on first use)."""
    if path is None:
        path = cached_download(url, Path(cache_dir or default_cache_dir()) / "hellaswag" / Path(url).name)
    return [_hellaswag_example(obj, where, i) for i, (where, obj) in enumerate(_jsonl(path, "HellaSwag"))]


def load_lambada(
    path: str | Path | None = None, *, cache_dir: str | Path | None = None, url: str = LAMBADA_URL
) -> list[LambadaExample]:
    """LAMBADA (OpenAI version) from a local jsonl of {"context", "continuation"} (../shared's format) or
    of {"text"} (OpenAI's lambada_test.jsonl: the last space-separated word is the target), or, with
    path=None, from the cached download of OpenAI's file."""
    if path is None:
        path = cached_download(url, Path(cache_dir or default_cache_dir()) / "lambada" / Path(url).name)
    return [_lambada_example(obj, where) for where, obj in _jsonl(path, "LAMBADA")]


def cached_download(url: str, dest: Path) -> Path:
    """dest, downloading url to it first (published atomically, see gpt2.fileio) if it is missing."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(dest, lambda tmp: _download(url, tmp))
    except OSError as e:  # URLError, HTTPError, timeouts and disk errors are all OSErrors
        reason = f"{type(e).__name__}: {e}"
        raise DownloadError(f"could not download {url} ({reason}); pass a local file with --data PATH", reason) from e
    return dest


class DownloadError(RuntimeError):
    """Evaluation data could not be downloaded (offline, say); `reason` is why, without advice."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


def _download(url: str, path: Path) -> None:
    with open(path, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            f.write(chunk)


def _jsonl(path: str | Path, what: str) -> Iterator[tuple[str, dict]]:
    """(where = 'path:line', object) for each non-blank line, with one-line errors for bad input."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = "it is a directory" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{what} data {path} not found ({hint}); pass the path of its .jsonl file")
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {e.start}); pass a UTF-8 .jsonl file") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _field(obj: dict, name: str, where: str, kind: type | tuple[type, ...]):
    if name not in obj:
        raise ValueError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _hellaswag_example(obj: dict, where: str, position: int) -> HellaSwagExample:
    ctx = _field(obj, "ctx", where, str)
    endings = _field(obj, "endings", where, list)
    if len(endings) != 4 or not all(isinstance(e, str) and e.strip() for e in endings):
        raise ValueError(f"{where}: field 'endings' must be a list of 4 non-empty strings")
    label = _field(obj, "label", where, (int, str))  # the HF dataset stores it as a string
    if isinstance(label, str):
        if not label.strip().isdigit():
            raise ValueError(f"{where}: field 'label' is {label!r}; expected 0, 1, 2 or 3 (test data has no labels)")
        label = int(label)
    if not 0 <= label <= 3:
        raise ValueError(f"{where}: field 'label' is {label}; expected 0, 1, 2 or 3")
    ind = obj.get("ind", position)
    if not isinstance(ind, int) or isinstance(ind, bool):
        raise ValueError(f"{where}: field 'ind' has the wrong type ({type(ind).__name__})")
    activity = obj.get("activity_label", "")
    ctx_a, ctx_b = obj.get("ctx_a"), obj.get("ctx_b")
    if not isinstance(activity, str) or not all(v is None or isinstance(v, str) for v in (ctx_a, ctx_b)):
        raise ValueError(f"{where}: fields 'activity_label', 'ctx_a', 'ctx_b' must be strings")
    return HellaSwagExample(ind, ctx, tuple(endings), label, activity, ctx_a, ctx_b)


def _lambada_example(obj: dict, where: str) -> LambadaExample:
    if "text" in obj and "context" not in obj:
        return _last_word_example(_field(obj, "text", where, str), where)
    context = _field(obj, "context", where, str)
    continuation = _field(obj, "continuation", where, str)
    if not context.strip() or not continuation.strip():
        raise ValueError(f"{where}: fields 'context' and 'continuation' must be non-empty")
    # ../shared's file is OpenAI's text cut at the last space: join the two halves with that space (unless
    # the context kept it) and split as a {"text"} line, so "saw the" + "\n\nrecorder" scores " \n\nrecorder"
    # as lm-eval-harness does, not "\n\nrecorder" without the joining space.
    joiner = "" if context.endswith(" ") else " "
    return _last_word_example(context + joiner + continuation, where)


def _last_word_example(text: str, where: str) -> LambadaExample:
    """The passage without its last space-separated word, and " " + that word (lm-eval-harness's split)."""
    text = text.rstrip()
    if " " not in text:
        raise ValueError(f"{where}: field 'text' has no space to split off the last word")
    context, word = text.rsplit(" ", 1)
    return LambadaExample(context, " " + word)
