"""Run workloads through torch's DataLoader and batchferry in one run; report medians and ratios.

``batchferry bench W1 W2 W4 [--reps 3] [--out DIR]`` prints a table, writes
``DIR/<date>-<machine>-<ids>.json`` and a PNG chart beside it.
The loader server runs as a separate process (as deployed), on loopback.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

import batchferry
from batchferry.client import DataLoader

from . import ceiling
from .workloads import DATA_ENV, SCALE_ENV, WORKLOADS, Workload, data_dir

TRANSPORTS = ("grpc", "shm")


@dataclass
class Sample:
    first_batch_s: float
    batches_per_s: float
    gb_per_s: float


def _nbytes(batch: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(batch) if isinstance(t, torch.Tensor))


def measure(make_iter: Callable[[], Iterator[Any]], batches: int) -> Sample:
    """Time to the first batch, then the rate over ``batches`` more."""
    start = time.perf_counter()
    it = make_iter()
    first = next(it)
    t_first = time.perf_counter()
    nbytes = _nbytes(first)
    del first
    for _ in range(batches):
        batch = next(it)
        nbytes += _nbytes(batch)
        del batch
    elapsed = time.perf_counter() - t_first
    del it
    return Sample(t_first - start, batches / elapsed, nbytes / elapsed / 1e9)


@contextmanager
def served(workload: Workload, num_workers: int, extra: Sequence[str] = (),
           cpus: set[int] | None = None) -> Iterator[str]:  # fmt: skip
    """A ``batchferry serve`` process for the workload (``extra``: more flags; ``cpus``: the
    cores it and its workers may run on); yields its address."""
    cmd = [
        sys.executable, "-m", "batchferry.cli", "--log-level", "WARNING", "serve",
        "--dataset", f"{workload.id}={workload.spec}",
        "--host", "127.0.0.1", "--port", "0", "--num-workers", str(num_workers), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    if cpus is not None:  # before it starts its workers, which inherit the set
        os.sched_setaffinity(proc.pid, cpus)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "serving" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        yield line.split(" on ", 1)[1].split()[0]  # "batchferry serving W1 on HOST:PORT[ as replica i of R]"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()


def _median(samples: list[Sample]) -> dict[str, float]:
    return {k: statistics.median(getattr(s, k) for s in samples) for k in asdict(samples[0])}


def run_workload(workload: Workload, reps: int, num_workers: int, bar: tqdm[Any]) -> dict[str, Any]:
    dataset = workload.factory()
    # Stay inside one epoch (small scales shrink the epoch).
    batches = min(workload.batches, len(dataset) // workload.batch_size - 1)
    results: dict[str, Any] = {
        "title": workload.title,
        "batch_size": workload.batch_size,
        "unit": workload.unit,
        "batches_measured": batches,
    }
    torch_runs: dict[str, dict[str, float]] = {}
    for nw in sorted({0, num_workers}):
        samples = []
        for rep in range(reps):
            bar.set_postfix_str(f"{workload.id} torch nw={nw} rep {rep + 1}")
            reference = torch.utils.data.DataLoader(
                dataset, batch_size=workload.batch_size, shuffle=True, num_workers=nw,
                collate_fn=workload.torch_collate, generator=torch.Generator().manual_seed(rep),
            )  # fmt: skip
            samples.append(measure(reference.__iter__, batches))
            bar.update()
        torch_runs[f"num_workers={nw}"] = _median(samples)
    results["torch"] = torch_runs
    if workload.in_process is not None:
        bar.set_postfix_str(f"{workload.id} in-process build")
        results["in_process"] = workload.in_process()
    ours: dict[str, dict[str, float]] = {}
    with served(workload, num_workers) as address:
        for transport in TRANSPORTS:
            samples = []
            for rep in range(reps):
                bar.set_postfix_str(f"{workload.id} batchferry {transport} rep {rep + 1}")
                with DataLoader(
                    address, workload.id, workload.batch_size, shuffle=True, seed=rep,
                    collate_fn=workload.collate, transport=transport,
                ) as loader:  # fmt: skip
                    samples.append(measure(loader.__iter__, batches))
                bar.update()
            ours[transport] = _median(samples)
    results["batchferry"] = ours
    key = "gb_per_s" if workload.unit == "GB/s" else "batches_per_s"
    best_name, best = max(torch_runs.items(), key=lambda kv: kv[1][key])
    results["torch_best"] = best_name
    results["ratios"] = {t: r[key] / best[key] for t, r in ours.items()}
    results["first_batch_ratio"] = {
        t: r["first_batch_s"] / torch_runs.get(f"num_workers={num_workers}", best)["first_batch_s"]
        for t, r in ours.items()
    }
    return results


def save_report(report: dict[str, Any], out: Path, name: str) -> Path:
    """Write ``report`` as ``out/<date>-<name>.json`` and say where."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report['date']}-{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "batchferry": batchferry.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"{'workload':<10}{'loader':<26}{'first batch ms':>16}{'batches/s':>12}{'GB/s':>8}{'ratio':>8}"]
    for wid, res in report["workloads"].items():
        for name, r in res["torch"].items():
            lines.append(
                f"{wid:<10}{'torch ' + name:<26}{1e3 * r['first_batch_s']:>16.1f}"
                f"{r['batches_per_s']:>12.1f}{r['gb_per_s']:>8.2f}{'':>8}"
            )
        for name, r in res["batchferry"].items():
            lines.append(
                f"{wid:<10}{'batchferry ' + name:<26}{1e3 * r['first_batch_s']:>16.1f}"
                f"{r['batches_per_s']:>12.1f}{r['gb_per_s']:>8.2f}{res['ratios'][name]:>7.2f}x"
            )
    for wid, res in report["workloads"].items():
        if "in_process" in res:
            p = res["in_process"]
            lines.append(
                f"{wid}: one batch built in-process: {p['batchferry_gather_us']:.0f} us from the offsets, "
                f"{p['torch_fetch_collate_us']:.0f} us torch fetch + collate ({p['ratio']:.2f}x)"
            )
    if "ceiling" in report:
        c = report["ceiling"]
        lines.append(
            f"raw gRPC-Python ceiling, {c['message_bytes'] >> 20} MiB messages: {c['gb_per_s']:.2f} GB/s"
        )
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for wid, res in report["workloads"].items():
        for transport, ratio in res["ratios"].items():
            labels.append(f"{wid}\n{transport}")
            values.append(ratio)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 3.5))
    bars = ax.bar(labels, values, color="#3b7dd8")
    ax.bar_label(bars, fmt="%.2fx")
    ax.axhline(1.0, color="#888", linestyle="--", linewidth=1)
    ax.set_ylim(0, max([*values, 1.0]) * 1.15)
    ax.set_ylabel("x torch DataLoader (best num_workers)")
    ax.set_title(f"batchferry vs torch DataLoader, {report['machine']['cpus']} CPUs, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(ids: list[str], *, out: Path, reps: int = 3, num_workers: int = 2,
         scale: float = 1.0, no_ceiling: bool = False) -> dict[str, Any]:  # fmt: skip
    os.environ[DATA_ENV] = str(data_dir())
    os.environ[SCALE_ENV] = str(scale)
    unknown = [i for i in ids if i not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {sorted(WORKLOADS)}")
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "command": "batchferry bench " + " ".join(ids) + f" --reps {reps}",
        "machine": machine(),
        "workloads": {},
    }
    total = len(ids) * reps * (len({0, num_workers}) + len(TRANSPORTS))
    with tqdm(total=total, desc="bench", file=sys.stderr, dynamic_ncols=True) as bar:
        for wid in ids:
            report["workloads"][wid] = run_workload(WORKLOADS[wid], reps, num_workers, bar)
    if not no_ceiling:
        report["ceiling"] = ceiling.measure(message_bytes=4 << 20, total_bytes=int(2e9 * min(scale, 1.0)))
    print(render(report))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report['date']}-{platform.node() or 'machine'}-{'-'.join(ids)}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(report, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")
    return report
