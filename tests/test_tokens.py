"""The token source (``tokens:``) and the ``pack`` collate: hand-checked batches, and every
vectorised path equal to the collate it replaces."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader as TorchLoader

from batchferry import errors
from batchferry.client import DataLoader
from batchferry.layout import SlotWriter, encode
from batchferry.server import (
    PackRecipe,
    PadRecipe,
    Server,
    TokenDataset,
    dataset_kinds,
    pack_collate,
    pack_samples,
    pad_collate,
    parse_spec,
)
from batchferry.server.collate import get_collate, run_collate
from batchferry.server.fetch import build_batch, collate_gatherer, gatherer

from checks import assert_same

# Documents 0..4: [1 2 3], [4 5], [], [6 7 8 9 10], [11]
DOCS = [[1, 2, 3], [4, 5], [], [6, 7, 8, 9, 10], [11]]


def _write(root: Path, docs: list[list[int]], dtype: str = "int64") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lengths = [len(d) for d in docs]
    np.save(root / "tokens.npy", np.array([t for d in docs for t in d], dtype=dtype))
    np.save(root / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return root / "tokens.npy"


def _writer() -> SlotWriter:
    return SlotWriter(torch.empty(1 << 20, dtype=torch.uint8))


def _vectorised(ds: Any, indices: list[int], collate: Any) -> Any:
    batch, gathered = build_batch(ds, gatherer(ds), np.array(indices, dtype=np.int64), collate, _writer())
    assert gathered, "the batch was not built by the dataset's vectorised gather"
    return batch


def _per_sample(ds: Any, indices: list[int], collate: Any) -> Any:
    return run_collate(collate, [ds[i] for i in indices], _writer())


# -- the dataset ----------------------------------------------------------------------


def test_samples_are_documents(tmp_path: Path) -> None:
    ds = parse_spec(f"tokens:{_write(tmp_path, DOCS)}")
    assert isinstance(ds, TokenDataset) and len(ds) == 5
    assert [ds[i].tolist() for i in range(5)] == DOCS
    assert ds[3].dtype == torch.int64 and ds[-1].tolist() == [11]
    assert_same(ds.__getitems__([3, 0, 2, 3]), [ds[3], ds[0], ds[2], ds[3]])
    assert_same(ds.__getitems__([-1, 4, -5]), [ds[4], ds[4], ds[0]])
    for bad in (5, -6):
        with pytest.raises(IndexError):
            ds[bad]
        with pytest.raises(IndexError):
            ds.__getitems__([0, bad])
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 1024, "pickled by path"
    assert_same([clone[i] for i in range(5)], [ds[i] for i in range(5)])
    assert "tokens" in dataset_kinds()


def test_samples_with_lengths(tmp_path: Path) -> None:
    ds = parse_spec(f"tokens:{_write(tmp_path, DOCS)},lengths=true")
    assert_same(ds[0], (torch.tensor([1, 2, 3]), 3))
    assert_same(ds.__getitems__([2, 4]), [(torch.tensor([], dtype=torch.int64), 0), (torch.tensor([11]), 1)])


def test_raw_token_file_with_dtype_and_offsets(tmp_path: Path) -> None:
    np.array([5, 6, 7, 8, 9], dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.array([0, 2, 5], dtype=np.int64).tofile(tmp_path / "train.idx")
    ds = parse_spec(f"tokens:{tmp_path / 'train.bin'},offsets={tmp_path / 'train.idx'},dtype=uint16")
    assert ds[1].dtype == torch.uint16 and ds[1].tolist() == [7, 8, 9]
    assert _vectorised(ds, [0, 1], get_collate("pad")).tolist() == [[5, 6, 0], [7, 8, 9]]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: f"tokens:{p / 'nope.npy'}", "no such file"),
        (lambda p: f"tokens:{_write(p, DOCS)},dtype=float32", "dtype must be one of"),
        (lambda p: f"tokens:{_write(p, DOCS)},dtype=int32", "holds int64, not dtype=int32"),
        (lambda p: f"tokens:{_write(p, DOCS)},lengths=maybe", "lengths must be true or false"),
        (lambda p: f"tokens:{_write(p, DOCS)},offset=x", "unknown option 'offset'"),
        (lambda p: _raw(p, b"\0" * 6, "offsets.npy", [0, 1]) + ",dtype=int32", "not a whole number"),
        (lambda p: _raw(p, b"\0" * 8, "offsets.npy", [0, 1]), "say its dtype="),
        (lambda p: _raw(p, b"\0" * 8, "o.npy", [0, 1]) + ",dtype=int32", "no offsets= given"),
        (lambda p: _raw(p, b"\0" * 8, "offsets.npy", [0, 3]) + ",dtype=int32", "at most the 2 tokens"),
        (lambda p: _raw(p, b"\0" * 8, "offsets.npy", [0, 2, 1]) + ",dtype=int32", "offsets must rise"),
    ],
)
def test_bad_specs_name_the_problem(tmp_path: Path, make: Any, needle: str) -> None:
    with pytest.raises(ValueError, match="dataset spec") as info:
        parse_spec(make(tmp_path))
    assert needle in str(info.value)


def _raw(root: Path, data: bytes, offsets_name: str, offsets: list[int]) -> str:
    (root / "t.bin").write_bytes(data)
    np.save(root / offsets_name, np.array(offsets, dtype=np.int64))
    return f"tokens:{root / 't.bin'}"


# -- pad ------------------------------------------------------------------------------


def test_pad_batch_by_hand(tmp_path: Path) -> None:
    ds = TokenDataset(_write(tmp_path, DOCS))
    expected = torch.tensor([[6, 7, 8, 9, 10], [0, 0, 0, 0, 0], [1, 2, 3, 0, 0], [11, 0, 0, 0, 0]])
    assert_same(_vectorised(ds, [3, 2, 0, 4], get_collate("pad")), expected)
    minus = torch.where(expected == 0, -1, expected)  # no token is 0
    assert_same(_vectorised(ds, [3, 2, 0, 4], pad_collate(-1)), minus)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "int32", "uint32", "int64"])
@pytest.mark.parametrize("lengths", [False, True])
def test_pad_gather_equals_the_pad_collate(tmp_path: Path, dtype: str, lengths: bool) -> None:
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 200, size=int(n)).tolist() for n in rng.integers(0, 40, size=50)]
    ds = TokenDataset(_write(tmp_path, docs, dtype), lengths=lengths)
    for collate in (get_collate("pad"), pad_collate(7)):
        for indices in ([0], [5, 5, 5], rng.integers(0, 50, size=17).tolist(), list(range(50))):
            batch = _vectorised(ds, indices, collate)
            assert_same(batch, _per_sample(ds, indices, collate))
            encode(batch, _writer())


@pytest.mark.parametrize("docs", [[[], [], []], [[], [1, 2], []]], ids=["no-tokens-at-all", "some-empty"])
def test_batches_of_empty_documents(tmp_path: Path, docs: list[list[int]]) -> None:
    ds = TokenDataset(_write(tmp_path, docs))
    for collate in (get_collate("pad"), get_collate("pack")):
        for indices in ([0], [0, 2], [2, 1, 0]):
            assert_same(_vectorised(ds, indices, collate), _per_sample(ds, indices, collate))
    assert [d.tolist() for d in ds.__getitems__([2, 0, 1])] == [docs[2], docs[0], docs[1]]


def test_pad_of_documents_of_one_length_is_a_stack(tmp_path: Path) -> None:
    ds = TokenDataset(_write(tmp_path, [[1, 2], [3, 4], [5, 6]]))
    assert_same(_vectorised(ds, [2, 0], get_collate("pad")), torch.tensor([[5, 6], [1, 2]]))
    # The default collate stacks them too; documents of several lengths it refuses.
    assert_same(_vectorised(ds, [2, 0], get_collate("default")), torch.tensor([[5, 6], [1, 2]]))
    uneven = TokenDataset(_write(tmp_path / "uneven", DOCS))
    with pytest.raises(RuntimeError, match="use collate_fn='pad' or 'pack'"):
        _vectorised(uneven, [0, 1], get_collate("default"))


# -- pack -----------------------------------------------------------------------------

PACKED_BY_HAND = {
    # documents 0, 3, 4, 1 (lengths 3, 5, 1, 2: 11 tokens) in rows of 4
    "input_ids": [[1, 2, 3, 6], [7, 8, 9, 10], [11, 4, 5, 0]],
    # a document restarts at 0, and so does every row (document 3 runs on into row 1)
    "position_ids": [[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 1, 0]],
    "doc_ids": [[0, 0, 0, 1], [1, 1, 1, 1], [2, 3, 3, -1]],
}


def test_pack_by_hand(tmp_path: Path) -> None:
    ds = TokenDataset(_write(tmp_path, DOCS))
    expected = {k: torch.tensor(v) for k, v in PACKED_BY_HAND.items()}
    indices = [0, 3, 4, 1]
    assert_same(_vectorised(ds, indices, pack_collate(4)), expected)
    assert_same(_per_sample(ds, indices, pack_collate(4)), expected)
    assert_same(pack_samples([ds[i] for i in indices], seq_len=4), expected)
    # Exactly full rows: no padding; an empty document takes no place.
    assert_same(
        pack_samples([torch.tensor([1, 2]), torch.tensor([], dtype=torch.int64), torch.tensor([3, 4])], 2),
        {
            "input_ids": torch.tensor([[1, 2], [3, 4]]),
            "position_ids": torch.tensor([[0, 1], [0, 1]]),
            "doc_ids": torch.tensor([[0, 0], [2, 2]]),
        },
    )
    # Padding counts up from 0 as one more piece, with doc_id -1.
    assert_same(
        pack_samples([torch.tensor([9], dtype=torch.int32)], 4, padding_value=-1),
        {
            "input_ids": torch.tensor([[9, -1, -1, -1]], dtype=torch.int32),
            "position_ids": torch.tensor([[0, 0, 1, 2]]),
            "doc_ids": torch.tensor([[0, -1, -1, -1]]),
        },
    )


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=20),
    seq_len=st.integers(1, 25),
    dtype=st.sampled_from(["uint16", "int32", "int64"]),
    data=st.data(),
)
def test_pack_gather_equals_the_generic_pack(
    tmp_path_factory: pytest.TempPathFactory, lengths: list[int], seq_len: int, dtype: str, data: Any
) -> None:
    root = tmp_path_factory.mktemp("docs")
    docs = [list(range(100 * i + 1, 100 * i + 1 + n)) for i, n in enumerate(lengths)]
    ds = TokenDataset(_write(root, docs, dtype))
    indices = data.draw(st.lists(st.integers(0, len(docs) - 1), min_size=1, max_size=12))
    collate = pack_collate(seq_len, padding_value=3)
    batch = _vectorised(ds, indices, collate)
    assert_same(batch, _per_sample(ds, indices, collate))
    # Invariants, independent of the implementation: every token once, in order.
    ids, doc = batch["input_ids"].reshape(-1), batch["doc_ids"].reshape(-1)
    assert ids[doc >= 0].tolist() == [t for i in indices for t in docs[i]]
    assert batch["input_ids"].shape[0] == -(-sum(lengths[i] for i in indices) // seq_len)


def test_pack_refuses_what_it_cannot_pack(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="1-D tensors; sample 1 is a tensor of shape"):
        pack_samples([torch.zeros(3), torch.zeros(2, 2)])
    with pytest.raises(RuntimeError, match="sample 0 is tuple"):
        pack_samples([(torch.zeros(3), 3)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        pack_collate(0)
    # With lengths=true the samples are tuples: no vectorised pack, and the collate says why.
    ds = TokenDataset(_write(tmp_path, DOCS), lengths=True)
    assert collate_gatherer(ds, PackRecipe(4)) is None and collate_gatherer(ds, PadRecipe()) is not None
    with pytest.raises(RuntimeError, match="sample 0 is tuple"):
        _per_sample(ds, [0, 1], pack_collate(4))


def test_a_subclass_that_changes_samples_loses_the_vectorised_gather(tmp_path: Path) -> None:
    class Shifted(TokenDataset):
        def __getitem__(self, index: int) -> Any:
            return super().__getitem__(index) + 1

        def __getitems__(self, indices: list[int]) -> list[Any]:
            return [self[i] for i in indices]

    ds = Shifted(_write(tmp_path, DOCS))
    batch, gathered = build_batch(ds, gatherer(ds), np.array([0, 1]), get_collate("pad"), _writer())
    assert not gathered
    assert batch.tolist() == [[2, 3, 4], [5, 6, 0]]


# -- served ---------------------------------------------------------------------------


def _torch_pad(batch: list[torch.Tensor]) -> torch.Tensor:
    return pad_sequence(batch, batch_first=True)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_served_token_batches_equal_torchs(tmp_path: Path, transport: str) -> None:
    rng = np.random.default_rng(2)
    docs = [rng.integers(1, 50_000, size=int(n)).tolist() for n in rng.integers(1, 100, size=300)]
    spec = f"tokens:{_write(tmp_path, docs, 'int32')}"
    reference = parse_spec(spec)
    with Server({"t": spec}, host="127.0.0.1", port=0, num_workers=1) as srv:
        for collate, torch_collate in (("pad", _torch_pad), ("pack", pack_samples)):
            torch_loader = TorchLoader(
                reference,
                16,
                shuffle=True,
                collate_fn=torch_collate,
                generator=torch.Generator().manual_seed(3),
            )
            with DataLoader(
                srv.address, "t", 16, shuffle=True, seed=3, collate_fn=collate, transport=transport
            ) as loader:
                assert_same(list(loader), list(torch_loader), collate)
        assert srv.service.batches_gathered == srv.service.batches_built > 0


def test_served_pack_of_samples_that_are_not_documents_is_a_dataset_error() -> None:
    ds = torch.utils.data.TensorDataset(torch.zeros(8, 2, 2))
    with Server({"d": ds}, host="127.0.0.1", port=0, num_workers=1) as srv:
        with DataLoader(srv.address, "d", 4, collate_fn="pack") as loader:
            with pytest.raises(errors.DatasetError, match="pack collate needs samples that are 1-D tensors"):
                next(iter(loader))
