"""After a dataset error the next ``next()`` yields the next batch, as torch's DataLoader does.

A batch whose sample (or collate) raised on the server comes as that exception in its
place: an instance of the dataset's own class where the client has it, and always a
``DatasetError``. Every test runs torch's own DataLoader on the same dataset and
compares what each ``next()`` gave: a batch, or an exception of which class.
"""

from __future__ import annotations

import pickle
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler, RandomSampler, Subset

from batchferry import errors, wire
from batchferry.client import DataLoader
from batchferry.errors import DatasetError
from batchferry.server import Server
from batchferry.server.failures import TRACEBACK_LIMIT, for_client
from batchferry.server.ring import SlotState
from batchferry.v1 import loader_pb2 as pb

import toy_datasets
from checks import assert_same
from processes import wait_until
from reading import outcomes
from toy_datasets import CorruptSample, Flaky

SEED = 3
GROUPED_BAD = 1203  # batch 300 of 500: deep inside a group of small batches


@pytest.fixture(scope="module")
def flaky() -> Iterator[Server]:
    datasets = {"f": Flaky(), "g": Flaky(2000, {GROUPED_BAD: "key"})}
    with Server(datasets, host="127.0.0.1", port=0, num_workers=2) as srv:
        yield srv


def _name(exc: BaseException) -> str:
    """The class the dataset raised, as module.qualname (ours say which; torch's are it)."""
    if isinstance(exc, DatasetError):
        return exc.error_type
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _known(name: str) -> bool:
    return name.rsplit(".", 1)[0] in sys.modules


def assertoutcomes(got: list[Any], expected: list[Any]) -> None:
    """The same batches, and exceptions of the same classes in the same places."""
    assert [_key(g) for g in got] == [_key(e) for e in expected]
    for k, (g, e) in enumerate(zip(got, expected)):
        if isinstance(e, BaseException):
            _assert_raised_like(g, e)
        else:
            assert_same(g, e, f"outcome {k}")


def _assert_raised_like(got: BaseException, expected: BaseException) -> None:
    """``got`` is a DatasetError standing for ``expected``: also of its class where this process
    has that class, else a plain DatasetError that names it."""
    assert isinstance(got, DatasetError), repr(got)
    assert _name(got) == _name(expected)
    if _known(_name(expected)):
        assert isinstance(got, type(expected))
    else:
        assert type(got) is DatasetError and _name(expected) in str(got)


def _key(outcome: Any) -> tuple[str, ...]:
    """A comparable summary: the samples of a batch, or the class of an exception."""
    if isinstance(outcome, BaseException):
        return ("error", _name(outcome))
    return ("batch", *map(str, outcome[1].tolist()))


def _torch_epochs(ds: Any, epochs: int, batch_size: int = 4, **kw: Any) -> list[list[Any]]:
    loader = TorchLoader(ds, batch_size, **kw)
    return [outcomes(iter(loader)) for _ in range(epochs)]


def _assert_server_holds_nothing(srv: Server) -> None:
    service = srv.service
    assert service is not None
    assert wait_until(lambda: service.open_streams == 0)
    assert wait_until(lambda: srv.ring.stats().slots[SlotState.LEASED] == 0)


def _failed_total(srv: Server, dataset: str, mode: str) -> float:
    labels = {"dataset": dataset, "mode": mode}
    return srv.metrics.registry.get_sample_value("batchferry_batches_failed_total", labels) or 0.0


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_errors_come_in_place_of_their_batches_and_the_epoch_goes_on(flaky: Server, transport: str) -> None:
    ds = Flaky()
    expected = _torch_epochs(ds, 2, shuffle=True, generator=torch.Generator().manual_seed(SEED))
    assert sum(isinstance(o, BaseException) for o in expected[0]) >= 3  # the test has teeth
    before = _failed_total(flaky, "f", "independent")
    generator = torch.Generator().manual_seed(SEED)
    with DataLoader(flaky.address, "f", 4, shuffle=True, generator=generator, transport=transport) as loader:
        got = [outcomes(iter(loader)) for _ in range(2)]
        # Both epochs ended normally, and the generator advanced as torch's does.
        reference = torch.Generator().manual_seed(SEED)
        torch_loader = TorchLoader(ds, 4, shuffle=True, generator=reference)
        for _ in range(2):
            outcomes(iter(torch_loader))
        assert torch.equal(generator.get_state(), reference.get_state())
        # Nothing is held for the epochs: no stream, no slot (a failed batch's included).
        _assert_server_holds_nothing(flaky)
    for epoch in range(2):
        assertoutcomes(got[epoch], expected[epoch])
    errors_sent = sum(isinstance(o, BaseException) for seq in got for o in seq)
    assert _failed_total(flaky, "f", "independent") - before == errors_sent


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_on_the_device_errors_come_in_place_too(flaky: Server, transport: str) -> None:
    expected = _torch_epochs(Flaky(), 2, shuffle=True, generator=torch.Generator().manual_seed(SEED))
    with DataLoader(
        flaky.address, "f", 4, shuffle=True, seed=SEED, device="cuda", transport=transport
    ) as loader:
        got = [outcomes(iter(loader)) for _ in range(2)]
        torch.cuda.synchronize()
    for epoch in range(2):
        assert all(b[0].is_cuda for b in got[epoch] if not isinstance(b, BaseException))
        assertoutcomes(got[epoch], expected[epoch])
    _assert_server_holds_nothing(flaky)


def test_out_of_order_the_same_batches_and_errors_arrive(flaky: Server) -> None:
    expected = _torch_epochs(Flaky(), 2, shuffle=True, generator=torch.Generator().manual_seed(SEED))
    with DataLoader(flaky.address, "f", 4, shuffle=True, seed=SEED, in_order=False) as loader:
        for epoch in range(2):
            got = outcomes(iter(loader))
            assert Counter(map(_key, got)) == Counter(map(_key, expected[epoch]))
            for outcome in got:
                if isinstance(outcome, BaseException):
                    like = next(e for e in expected[epoch] if _key(e) == _key(outcome))
                    _assert_raised_like(outcome, like)
    _assert_server_holds_nothing(flaky)


def test_stripes_and_a_sampler_of_the_client_give_torchoutcomes(flaky: Server) -> None:
    expected = _torch_epochs(Flaky(), 2, shuffle=True, generator=torch.Generator().manual_seed(SEED))
    with DataLoader(flaky.address, "f", 4, shuffle=True, seed=SEED, transport="grpc", streams=2) as loader:
        got = [outcomes(iter(loader)) for _ in range(2)]
    for epoch in range(2):
        assertoutcomes(got[epoch], expected[epoch])
    # The client's own sampler: it chooses every batch's samples and the server builds them.
    ds = Flaky()
    expected = _torch_epochs(ds, 2, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(8)))
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(8))
    with DataLoader(flaky.address, "f", 4, sampler=sampler) as loader:
        got = [outcomes(iter(loader)) for _ in range(2)]
    for epoch in range(2):
        assertoutcomes(got[epoch], expected[epoch])
    _assert_server_holds_nothing(flaky)


def test_two_replicas_merge_errors_in_place() -> None:
    ds = Flaky()
    expected = _torch_epochs(ds, 2, shuffle=True, generator=torch.Generator().manual_seed(SEED))
    with (
        Server({"f": ds}, port=0, num_workers=0, replica_index=0, num_replicas=2) as a,
        Server({"f": ds}, port=0, num_workers=0, replica_index=1, num_replicas=2) as b,
        DataLoader([a.address, b.address], "f", 4, shuffle=True, seed=SEED) as loader,
    ):
        assert loader.num_replicas == 2
        got = [outcomes(iter(loader)) for _ in range(2)]
        for srv in (a, b):
            _assert_server_holds_nothing(srv)
    for epoch in range(2):
        assertoutcomes(got[epoch], expected[epoch])


def test_sharded_ranks_get_distributed_sampleroutcomes(flaky: Server) -> None:
    ds = Flaky()
    kw: dict[str, Any] = {"mode": "sharded", "job": "sharded-errors", "world_size": 2, "seed": 11}
    loaders = [DataLoader(flaky.address, "f", 4, True, rank=r, **kw) for r in range(2)]
    try:
        for epoch in range(2):
            for r, loader in enumerate(loaders):
                sampler = DistributedSampler(ds, 2, r, shuffle=True, seed=11)
                sampler.set_epoch(epoch)
                assertoutcomes(outcomes(iter(loader)), _torch_epochs(ds, 1, sampler=sampler)[0])
    finally:
        for loader in loaders:
            loader.close()
    _assert_server_holds_nothing(flaky)


def _reference_epoch(ds: Any, seed: int, epoch: int) -> list[Any]:
    """A job's epoch: torch over DistributedSampler's order of one rank (randperm seeded seed + epoch)."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return _torch_epochs(Subset(ds, order), 1)[0]


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_shared_consumers_both_get_the_same_errors(flaky: Server, transport: str) -> None:
    kw: dict[str, Any] = {"mode": "shared", "job": f"shared-errors-{transport}", "seed": 5}
    loaders = [DataLoader(flaky.address, "f", 4, True, transport=transport, **kw) for _ in range(2)]
    try:
        for epoch in range(2):
            iters = [iter(loader) for loader in loaders]
            got: list[list[Any]] = [[], []]
            live = {0, 1}
            while live:  # in step, so both stay inside the job's window
                for k in sorted(live):
                    try:
                        got[k].append(next(iters[k]))
                    except StopIteration:
                        live.discard(k)
                    except Exception as exc:
                        got[k].append(exc)
            expected = _reference_epoch(Flaky(), 5, epoch)
            for seq in got:
                assertoutcomes(seq, expected)
    finally:
        for loader in loaders:
            loader.close()
    _assert_server_holds_nothing(flaky)


def test_dynamic_consumers_together_get_the_epoch_errors_included_exactly_once(flaky: Server) -> None:
    kw: dict[str, Any] = {"mode": "dynamic", "job": "dynamic-errors", "seed": 2}
    loaders = [DataLoader(flaky.address, "f", 4, True, **kw) for _ in range(2)]
    try:
        for epoch in range(2):
            got: list[list[Any]] = [[], []]
            threads = [
                threading.Thread(target=lambda seq=seq, loader=loader: seq.extend(outcomes(iter(loader))))
                for seq, loader in zip(got, loaders)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            union = [o for seq in got for o in seq]
            expected = _reference_epoch(Flaky(), 2, epoch)
            assert Counter(map(_key, union)) == Counter(map(_key, expected))
            assert all(isinstance(o, DatasetError) for o in union if isinstance(o, BaseException))
    finally:
        for loader in loaders:
            loader.close()
    _assert_server_holds_nothing(flaky)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_batch_failing_inside_a_group_fails_alone(flaky: Server, transport: str) -> None:
    ds = Flaky(2000, {GROUPED_BAD: "key"})
    expected = _torch_epochs(ds, 1)[0]
    with DataLoader(flaky.address, "g", 4, transport=transport) as loader:
        got = outcomes(iter(loader))
    assertoutcomes(got, expected)
    assert [k for k, o in enumerate(got) if isinstance(o, BaseException)] == [GROUPED_BAD // 4]
    _assert_server_holds_nothing(flaky)


def test_an_error_frame_takes_its_batchs_place_in_a_grouped_stream(flaky: Server) -> None:
    opened = pb.OpenStream(dataset="g", batch_size=4, credits=64, groups=True)
    requests = [pb.ClientMessage(open=opened).SerializeToString()]
    requests += [pb.ClientMessage(credit=pb.Credit(batches=1)).SerializeToString()] * 1000
    headers = []
    with grpc.insecure_channel(flaky.address) as channel:
        call = channel.stream_stream(wire.STREAM_BATCHES, request_serializer=None, response_deserializer=None)
        responses = iter(call(iter(requests), timeout=60))
        for raw in responses:
            frame = pb.ServerFrame.FromString(raw)
            if frame.WhichOneof("kind") == "batch":
                headers.append(frame.batch)
                for _ in range(frame.batch.num_chunks):
                    next(responses)
    indices = [i for h in headers for i in (h.index, *(p.index for p in h.more))]
    assert indices == list(range(500))  # each batch once, in order, the failed one in its place
    (failed,) = [h for h in headers if h.HasField("error")]
    assert failed.index == GROUPED_BAD // 4
    assert not (failed.HasField("layout") or failed.more or failed.slot or failed.num_chunks)
    assert failed.error.type == "builtins.KeyError"
    assert failed.error.message == f"'corrupt record {GROUPED_BAD}'"
    assert 'raise KeyError(f"corrupt record {i}")' in failed.error.traceback
    at = headers.index(failed)
    assert any(h.more for h in headers[:at]) and any(h.more for h in headers[at + 1 :])  # groups both sides


@pytest.mark.parametrize("mode", ["independent", "sharded"])
def test_state_saved_right_after_an_error_resumes_at_the_next_batch(flaky: Server, mode: str) -> None:
    ds = Flaky()
    kw: dict[str, Any] = {"seed": SEED}
    if mode == "independent":
        expected = _torch_epochs(ds, 1, shuffle=True, generator=torch.Generator().manual_seed(SEED))[0]
    else:
        kw.update(mode="sharded", job="resume-errors", rank=1, world_size=2)
        sampler = DistributedSampler(ds, 2, 1, shuffle=True, seed=SEED)
        sampler.set_epoch(0)
        expected = _torch_epochs(ds, 1, sampler=sampler)[0]
    first = next(k for k, o in enumerate(expected) if isinstance(o, BaseException))
    with DataLoader(flaky.address, "f", 4, True, **kw) as loader:
        it = iter(loader)
        head = [next(it) for _ in range(first)]
        with pytest.raises(DatasetError) as info:
            next(it)
        state = pickle.loads(pickle.dumps(loader.state_dict()))
    assert state["batch"] == first + 1
    with DataLoader(flaky.address, "f", 4, True, **kw) as resumed:
        resumed.load_state_dict(state)
        assertoutcomes([*head, info.value, *outcomes(iter(resumed))], expected)


def test_the_exception_is_the_datasets_class_with_the_servers_traceback(flaky: Server) -> None:
    with DataLoader(flaky.address, "f", 4) as loader:  # sequential: batch 1 holds sample 5
        got = outcomes(iter(loader))
    key, own, unknown = got[1], got[5], got[10]
    # ``except KeyError`` and ``except DatasetError`` both catch it, as torch's KeyError.
    assert isinstance(key, KeyError) and isinstance(key, DatasetError)
    assert type(key).__name__ == "KeyError" and _name(key) == "builtins.KeyError"
    text = str(key)
    assert text.startswith(
        f"Caught KeyError in batchferry server {flaky.address} (dataset 'f', batch 1).\n"
        "Original Traceback (most recent call last):\n"
    )
    # The dataset's raising line, named by file only: the server's directories stay there.
    assert 'File "toy_datasets.py"' in text and 'raise KeyError(f"corrupt record {i}")' in text
    assert "KeyError: 'corrupt record 5'" in text
    for directory in (Path(toy_datasets.__file__).resolve().parent, Path(errors.__file__).resolve().parent):
        assert str(directory) not in text
    assert "[error " in key.server_traceback.splitlines()[-1]  # the server's log has it whole
    assert isinstance(own, CorruptSample) and isinstance(own, DatasetError)
    assert "sample 23: checksum mismatch" in str(own)
    # A class this process has not imported is never imported: a DatasetError that names it.
    assert type(unknown) is DatasetError and "storage_backend" not in sys.modules
    assert str(unknown).startswith("Caught storage_backend.errors.Unreadable in batchferry server")
    assert "sample 41: storage backend unreadable" in str(unknown)
    # It pickles as what it stands for.
    again = pickle.loads(pickle.dumps(key))
    assert isinstance(again, KeyError) and isinstance(again, DatasetError) and str(again) == text


def test_a_class_that_is_not_imported_here_is_never_imported(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "peer_named_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Boom(Exception):\n    pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        made = errors.dataset_error("peer_named_module.Boom", "boom", "", "in a test")
    finally:
        sys.path.remove(str(tmp_path))
    assert type(made) is DatasetError and not marker.exists() and "peer_named_module" not in sys.modules
    assert str(made) == "Caught peer_named_module.Boom in a test.\nboom"
    # Classes it may not take, or cannot make from a message: a DatasetError naming the type.
    for name in ("builtins.SystemExit", "builtins.UnicodeDecodeError", "builtins.len", "builtins.Nope"):
        made = errors.dataset_error(name, "m", "", "in a test")
        assert type(made) is DatasetError and str(made).startswith(f"Caught {name} in a test."), name
    made = errors.dataset_error("builtins.ValueError", "bad value", "", "in a test")
    assert isinstance(made, ValueError) and isinstance(made, DatasetError)
    assert type(made) is type(errors.dataset_error("builtins.ValueError", "", "", "x"))  # one class each


def test_what_a_client_is_sent_has_no_server_paths_and_keeps_a_tracebacks_end() -> None:
    trace = "Traceback (most recent call last):\n" + "".join(
        f'  File "/srv/app/deep/mod{k}.py", line {k}, in f{k}\n    g()\n' for k in range(2000)
    )
    trace += "KeyError: '/srv/app/data/shard-7.bin'\n"
    sent = for_client(trace, traceback=True)
    assert len(sent) <= TRACEBACK_LIMIT and "/srv" not in sent
    assert sent.startswith("Traceback (most recent call last):\n")
    assert sent.endswith("KeyError: 'shard-7.bin'\n") and 'File "mod1999.py", line 1999' in sent
    assert for_client("short /srv/app/x.py") == "short x.py"
