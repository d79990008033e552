"""Edges a training script meets: a timeout and the next batch, torch.distributed's rank,
frameworks' sampler.set_epoch, copies of a loader, careless exceptions, GetSample's limits."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler

from batchferry import errors
from batchferry.client import DataLoader
from batchferry.server import Server

from checks import assert_same
from processes import free_port
from reading import outcomes
from toy_datasets import SlowAt, Unprintable

ROOT = Path(__file__).resolve().parent.parent


def _seq(it: Any) -> list[Any]:
    """Every batch as a list, or the exception type raised in its place, to StopIteration."""
    return [type(x) if isinstance(x, BaseException) else x.tolist() for x in outcomes(it, 50)]


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_after_a_timeout_the_next_next_waits_for_the_same_batch(transport: str) -> None:
    ds = SlowAt(16, slow=5, delay=2.5)
    torch_batches = [b.tolist() for b in TorchLoader(ds, 4)]
    with Server({"slow": ds}, port=0, num_workers=2) as srv:
        with DataLoader(srv.address, "slow", 4, timeout=1, transport=transport) as loader:
            got = [b for b in _seq(iter(loader)) if b is not errors.BatchTimeout]
            assert got == torch_batches  # each timeout held no batch back, none came twice


def test_an_exception_whose_str_raises_fails_its_batch_only(server: Server) -> None:
    ds = SlowAt(16, bad=6)
    with Server({"bad": ds}, port=0, num_workers=1) as srv, DataLoader(srv.address, "bad", 4) as loader:
        ours = _seq(iter(loader))
    theirs = _seq(iter(TorchLoader(ds, 4)))
    assert theirs[1] is Unprintable and len(ours) == len(theirs)
    for mine, torchs in zip(ours, theirs):
        if isinstance(torchs, type):  # the dataset's class, also a DatasetError
            assert issubclass(mine, torchs) and issubclass(mine, errors.DatasetError)
        else:
            assert mine == torchs


def test_a_copy_is_a_loader_of_its_own_from_the_same_point(server: Server, tensor_ds) -> None:
    with DataLoader(server.address, "tensor", 10, shuffle=True, seed=3) as loader:
        next(iter(loader))
        copies = [copy.copy(loader), copy.deepcopy(loader), pickle.loads(pickle.dumps(loader))]
        rest = list(loader._active)  # type: ignore[arg-type]
        for other in copies:
            with other:
                assert_same(list(other), rest)
        copies[0].close()
        assert len(list(loader)) == len(loader)  # closing a copy leaves the original working


def test_sampler_set_epoch_moves_a_sharded_loader_as_torchs_sampler(server: Server, tensor_ds) -> None:
    with DataLoader(server.address, "tensor", 8, shuffle=True, mode="sharded", job="set-epoch", seed=2,
                    rank=1, world_size=3) as loader:  # fmt: skip
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(5)  # as Lightning and Accelerate do before each epoch
        theirs = DistributedSampler(tensor_ds, 3, 1, shuffle=True, seed=2)
        theirs.set_epoch(5)
        assert_same(list(loader), list(TorchLoader(tensor_ds, 8, sampler=theirs)))
        assert loader.epoch == 6


def test_sharded_mode_without_a_rank_or_a_process_group_is_refused(server: Server) -> None:
    with pytest.raises(errors.InvalidArgument, match="sharded mode needs rank and world_size"):
        DataLoader(server.address, "tensor", 8, mode="sharded", job="no-rank")


def test_torch_s_refusals_of_workers_and_drop_last(server: Server) -> None:
    ds = SlowAt(4)
    for kwargs in ({"num_workers": -1}, {"drop_last": 1}):
        with pytest.raises(ValueError) as theirs:
            TorchLoader(ds, 2, **kwargs)
        with pytest.raises(errors.InvalidArgument) as ours:
            DataLoader(server.address, "tensor", 2, **kwargs)
        assert str(ours.value) == str(theirs.value)


_RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.utils.data import DataLoader as TorchLoader, DistributedSampler, TensorDataset
from batchferry.client import DataLoader

dist.init_process_group("gloo")
x = torch.arange(103 * 4, dtype=torch.float32).reshape(103, 4)
ds = TensorDataset(x, torch.arange(103) % 5)
with DataLoader(sys.argv[1], "tensor", 8, shuffle=True, seed=4, mode="sharded", job="torchrun") as loader:
    sampler = DistributedSampler(ds, shuffle=True, seed=4)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        ours, theirs = list(loader), list(TorchLoader(ds, 8, sampler=sampler))
        assert len(ours) == len(theirs)
        assert all(torch.equal(a, b) for o, t in zip(ours, theirs) for a, b in zip(o, t))
    cfg = loader.config
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: {cfg.rank} of {cfg.world_size} ok")
dist.destroy_process_group()
"""


def test_torchrun_ranks_take_their_rank_from_the_process_group(server: Server, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_RANK_SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(script), server.address],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(line for line in done.stdout.splitlines() if "ok" in line) == [
        "rank 0 of 2: 0 of 2 ok",
        "rank 1 of 2: 1 of 2 ok",
    ]


def test_a_sample_larger_than_one_answer_is_refused_naming_the_way_round() -> None:
    big = torch.utils.data.TensorDataset(torch.zeros(2, 5 << 20))  # 20 MiB samples
    with Server({"big": big}, port=0, num_workers=1, max_batch_bytes=64 << 20) as srv:
        with DataLoader(srv.address, "big", 1) as loader:
            with pytest.raises(
                errors.ResourceExhausted, match=r"more than one answer carries .*batch_size=None"
            ):
                loader.dataset[0]
            assert next(iter(loader))[0].shape == (1, 5 << 20)  # a loader still reads it
        assert srv.ring.free_slots == srv.ring.num_slots


def test_get_sample_counts_against_max_streams(server: Server) -> None:
    with Server({"slow": SlowAt(16)}, port=0, num_workers=1, max_streams=1) as srv:
        with DataLoader(srv.address, "slow", 2) as holder, DataLoader(srv.address, "slow", 2) as other:
            it = iter(holder)
            next(it)  # its stream holds the server's one place
            with pytest.raises(errors.ResourceExhausted, match="max_streams=1"):
                other.dataset[0]
            del it
            holder.close()
            assert other.dataset[3].tolist() == [3]
