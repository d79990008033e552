"""Random message sequences and random bytes on the wire: the server stays up, answers with the
status codes its contract names, and stays within its budgets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchferry import layout, sampling, wire
from batchferry.client import DataLoader
from batchferry.server import Server
from batchferry.server.ring import SlotState
from batchferry.v1 import loader_pb2 as pb

from processes import wait_until
from toy_datasets import Point, VarLen

EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # this client's own deadline, or an idle stream
    grpc.StatusCode.UNAVAILABLE,  # an idle stream told to reconnect
}
BUDGET = 64 << 20
_STATE = sampling.begin_iteration(torch.Generator().manual_seed(1), True)


@pytest.fixture(scope="module")
def target(tensor_ds) -> Iterator[Server]:
    with Server(
        {"t": tensor_ds, "v": VarLen()}, port=0, num_workers=1, shm_bytes=BUDGET, max_streams=8,
        stream_idle_s=2.0, linger_s=1.0,
    ) as srv:  # fmt: skip
        yield srv


opens = st.builds(
    pb.OpenStream,
    dataset=st.sampled_from(["t", "v", "", "nope"]),
    batch_size=st.integers(-5, 300),
    shuffle=st.booleans(),
    sampler_state=st.sampled_from([b"", b"\x00\x01", _STATE]),
    drop_last=st.booleans(),
    collate=st.sampled_from(["", "default", "pad", "convert", "x"]),
    epoch=st.integers(-2, 3),
    start_batch=st.integers(-3, 40),
    credits=st.integers(-1, 70),
    chunk_bytes=st.sampled_from([0, 10, 65536, 1 << 20, 1 << 30]),
    transport=st.sampled_from([0, 1, 5]),
    mode=st.integers(0, 4),
    job=st.sampled_from(["", "fuzz", "fuzz2"]),
    rank=st.integers(-1, 4),
    world_size=st.integers(-1, 5),
    seed=st.integers(-(2**63), 2**63 - 1),
    groups=st.booleans(),
    unbatched=st.booleans(),
)
messages = st.one_of(
    opens.map(lambda o: pb.ClientMessage(open=o).SerializeToString()),
    st.integers(-5, 10**7).map(lambda n: pb.ClientMessage(credit=pb.Credit(batches=n)).SerializeToString()),
    st.integers(-3, 50).map(lambda i: pb.ClientMessage(release=pb.Release(index=i)).SerializeToString()),
    st.integers(-3, 50).map(lambda i: pb.ClientMessage(detach=pb.Release(index=i)).SerializeToString()),
    st.just(pb.ClientMessage(stop=pb.Stop()).SerializeToString()),
    st.binary(max_size=64),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(messages, min_size=0, max_size=8), first_open=st.booleans(), data=st.data())
def test_random_client_messages(
    target: Server, sequence: list[bytes], first_open: bool, data: st.DataObject
) -> None:
    if first_open:
        sequence = [pb.ClientMessage(open=data.draw(opens)).SerializeToString(), *sequence]
    with grpc.insecure_channel(target.address) as channel:
        call = channel.stream_stream(wire.STREAM_BATCHES)(iter(sequence), timeout=5)
        try:
            for _ in call:
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert code in EXPECTED, f"{code}: {exc.details()}"
            assert len(exc.details() or "") < 2000
    assert target.ring.stats().total_bytes <= BUDGET


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=256), method=st.sampled_from([wire.LIST_DATASETS, wire.LIST_JOBS]))
def test_random_bytes_to_unary_methods(target: Server, payload: bytes, method: str) -> None:
    with grpc.insecure_channel(target.address) as channel:
        try:
            channel.unary_unary(method)(payload, timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()


def test_after_the_fuzzing_the_server_serves_and_holds_nothing(target: Server) -> None:
    assert wait_until(lambda: target.ring.stats().slots[SlotState.LEASED] == 0, 30)
    assert wait_until(lambda: target.ring.stats().slots[SlotState.LINGERING] == 0, 30)
    with DataLoader(target.address, "t", 10, shuffle=True, seed=1) as loader:
        assert len(list(loader)) == 11
    assert target.ring.stats().total_bytes <= BUDGET


# Namedtuple nodes as a peer may send them: names that are and are not fields or classes,
# of modules imported here and not, counts that do and do not match.
_names = st.one_of(
    st.sampled_from(["x", "y", "_0", "_1", "_", "class", "Point", "toy_datasets", "a.b", "<locals>", ""]),
    st.text(max_size=8),
    st.just("n" * 1100),
)
_named_nodes = st.builds(
    pb.NodeNamed,
    module=st.one_of(
        st.sampled_from(["toy_datasets", "collections", "sys", "batchferry.layout", "nope"]), _names
    ),
    qualname=st.one_of(st.sampled_from(["Point", "Point.x", "OrderedDict", "modules"]), _names),
    fields=st.lists(_names, max_size=5),
    items=st.lists(st.integers(-5, 5).map(lambda i: pb.Node(int=i)), max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(node=_named_nodes)
def test_random_namedtuple_nodes_decode_or_are_refused(node: pb.NodeNamed) -> None:
    msg = pb.Layout(root=pb.Node(namedtuple=node))
    try:
        out = layout.decode(msg, torch.zeros(0, dtype=torch.uint8))
    except layout.LayoutError:
        return
    assert isinstance(out, tuple) and type(out)._fields == tuple(node.fields)
    assert list(out) == [n.int for n in node.items]


@settings(max_examples=300, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4))
def test_damaged_layouts_decode_or_are_refused(flips: list[tuple[int, int]]) -> None:
    slot = torch.zeros(1 << 12, dtype=torch.uint8)
    tree = {"p": Point(torch.arange(4), 3), "q": [Point(Point(1, "a"), None)], 5: (1.5, True)}
    raw = bytearray(layout.encode(tree, layout.SlotWriter(slot)).SerializeToString())
    for at, value in flips:
        raw[at % len(raw)] = value
    try:
        msg = pb.Layout.FromString(bytes(raw))
    except DecodeError:
        return
    with contextlib.suppress(layout.LayoutError):
        layout.decode(msg, slot)
