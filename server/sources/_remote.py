"""Datasets in object storage: URLs in specs, their files fetched through fsspec into the disk cache.

A file-based source given ``s3://``, ``gs://`` (``gcs://``), ``http://`` or
``https://`` instead of a path lists and reads its files through this module: each
file is downloaded whole into the :class:`~batchferry.server.cache.FileCache` (with retries and
backoff) and read from there as a local file. ``file://`` URLs are local paths.
Credentials come as s3fs, gcsfs and fsspec take them (environment, config files,
instance roles): a URL carrying them (``user:secret@``, signed query strings) is
refused, and :func:`redact` hides them wherever a spec is shown.

Settings (``cache_dir``, ``cache_bytes``, ``fetch_ahead``, ``fetch_threads``,
``fetch_retries``) are the server's (:mod:`batchferry.server.config`); a source takes those in
force where it is built (:func:`using`), and carries them to the worker processes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from batchferry.server.cache import CacheFull, FileCache
from batchferry.server.config import ServerConfig

from ._common import SampleError, require

__all__ = [
    "FetchError",
    "RemoteFile",
    "StorageSettings",
    "Store",
    "check_url",
    "current",
    "exists",
    "is_url",
    "local_path",
    "read_file",
    "redact",
    "refuse_credentials",
    "sibling",
    "using",
    "where",
]

T = TypeVar("T")

# Scheme -> (module fsspec needs for it, or None).
_SCHEMES: dict[str, str | None] = {
    "s3": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp",
    "https": "aiohttp",
}
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Query parameters that carry credentials (signed URLs, SAS tokens, API keys).
_SECRET_PARAM = re.compile(r"sig|signature|token|secret|passw|credential|key|auth", re.IGNORECASE)
_GLOB = re.compile(r"[*?\[]")
_BACKOFF_S, _BACKOFF_MAX_S = 0.25, 8.0  # first wait, doubling up to this
_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S = 10, 60
_ENV_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_", "GCS", "BOTO")
_LISTING_FRESH_S = 120.0  # how long a listing stands for the processes of the server that made it


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URL of object storage (``file://`` is not: it is a local path)."""
    match = _URL.match(str(path))
    return match is not None and match.group(1).lower() != "file"


def local_path(path: str | os.PathLike[str]) -> str:
    """``file:///data/x`` -> ``/data/x``; anything else as given."""
    text = str(path)
    return text[len("file://") :] if text.lower().startswith("file://") else text


def check_url(url: str) -> None:
    """``ValueError`` for a URL this module does not read or one that carries credentials.

    The message never repeats the URL: it may hold a secret.
    """
    match = _URL.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme not in _SCHEMES:
        raise ValueError(f"unsupported URL scheme {scheme!r}; known: {', '.join(sorted(_SCHEMES))}, file")
    refuse_credentials(url)


def refuse_credentials(text: str) -> None:
    """``ValueError`` (not repeating it) if a URL in ``text`` carries credentials."""
    how = "give them as s3fs, gcsfs or fsspec take them: environment, config files, instance roles"
    for url in re.findall(r"[a-zA-Z][a-zA-Z0-9+.-]*://(?:(?!::)[^\s,])*", text):  # "::" joins shards
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if "@" in parts.netloc:
            raise ValueError(
                f"a {scheme}:// URL with user:password@ in it; credentials are never read from specs, {how}"
            )
        secret = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_PARAM.search(k)]
        if secret:
            raise ValueError(
                f"a {scheme}:// URL whose query carries credentials (parameter {secret[0]!r}); "
                f"credentials are never read from specs, {how}"
            )


def redact(text: str) -> str:
    """``text`` with the user info and query string of every URL in it hidden."""
    text = re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s,@]*@", r"\1***@", text)
    return re.sub(r"(://[^\s,?]*)\?[^\s,]*", r"\1?***", text)


def _scrub(text: str) -> str:
    """An error text without the values of secret environment variables (defence in depth)."""
    for name, value in os.environ.items():
        if len(value) >= 8 and re.search(r"SECRET|TOKEN|PASSWORD|CREDENTIAL", name) and value in text:
            text = text.replace(value, "***")
    return redact(text)


class FetchError(ValueError):
    """A file of a dataset being built could not be listed or fetched (the message names its URL)."""


@dataclass(frozen=True)
class StorageSettings:
    """The server's settings of object storage (:class:`~batchferry.server.config.ServerConfig`)."""

    cache_dir: str = ServerConfig.cache_dir
    cache_bytes: int = ServerConfig.cache_bytes
    fetch_ahead: int = ServerConfig.fetch_ahead
    fetch_threads: int = ServerConfig.fetch_threads
    fetch_retries: int = ServerConfig.fetch_retries

    @classmethod
    def of(cls, config: ServerConfig) -> StorageSettings:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def root(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "batchferry" / "remote"


_current: ContextVar[StorageSettings | None] = ContextVar("batchferry_storage", default=None)


@contextlib.contextmanager
def using(settings: StorageSettings | None) -> Iterator[None]:
    """Sources built inside take ``settings`` (None: the defaults)."""
    token = _current.set(settings)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> StorageSettings:
    return _current.get() or StorageSettings()


@dataclass(frozen=True)
class RemoteFile:
    """A file in object storage: its URL, size, and a version tag (ETag or time) from its listing."""

    url: str
    size: int
    version: str = ""

    @property
    def key(self) -> str:
        """Its name in the cache: a new version of the object is a new key."""
        digest = hashlib.sha256(f"{self.url}\0{self.size}\0{self.version}".encode()).hexdigest()[:24]
        base = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(urlsplit(self.url).path))[-64:]
        return f"{digest}-{base}"

    @property
    def name(self) -> str:
        return posixpath.basename(urlsplit(self.url).path)


_lock = threading.Lock()
_filesystems: dict[tuple[str, int], Any] = {}
_caches: dict[tuple[Path, int], FileCache] = {}
_pools: dict[int, ThreadPoolExecutor] = {}
_ahead: dict[str, Future[Any]] = {}


def _filesystem(scheme: str) -> Any:
    """One filesystem per scheme and process, made again when the credentials' environment changes."""
    fsspec = require("fsspec", "remote", f"a dataset at a {scheme}:// URL")
    module = _SCHEMES[scheme]
    if module is not None:
        require(module, "remote", f"a dataset at a {scheme}:// URL")
    env = hash(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))))
    with _lock:
        fs = _filesystems.get((scheme, env))
        if fs is None:
            kwargs: dict[str, Any] = {}
            if scheme == "s3":
                # Retries are this module's (fetch_retries, with backoff), not the client's too.
                kwargs["config_kwargs"] = {
                    "connect_timeout": _CONNECT_TIMEOUT_S,
                    "read_timeout": _READ_TIMEOUT_S,
                    "retries": {"max_attempts": 1},
                }
            elif scheme in ("http", "https"):
                import aiohttp  # noqa: PLC0415  (required above)

                timeout = aiohttp.ClientTimeout(sock_connect=_CONNECT_TIMEOUT_S, sock_read=_READ_TIMEOUT_S)
                kwargs["client_kwargs"] = {"timeout": timeout}
            fs = fsspec.filesystem(scheme, skip_instance_cache=True, **kwargs)
            if scheme == "s3":
                fs.retries = 1
            _filesystems[(scheme, env)] = fs
    return fs


def _permanent(exc: BaseException) -> bool:
    """Errors that trying again does not mend: a missing object, refused credentials, a full cache."""
    return isinstance(
        exc,
        (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, CacheFull, ImportError),
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, PermissionError):
        return f"access denied (check the credentials in the environment or config files): {_scrub(str(exc))}"
    text = _scrub(str(exc)) or type(exc).__name__
    return text if isinstance(exc, CacheFull) else f"{type(exc).__name__}: {text}"


class Store:
    """A dataset's way to object storage: listing, fetching into the cache, fetching ahead.

    Pickles as its settings: each process keeps its own filesystems, cache handle and threads.
    """

    def __init__(self, settings: StorageSettings | None = None) -> None:
        self.settings = settings or current()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Store, (self.settings,))

    @property
    def cache(self) -> FileCache:
        key = (self.settings.root(), self.settings.cache_bytes)
        with _lock:
            cache = _caches.get(key)
            if cache is None:
                cache = _caches[key] = FileCache(*key)
        return cache

    def _pool(self) -> ThreadPoolExecutor:
        with _lock:
            pool = _pools.get(self.settings.fetch_threads)
            if pool is None:
                pool = _pools[self.settings.fetch_threads] = ThreadPoolExecutor(
                    self.settings.fetch_threads, thread_name_prefix="batchferry-fetch"
                )
        return pool

    def _retry(self, url: str, action: Callable[[], T]) -> T:
        """``action()``, tried again with backoff on transient errors; ``OSError`` naming ``url``."""
        attempts = self.settings.fetch_retries + 1
        for attempt in range(attempts):
            try:
                return action()
            except Exception as exc:
                if _permanent(exc):
                    raise
                if attempt + 1 == attempts:
                    raise OSError(f"{_reason(exc)} (gave up after {attempts} attempts)") from exc
                time.sleep(min(_BACKOFF_MAX_S, _BACKOFF_S * 2**attempt))
        raise AssertionError("unreachable")

    # -- listing -------------------------------------------------------------------
    def _file(self, fs: Any, path: str, info: dict[str, Any]) -> RemoteFile:
        url = fs.unstrip_protocol(path) if "://" not in path else path
        size = info.get("size")
        if size is None:  # an HTTP folder listing gives names only: ask each file
            info = self._retry(url, functools.partial(fs.info, url))
            size = info.get("size")
        if size is None:
            raise FetchError(f"{url}: the store gives no size for it")
        version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
        return RemoteFile(url, int(size), str(version))

    def _listed(self, what: str, compute: Callable[[], list[RemoteFile]]) -> list[RemoteFile]:
        """A listing, reused from the cache's index folder when made in the last
        ``_LISTING_FRESH_S`` seconds: a server's worker processes, started after it, see the
        files it listed without asking the store again (nor loading its client)."""
        path = self.cache.index / f"list-{hashlib.sha256(what.encode()).hexdigest()[:24]}.json"
        try:
            data = json.loads(path.read_text())
            if 0 <= time.time() - data["time"] < _LISTING_FRESH_S:
                return [RemoteFile(str(u), int(n), str(v)) for u, n, v in data["files"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none, stale or unreadable: list again
        files = compute()
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(
                json.dumps({"time": time.time(), "files": [[f.url, f.size, f.version] for f in files]})
            )
            os.replace(tmp, path)
        return files

    def info(self, url: str) -> RemoteFile:
        """The file at ``url``; ``ValueError`` naming it when it cannot be found or reached."""
        check_url(url)
        return self._listed(f"info {url}", lambda: [self._info(url)])[0]

    def _info(self, url: str) -> RemoteFile:
        check_url(url)
        fs = _filesystem(_URL.match(url).group(1).lower())  # type: ignore[union-attr]  # checked
        try:
            info = self._retry(url, lambda: fs.info(url))
        except Exception as exc:
            raise FetchError(f"{url}: {_reason(exc)}") from exc
        if info.get("type") == "directory":
            raise FetchError(f"{url}: a directory, not a file")
        return self._file(fs, url, info)

    def expand(self, pattern: str, expand: Callable[[str], list[str]]) -> list[RemoteFile]:
        """The files a URL names: ``expand`` its brace patterns, then match ``*``/``?``/``[..]``."""
        check_url(pattern)
        return self._listed(f"expand {pattern}", lambda: self._expand(pattern, expand))

    def _expand(self, pattern: str, expand: Callable[[str], list[str]]) -> list[RemoteFile]:
        out: list[RemoteFile] = []
        for url in expand(pattern):
            check_url(url)
            if not _GLOB.search(url):
                out.append(self._info(url))
                continue
            fs = _filesystem(_URL.match(url).group(1).lower())  # type: ignore[union-attr]  # checked
            try:
                found = self._retry(url, functools.partial(fs.glob, url, detail=True))
            except Exception as exc:
                raise FetchError(f"{url}: cannot list: {_reason(exc)}") from exc
            files = [self._file(fs, p, i) for p, i in sorted(found.items()) if i.get("type") != "directory"]
            if not files:
                raise FetchError(f"{url}: matches no files")
            out.extend(files)
        return out

    def find(self, root: str) -> list[RemoteFile]:
        """Every file under the folder URL ``root``, sorted by URL."""
        check_url(root)
        return self._listed(f"find {root}", lambda: self._find(root))

    def _find(self, root: str) -> list[RemoteFile]:
        fs = _filesystem(_URL.match(root).group(1).lower())  # type: ignore[union-attr]  # checked
        try:
            found = self._retry(root, lambda: fs.find(root.rstrip("/") + "/", detail=True))
        except Exception as exc:
            raise FetchError(f"{root}: cannot list: {_reason(exc)}") from exc
        files = [self._file(fs, p, i) for p, i in found.items() if i.get("type") != "directory"]
        return sorted(files, key=lambda f: f.url)

    # -- fetching ------------------------------------------------------------------
    def _download(self, f: RemoteFile) -> Path:
        check_url(f.url)
        fs = _filesystem(_URL.match(f.url).group(1).lower())  # type: ignore[union-attr]  # checked
        return self._retry(
            f.url, lambda: self.cache.get(f.key, f.size, lambda tmp: fs.get_file(f.url, str(tmp)))
        )

    def fetch(self, f: RemoteFile, sample: int | None = None) -> Path:
        """``f``'s path in the cache, downloaded first if need be.

        Failing, a :class:`SampleError` naming the URL and ``sample``, or a :class:`FetchError`
        (a ``ValueError``) naming the URL when no sample asked (a dataset being built).
        """
        found = self.cache.lookup(f.key)
        if found is not None:
            return found
        try:
            return self._download(f)
        except Exception as exc:
            if sample is None:
                raise FetchError(f"{f.url}: {_reason(exc)}") from exc
            raise SampleError(sample, f.url, _reason(exc)) from exc

    def read(self, f: RemoteFile, sample: int | None, reader: Callable[[Path], T]) -> T:
        """``reader(local path)``, fetching again if another process evicted the file in between."""
        for _ in range(3):
            path = self.fetch(f, sample)
            try:
                return reader(path)
            except FileNotFoundError:
                continue
        return reader(self.fetch(f, sample))

    def fetch_many(self, files: Sequence[RemoteFile], samples: Sequence[int]) -> list[Path]:
        """Paths of several files, downloaded ``fetch_threads`` at a time."""
        missing = [i for i, f in enumerate(files) if self.cache.lookup(f.key) is None]
        if len(missing) > 1:
            pool = self._pool()
            futures = [pool.submit(self.fetch, files[i], samples[i]) for i in missing]
            for future in futures:
                future.result()
        return [self.fetch(f, s) for f, s in zip(files, samples, strict=True)]

    def fetch_ahead(self, files: Sequence[RemoteFile], count: int | None = None) -> None:
        """Start fetching the next files a reader will need, at most ``count`` (default
        ``fetch_ahead``) of them, and no more than half the cache (so that they do not evict
        what is being read); ``fetch_threads`` download at once."""
        budget = self.settings.cache_bytes // 2
        for f in files[: self.settings.fetch_ahead if count is None else count]:
            budget -= f.size
            if budget < 0:
                break
            with _lock:
                if f.url in _ahead and not _ahead[f.url].done():
                    continue
            if self.cache.lookup(f.key) is not None:
                continue
            future = self._pool().submit(self._fetch_quietly, f)
            with _lock:
                _ahead[f.url] = future
                for url in [u for u, fut in _ahead.items() if fut.done()]:
                    del _ahead[url]

    def _fetch_quietly(self, f: RemoteFile) -> None:
        # A failure here is reported by the read that needs the file, naming its sample.
        with contextlib.suppress(Exception):
            self._download(f)

    def index_path(self, f: RemoteFile, suffix: str) -> Path:
        """Where a small file derived from ``f`` (a shard's index) is kept, outside the size limit."""
        return self.cache.index / f"{f.key}{suffix}"


def read_file(path: str | os.PathLike[str], reader: Callable[[Path], T], store: Store | None) -> T:
    """``reader(local path)`` for a local path, or for a URL's file fetched into the cache first."""
    text = str(path)
    if not is_url(text):
        return reader(Path(local_path(text)))
    store = store or Store()
    return store.read(store.info(text), None, reader)


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether a local file is there; URLs are checked when read (naming what is wrong)."""
    return is_url(path) or Path(local_path(str(path))).is_file()


def where(path: str | os.PathLike[str]) -> str | Path:
    """A URL as a string (a Path would fold its ``//``), a local path as a Path."""
    return str(path) if is_url(path) else Path(local_path(str(path)))


def sibling(path: str | Path, name: str) -> str | Path:
    """The file ``name`` in the folder of ``path`` (a URL or a local path)."""
    if isinstance(path, str) and is_url(path):
        return posixpath.join(posixpath.dirname(path), name)
    return Path(path).parent / name
