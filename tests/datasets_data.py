"""Small on-disk datasets in each format the built-in sources read (made in a test's tmp_path)."""

from __future__ import annotations

import gzip
import importlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# A tiny "image" per sample: height, width and mode vary so resize and crop matter.
SIZES = [(12, 16), (16, 12), (10, 10), (9, 14), (20, 8)]


def image(i: int, size: tuple[int, int] | None = None, mode: str = "RGB") -> Image.Image:
    h, w = size or SIZES[i % len(SIZES)]
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def make_mnist(
    folder: Path, n_train: int = 23, n_test: int = 7, gz: bool = False, seed: int = 0
) -> dict[str, Any]:
    """IDX files in ``folder``; returns the arrays written, by split."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[split] = (images, labels)
    return out


# Created in this order on purpose: the dataset's order must not depend on it.
FOLDER_FILES = [
    "b/10.png",
    "b/9.png",
    "b/notes.txt",
    "a/z.JPEG",
    "a/sub/1.bmp",
    "a/a.jpg",
    "a/sub.png",
    "C/x.webp",
    "a/.hidden.png",
]
# torchvision's ImageFolder order for them: classes sorted ("C" < "a" < "b"), then
# os.walk sorted by folder, files sorted by name, image extensions only.
FOLDER_ORDER = [
    ("C/x.webp", 0),
    ("a/.hidden.png", 1),
    ("a/a.jpg", 1),
    ("a/sub.png", 1),
    ("a/z.JPEG", 1),
    ("a/sub/1.bmp", 1),
    ("b/10.png", 2),
    ("b/9.png", 2),
]


def make_imagefolder(root: Path) -> None:
    for i, rel in enumerate(FOLDER_FILES):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            path.write_text("not an image")
            continue
        fmt = {"jpg": "PNG", "jpeg": "PNG", "webp": "WEBP", "bmp": "BMP"}.get(
            rel.rsplit(".", 1)[1].lower(), "PNG"
        )
        # Lossless content everywhere (PNG bytes behind .jpg names decode the same).
        image(i).save(path, format=fmt, lossless=True) if fmt == "WEBP" else image(i).save(path, format=fmt)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    image(i).save(buf, format="PNG")
    return buf.getvalue()


def make_shards(folder: Path, shards: int = 3, per_shard: int = 4) -> list[dict[str, Any]]:
    """WebDataset shards ``data-000.tar``...; returns each sample's expected raw fields in order."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = []
    for s in range(shards):
        with tarfile.open(folder / f"data-{s:03d}.tar", "w") as tar:
            _add(tar, "__meta__", b"skipped")
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"part{s}/sample{i:04d}"
                arr = np.arange(6, dtype=np.float32).reshape(2, 3) + i
                buf = io.BytesIO()
                np.save(buf, arr)
                fields = {
                    "png" if i % 2 else "jpg": png_bytes(i),
                    "cls": str(i % 3).encode(),
                    "txt": f"caption {i}".encode(),
                    "json": json.dumps({"i": i}).encode(),
                    "npy": buf.getvalue(),
                    "meta.bin": bytes([i, 1, 2]),
                }
                for ext, data in fields.items():
                    _add(tar, f"{key}.{ext.upper() if ext == 'txt' else ext}", data)
                _add(tar, f"{key}", b"no extension: skipped")
                expected.append({"__key__": key, "i": i, "image": "png" if i % 2 else "jpg", "npy": arr})
    return expected


def parquet_table(n: int, start: int = 0) -> Any:
    import pyarrow as pa

    idx = np.arange(start, start + n)
    vec = np.arange(start * 4, (start + n) * 4, dtype=np.float32)
    grid = np.arange(start * 6, (start + n) * 6, dtype=np.int16)
    return pa.table(
        {
            "label": pa.array(idx % 5, pa.int64()),
            "score": pa.array(idx / 4, pa.float32()),
            "flag": pa.array(idx % 2 == 0),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec), 4),
            "grid": pa.FixedSizeListArray.from_arrays(
                pa.FixedSizeListArray.from_arrays(pa.array(grid), 3), 2
            ),
            "name": pa.array([f"row-{i}" for i in idx]),
            "tokens": pa.array([list(range(i % 4 + 1)) for i in idx], pa.list_(pa.int32())),
            "blob": pa.array([bytes([i % 256]) * (i % 3) for i in idx], pa.binary()),
        }
    )


def make_parquet(folder: Path, sizes: tuple[int, ...] = (9, 8)) -> list[Path]:
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for k, n in enumerate(sizes):
        path = folder / f"part-{k:02d}.parquet"
        pq.write_table(parquet_table(n, start), path, row_group_size=4)
        paths.append(path)
        start += n
    return paths


def make_hf(folder: Path, n: int = 12, splits: bool = False) -> Any:
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features(
        {
            "label": datasets.ClassLabel(names=["cat", "dog", "eel"]),
            "x": datasets.Value("float32"),
            "emb": datasets.Sequence(datasets.Value("float32"), length=3),
            "text": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    data = {
        "label": [i % 3 for i in range(n)],
        "x": [i / 2 for i in range(n)],
        "emb": [[i, i + 1, i + 2] for i in range(n)],
        "text": [f"t{i}" for i in range(n)],
        "image": [{"bytes": png_bytes(i), "path": None} for i in range(n)],
    }
    ds = datasets.Dataset.from_dict(data, features=features)
    if splits:
        dd = datasets.DatasetDict({"train": ds, "test": ds.select(range(3))})
        dd.save_to_disk(str(folder))
        return dd
    ds.save_to_disk(str(folder), max_shard_size="2KB")
    return ds


ENTRY_POINTS = """[batchferry.datasets]
myformat = myformat_pkg:from_spec
"""

PACKAGE = """
import torch


class Counting:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i, self.n])


def from_spec(rest):
    if not rest.isdigit():
        raise ValueError(f"expected a count, got {rest!r}")
    return Counting(int(rest))
"""


def install_myformat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution declaring the ``myformat`` kind, installed only on sys.path."""
    site = tmp_path / "site"
    (site / "myformat_pkg").mkdir(parents=True)
    (site / "myformat_pkg" / "__init__.py").write_text(PACKAGE)
    info = site / "myformat_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myformat-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return site
