"""POSIX shared memory under ``/dev/shm``: segments, their owner, and clean-up whatever kills it.

Names: ``batchferry_<token>_<n>`` for segments and ``batchferry_<token>.owner`` for
the lock file of their owner. A token belongs to one :class:`Arena` (one server's
ring), which holds an exclusive ``flock`` on its owner file for as long as it
lives. Any process sharing ``/dev/shm``, in any PID namespace, can therefore tell
a live owner from a dead one by trying that lock (:func:`remove_stale`); process
ids never decide it. A small reaper process, started with the arena, unlinks the
arena's segments when its owner dies without closing it (kill -9, OOM killer).

A segment has exactly one owner, the process that created it, which alone unlinks
it; any number of processes attach to it. Readers that map a segment to read
batches (clients) hold a shared ``flock`` on it for as long as their mapping
lives: the kernel drops it when the last mapping or descriptor goes, so the owner
can ask :meth:`Segment.mapped_elsewhere` to learn when memory it gave away has
really been freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import mmap
import os
import re
import secrets
import subprocess
import sys
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch only where a tensor is asked for: receiver processes never load it
    import torch

__all__ = [
    "PREFIX",
    "SHM_DIR",
    "Arena",
    "Mappings",
    "Segment",
    "capacity",
    "owned_by",
    "owner_gone",
    "privatize",
    "remove_stale",
    "stale",
]

SHM_DIR = Path("/dev/shm")
PREFIX = "batchferry_"
_TOKEN_HEX = 16
_SEGMENT = re.compile(rf"^{PREFIX}([0-9a-f]{{{_TOKEN_HEX}}})_(\d+)$")
_OWNER = re.compile(rf"^{PREFIX}([0-9a-f]{{{_TOKEN_HEX}}})\.owner$")
_LOCK_WAIT = 1.0  # seconds a reader retries its shared lock while an owner tests it

# Run as `python -I -S -c _REAPER DIR TOKEN` with the owner holding the write end of
# its stdin: EOF means the owner is gone, however it ended. Signals meant for the
# owner's process group must not stop the reaper before the owner is gone.
_REAPER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while sys.stdin.buffer.read(4096):
    pass
folder, prefix = sys.argv[1], "batchferry_" + sys.argv[2]
for name in os.listdir(folder):
    if name.startswith(prefix + "_") or name == prefix + ".owner":
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass
"""


def capacity() -> int:
    """Bytes /dev/shm holds in all (a container's is often far smaller than the host's)."""
    stat = os.statvfs(SHM_DIR)
    return stat.f_blocks * stat.f_frsize


def _owner_path(token: str) -> Path:
    return SHM_DIR / f"{PREFIX}{token}.owner"


class _Mapping:
    """One ``mmap`` of a segment, unmapped when the last array over it is gone.

    Made with libc's mmap rather than Python's: Python's keeps a duplicate of the
    file descriptor for as long as the mapping lives, which a caller keeping a
    thousand batches would pay for in descriptors, and which would keep a reader's
    flock (held by the open file, which the mapping keeps too) past the mapping.
    """

    __slots__ = ("__weakref__", "address", "size")

    def __init__(self, fd: int, size: int) -> None:
        libc = _c()
        address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.address, self.size = int(address), size
        # Not at exit: the process's mappings go with it, and a thread may still read one.
        weakref.finalize(self, libc.munmap, address, size).atexit = False

    def array(self) -> np.ndarray:
        """A uint8 array over all of it; the mapping lives as long as the array (and its views)."""
        buffer: Any = _buffer_type(self.size).from_address(self.address)
        buffer.mapping = self  # keeps the mapping while numpy (and torch) hold the buffer
        return np.frombuffer(buffer, dtype=np.uint8)


@functools.cache
def _buffer_type(size: int) -> type[ctypes.Array[ctypes.c_uint8]]:
    # A subclass, so that instances can hold their mapping as an attribute.
    return type("MappedBytes", (ctypes.c_uint8 * size,), {})


class Segment:
    """One segment and this process's mapping of it.

    The mapping stays valid while arrays made by :meth:`array` (and tensors made
    from them) live, even after :meth:`close`: it is unmapped with the last of them.
    """

    def __init__(self, name: str, fd: int, size: int, *, owner: bool) -> None:
        self.name = name
        self.size = size
        self._fd = fd
        self._owner = owner
        self._linked = owner
        self._whole: np.ndarray | None = _Mapping(fd, size).array() if size else None

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        """Create, reserve and map ``size`` bytes; ``OSError`` (ENOSPC) when /dev/shm is full."""
        _check_name(name)
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve the pages now: a full /dev/shm fails here with ENOSPC instead
            # of killing a writer with SIGBUS later.
            os.posix_fallocate(fd, 0, size)
            return cls(name, fd, size, owner=True)
        except BaseException:
            os.unlink(path)
            os.close(fd)
            raise

    @classmethod
    def attach(cls, name: str, *, shared_lock: bool = False) -> Segment:
        """Map an existing segment; with ``shared_lock`` hold a shared flock while mapped."""
        _check_name(name)
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            if shared_lock:
                _lock_shared(fd)
            return cls(name, fd, os.fstat(fd).st_size, owner=False)
        except BaseException:
            os.close(fd)
            raise

    def array(self, nbytes: int | None = None) -> np.ndarray:
        """A uint8 array over the first ``nbytes`` of the mapping (all of it by default)."""
        if self._whole is None:
            return np.empty(0, dtype=np.uint8)
        return self._whole if nbytes is None else self._whole[:nbytes]

    def tensor(self, nbytes: int | None = None) -> torch.Tensor:
        """A uint8 tensor over the first ``nbytes`` of the mapping."""
        import torch  # noqa: PLC0415 (see the import above)

        return torch.from_numpy(self.array(nbytes))

    def address(self) -> int:
        """Where the mapping starts in this process."""
        return int(self._whole.ctypes.data) if self._whole is not None else 0

    def unlinked(self) -> bool:
        """True once the owner removed the name (the memory lives while mapped)."""
        return os.fstat(self._fd).st_nlink == 0 if self._fd >= 0 else True

    def mapped_elsewhere(self) -> bool:
        """Owner: whether another process still holds the segment mapped for reading."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def unlink(self) -> None:
        """Owner: remove the name; mappings (here and elsewhere) stay valid."""
        if self._owner and self._linked:
            self._linked = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_DIR / self.name)

    def unmap(self) -> None:
        """Drop this object's reference to the mapping (arrays over it keep it mapped)."""
        self._whole = None

    def close(self) -> None:
        """Unlink (owner), drop the mapping reference and the descriptor. Idempotent."""
        self.unlink()
        self.unmap()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_name(name: str) -> None:
    if not name or "/" in name or not name.startswith(PREFIX):
        raise ValueError(f"invalid segment name {name!r}")


def _lock_shared(fd: int) -> None:
    # An owner testing the lock holds it exclusively for a moment only.
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise OSError(errno.EWOULDBLOCK, "segment stayed locked by its owner") from None
            time.sleep(0.001)


class Arena:
    """Owner of one token's segments: the owner lock, the reaper, and unlinking at close."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(_TOKEN_HEX // 2)
        self._next = 0
        self._lock_fd = _claim(_owner_path(self.token))
        self._reaper: subprocess.Popen[bytes] | None = None
        # A process forked from the owner must not keep the owner lock or the reaper's
        # pipe open: the owner's death would go unnoticed while the child lives.
        os.register_at_fork(after_in_child=functools.partial(_disown, weakref.ref(self)))
        try:
            self._reaper = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _REAPER, str(SHM_DIR), self.token],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C reaches the owner only
            )
        except BaseException:
            self.close()
            raise

    def name(self, n: int) -> str:
        return f"{PREFIX}{self.token}_{n}"

    def create(self, size: int) -> Segment:
        """A new segment of ``size`` bytes under this arena's token."""
        self._next += 1
        return Segment.create(self.name(self._next), size)

    def close(self, timeout: float = 5.0) -> None:
        """Unlink every segment of the token and the owner file; stop the reaper."""
        if self._lock_fd < 0:
            return
        _unlink_token(self.token, include_owner=True)
        os.close(self._lock_fd)
        self._lock_fd = -1
        if self._reaper is not None:
            assert self._reaper.stdin is not None
            self._reaper.stdin.close()  # EOF: it finds nothing left and exits
            try:
                self._reaper.wait(timeout)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait(timeout)
            self._reaper = None


def _disown(ref: weakref.ref[Arena]) -> None:
    arena = ref()
    if arena is None or arena._lock_fd < 0:
        return
    with contextlib.suppress(OSError):
        os.close(arena._lock_fd)
    arena._lock_fd = -1  # close() in the child unlinks nothing
    if arena._reaper is not None and arena._reaper.stdin is not None:
        with contextlib.suppress(OSError):
            arena._reaper.stdin.close()
    arena._reaper = None


def _claim(path: Path) -> int:
    """Create ``path`` already locked: made under a temporary name, locked, then renamed,
    so that nobody can see it unlocked and take its owner for dead. It holds the
    owner's process id, for people and tools (liveness is the lock, never the id)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        os.close(fd)
        raise
    return fd


def _unlink_token(token: str, *, include_owner: bool) -> list[str]:
    removed = []
    for path in SHM_DIR.iterdir():
        match = _SEGMENT.match(path.name)
        if match and match.group(1) == token:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    if include_owner:
        with contextlib.suppress(FileNotFoundError):
            _owner_path(token).unlink()
    return removed


def _owner_alive(token: str) -> bool:
    """Whether the owner of ``token`` still holds its lock (no owner file: gone)."""
    try:
        fd = os.open(_owner_path(token), os.O_RDWR)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True  # another user's: leave it to them
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases our lock, if we took it
    return False


def owner_gone(name: str, wait: float = _LOCK_WAIT) -> bool:
    """Whether the owner of segment ``name`` has ended, or ends within ``wait`` seconds
    (an owner closing unlinks its segments a moment before it lets go of its lock)."""
    match = _SEGMENT.match(name)
    if match is None:
        return False
    deadline = time.monotonic() + wait
    while _owner_alive(match.group(1)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _tokens() -> dict[str, list[str]]:
    """Every token with files in /dev/shm, and those files' names."""
    tokens: dict[str, list[str]] = {}
    if SHM_DIR.is_dir():
        for path in SHM_DIR.iterdir():
            match = _SEGMENT.match(path.name) or _OWNER.match(path.name)
            if match:
                tokens.setdefault(match.group(1), []).append(path.name)
    return tokens


def owned_by(pid: int) -> list[str]:
    """Names of the segments (and owner files) whose owner file says process ``pid``."""
    out = []
    for token, names in _tokens().items():
        try:
            owner = int(_owner_path(token).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if owner == pid:
            out += names
    return sorted(out)


def stale() -> list[str]:
    """Names of segments and owner files whose owner no longer holds its lock."""
    return sorted(name for token, names in _tokens().items() if not _owner_alive(token) for name in names)


def remove_stale() -> list[str]:
    """Unlink the segments (and owner files) of owners that no longer hold their lock."""
    removed: list[str] = []
    for token in sorted(_tokens()):
        if not _owner_alive(token):
            removed += _unlink_token(token, include_owner=True)
    return removed


class Mappings:
    """A bounded cache of attached segments, by name (workers and clients map each slot once).

    Segments the owner has unlinked are dropped by :meth:`prune`, so replaced slots do
    not keep memory alive here. Not thread-safe: one owner.
    """

    def __init__(self, max_segments: int, *, shared_lock: bool = False) -> None:
        self.max_segments = max_segments
        self._shared_lock = shared_lock
        self._segments: OrderedDict[str, Segment] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self._segments

    def get(self, name: str) -> tuple[Segment, bool]:
        """The attached segment, and whether it was attached just now (``OSError`` if it cannot be)."""
        seg = self._segments.get(name)
        if seg is not None:
            self._segments.move_to_end(name)
            return seg, False
        self.prune()  # a new name usually means an old one was replaced
        seg = self._segments[name] = Segment.attach(name, shared_lock=self._shared_lock)
        while len(self._segments) > self.max_segments:
            self._drop(self._segments.popitem(last=False)[1])
        return seg, True

    def forget(self, name: str) -> Segment | None:
        seg = self._segments.pop(name, None)
        if seg is not None:
            self._drop(seg)
        return seg

    def prune(self) -> list[Segment]:
        """Drop segments whose name the owner removed."""
        gone = [seg for seg in self._segments.values() if seg.unlinked()]
        for seg in gone:
            del self._segments[seg.name]
            self._drop(seg)
        return gone

    def _drop(self, seg: Segment) -> None:
        self.on_drop(seg)
        seg.close()

    def on_drop(self, seg: Segment) -> None:
        """Hook: called before a segment leaves the cache."""

    def close(self) -> None:
        while self._segments:
            self._drop(self._segments.popitem()[1])


# -- copying a batch out of a segment without moving it -------------------------------------

_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
        ]  # fmt: skip
        lib.mremap.restype = ctypes.c_void_p
        lib.mremap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc


def privatize(mapping: np.ndarray, nbytes: int) -> bool:
    """Turn this process's mapping of a segment into private memory, in place.

    ``mapping`` is a uint8 array over a whole mapping (:meth:`Segment.array`; it keeps
    the mapping alive while this runs). Its first ``nbytes`` are copied into
    anonymous pages that then replace the mapping at the same addresses
    (``mremap``), so tensors viewing it keep their values while the segment itself
    may be reused by its owner. The caller must not use this mapping for the
    segment again. False where this is not possible (not Linux, or the kernel
    refused); the mapping is then unchanged.
    """
    if not sys.platform.startswith("linux") or mapping.nbytes == 0:
        return False
    try:
        libc = _c()
    except OSError:
        return False
    length = -(-mapping.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    target = int(mapping.ctypes.data)
    fresh = libc.mmap(
        None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0
    )
    if fresh in (None, _MAP_FAILED):
        return False
    ctypes.memmove(fresh, target, min(nbytes, mapping.nbytes))
    moved = libc.mremap(fresh, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, target)
    if moved != target:
        libc.munmap(fresh, length)
        return False
    return True
