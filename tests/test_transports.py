"""Both transports give the same batches; shm slots are held until released, and freed if a client dies."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader

from batchferry import errors, shm, wire
from batchferry.client import DataLoader
from batchferry.client import connection as loader_module
from batchferry.server import Server
from batchferry.server.ring import SlotState
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same
from processes import wait_until
from toy_datasets import Nested, VarLen


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_transports_match_torch(server: Server, tensor_ds, transport: str) -> None:
    ref = TorchLoader(tensor_ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(6))
    with DataLoader(server.address, "tensor", 8, shuffle=True, seed=6, transport=transport) as loader:
        assert loader.transport == transport
        for _ in range(2):
            assert_same(list(loader), list(ref))
    with DataLoader(server.address, "nested", 5, transport=transport) as loader:
        assert_same(list(loader), list(TorchLoader(Nested(), batch_size=5)))


def test_auto_prefers_shm_on_the_same_host(server: Server) -> None:
    with DataLoader(server.address, "tensor", 8) as loader:
        assert loader.transport == "shm"


def test_auto_falls_back_and_forced_shm_fails_when_memory_is_not_shared(
    server: Server, tensor_ds, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader_module, "probe", lambda name, token: False)
    with DataLoader(server.address, "tensor", 10) as loader:
        assert loader.transport == "grpc"
        assert_same(list(loader), list(TorchLoader(tensor_ds, 10)))
    with DataLoader(server.address, "tensor", 10, transport="shm") as loader:
        with pytest.raises(errors.InvalidArgument, match="not visible here"):
            iter(loader)


def test_client_in_another_ipc_namespace_uses_the_byte_stream(server: Server) -> None:
    """A real separate /dev/shm (unshare), as a container without shared IPC would have."""
    script = (
        "from batchferry.client import DataLoader;"
        f"l = DataLoader('{server.address}', 'tensor', 10);"
        "print(l.transport, sum(len(b[0]) for b in l))"
    )
    cmd = [
        "unshare",
        "--mount",
        "--ipc",
        "sh",
        "-c",
        f'mount -t tmpfs tmpfs /dev/shm && exec {sys.executable} -c "{script}"',
    ]
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if out.returncode != 0 and ("Operation not permitted" in out.stderr or "unshare failed" in out.stderr):
        pytest.skip(f"cannot create namespaces here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["grpc", "103"]


def _raw_shm_stream(address: str, messages: Iterable[bytes]) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(address)
    call = channel.stream_stream(wire.STREAM_BATCHES, request_serializer=None, response_deserializer=None)
    return channel, call(iter(messages), timeout=30)


def _open_shm(credits: int) -> bytes:
    return pb.ClientMessage(
        open=pb.OpenStream(dataset="tensor", batch_size=4, credits=credits, transport=pb.TRANSPORT_SHM)
    ).SerializeToString()


def test_slots_are_held_until_released_and_never_reused_after_a_client_vanishes(server: Server) -> None:
    ring = server.ring
    assert wait_until(lambda: ring.stats().slots[SlotState.LEASED] == 0)
    alive = threading.Event()

    def requests() -> Iterator[bytes]:
        yield _open_shm(credits=3)
        alive.wait(30)  # a live client keeps its request stream open

    channel, responses = _raw_shm_stream(server.address, requests())
    frames = [pb.ServerFrame.FromString(next(responses)) for _ in range(4)]  # start + 3 batches
    assert [f.WhichOneof("kind") for f in frames] == ["start", "batch", "batch", "batch"]
    sent = {f.batch.slot for f in frames[1:]}
    assert len(sent) == 3
    # Three sent and never released (plus builds made ahead): leased while the client lives.
    assert wait_until(lambda: ring.stats().slots[SlotState.LEASED] >= 3)
    mapped = shm.Segment.attach(sorted(sent)[0], shared_lock=True)  # the client maps one of them
    responses.cancel()  # the client goes away: it will map nothing more
    alive.set()
    channel.close()
    assert wait_until(lambda: ring.stats().slots[SlotState.LEASED] == 0)
    # They left the ring for good: names gone, the mapped one counted until it is unmapped.
    assert not any((shm.SHM_DIR / name).exists() for name in sent)
    assert wait_until(lambda: ring.stats().slots[SlotState.RETIRED] == 1)  # workers let go too
    mapped.close()
    assert wait_until(lambda: ring.stats().slots[SlotState.RETIRED] == 0)
    with DataLoader(server.address, "tensor", 4, transport="shm") as loader:
        assert len(list(loader)) == 26  # the ring goes on with fresh slots


def test_releasing_a_batch_that_holds_no_slot_is_refused(server: Server) -> None:
    bogus = pb.ClientMessage(release=pb.Release(index=999)).SerializeToString()
    channel, responses = _raw_shm_stream(server.address, [_open_shm(credits=1), bogus])
    with pytest.raises(grpc.RpcError) as info:
        list(responses)
    channel.close()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "release: batch 999 holds no slot" in info.value.details()


def test_kept_batches_survive_slot_reuse(server: Server) -> None:
    # More batches than ring slots, all kept: shm batches must not alias slots.
    with DataLoader(server.address, "varlen", 1, collate_fn="pad", transport="shm") as loader:
        kept = list(loader)
    ds = VarLen()
    assert len(kept) == len(ds) > server.config.num_slots
    for i, (seq, n) in enumerate(kept):
        assert torch.equal(seq[0], ds[i][0]) and int(n) == ds[i][1]


def _shm_mappings() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as maps:
        lines = maps.readlines()
    for line in lines:
        if "/dev/shm/batchferry_" in line:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            out.append((lo, hi, line.strip()))
    return out


def test_same_host_cpu_batches_are_views_of_the_slot(server: Server) -> None:
    with DataLoader(server.address, "tensor", 10, transport="shm") as loader:
        x, y = next(iter(loader))
        ptr = x.data_ptr()
        assert any(lo <= ptr < hi for lo, hi, _ in _shm_mappings()), "batch was copied out of the slot"
        del x, y


def test_batches_kept_after_an_early_break_stay_intact(server: Server, tensor_ds) -> None:
    expected = list(TorchLoader(tensor_ds, batch_size=4))
    with DataLoader(server.address, "tensor", 4, transport="shm") as loader:
        it = iter(loader)
        kept = [next(it), next(it)]
        it.close()  # the stream ends with these slots unreleased: the server must not reuse them
    with DataLoader(server.address, "tensor", 4, transport="shm") as other:
        for _ in range(3):
            list(other)  # cycles every ring slot many times
    assert_same(kept, expected[:2])


def test_kept_batches_are_copied_out_in_place_and_their_slots_reused(server: Server) -> None:
    with DataLoader(server.address, "varlen", 1, collate_fn="pad", transport="shm") as loader:
        kept = list(loader)  # more batches than slots, all kept
        addresses = [seq.data_ptr() for seq, _ in kept]
    stats = server.ring.stats()
    # Every slot went back to the ring (none detached or lingering for this client)...
    assert stats.slots[SlotState.LEASED] == stats.slots[SlotState.RETIRED] == 0
    # ... because each kept batch now lives in private memory at the same address.
    shm_ranges = [(lo, hi) for lo, hi, _ in _shm_mappings()]
    assert not any(lo <= ptr < hi for ptr in addresses for lo, hi in shm_ranges)
    ds = VarLen()
    for i, (seq, n) in enumerate(kept):
        assert torch.equal(seq[0], ds[i][0]) and int(n) == ds[i][1]


@pytest.mark.parametrize("mode", ["independent", "shared", "dynamic"])
def test_kept_batches_stay_intact_while_later_ones_are_dropped(mode: str) -> None:
    """A loop keeps some batches and drops others (out of order): no kept one is ever overwritten."""
    from toy_datasets import Filled

    kw: dict[str, Any] = {"job": "keep"} if mode != "independent" else {}
    with Server({"f": Filled(400, 4096)}, port=0, num_workers=2) as srv:
        with DataLoader(srv.address, "f", 1, transport="shm", prefetch_factor=2, mode=mode, **kw) as loader:
            it = iter(loader)
            for _ in range(10):
                a = next(it)  # kept a while ...
                want = float(a[0, 0])
                b = next(it)  # ... while the next one is dropped at once
                del b
                next(it)
                # Not synchronisation: room for the server to build ahead into any slot it
                # (wrongly) took back.
                time.sleep(0.3)
                assert bool((a == want).all()), f"kept batch {want} was overwritten"
                del a
            kept = [(float(b[0, 0]), b) for i, b in enumerate(it) if i % 4 == 0]  # a plain loop
        assert all(bool((t == want).all()) for want, t in kept)
        assert [want for want, _ in kept] == sorted(want for want, _ in kept)
