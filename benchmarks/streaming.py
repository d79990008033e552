"""S3: shards streamed from a local S3 server, batchferry against the streaming loaders users pick.

``batchferry bench S3`` starts moto's S3 server (a separate process on loopback),
puts two datasets in it, and reads each, epoch after epoch, through:

* batchferry: a ``batchferry serve`` process reading ``s3://`` (its disk cache
  starts empty), a client ``DataLoader`` on this host;
* the ``webdataset`` library's ``WebDataset`` (its shard cache on) in torch's
  ``DataLoader``, S3 opened through fsspec;
* LitData's ``StreamingDataset`` over the same samples written by ``litdata.optimize``
  (where LitData imports);
* torch's ``DataLoader`` over a map-style dataset reading the shards through fsspec's
  ``filecache::`` (a plain fsspec dataset with fsspec's own disk cache).

Datasets: W3's 2,000 JPEGs (256x256) as 20 tar shards, decoded by the same
Pillow code and centre-cropped to 224 by every loader, batch 64; and W4's token
documents (16..512 int64 tokens) as 10 tar shards of ``.npy`` documents, padded
to the longest, batch 64 (batchferry also reads them as one flat ``tokens:`` file,
its own layout). Every loader runs 2 worker processes, in order, no shuffling.
Start-up (batchferry: the server's start, with its listing, downloads and shard
indexes; a peer: building its dataset), epoch 1 (cold cache) and the warm epochs (the
fastest of three) are timed apart; ratios are samples/s against the fastest peer of each measure:
``cold`` (start-up and epoch 1), ``cold_epoch`` (epoch 1 alone) and ``warm``.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader as TorchLoader

from batchferry.client import DataLoader
from batchferry.server.sources._images import ImageDecode

from .harness import machine, save_report
from .workloads import data_dir, torch_pad, w3

BUCKET = "bench"
BATCH = 64
WORKERS = 2
WARM_EPOCHS = 3  # epochs after the first, each loader's fastest reported
IMAGE_SHARDS, TOKEN_SHARDS = 20, 10
TOKEN_DOCS = 20_000
DECODE = ImageDecode(crop=(224, 224))  # the decode every loader runs
# torch's workers as on Linux by default (fork: they inherit webdataset's s3 handler); LitData's
# optimize switches the default start method to spawn, which LitData's reader keeps.
_TORCH_WORKERS: dict[str, Any] = {
    "num_workers": WORKERS,
    "persistent_workers": True,
    "multiprocessing_context": "fork",
}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server in its own process; its endpoint and test credentials go into the
    environment, where s3fs, boto3 and every spawned loader find them."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("moto's S3 server did not start")
            time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(30)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def make_data(root: Path) -> dict[str, Any]:
    """Local shards of both datasets under ``root``, and their samples for the other formats."""
    jpegs = w3()
    images = []
    for i, path in enumerate(jpegs.files):
        images.append((f"{i:05d}", path.read_bytes(), jpegs._label[path.parent.name]))
    per = -(-len(images) // IMAGE_SHARDS)
    (root / "img").mkdir(parents=True)
    for s in range(IMAGE_SHARDS):
        with tarfile.open(root / "img" / f"shard-{s:03d}.tar", "w") as tar:
            for key, jpg, label in images[s * per : (s + 1) * per]:
                _add(tar, f"{key}.jpg", jpg)
                _add(tar, f"{key}.cls", str(label).encode())
    rng = np.random.default_rng(4)  # W4's documents: 16..512 int64 tokens
    n = TOKEN_DOCS
    offsets = np.concatenate([[0], np.cumsum(rng.integers(16, 513, size=n))]).astype(np.int64)
    tokens = rng.integers(0, 50_000, size=int(offsets[-1]), dtype=np.int64)
    (root / "tok").mkdir()
    (root / "flat").mkdir()
    np.save(root / "flat" / "tokens.npy", tokens)
    np.save(root / "flat" / "offsets.npy", offsets)
    per = -(-n // TOKEN_SHARDS)
    for s in range(TOKEN_SHARDS):
        with tarfile.open(root / "tok" / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(s * per, min(n, (s + 1) * per)):
                _add(tar, f"{i:06d}.npy", _npy(tokens[offsets[i] : offsets[i + 1]]))
    return {"images": images, "tokens": tokens, "offsets": offsets}


def _litdata_image(item: tuple[str, bytes, int]) -> dict[str, Any]:
    return {"jpg": item[1], "cls": item[2]}


def _litdata_doc(doc: np.ndarray) -> dict[str, Any]:
    return {"npy": doc}


def make_litdata(root: Path, samples: dict[str, Any]) -> None:
    """The same samples in LitData's chunk format (``optimize``), one folder per dataset."""
    from litdata import optimize

    docs = [
        samples["tokens"][a:b] for a, b in zip(samples["offsets"][:-1], samples["offsets"][1:], strict=True)
    ]
    for name, fn, inputs in (
        ("litimg", _litdata_image, samples["images"]),
        ("littok", _litdata_doc, docs),
    ):
        optimize(fn=fn, inputs=inputs, output_dir=str(root / name), chunk_bytes="4MB", num_workers=1)


def upload(root: Path) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, path.relative_to(root).as_posix())


# -- the loaders: each reads one epoch per iteration of what it returns -----------------
def _samples(batches: Iterable[Any]) -> int:
    count = 0
    for batch in batches:
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        count += len(first)
    return count


def _epochs(make: Callable[[], Iterable[Any]], epochs: int = 1 + WARM_EPOCHS) -> list[tuple[float, int]]:
    """Seconds of ``make()`` (start-up: listings, indexes), then seconds and samples of each epoch."""
    start = time.perf_counter()
    loader = make()
    out = [(time.perf_counter() - start, 0)]
    for _ in range(epochs):
        start = time.perf_counter()
        n = _samples(loader)
        out.append((time.perf_counter() - start, n))
    return out


@contextmanager
def _serve(spec: str, cache_dir: Path) -> Iterator[str]:
    cmd = [
        sys.executable, "-m", "batchferry.cli", "--log-level", "WARNING", "serve",
        "--dataset", f"d={spec}", "--host", "127.0.0.1", "--port", "0",
        "--num-workers", str(WORKERS), "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "serving" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        yield line.split(" on ", 1)[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(60)
        if proc.stdout is not None:
            proc.stdout.close()


def run_batchferry(spec: str, collate: str, tmp: Path) -> list[tuple[float, int]]:
    start = time.perf_counter()
    with _serve(spec, tmp / "bf-cache") as address:
        out = [(time.perf_counter() - start, 0)]  # the server's start: listings, downloads, indexes
        with DataLoader(address, "d", BATCH, collate_fn=collate) as loader:
            for _ in range(1 + WARM_EPOCHS):
                start = time.perf_counter()
                n = _samples(loader)
                out.append((time.perf_counter() - start, n))
    return out


def _decode_image(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
    return DECODE.decode(sample["jpg"]), int(sample["cls"])


def _decode_doc(sample: dict[str, Any]) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(sample["npy"])))


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192) -> Any:
    import fsspec

    return fsspec.open(url, mode).open()


def run_webdataset(
    urls: list[str], decode: Callable[..., Any], collate: Any, tmp: Path
) -> list[tuple[float, int]]:
    import webdataset as wds

    gopen = importlib.import_module("webdataset.gopen")  # the package's gopen is the function
    gopen.gopen_schemes["s3"] = _gopen_fsspec  # webdataset has no s3 handler of its own
    cache = tmp / "wds-cache"
    cache.mkdir(parents=True)

    def make() -> Iterable[Any]:
        ds = wds.WebDataset(urls, shardshuffle=False, cache_dir=str(cache), empty_check=False).map(decode)
        return TorchLoader(ds, BATCH, collate_fn=collate, **_TORCH_WORKERS)

    return _epochs(make)


class FsspecShards(torch.utils.data.Dataset[Any]):
    """Map-style samples of tar shards read through fsspec's ``filecache::`` (what a torch user
    writes with fsspec): members indexed once, read by offset from the cached copy."""

    def __init__(self, urls: Sequence[str], cache: Path, decode: Callable[[dict[str, Any]], Any]) -> None:
        self.urls, self.cache, self.decode = list(urls), cache, decode
        self.index: list[tuple[int, dict[str, tuple[int, int]]]] = []
        for s in range(len(self.urls)):
            with self._open(s) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                samples: dict[str, dict[str, tuple[int, int]]] = {}
                for info in tar:
                    key, _, ext = info.name.partition(".")
                    samples.setdefault(key, {})[ext] = (info.offset_data, info.size)
            self.index.extend((s, members) for members in samples.values())
        self._files: dict[int, Any] = {}

    def _open(self, s: int) -> Any:
        import fsspec

        return fsspec.open(
            f"filecache::{self.urls[s]}", "rb", filecache={"cache_storage": str(self.cache)}
        ).open()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Any:
        s, members = self.index[i]
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = self._open(s)
        sample = {}
        for ext, (offset, size) in members.items():
            f.seek(offset)
            sample[ext] = f.read(size)
        return self.decode(sample)


def run_fsspec(
    urls: list[str], decode: Callable[..., Any], collate: Any, tmp: Path
) -> list[tuple[float, int]]:
    cache = tmp / "fsspec-cache"

    def make() -> Iterable[Any]:
        ds = FsspecShards(urls, cache, decode)
        return TorchLoader(ds, BATCH, collate_fn=collate, **_TORCH_WORKERS)

    return _epochs(make)


def _lit_image(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
    return DECODE.decode(sample["jpg"]), int(sample["cls"])


def _lit_doc(sample: dict[str, Any]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(sample["npy"]))


def _lit_allow_http(_worker: int = 0) -> None:
    """LitData's obstore client refuses a plain-http endpoint (moto's here) unless told it may;
    in each process, its workers (spawned) included."""
    from litdata.streaming import downloader

    downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"}


def run_litdata(url: str, decode: Callable[..., Any], collate: Any, tmp: Path) -> list[tuple[float, int]]:
    from litdata import StreamingDataset

    _lit_allow_http()

    cache = tmp / f"lit-cache-{url.rsplit('/', 1)[-1]}"

    def make() -> Iterable[Any]:
        ds = StreamingDataset(url, cache_dir=str(cache), max_cache_size="10GB", transform=decode)
        return TorchLoader(
            ds,
            BATCH,
            num_workers=WORKERS,
            collate_fn=collate,
            persistent_workers=True,
            worker_init_fn=_lit_allow_http,
        )

    return _epochs(make)


def _image_collate(batch: list[tuple[torch.Tensor, int]]) -> Any:
    return torch.utils.data.default_collate(batch)


def _rates(runs: list[tuple[float, int]]) -> dict[str, float]:
    """Start-up, epoch 1 and the warm epochs (the fastest of them: every loader's best, so
    a passing stall of the shared machine does not decide); cold counts the start-up with
    epoch 1 (the empty cache)."""
    (start, _), (first, n), *warms = runs
    warm, m = min(warms)
    return {
        "start_s": start,
        "first_epoch_s": first,
        "warm_epoch_s": warm,
        "cold_samples_per_s": n / (start + first),
        "cold_epoch_samples_per_s": n / first,
        "warm_samples_per_s": m / warm,
        "samples": n,
    }


def _ratios(result: dict[str, Any], ours: Sequence[str]) -> dict[str, Any]:
    """Each of ours against the fastest peer, per measure."""
    peers = {k: v for k, v in result.items() if k not in ours and "error" not in v}
    out: dict[str, Any] = {}
    for measure in ("cold", "cold_epoch", "warm"):
        key = f"{measure}_samples_per_s"
        if not peers:
            continue
        best = max(peers, key=lambda k: peers[k][key])
        out[measure] = {
            "fastest_peer": best,
            **{
                o: result[o][key] / peers[best][key] for o in ours if o in result and "error" not in result[o]
            },
        }
    return out


def _attempt(results: dict[str, Any], name: str, run: Callable[[], list[tuple[float, int]]]) -> None:
    print(f"  {name} ...", file=sys.stderr, flush=True)
    try:
        results[name] = _rates(run())
    except Exception as exc:  # a peer that does not run here is reported, not fatal
        results[name] = {"error": f"{type(exc).__name__}: {str(exc)[-400:]}"}  # the cause ends a traceback
    print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Workload:
    id: str
    specs: dict[str, str]  # batchferry's, by name in the report
    bf_collate: str
    urls: list[str]  # the tar shards the peers read
    decode: Callable[[dict[str, Any]], Any]  # a tar sample (ext -> bytes) to a sample
    lit_url: str
    lit_decode: Callable[[dict[str, Any]], Any]
    collate: Callable[[Any], Any]


def _workloads() -> list[_Workload]:
    img = f"s3://{BUCKET}/img/shard-{{000..{IMAGE_SHARDS - 1:03d}}}.tar"
    tok = f"s3://{BUCKET}/tok/shard-{{000..{TOKEN_SHARDS - 1:03d}}}.tar"
    return [
        _Workload(
            "S3-images",
            {"batchferry": f"webdataset:{img},fields=jpg,cls,crop=224"},
            "default",
            [f"s3://{BUCKET}/img/shard-{s:03d}.tar" for s in range(IMAGE_SHARDS)],
            _decode_image,
            f"s3://{BUCKET}/litimg",
            _lit_image,
            _image_collate,
        ),
        _Workload(
            "S3-tokens",
            {
                "batchferry": f"webdataset:{tok},fields=npy",
                "batchferry tokens:": f"tokens:s3://{BUCKET}/flat/tokens.npy",
            },
            "pad",
            [f"s3://{BUCKET}/tok/shard-{s:03d}.tar" for s in range(TOKEN_SHARDS)],
            _decode_doc,
            f"s3://{BUCKET}/littok",
            _lit_doc,
            torch_pad,
        ),
    ]


def _run(w: _Workload, tmp: Path, lit: bool) -> dict[str, Any]:
    """Every loader over one workload, one after another."""
    print(w.id, file=sys.stderr, flush=True)
    results: dict[str, Any] = {}
    for name, spec in w.specs.items():
        where = tmp / f"{w.id}-{name}"
        _attempt(results, name, lambda s=spec, d=where: run_batchferry(s, w.bf_collate, d))  # type: ignore[misc]
    _attempt(results, "webdataset", lambda: run_webdataset(w.urls, w.decode, w.collate, tmp / f"{w.id}-wds"))
    if lit:
        _attempt(results, "litdata", lambda: run_litdata(w.lit_url, w.lit_decode, w.collate, tmp / w.id))
    else:
        results["litdata"] = {"error": "litdata is not importable with this torch"}
    _attempt(results, "torch+fsspec", lambda: run_fsspec(w.urls, w.decode, w.collate, tmp / f"{w.id}-fs"))
    return {"loaders": results, "ratios": _ratios(results, list(w.specs))}


def _litdata_origin() -> str:
    import litdata

    if importlib.util.find_spec("torchvision") is not None:
        vision = "torchvision importable"
    else:
        vision = "no torchvision (installed with --no-deps; StreamingDataset does not need it)"
    return f"litdata from {Path(litdata.__file__).parent.parent}, {vision}, torch {torch.__version__}"


def _settings(endpoint: str, samples: dict[str, Any], lit: bool) -> dict[str, Any]:
    """What each loader ran with, and the peers' versions."""
    loader = f"torch DataLoader(num_workers={WORKERS}, persistent_workers=True, fork)"
    return {
        "s3": f"moto {_version('moto')} server, separate process, {endpoint}",
        "batch_size": BATCH,
        "workers": f"{WORKERS} worker processes per loader, in order, no shuffle",
        "images": f"{len(samples['images'])} JPEG 256x256 in {IMAGE_SHARDS} tar shards, "
        "decoded with Pillow and centre-cropped to 224 by every loader",
        "tokens": f"{len(samples['offsets']) - 1} int64 documents of 16..512 tokens in "
        f"{TOKEN_SHARDS} tar shards of .npy documents (batchferry also: one flat tokens: file), "
        "padded to the longest",
        "batchferry": f"batchferry serve --num-workers {WORKERS} --cache-dir (empty at start); "
        "client DataLoader transport=auto (shared memory on this host); cold includes the server's start",
        "webdataset": f"webdataset {_version('webdataset')}: WebDataset(shardshuffle=False, cache_dir) "
        f"in {loader}, s3:// opened by fsspec",
        "litdata": (
            f"litdata {_version('litdata')}: StreamingDataset(cache_dir, max_cache_size=10GB, transform) "
            f"of optimize(chunk_bytes=4MB) output, in torch DataLoader(num_workers={WORKERS}, "
            "persistent_workers=True, spawn as LitData sets it); its obstore client allowed plain http"
            if lit
            else "litdata: not importable here"
        ),
        # pip resolves litdata's torchvision against torch: unpinned it replaces torch 2.13 CPU.
        "litdata_install": _litdata_origin() if lit else "",
        "torch+fsspec": f"fsspec {_version('fsspec')}, s3fs {_version('s3fs')}: map-style dataset over "
        f"filecache::s3:// shards, in {loader}",
    }


def main(out: Path) -> dict[str, Any]:
    missing = [m for m in ("moto", "boto3", "s3fs", "webdataset") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"bench S3 needs {', '.join(missing)}: pip install -e '.[bench-s3]'")
    try:
        import litdata  # noqa: F401

        lit = True
    except ImportError:
        lit = False
    data_dir()  # W3's and W4's files are made there once
    with tempfile.TemporaryDirectory(prefix="batchferry-s3-") as scratch:
        root = Path(scratch) / "data"
        samples = make_data(root)
        if lit:  # before the S3 server starts (optimize runs worker processes of its own)
            make_litdata(root, samples)
        with s3_server() as endpoint:
            upload(root)
            shutil.rmtree(root)  # every loader reads from S3
            report = _report(endpoint, samples, lit, Path(scratch))
    print(json.dumps({w: r["ratios"] for w, r in report["workloads"].items()}, indent=2))
    save_report(report, out, "S3")
    return report


def _report(endpoint: str, samples: dict[str, Any], lit: bool, scratch: Path) -> dict[str, Any]:
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "command": "batchferry bench S3",
        "machine": machine(),
        "settings": _settings(endpoint, samples, lit),
        "workloads": {},
    }
    for w in _workloads():
        report["workloads"][w.id] = _run(w, scratch, lit)
    return report
