"""Publishing files and directories: the one home of atomic writes and fsync (and of reading the
JSON files back with one-line errors).

Everything gpt2 writes that someone else reads (shards, manifests, checkpoints, exports, JSON results)
is written under a hidden temporary name beside its destination, flushed, and renamed into place, so
a reader never sees half a file and a crash or a full disk leaves the previous version intact. The
published file gets the permissions any new file of this process would get (0666 minus the umask),
not the 0600 of a temporary file, so other users, containers and a serving account can read it.

Where a file or directory cannot be opened or synced (Windows directories, some network filesystems)
the fsync helpers do nothing rather than fail the save.

A write that fails for lack of space (or a quota, a file-size limit, a lost mount) raises WriteError,
one line naming the file, whichever library did the writing (safetensors and torch.save report it in
their own words); what the path held before is untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class WriteError(OSError):
    """A file could not be written (a full disk, a quota, a lost mount); what it held before is intact."""

    def __init__(self, path: str | Path, reason: str, *, space: bool = True) -> None:
        super().__init__(f"could not write {path} ({reason}{'; is the disk full?' if space else ''})")
        self.path, self.reason = Path(path), reason


# How safetensors ("I/O error: ... (os error 28)") and torch.save ("[enforce fail at inline_container.cc]
# ... unexpected pos", "file write failed") report a failed write.
_IO_FAILURE = re.compile(r"os error \d+|I/O error|inline_container|file write failed|unexpected pos", re.IGNORECASE)
_OS_ERROR = re.compile(r"os error (\d+)")
_SPACE_ERRNOS = tuple(getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT", "EIO") if hasattr(errno, n))


def as_write_error(path: str | Path, error: BaseException) -> WriteError | None:
    """`error`, raised while writing `path`, as a WriteError; None when it is not an I/O failure."""
    if isinstance(error, WriteError):
        return error
    if isinstance(error, OSError):
        space = error.errno in (None, *_SPACE_ERRNOS)  # not for a missing directory or a permission
        return WriteError(path, error.strerror or str(error), space=space)
    if not isinstance(error, Exception):
        return None  # Ctrl-C and exits stay what they are
    text = str(error)
    if _IO_FAILURE.search(text) is None:
        return None
    number = _OS_ERROR.search(text)
    if number is None:
        return WriteError(path, "the write failed")
    return WriteError(path, os.strerror(int(number.group(1))), space=int(number.group(1)) in _SPACE_ERRNOS)


def fsync_path(path: Path) -> None:
    """Flush one file's data, or a directory's entries (a rename into it), to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file directly in `directory`, then the directory itself."""
    for p in directory.iterdir():
        if p.is_file():
            fsync_path(p)
    fsync_path(directory)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 4 MB blocks (constant memory for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process's umask (read without changing it where the OS lets us)."""
    try:  # Linux: /proc tells without a race
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_file_mode() -> int:
    """The mode open() gives a new file in this process: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Publish `path` atomically: `write(tmp)` writes the content to a temporary path beside it,
    which is flushed, given normal permissions and renamed over `path`. On any error (a full disk,
    Ctrl-C) the temporary file is removed and `path` keeps its old content; a failed write is a
    WriteError naming `path`. Returns `path`."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise as_write_error(path, e) from e
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, normal_file_mode())
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        failure = as_write_error(path, e)
        if failure is None:
            raise
        raise failure from e
    fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Publish `data` as the file `path` (see atomic_write)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Publish UTF-8 `text` as the file `path` (see atomic_write)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, sort_keys: bool = False) -> Path:
    """Publish `obj` as indented JSON with a final newline (see atomic_write)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object in the file `path`; a one-line ValueError naming it when it is not UTF-8, not
    JSON or not an object, ending with `fix` (what the user can do)."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); {fix}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def publish_dir(tmp: Path, final: Path) -> Path:
    """Make the finished directory `tmp` appear as `final` in one rename (its files flushed first).
    An existing `final` (the same content saved again) is moved aside, replaced, then deleted, so at
    every moment one complete version exists under `final` or its aside name."""
    fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(final.parent)
    return final


def fresh_tmp_dir(final: Path) -> Path:
    """An empty hidden directory `.NAME.tmp` beside `final` to build it in (a leftover of a killed
    save is removed first)."""
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def remove_dir(path: Path) -> None:
    """Delete a published directory: renamed to a hidden name first, so a half-deleted directory is
    never mistaken for a complete one."""
    trash = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
