"""The on-disk cache of files fetched from object storage: a size limit, LRU eviction, atomic writes.

Layout under the cache directory::

    data/KEY        whole files, each renamed into place only once complete
    part/KEY.PID.N  downloads in progress (a killed download leaves one; the next
                    process to open the cache removes it when PID is gone)
    lock/KEY        one lock file per key: one process downloads a file, the others wait
    index/          small derived files (tar shard indexes), outside the size limit
    .lock           held while files are counted and evicted

Every process (the server, its workers, other servers) works on the directory
itself, coordinated by ``flock`` locks, so several servers may share one cache
on a local disk. The least recently used file goes first: a file's time is set
on each use. A file evicted while a process still has it open or mapped stays
readable to that process (POSIX unlink); its space returns when it is closed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from batchferry.cleanup import process_alive
from batchferry.errors import DatasetError

__all__ = ["CacheFull", "FileCache"]


class CacheFull(DatasetError):
    """A file does not fit the cache: larger than ``cache_bytes``, or the disk is full."""


_counter = itertools.count()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: per open file, so threads exclude each other too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class FileCache:
    """Files by key in ``root``, at most ``max_bytes`` of them together.

    >>> cache = FileCache(Path("/tmp/c"), 1 << 30)  # doctest: +SKIP
    >>> path = cache.get("abc-x.npy", 1234, lambda tmp: download_to(tmp))
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.data, self.part, self.lock, self.index = (root / d for d in ("data", "part", "lock", "index"))
        try:
            for folder in (self.data, self.part, self.lock, self.index):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheFull(f"cache directory {root}: cannot create it: {exc.strerror or exc}") from exc
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """Downloads left by processes that died: never read, only in the way."""
        for entry in os.scandir(self.part):
            pid = entry.name.rsplit(".", 2)[-2] if entry.name.count(".") >= 2 else ""
            if not pid.isdigit() or not process_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def lookup(self, key: str) -> Path | None:
        """The cached file for ``key``, marked as just used, or None."""
        path = self.data / key
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def get(self, key: str, size: int, download: Callable[[Path], None]) -> Path:
        """The file for ``key``, downloaded by ``download(temp_path)`` first when absent.

        ``size`` is the file's size as its store reports it. A download that raises leaves
        nothing behind. Errors do not name the file: the caller does.
        """
        found = self.lookup(key)
        if found is not None:
            return found
        if size > self.max_bytes:
            raise CacheFull(
                f"{size} bytes do not fit the cache of cache_bytes={self.max_bytes} "
                f"({self.root}); raise cache_bytes"
            )
        with _locked(self.lock / key):
            found = self.lookup(key)  # another process fetched it while this one waited
            if found is not None:
                return found
            self._make_room(size, None)
            tmp = self.part / f"{key}.{os.getpid()}.{next(_counter)}"
            try:
                download(tmp)
                got = tmp.stat().st_size
                if got != size:
                    raise OSError(errno.EIO, f"downloaded {got} of {size} bytes")
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._make_room(size, tmp)
                os.replace(tmp, self.data / key)  # atomic: readers see all of it or nothing
                self._sync_dir(self.data)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CacheFull(
                        f"the disk of the cache {self.root} is full; free space or lower cache_bytes"
                    ) from exc
                raise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return self.data / key

    def _make_room(self, need: int, own: Path | None) -> None:
        """Evict least recently used files until ``need`` more bytes fit, counting the downloads
        in flight other than ``own`` (this one's, which ``need`` stands for)."""
        with _locked(self.root / ".lock"):
            files = []
            for entry in os.scandir(self.data):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    files.append((st.st_mtime_ns, st.st_size, entry.path))
            in_flight = 0
            for entry in os.scandir(self.part):
                if own is not None and entry.path == str(own):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    in_flight += entry.stat().st_size
            total = in_flight + sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total + need <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                total -= size

    @staticmethod
    def _sync_dir(folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def held_bytes(self) -> int:
        """Bytes of complete files in the cache now."""
        total = 0
        for entry in os.scandir(self.data):
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size
        return total
