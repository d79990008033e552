"""G2: a trainer whose own cores cannot keep its GPU fed, with and without a loader server.

The trainer (this process) is limited to ``trainer_cores`` cores. torch's DataLoader
decodes W3 (JPEG, random crop, flip) with 2 workers on those cores; batchferry's
server runs on the host's other cores and hands the trainer finished batches (same
host: shared memory; also over the byte stream). Each step moves a batch to the GPU
and touches it there. Reports samples/s to the GPU and the share of time spent
waiting for data.

``batchferry bench G2`` (needs CUDA and at least 4 cores; ``--device cpu`` for a smoke run).
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from batchferry.client import DataLoader

from .harness import machine, save_report, served
from .workloads import DATA_ENV, WORKLOADS, data_dir

BATCH = 64


def _rate(epochs: Callable[[], Iterable[Any]], to_device: Callable[[torch.Tensor], torch.Tensor],
          device: torch.device, seconds: float) -> dict[str, float]:  # fmt: skip
    """Steps for ``seconds`` after a 5-batch warm-up, across epochs as a training loop runs them."""
    samples, waited, warm, start = 0, 0.0, 0, 0.0
    while True:
        t0 = time.perf_counter()
        for batch, _labels in epochs():
            t1 = time.perf_counter()
            x = to_device(batch)
            x.float().mean().item()  # the step needs the batch on the device
            if warm < 5:
                warm += 1
                if warm == 5:
                    start = time.perf_counter()
            else:
                samples += x.shape[0]
                waited += t1 - t0
                if time.perf_counter() - start >= seconds:
                    elapsed = time.perf_counter() - start
                    return {"samples_per_s": samples / elapsed, "stall_share": waited / elapsed}
            t0 = time.perf_counter()


def _torch_rate(dataset: Any, dev: torch.device, seconds: float) -> dict[str, float]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=2, pin_memory=dev.type == "cuda",
        persistent_workers=True, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    return _rate(lambda: loader, lambda x: x.to(dev, non_blocking=True), dev, seconds)


def main(*, seconds: float = 10.0, trainer_cores: int = 2, device: str | None = None,
         out: Path) -> dict[str, Any]:  # fmt: skip
    if device is None and not torch.cuda.is_available():
        raise SystemExit("G2 needs a CUDA device (or --device cpu for a smoke run)")
    dev = torch.device(device or "cuda")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < trainer_cores + 1:
        raise SystemExit(f"G2 needs at least {trainer_cores + 1} cores; this process has {len(cores)}")
    trainer, rest = set(cores[:trainer_cores]), set(cores[trainer_cores:])
    server_workers = max(1, len(rest) - 2)  # leave the server's own process room
    os.environ[DATA_ENV] = str(data_dir())
    workload = WORKLOADS["W3"]
    dataset = workload.factory()  # builds the JPEG files once
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "command": "batchferry bench G2",
        "machine": machine(),
        "device": str(dev),
        "trainer_cores": sorted(trainer),
        "server_cores": sorted(rest),
        "server_workers": server_workers,
        "seconds": seconds,
        "torch": {},
        "batchferry": {},
    }
    os.sched_setaffinity(0, trainer)
    threads = torch.get_num_threads()
    torch.set_num_threads(trainer_cores)
    try:
        report["torch"]["num_workers=2"] = _torch_rate(dataset, dev, seconds)
        print("torch num_workers=2", report["torch"]["num_workers=2"], flush=True)
        with served(workload, server_workers, cpus=rest) as address:
            for transport in ("shm", "grpc"):
                with DataLoader(address, "W3", BATCH, shuffle=True, seed=0, transport=transport,
                                device=dev if dev.type == "cuda" else None) as ours:  # fmt: skip
                    report["batchferry"][transport] = _rate(lambda: ours, lambda x: x.to(dev), dev, seconds)
                    # The loader's own figure, over every epoch of the run (warm-up included).
                    report["batchferry"][transport]["loader_stall_share"] = ours.stats().stall_share
                print(f"batchferry {transport}", report["batchferry"][transport], flush=True)
    finally:
        os.sched_setaffinity(0, set(cores))
        torch.set_num_threads(threads)
    base = report["torch"]["num_workers=2"]["samples_per_s"]
    report["ratios"] = {t: r["samples_per_s"] / base for t, r in report["batchferry"].items()}
    print("G2: " + ", ".join(f"{t} {r:.2f}x" for t, r in report["ratios"].items())
          + f" torch with 2 workers on the trainer's {trainer_cores} cores")  # fmt: skip
    save_report(report, out, f"G2-{os.cpu_count()}cpu-{dev.type}")
    return report
