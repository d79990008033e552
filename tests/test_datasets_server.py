"""Dataset sources behind a real server: spec strings, parity with torch, and file errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader

from batchferry import errors
from batchferry.client import DataLoader
from batchferry.server import Server, parse_spec

import datasets_data as data
from checks import assert_same


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_spec_sources_serve_torchs_batches(tmp_path: Path, transport: str) -> None:
    data.make_mnist(tmp_path / "mnist" / "MNIST" / "raw", n_train=50)
    data.make_parquet(tmp_path / "pq", sizes=(20, 13))
    data.make_imagefolder(tmp_path / "images")
    specs = {
        "mnist": f"mnist:{tmp_path / 'mnist'}",
        "table": f"parquet:{tmp_path / 'pq'},columns=vec,label,name",
        "images": f"imagefolder:{tmp_path / 'images'},resize=12,crop=10",
    }
    with Server(specs, host="127.0.0.1", port=0, num_workers=1) as srv:
        assert srv.service.batches_gathered == 0
        for name, spec in specs.items():
            reference = TorchLoader(
                parse_spec(spec), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7)
            )
            with DataLoader(srv.address, name, 4, shuffle=True, seed=7, transport=transport) as loader:
                for epoch in range(2):
                    assert_same(list(loader), list(reference), f"{name} epoch {epoch}")
        # Every batch of these sources took the one-take-per-field path.
        assert srv.service.batches_gathered == srv.service.batches_built > 0


def test_corrupt_image_fails_that_client_and_the_server_serves_on(tmp_path: Path) -> None:
    data.make_imagefolder(tmp_path)
    (tmp_path / "a" / "sub.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # sample 3
    good = torch.utils.data.TensorDataset(torch.arange(10))
    specs = {"images": f"imagefolder:{tmp_path},crop=8", "good": good}
    with Server(specs, host="127.0.0.1", port=0, num_workers=1) as srv:
        with DataLoader(srv.address, "images", 2) as loader:
            it = iter(loader)
            first = next(it)
            assert first[0].shape == (2, 3, 8, 8)
            with pytest.raises(
                errors.DatasetError,
                match=r"batch 1\)\.\n(?s:.*)SampleError: sample 3: a/sub.png: cannot decode",
            ):
                next(it)
        with DataLoader(srv.address, "good", 4) as loader:
            assert_same(list(loader), list(TorchLoader(good, 4)))
        with DataLoader(srv.address, "images", 2) as loader:  # the same dataset, other batches
            assert next(iter(loader))[1].tolist() == [0, 1]


def test_serve_reads_new_kinds_from_a_toml_file(tmp_path: Path) -> None:
    data.make_mnist(tmp_path / "raw")
    data.make_shards(tmp_path / "shards", shards=2, per_shard=3)
    config = tmp_path / "serve.toml"
    config.write_text(
        "host = '127.0.0.1'\nport = 0\nnum_workers = 1\n[datasets]\n"
        f"digits = 'mnist:{tmp_path},split=test'\n"
        f"shards = 'webdataset:{tmp_path / 'shards'}/data-{{000..001}}.tar,fields=cls,txt'\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchferry.cli", "--log-level", "WARNING", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "serving digits, shards" in banner, banner
        address = banner.split(" on ", 1)[1].split()[0]
        with DataLoader(address, "shards", 4, transport="grpc") as loader:
            batches = list(loader)
        # default_collate keeps the strings of tuple samples in a tuple
        expected = [torch.tensor([0, 1, 2, 0]), ("caption 0", "caption 1", "caption 2", "caption 3")]
        assert_same(batches[0], expected)
        assert batches[1][0].tolist() == [1, 2]
        with DataLoader(address, "digits", 7) as loader:
            ((x, y),) = list(loader)
        assert x.shape == (7, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture
def myformat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return data.install_myformat(tmp_path, monkeypatch)


def test_entry_point_kind_is_served_by_worker_processes(myformat: Path) -> None:
    with Server({"counts": "myformat:6"}, host="127.0.0.1", port=0, num_workers=1) as srv:
        with DataLoader(srv.address, "counts", 3) as loader:
            batches = list(loader)
    assert_same(batches, [torch.tensor([[0, 6], [1, 6], [2, 6]]), torch.tensor([[3, 6], [4, 6], [5, 6]])])
