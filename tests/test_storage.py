"""Datasets in object storage: moto's S3 and a plain HTTP server on loopback, a disk cache between."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader

from batchferry import cli, errors
from batchferry.client import DataLoader
from batchferry.server import Server, parse_spec
from batchferry.server.cache import CacheFull, FileCache
from batchferry.server.sources._remote import StorageSettings, Store, redact, using
from batchferry.server.sources.webdataset import expand_braces

import datasets_data as data
from checks import assert_same
from processes import back_after
from storage_servers import BUCKET, HTTP, S3, AuthS3, auth_s3, http_server, s3, s3_env, s3_server

__all__ = ["auth_s3", "http_server", "s3", "s3_server"]  # fixtures, used by name

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"


def _datasets(root: Path) -> dict[str, str]:
    """Local specs of every file-based source over small files made under ``root``."""
    rng = np.random.default_rng(0)
    (root / "npy").mkdir(parents=True)
    np.save(root / "npy" / "x.npy", rng.standard_normal((21, 3)).astype(np.float32))
    np.save(root / "npy" / "y.npy", np.arange(21) % 4)
    (root / "tok").mkdir()
    lengths = rng.integers(1, 9, 17)
    np.save(root / "tok" / "tokens.npy", rng.integers(0, 1000, int(lengths.sum())).astype(np.int32))
    np.save(root / "tok" / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    data.make_parquet(root / "pq", sizes=(9, 8))
    data.make_shards(root / "wds")
    data.make_imagefolder(root / "images")
    return {
        "npy": "npy:{0}/npy/x.npy,labels={0}/npy/y.npy",
        "tokens": "tokens:{0}/tok/tokens.npy,lengths=true",
        "parquet": "parquet:{0}/pq,columns=vec,label,name",
        "webdataset": "webdataset:{0}/wds/data-{{000..002}}.tar,fields=png|jpg,cls,npy,resize=12,crop=10",
        "images": "imagefolder:{0}/images,resize=12,crop=10",
    }


def _read(address: str, name: str, collate: str = "default") -> list[object]:
    with DataLoader(address, name, 4, shuffle=True, seed=3, collate_fn=collate) as loader:
        return list(loader)


def test_every_file_source_reads_s3_as_it_reads_local_files(tmp_path: Path, s3: S3) -> None:
    specs = _datasets(tmp_path / "local")
    url = s3.upload(tmp_path / "local", "parity")
    both = {**{f"local-{k}": v.format(tmp_path / "local") for k, v in specs.items()}}
    both.update({f"s3-{k}": v.format(url) for k, v in specs.items()})
    cache = tmp_path / "cache"
    with Server(both, host="127.0.0.1", port=0, num_workers=1, cache_dir=str(cache)) as srv:
        for name in specs:
            collate = "pad" if name == "tokens" else "default"
            remote = _read(srv.address, f"s3-{name}", collate)
            assert_same(remote, _read(srv.address, f"local-{name}", collate), name)
            if collate == "default":  # torch's DataLoader over the local files, in the same order
                reference = TorchLoader(
                    parse_spec(both[f"local-{name}"]),
                    batch_size=4,
                    shuffle=True,
                    generator=torch.Generator().manual_seed(3),
                )
                assert_same(remote, list(reference), f"{name} against torch")
    # Whole files only, each renamed in complete: nothing half-written is left.
    assert not list((cache / "part").iterdir())
    # npy, tokens, parquet: 2 files each; 3 shards; 8 images.
    assert len(list((cache / "data").iterdir())) == 2 + 2 + 2 + 3 + 8


def test_http_and_globs_read_as_local_files(tmp_path: Path, http_server: HTTP) -> None:
    local = _datasets(http_server.root)
    specs = {
        "http-images": local["images"].format(http_server.url),
        "http-wds": local["webdataset"].format(http_server.url),
        "images": local["images"].format(http_server.root),
        "wds": local["webdataset"].format(http_server.root),
    }
    with using(StorageSettings(cache_dir=str(tmp_path / "cache"))):
        for name in ("images", "wds"):
            remote, here = parse_spec(specs[f"http-{name}"]), parse_spec(specs[name])
            assert_same(list(TorchLoader(remote, 5)), list(TorchLoader(here, 5)), name)  # type: ignore[arg-type]
        # A glob and a brace list name the same shards.
        store = Store()
        globbed = store.expand(f"{http_server.url}/wds/data-00*.tar", expand_braces)
        braced = store.expand(f"{http_server.url}/wds/data-{{000..002}}.tar", expand_braces)
        assert [f.url for f in globbed] == [f.url for f in braced] and len(braced) == 3


def test_file_urls_are_local_paths(tmp_path: Path) -> None:
    local = _datasets(tmp_path)
    for name in ("npy", "webdataset"):
        as_url, as_path = (
            parse_spec(local[name].format(f"file://{tmp_path}")),
            parse_spec(local[name].format(tmp_path)),
        )
        assert_same(list(TorchLoader(as_url, 4)), list(TorchLoader(as_path, 4)), name)  # type: ignore[arg-type]
        assert getattr(as_url, "store", None) is None  # read in place, not through the cache


def test_a_download_cut_midway_is_retried_and_never_read_half(tmp_path: Path, http_server: HTTP) -> None:
    payload = os.urandom(300_000)
    (http_server.root / "blob.bin").write_bytes(payload)
    store = Store(StorageSettings(cache_dir=str(tmp_path / "cache"), fetch_retries=3))
    f = store.info(f"{http_server.url}/blob.bin")
    http_server.cut(2)  # the first two downloads stop halfway
    assert store.fetch(f, sample=5).read_bytes() == payload
    assert not list(store.cache.part.iterdir())


def test_storage_gone_fails_the_sample_by_url_and_the_server_serves_on(
    tmp_path: Path, http_server: HTTP
) -> None:
    data.make_imagefolder(http_server.root / "images")
    spec = f"imagefolder:{http_server.url}/images,resize=12,crop=10"
    local = parse_spec(f"imagefolder:{http_server.root / 'images'},resize=12,crop=10")
    with Server(
        {"images": spec},
        host="127.0.0.1",
        port=0,
        num_workers=1,
        cache_dir=str(tmp_path / "c"),
        fetch_retries=1,
    ) as srv:
        http_server.stop()  # listed at start; no image fetched yet
        with DataLoader(srv.address, "images", 4) as loader:
            with pytest.raises(errors.DatasetError) as info:
                list(loader)
        # Which of the batch's samples failed first depends on the order the downloads fail in.
        assert re.search(
            rf"sample \d: {http_server.url}/images/\S+: .* \(gave up after 2 attempts\)", str(info.value)
        )
        http_server.start()  # back: the same server reads it now
        with DataLoader(srv.address, "images", 4) as loader:
            assert_same(list(loader), list(TorchLoader(local, 4)))  # type: ignore[arg-type]


def test_s3_back_within_the_retries_is_read(tmp_path: Path, s3: S3) -> None:
    payload = os.urandom(50_000)
    s3.client().put_object(Bucket=BUCKET, Key="back/blob.bin", Body=payload)
    store = Store(StorageSettings(cache_dir=str(tmp_path / "cache"), fetch_retries=6))
    f = store.info(f"s3://{BUCKET}/back/blob.bin")
    s3.stop()
    with back_after(1.0, s3.start):
        assert store.fetch(f, sample=0).read_bytes() == payload


def test_a_file_larger_than_the_cache_is_a_clear_error(tmp_path: Path, s3: S3) -> None:
    np.save(tmp_path / "big.npy", np.zeros(4096, np.float64))
    s3.client().upload_file(str(tmp_path / "big.npy"), BUCKET, "big/big.npy")
    with pytest.raises(
        ValueError, match=r"s3://data/big/big.npy: 32896 bytes do not fit the cache of cache_bytes=10000"
    ):
        Server(
            {"big": f"npy:s3://{BUCKET}/big/big.npy"},
            port=0,
            num_workers=0,
            cache_dir=str(tmp_path / "c"),
            cache_bytes=10_000,
        )


def test_a_cache_smaller_than_the_dataset_evicts_and_reads_right(tmp_path: Path, http_server: HTTP) -> None:
    data.make_imagefolder(http_server.root / "images")
    cache_bytes = 2000  # about three of the eight images
    spec = f"imagefolder:{http_server.url}/images,resize=12,crop=10"
    local = parse_spec(f"imagefolder:{http_server.root / 'images'},resize=12,crop=10")
    with Server(
        {"images": spec}, port=0, num_workers=1, cache_dir=str(tmp_path / "c"), cache_bytes=cache_bytes
    ) as srv:
        for _ in range(2):
            with DataLoader(srv.address, "images", 2) as loader:
                assert_same(list(loader), list(TorchLoader(local, 2)))  # type: ignore[arg-type]
    assert FileCache(tmp_path / "c", cache_bytes).held_bytes() <= cache_bytes


def test_a_failed_or_full_download_leaves_nothing(tmp_path: Path) -> None:
    cache = FileCache(tmp_path, 1 << 20)

    def dies_halfway(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 100)
        raise ConnectionResetError("gone")

    def disk_full(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ConnectionResetError):
        cache.get("k-a", 200, dies_halfway)
    with pytest.raises(CacheFull, match=r"the disk of the cache .* is full"):
        cache.get("k-a", 200, disk_full)
    with pytest.raises(OSError, match="downloaded 100 of 200 bytes"):
        cache.get("k-a", 200, lambda tmp: tmp.write_bytes(b"y" * 100))
    assert cache.lookup("k-a") is None
    assert not list(cache.part.iterdir()) and not list(cache.data.iterdir())
    # A download its killed process left is removed by the next to open the cache.
    (cache.part / "k-b.999999999.0").write_bytes(b"half")
    FileCache(tmp_path, 1 << 20)
    assert not list(cache.part.iterdir())


def _fetch_all(cache_dir: str, endpoint: str, urls: list[str], out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    os.environ.update(s3_env(endpoint))
    store = Store(StorageSettings(cache_dir=cache_dir, cache_bytes=350_000, fetch_threads=4))
    files = [store.info(u) for u in urls]
    digests = []
    for _ in range(3):
        for i, f in enumerate(files):
            digests.append(store.read(f, i, lambda p: hashlib.sha256(p.read_bytes()).hexdigest()))
    out.put(digests)


def test_two_processes_share_one_cache_without_corrupting_it(tmp_path: Path, s3: S3) -> None:
    blobs = [os.urandom(100_000 + i) for i in range(6)]  # twice what the cache holds
    for i, blob in enumerate(blobs):
        s3.client().put_object(Bucket=BUCKET, Key=f"shared/{i}.bin", Body=blob)
    urls = [f"s3://{BUCKET}/shared/{i}.bin" for i in range(6)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_fetch_all, args=(str(tmp_path / "c"), s3.endpoint, urls, out)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=90) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    expected = [hashlib.sha256(b).hexdigest() for b in blobs] * 3
    assert results == [expected, expected]
    assert FileCache(tmp_path / "c", 350_000).held_bytes() <= 350_000


def test_fetch_ahead_brings_the_next_files_and_no_more(tmp_path: Path, s3: S3) -> None:
    for i in range(4):
        s3.client().put_object(Bucket=BUCKET, Key=f"ahead/{i}.bin", Body=bytes([i]) * 1000)
    store = Store(StorageSettings(cache_dir=str(tmp_path / "c"), fetch_ahead=2))
    files = store.expand(f"s3://{BUCKET}/ahead/*.bin", expand_braces)
    store.fetch_ahead(files[1:])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(store.cache.lookup(f.key) for f in files[1:3]):
        time.sleep(0.05)
    assert [store.cache.lookup(f.key) is not None for f in files] == [False, True, True, False]


@pytest.mark.parametrize(
    "url",
    [
        f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@data/x.npy",
        f"https://example.com/x.npy?X-Amz-Credential=AKIA&X-Amz-Signature={SECRET}",
        f"gs://bucket/x.npy?access_token={SECRET}",
        f"s3://data/x.npy::s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@data/y.npy",
    ],
)
def test_a_spec_with_credentials_is_refused_without_echoing_them(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="credentials are never read from specs") as info:
        Server({"x": f"npy:{url}"}, port=0, num_workers=0)
    assert SECRET not in str(info.value)
    assert cli.main(["serve", "--dataset", f"x=tokens:/data/t.bin,offsets={url}", "--port", "0"]) == 2
    out = capsys.readouterr()
    assert "credentials are never read from specs" in out.err
    assert SECRET not in out.out + out.err
    assert SECRET not in redact(f"npy:{url}")


def test_credentials_the_store_refuses_are_named_not_echoed(
    tmp_path: Path, auth_s3: AuthS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_env(auth_s3.endpoint, "AKIAWRONGKEY", SECRET).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"s3://data/x.npy: access denied \(check the credentials") as info:
        Server({"x": "npy:s3://data/x.npy"}, port=0, num_workers=0, cache_dir=str(tmp_path / "c"))
    assert SECRET not in str(info.value)
