"""POSIX shared-memory segments under ``/dev/shm``, named so a crash can be cleaned up.

Python's ``multiprocessing.shared_memory`` registers every attach with a resource
tracker that may unlink segments it does not own; a segment here has exactly one
owner (the process that created it, which alone unlinks it) and any number of
attached readers or writers.

Names: ``batchferry_<owner pid>_<token>_<n>``. :func:`remove_stale` unlinks the
segments of owners that no longer run, which is how a server that was killed
leaves nothing behind after its next start.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
from pathlib import Path

import torch

__all__ = ["PREFIX", "Segment", "new_name", "remove_stale"]

SHM_DIR = Path("/dev/shm")
PREFIX = "batchferry_"
_NAME = re.compile(rf"^{PREFIX}(\d+)_[0-9a-f]+_\d+$")


def new_name(token: str, n: int) -> str:
    return f"{PREFIX}{os.getpid()}_{token}_{n}"


def new_token() -> str:
    return secrets.token_hex(4)


class Segment:
    """One mapped segment. ``tensor`` is a uint8 view of all of it."""

    def __init__(self, name: str, size: int, *, create: bool) -> None:
        if "/" in name or not name:
            raise ValueError(f"invalid segment name {name!r}")
        self.name = name
        self._owner = create
        path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # Reserve the pages now: a full /dev/shm then fails here with ENOSPC
                # instead of killing a writer with SIGBUS later.
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError:
                    os.unlink(path)
                    raise
            else:
                size = os.fstat(fd).st_size
            self.size = size
            self._mmap = mmap.mmap(fd, size) if size else None
        finally:
            os.close(fd)
        self.tensor = (
            torch.frombuffer(self._mmap, dtype=torch.uint8)
            if self._mmap is not None
            else torch.empty(0, dtype=torch.uint8)
        )

    def memory(self) -> memoryview:
        """A memoryview of the whole mapping; release it (``with``) before close()."""
        if self._mmap is None:
            return memoryview(b"")
        return memoryview(self._mmap)

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        return cls(name, size, create=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        return cls(name, 0, create=False)

    def close(self, unmap: bool = True) -> None:
        """Unlink (the owner) and unmap.

        ``torch.frombuffer`` keeps a reference to the mapping but no buffer export,
        so unmapping under a live view would leave it pointing at nothing. Where
        tensors may still view the segment, pass ``unmap=False``: the mapping then
        goes when the last of them is collected.
        """
        self.tensor = torch.empty(0, dtype=torch.uint8)
        if self._mmap is not None:
            if unmap:
                with contextlib.suppress(BufferError):
                    self._mmap.close()
            self._mmap = None
        if self._owner:
            self._owner = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_DIR / self.name)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Unlink segments whose owning process is gone; return their names."""
    removed: list[str] = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.iterdir():
        match = _NAME.match(path.name)
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    return removed
