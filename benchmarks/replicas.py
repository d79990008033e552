"""SCALE: one loader reading W1 and W2 from R server replicas on this host, against one
server with the same total worker count and torch's DataLoader, in the same run.

On one host the replicas share its cores, so this measures what the merge of R
streams costs (or gains, where one server's single gRPC stream is the limit),
not the capacity R machines add. ``batchferry bench SCALE --replicas 2``
"""

from __future__ import annotations

import datetime as _dt
import os
import statistics
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from batchferry.client import DataLoader

from .harness import TRANSPORTS, Sample, machine, measure, save_report, served
from .workloads import DATA_ENV, SCALE_ENV, WORKLOADS, data_dir


def _median(samples: list[Sample]) -> dict[str, float]:
    return {k: statistics.median(getattr(s, k) for s in samples) for k in asdict(samples[0])}


def _ours(addresses: list[str], workload_id: str, batches: int, reps: int) -> dict[str, dict[str, float]]:
    workload = WORKLOADS[workload_id]
    out = {}
    for transport in TRANSPORTS:
        samples = []
        for rep in range(reps):
            target: str | list[str] = addresses if len(addresses) > 1 else addresses[0]
            with DataLoader(
                target, workload.id, workload.batch_size, shuffle=True, seed=rep, transport=transport
            ) as loader:
                samples.append(measure(loader.__iter__, batches))
        out[transport] = _median(samples)
    return out


def main(
    *,
    reps: int = 3,
    num_workers: int = 2,
    replicas: int = 2,
    out: Path,
    ids: tuple[str, ...] = ("W1", "W2"),
    scale: float = 1.0,
) -> dict[str, Any]:
    if replicas < 2:
        raise ValueError(f"replicas must be >= 2, got {replicas}")
    os.environ[DATA_ENV] = str(data_dir())
    os.environ[SCALE_ENV] = str(scale)  # server processes build the workloads at this scale too
    per_replica = max(1, num_workers // replicas)
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "command": f"batchferry bench SCALE --reps {reps} --num-workers {num_workers} --replicas {replicas}",
        "machine": machine(),
        "replicas": replicas,
        "workers_one_server": num_workers,
        "workers_per_replica": per_replica,
        "workloads": {},
    }
    for workload_id in ids:
        workload = WORKLOADS[workload_id]
        dataset = workload.factory()
        batches = min(workload.batches, len(dataset) // workload.batch_size - 1)
        key = "gb_per_s" if workload.unit == "GB/s" else "batches_per_s"
        torch_samples = []
        for rep in range(reps):
            reference = torch.utils.data.DataLoader(
                dataset, batch_size=workload.batch_size, shuffle=True, num_workers=num_workers,
                generator=torch.Generator().manual_seed(rep),
            )  # fmt: skip
            torch_samples.append(measure(reference.__iter__, batches))
        torch_run = _median(torch_samples)
        with served(workload, num_workers) as address:
            one = _ours([address], workload_id, batches, reps)
        with ExitStack() as stack:
            addresses = [
                stack.enter_context(
                    served(
                        workload, per_replica, ["--replica-index", str(i), "--num-replicas", str(replicas)]
                    )
                )
                for i in range(replicas)
            ]
            many = _ours(addresses, workload_id, batches, reps)
        vs_one = {t: many[t][key] / one[t][key] for t in TRANSPORTS}
        result = {
            "unit": workload.unit,
            "batches_measured": batches,
            f"torch_num_workers={num_workers}": torch_run,
            "one_server": one,
            f"{replicas}_replicas": many,
            "ratios_vs_torch": {
                f"{name} {t}": runs[t][key] / torch_run[key]
                for name, runs in (("one server", one), (f"{replicas} replicas", many))
                for t in TRANSPORTS
            },
            "replicas_vs_one_server": vs_one,
        }
        report["workloads"][workload_id] = result
        for t in TRANSPORTS:
            print(
                f"SCALE {workload_id} {t:<4}: torch {torch_run[key]:,.2f}  one server {one[t][key]:,.2f}  "
                f"{replicas} replicas {many[t][key]:,.2f} {workload.unit}  "
                f"(replicas/one {vs_one[t]:.2f}x, "
                f"replicas/torch {many[t][key] / torch_run[key]:.2f}x)"
            )
    save_report(report, out, f"SCALE-{os.cpu_count()}cpu")
    return report
