"""BYTES: W2 over the byte stream from one server to one loader, by stripe count.

Each loader stream can be striped over several HTTP/2 connections (``streams=``);
this sweeps that count, received in the loader's process and in receiver processes
(``receive_processes=True``), and sets it beside the raw gRPC-Python ceiling
(prebuilt 4 MiB messages, no batchferry code, one process) over as many
connections, same run.

``batchferry bench BYTES [--reps 3] [--num-workers N]``
"""

from __future__ import annotations

import datetime as _dt
import os
import statistics
from pathlib import Path
from typing import Any

from batchferry.client import DataLoader

from . import ceiling
from .harness import machine, measure, save_report, served
from .workloads import DATA_ENV, WORKLOADS, data_dir


def main(*, reps: int = 3, num_workers: int = 2, stripes: tuple[int, ...] = (1, 2, 4, 8),
         out: Path) -> dict[str, Any]:  # fmt: skip
    os.environ[DATA_ENV] = str(data_dir())
    workload = WORKLOADS["W2"]
    batches = len(workload.factory()) // workload.batch_size - 1
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "command": f"batchferry bench BYTES --reps {reps} --num-workers {num_workers}",
        "machine": machine(),
        "num_workers": num_workers,
        "ceiling": {},
        "batchferry": {},
    }
    for n in sorted({1, max(stripes)}):
        report["ceiling"][f"streams={n}"] = ceiling.measure(streams=n)["gb_per_s"]
        print(
            f"raw gRPC ceiling, {n} connection(s): {report['ceiling'][f'streams={n}']:.2f} GB/s", flush=True
        )
    with served(workload, num_workers) as address:
        for receivers in (False, True):
            for n in stripes:
                rates = []
                for rep in range(reps):
                    with DataLoader(
                        address, "W2", workload.batch_size, shuffle=True, seed=rep,
                        transport="grpc", streams=n, receive_processes=receivers,
                    ) as loader:  # fmt: skip
                        rates.append(measure(loader.__iter__, batches).gb_per_s)
                key = f"streams={n}" + (" receive_processes" if receivers else "")
                report["batchferry"][key] = statistics.median(rates)
                print(f"W2 byte stream, {key}: {statistics.median(rates):.2f} GB/s", flush=True)
    single = report["ceiling"]["streams=1"]
    best_name, best = max(report["batchferry"].items(), key=lambda kv: kv[1])
    report["best"] = best_name
    report["ratio_to_single_stream_ceiling"] = best / single
    print(f"BYTES: best {best:.2f} GB/s ({best_name}) = {best / single:.2f}x the single-connection ceiling")
    save_report(report, out, f"BYTES-{os.cpu_count()}cpu")
    return report
