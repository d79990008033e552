"""One epoch of a DataLoader: its streams, the merge, the caller's index lists, the loop's side.

An :class:`Epoch` is what ``iter(loader)`` returns. It opens the epoch's streams
(:class:`~.streams.StreamSet`), takes their batches through a merge (in order or
any order, :mod:`.merge`), and hands each to the loop: on the GPU once its copy is
done, through ``batch_transform``, counted in the loader's statistics. With the
caller's own sampler it sends the index lists to the streams that build each batch,
ahead of need (two credit windows, or up to 64 batches when they are small, so the
server can build them in groups).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batchferry import sampling
from batchferry.errors import ProtocolError
from batchferry.v1 import loader_pb2 as _pb2

from .connection import Connection
from .merge import AnyOrder, InOrder, Merge
from .options import open_request
from .sampler import EpochIndices
from .stats import Recorder
from .stream import EpochStream
from .streams import StreamSet

__all__ = ["Epoch", "EpochStart"]

# The caller's sampler runs this far ahead (batches per stream, and samples in all) when
# its batches are small, so that the server can build them several at a time.
_LISTS_AHEAD = 64
_LISTS_AHEAD_SAMPLES = 1 << 17


@dataclass(frozen=True)
class EpochStart:
    """Where an epoch begins: its number, the batch (in order) or the batches taken (any
    order), the generator state its order is drawn from, and the caller's index lists."""

    epoch: int
    batch: int = 0
    sampler_state: bytes = b""
    done: bytes = b""
    indices: EpochIndices | None = None
    # The generator the order is drawn from, when it may move before the first next().
    redraw: torch.Generator | None = None
    consumed: bytes = b""  # sharded, resized: the order's positions earlier worlds took
    # An IterableDataset: its workers' base seed, and where a resumed epoch's iterators are
    # (per iterator: batches taken, its dataset's saved state) and which one goes next.
    base_seed: int = 0
    places: tuple[tuple[int, bytes], ...] = ()
    next_iterator: int = 0
    loaded: bool = False  # the epoch of a loaded state: it continues a position, whatever it is


class Epoch:
    """The iterator over one epoch's batches (``iter(loader)``)."""

    def __init__(
        self,
        connection: Connection,
        start: EpochStart,
        *,
        stats: Recorder,
        generator: torch.Generator | None,
        transform: Callable[[Any], Any] | None,
        length: Callable[[], int],
        log_stats: Callable[[float], None],
        began: float | None = None,
        len_called: Callable[[], int | None] = lambda: None,
    ) -> None:
        config = connection.config
        self._config = config
        self._connection = connection
        self._stats = stats
        self._generator = generator
        self._transform = transform
        self._length = length
        self._log_stats = log_stats
        self._began: float | None = began  # the iter() call, until the first batch is handed out
        self.epoch = start.epoch
        self.sampler_state = start.sampler_state
        self.indices = start.indices
        self.consumed = start.consumed
        self.finished = False
        # An IterableDataset: its epoch ends where its iterators do; what was taken of each.
        self.iterable = bool(connection.dataset_info().iterable)
        self.base_seed = start.base_seed
        count = max(1, config.num_workers)
        self.places = list(start.places) if start.places else [(0, b"")] * count
        self.next_iterator = start.next_iterator
        self._len_called = len_called  # torch warns past the length len(loader) reported
        self._yielded = 0
        self._merge: Merge = (
            AnyOrder(start.done, config.timeout)
            if config.any_order
            else InOrder(start.batch, self._epoch_length, self._sampler_total)
        )
        # The caller's sampler: index lists sent to the servers but not yet taken.
        self._lists: dict[int, np.ndarray] = {}
        self._ahead_samples = 0  # samples in ``_lists``
        self._next_list = 0 if config.any_order else start.batch
        self._num_batches = 0
        # Stream j reads replica j % R, stripe j // R: how many is fixed for the epoch (a
        # server that comes back on another transport is read by as many streams as before).
        self._stripes = connection.stripes
        self._parts = connection.size * self._stripes
        self._credits = connection.credits_for(self._parts)
        # The order is drawn from the generator as it is now; torch draws it at the first
        # next(). If the generator moved in between (another iterator drew its seed), the
        # epoch starts over from where it is then (see _take).
        self._redraw = start.redraw
        # Independent shuffles: torch's last, discarded draw comes with a short last batch.
        self._drew_last = False
        self._partial_end = not config.drop_last and bool(connection.dataset_length % config.batch_size)
        # Streams continue a position (OpenStream.resume): every one from a loaded state, and
        # each reopened one (its first open received a start frame).
        self._resumed = start.loaded or start.batch > 0 or bool(start.done)
        self._opened: set[int] = set()
        self._open()

    def _open(self) -> None:
        """Open the epoch's streams and send the first index lists."""
        self._streams = StreamSet(
            self._connection,
            self._stats,
            self._request,
            parts=self._parts,
            credits=self._credits,
            on_open=self._on_open,
            describe=self._where,
        )
        try:
            self._feed()
        except BaseException:
            self.close()
            raise
        first = self._streams.start
        self._num_batches = int(first.num_batches)
        # torch's RandomSampler draws the permutation from the generator at the first
        # next(): the generator is left where that draw leaves it then (see _take).
        generator, after = self._generator, first.state_after_order
        self._draw = (generator, after) if generator is not None and after else None

    # -- where the epoch is -------------------------------------------------------------
    @property
    def taken(self) -> int:
        """Batches handed to the loop (in order: also the next batch's index)."""
        return self._merge.taken

    @property
    def done(self) -> bytes:
        """Out of order: which batches were taken (empty in order)."""
        return bytes(self._merge.done)

    def _where(self) -> str:
        return f"epoch {self.epoch}, after batch {self.taken}"

    def _epoch_length(self) -> float:
        if self.iterable:
            return float("inf")
        if self.indices is not None:
            return self.indices.total if self.indices.total is not None else float("inf")
        return self._num_batches

    def _sampler_total(self) -> int | None:
        if self.iterable:
            return self.taken  # its stream's end is the epoch's
        return self.indices.total if self.indices is not None else None

    def _request(self, j: int) -> _pb2.OpenStream:
        c = self._connection
        r, k = j % c.size, j // c.size
        return open_request(
            self._config,
            sampler_state=self.sampler_state,
            epoch=self.epoch,
            start_batch=self._merge.resume_point,
            credits=self._credits,
            transport=_pb2.TRANSPORT_SHM if c.use_shm(r) else _pb2.TRANSPORT_BYTES,
            compression=c.codec(r),
            groups=True,
            replica_index=r,
            num_replicas=c.size,
            stripe=k,
            stripes=self._stripes,
            taken=self._merge.stream_taken(j, self._parts),
            any_order=not self._config.in_order and self._config.mode != "dynamic",
            client_batches=self.indices is not None,
            consumed=self.consumed,
            base_seed=self.base_seed,
            places=[_pb2.IteratorPlace(batches=b, state=s) for b, s in self.places]
            if self.iterable and self.taken
            else [],
            next_iterator=self.next_iterator,
            resume=self._resumed or j in self._opened,
        )

    def _on_open(self, j: int, stream: EpochStream) -> None:
        self._opened.add(j)
        self._resend_lists(j, stream)

    # -- the caller's index lists ---------------------------------------------------------
    def _resend_lists(self, j: int, stream: EpochStream) -> None:
        """A (re)opened stream needs the lists it has not built yet."""
        if self.indices is not None:
            parts = self._parts
            lists = {b: samples for b, samples in self._lists.items() if b % parts == j}
            _send_lists(stream, lists, self.indices.total)

    def _feed(self) -> None:
        """Send the index lists of the next batches (a window ahead) to their streams."""
        if self.indices is None or self.indices.total is not None:
            return
        parts = len(self._streams)
        # Always two credit windows ahead; small batches up to _LISTS_AHEAD batches (and
        # _LISTS_AHEAD_SAMPLES samples) ahead, so the server can build them in groups, topped
        # up once half of that is used (one message per many batches, not one per batch).
        low = self._credits * parts * 2
        high = max(low, _LISTS_AHEAD * parts)
        taken = self.taken
        if self._next_list >= taken + max(low, high // 2):
            return
        fresh: dict[int, dict[int, np.ndarray]] = {j: {} for j in range(parts)}
        while self._next_list < taken + low or (
            self._next_list < taken + high and self._ahead_samples < _LISTS_AHEAD_SAMPLES
        ):
            samples = self.indices.pull()
            if samples is None:
                break
            index, self._next_list = self._next_list, self._next_list + 1
            if self._merge.is_taken(index):
                continue  # taken before this iterator (resumed out of order)
            self._lists[index] = samples
            self._ahead_samples += len(samples)
            fresh[index % parts][index] = samples
        for j, lists in fresh.items():
            _send_lists(self._streams.streams[j], lists, self.indices.total)

    # -- the loop's side ------------------------------------------------------------------
    def __iter__(self) -> Epoch:
        return self

    def __len__(self) -> int:
        return self._length()

    def __next__(self) -> Any:
        stats = self._stats
        began = time.perf_counter()
        try:
            data = self._take()
        except BaseException:  # the end of the epoch too: its last frames were waited for
            stats.wait_s += time.perf_counter() - began
            raise
        now = time.perf_counter()
        stats.wait_s += now - began
        if self._began is not None:
            stats.first_batch_s, self._began = now - self._began, None
        if now >= stats.log_at:
            self._log_stats(now)
        return data

    def _take(self) -> Any:
        """The next batch as the loop gets it; StopIteration at the end of the epoch."""
        if self.finished:
            raise StopIteration
        if self._redraw is not None:
            now, self._redraw = sampling.state_bytes(self._redraw), None
            if now != self.sampler_state:
                self._streams.close()
                self.sampler_state = now
                self._open()
        if self._draw is not None:
            generator, after, self._draw = *self._draw, None
            generator.set_state(_state(after))
        self._feed()
        batch = self._merge.next(self._streams)
        if batch is None:
            self.finished = True
            self._last_draw()
            raise StopIteration
        if self.taken == self._num_batches and self._partial_end:
            self._last_draw()  # torch found the end of its indices making this batch
        taken = self._lists.pop(batch.index, None)
        if taken is not None:
            self._ahead_samples -= len(taken)
        if self.iterable:
            self._took_from(batch.iterator, batch.iterator_state)
        if batch.error is not None:  # taken (the next batch comes next), as the dataset's error
            raise batch.error
        data = batch.data
        copier = self._connection.copier
        if copier is not None and batch.event is not None:
            data = copier.hand_over(data, batch.event)
        if self._transform is not None:
            began = time.perf_counter()
            try:
                data = self._transform(data)
            finally:
                self._stats.transform_s += time.perf_counter() - began
        # Counted once the loop has it: a batch_transform that raised handed it nothing.
        self._stats.batches += 1
        self._stats.bytes += batch.nbytes
        if self.iterable:
            self._yielded += 1
            self._warn_past_length()
        return data

    def _took_from(self, iterator: int, state: bytes) -> None:
        """An IterableDataset's batch is taken: its iterator's place moves on, and the next
        batch comes from the next iterator (one that is exhausted the server skips)."""
        if not 0 <= iterator < len(self.places):
            raise ProtocolError(f"batch of iterator {iterator}, but the stream has {len(self.places)}")
        batches, saved = self.places[iterator]
        self.places[iterator] = (batches + 1, state or saved)
        self.next_iterator = (iterator + 1) % len(self.places)

    def _warn_past_length(self) -> None:
        """torch's warning when an IterableDataset yields more than len(loader) reported."""
        reported = self._len_called()
        if reported is None or self._yielded <= reported:
            return
        message = (
            f"Length of IterableDataset {self._connection.config.dataset!r} was reported to be {reported}"
            f"(when accessing len(dataloader)), but {self._yielded} samples have been fetched. "
        )
        if self._config.num_workers > 0:
            message += (
                "For multiprocessing data-loading, this could be caused by not properly configuring the "
                "IterableDataset replica at each worker. Please see "
                "https://pytorch.org/docs/stable/data.html#torch.utils.data.IterableDataset for examples."
            )
        warnings.warn(message, stacklevel=4)

    def _last_draw(self) -> None:
        """torch's RandomSampler draws one more permutation, and discards it, when its indices
        run out: at the epoch's last batch when that one is short, else at its end."""
        start, gen = self._streams.start, self._generator
        if gen is None or not start.state_after_epoch or self._drew_last:
            return
        self._drew_last = True
        if sampling.state_bytes(gen) == start.state_after_order:
            gen.set_state(_state(start.state_after_epoch))
        else:  # drawn from meanwhile (another iterator): that draw, from here
            torch.randperm(self._connection.dataset_length, generator=gen)

    def close(self) -> None:
        self._streams.close()

    def __del__(self) -> None:
        # A finalizer must not wait: the streams close on the clean-up thread.
        streams = getattr(self, "_streams", None)
        if streams is not None:
            streams.close_soon()


def _send_lists(stream: EpochStream, lists: dict[int, np.ndarray], total: int | None) -> None:
    if not lists and total is None:
        return
    order = sorted(lists)
    stream.send_batches(
        _pb2.BatchIndices(
            index=order,
            lengths=[len(lists[b]) for b in order],
            samples=np.concatenate([lists[b] for b in order]).tolist() if order else [],
            end=total is not None,
            total=total or 0,
        )
    )


def _state(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
