"""Epoch orders equal torch's RandomSampler/BatchSampler for any size and seed."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler

from batchferry import sampling


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    batch_size=st.integers(1, 64),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_order_and_generator_match_torch(
    n: int, batch_size: int, drop_last: bool, shuffle: bool, seed: int
) -> None:
    ref_gen = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(range(n), generator=ref_gen) if shuffle else SequentialSampler(range(n))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        # What torch's DataLoader iterator does: base-seed draw, then the batch sampler.
        torch.empty((), dtype=torch.int64).random_(generator=ref_gen)
        expected = list(BatchSampler(sampler, batch_size, drop_last))
        state = sampling.begin_iteration(gen, shuffle)
        order = sampling.epoch_order(n, shuffle, state)
        total = sampling.num_batches(n, batch_size, drop_last)
        assert [order.batch(b, batch_size).tolist() for b in range(total)] == expected
        if shuffle:
            gen.set_state(torch.frombuffer(bytearray(order.state_after_epoch), dtype=torch.uint8))
        assert torch.equal(gen.get_state(), ref_gen.get_state())


def test_replay_epoch_equals_consuming_one() -> None:
    a, b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    sampling.replay_epoch(a, 50, True)
    torch.empty((), dtype=torch.int64).random_(generator=b)
    list(RandomSampler(range(50), generator=b))
    assert torch.equal(a.get_state(), b.get_state())


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 200),
    world=st.integers(1, 9),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 5),
)
def test_sharded_order_equals_distributed_sampler(
    n: int, world: int, drop_last: bool, shuffle: bool, seed: int, epoch: int
) -> None:
    for rank in range(world):
        sampler = DistributedSampler(range(n), world, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)  # type: ignore[arg-type]
        sampler.set_epoch(epoch)
        order = sampling.sharded_order(n, shuffle, seed, epoch, rank, world, drop_last)
        assert order.indices.tolist() == list(sampler)
        assert sampling.shard_length(n, world, drop_last) == len(sampler)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 200),
    world=st.integers(1, 5),
    batch_size=st.integers(1, 16),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    data=st.data(),
)
def test_a_run_of_batches_is_those_batches_one_after_another(
    n: int, world: int, batch_size: int, shuffle: bool, drop_last: bool, data: st.DataObject
) -> None:
    # What a group of consecutive batches is built from: one slice of the order.
    rank = data.draw(st.integers(0, world - 1))
    if data.draw(st.booleans()):
        order = sampling.sharded_order(n, shuffle, 7, 0, rank, world, drop_last)
    else:
        state = sampling.begin_iteration(torch.Generator().manual_seed(7), shuffle)
        order = sampling.epoch_order(n, shuffle, state)
    total = sampling.num_batches(order.count, batch_size, drop_last)
    first = data.draw(st.integers(0, max(0, total - 1)))
    count = data.draw(st.integers(1, max(1, total - first)))
    joined = [i for b in range(first, first + count) for i in order.batch(b, batch_size).tolist()]
    assert order.batches(first, count, batch_size).tolist() == joined


@settings(max_examples=200, deadline=None)
@given(batches=st.integers(0, 500), replicas=st.integers(1, 12), data=st.data())
def test_replicas_split_every_epoch_exactly_once(batches: int, replicas: int, data: st.DataObject) -> None:
    """Replica r of R owns the batches b % R == r; positions map to batches and back."""
    from batchferry.server.plan import Plan

    start = data.draw(st.integers(0, batches))
    owned: list[int] = []
    for r in range(replicas):
        plan = Plan("d", "default", 1, batches, start, 1, 1 << 20, shm=False, replica=r, replicas=replicas)
        mine = [plan.batch_index(p) for p in range(plan.local_start, plan.local_total)]
        assert all(b % replicas == r for b in mine)
        assert all(plan.local(b) == p for p, b in enumerate(mine, plan.local_start))
        assert plan.batch_index(plan.local_total) == batches  # one past the end
        owned += mine
    assert sorted(owned) == list(range(start, batches))
