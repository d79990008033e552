"""Faults with real processes: killed workers, a full /dev/shm, a server stopped under live streams."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader

from batchferry import errors, shm
from batchferry.client import DataLoader
from batchferry.server import Server
from batchferry.server.datasets import DatasetSource
from batchferry.server.workers import MAX_ATTEMPTS, Result, Task, WorkerPool

from checks import assert_same
from processes import wait_until
from toy_datasets import Killed, Slow


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_kill_9_of_a_worker_mid_epoch_loses_and_repeats_nothing(transport: str) -> None:
    ds = Slow(96, delay=0.005)
    expected = list(TorchLoader(ds, 4, shuffle=True, generator=torch.Generator().manual_seed(3)))
    with Server({"slow": ds}, port=0, num_workers=2) as srv:
        with DataLoader(srv.address, "slow", 4, True, seed=3, transport=transport) as loader:
            it = iter(loader)
            got = [next(it) for _ in range(3)]
            victim = srv.pool.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)  # it is building batches ahead right now
            got += list(it)
            assert wait_until(lambda: srv.pool.restarts == 1 and victim not in srv.pool.worker_pids())
        assert_same(got, expected)
        with DataLoader(srv.address, "slow", 4, transport=transport) as loader:
            assert len(list(loader)) == 24  # the replacement worker serves the next epoch


def test_a_batch_whose_worker_is_killed_every_time_fails_naming_batch_and_signal() -> None:
    with Server({"killed": Killed()}, port=0, num_workers=2) as srv:
        with DataLoader(srv.address, "killed", 4) as loader:
            it = iter(loader)
            next(it)
            with pytest.raises(
                errors.DatasetError,
                match=rf"batch 1\)\.\nworker process \d+ was killed by SIGKILL .* {MAX_ATTEMPTS}",
            ):
                next(it)
            # The stream goes on: only the batch at fault failed, the rest of a group included.
            assert_same(list(it), [torch.arange(b * 4, b * 4 + 4).view(4, 1) for b in (2, 3)])
        assert srv.pool.restarts == MAX_ATTEMPTS


def test_a_file_cut_short_under_a_running_server_fails_its_dataset_alone(tmp_path: Path) -> None:
    # The memory map's pages past the new end raise SIGBUS in the worker; its replacement
    # cannot map the file at all. Neither may take the other dataset down with it.
    path = tmp_path / "features.npy"
    np.save(path, np.arange(64 * 4096, dtype=np.float32).reshape(64, 4096))
    with Server({"cut": f"npy:{path}", "ok": Slow(12, delay=0)}, port=0, num_workers=1) as srv:
        with DataLoader(srv.address, "cut", 8) as loader:
            assert len(list(loader)) == 8
            os.truncate(path, 4096)
            with pytest.raises(
                errors.DatasetError, match=r"dataset 'cut', batch \d+\)\.\n(?s:.*)features\.npy"
            ):
                list(loader)
        with DataLoader(srv.address, "ok", 4) as loader:
            assert len(list(loader)) == 3
        # One worker lost to SIGBUS (perhaps one per rebuild), then a replacement that stays.
        restarts = srv.pool.restarts
        assert 1 <= restarts <= MAX_ATTEMPTS
        with DataLoader(srv.address, "ok", 4) as loader:
            assert len(list(loader)) == 3
        assert srv.pool.restarts == restarts


def test_tasks_submitted_while_a_dead_worker_is_replaced_all_complete() -> None:
    """Many threads submit while a worker dies: none lands on the dead worker's queue and hangs."""
    arena = shm.Arena()
    segment = arena.create(1 << 20)
    pool = WorkerPool({"s": DatasetSource(spec="synthetic:n=64,shape=4")}, _collates(), 2)
    try:
        futures: list[Future[Result]] = []
        lock = threading.Lock()

        def submit_many() -> None:
            for k in range(40):
                task = Task(
                    "s", np.arange(k % 8, k % 8 + 4, dtype=np.int64), "default", segment.name, 1 << 20
                )
                future = pool.submit(task)
                with lock:
                    futures.append(future)

        threads = [threading.Thread(target=submit_many) for _ in range(4)]
        for t in threads:
            t.start()
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        for t in threads:
            t.join(timeout=60)
        results = [f.result(timeout=120) for f in futures]
        assert len(results) == 160 and all(r.status == "ok" for r in results)
    finally:
        pool.close()
        segment.close()
        arena.close()


def _collates() -> dict[str, object]:
    from batchferry.server.collate import collate_names, get_collate

    return {name: get_collate(name) for name in collate_names()}


FULL_SHM = textwrap.dedent(
    """
    import json, sys
    from batchferry import errors
    from batchferry.client import DataLoader
    from batchferry.server import Server

    if __name__ == "__main__":
        out = {}
        # /dev/shm here is a 64 MiB tmpfs, 40 MiB of it taken by someone else.
        with open("/dev/shm/someone-else", "wb") as f:
            f.write(bytes(40 << 20))
        datasets = {"big": "synthetic:n=64,shape=512x1024,dtype=uint8", "small": "synthetic:n=512,shape=16"}
        with Server(datasets, port=0, num_workers=1, slots=2, shm_bytes=1 << 30) as srv:
            with DataLoader(srv.address, "small", 32, transport="shm") as loader:
                out["before"] = len(list(loader))
            try:
                with DataLoader(srv.address, "big", 64, transport="shm") as loader:
                    list(loader)
            except errors.ResourceExhausted as exc:
                out["error"] = str(exc)
            ok = 0
            for _ in range(40):
                with DataLoader(srv.address, "small", 32, transport="shm") as loader:
                    ok += len(list(loader)) == 16
            out["epochs_after"] = ok
        print(json.dumps(out))
    """
)


def test_a_full_dev_shm_fails_one_stream_clearly_and_the_ring_serves_on(tmp_path: Path) -> None:
    script = tmp_path / "full.py"
    script.write_text(FULL_SHM)
    cmd = ["unshare", "--mount", "sh", "-c",
           f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} {script}"]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if out.returncode != 0 and ("Operation not permitted" in out.stderr or "unshare failed" in out.stderr):
        pytest.skip(f"cannot create a mount namespace here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["before"] == 16
    assert re.search(
        r"/dev/shm is full .* cannot allocate \d+ bytes for a batch of 335\d{5} bytes", result["error"]
    )
    assert "budget 67108864" in result["error"]  # shm_bytes (1 GiB) capped to what /dev/shm holds
    assert result["epochs_after"] == 40  # every later epoch of a well-behaved client is whole
