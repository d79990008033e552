"""Every dataset source: specs, torch-compatible samples, the vectorised gather, pickling, errors."""

from __future__ import annotations

import gzip
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from batchferry.layout import SlotWriter, encode
from batchferry.server import (
    HFDataset,
    ImageFolderDataset,
    MissingDependency,
    MnistDataset,
    NpyDataset,
    ParquetDataset,
    SampleError,
    TarShardDataset,
    dataset_kinds,
    parse_spec,
)
from batchferry.server.fetch import gatherer
from batchferry.server.sources.webdataset import expand_braces

import datasets_data as data
from checks import assert_same

# -- one contract, every source ------------------------------------------------------


def _npy(tmp: Path) -> str:
    np.save(tmp / "x.npy", np.arange(60, dtype=np.float32).reshape(20, 3))
    np.save(tmp / "y.npy", np.arange(20) % 4)
    return f"npy:{tmp / 'x.npy'},labels={tmp / 'y.npy'}"


def _mnist(tmp: Path) -> str:
    data.make_mnist(tmp / "MNIST" / "raw")
    return f"mnist:{tmp}"


def _mnist_gz(tmp: Path) -> str:
    data.make_mnist(tmp, gz=True)
    return f"mnist:{tmp},split=test"


def _imagefolder(tmp: Path) -> str:
    data.make_imagefolder(tmp / "root")
    return f"imagefolder:{tmp / 'root'},resize=10,crop=8x6"


def _imagefolder_sizes(tmp: Path) -> str:
    data.make_imagefolder(tmp / "root")
    return f"imagefolder:{tmp / 'root'},mode=L"


def _webdataset(tmp: Path) -> str:
    data.make_shards(tmp / "shards")
    return f"webdataset:{tmp / 'shards'}/data-{{000..002}}.tar,fields=jpg|png,cls,npy,crop=8"


def _parquet(tmp: Path) -> str:
    data.make_parquet(tmp / "pq")
    return f"parquet:{tmp / 'pq'},columns=vec,label,grid,name,score,flag"


def _parquet_all(tmp: Path) -> str:
    data.make_parquet(tmp / "pq", sizes=(6,))
    return f"parquet:{tmp / 'pq' / 'part-00.parquet'}"


def _hf(tmp: Path) -> str:
    data.make_hf(tmp / "hf")
    return f"hf:{tmp / 'hf'},columns=emb,label,text,x"


def _hf_images(tmp: Path) -> str:
    data.make_hf(tmp / "hf", splits=True)
    return f"hf:{tmp / 'hf'},split=train,crop=8"


# spec builder, whether batches are gathered vectorised
SOURCES: dict[str, tuple[Callable[[Path], str], bool]] = {
    "npy": (_npy, True),
    "synthetic": (lambda tmp: "synthetic:n=30,shape=2x3,classes=4", True),
    "mnist": (_mnist, True),
    "mnist-gz": (_mnist_gz, True),
    "imagefolder": (_imagefolder, True),
    "imagefolder-sizes": (_imagefolder_sizes, False),
    "webdataset": (_webdataset, False),
    "parquet": (_parquet, True),
    "parquet-all-types": (_parquet_all, False),
    "hf": (_hf, True),
    "hf-images": (_hf_images, False),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_source_contract(source: str, tmp_path: Path) -> None:
    """Spec -> dataset; pickles small; the gather equals default_collate; batches encode."""
    make, vectorised = SOURCES[source]
    ds = parse_spec(make(tmp_path))
    n = len(ds)
    assert n > 4
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 4096, "datasets pickle by path, not by content"
    for i in (0, n - 1):
        assert_same(clone[i], ds[i], f"sample {i} after pickling")
    getitems = getattr(ds, "__getitems__", None)
    idx = np.array([n - 1, 0, 2, 2, 1], dtype=np.int64)
    if getitems is not None:
        assert_same(getitems(idx.tolist()), [ds[i] for i in idx.tolist()])
    gather = gatherer(ds)
    assert (gather is not None) == vectorised
    if gather is None:
        return
    writer = SlotWriter(torch.empty(1 << 20, dtype=torch.uint8))
    batch = gather(idx, writer)
    assert_same(batch, default_collate([ds[i] for i in idx.tolist()]))
    encode(batch, writer)  # every tensor already lies in the slot: nothing copied, nothing refused


def test_every_kind_is_listed() -> None:
    assert {"npy", "synthetic", "python", "mnist", "imagefolder", "webdataset", "parquet", "hf"} <= set(
        dataset_kinds()
    )


def test_python_classes_are_exported() -> None:
    from batchferry import server

    for cls in (HFDataset, ImageFolderDataset, MnistDataset, NpyDataset, ParquetDataset, TarShardDataset):
        assert getattr(server, cls.__name__) is cls


# -- spec grammar ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nokind", "has no kind"),
        ("zip:/x", "unknown kind 'zip'"),
        ("mnist:/no/such/dir", "no such directory"),
        ("imagefolder:/tmp,size=3", "unknown option 'size'"),
        ("imagefolder:/tmp,crop=0", "crop must be N or HxW"),
        ("imagefolder:/tmp,mode=CMYK", "mode must be one of"),
        ("parquet:/no/such.parquet", "no such file or directory"),
        ("webdataset:/no/such-{0..1}.tar", "such-0.tar"),
        ("synthetic:n=abc", "must be integers"),
        ("npy:/x.npy,labels", "expected key=value"),
        ("mnist:/tmp,split=val", "split must be"),
        ("imagefolder:/tmp,crop=4,crop=5", "given twice"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, needle: str) -> None:
    with pytest.raises(ValueError, match="dataset spec") as info:
        parse_spec(spec)
    assert needle in str(info.value)


def test_brace_patterns() -> None:
    assert expand_braces("d-{000..002}.tar") == ["d-000.tar", "d-001.tar", "d-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("x-{8..10}") == ["x-8", "x-9", "x-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_option_values_may_be_lists_and_paths_may_hold_braces(tmp_path: Path) -> None:
    data.make_shards(tmp_path, shards=2, per_shard=2)
    ds = parse_spec(f"webdataset:{tmp_path}/data-{{000,001}}.tar,fields=cls,txt")
    assert len(ds) == 4 and ds[3] == (0, "caption 3")


# -- mnist ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["MNIST/raw", "FashionMNIST/raw", "raw", "."])
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_layouts_and_file_order(tmp_path: Path, layout: str, gz: bool) -> None:
    arrays = data.make_mnist(tmp_path / layout, gz=gz)
    for split in ("train", "test"):
        images, labels = arrays[split]
        ds = MnistDataset(tmp_path, split=split)
        assert len(ds) == len(labels)
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            assert x.dtype == torch.uint8 and x.shape == (1, 28, 28)
            assert torch.equal(x[0], torch.from_numpy(images[i])) and y == int(labels[i]) and type(y) is int


def test_mnist_memory_maps_plain_files(tmp_path: Path) -> None:
    data.make_mnist(tmp_path)
    ds = MnistDataset(tmp_path)
    ds[0]
    images, _ = ds._open(0)
    assert isinstance(images.base, np.memmap) or isinstance(images, np.memmap)


def test_mnist_variants_and_errors(tmp_path: Path) -> None:
    data.make_mnist(tmp_path / "MNIST" / "raw", seed=1)
    fashion = data.make_mnist(tmp_path / "FashionMNIST" / "raw", seed=2)
    with pytest.raises(ValueError, match="several MNIST-format sets"):
        MnistDataset(tmp_path)
    ds = parse_spec(f"mnist:{tmp_path},variant=FashionMNIST")
    assert torch.equal(ds[0][0][0], torch.from_numpy(fashion["train"][0][0]))
    truncated = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"MNIST/raw/train-images-idx3-ubyte: .* truncated"):
        MnistDataset(tmp_path, variant="MNIST")
    truncated.write_bytes(b"\x00\x00\x0d\x03" + bytes(12))
    with pytest.raises(ValueError, match="bad magic"):
        MnistDataset(tmp_path, variant="MNIST")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte"):
        MnistDataset(tmp_path / "empty", split="test")


def test_mnist_gz_removed_after_start_names_file_and_sample(tmp_path: Path) -> None:
    data.make_mnist(tmp_path, gz=True)
    ds = pickle.loads(pickle.dumps(MnistDataset(tmp_path)))  # a fresh process's copy: nothing read yet
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(SampleError, match=r"sample 4: train-images-idx3-ubyte.gz: "):
        ds[4]


# -- imagefolder ---------------------------------------------------------------------


def test_imagefolder_follows_torchvisions_rules(tmp_path: Path) -> None:
    data.make_imagefolder(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["C", "a", "b"] and ds.class_to_idx == {"C": 0, "a": 1, "b": 2}
    assert ds.samples == data.FOLDER_ORDER
    for i, (rel, label) in enumerate(ds.samples):
        with Image.open(tmp_path / rel) as img:
            expected = torch.from_numpy(np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy())
        x, y = ds[i]
        assert_same(x, expected, rel)
        assert y == label


def _torchvision_resize_crop(img: Image.Image, size: int, crop: tuple[int, int]) -> np.ndarray:
    """Resize(size) then CenterCrop(crop) as torchvision applies them to a Pillow image."""
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize(new, Image.Resampling.BILINEAR)
    ch, cw = crop
    w, h = img.size
    top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
    return np.asarray(img.crop((left, top, left + cw, top + ch)))


def test_imagefolder_resize_and_center_crop_match_torchvision(tmp_path: Path) -> None:
    data.make_imagefolder(tmp_path)
    ds = ImageFolderDataset(tmp_path, resize=10, crop=(8, 6))
    for i, (rel, _) in enumerate(ds.samples):
        with Image.open(tmp_path / rel) as img:
            expected = _torchvision_resize_crop(img.convert("RGB"), 10, (8, 6))
        assert torch.equal(ds[i][0], torch.from_numpy(expected.transpose(2, 0, 1).copy())), rel


def test_imagefolder_crop_larger_than_image_pads_with_zeros(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    data.image(0, (2, 3)).save(tmp_path / "k" / "tiny.png")
    x, _ = ImageFolderDataset(tmp_path, crop=(4, 5))[0]
    assert x.shape == (3, 4, 5)
    assert x[:, 0].sum() == 0 and x[:, 3].sum() == 0 and x[:, :, 0].sum() == 0 and x[:, :, 4].sum() == 0
    with Image.open(tmp_path / "k" / "tiny.png") as img:
        assert torch.equal(x[:, 1:3, 1:4], torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()))


def double(x: torch.Tensor) -> torch.Tensor:
    return x.float() * 2


def test_imagefolder_transform_and_empty_classes(tmp_path: Path) -> None:
    data.make_imagefolder(tmp_path)
    ds = parse_spec(f"imagefolder:{tmp_path},crop=4,transform=test_datasets:double")
    assert ds[0][0].dtype == torch.float32 and gatherer(ds) is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images .* empty"):
        parse_spec(f"imagefolder:{tmp_path}")
    assert len(parse_spec(f"imagefolder:{tmp_path},allow_empty=true").classes) == 4


def test_imagefolder_missing_or_corrupt_file_names_file_and_sample(tmp_path: Path) -> None:
    data.make_imagefolder(tmp_path)
    ds = ImageFolderDataset(tmp_path, crop=(4, 4))
    (tmp_path / "a" / "sub.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "b" / "9.png").unlink()
    with pytest.raises(SampleError, match=r"sample 3: a/sub.png: cannot decode") as info:
        ds[3]
    assert info.value.index == 3 and info.value.file == "a/sub.png"
    with pytest.raises(SampleError, match=r"sample 7: b/9.png: file not found"):
        ds.__getitems__([0, 7])
    gather = gatherer(ds)
    assert gather is not None
    with pytest.raises(SampleError, match=r"sample 3: a/sub.png"):
        gather(np.array([0, 3]), SlotWriter(torch.empty(1 << 16, dtype=torch.uint8)))


# -- webdataset ----------------------------------------------------------------------


def test_webdataset_groups_by_key_and_decodes_by_extension(tmp_path: Path) -> None:
    expected = data.make_shards(tmp_path)
    ds = TarShardDataset(str(tmp_path / "data-{000..002}.tar"))
    assert len(ds) == len(expected)
    for i, exp in enumerate(expected):
        sample = ds[i]
        assert sample["__key__"] == exp["__key__"]
        # Extensions lower-cased; all extensions after the first dot kept ("meta.bin").
        assert set(sample) == {"__key__", exp["image"], "cls", "txt", "json", "npy", "meta.bin"}
        assert_same(
            sample[exp["image"]], torch.from_numpy(np.asarray(data.image(i)).transpose(2, 0, 1).copy())
        )
        assert sample["cls"] == exp["i"] % 3 and sample["txt"] == f"caption {exp['i']}"
        assert sample["json"] == {"i": exp["i"]}
        assert torch.equal(sample["npy"], torch.from_numpy(exp["npy"]))
        assert torch.equal(sample["meta.bin"], torch.tensor([i, 1, 2], dtype=torch.uint8))


def test_webdataset_index_is_cached_and_rebuilt_when_a_shard_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data.make_shards(tmp_path, shards=2)
    ds = TarShardDataset(str(tmp_path / "data-{000..001}.tar"))
    index = tmp_path / "data-000.tar.index.json"
    assert index.is_file() and (tmp_path / "data-001.tar.index.json").is_file()
    import batchferry.server.sources.webdataset as wds

    def no_scan(path: Path) -> Any:
        raise AssertionError(f"{path} scanned again")

    monkeypatch.setattr(wds, "_scan", no_scan)
    assert_same(TarShardDataset(str(tmp_path / "data-{000..001}.tar"))[5], ds[5])
    monkeypatch.undo()
    data.make_shards(tmp_path / "new", shards=1, per_shard=2)
    (tmp_path / "new" / "data-000.tar").replace(tmp_path / "data-000.tar")
    assert len(TarShardDataset(str(tmp_path / "data-{000..001}.tar"))) == 2 + 4


def test_webdataset_cache_dir(tmp_path: Path) -> None:
    data.make_shards(tmp_path / "shards", shards=1)
    ds = parse_spec(f"webdataset:{tmp_path / 'shards' / 'data-000.tar'},cache_dir={tmp_path / 'cache'}")
    assert len(ds) == 4 and not list((tmp_path / "shards").glob("*.json"))
    assert len(list((tmp_path / "cache").rglob("*.index.json"))) == 1


def test_webdataset_errors_name_shard_member_and_sample(tmp_path: Path) -> None:
    data.make_shards(tmp_path, shards=2)
    ds = TarShardDataset(str(tmp_path / "data-{000..001}.tar"), fields=["jpg|png", "cls"])
    assert ds[0][1] == 0
    with pytest.raises(SampleError, match=r"sample 2: data-000.tar \(member part0/sample0002.cls\)"):
        raw = (tmp_path / "data-000.tar").read_bytes()
        # Corrupt sample 2's class text in place (same size, so the index still holds).
        spot = raw.index(b"part0/sample0002.cls")
        start = raw.index(b"2", spot + 512)
        (tmp_path / "data-000.tar").write_bytes(raw[:start] + b"\xff" + raw[start + 1 :])
        pickle.loads(pickle.dumps(ds))[2]
    fresh = pickle.loads(pickle.dumps(ds))
    (tmp_path / "data-001.tar").unlink()
    with pytest.raises(SampleError, match=r"sample 5: data-001.tar .*shard not found"):
        fresh[5]
    with pytest.raises(
        SampleError, match=r"sample 0: data-000.tar: key 'part0/sample0000' has no nope member"
    ):
        TarShardDataset(str(tmp_path / "data-000.tar"), fields=["txt|text", "nope"])[0]
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(ValueError, match=r"bad.tar: not a readable uncompressed tar"):
        TarShardDataset([tmp_path / "bad.tar"], cache_dir=tmp_path / "c")


# -- parquet and hf ------------------------------------------------------------------


def test_parquet_rows_in_file_order_with_their_types(tmp_path: Path) -> None:
    data.make_parquet(tmp_path, sizes=(9, 8))
    ds = ParquetDataset(tmp_path)
    table = data.parquet_table(17)
    assert len(ds) == 17 and ds.columns == table.column_names
    for i in (0, 8, 9, 16):
        row = ds[i]
        assert_same(row["label"], torch.tensor(i % 5))
        assert_same(row["score"], torch.tensor(i / 4, dtype=torch.float32))
        assert_same(row["flag"], torch.tensor(i % 2 == 0))
        assert_same(row["vec"], torch.arange(4, dtype=torch.float32) + 4 * i)
        assert_same(row["grid"], (torch.arange(6, dtype=torch.int16) + 6 * i).reshape(2, 3))
        assert row["name"] == f"row-{i}"
        assert_same(row["tokens"], torch.arange(i % 4 + 1, dtype=torch.int32))
        assert_same(row["blob"], torch.tensor([i % 256] * (i % 3), dtype=torch.uint8))


def test_parquet_errors(tmp_path: Path) -> None:
    paths = data.make_parquet(tmp_path, sizes=(4, 4))
    with pytest.raises(ValueError, match=r"no column.*'nope'"):
        parse_spec(f"parquet:{tmp_path},columns=label,nope")
    ds = ParquetDataset(tmp_path, columns=["label", "name"])
    fresh = pickle.loads(pickle.dumps(ds))
    paths[1].write_bytes(b"PAR1 garbage PAR1")
    assert fresh[2]["name"] == "row-2"  # each file is read when a sample first needs it
    with pytest.raises(SampleError, match=r"sample 5: part-01.parquet: cannot read"):
        fresh[5]
    with pytest.raises(ValueError, match=r"part-01.parquet: not a readable Parquet file"):
        ParquetDataset(tmp_path)


def test_hf_dataset_matches_the_library(tmp_path: Path) -> None:
    saved = data.make_hf(tmp_path)
    ds = HFDataset(tmp_path)
    assert len(ds) == len(saved) and ds.columns == saved.column_names
    for i in range(len(saved)):
        row, theirs = ds[i], saved[i]
        assert_same(row["label"], torch.tensor(theirs["label"]))
        assert_same(row["x"], torch.tensor(theirs["x"], dtype=torch.float32))
        assert_same(row["emb"], torch.tensor(theirs["emb"], dtype=torch.float32))
        assert row["text"] == theirs["text"]
        expected = np.asarray(theirs["image"].convert("RGB")).transpose(2, 0, 1).copy()
        assert_same(row["image"], torch.from_numpy(expected))


def test_hf_splits(tmp_path: Path) -> None:
    data.make_hf(tmp_path, splits=True)
    with pytest.raises(ValueError, match="holds splits train, test; choose one with split="):
        parse_spec(f"hf:{tmp_path}")
    assert len(parse_spec(f"hf:{tmp_path},split=test")) == 3


# -- optional dependencies and third-party kinds --------------------------------------


@pytest.mark.parametrize(
    ("module", "spec_of", "extra"),
    [
        ("PIL", lambda tmp: (data.make_imagefolder(tmp), f"imagefolder:{tmp}")[1], "images"),
        ("pyarrow", lambda tmp: (data.make_parquet(tmp), f"parquet:{tmp}")[1], "parquet"),
        ("datasets", lambda tmp: (data.make_hf(tmp), f"hf:{tmp}")[1], "hf"),
    ],
)
def test_missing_dependency_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, spec_of: Callable[[Path], str], extra: str
) -> None:
    spec = spec_of(tmp_path)
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependency, match=rf"pip install 'batchferry\[{extra}\]'"):
        parse_spec(spec)


@pytest.fixture
def myformat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return data.install_myformat(tmp_path, monkeypatch)


def test_entry_point_kinds(myformat: Path) -> None:
    assert "myformat" in dataset_kinds()
    ds = parse_spec("myformat:5")
    assert len(ds) == 5 and torch.equal(ds[3], torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="dataset spec 'myformat:x': expected a count"):
        parse_spec("myformat:x")


def test_gather_is_skipped_when_a_subclass_changes_samples(tmp_path: Path) -> None:
    data.make_mnist(tmp_path)

    class Shifted(MnistDataset):
        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            x, y = super().__getitem__(index)
            return x, y + 1

    assert gatherer(MnistDataset(tmp_path)) is not None
    assert gatherer(Shifted(tmp_path)) is None


def test_gzip_helper_writes_real_gzip(tmp_path: Path) -> None:
    data.make_mnist(tmp_path, gz=True)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz") as f:
        assert f.read(4) == b"\x00\x00\x08\x01"
