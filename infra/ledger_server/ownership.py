"""One process per embedded ClickHouse directory, with an error that names the owner.

chdb opens a data directory in one process at a time and refuses a second one with an opaque
message; claiming the directory first (an exclusive lock on a file inside it, which the
kernel drops when the process dies) lets the second process say who holds it and what to do.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "owner.lock"


class DirectoryInUse(RuntimeError):
    """Another process owns the directory; the message names it and what to do."""


class DirectoryClaim:
    """Held while this process uses the directory; `release` (or exiting) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def claim_directory(path: Path, owner: str) -> DirectoryClaim:
    """Claim `path` for this process; `owner` says who holds it, for the next one's error."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DirectoryInUse(
            f"the ClickHouse directory {path} is in use by {holder}: one process opens it; "
            "read and write through that one, or stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    return DirectoryClaim(path, fd)
