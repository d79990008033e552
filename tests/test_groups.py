"""Small batches travel several to a worker task, slot and frame; nothing else changes.

What a loop gets (order, values, errors, exactly-once) is the same as with one batch
per frame; these tests look at the frames themselves, and at groups cut short by a
batch that fails or outgrows its slot.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import grpc
import pytest
import torch

from batchferry import errors, layout, wire
from batchferry.client import DataLoader
from batchferry.server import Server
from batchferry.server.ring import SlotState
from batchferry.server.stream import GroupHistory, GroupSize
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same
from processes import wait_until
from toy_datasets import FailsAt, Spiky


def _open(dataset: str, batch_size: int) -> list[bytes]:
    """An open message with all the credits an epoch needs up front."""
    first = pb.OpenStream(dataset=dataset, batch_size=batch_size, credits=64, groups=True)
    return [pb.ClientMessage(open=first).SerializeToString()]


def _frames(address: str, requests: list[bytes]) -> Iterator[tuple[pb.BatchHeader, torch.Tensor]]:
    """Every batch frame of a byte stream, with its payload."""
    credits = [pb.ClientMessage(credit=pb.Credit(batches=1)).SerializeToString()] * 1000
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(wire.STREAM_BATCHES, request_serializer=None, response_deserializer=None)
        responses = iter(call(iter(requests + credits), timeout=30))
        for raw in responses:
            frame = pb.ServerFrame.FromString(raw)
            if frame.WhichOneof("kind") != "batch":
                continue
            header = frame.batch
            payload = b"".join(next(responses) for _ in range(header.num_chunks))
            yield header, torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def test_small_batches_travel_several_to_a_frame_in_torch_order(tensor_ds) -> None:
    with Server({"tensor": tensor_ds}, port=0, num_workers=2) as srv:
        frames = list(_frames(srv.address, _open("tensor", 2)))
    expected = list(torch.utils.data.DataLoader(tensor_ds, 2))
    got, sizes = [], []
    for header, payload in frames:
        parts = [(header.index, header.layout), *((p.index, p.layout) for p in header.more)]
        assert [i for i, _ in parts] == list(range(header.index, header.index + len(parts)))
        assert len(payload) == max(lay.payload_bytes for _, lay in parts)
        got += [layout.decode(lay, payload) for _, lay in parts]
        sizes.append(len(parts))
    assert_same(got, expected)
    # The first batches go alone (first-batch latency); later ones share frames.
    assert sizes[0] == 1 and max(sizes) > 1 and len(frames) < len(expected)
    # Metrics count batches, not frames: each batch of a group, and its share of the time.
    registry = srv.metrics.registry
    grpc_sent = {"dataset": "tensor", "mode": "independent", "transport": "grpc"}
    assert registry.get_sample_value("batchferry_batches_sent_total", grpc_sent) == len(expected)
    built = registry.get_sample_value(
        "batchferry_batches_built_total", {"dataset": "tensor", "mode": "independent"}
    )
    assert built is not None and built >= len(expected)
    assert registry.get_sample_value("batchferry_batch_build_seconds_count", {"dataset": "tensor"}) == built
    sent = registry.get_sample_value(
        "batchferry_batch_send_seconds_count", {"dataset": "tensor", "transport": "grpc"}
    )
    assert sent == len(expected)


def test_one_batch_per_frame_with_group_bytes_0_or_a_client_that_does_not_take_groups(tensor_ds) -> None:
    with Server({"tensor": tensor_ds}, port=0, num_workers=2, group_bytes=0) as srv:
        frames = list(_frames(srv.address, _open("tensor", 2)))
    assert [h.index for h, _ in frames] == list(range(52))
    assert not any(h.more for h, _ in frames)
    with Server({"tensor": tensor_ds}, port=0, num_workers=2) as srv:
        opened = pb.OpenStream(dataset="tensor", batch_size=2, credits=64)  # groups not asked for
        frames = list(_frames(srv.address, [pb.ClientMessage(open=opened).SerializeToString()]))
    assert [h.index for h, _ in frames] == list(range(52))
    assert not any(h.more for h, _ in frames)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_batch_failing_inside_a_group_comes_after_every_batch_before_it(transport: str) -> None:
    ds = FailsAt()
    with (
        Server({"bad": ds}, port=0, num_workers=2) as srv,
        DataLoader(srv.address, "bad", 4, transport=transport) as loader,
    ):
        got = []
        with pytest.raises(
            errors.DatasetError, match=r"batch 300\)\.\n(?s:.*)KeyError: .*corrupt record 1203"
        ):
            for batch in loader:
                got.append(batch)
    assert_same(got, [torch.arange(4 * b, 4 * b + 4).view(4, 1) for b in range(300)])


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_batch_outgrowing_its_group_slot_is_built_again_and_nothing_is_lost(transport: str) -> None:
    ds = Spiky()
    with Server({"spiky": ds}, port=0, num_workers=2) as srv:
        with DataLoader(
            srv.address, "spiky", 3, shuffle=True, collate_fn="pad", transport=transport,
            generator=torch.Generator().manual_seed(5),
        ) as loader:  # fmt: skip
            got = list(loader)
    pad = partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
    generator = torch.Generator().manual_seed(5)
    expected = list(torch.utils.data.DataLoader(ds, 3, shuffle=True, collate_fn=pad, generator=generator))
    assert_same(got, expected)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_batches_outgrowing_group_slots_out_of_order_arrive_exactly_once(transport: str) -> None:
    ds = Spiky()
    with Server({"spiky": ds}, port=0, num_workers=2) as srv:
        with DataLoader(
            srv.address, "spiky", 3, collate_fn="pad", in_order=False, transport=transport
        ) as loader:
            got = list(loader)
    firsts = sorted(int(batch[0, 0]) for batch in got)
    assert firsts == list(range(0, len(ds), 3))


def test_one_large_batch_among_small_ones_leaves_later_groups_small() -> None:
    # A 4 MiB batch among tiny ones: the groups after it must not ask for slots of
    # (group size x 4 MiB), which a 128 MiB budget cannot hold.
    ds = Spiky()
    with Server({"spiky": ds}, port=0, num_workers=2, shm_bytes=128 << 20) as srv:
        with DataLoader(srv.address, "spiky", 3, collate_fn="pad") as loader:
            got = list(loader)
    assert len(got) == 200


def test_a_loop_that_breaks_mid_group_leaves_nothing_held(tensor_ds) -> None:
    with Server({"tensor": tensor_ds}, port=0, num_workers=2) as srv:
        for transport in ("shm", "grpc"):
            with DataLoader(srv.address, "tensor", 1, transport=transport) as loader:
                for epoch in range(3):
                    for i, _ in enumerate(loader):
                        if i == 37 + epoch:
                            break
                assert_same(list(loader), list(torch.utils.data.DataLoader(tensor_ds, 1)))
        assert wait_until(lambda: srv.ring.stats().slots[SlotState.LEASED] == 0)


class _Built:
    def __init__(self, count: int, largest_bytes: int, seconds: float, error: object = None) -> None:
        self.count, self.largest_bytes, self.seconds = count, largest_bytes, seconds
        self.error = error  # a batch that failed: no size, no build time


def test_group_size_starts_at_one_and_stays_within_bytes_and_build_time() -> None:
    size = GroupSize(1 << 20)
    assert size() == 1  # nothing known yet: the first batches go alone
    size.observe(_Built(1, 4096, 1e-5))  # type: ignore[arg-type]
    assert size() == GroupSize.MAX_BATCHES
    size.observe(_Built(2, 256 << 10, 1e-5))  # type: ignore[arg-type]
    assert size() == 4 and size.batch_bytes == 256 << 10  # the largest recent batch, four to 1 MiB
    for _ in range(GroupSize.RECENT):
        size.observe(_Built(8, 8192, 1e-5))  # type: ignore[arg-type]
    assert size() == GroupSize.MAX_BATCHES  # the large one has passed
    slow = GroupSize(1 << 30)
    assert slow() == 1
    slow.observe(_Built(1, 64, 0.002))  # type: ignore[arg-type]
    assert slow() == 2  # 5 ms of building per group at most
    slow.observe(_Built(1, 0, 0.0, error="KeyError"))  # type: ignore[arg-type]
    assert slow() == 2 and slow.batch_bytes == 64  # a batch that failed tells nothing
    assert GroupSize(0)() == 1


def test_a_seeded_group_size_sends_the_first_batch_alone_then_groups() -> None:
    size = GroupSize(1 << 20, seed=(256 << 10, 1e-5))
    assert [size() for _ in range(3)] == [1, 4, 4]  # the first batch's latency is unchanged
    assert size.state() is None  # nothing of its own yet: a seed is never passed on unconfirmed
    size.observe(_Built(2, 8192, 6e-5))  # type: ignore[arg-type]
    # Its own build replaces the seed's size; the build time is a moving average from the seed's.
    assert size.batch_bytes == 8192 and size.state() == (8192, pytest.approx(0.8 * 1e-5 + 0.2 * 3e-5))
    assert GroupSize(1 << 20).state() is None
    history = GroupHistory(size=2)
    for key in [("a", "c", 1, False), ("b", "c", 1, False), ("c", "c", 1, False)]:
        history.put(key, (1, 1.0))
    history.put(("d", "c", 1, False), None)
    assert history.get(("a", "c", 1, False)) is None and history.get(("c", "c", 1, False)) == (1, 1.0)
    assert history.get(("d", "c", 1, False)) is None


def test_a_later_stream_of_the_same_batches_groups_from_its_second_build(tensor_ds) -> None:
    with Server({"tensor": tensor_ds}, port=0, num_workers=2) as srv:
        first = [1 + len(h.more) for h, _ in _frames(srv.address, _open("tensor", 2))]
        again = [1 + len(h.more) for h, _ in _frames(srv.address, _open("tensor", 2))]
        other = [1 + len(h.more) for h, _ in _frames(srv.address, _open("tensor", 3))]
    # The first stream builds several batches ahead before any has told it their size.
    assert first[:2] == [1, 1] and max(first) > 1
    assert again[0] == 1 and again[1] > 1
    assert other[:2] == [1, 1]  # another batch size: another estimate
    assert sum(first) == sum(again) == -(-len(tensor_ds) // 2)


def test_batches_the_client_chooses_are_grouped_from_what_has_arrived(tensor_ds) -> None:
    # The caller's sampler: the index lists arrive ahead of need; small ones build in groups.
    chosen = [torch.randperm(103, generator=torch.Generator().manual_seed(b))[:3] for b in range(40)]
    lists = pb.BatchIndices(
        index=list(range(40)), lengths=[3] * 40, samples=torch.cat(chosen).tolist(), end=True, total=40
    )
    first = pb.OpenStream(dataset="tensor", batch_size=3, credits=64, client_batches=True, groups=True)
    requests = [
        pb.ClientMessage(open=first).SerializeToString(),
        pb.ClientMessage(batches=lists).SerializeToString(),
    ]
    with Server({"tensor": tensor_ds}, port=0, num_workers=2) as srv:
        frames = list(_frames(srv.address, requests))
    got, sizes = [], []
    for header, payload in frames:
        parts = [(header.index, header.layout), *((p.index, p.layout) for p in header.more)]
        assert [i for i, _ in parts] == list(range(header.index, header.index + len(parts)))
        got += [layout.decode(lay, payload) for _, lay in parts]
        sizes.append(len(parts))
    assert_same(got, [[tensor_ds.tensors[0][c], tensor_ds.tensors[1][c]] for c in chosen])
    assert max(sizes) > 1 and sum(sizes) == 40


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_batch_sampler_batch_outgrowing_its_group_slot_is_built_again_in_order(transport: str) -> None:
    ds = Spiky()
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(9)), 3, drop_last=False
    )
    pad = partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
    expected = list(torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=pad))
    sampler.sampler.generator.manual_seed(9)  # type: ignore[attr-defined]
    with Server({"spiky": ds}, port=0, num_workers=2) as srv:
        with DataLoader(
            srv.address, "spiky", batch_sampler=sampler, collate_fn="pad", transport=transport
        ) as loader:
            got = list(loader)
    assert_same(got, expected)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
@pytest.mark.parametrize("in_order", [True, False])
def test_a_state_saved_mid_group_resumes_exactly_once(transport: str, in_order: bool) -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(20_000.0).view(-1, 2), torch.arange(10_000))
    with Server({"t": ds}, port=0, num_workers=2) as srv:
        options = {"shuffle": True, "seed": 4, "transport": transport, "in_order": in_order}
        with DataLoader(srv.address, "t", 8, **options) as first:
            it = iter(first)
            head = [next(it)[1] for _ in range(437)]  # deep inside a group of small batches
            state = first.state_dict()
        with DataLoader(srv.address, "t", 8, **options) as second:
            second.load_state_dict(state)
            rest = [y for _, y in second]
    ids = torch.cat(head + rest)
    assert sorted(ids.tolist()) == list(range(10_000))
    if in_order:
        generator = torch.Generator().manual_seed(4)
        torch_ids = torch.cat(
            [y for _, y in torch.utils.data.DataLoader(ds, 8, shuffle=True, generator=generator)]
        )
        assert torch.equal(ids, torch_ids)
