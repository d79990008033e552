"""Scale-out: R server replicas, each serving the batches b % R == i, merged by one loader."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler

from batchferry import errors, shm, wire
from batchferry.client import DataLoader
from batchferry.client import replicas as replicas_mod
from batchferry.server import Server, parse_spec
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same
from processes import ServeProcess, back_after, free_port
from reading import in_step, read_concurrently

SPEC = "synthetic:n=300,shape=6,seed=4"  # 19 batches of 16: not a multiple of 3


def replica(index: int, count: int, host: str = "127.0.0.1", port: int | None = None) -> ServeProcess:
    """``batchferry serve`` as replica ``index`` of ``count``: a real server process."""
    return ServeProcess(
        f"syn={SPEC}",
        host=host,
        port=port,
        extra=["--replica-index", str(index), "--num-replicas", str(count)],
    )


@pytest.fixture(scope="module")
def three() -> Iterator[list[ServeProcess]]:
    reps = [replica(i, 3) for i in range(3)]
    try:
        for r in reps:
            r.start()
        yield reps
    finally:
        for r in reps:
            r.stop()


@pytest.fixture(scope="module")
def single() -> Iterator[Server]:
    with Server({"syn": SPEC}, port=0, num_workers=1) as srv:
        yield srv


def _torch_epochs(seed: int, epochs: int, batch_size: int = 16) -> list[list[object]]:
    ds = parse_spec(SPEC)
    loader = TorchLoader(ds, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return [list(loader) for _ in range(epochs)]


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_three_replica_processes_equal_one_server_and_torch(
    three: list[ServeProcess], single: Server, transport: str
) -> None:
    expected = _torch_epochs(seed=7, epochs=2)
    # The order of the addresses does not matter: each server says which replica it is.
    addresses = [three[2].address, three[0].address, three[1].address]
    with (
        DataLoader(addresses, "syn", 16, True, seed=7, transport=transport) as merged,
        DataLoader(single.address, "syn", 16, True, seed=7, transport=transport) as one,
    ):
        assert merged.num_replicas == 3 and merged.transport == transport
        assert len(merged) == len(one) == len(expected[0]) == 19
        for epoch in range(2):
            from_replicas, from_one = list(merged), list(one)
            assert_same(from_replicas, from_one)
            assert_same(from_replicas, expected[epoch])
        assert torch.equal(merged.generator.get_state(), one.generator.get_state())  # type: ignore[union-attr]


def test_replicas_resume_mid_epoch(three: list[ServeProcess]) -> None:
    expected = _torch_epochs(seed=3, epochs=2)
    addresses = [r.address for r in three]
    with DataLoader(addresses, "syn", 16, True, seed=3) as loader:
        first = list(loader)
        it = iter(loader)
        head = [next(it) for _ in range(8)]  # mid-epoch, not at a multiple of 3
        state = loader.state_dict()
    with DataLoader(addresses, "syn", 16, True, seed=3) as resumed:
        resumed.load_state_dict(state)
        tail = list(resumed)
    assert_same(first, expected[0])
    assert_same(head + tail, expected[1])


def test_replicas_sharded_ranks_equal_distributed_sampler(three: list[ServeProcess]) -> None:
    ds = parse_spec(SPEC)
    world = 2
    for rank in range(world):
        sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=1)  # type: ignore[arg-type]
        kw = {"mode": "sharded", "job": "ddp-replicas", "rank": rank, "world_size": world, "seed": 1}
        with DataLoader([r.address for r in three], "syn", 8, True, **kw) as loader:  # type: ignore[arg-type]
            for epoch in range(2):
                sampler.set_epoch(epoch)
                assert_same(list(loader), list(TorchLoader(ds, 8, sampler=sampler)))  # type: ignore[arg-type]


def _reference_seeded(seed: int, epoch: int, batch_size: int) -> list[object]:
    ds = parse_spec(SPEC)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return list(TorchLoader(torch.utils.data.Subset(ds, order), batch_size))  # type: ignore[arg-type]


def test_replicas_shared_consumers_get_every_batch(three: list[ServeProcess]) -> None:
    addresses = [r.address for r in three]
    kw = {"seed": 5, "mode": "shared", "job": "shared-replicas"}
    loaders = [DataLoader(addresses, "syn", 16, True, **kw) for _ in range(2)]  # type: ignore[arg-type]
    got = in_step(loaders, len(loaders[0]))
    expected = _reference_seeded(5, 0, 16)
    for seq in got:
        assert_same(seq, expected)
    for loader in loaders:
        loader.close()


def _rows(batches: list[object]) -> list[tuple[float, ...]]:
    """Every sample of the batches, as the exact values of its features."""
    return sorted(tuple(row) for b in batches for row in b[0].tolist())  # type: ignore[index]


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_replicas_dynamic_splits_the_epoch_exactly_once(three: list[ServeProcess], transport: str) -> None:
    addresses = [r.address for r in three]
    kw = {"seed": 2, "mode": "dynamic", "job": f"dyn-replicas-{transport}", "transport": transport}
    loaders = [DataLoader(addresses, "syn", 16, True, **kw) for _ in range(2)]  # type: ignore[arg-type]
    got = read_concurrently(loaders)
    everything = sorted(tuple(row) for row in parse_spec(SPEC).data.tolist())  # type: ignore[attr-defined]
    assert _rows([b for seq in got for b in seq]) == everything
    for loader in loaders:
        loader.close()


def test_a_missing_or_doubled_replica_is_refused_before_any_batch(three: list[ServeProcess]) -> None:
    with (
        DataLoader([three[0].address, three[1].address], "syn", 16, timeout=5) as loader,
        pytest.raises(errors.ServerUnavailable, match=r"replica\(s\) \[2\] of 3 missing"),
    ):
        iter(loader)
    with (
        DataLoader(three[1].address, "syn", 16, timeout=5) as loader,
        pytest.raises(errors.ServerUnavailable, match="every replica's address"),
    ):
        len(loader)
    with pytest.raises(errors.InvalidArgument, match="names a server twice"):
        DataLoader([three[0].address, three[0].address], "syn", 16)
    with (
        Server({"syn": SPEC}, port=0, num_workers=0, replica_index=0, num_replicas=2) as a,
        Server({"syn": SPEC}, port=0, num_workers=0, replica_index=0, num_replicas=2) as b,
        DataLoader([a.address, b.address], "syn", 16, timeout=5) as loader,
        pytest.raises(errors.InvalidArgument, match="both replica 0 of 2"),
    ):
        len(loader)
    with (
        Server({"syn": SPEC}, port=0, num_workers=0, replica_index=0, num_replicas=2) as a,
        Server(
            {"syn": "synthetic:n=301,shape=6"}, port=0, num_workers=0, replica_index=1, num_replicas=2
        ) as b,
        DataLoader([a.address, b.address], "syn", 16, timeout=5) as loader,
        pytest.raises(errors.InvalidArgument, match="disagree on the length"),
    ):
        len(loader)


def test_a_stream_for_another_replica_is_refused(three: list[ServeProcess]) -> None:
    """A client that means replica 0 of 3 but reaches replica 1 (a stale address) gets
    FAILED_PRECONDITION, never replica 1's part of the epoch in place of replica 0's."""
    with grpc.insecure_channel(three[1].address) as channel:
        call = channel.stream_stream(wire.STREAM_BATCHES, request_serializer=None, response_deserializer=None)
        for index, count in [(0, 3), (1, 0)]:  # 0 replicas: a client unaware of scale-out
            req = pb.ClientMessage(
                open=pb.OpenStream(
                    dataset="syn", batch_size=4, credits=1, replica_index=index, num_replicas=count
                )
            )
            with pytest.raises(grpc.RpcError) as info:
                list(call(iter([req.SerializeToString()]), timeout=10))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "this server is replica 1 of 3" in str(info.value.details())


def test_a_killed_replica_is_retried_within_timeout() -> None:
    expected = _torch_epochs(seed=9, epochs=1)[0]
    reps = [replica(i, 3) for i in range(3)]
    try:
        for r in reps:
            r.start()
        with DataLoader([r.address for r in reps], "syn", 16, True, seed=9, timeout=30) as loader:
            it = iter(loader)
            got = [next(it) for _ in range(7)]
            reps[1].kill()
            with back_after(1.0, reps[1].start):
                got += list(it)  # waits for replica 1, then continues
        assert_same(got, expected)

        with DataLoader([r.address for r in reps], "syn", 16, timeout=1.5) as loader:
            it = iter(loader)
            next(it)
            reps[2].kill()
            with pytest.raises(errors.ServerUnavailable, match=r"replica 2 of 3 .* did not come back"):
                list(it)
    finally:
        for r in reps:
            r.stop()
        shm.remove_stale()  # what the killed servers left


def _loopback_aliases() -> list[str]:
    """127.0.0.2-4 reach this host too (Linux routes 127/8 to loopback)."""
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    for host in hosts:
        try:
            with socket.socket() as s:
                s.bind((host, 0))
        except OSError:
            pytest.skip(f"cannot bind {host} on this host")
    return hosts


def test_dns_name_finds_every_replica_and_follows_a_moved_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A headless Service's name resolves to every pod; a restarted pod comes back at a
    new address and the loader finds it by asking each address which replica it is."""
    hosts = _loopback_aliases()
    port = free_port()
    resolved = {"addresses": [f"127.0.0.1:{port}", f"{hosts[0]}:{port}"]}
    looked_up: list[tuple[str, int]] = []

    def fake_resolve(name: str, p: int) -> list[str]:
        looked_up.append((name, p))
        return list(resolved["addresses"])

    monkeypatch.setattr(replicas_mod, "resolve", fake_resolve)
    expected = _torch_epochs(seed=4, epochs=1)[0]
    reps = [replica(0, 2, "127.0.0.1", port), replica(1, 2, hosts[0], port)]
    try:
        for r in reps:
            r.start()
        with DataLoader(f"dns:///loader.example:{port}", "syn", 16, True, seed=4, timeout=30) as loader:
            assert loader.num_replicas == 2
            it = iter(loader)
            got = [next(it) for _ in range(5)]
            reps[1].kill()
            # The pod is rescheduled: same replica index, a new address.
            reps[1] = replica(1, 2, hosts[1], port)
            resolved["addresses"] = [f"127.0.0.1:{port}", f"{hosts[1]}:{port}"]
            reps[1].start()
            got += list(it)
        assert_same(got, expected)
        assert looked_up[0] == ("loader.example", port) and len(looked_up) >= 2
    finally:
        for r in reps:
            r.stop()
        shm.remove_stale()


def test_one_server_reached_by_ipv4_and_ipv6_counts_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name resolving to both loopback addresses of one dual-stack server is one server."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with Server({"syn": SPEC}, host="::", port=0, num_workers=0) as srv:
        both = [f"127.0.0.1:{srv.port}", f"[::1]:{srv.port}"]
        monkeypatch.setattr(replicas_mod, "resolve", lambda name, port: list(both))
        with DataLoader(f"dns:///loader.example:{srv.port}", "syn", 16, True, seed=4) as loader:
            assert loader.num_replicas == 1
            assert_same(list(loader), _torch_epochs(seed=4, epochs=1)[0])


def test_resolve_uses_the_host_resolver() -> None:
    assert "127.0.0.1:5" in replicas_mod.resolve("localhost", 5)
    assert replicas_mod.resolve("name.invalid", 5) == []


@pytest.mark.parametrize(
    ("address", "needle"),
    [
        ("dns://8.8.8.8/loader:50051", "DNS server in the target"),
        ("dns:///loader", "expected dns:///NAME:PORT"),
        (["a:1", "dns:///b:2"], "dns:/// name on its own"),
        ([], "a list of them"),
    ],
)
def test_malformed_addresses_are_named(address: object, needle: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=needle):
        DataLoader(address, "syn", 16)  # type: ignore[arg-type]


@pytest.mark.parametrize(("index", "count"), [(0, 10**12), (3, 3), (-1, 2)])
def test_a_server_reporting_an_impossible_replica_is_refused(index: int, count: int) -> None:
    """A peer's claims are checked before they size anything."""
    from concurrent.futures import ThreadPoolExecutor

    reply = pb.ListDatasetsResponse(
        datasets=[pb.DatasetInfo(name="syn", length=10)], replica_index=index, num_replicas=count
    ).SerializeToString()
    handler = grpc.method_handlers_generic_handler(
        wire.SERVICE, {"ListDatasets": grpc.unary_unary_rpc_method_handler(lambda _req, _ctx: reply)}
    )
    fake = grpc.server(ThreadPoolExecutor(2), handlers=[handler])
    port = fake.add_insecure_port("127.0.0.1:0")
    fake.start()
    try:
        with (
            DataLoader(f"127.0.0.1:{port}", "syn", 4, timeout=5) as loader,
            pytest.raises(errors.ProtocolError, match=f"replica {index} of {count}"),
        ):
            len(loader)
    finally:
        fake.stop(0).wait()
