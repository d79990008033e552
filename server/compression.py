"""Which codec a batch's byte-stream payload goes with, and its payload messages.

A stream asks for a codec (OpenStream.compression); each batch then goes compressed
only if it pays: its first chunk is compressed as a trial, and when that does not
shrink by :data:`MIN_RATIO` the whole batch goes raw (BatchHeader.codec says which),
so incompressible payloads (images, float noise) cost one chunk's compression per
batch, not a slower stream. After a trial that does not pay, a stream's next frames
(a frame: one batch, or a group of small ones) go raw without one (1, then 2, 4, ... up
to :data:`MAX_SKIP`), so a stream of them spends about a seventeenth of that; a trial
that pays starts over. Payloads sent by slot (same host) are never compressed.

Cost: compression runs in the thread that hands the stream's messages to gRPC, one
chunk at a time as gRPC takes them (so a stream still holds one chunk in memory);
blosc2 releases the GIL while it works. A server without blosc2 sends every batch
raw and says so once in its log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np

from batchferry import codec
from batchferry import layout as _layout
from batchferry.v1 import loader_pb2 as _pb2

__all__ = ["MAX_SKIP", "MIN_RATIO", "MIN_RATIO_ENV", "Trials", "min_ratio", "payload_messages"]

log = logging.getLogger("batchferry.server")

# A batch goes compressed only if its first chunk shrinks at least this much.
MIN_RATIO = 1.1
# Overrides MIN_RATIO in the server's environment; 0 compresses every batch, which is
# how the test suite exercises the compressed path with any data.
MIN_RATIO_ENV = "BATCHFERRY_COMPRESSION_MIN_RATIO"
# The most frames sent raw without a trial after trials that did not pay.
MAX_SKIP = 16
_warned = False


def min_ratio() -> float:
    """:data:`MIN_RATIO`, or the number in :data:`MIN_RATIO_ENV` (read each time: it is
    asked once per compressed frame, and a test may change it)."""
    raw = os.environ.get(MIN_RATIO_ENV, "").strip()
    if not raw:
        return MIN_RATIO
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment {MIN_RATIO_ENV}: must be a number, got {raw!r}") from None
    if not value >= 0:
        raise ValueError(f"environment {MIN_RATIO_ENV}: must be 0 or more, got {raw!r}")
    return value


class Trials:
    """One stream's trials: which frames try compression (one thread, the stream's)."""

    def __init__(self) -> None:
        self._skip = 0  # frames to send raw after the next trial that does not pay, halved
        self._left = 0  # frames still to send raw without a trial

    def due(self) -> bool:
        if self._left:
            self._left -= 1
            return False
        return True

    def record(self, paid: bool) -> None:
        self._skip = 0 if paid else min(MAX_SKIP, max(1, 2 * self._skip))
        self._left = self._skip


def payload_messages(
    payload: np.ndarray, chunk: int, wanted: _pb2.Codec, layout: _pb2.Layout, trials: Trials | None = None
) -> tuple[_pb2.Codec, Iterator[bytes]]:
    """The codec this batch goes with, and its payload (uint8, contiguous) as messages of
    ``chunk`` bytes before compression. ``trials``: the stream's, to skip trials after
    some that did not pay."""
    if wanted == _pb2.CODEC_NONE or payload.nbytes == 0 or not _can_compress():
        return _pb2.CODEC_NONE, _raw(payload, chunk)
    if trials is not None and not trials.due():
        return _pb2.CODEC_NONE, _raw(payload, chunk)
    typesize = _layout.element_size(layout)
    first = codec.compress(payload[:chunk], wanted, typesize)
    paid = len(first) * min_ratio() <= min(chunk, payload.nbytes)
    if trials is not None:
        trials.record(paid)
    if not paid:
        return _pb2.CODEC_NONE, _raw(payload, chunk)
    return wanted, _compressed(payload, chunk, wanted, typesize, first)


def _raw(payload: np.ndarray, chunk: int) -> Iterator[bytes]:
    for offset in range(0, payload.nbytes, chunk):
        # The only copy on the server: slot -> message bytes (gRPC needs bytes objects).
        yield payload[offset : offset + chunk].tobytes()


def _compressed(payload: np.ndarray, chunk: int, wanted: int, typesize: int, first: bytes) -> Iterator[bytes]:
    yield first
    for offset in range(chunk, payload.nbytes, chunk):
        # Compressed straight from the slot: the compressed bytes are the only copy.
        yield codec.compress(payload[offset : offset + chunk], wanted, typesize)


def _can_compress() -> bool:
    global _warned
    if codec.available():
        return True
    if not _warned:
        _warned = True
        log.warning(
            "a client asked for compression, but blosc2 is not installed: sending raw (%s)", codec.INSTALL
        )
    return False
