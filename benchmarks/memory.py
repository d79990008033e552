"""Memory stays bounded: client RSS and server shared memory over many batches.

``batchferry bench MEM``: 10,000 W1 batches and 300 W2 batches (38.5 MB each) on
the same-host transport, sampling the client's RSS and the server's /dev/shm
bytes as they go. The stated bounds: client growth <= prefetch x batch bytes +
100 MB; server shared memory = the configured ring, flat.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from pathlib import Path
from typing import Any

import psutil

from batchferry import shm
from batchferry.client import DataLoader

from .harness import machine, save_report, served
from .workloads import WORKLOADS


def _server_shm_bytes(pid: int) -> int:
    total = 0
    for name in shm.owned_by(pid):
        with contextlib.suppress(FileNotFoundError):
            total += (shm.SHM_DIR / name).stat().st_size
    return total


def track(wid: str, batches: int, transport: str, prefetch: int = 4, every: int = 50) -> dict[str, Any]:
    workload = WORKLOADS[wid]
    me = psutil.Process()
    with served(workload, 2) as address:
        server = next(p for p in me.children() if "serve" in " ".join(p.cmdline()))
        samples: list[tuple[int, int, int]] = []
        with DataLoader(address, wid, workload.batch_size, shuffle=True, seed=0, transport=transport,
                        prefetch_factor=prefetch) as loader:  # fmt: skip
            seen, batch_bytes = 0, 0
            while seen < batches:
                for batch in loader:
                    batch_bytes = max(batch_bytes, sum(t.nbytes for t in batch))
                    del batch
                    seen += 1
                    if seen % every == 0:
                        samples.append((seen, me.memory_info().rss, _server_shm_bytes(server.pid)))
                    if seen >= batches:
                        break
    warm = samples[len(samples) // 10]  # after the pools and slots have filled
    rss = [s[1] for s in samples[len(samples) // 10 :]]
    shm_bytes = [s[2] for s in samples[len(samples) // 10 :]]
    bound = prefetch * batch_bytes + 100_000_000
    return {
        "workload": wid,
        "transport": transport,
        "batches": batches,
        "batch_bytes": batch_bytes,
        "client_rss_growth_after_warmup": max(rss) - warm[1],
        "client_rss_bound": bound,
        "server_shm_min": min(shm_bytes),
        "server_shm_max": max(shm_bytes),
        "within_bound": max(rss) - warm[1] <= bound and max(shm_bytes) == min(shm_bytes),
        "samples": samples,
    }


def main(*, out: Path) -> dict[str, Any]:
    runs = [
        track("W1", 10_000, "shm", every=500),
        track("W1", 10_000, "grpc", every=500),
        track("W2", 300, "shm", every=25),
    ]
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "command": "batchferry bench MEM",
        "machine": machine(),
        "runs": runs,
    }
    for r in runs:
        print(
            f"{r['workload']} {r['transport']:>4} {r['batches']:>6} batches: client RSS +"
            f"{r['client_rss_growth_after_warmup'] / 1e6:.1f} MB after warm-up (bound "
            f"{r['client_rss_bound'] / 1e6:.0f} MB); server shm {r['server_shm_min'] / 1e6:.1f}-"
            f"{r['server_shm_max'] / 1e6:.1f} MB; {'OK' if r['within_bound'] else 'OVER'}"
        )
    save_report(report, out, "MEM")
    return report
