"""Atomic file writes: a unique temporary name beside the target, fsync, rename, fsync the directory.

Readers never see a half-written file, a crash or a full disk leaves the previous file intact,
two writers of one path never share a temporary name, and the final file gets the permissions
a plain ``open()`` would give it (the umask decides, not ``mkstemp``'s 0600).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "temp_name"]


def temp_name(path: Path) -> Path:
    """A temporary name beside ``path`` that no other process or call uses."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
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


def atomic_write(path: str | os.PathLike, data: bytes | str | Iterable[bytes | str]) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or an iterable of chunks) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    chunks = [data] if isinstance(data, (bytes, str)) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c.encode("utf-8") if isinstance(c, str) else c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
