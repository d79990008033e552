"""The benchmark workloads (docs/performance.md): datasets built once into a cache directory.

Servers load them with ``python:batchferry.benchmarks.workloads:NAME`` specs, or
with a built-in source's spec over the same files (W3: ``imagefolder:``, P1:
``parquet:``, W4T: ``tokens:``), so the data directory travels in ``BATCHFERRY_BENCH_DATA``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import TensorDataset

from batchferry.layout import SlotWriter
from batchferry.server.collate import get_collate, pack_samples
from batchferry.server.datasets import NpyDataset
from batchferry.server.fetch import build_batch
from batchferry.server.sources import TokenDataset

DATA_ENV = "BATCHFERRY_BENCH_DATA"
SCALE_ENV = "BATCHFERRY_BENCH_SCALE"  # < 1 shrinks every dataset (for smoke tests)


def data_dir() -> Path:
    # A cache beside the user's others, never the installed package's folder.
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "batchferry" / "bench"
    path = Path(os.environ.get(DATA_ENV, cache))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _scaled(n: int) -> int:
    return max(1024, int(n * float(os.environ.get(SCALE_ENV, "1"))))


def w1() -> TensorDataset:
    """1,000,000 x (float32[2], int64 label), in memory."""
    n = _scaled(1_000_000)
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 2, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def w2() -> NpyDataset:
    """8,192 x uint8[3,224,224] in one memory-mapped .npy, with int64 labels."""
    n = _scaled(8192)
    root = data_dir() / f"w2-{n}"
    images, labels = root / "images.npy", root / "labels.npy"
    if not labels.exists():
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(2)
        arr = np.lib.format.open_memmap(images.with_suffix(".tmp.npy"), "w+", np.uint8, (n, 3, 224, 224))
        for start in range(0, n, 512):
            stop = min(n, start + 512)
            arr[start:stop] = rng.integers(0, 256, size=(stop - start, 3, 224, 224), dtype=np.uint8)
        arr.flush()
        del arr
        images.with_suffix(".tmp.npy").rename(images)
        np.save(labels, rng.integers(0, 1000, size=n, dtype=np.int64))
    return NpyDataset(images, labels)


class VarLenTokens:
    """int64 token sequences of length 16..512 from one memory-mapped flat array."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokens = np.load(root / "tokens.npy", mmap_mode="r")
        self.offsets = np.load(root / "offsets.npy")

    def __reduce__(self) -> tuple[Any, ...]:
        return (VarLenTokens, (self.root,))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.tokens[self.offsets[i] : self.offsets[i + 1]]))


def w4() -> VarLenTokens:
    """100,000 int64 documents of 16..512 tokens: one flat ``tokens.npy`` plus ``offsets.npy``."""
    n = _scaled(100_000)
    root = data_dir() / f"w4-{n}"
    if not (root / "offsets.npy").exists():
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(4)
        lengths = rng.integers(16, 513, size=n)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(root / "tokens.npy", rng.integers(0, 50_000, size=int(offsets[-1]), dtype=np.int64))
        np.save(root / "offsets.npy", offsets)
    return VarLenTokens(root)


def w4t_spec() -> str:
    """W4's files served by the token source."""
    return f"tokens:{w4().root / 'tokens.npy'}"


def w4t_build(collate: str, torch_collate: Callable[..., Any], batch_size: int = 64) -> dict[str, float]:
    """Building one batch in this process: the token source's gather against torch's fetch + collate."""
    per_sample = w4()
    tokens = TokenDataset(per_sample.root / "tokens.npy")
    fn = get_collate(collate)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(tokens), batch_size) for _ in range(300)]
    slot = torch.empty(max(8 << 20, 3 * 8 * batch_size * 600), dtype=torch.uint8)

    def seconds(build: Callable[[np.ndarray], Any]) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for idx in batches:
                build(idx)
            best = min(best, (time.perf_counter() - start) / len(batches))
        return best

    ours = seconds(lambda idx: build_batch(tokens, None, idx, fn, SlotWriter(slot)))
    theirs = seconds(lambda idx: torch_collate([per_sample[i] for i in idx.tolist()]))
    return {
        "batchferry_gather_us": 1e6 * ours,
        "torch_fetch_collate_us": 1e6 * theirs,
        "ratio": theirs / ours,
    }


def random_crop_flip(image: torch.Tensor, crop: int = 224) -> torch.Tensor:
    """A random ``crop`` x ``crop`` window of a CHW image, flipped left-right half the time."""
    top, left = (int(v) for v in torch.randint(0, image.shape[1] - crop + 1, (2,)))
    out = image[:, top : top + crop, left : left + crop]
    if torch.rand(()) < 0.5:
        out = out.flip(2)
    return out.contiguous()


class JpegFolder:
    """JPEG files in class folders, decoded with Pillow per sample, then :func:`random_crop_flip`.

    What a torch user writes; batchferry serves the same files as
    ``imagefolder:ROOT,transform=...random_crop_flip`` (the same decode and transform).
    """

    def __init__(self, root: Path, crop: int = 224) -> None:
        self.root = root
        self.crop = crop
        self.files = sorted(root.glob("*/*.jpg"))
        self.classes = sorted({f.parent.name for f in self.files})
        self._label = {c: i for i, c in enumerate(self.classes)}

    def __reduce__(self) -> tuple[Any, ...]:
        return (JpegFolder, (self.root, self.crop))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.files[i]
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
        image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return random_crop_flip(image, self.crop), self._label[path.parent.name]


def _w3_root() -> Path:
    return data_dir() / f"w3-{_scaled(2000)}"


def w3() -> JpegFolder:
    """2,000 JPEG files of 256x256 in 10 class folders."""
    n = _scaled(2000)
    root = _w3_root()
    if not (root / "done").exists():
        rng = np.random.default_rng(3)
        base = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        for i in range(n):
            folder = root / f"class_{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            # Smooth, photo-like content compresses like real images (noise would not).
            img = Image.fromarray(np.roll(base, i, axis=(0, 1))).resize((256, 256), Image.Resampling.BILINEAR)
            img.save(folder / f"{i:05d}.jpg", quality=90)
        (root / "done").touch()
    return JpegFolder(root)


def w3_spec() -> str:
    return f"imagefolder:{_w3_root()},transform=batchferry.benchmarks.workloads:random_crop_flip"


class ParquetRows:
    """Parquet rows read with pyarrow into numpy once, one dict of tensors per ``__getitem__``.

    What a torch user writes for a Parquet table; batchferry serves the file as
    ``parquet:PATH,columns=features,label``.
    """

    def __init__(self, path: Path, columns: Sequence[str] = ("features", "label")) -> None:
        self.path, self.columns = path, tuple(columns)
        table = pq.read_table(path, columns=list(self.columns))
        self.arrays = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            width = getattr(column.type, "list_size", None)
            values = column.flatten() if width else column
            array = values.to_numpy(zero_copy_only=False)
            self.arrays[name] = array.reshape(len(column), width) if width else array

    def __reduce__(self) -> tuple[Any, ...]:
        return (ParquetRows, (self.path, self.columns))

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.array(a[i])) for name, a in self.arrays.items()}


def _p1_path() -> Path:
    return data_dir() / f"p1-{_scaled(200_000)}.parquet"


def p1() -> ParquetRows:
    """200,000 rows: float32[64] features, int64 label and a string id, in row groups of 64k."""
    n = _scaled(200_000)
    path = _p1_path()
    if not path.exists():
        rng = np.random.default_rng(5)
        features = rng.standard_normal((n, 64), dtype=np.float32)
        table = pa.table(
            {
                "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), 64),
                "label": pa.array(rng.integers(0, 1000, n)),
                "id": pa.array([f"row-{i:07d}" for i in range(n)]),
            }
        )
        pq.write_table(table, path.with_suffix(".tmp"), row_group_size=65536)
        path.with_suffix(".tmp").rename(path)
    return ParquetRows(path)


def p1_spec() -> str:
    return f"parquet:{_p1_path()},columns=features,label"


def torch_pad(batch: Sequence[torch.Tensor]) -> torch.Tensor:
    return pad_sequence(list(batch), batch_first=True, padding_value=0)


@dataclass(frozen=True)
class Workload:
    id: str
    title: str
    factory: Callable[[], Any]
    batch_size: int
    batches: int  # measured per repetition, after the first
    collate: str = "default"
    torch_collate: Callable[..., Any] | None = None
    unit: str = "batches/s"
    notes: dict[str, str] = field(default_factory=dict)
    # The server's spec, when it is a built-in source rather than ``factory`` itself.
    server_spec: Callable[[], str] | None = None
    # Extra figures measured in this process (e.g. building one batch), kept in the report.
    in_process: Callable[[], dict[str, float]] | None = None

    @property
    def spec(self) -> str:
        if self.server_spec is not None:
            return self.server_spec()
        return f"python:batchferry.benchmarks.workloads:{self.factory.__name__}"


WORKLOADS = {
    "W1": Workload("W1", "tiny samples, per-batch overhead", w1, 256, 1500),
    "W2": Workload("W2", "224x224 images from a memory map", w2, 256, 24, unit="GB/s"),
    "W3": Workload("W3", "JPEG decode + random crop + flip, imagefolder:", w3, 64, 25, server_spec=w3_spec),
    "W4": Workload(
        "W4", "variable-length tokens, pad collate", w4, 64, 600, collate="pad", torch_collate=torch_pad
    ),
    "W4T": Workload(
        "W4T",
        "W4's tokens, tokens: source, pad",
        w4,
        64,
        600,
        collate="pad",
        torch_collate=torch_pad,
        server_spec=w4t_spec,
        in_process=lambda: w4t_build("pad", torch_pad),
    ),
    "W4T-pack": Workload(
        "W4T-pack",
        "W4's tokens, tokens: source, pack into rows of 2048",
        w4,
        64,
        600,
        collate="pack",
        torch_collate=pack_samples,
        server_spec=w4t_spec,
        in_process=lambda: w4t_build("pack", pack_samples),
    ),
    "P1": Workload("P1", "Parquet rows: float32[64] + label, parquet:", p1, 256, 300, server_spec=p1_spec),
}
