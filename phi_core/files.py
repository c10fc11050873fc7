"""Reading a file a checkpoint names, safely: a regular file of sane size, read without blocking, as UTF-8.

The lowest layer of phi_core's file access (``config.py`` reads ``config.json`` through it); which files a
checkpoint may name at all is decided one layer up, in :mod:`phi_core.checkpoint`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from phi_core.errors import CheckpointError

# config.json, shard indexes and tokenizer files are a few MB at most (phi's tokenizer.json: 2 MB); anything much
# larger is not a real one and is refused before it is read into memory.
TEXT_LIMIT = 64 * 2**20


def read_text_file(path: Path, limit: int = TEXT_LIMIT) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes. Opened without blocking and checked on the open
    handle, so a FIFO, a device or a file swapped in after a check is refused rather than read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({first_line(exc)})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: not a regular file; refused")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path}: more than the {limit:,} bytes such a file can need; refused")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for one-line error messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
