"""IterableDatasets served with torch's semantics, compared with torch's DataLoader in each test.

torch's loaders here run with the same num_workers, generator seed, batch_size and
drop_last as ours; their workers are forked (spawning them takes seconds each).
Every item carries draws from the RNGs torch seeds in a worker, so equal batches mean
equal worker seeds too (with num_workers=0 torch draws from this process's RNGs,
which a server cannot share: then only the items are compared).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler
from torch.utils.data import DataLoader as TorchLoader

from batchferry import cli, shm
from batchferry.client import DataLoader
from batchferry.errors import DatasetError
from batchferry.server import Server, parse_spec
from batchferry.server.plan import Catalog, plan
from batchferry.server.status import Abort
from batchferry.v1 import loader_pb2 as _pb2

import iterable_data
from iterable_data import CorruptItem
from processes import ServeProcess, back_after
from reading import outcomes, read_concurrently

DATASETS = iterable_data.datasets()
TRANSPORTS = ["grpc", "shm"]
pytestmark = [
    pytest.mark.timeout(60),
    # torch's note that 3 workers are more than this machine's cores: beside the point here.
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
]


@pytest.fixture(scope="module")
def shared_server() -> Iterator[Server]:
    with Server(DATASETS, host="127.0.0.1", port=0, num_workers=2) as srv:
        yield srv


@pytest.fixture
def address(shared_server: Server) -> str:
    return shared_server.address


def torch_loader(name: str, num_workers: int, seed: int, **kwargs: Any) -> TorchLoader[Any]:
    dataset = kwargs.pop("dataset", DATASETS[name])
    return TorchLoader(
        dataset,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context="fork" if num_workers else None,
        **kwargs,
    )


def record(batches: list[Any], draws: bool = True) -> list[Any]:
    """Batches as plain lists (an exception: its class and message), draws left out if asked."""
    out: list[Any] = []
    for batch in batches:
        if isinstance(batch, BaseException):
            out.append((type(batch).__name__, "item" in str(batch)))
        elif isinstance(batch, torch.Tensor):
            out.append(batch.tolist())
        else:
            out.append([part.tolist() for part in (batch if draws else batch[:1])])
    return out


def epochs(loader: Any, count: int) -> list[list[Any]]:
    return [outcomes(iter(loader)) for _ in range(count)]


# -- 1. the epochs torch's DataLoader yields ---------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("name", "workers", "batch_size", "drop_last"),
    [("split", 2, 3, False), ("split", 3, 2, True), ("whole", 2, 4, False), ("uneven", 3, 2, False)],
)
def test_epochs_are_torchs(
    address: str, transport: str, name: str, workers: int, batch_size: int, drop_last: bool
) -> None:
    """Same batches in the same order, two epochs, worker seeds and the generator's state
    included: a dataset that splits by get_worker_info() and ones that do not."""
    kwargs: dict[str, Any] = {"batch_size": batch_size, "drop_last": drop_last}
    theirs = torch_loader(name, workers, 11, **kwargs)
    expected = [record(e) for e in epochs(theirs, 2)]
    generator = torch.Generator().manual_seed(11)
    with DataLoader(
        address, name, num_workers=workers, generator=generator, transport=transport, **kwargs
    ) as ours:
        assert [record(e) for e in epochs(ours, 2)] == expected
    assert torch.equal(generator.get_state(), theirs.generator.get_state())


def test_iterators_sharing_processes_keep_their_own_rngs(address: str) -> None:
    """Two loaders read in turn, batch by batch: five iterators on the server's two
    processes, each drawing only from its own RNGs, so each epoch is still torch's."""
    cases = [("split", 3, 1), ("whole", 2, 2)]
    expected = [record(outcomes(iter(torch_loader(name, w, seed, batch_size=2)))) for name, w, seed in cases]
    loaders = [DataLoader(address, name, batch_size=2, num_workers=w, seed=seed) for name, w, seed in cases]
    try:
        iters = {k: iter(loader) for k, loader in enumerate(loaders)}
        got: list[list[Any]] = [[] for _ in cases]
        while iters:
            for k, it in list(iters.items()):
                try:
                    got[k].append(next(it))
                except StopIteration:
                    del iters[k]
    finally:
        for loader in loaders:
            loader.close()
    assert [record(g) for g in got] == expected


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_batch_that_outgrows_its_slot_is_not_lost(address: str, transport: str) -> None:
    """Built again in a larger slot from the same items: the iterator does not move on."""
    theirs = record(outcomes(iter(torch_loader("growing", 2, 0, batch_size=2))))
    with DataLoader(address, "growing", batch_size=2, num_workers=2, transport=transport) as ours:
        assert record(outcomes(iter(ours))) == theirs


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_without_workers_or_batching(address: str, transport: str) -> None:
    """num_workers=0 (one iterator, no worker info) and batch_size=None (items one by one)."""
    for kwargs in ({"batch_size": 4}, {"batch_size": None}):
        theirs = record(outcomes(iter(torch_loader("split", 0, 3, **kwargs))), draws=False)
        with DataLoader(address, "split", seed=3, transport=transport, **kwargs) as ours:
            assert record(outcomes(iter(ours)), draws=False) == theirs


# -- 2. len() and torch's refusals ---------------------------------------------------------


@pytest.mark.parametrize(("batch_size", "drop_last"), [(4, False), (4, True), (None, False)])
def test_len_is_torchs(address: str, batch_size: int | None, drop_last: bool) -> None:
    kwargs: dict[str, Any] = {"batch_size": batch_size, "drop_last": drop_last}
    with DataLoader(address, "sized", **kwargs) as ours:
        assert len(ours) == len(torch_loader("sized", 0, 0, **kwargs))
    with DataLoader(address, "split", **kwargs) as ours, pytest.raises(TypeError) as raised:
        len(ours)
    with pytest.raises(TypeError):
        len(torch_loader("split", 0, 0, **kwargs))
    assert "len" in str(raised.value)


@pytest.mark.parametrize("batch_size", [3, None])
def test_samplers_are_torchs(address: str, batch_size: int | None) -> None:
    theirs = torch_loader("split", 0, 0, batch_size=batch_size)
    with DataLoader(address, "split", batch_size=batch_size) as ours:
        assert type(ours.sampler) is type(theirs.sampler)
        assert type(ours.batch_sampler) is type(theirs.batch_sampler)
        if batch_size is not None:
            assert next(iter(ours.batch_sampler)) == next(iter(theirs.batch_sampler))


def test_the_dataset_handle_is_torchs(address: str) -> None:
    """loader.dataset: no sample by index, no len() without __len__, as the dataset itself."""
    dataset = DATASETS["split"]
    with pytest.raises(NotImplementedError):
        dataset[0]
    with pytest.raises(TypeError):
        len(dataset)
    with DataLoader(address, "split") as ours:
        with pytest.raises(NotImplementedError):
            ours.dataset[0]
        with pytest.raises(TypeError):
            len(ours.dataset)


def test_a_wrong_len_warns_as_torch_warns(address: str) -> None:
    """A dataset whose __len__ says 5 but yields 23 items: torch warns past the 5th batch."""

    def run(loader: Any) -> tuple[int, list[str]]:
        len(loader)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            count = len(list(loader))
        return count, [str(w.message).split(" was reported")[0].split()[-1] for w in caught]

    theirs = run(torch_loader("sized_short", 2, 0, batch_size=2))
    with DataLoader(address, "sized_short", batch_size=2, num_workers=2) as ours:
        count, warned = run(ours)
    assert count == theirs[0]
    assert len(warned) == len(theirs[1]) == count - 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shuffle": True},
        {"sampler": SequentialSampler(range(4))},
        {"batch_sampler": BatchSampler(SequentialSampler(range(4)), 2, False)},
    ],
)
def test_refused_as_torch_refuses(address: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as theirs:
        TorchLoader(DATASETS["split"], **kwargs)
    with DataLoader(address, "split", **kwargs) as ours, pytest.raises(ValueError) as raised:
        iter(ours)
    assert str(theirs.value).split(", but got")[0] in str(raised.value)


def test_dynamic_mode_is_refused(address: str) -> None:
    with DataLoader(address, "split", mode="dynamic", job="dyn", rank=0, world_size=1) as ours:
        with pytest.raises(ValueError, match="IterableDataset has no indices"):
            iter(ours)


def test_batchferry_datasets_lists_them(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["datasets", address]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["split"] == "(iterable)" and rows["sized"] == str(len(DATASETS["sized"]))


def test_the_server_refuses_them_too() -> None:
    """The server's own checks of a stream of an IterableDataset (whatever the client)."""
    catalog = Catalog(
        {"it": 0}, frozenset({"default"}), 1 << 20, iterables=frozenset({"it"}), max_iterators=4
    )
    ok = {"dataset": "it", "batch_size": 2, "credits": 2}
    assert plan(_pb2.OpenStream(**ok, num_iterators=4), catalog).iterable
    for fields, says in [
        ({"shuffle": True, "sampler_state": b"x"}, "shuffle"),
        ({"client_batches": True}, "sampler"),
        ({"mode": _pb2.MODE_DYNAMIC, "job": "j", "world_size": 1}, "dynamic"),
        ({"any_order": True}, "any_order"),
        ({"stripes": 2}, "stripes"),
        ({"num_iterators": 5}, "max_iterators"),
        ({"num_iterators": 2, "places": [_pb2.IteratorPlace()]}, "one per iterator"),
        ({"next_iterator": 1}, "next_iterator"),
    ]:
        with pytest.raises(Abort, match=says) as refused:
            plan(_pb2.OpenStream(**ok, **fields), catalog)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    replicas = dataclasses.replace(catalog, replicas=2)
    with pytest.raises(Abort, match="one server") as refused:
        plan(_pb2.OpenStream(**ok, num_replicas=2), replicas)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_specs_and_entry_points_may_give_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``python:`` spec, and a kind an entry point declares, may return an IterableDataset."""
    site = tmp_path / "site"
    (site / "streams_pkg").mkdir(parents=True)
    (site / "streams_pkg" / "__init__.py").write_text(
        "from iterable_data import Split\n\ndef from_spec(rest):\n    return Split(int(rest))\n"
    )
    info = site / "streams_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: streams-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[batchferry.datasets]\nmystream = streams_pkg:from_spec\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert parse_spec("mystream:5").n == 5
    assert isinstance(parse_spec("python:iterable_data:split"), iterable_data.Split)


# -- 3. jobs -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sharded_ranks_each_get_their_stream(address: str, transport: str) -> None:
    """Each rank's dataset learns its rank from get_shard_info(): its stream is what torch
    gives for a dataset built for that rank, with the generator seeded ``seed``."""
    got = []
    for rank in range(2):
        expected = epochs(
            torch_loader(
                "ranked", 2, 5, batch_size=2, dataset=iterable_data.Split(by_rank=True, shard=(rank, 2))
            ),
            1,
        )
        with DataLoader(
            address,
            "ranked",
            batch_size=2,
            num_workers=2,
            mode="sharded",
            job=f"ranked-{transport}",
            rank=rank,
            world_size=2,
            seed=5,
            transport=transport,
        ) as ours:
            mine = epochs(ours, 1)
        assert record(mine[0]) == record(expected[0])
        got.append({int(item[0]) for batch in mine[0] for item in batch[0]})
    assert got[0].isdisjoint(got[1]) and got[0] | got[1] == set(range(iterable_data.N))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shared_job_builds_one_stream_for_all(shared_server: Server, transport: str) -> None:
    """Two consumers of a shared job get the same epoch, torch's with the generator seeded
    ``seed``, each batch built once for both."""
    expected = record(epochs(torch_loader("split", 2, 6, batch_size=2), 1)[0])
    built = shared_server.service.batches_built if shared_server.service else 0
    loaders = [
        DataLoader(
            shared_server.address,
            "split",
            batch_size=2,
            num_workers=2,
            mode="shared",
            job=f"shared-{transport}",
            seed=6,
            transport=transport,
        )
        for _ in range(2)
    ]
    try:
        got = read_concurrently(loaders)
    finally:
        for loader in loaders:
            loader.close()
    assert record(got[0]) == record(got[1]) == expected
    assert shared_server.service is not None
    assert shared_server.service.batches_built - built == len(expected)


# -- 4. resume -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stop_at"), [("counter", 1), ("counter", 4), ("split", 1), ("split", 5), ("raising", 5)]
)
def test_resume_mid_epoch_continues_torchs_epoch(address: str, name: str, stop_at: int) -> None:
    """Resumed after ``stop_at`` batches (a Stateful dataset from its saved states, others by
    replaying, past a batch that raised too): the rest of the epoch and the next one are
    torch's uninterrupted run."""
    expected = [record(e) for e in epochs(torch_loader(name, 2, 9, batch_size=2), 2)]
    first = DataLoader(address, name, batch_size=2, num_workers=2, seed=9)
    it = iter(first)
    partial: list[Any] = []
    for _ in range(stop_at):
        try:
            partial.append(next(it))
        except DatasetError as exc:
            partial.append(exc)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    first.close()
    saved = state["iterators"]["states"]
    assert bool(saved[0]) == (name == "counter")  # a Stateful one's own state; else replayed

    with DataLoader(address, name, batch_size=2, num_workers=2, seed=1234) as second:
        second.load_state_dict(state)
        assert record(partial + outcomes(iter(second))) == expected[0]
        assert record(outcomes(iter(second))) == expected[1]


def test_resume_needs_the_same_num_workers(address: str) -> None:
    with DataLoader(address, "split", batch_size=2, num_workers=2) as first:
        it = iter(first)
        next(it)
        state = first.state_dict()
    with DataLoader(address, "split", batch_size=2, num_workers=3) as second:
        with pytest.raises(ValueError, match="num_workers"):
            second.load_state_dict(state)


def test_a_python_spec_continues_across_a_server_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """``batchferry serve`` of a ``python:`` spec (one worker process hosting both iterators),
    killed mid-epoch and started again: the loader reconnects with where each iterator is,
    and the epoch is torch's, nothing lost or repeated."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    )
    expected = record(outcomes(iter(torch_loader("split", 2, 8, batch_size=2))))
    server = ServeProcess("split=python:iterable_data:split")
    server.start()
    try:
        with DataLoader(server.address, "split", batch_size=2, num_workers=2, seed=8, timeout=30) as loader:
            it = iter(loader)
            got = [next(it) for _ in range(3)]
            server.kill()
            with back_after(1.0, server.start):  # away for a while
                got += list(it)
    finally:
        server.stop()
        shm.remove_stale()  # what the killed server left
    assert record(got) == expected


# -- 5. errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_error_mid_stream_is_torchs(address: str, transport: str) -> None:
    """The dataset's iterator raises at two items and goes on: the batches holding them are
    that error (its class, and a DatasetError), the loop goes on, as with torch's loader."""
    theirs = outcomes(iter(torch_loader("raising", 2, 0, batch_size=2)))
    with DataLoader(address, "raising", batch_size=2, num_workers=2, transport=transport) as loader:
        ours = outcomes(iter(loader))
    assert record(ours) == record(theirs)
    errors = [o for o in ours if isinstance(o, BaseException)]
    assert len(errors) == 2
    assert all(isinstance(e, CorruptItem) and isinstance(e, DatasetError) for e in errors)


def test_a_killed_worker_ends_its_stream_clearly(shared_server: Server) -> None:
    """Every worker killed mid-epoch: the stream ends with a DatasetError naming the kill; the
    server goes on serving (the next epoch is torch's)."""
    server = shared_server
    with DataLoader(server.address, "slow", batch_size=2, num_workers=2, prefetch_factor=2) as loader:
        it = iter(loader)
        next(it)
        for pid in server.pool.worker_pids():
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(DatasetError, match="killed by SIGKILL"):
            for _ in it:
                pass
    expected = record(outcomes(iter(torch_loader("split", 2, 4, batch_size=3))))
    with DataLoader(server.address, "split", batch_size=3, num_workers=2, seed=4) as loader:
        assert record(outcomes(iter(loader))) == expected
