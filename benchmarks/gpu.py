"""G1: W2 images delivered to a CUDA device, with a fixed amount of GPU compute per step.

Each step takes the next batch (the host time spent waiting for it is the data
stall), converts it on the GPU and runs ~``compute_ms`` of matrix products, then
waits for that compute on the host, as a training step's loss.item() would.
Reports samples/s to the GPU and the stall share, for torch's DataLoader
(pin_memory=True, non_blocking copies, a num_workers sweep) and batchferry.

``batchferry bench G1`` (needs CUDA).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from batchferry.client import DataLoader, LoaderStats

from .harness import machine, save_report, served
from .workloads import WORKLOADS

BATCH = 256


def _calibrated_compute(ms: float, device: torch.device) -> Callable[[torch.Tensor], None]:
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    for _ in range(3):
        a @ a
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ a
    end.record()
    end.synchronize()
    per = start.elapsed_time(end) / 20
    reps = max(1, round(ms / per))

    def step(x: torch.Tensor) -> None:
        x.float().mean()  # touch the batch on the device
        for _ in range(reps):
            a @ a

    return step


def _run(make_iter: Callable[[], Iterator[Any]], step: Callable[[torch.Tensor], None], steps: int,
         to_device: Callable[[torch.Tensor], torch.Tensor],
         stats: Callable[..., LoaderStats] | None = None) -> dict[str, float]:  # fmt: skip
    """``stats``: a batchferry loader's own figures, read over the same steps."""
    it = make_iter()
    for _ in range(3):  # warm up: workers, buffers, slots
        step(to_device(next(it)[0]))
    torch.cuda.synchronize()
    if stats is not None:
        stats(reset=True)
    waited = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        x = next(it)[0]
        waited += time.perf_counter() - t0
        step(to_device(x))
        done = torch.cuda.Event()
        done.record()
        done.synchronize()  # the host waits for this step's compute, not for prefetch copies
    elapsed = time.perf_counter() - start
    del it
    figures = {
        "samples_per_s": steps * BATCH / elapsed,
        "stall_share": waited / elapsed,
        "step_ms": 1e3 * elapsed / steps,
    }
    if stats is not None:
        figures["loader_stall_share"] = stats().stall_share  # as loader.stats() reports it
    return figures


def main(*, compute_ms: float = 6.0, steps: int = 28, worker_counts: tuple[int, ...] = (4, 8),
         out: Path) -> dict[str, Any]:  # fmt: skip
    if not torch.cuda.is_available():
        raise SystemExit("G1 needs a CUDA device")
    device = torch.device("cuda")
    workload = WORKLOADS["W2"]
    dataset = workload.factory()
    steps = min(steps, len(dataset) // BATCH - 4)
    step = _calibrated_compute(compute_ms, device)
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "command": "batchferry bench G1",
        "machine": machine(),
        "compute_ms": compute_ms,
        "torch": {},
        "batchferry": {},
    }
    # Compute alone: the best a loader could do.
    report["compute_only_step_ms"] = _run(
        lambda: iter([(torch.zeros(1, device=device),)] * (steps + 3)), step, steps, lambda x: x
    )["step_ms"]
    for nw in worker_counts:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=BATCH, shuffle=True, num_workers=nw, pin_memory=True,
            generator=torch.Generator().manual_seed(0), persistent_workers=False,
        )  # fmt: skip
        report["torch"][f"num_workers={nw}"] = _run(
            loader.__iter__, step, steps, lambda x: x.to(device, non_blocking=True)
        )
        print("torch", nw, report["torch"][f"num_workers={nw}"], flush=True)
    for nw in worker_counts:
        with served(workload, nw) as address:
            variants = (("shm", None, False), ("grpc", None, False), ("grpc", 4, False), ("grpc", 4, True))
            for transport, streams, receivers in variants:
                with DataLoader(
                    address,
                    "W2",
                    BATCH,
                    shuffle=True,
                    seed=0,
                    device=device,
                    transport=transport,
                    streams=streams,
                    receive_processes=receivers,
                ) as bl:
                    key = f"{transport} num_workers={nw}" + (f" streams={streams}" if streams else "")
                    key += " receive_processes" if receivers else ""
                    report["batchferry"][key] = _run(bl.__iter__, step, steps, lambda x: x, bl.stats)
                    print("batchferry", key, report["batchferry"][key], flush=True)
    best_torch = max(r["samples_per_s"] for r in report["torch"].values())
    best_ours = max(r["samples_per_s"] for r in report["batchferry"].values())
    report["ratio"] = best_ours / best_torch
    print(f"G1: batchferry {best_ours:,.0f} samples/s vs torch {best_torch:,.0f} ({report['ratio']:.2f}x); "
          f"compute-only step {report['compute_only_step_ms']:.2f} ms")  # fmt: skip
    save_report(report, out, f"G1-{torch.cuda.get_device_name().replace(' ', '_')}")
    return report
