"""The streams of one epoch: one per replica and stripe, opened, reopened and closed together.

Stream ``j`` reads replica ``j % R``, stripe ``j // R``. A stream whose server goes
away is reopened where the epoch has got to (``request(j)`` says how), with backoff,
within the loader's ``timeout``; one that is silent for ``timeout`` is told apart:
a stuck receiver process is replaced, a server that no longer answers is reported
unreachable, a slow one times out.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from batchferry.errors import BatchTimeout, ServerUnavailable, TLSError
from batchferry.v1 import loader_pb2 as _pb2

from .connection import Connection
from .frames import Batch
from .stats import Recorder
from .stream import CLOSE_GRACE, EpochStream

__all__ = ["StreamSet"]

log = logging.getLogger("batchferry.client")

_RECEIVER_TRIES = 3  # opens of one stream while receiver processes keep dying
_ALIVE_CHECK = 2.0  # seconds a server gets to answer after no batch came within timeout


class StreamSet:
    """Owner of one epoch's streams (``parts`` of them, each with ``credits`` frames in
    flight: fixed for the epoch, a reopened stream included, whatever transport its
    server is reached by then); :meth:`close` ends them all within one grace period."""

    def __init__(
        self,
        connection: Connection,
        stats: Recorder,
        request: Callable[[int], _pb2.OpenStream],
        *,
        parts: int,
        credits: int,
        on_open: Callable[[int, EpochStream], None] = lambda _j, _s: None,
        describe: Callable[[], str] = str,
    ) -> None:
        self._connection = connection
        self._stats = stats
        self._request = request  # stream j's OpenStream, from where the epoch is now
        self._on_open = on_open  # a (re)opened stream's first words (index lists)
        self._describe = describe  # where the epoch is, for messages
        self._timeout = connection.config.timeout
        self._parts, self._credits = parts, credits
        self.streams: list[EpochStream] = []
        self.first: list[int] = []  # per stream: the first batch it sends
        try:
            for j in range(parts):
                self.streams.append(self._open(j, self._timeout))
                self.first.append(int(self.streams[j].start.first_batch))
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.streams)

    @property
    def start(self) -> _pb2.StreamStart:
        """The first stream's start frame (the epoch's length, the generator's states)."""
        return self.streams[0].start

    def where(self, j: int) -> str:
        return self._connection.where(j)

    def _open(self, j: int, timeout: float) -> EpochStream:
        """Stream ``j``; a receiver process that dies meanwhile is replaced (a few times)."""
        receivers = self._connection.receivers
        for _ in range(_RECEIVER_TRIES - 1):
            try:
                return self._open_once(j, timeout)
            except (ServerUnavailable, BatchTimeout) as exc:
                receiver = receivers.current(j) if receivers is not None else None
                if receiver is None:
                    raise
                if receiver.alive() and (
                    isinstance(exc, ServerUnavailable) or receiver.responsive(_ALIVE_CHECK)
                ):
                    raise  # the server's doing, not a receiver's
                receiver.kill()  # dead, or stuck (stopped between epochs): a fresh one next
        return self._open_once(j, timeout)

    def _open_once(self, j: int, timeout: float) -> EpochStream:
        c = self._connection
        r, k = j % c.size, j // c.size
        relayed = c.relayed(r)
        stream = EpochStream(
            c.receiver(j, self._credits, self._parts) if relayed else c.replicas.stripe_channel(r, k),
            self._request(j),
            pool=c.pool,
            copier=c.copier,
            segments=c.segments if c.use_shm(r) or relayed else None,
            timeout=timeout,
            metadata=c.replicas.security.metadata,
            server=c.replicas.replicas[r].address,
        )
        if relayed:
            stream.on_starved = self._copy_out_kept
        self._on_open(j, stream)
        return stream

    def _copy_out_kept(self) -> None:
        """A receiver waits for room in /dev/shm that kept batches of any stream may hold."""
        for stream in self.streams:
            stream.copy_out_kept()

    def _reconnect(self, j: int, cause: ServerUnavailable) -> None:
        """Reopen stream ``j`` where the epoch is, with backoff within ``timeout``."""
        r = j % self._connection.size
        deadline = time.monotonic() + self._timeout
        delay = 0.05
        self.streams[j].close()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailable(
                    f"{self._connection.where(r)} did not come back within timeout={self._timeout}s "
                    f"({self._describe()})"
                ) from cause
            try:
                if self._connection.rediscover(r, remaining) is not None:
                    self.streams[j] = self._open(j, remaining)
                    self.first[j] = int(self.streams[j].start.first_batch)
                    self._stats.reconnects += 1
                    log.info("reconnected to %s (%s)", self._connection.where(j), self._describe())
                    return
            except TLSError:
                raise  # it refuses this client: waiting does not help
            except (ServerUnavailable, BatchTimeout):
                pass
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(2 * delay, 2.0)

    def replace_stuck_receiver(self, j: int) -> bool:
        """Whether stream ``j`` was silent because its receiver process is stuck (it does
        not answer a ping): it is then killed, and the stream reopened on a fresh one."""
        receivers = self._connection.receivers
        receiver = receivers.current(j) if receivers is not None else None
        if receiver is None or receiver.responsive(_ALIVE_CHECK):
            return False
        receiver.kill()
        log.warning("receiver process %d stopped answering: replacing it", receiver.pid)
        self._reconnect(j, ServerUnavailable(f"receiver process {receiver.pid} stopped answering"))
        return True

    def next_from(self, j: int, wait: float | None = None) -> Batch | object | None:
        """Stream ``j``'s next batch (None at its end, PENDING after ``wait``), reconnecting."""
        while True:
            try:
                return self.streams[j].next(wait)
            except ServerUnavailable as exc:
                self._reconnect(j, exc)
            except BatchTimeout as exc:
                # Nothing for ``timeout``: a slow server, a stuck receiver process, or a dead
                # link that keepalive has not reported yet. Tell them apart with quick questions.
                if self.replace_stuck_receiver(j):
                    continue
                if self._connection.rediscover(j % self._connection.size, _ALIVE_CHECK) is None:
                    raise ServerUnavailable(
                        f"{self._connection.where(j)} unreachable: no batch within timeout={self._timeout}s "
                        f"and no answer since ({self._describe()})"
                    ) from exc
                raise

    def close(self) -> None:
        # One grace period for all the streams, not one each (stuck ones are cut off at its end).
        deadline = time.monotonic() + CLOSE_GRACE
        for stream in self.streams:
            stream.stop()  # all at once: their ends come back together
        for stream in self.streams:
            stream.close(deadline)

    def close_soon(self) -> None:
        """For finalizers: close on the clean-up thread (a finalizer must not wait)."""
        with contextlib.suppress(Exception):  # module globals may be gone at shutdown
            for stream in self.streams:
                stream.close_soon()
