"""Lossless codecs on batch payloads: which would pay off on the byte stream, and on which links.

``batchferry bench CODECS [--chunk-kib 1024]`` compresses
representative payloads chunk by chunk (as the byte stream sends them) with lz4
(block and frame; block also after a byte-shuffle done with numpy, for dtypes
wider than a byte), zstd (levels 1 and 3) and blosc2 (byte-shuffle with
typesize = the dtype's size, lz4 and zstd inside; 1 and 2 threads), and prints compress and decompress GB/s
(uncompressed bytes per second, best of 5, one thread unless said) and the ratio.

For a link of L GB/s, a sender compressing at C, a receiver decompressing at D
and a ratio r (each side on its own core, pipelined), payload moves at about
``min(C, D, r * L)``: a codec pays off where that beats L. The table shows it for
10 Gbit/s (1.25 GB/s) and 25 Gbit/s (3.125 GB/s). Payloads:

* ``W2 random``: W2's uint8 images as the benchmark makes them (uniform noise:
  incompressible, the worst case);
* ``W2 photo``: 224x224 crops (with flips) of a real photograph (matplotlib's
  ``grace_hopper.jpg``), decoded, as a W2-shaped uint8 batch;
* ``W3 decoded``: W3's smooth JPEG images, decoded and cropped as W3 serves them;
* ``W1 float32``: W1's float32 features (normal noise);
* ``W4 int64 padded``: W4's token batches padded with 0 (ids below 50,000 in int64).

Chunks are 1 MiB by default: the Python bindings of lz4 return a fresh ``bytes``
per call, and at 4 MiB (above glibc's mmap threshold) each call then faults in new
pages, which on incompressible data costs more than the compression itself (lz4
block measured 0.9 GB/s at 4 MiB, 16.8 GB/s at 1 MiB, same data and run).
Libraries missing here are listed as such (``pip install 'batchferry[compression]'``).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import io
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from matplotlib import cbook
from PIL import Image

from .harness import machine, save_report

__all__ = ["LINKS_GB_S", "candidates", "main", "measure", "payloads"]

CHUNK = 1 << 20
LINKS_GB_S = {"10 Gbit/s": 1.25, "25 Gbit/s": 3.125}
Codec = tuple[Callable[[memoryview], bytes], Callable[[bytes], Any]]


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _photo(n: int, rng: np.random.Generator) -> np.ndarray:
    path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    with Image.open(path) as img:
        photo = np.asarray(img.convert("RGB")).transpose(2, 0, 1)  # 3 x 600 x 512
    out = np.empty((n, 3, 224, 224), np.uint8)
    for i in range(n):
        top = int(rng.integers(0, photo.shape[1] - 224))
        left = int(rng.integers(0, photo.shape[2] - 224))
        crop = photo[:, top : top + 224, left : left + 224]
        out[i] = crop[:, :, ::-1] if i % 2 else crop
    return out


def _w3(n: int, rng: np.random.Generator) -> np.ndarray:
    base = np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # as W3 makes them
    out = np.empty((n, 3, 224, 224), np.uint8)
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=(0, 1))).resize((256, 256), Image.Resampling.BILINEAR)
        encoded = io.BytesIO()
        img.save(encoded, format="JPEG", quality=90)
        decoded = np.asarray(Image.open(encoded).convert("RGB")).transpose(2, 0, 1)
        top, left = (int(v) for v in rng.integers(0, 256 - 224, size=2))
        out[i] = decoded[:, top : top + 224, left : left + 224]
    return out


def _w4(batches: int, rng: np.random.Generator) -> np.ndarray:
    rows = []
    for _ in range(batches):
        lengths = rng.integers(16, 513, size=64)
        batch = np.zeros((64, int(lengths.max())), np.int64)
        for row, n in zip(batch, lengths, strict=True):
            row[:n] = rng.integers(0, 50_000, size=int(n))
        rows.append(batch.reshape(-1))
    return np.concatenate(rows)


def payloads(images: int = 64) -> dict[str, np.ndarray]:
    """The payloads, each a few MiB to tens of MiB."""
    rng = np.random.default_rng(0)
    return {
        "W2 random": rng.integers(0, 256, size=(images, 3, 224, 224), dtype=np.uint8),
        "W2 photo": _photo(images, rng),
        "W3 decoded": _w3(images, rng),
        "W1 float32": rng.standard_normal((256 * 1024, 2), dtype=np.float32),
        "W4 int64 padded": _w4(64, rng),
    }


def _shuffle(data: memoryview, typesize: int) -> np.ndarray:
    """Byte-shuffle: the first byte of every element, then every second byte, ... (as blosc2's)."""
    return np.ascontiguousarray(np.frombuffer(data, np.uint8).reshape(-1, typesize).T)


def _unshuffle(data: bytes, typesize: int) -> np.ndarray:
    return np.ascontiguousarray(np.frombuffer(data, np.uint8).reshape(typesize, -1).T)


def candidates(typesize: int) -> dict[str, Codec | None]:
    lz4_block, lz4_frame = _module("lz4.block"), _module("lz4.frame")
    zstd, blosc2 = _module("zstandard"), _module("blosc2")
    codecs: dict[str, Codec | None] = {}
    codecs["lz4 block"] = (lz4_block.compress, lz4_block.decompress) if lz4_block else None
    codecs["lz4 frame"] = (lz4_frame.compress, lz4_frame.decompress) if lz4_frame else None
    if lz4_block is not None and typesize > 1:
        codecs["lz4 block + numpy shuffle"] = (
            lambda b: lz4_block.compress(_shuffle(b, typesize)),
            lambda b: _unshuffle(lz4_block.decompress(b), typesize),
        )
    for level in (1, 3):
        if zstd is None:
            codecs[f"zstd {level}"] = None
            continue
        compressor, decompressor = zstd.ZstdCompressor(level=level), zstd.ZstdDecompressor()
        codecs[f"zstd {level}"] = (compressor.compress, decompressor.decompress)
    for inner in ("lz4", "zstd"):
        for threads in (1, 2):
            name = f"blosc2 {inner} shuffle{' 2 threads' if threads == 2 else ''}"
            if blosc2 is None:
                codecs[name] = None
                continue
            codec = blosc2.Codec.LZ4 if inner == "lz4" else blosc2.Codec.ZSTD
            cparams = blosc2.CParams(
                codec=codec, clevel=5 if inner == "lz4" else 1, typesize=typesize, nthreads=threads,
                filters=[blosc2.Filter.SHUFFLE],
            )  # fmt: skip
            codecs[name] = _blosc2(blosc2, cparams, blosc2.DParams(nthreads=threads))
    return codecs


def _blosc2(blosc2: ModuleType, cparams: Any, dparams: Any) -> Codec:
    def compress(data: memoryview) -> bytes:
        packed: bytes = blosc2.compress2(data, cparams=cparams)
        return packed

    def decompress(data: bytes) -> Any:
        return blosc2.decompress2(data, dparams=dparams)

    return compress, decompress


def _each(fn: Callable[[Any], object], items: list[Any]) -> None:
    for item in items:
        fn(item)


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(payload: np.ndarray, codec: Codec, repeats: int = 5, chunk: int = CHUNK) -> dict[str, float]:
    compress, decompress = codec
    data = memoryview(np.ascontiguousarray(payload).reshape(-1).view(np.uint8).data)
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    packed = [compress(c) for c in chunks]
    for piece, p in zip(chunks, packed, strict=True):  # lossless, or it does not count
        if bytes(decompress(p)) != bytes(piece):
            raise AssertionError("a codec did not give its input back")
    # Each result is dropped before the next chunk, as a sender drops a chunk once sent,
    # so the allocator reuses its memory instead of faulting in fresh pages every time.
    c = _best(lambda: _each(compress, chunks), repeats)
    d = _best(lambda: _each(decompress, packed), repeats)
    ratio = len(data) / sum(len(p) for p in packed)
    result = {"compress_gb_s": len(data) / c / 1e9, "decompress_gb_s": len(data) / d / 1e9, "ratio": ratio}
    for link, rate in LINKS_GB_S.items():
        result[f"effective_gb_s at {link}"] = min(
            result["compress_gb_s"], result["decompress_gb_s"], rate * ratio
        )
    return result


def main(*, out: Path, repeats: int = 5, images: int = 64, chunk_kib: int = CHUNK >> 10) -> dict[str, Any]:
    chunk = chunk_kib << 10
    versions = {}
    for name in ("lz4", "zstandard", "blosc2"):
        module = _module(name)
        versions[name] = getattr(module, "__version__", "installed") if module else None
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "command": f"batchferry bench CODECS --chunk-kib {chunk_kib}",
        "chunk_bytes": chunk,
        "machine": machine(),
        "libraries": versions,
        "links_gb_s": LINKS_GB_S,
        "payloads": {},
    }
    header = f"{'payload':<18}{'codec':<28}{'compress':>9}{'decompress':>11}{'ratio':>7}" + "".join(
        f"{'at ' + link:>15}" for link in LINKS_GB_S
    )
    print("GB/s of uncompressed bytes; 'at L': what moves over a link of L, pipelined (link alone: "
          + ", ".join(f"{v:g}" for v in LINKS_GB_S.values()) + ")")  # fmt: skip
    print(header)
    for name, payload in payloads(images).items():
        results: dict[str, Any] = {"bytes": payload.nbytes, "dtype": str(payload.dtype)}
        for codec_name, codec in candidates(payload.dtype.itemsize).items():
            if codec is None:
                results[codec_name] = None
                print(f"{name:<18}{codec_name:<28}{'not installed':>27}")
                continue
            r = results[codec_name] = measure(payload, codec, repeats, chunk)
            print(
                f"{name:<18}{codec_name:<28}{r['compress_gb_s']:>9.2f}{r['decompress_gb_s']:>11.2f}"
                f"{r['ratio']:>7.2f}"
                + "".join(f"{r[f'effective_gb_s at {link}']:>15.2f}" for link in LINKS_GB_S)
            )
        report["payloads"][name] = results
    save_report(report, out, "CODECS")
    return report
