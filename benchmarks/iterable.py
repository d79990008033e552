"""IterableDataset streams against torch's DataLoader: ``batchferry bench ITER``.

W1's rows (1,000,000 x (float32[2], int64 label)) as an IterableDataset that splits
them by worker, batch 256: per-batch overhead, as W1 measures it for map-style
datasets. torch's DataLoader with num_workers 0 and N, then batchferry over each
transport with num_workers=N iterators on a server of N worker processes, in one
run; the ratio is against torch's best. Batches are the same on both sides (torch's
round robin over the workers), so the figures compare like with like.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from batchferry.client import DataLoader

from .harness import TRANSPORTS, Sample, _median, machine, measure, save_report, served
from .workloads import Workload, w1

BATCH = 256
BATCHES = 1000  # measured per repetition, after the first


class Rows(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """W1's rows, worker w of W taking rows w, w + W, ... (all of them without workers)."""

    def __init__(self) -> None:
        self.rows = w1()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        w, count = (info.id, info.num_workers) if info is not None else (0, 1)
        x, y = self.rows.tensors
        for i in range(w, len(x), count):
            yield x[i], y[i]


def rows() -> Rows:
    """For ``batchferry serve --dataset IT1=python:batchferry.benchmarks.iterable:rows``."""
    return Rows()


WORKLOAD = Workload(
    "IT1",
    "W1's rows as an IterableDataset split by worker",
    rows,
    BATCH,
    BATCHES,
    server_spec=lambda: "python:batchferry.benchmarks.iterable:rows",
)


def main(*, reps: int = 3, num_workers: int = 2, out: Path) -> dict[str, Any]:
    dataset = Rows()
    torch_runs: dict[str, dict[str, float]] = {}
    for nw in sorted({0, num_workers}):
        samples: list[Sample] = []
        for rep in range(reps):
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=BATCH, num_workers=nw, generator=torch.Generator().manual_seed(rep)
            )
            samples.append(measure(loader.__iter__, BATCHES))
        torch_runs[f"num_workers={nw}"] = _median(samples)
    ours: dict[str, dict[str, float]] = {}
    with served(WORKLOAD, num_workers) as address:
        for transport in TRANSPORTS:
            samples = []
            for rep in range(reps):
                with DataLoader(
                    address, "IT1", BATCH, num_workers=num_workers, seed=rep, transport=transport
                ) as ours_loader:
                    samples.append(measure(ours_loader.__iter__, BATCHES))
            ours[transport] = _median(samples)
    best_name, best = max(torch_runs.items(), key=lambda kv: kv[1]["batches_per_s"])
    ratios = {t: r["batches_per_s"] / best["batches_per_s"] for t, r in ours.items()}
    report = {
        "date": _dt.date.today().isoformat(),
        "machine": machine(),
        "workload": WORKLOAD.title,
        "batch_size": BATCH,
        "num_workers": num_workers,
        "torch": torch_runs,
        "batchferry": ours,
        "torch_best": best_name,
        "ratios": ratios,
    }
    for name, run in [*((f"torch {k}", v) for k, v in torch_runs.items()), *ours.items()]:
        print(f"IT1 {name:<22} {run['batches_per_s']:>10.0f} batches/s")
    for transport, ratio in ratios.items():
        print(f"IT1 batchferry {transport} / torch best ({best_name}): {ratio:.2f}x")
    save_report(report, out, "ITER")
    return report
