"""Byte streams received by processes of their own (receive_processes=True)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader

from batchferry import codec, errors, wire
from batchferry.client import DataLoader
from batchferry.client.segments import SegmentCache
from batchferry.server import Server, parse_spec
from batchferry.v1 import loader_pb2 as _pb2

from checks import assert_same, no_new_segments
from processes import ServeProcess, receivers_running, wait_until
from toy_datasets import RESTART_SPEC, FailsAt, Nested


@pytest.fixture(autouse=True)
def _none_left() -> Iterator[None]:
    yield
    assert wait_until(lambda: not receivers_running(), 10), "receiver processes left running"


def _loader(address: str, *args: Any, **kw: Any) -> DataLoader:
    return DataLoader(address, *args, transport="grpc", receive_processes=True, **kw)


@pytest.mark.parametrize("streams", [1, 3])
def test_torch_order_resume_and_a_second_epoch(server: Server, tensor_ds, streams: int) -> None:
    ref = TorchLoader(tensor_ds, 8, shuffle=True, generator=torch.Generator().manual_seed(5))
    expected = [list(ref) for _ in range(2)]
    with no_new_segments():
        loader = _loader(server.address, "tensor", 8, True, seed=5, streams=streams)
        it = iter(loader)
        head = [next(it) for _ in range(5)]
        state = loader.state_dict()
        assert len(loader._connection.receivers.pids()) == streams  # type: ignore[union-attr]
        loader.close()
        with _loader(server.address, "tensor", 8, True, seed=1, streams=streams) as again:
            again.load_state_dict(state)
            got = [head + list(again), list(again)]
            pids = again._connection.receivers.pids()  # type: ignore[union-attr]
            assert len(pids) == streams and os.getpid() not in pids
            assert again.stats().batches == len(got[0]) - len(head) + len(got[1])
    for epoch in range(2):
        assert_same(got[epoch], expected[epoch])


def test_kept_batches_stay_intact_while_slots_are_reused(server: Server) -> None:
    """Batches the loop keeps (three epochs of them) are copied out of their slots in place,
    so the receiver reuses the slots and the kept values do not change."""
    torch_loader = TorchLoader(Nested(), 4, shuffle=True, generator=torch.Generator().manual_seed(2))
    refs = [list(torch_loader) for _ in range(3)]
    with _loader(server.address, "nested", 4, True, seed=2) as loader:
        kept = [list(loader) for _ in range(3)]
    for got, ref in zip(kept, refs, strict=True):
        assert_same(got, ref)


def test_groups_with_many_small_batches(server: Server, tensor_ds) -> None:
    ref = list(TorchLoader(tensor_ds, 2, shuffle=True, generator=torch.Generator().manual_seed(8)))
    with _loader(server.address, "tensor", 2, True, seed=8) as loader:
        got = list(loader)
        frames = loader.stats().batches
    assert frames == len(ref)
    assert_same(got, ref)


@pytest.mark.skipif(not codec.available(), reason="blosc2 not installed")
def test_compressed_stream_is_decompressed_in_the_receiver(server: Server, tensor_ds) -> None:
    ref = list(TorchLoader(tensor_ds, 16, shuffle=True, generator=torch.Generator().manual_seed(4)))
    with _loader(server.address, "tensor", 16, True, seed=4, compression="lz4") as loader:
        assert_same(list(loader), ref)


def test_dataset_errors_reach_the_loop_and_the_loader_goes_on() -> None:
    ds = FailsAt(200, bad=77)
    with (
        Server({"f": ds}, port=0, num_workers=1) as srv,
        _loader(srv.address, "f", 10) as loader,
    ):
        got = []
        it = iter(loader)
        with pytest.raises(errors.DatasetError, match="corrupt record 77"):
            for batch in it:
                got.append(batch)
        assert [int(b[0]) for b in got] == list(range(0, 70, 10))
        # As torch's: the next batch comes next (the error frame passed the receiver process).
        torch_it = iter(TorchLoader(ds, 10))
        expected = [next(torch_it) for _ in range(7)]
        with pytest.raises(KeyError):
            next(torch_it)
        assert_same(got + list(it), expected + list(torch_it))
        with pytest.raises(errors.DatasetError):
            list(loader)  # the next epoch fails at the same batch, through a fresh stream


def test_break_mid_epoch_then_a_full_epoch(server: Server, tensor_ds) -> None:
    ref = list(TorchLoader(tensor_ds, 8, shuffle=True, generator=torch.Generator().manual_seed(3)))
    with no_new_segments(), _loader(server.address, "tensor", 8, True, seed=3, streams=2) as loader:
        for i, _ in enumerate(loader):
            if i == 2:
                break
        loader.set_epoch(0)
        assert_same(list(loader), ref)


@pytest.fixture(scope="module")
def long_epoch() -> Iterator[tuple[Server, torch.utils.data.TensorDataset]]:
    """An epoch of 1,000 small batches: far more than a stream has in flight, so a receiver
    killed or stopped a few batches in still has most of its stream to carry."""
    ds = torch.utils.data.TensorDataset(torch.arange(8000, dtype=torch.float32).reshape(4000, 2))
    with Server({"long": ds}, port=0, num_workers=1) as srv:
        yield srv, ds


def test_a_receiver_killed_mid_epoch_is_replaced_and_nothing_is_lost(long_epoch) -> None:
    server, dataset = long_epoch
    ref = list(TorchLoader(dataset, 4, shuffle=True, generator=torch.Generator().manual_seed(6)))
    with _loader(server.address, "long", 4, True, seed=6, streams=2, timeout=30) as loader:
        it = iter(loader)
        got = [next(it) for _ in range(5)]
        victims = loader._connection.receivers.pids()  # type: ignore[union-attr]
        os.kill(victims[0], signal.SIGKILL)
        got += list(it)
        assert loader.stats().reconnects >= 1
        assert set(loader._connection.receivers.pids()) != set(victims)  # type: ignore[union-attr]
    assert_same(got, ref)


def test_a_stuck_receiver_is_replaced_and_the_epoch_completes(long_epoch) -> None:
    """A receiver that stops (SIGSTOP: swapped out, a debugger) leaves its stream silent;
    after timeout= the loader pings it, gets no answer, kills it and goes on with a fresh one."""
    server, dataset = long_epoch
    ref = list(TorchLoader(dataset, 4, shuffle=True, generator=torch.Generator().manual_seed(8)))
    with _loader(server.address, "long", 4, True, seed=8, streams=2, timeout=3) as loader:
        it = iter(loader)
        got = [next(it) for _ in range(3)]
        stuck = loader._connection.receivers.pids()[1]  # type: ignore[union-attr]
        os.kill(stuck, signal.SIGSTOP)
        try:
            got += list(it)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck, signal.SIGCONT)
        assert stuck not in loader._connection.receivers.pids()  # type: ignore[union-attr]
        assert loader.stats().reconnects >= 1
    assert_same(got, ref)


def test_a_receiver_stuck_between_epochs_is_replaced(server: Server, tensor_ds) -> None:
    torch_loader = TorchLoader(tensor_ds, 8, shuffle=True, generator=torch.Generator().manual_seed(5))
    refs = [list(torch_loader) for _ in range(2)]
    with _loader(server.address, "tensor", 8, True, seed=5, timeout=3) as loader:
        got = [list(loader)]
        stuck = loader._connection.receivers.pids()[0]  # type: ignore[union-attr]
        os.kill(stuck, signal.SIGSTOP)
        try:
            got.append(list(loader))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck, signal.SIGCONT)
        assert stuck not in loader._connection.receivers.pids()  # type: ignore[union-attr]
    for epoch, ref in zip(got, refs, strict=True):
        assert_same(epoch, ref)


def test_a_loader_with_many_open_files_still_reaches_its_receivers(server: Server, tensor_ds) -> None:
    """Descriptors past 1024 (a big training process): no select() limit on the link."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        ref = list(TorchLoader(tensor_ds, 8, shuffle=True, generator=torch.Generator().manual_seed(1)))
        with _loader(server.address, "tensor", 8, True, seed=1) as loader:
            assert_same(list(loader), ref)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_receivers_dead_before_an_epoch_starts_are_replaced(server: Server, tensor_ds) -> None:
    torch_loader = TorchLoader(tensor_ds, 8, shuffle=True, generator=torch.Generator().manual_seed(9))
    refs = [list(torch_loader) for _ in range(2)]
    with _loader(server.address, "tensor", 8, True, seed=9, streams=2) as loader:
        got = [list(loader)]
        for pid in loader._connection.receivers.pids():  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
        got.append(list(loader))  # opened on receivers dying or dead: replaced, not an error
    for epoch, ref in zip(got, refs, strict=True):
        assert_same(epoch, ref)


def test_a_slot_gone_with_its_receiver_is_a_reconnect_not_an_error(
    server: Server, tensor_ds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that dies may have sent frames whose slots its reaper removes before the
    loader maps them: the loader takes that as the receiver lost and reconnects, where a
    server's missing slot would be a malformed stream."""
    ref = list(TorchLoader(tensor_ds, 4, shuffle=True, generator=torch.Generator().manual_seed(7)))
    real_map, calls = SegmentCache.map, [0]

    def map_once_gone(self: SegmentCache, name: str) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            raise FileNotFoundError(2, "No such file or directory")
        return real_map(self, name)

    monkeypatch.setattr(SegmentCache, "map", map_once_gone)
    with _loader(server.address, "tensor", 4, True, seed=7, timeout=30) as loader:
        got = list(loader)
        assert loader.stats().reconnects == 1
    assert_same(got, ref)


def test_server_restart_mid_epoch(restartable: ServeProcess) -> None:
    ds = parse_spec(RESTART_SPEC)
    expected = list(TorchLoader(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(9)))
    with _loader(f"127.0.0.1:{restartable.port}", "syn", 16, True, seed=9, timeout=30) as loader:
        it = iter(loader)
        got = [next(it) for _ in range(5)]
        restartable.kill()
        restartable.start()
        got += list(it)
    assert_same(got, expected)


FULL_SHM = textwrap.dedent(
    """
    import json, logging, sys
    from batchferry import errors
    from batchferry.client import DataLoader

    out = {"got": 0, "notes": []}
    handler = logging.Handler()
    handler.emit = lambda record: out["notes"].append(record.getMessage())
    logging.getLogger("batchferry.client").addHandler(handler)
    kw = {"transport": "grpc", "receive_processes": True, "streams": 1}
    # 20 MiB frames: more than this /dev/shm (16 MiB) holds at all.
    with DataLoader(sys.argv[1], "big", 80, **kw) as loader:
        try:
            for batch in loader:
                out["got"] += 1
        except errors.ResourceExhausted as exc:
            out["error"] = str(exc)
    # 10 MiB frames: one at a time fits, so fewer travel at once.
    with DataLoader(sys.argv[1], "big", 40, **kw) as loader:
        out["after"] = [len(x) for x, y in loader]
    # 4 MiB frames to two receivers: room for three slots between them, handed back and forth.
    with DataLoader(sys.argv[1], "big", 16, **{**kw, "streams": 2}) as loader:
        out["shared"] = [len(x) for x, y in loader]
    print(json.dumps(out))
    """
)


def test_a_small_dev_shm_slows_receiving_and_a_frame_larger_than_it_fails_clearly(tmp_path: Path) -> None:
    server = ServeProcess("big=synthetic:n=96,shape=65536,seed=1")
    server.start()
    try:
        script = tmp_path / "full.py"
        script.write_text(FULL_SHM)
        run = f"exec {sys.executable} {script} {server.address}"
        cmd = ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=16m tmpfs /dev/shm && {run}"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            pytest.skip("unshare is not installed")
    finally:
        server.stop()
    if out.returncode != 0 and ("Operation not permitted" in out.stderr or "unshare failed" in out.stderr):
        pytest.skip(f"cannot create a mount namespace here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "RESOURCE_EXHAUSTED: receiver process: no shared memory for a slot" in result["error"]
    assert "a frame of 209" in result["error"] and "/dev/shm holds 16777216" in result["error"]
    assert result["got"] == 0
    assert result["after"] == [40, 40, 16]
    assert result["shared"] == [16] * 6
    assert (
        "/dev/shm (16 MiB) is full: this receiver holds 1 frames" in result["notes"][0]
    )  # once per receiver


@pytest.fixture
def hostile(server: Server) -> Iterator[tuple[str, list[_pb2.BatchHeader]]]:
    """A server that answers ListDatasets as ``server`` does, then streams the headers the
    test puts in the list, each followed by one 64-byte chunk."""
    listing = grpc.insecure_channel(server.address).unary_unary(
        wire.LIST_DATASETS, request_serializer=None, response_deserializer=None
    )(b"")
    headers: list[_pb2.BatchHeader] = []

    def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        next(requests)  # the open
        yield _pb2.ServerFrame(start=_pb2.StreamStart(num_batches=26)).SerializeToString()
        for header in headers:
            yield _pb2.ServerFrame(batch=header).SerializeToString()
            yield bytes(64)
        time.sleep(30)

    handler = grpc.method_handlers_generic_handler(
        wire.SERVICE,
        {
            "ListDatasets": grpc.unary_unary_rpc_method_handler(lambda req, ctx: listing),
            "StreamBatches": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    fake = grpc.server(concurrent.futures.ThreadPoolExecutor(4), handlers=[handler])
    port = fake.add_insecure_port("127.0.0.1:0")
    fake.start()
    try:
        yield f"127.0.0.1:{port}", headers
    finally:
        fake.stop(0)


@pytest.mark.parametrize("receivers", [False, True])
@pytest.mark.parametrize("size", [1 << 40, (1 << 64) - 1])
def test_a_hostile_payload_size_is_refused_before_anything_is_allocated(
    hostile: tuple[str, list[_pb2.BatchHeader]], receivers: bool, size: int
) -> None:
    address, headers = hostile
    headers.append(_pb2.BatchHeader(index=0, num_chunks=1, layout=_pb2.Layout(payload_bytes=size)))
    before = shutil.disk_usage("/dev/shm").used
    with DataLoader(
        address, "tensor", 4, transport="grpc", receive_processes=receivers, timeout=20
    ) as loader:
        with pytest.raises(
            errors.ProtocolError, match=f"batch 0: {size} payload bytes cannot come in 1 chunks"
        ):
            next(iter(loader))
    assert shutil.disk_usage("/dev/shm").used - before < 1 << 20


def test_whatever_fails_in_a_receiver_reaches_the_loop(hostile: tuple[str, list[_pb2.BatchHeader]]) -> None:
    """A failure the receiver does not foresee (here: a slot size past what the OS takes)
    fails the stream at once, naming it, instead of leaving the loop to time out."""
    address, headers = hostile
    huge = _pb2.BatchHeader(index=0, num_chunks=1 << 62, layout=_pb2.Layout(payload_bytes=(1 << 64) - 1))
    headers.append(huge)
    with _loader(address, "tensor", 4, timeout=20) as loader:  # not a BatchTimeout after 20 s
        with pytest.raises(errors.BatchferryError, match="INTERNAL: receiver process: OverflowError"):
            next(iter(loader))


def test_arguments_are_checked(server: Server) -> None:
    with pytest.raises(errors.InvalidArgument, match="receive_processes must be a bool"):
        DataLoader(server.address, "tensor", 4, receive_processes="yes")  # type: ignore[arg-type]
    creds = grpc.ssl_channel_credentials()
    with pytest.raises(errors.InvalidArgument, match="ChannelCredentials"):
        DataLoader(server.address, "tensor", 4, receive_processes=True, credentials=creds)


def test_same_host_shared_memory_needs_no_receivers(server: Server) -> None:
    with DataLoader(server.address, "tensor", 8, transport="shm", receive_processes=True) as loader:
        assert len(list(loader)) == 13
        assert loader._connection.receivers.pids() == []  # type: ignore[union-attr]
