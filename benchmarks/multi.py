"""W5: four trainer processes reading W2 from one server in shared mode, against four
separate torch DataLoaders. Aggregate samples/s and CPU seconds per sample delivered,
counting every process involved (trainers, their loader workers, server and workers).

``batchferry bench W5``
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing as mp
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from batchferry.client import DataLoader

from .harness import machine, save_report, served
from .workloads import DATA_ENV, WORKLOADS, data_dir

TRAINERS = 4
BATCH = 256


def _cpu_self_and_children() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _trainer(kind: str, address: str, batches: int, num_workers: int, start: Any, out: Any) -> None:
    torch.set_num_threads(1)
    if kind == "torch":
        dataset = WORKLOADS["W2"].factory()
        loader: Any = torch.utils.data.DataLoader(
            dataset, batch_size=BATCH, shuffle=True, num_workers=num_workers,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    else:
        loader = DataLoader(
            address, "W2", BATCH, shuffle=True, seed=0, mode="shared", job="w5", prefetch_factor=4
        )
    it = iter(loader)  # in shared mode this joins the job: all four join before any consumes
    start.wait(timeout=300)
    cpu0 = _cpu_self_and_children()
    t0 = time.perf_counter()
    for _ in range(batches):
        x = next(it)[0]
        x[:, :, 0, 0].float().mean()  # touch the batch
        del x
    elapsed = time.perf_counter() - t0
    cpu = _cpu_self_and_children() - cpu0  # the timed window only, not start-up
    del it
    if kind != "torch":
        loader.close()
    out.put((elapsed, cpu))


def _run(kind: str, address: str, batches: int, num_workers: int, server_pid: int | None) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(TRAINERS + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_trainer, args=(kind, address, batches, num_workers, start, out))
        for _ in range(TRAINERS)
    ]
    for p in procs:
        p.start()
    start.wait(timeout=300)  # every trainer has connected (and joined the job)
    server_cpu0 = _tree_cpu(server_pid)
    t0 = time.perf_counter()
    results = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=60)
    cpu = sum(r[1] for r in results) + _tree_cpu(server_pid) - server_cpu0
    samples = TRAINERS * batches * BATCH
    return {"samples_per_s": samples / wall, "cpu_s_per_1k_samples": 1000 * cpu / samples, "wall_s": wall}


def _tree_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def main(*, reps: int = 3, num_workers: int = 2, out: Path) -> dict[str, Any]:
    os.environ[DATA_ENV] = str(data_dir())
    workload = WORKLOADS["W2"]
    workload.factory()  # build the data once, outside the timings
    batches = 24
    runs: dict[str, list[dict[str, float]]] = {"torch": [], "batchferry shared": []}
    for _ in range(reps):
        runs["torch"].append(_run("torch", "", batches, 0, None))
    with served(workload, num_workers) as address:
        server_pid = next(p.pid for p in psutil.Process().children() if "serve" in " ".join(p.cmdline()))
        for _ in range(reps):
            runs["batchferry shared"].append(_run("batchferry", address, batches, num_workers, server_pid))
    medians = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    ratio = medians["batchferry shared"]["samples_per_s"] / medians["torch"]["samples_per_s"]
    cpu_ratio = (
        medians["batchferry shared"]["cpu_s_per_1k_samples"] / medians["torch"]["cpu_s_per_1k_samples"]
    )
    report = {
        "date": _dt.date.today().isoformat(),
        "command": f"batchferry bench W5 --reps {reps}",
        "machine": machine(),
        "trainers": TRAINERS,
        "batches_per_trainer": batches,
        "torch_num_workers": 0,
        "server_num_workers": num_workers,
        "medians": medians,
        "aggregate_ratio": ratio,
        "cpu_per_sample_ratio": cpu_ratio,
    }
    for name, m in medians.items():
        print(f"W5 {name:<18} {m['samples_per_s']:>9,.0f} samples/s aggregate, "
              f"{m['cpu_s_per_1k_samples']:.3f} CPU s per 1k samples")  # fmt: skip
    print(f"W5: aggregate {ratio:.2f}x four separate torch DataLoaders, CPU per sample {cpu_ratio:.2f}x")
    save_report(report, out, "W5")
    return report
