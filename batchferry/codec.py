"""Lossless compression of byte-stream payload, shared by server and client.

A compressed batch's payload messages are blosc2 chunks, one per message, each
decodable on its own: a byte shuffle by the element size of the batch's widest
tensor, then lz4 (``CODEC_LZ4``) or zstd level 1 (``CODEC_ZSTD``). A chunk's
32-byte header states its compressed and decompressed sizes; the client checks
both before it decompresses straight into its buffer. blosc2 is an optional
dependency (``pip install 'batchferry[compression]'``), imported on first use.

The codecs carry no checksum: integrity is the transport's (TCP, TLS), as for raw
chunks. What is checked is that a chunk can never write outside its place.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import numpy as np

from batchferry.v1 import loader_pb2 as _pb2

__all__ = ["CODECS", "INSTALL", "NAMES", "available", "compress", "decompress_into", "load"]

INSTALL = "pip install 'batchferry[compression]'"
CODECS: dict[str, _pb2.Codec] = {
    "none": _pb2.CODEC_NONE,
    "lz4": _pb2.CODEC_LZ4,
    "zstd": _pb2.CODEC_ZSTD,
}
NAMES: dict[_pb2.Codec, str] = {code: name for name, code in CODECS.items()}
# Speed over density: at level 1 lz4 moves GB/s a core, which is what a 10 Gbit/s link needs.
_CLEVEL = 1


@functools.cache
def load() -> ModuleType:
    """The blosc2 module; ImportError naming the extra to install when it is missing."""
    try:
        return importlib.import_module("blosc2")
    except ImportError as exc:
        raise ImportError(f"compression needs the blosc2 package: {INSTALL}") from exc


def available() -> bool:
    try:
        load()
    except ImportError:
        return False
    return True


# One thread each way: the sender and receiver already run beside the workers, and a
# second blosc2 thread did not help on a 2-core machine (benchmarks/codecs.py).
@functools.cache
def _cparams(codec: int, typesize: int) -> Any:
    blosc2 = load()
    inner = blosc2.Codec.LZ4 if codec == _pb2.CODEC_LZ4 else blosc2.Codec.ZSTD
    return blosc2.CParams(
        codec=inner, clevel=_CLEVEL, typesize=typesize, filters=[blosc2.Filter.SHUFFLE], nthreads=1
    )


@functools.cache
def _dparams() -> Any:
    return load().DParams(nthreads=1)


def compress(data: np.ndarray, codec: int, typesize: int) -> bytes:
    """One chunk (a contiguous uint8 array) compressed with ``codec``; blosc2 releases the GIL."""
    # blosc2's typesize is at most 255 bytes.
    packed: bytes = load().compress2(data, cparams=_cparams(codec, max(1, min(typesize, 255))))
    return packed


def decompress_into(chunk: bytes, target: np.ndarray) -> int:
    """Decompress one chunk into the front of ``target`` (contiguous uint8); the bytes it
    filled. ValueError when the chunk is malformed or would not fit: nothing is written
    outside ``target`` (the header is checked first, since blosc2 trusts it)."""
    blosc2 = load()
    try:
        nbytes, cbytes, _ = blosc2.get_cbuffer_sizes(chunk)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"malformed compressed chunk ({len(chunk)} bytes): {exc}") from exc
    if cbytes != len(chunk):
        raise ValueError(f"compressed chunk says it has {cbytes} bytes, got {len(chunk)}")
    if not 0 < nbytes <= target.nbytes:
        raise ValueError(
            f"compressed chunk decompresses to {nbytes} bytes, {target.nbytes} left in the payload"
        )
    try:
        blosc2.decompress2(chunk, dst=target[:nbytes], dparams=_dparams())
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot decompress a {len(chunk)}-byte chunk: {exc}") from exc
    return int(nbytes)
