"""Epoch orders equal torch's RandomSampler/BatchSampler for any size and seed."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

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
