"""The metrics moving during a W2 run: two scrapes of a served W2, ``seconds`` apart.

Beside them run a striped byte-stream loader, a same-host loader and a sharded job
whose rank 1 reads five times slower than rank 0 (so its lag grows).

``batchferry bench SCRAPE [--seconds 4] [--port 19124]``
"""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from batchferry.client import DataLoader

from .harness import served
from .workloads import WORKLOADS

_KEEP = ("transport", "state", "job", "rank", "grpc_code")
SERIES = (
    "batchferry_batches_built_total",
    "batchferry_batches_sent_total{transport=grpc}",
    "batchferry_batches_sent_total{transport=shm}",
    "batchferry_sent_bytes_total{transport=grpc}",
    "batchferry_batch_send_seconds_count{transport=grpc}",
    "batchferry_job_consumer_lag_batches{job=train,rank=0}",
    "batchferry_job_consumer_lag_batches{job=train,rank=1}",
    "batchferry_job_batches_built_total{job=train}",
    "batchferry_ring_bytes{state=leased}",
    "batchferry_streams_open",
    "batchferry_grpc_handled_total{grpc_code=OK}",
)


def scrape(port: int) -> dict[str, float]:
    """batchferry's series summed over the labels not in ``_KEEP``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith("batchferry_"):
                continue
            kept = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k in _KEEP)
            key = f"{s.name}{{{kept}}}" if kept else s.name
            out[key] = out.get(key, 0.0) + s.value
    return out


def main(*, seconds: float = 4.0, port: int = 19124) -> tuple[dict[str, float], dict[str, float]]:
    stop = threading.Event()

    def reader(address: str, transport: str) -> None:
        with DataLoader(address, "W2", 256, shuffle=True, transport=transport) as loader:
            while not stop.is_set():
                for _ in loader:
                    time.sleep(0.005)
                    if stop.is_set():
                        break

    def rank(address: str, r: int) -> None:
        with DataLoader(address, "W2", 64, mode="sharded", job="train", rank=r, world_size=2) as loader:
            while not stop.is_set():
                for _ in loader:
                    time.sleep(0.01 if r == 0 else 0.05)
                    if stop.is_set():
                        break

    with served(WORKLOADS["W2"], 2, ["--metrics-port", str(port)]) as address:
        loops: list[tuple[Any, tuple[Any, ...]]] = [
            (reader, (address, "grpc")),
            (reader, (address, "shm")),
            (rank, (address, 0)),
            (rank, (address, 1)),
        ]
        threads = [threading.Thread(target=f, args=a) for f, a in loops]
        for t in threads:
            t.start()
        try:
            time.sleep(seconds)
            first = scrape(port)
            time.sleep(seconds)
            then = scrape(port)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    for key in SERIES:
        print(f"{key:64s} {first.get(key, float('nan')):>16,.0f} {then.get(key, float('nan')):>16,.0f}")
    return first, then
