"""What one DataLoader received, and how long its training loop waited for it.

>>> loader = DataLoader("127.0.0.1:50051", "train", batch_size=256)  # doctest: +SKIP
>>> for step, batch in enumerate(loader):  # doctest: +SKIP
...     if step % 100 == 0:
...         s = loader.stats()
...         print(f"{s.batches} batches, data stall {s.stall_share:.1%}")

:class:`LoaderStats` is a frozen snapshot of plain numbers. The loader keeps
lifetime counters that only grow (one ``perf_counter`` pair and a few additions
per batch, on the loop's thread); a window is a baseline subtracted from them, so
``stats(reset=True)`` and the periodic log line each keep their own window without
disturbing the other.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from batchferry.errors import InvalidArgument

__all__ = ["LOG_STATS_ENV", "LoaderStats", "Recorder", "log_interval"]

log = logging.getLogger("batchferry.client.stats")

# Seconds between stats log lines when the loader is not given log_stats_every.
LOG_STATS_ENV = "BATCHFERRY_LOG_STATS_EVERY"


@dataclass(frozen=True)
class LoaderStats:
    """A loader's figures since its first ``iter()`` (or its last ``stats(reset=True)``).

    Counters add up over every epoch of the window. Waiting is host time the training
    loop spent inside ``iter()`` and ``next()`` of the loader: for the server, the
    network, a reconnect, the end-of-epoch handshake, and ``batch_transform`` (also
    given apart as ``transform_s``). With ``device="cuda"`` the loop's CUDA stream
    waits for each batch's copy without blocking the host, so a copy still in flight
    costs GPU time, not ``wait_s``.
    """

    batches: int  # batches handed to the loop
    bytes: int  # payload bytes of those batches, either transport (tensors at 64-byte offsets)
    wait_s: float  # seconds the loop spent inside iter() and next()
    transform_s: float  # of wait_s, seconds inside batch_transform
    wall_s: float  # seconds since the window began
    stall_share: float  # wait_s / wall_s, in [0, 1]; 0 before the first iter()
    epochs: int  # iterations begun (iter() calls; a resumed epoch counts)
    first_batch_s: float | None  # latest iteration: iter() to its first batch (None: none yet)
    reconnects: int  # streams reopened after their server went away
    transports: tuple[str, ...]  # per replica: "shm" or "grpc" (empty before the first iter())
    streams: int  # streams (each its own connection) per replica; 0 before the first iter()

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (``transports`` as a list), ready for JSON or a logger."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["transports"] = list(self.transports)
        return out


@dataclass(frozen=True)
class _Mark:
    """Lifetime counters at one moment: the baseline of a window."""

    at: float | None  # perf_counter time; None: before the first iter()
    batches: int = 0
    bytes: int = 0
    wait_s: float = 0.0
    transform_s: float = 0.0
    epochs: int = 0
    reconnects: int = 0


class Recorder:
    """A loader's lifetime counters. The loader's iterator adds to them on the loop's
    thread; ``stats()`` may read them from any (a field may then be one batch ahead)."""

    def __init__(self, log_every: float) -> None:
        self.batches = 0
        self.bytes = 0
        self.wait_s = 0.0
        self.transform_s = 0.0
        self.epochs = 0
        self.reconnects = 0
        self.first_batch_s: float | None = None
        self.started: float | None = None  # the first iter()
        self.log_every = log_every
        # The iterator compares each batch's time with this: never, when logging is off.
        self.log_at = math.inf
        self._base = _Mark(None)
        self._logged = _Mark(None)

    def begin(self, now: float) -> None:
        """An ``iter()`` begins (before its streams open: opening them counts as waiting)."""
        if self.started is None:
            self.started = now
            if self.log_every:
                self.log_at = now + self.log_every

    def _mark(self, now: float) -> _Mark:
        return _Mark(
            now if self.started is not None else None,
            self.batches,
            self.bytes,
            self.wait_s,
            self.transform_s,
            self.epochs,
            self.reconnects,
        )

    def _since(self, base: _Mark, mark: _Mark, transports: tuple[str, ...], streams: int) -> LoaderStats:
        """The figures between two marks (``mark`` taken at a known time)."""
        start = base.at if base.at is not None else self.started
        wall = max(0.0, mark.at - start) if mark.at is not None and start is not None else 0.0
        wait = mark.wait_s - base.wait_s
        return LoaderStats(
            batches=mark.batches - base.batches,
            bytes=mark.bytes - base.bytes,
            wait_s=wait,
            transform_s=mark.transform_s - base.transform_s,
            wall_s=wall,
            # Clamped: wait and wall come from separate clock readings.
            stall_share=min(1.0, wait / wall) if wall > 0 else 0.0,
            epochs=mark.epochs - base.epochs,
            first_batch_s=self.first_batch_s,
            reconnects=mark.reconnects - base.reconnects,
            transports=transports,
            streams=streams,
        )

    def snapshot(self, now: float, transports: tuple[str, ...], streams: int, *, reset: bool) -> LoaderStats:
        """The window's figures at ``now``; with ``reset`` a new window begins at ``now``.
        The counters are read once, so a batch counted meanwhile falls in exactly one window."""
        mark = self._mark(now)
        stats = self._since(self._base, mark, transports, streams)
        if reset:
            self._base = mark
        return stats

    def log_line(self, now: float, transports: tuple[str, ...], streams: int, name: str) -> None:
        """Log the figures since the last line (and the lifetime totals) at INFO."""
        mark = self._mark(now)
        interval = self._since(self._logged, mark, transports, streams)
        total = self._since(_Mark(None), mark, transports, streams)
        self._logged = mark
        self.log_at = now + self.log_every
        log.info("%s: %s", name, describe(interval, total))


def describe(interval: LoaderStats, total: LoaderStats) -> str:
    """One log line: the interval's rates and stall, then the totals."""
    wall = interval.wall_s or math.inf
    where = ", ".join(total.transports) or "not chosen yet"  # one entry per replica
    if total.streams > 1:
        where += f" ({total.streams} streams each)"
    return (
        f"last {interval.wall_s:.1f}s: {interval.batches} batches ({interval.batches / wall:.1f}/s), "
        f"{_size(interval.bytes / wall)}/s, data stall {interval.stall_share:.1%} ({interval.wait_s:.2f}s); "
        f"total: {total.batches} batches, {_size(total.bytes)}, {total.epochs} epoch(s), "
        f"data stall {total.stall_share:.1%}, reconnects {total.reconnects}; transport {where}"
    )


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def log_interval(value: float | None) -> float:
    """``log_stats_every`` as given, else from the environment (``BATCHFERRY_LOG_STATS_EVERY``),
    else 0 (off). LoaderConfig checks the number itself."""
    if value is not None:
        return value
    raw = os.environ.get(LOG_STATS_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0 or math.isinf(seconds):
        raise InvalidArgument(f"{LOG_STATS_ENV} must be a number of seconds >= 0 (0: off), got {raw!r}")
    return seconds
