"""Every resource a request can make the server use has a limit, and the error names it."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from torch.utils.data import Dataset

from batchferry import errors, wire
from batchferry.client import DataLoader
from batchferry.server import Server
from batchferry.server.ring import SlotState
from batchferry.v1 import loader_pb2 as pb

from processes import wait_until
from toy_datasets import Slow

TOKEN_A = "token-of-client-a-000001"
TOKEN_B = "token-of-client-b-000002"


class Megabytes(Dataset[torch.Tensor]):
    """1 MiB samples."""

    def __len__(self) -> int:
        return 256

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((256 * 1024,), i, dtype=torch.int32)


class GrowsLate(Dataset[torch.Tensor]):
    """Sample 0 is tiny; sample 8 onwards is 8 MiB (the size estimate cannot know)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.zeros(2 * 1024 * 1024 if i >= 8 else 4, dtype=torch.int32)


class LeaksPaths(Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        raise FileNotFoundError(2, "No such file or directory", f"/srv/private/data/shard-{i}.bin")


def _open(**fields: Any) -> bytes:
    base: dict[str, Any] = {"dataset": "t", "batch_size": 4, "credits": 2}
    base.update(fields)
    return pb.ClientMessage(open=pb.OpenStream(**base)).SerializeToString()


def _status(address: str, messages: list[bytes], metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(wire.STREAM_BATCHES)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter(messages), timeout=30, metadata=metadata))
    return info.value


def test_a_batch_larger_than_max_batch_bytes_is_refused_before_any_build() -> None:
    with Server({"mb": Megabytes()}, port=0, num_workers=1, max_batch_bytes=16 << 20) as srv:
        with DataLoader(srv.address, "mb", 64) as loader, pytest.raises(errors.ResourceExhausted) as info:
            next(iter(loader))
        assert "max_batch_bytes=16777216" in str(info.value) and "about 67108" in str(info.value)
        assert srv.service is not None and srv.service.batches_built == 0
        with DataLoader(srv.address, "mb", 8) as loader:  # a batch that fits is served
            assert len(list(loader)) == 32


def test_a_batch_that_outgrows_the_estimate_stops_at_max_batch_bytes() -> None:
    with Server({"g": GrowsLate()}, port=0, num_workers=1, max_batch_bytes=4 << 20) as srv:
        with DataLoader(srv.address, "g", 8) as loader:
            it = iter(loader)
            next(it)
            with pytest.raises(
                errors.ResourceExhausted, match=r"batch 1 needs at least \d+ bytes.*max_batch_bytes"
            ):
                next(it)


def test_epoch_orders_stay_within_max_index_bytes_and_are_shared() -> None:
    n = 1_000_000  # a permutation of it takes 4 MB
    spec = f"synthetic:n={n},shape=1"
    with Server({"big": spec}, port=0, num_workers=1, max_index_bytes=6 << 20) as srv:
        with DataLoader(srv.address, "big", 4096, shuffle=False) as loader:
            next(iter(loader))  # in order: no permutation at all
        ranks = [
            DataLoader(
                srv.address, "big", 4096, True, seed=3, mode="sharded", job="ddp", rank=r, world_size=3
            )
            for r in range(3)
        ]
        its = [iter(loader) for loader in ranks]
        for it in its:
            next(it)  # three ranks, one shared permutation
        orders = srv.service._orders  # type: ignore[union-attr]
        assert orders.nbytes == 4 * n
        with DataLoader(srv.address, "big", 4096, True, seed=9) as other:
            with pytest.raises(errors.ResourceExhausted, match="max_index_bytes=6291456"):
                next(iter(other))  # a second permutation would not fit while the first is held
        for loader in ranks:
            loader.close()
        with DataLoader(srv.address, "big", 4096, True, seed=9) as other:
            next(iter(other))  # the unused one made room


_SHARDED = {"mode": pb.MODE_SHARDED, "job": "j", "world_size": 1}


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({**_SHARDED, "world_size": 2**62}, "world_size"),
        ({"dataset": "x" * 1_000_000}, "dataset: at most 256"),
        ({"job": "y" * 100_000, "mode": pb.MODE_SHARED}, "job: at most 256"),
        ({"collate": "z" * 5000}, "collate: at most 256"),
    ],
)
def test_out_of_range_fields_are_refused_briefly(server: Server, fields: dict[str, Any], needle: str) -> None:
    fields = {"dataset": "tensor", **fields}
    err = _status(server.address, [_open(**fields)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.details()
    assert len(err.details()) < 500  # never the whole field echoed back


def test_streams_per_client_are_limited_and_others_are_served(tensor_ds) -> None:
    # One batch per frame: a held loader's stream stays open (in groups, its 26 small
    # batches could all be in flight, and its stream over, after one next()).
    with Server(
        {"t": tensor_ds},
        port=0,
        num_workers=0,
        max_streams_per_peer=2,
        tokens=f"{TOKEN_A},{TOKEN_B}",
        group_bytes=0,
    ) as srv:
        held = [DataLoader(srv.address, "t", 4, token=TOKEN_A, transport="grpc", streams=1) for _ in range(2)]
        its = [iter(loader) for loader in held]
        for it in its:
            next(it)
        with (
            DataLoader(srv.address, "t", 4, token=TOKEN_A) as third,
            pytest.raises(errors.ResourceExhausted, match="max_streams_per_peer=2"),
        ):
            next(iter(third))
        with DataLoader(srv.address, "t", 4, token=TOKEN_B) as other:
            assert len(list(other)) == 26
        for loader in held:
            loader.close()


def test_jobs_are_limited_idle_ones_make_room_and_busy_ones_are_kept(tensor_ds) -> None:
    # One batch per frame, so that a busy job's stream stays open after one next().
    with Server({"t": tensor_ds}, port=0, num_workers=0, max_jobs=2, group_bytes=0) as srv:

        def sharded(job: str) -> DataLoader:
            return DataLoader(srv.address, "t", 4, mode="sharded", job=job, world_size=1, streams=1)

        with sharded("done") as loader:
            assert len(list(loader)) == 26  # then idle, not forgotten yet (job_idle_s)
        busy = [sharded(f"busy-{i}") for i in range(2)]  # the second evicts the idle job
        its = [iter(loader) for loader in busy]
        for it in its:
            next(it)
        assert sorted(job.name for job in srv.jobs.jobs()) == ["busy-0", "busy-1"]
        with sharded("third") as third, pytest.raises(errors.ResourceExhausted, match="max_jobs=2"):
            next(iter(third))
        for it in its:  # the jobs that were there are untouched
            assert len(list(it)) == 25
        for loader in busy:
            loader.close()
        with sharded("third") as third:  # room again once one is idle
            assert len(list(third)) == 26


def test_an_idle_stream_ends_and_frees_its_slots(tensor_ds) -> None:
    with Server({"t": tensor_ds}, port=0, num_workers=0, stream_idle_s=1.0) as srv:
        silent = threading.Event()

        def requests() -> Iterator[bytes]:
            yield _open(credits=3, transport=pb.TRANSPORT_SHM)
            silent.wait(30)  # open, then nothing: no credit, no release

        with grpc.insecure_channel(srv.address) as channel:
            call = channel.stream_stream(wire.STREAM_BATCHES)(requests(), timeout=30)
            with pytest.raises(grpc.RpcError) as info:
                for _ in call:
                    pass
            silent.set()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "idle" in info.value.details()
        assert wait_until(lambda: srv.ring.stats().slots[SlotState.LEASED] == 0)

        def never_opens() -> Iterator[bytes]:
            silent.clear()
            silent.wait(30)
            yield from ()

        with grpc.insecure_channel(srv.address) as channel:
            call = channel.stream_stream(wire.STREAM_BATCHES)(never_opens(), timeout=30)
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            silent.set()
        assert (
            info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "open message" in info.value.details()
        )


def test_a_same_host_client_that_never_releases_gets_copies(tensor_ds) -> None:
    with Server({"t": tensor_ds}, port=0, num_workers=0) as srv:
        credit = pb.ClientMessage(credit=pb.Credit(batches=1)).SerializeToString()
        go = threading.Event()

        def requests() -> Iterator[bytes]:
            yield _open(credits=2, transport=pb.TRANSPORT_SHM)
            for _ in range(20):
                go.wait(10)
                go.clear()
                yield credit  # takes every batch, releases none

        kinds = []
        with grpc.insecure_channel(srv.address) as channel:
            responses = channel.stream_stream(wire.STREAM_BATCHES)(requests(), timeout=30)
            chunks = 0
            for raw in responses:
                if chunks:  # a raw payload chunk of a byte-stream batch
                    chunks -= 1
                    continue
                frame = pb.ServerFrame.FromString(raw)
                if frame.WhichOneof("kind") == "batch":
                    kinds.append("slot" if frame.batch.slot else "bytes")
                    chunks = frame.batch.num_chunks
                    go.set()
                if len(kinds) == 12:
                    responses.cancel()
                    break
        assert kinds[:6] == ["slot"] * 6  # its credits (2) and the few a reading loop keeps (4)
        assert set(kinds[6:]) == {"bytes"}  # then copies: the ring is not its to hoard


def test_clients_that_never_release_cannot_starve_a_well_behaved_one_of_a_small_ring() -> None:
    # 4 MiB batches and a 48 MiB budget: fewer slots fit than the ring's slot count
    # allows. Four hoarders take every batch and release none; a reading loop must still
    # get its epoch (each hoarder holds only what leaves every stream a slot to build in).
    with Server({"t": Megabytes()}, port=0, num_workers=1, shm_bytes=48 << 20) as srv:
        fit = srv.ring.fits(4 << 20)  # of the whole budget (kept slots take room later)
        stop = threading.Event()
        held: list[int] = []
        credit = pb.ClientMessage(credit=pb.Credit(batches=1)).SerializeToString()

        def hoard() -> None:
            more = threading.Semaphore(0)

            def requests() -> Iterator[bytes]:
                yield _open(credits=8, transport=pb.TRANSPORT_SHM)
                while not stop.is_set():
                    if more.acquire(timeout=0.1):
                        yield credit

            with grpc.insecure_channel(srv.address) as channel:
                responses = channel.stream_stream(wire.STREAM_BATCHES)(requests(), timeout=120)
                chunks = slots = 0
                with contextlib.suppress(grpc.RpcError):
                    for raw in responses:
                        if stop.is_set():
                            responses.cancel()
                            break
                        if chunks:
                            chunks -= 1
                            continue
                        frame = pb.ServerFrame.FromString(raw)
                        if frame.WhichOneof("kind") == "batch":
                            slots += bool(frame.batch.slot)
                            chunks = frame.batch.num_chunks
                            more.release()
                held.append(slots)

        hoarders = [threading.Thread(target=hoard) for _ in range(4)]
        for t in hoarders:
            t.start()
        try:
            assert srv.service is not None
            service = srv.service
            assert wait_until(lambda: service.open_streams == 4)
            with DataLoader(srv.address, "t", 4, transport="shm", timeout=30) as loader:
                assert len(list(loader)) == 64
        finally:
            stop.set()
            for t in hoarders:
                t.join(30)
        assert len(held) == 4 and sum(held) < fit  # room was left to build in


def test_dataset_errors_name_no_server_path_and_carry_an_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "batchferry.server")
    with Server({"p": LeaksPaths()}, port=0, num_workers=1) as srv:
        with DataLoader(srv.address, "p", 2) as loader, pytest.raises(errors.DatasetError) as info:
            next(iter(loader))
    message = str(info.value)
    assert "FileNotFoundError" in message and "shard-" in message and "/srv/private" not in message
    error_id = message.split("[error ")[1].split(":", maxsplit=1)[0]
    assert any(error_id in r.getMessage() and "/srv/private/data" in r.getMessage() for r in caplog.records)


def test_close_ends_every_stream_with_unavailable_at_once(tensor_ds) -> None:
    srv = Server({"slow": Slow(64, delay=0.5)}, port=0, num_workers=1)
    try:
        with grpc.insecure_channel(srv.address) as channel:
            call = channel.stream_stream(wire.STREAM_BATCHES)(
                iter([_open(dataset="slow", credits=1)]), timeout=60
            )
            next(call)  # the start frame: the stream is live, its first batch takes seconds
            closer = threading.Thread(target=srv.close)
            start = time.monotonic()
            closer.start()
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            waited = time.monotonic() - start
        closer.join(30)
    finally:
        srv.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert waited < 5, f"told after {waited:.1f}s"


def test_builds_of_a_cancelled_stream_are_skipped() -> None:
    with Server({"slow": Slow(512, delay=0.05)}, port=0, num_workers=1, slots=8) as srv:
        assert srv.service is not None
        with grpc.insecure_channel(srv.address) as channel:
            opened = _open(dataset="slow", credits=32, batch_size=4)
            call = channel.stream_stream(wire.STREAM_BATCHES)(iter([opened]), timeout=60)
            next(call)  # start
            next(call)  # the first batch: by now every slot holds a build queued ahead (200 ms each)
            call.cancel()  # nobody wants them any more
        assert wait_until(lambda: srv.pool.pending == 0, 30)
        assert srv.pool.cancelled >= 3
        assert srv.service.batches_built + srv.pool.cancelled <= 8 + 1
