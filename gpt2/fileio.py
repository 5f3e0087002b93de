"""Durable writes: the one home of fsync for shards, checkpoints and sharded checkpoints.

Atomic saves write under a temporary name and rename; these make the bytes and the rename reach the
disk before anyone relies on them (POSIX). Where a file or directory cannot be opened or synced
(Windows directories, some network filesystems) they do nothing rather than fail the save.
"""

from __future__ import annotations

import os
from pathlib import Path


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
