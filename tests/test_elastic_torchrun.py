"""Real elastic training: torchrun (gloo, CPU) jobs that checkpoint, die and resume
in another size (or in the same, by torchrun's own restart), reading a served dataset.

The promise checked: the samples every rank trained on, up to the checkpoint and
after it, are each epoch exactly once (DistributedSampler's padding aside), and at
every step all ranks have batches of the same size (DDP's collectives stay in step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from batchferry.server import Server

from processes import free_port

SCRIPT = Path(__file__).with_name("elastic_train.py")
EPOCHS = 2


def _torchrun(server: Server, out: Path, run: str, procs: int, kill_at: int = -1, restarts: int = 0) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
         f"--max-restarts={restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
         str(SCRIPT), server.address, str(out), run, str(kill_at), "4", str(EPOCHS)],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if kill_at < 0 or restarts:
        assert done.returncode == 0, done.stderr[-12000:]
    return done.returncode


def _steps(out: Path, pattern: str) -> list[dict[str, Any]]:
    records = []
    for path in sorted(out.glob(pattern)):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


def _check(records: list[dict[str, Any]], worlds: set[int], n: int) -> None:
    for record in records:
        assert len(set(record["sizes"])) == 1, f"step {record['step']}: batch sizes {record['sizes']} differ"
    for epoch in range(EPOCHS):
        seen = Counter(i for r in records if r["epoch"] == epoch for i in r["ids"])
        assert set(seen) == set(range(n)), (
            f"epoch {epoch}: samples {sorted(set(range(n)) - set(seen))} missed"
        )
        repeats = sum(seen.values()) - n
        assert repeats < sum(worlds), f"epoch {epoch}: {repeats} samples repeated, more than padding"


@pytest.mark.parametrize(("before", "after"), [(4, 2), (4, 6)])
def test_a_ddp_job_killed_resumes_in_another_size(
    server: Server, tensor_ds, tmp_path: Path, before: int, after: int
) -> None:
    rc = _torchrun(server, tmp_path, "first", before, kill_at=6)
    assert rc != 0  # a rank was killed: the group failed
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 4 and len(saved["loader"]) == before
    _torchrun(server, tmp_path, "second", after)
    first = [r for r in _steps(tmp_path, "first-*") if r["step"] <= saved["step"]]
    second = _steps(tmp_path, "second-*")
    assert second and min(r["step"] for r in second) == saved["step"] + 1
    _check(first + second, {before, after}, len(tensor_ds))


def test_torchrun_restarts_the_group_where_the_checkpoint_left_it(
    server: Server, tensor_ds, tmp_path: Path
) -> None:
    _torchrun(server, tmp_path, "elastic", 3, kill_at=6, restarts=1)
    saved_step = 4
    first = [r for r in _steps(tmp_path, "elastic-restart0-*") if r["step"] <= saved_step]
    again = _steps(tmp_path, "elastic-restart1-*")
    assert again and min(r["step"] for r in again) == saved_step + 1
    _check(first + again, {3}, len(tensor_ds))
