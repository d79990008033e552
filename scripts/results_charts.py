"""Draw the performance page's charts from the results files in docs/results.

``python3 scripts/results_charts.py [FILE.json ...]`` (needs the bench extra's matplotlib;
no names: every chart); the harness draws its own (``batchferry bench W1 ...`` writes a
PNG beside its JSON), this covers the other benchmarks, so each chart comes from the
file the page cites.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
PEERS = ("torch", "webdataset", "litdata")  # grey bars; batchferry's are blue


def _bars(path: Path, title: str, ylabel: str, bars: dict[str, float], fmt: str = "%.2f") -> None:
    fig, ax = plt.subplots(figsize=(1.3 * len(bars) + 2, 3.4))
    drawn = ax.bar(
        list(bars),
        list(bars.values()),
        color=["#888" if any(p in k for p in PEERS) else "#3b7dd8" for k in bars],
    )
    ax.bar_label(drawn, fmt=fmt)
    ax.set_ylim(0, max(bars.values()) * 1.18)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def w5(r: dict[str, Any]) -> tuple[str, str, dict[str, float]]:
    m = r["medians"]
    bars = {
        "4 torch loaders": m["torch"]["samples_per_s"],
        "shared mode": m["batchferry shared"]["samples_per_s"],
    }
    return "W5: 4 trainers on W2, aggregate", "samples/s", bars


def g1(r: dict[str, Any]) -> tuple[str, str, dict[str, float]]:
    bars = {f"torch\n{k}": v["samples_per_s"] for k, v in r["torch"].items()}
    bars |= {
        k.replace(" num_workers=8", "").replace(" ", "\n"): v["samples_per_s"]
        for k, v in r["batchferry"].items()
    }
    return f"G1: W2 to an {r['machine']['cuda']} under a 6 ms step", "samples/s to the GPU", bars


def g2(r: dict[str, Any]) -> tuple[str, str, dict[str, float]]:
    bars = {"torch\n2 workers": r["torch"]["num_workers=2"]["samples_per_s"]}
    bars |= {k: v["samples_per_s"] for k, v in r["batchferry"].items()}
    return "G2: W3 to a trainer on 2 cores", "samples/s", bars


def byte_stream(r: dict[str, Any]) -> tuple[str, str, dict[str, float]]:
    bars = {k.replace("streams=", "") + " streams": v for k, v in r["batchferry"].items()}
    bars |= {"ceiling\n" + k.replace("streams=", "") + " conn.": v for k, v in r["ceiling"].items()}
    return f"BYTES: W2 over the byte stream, {r['machine']['cpus']} cores", "GB/s", bars


def net(r: dict[str, Any]) -> tuple[str, str, dict[str, float]]:
    bars: dict[str, float] = {}
    for link, res in r["links"].items():
        bars[f"{link}\nraw TCP"] = res["raw_tcp_gb_per_s"]
        bars[f"{link}\nbyte stream"] = res["byte_stream"]["gb_per_s"]
    return "NET: W2 to a client on another network host", "GB/s", bars


def netz(r: dict[str, Any]) -> tuple[str, str, dict[str, float]]:
    bars = {
        f"{link.replace('tbf ', '')}\n{name}": value
        for link, res in r["links"].items()
        for name, value in res["gb_per_s"].items()
    }
    return "NETZ: to another host, with and without lz4", "GB/s delivered", bars


def iterable(r: dict[str, Any]) -> tuple[str, str, dict[str, float]]:
    bars = {f"torch\n{k}": v["batches_per_s"] for k, v in r["torch"].items()}
    bars |= {f"batchferry\n{k}": v["batches_per_s"] for k, v in r["batchferry"].items()}
    return "ITER: W1's rows as an IterableDataset", "batches/s", bars


def s3_images(r: dict[str, Any]) -> tuple[str, str, dict[str, float]]:
    loaders = r["workloads"]["S3-images"]["loaders"]
    bars = {
        f"{name}\n{when}": res[f"{key}_samples_per_s"]
        for name, res in loaders.items()
        if "error" not in res
        for when, key in (("start+1", "cold"), ("epoch 1", "cold_epoch"), ("warm", "warm"))
    }
    return "S3: image shards, start-up + epoch 1, epoch 1 (cold cache), warm", "samples/s", bars


CHARTS: dict[str, Callable[[dict[str, Any]], tuple[str, str, dict[str, float]]]] = {
    "2026-11-27-W5.json": w5,
    "2026-11-27-G1-NVIDIA_H200-final.json": g1,
    "2026-11-27-G2-16cpu-cuda-H200-final.json": g2,
    "2026-11-27-BYTES-16cpu.json": byte_stream,
    "2026-11-27-NET.json": net,
    "2026-11-27-NETZ-groups.json": netz,
    "2026-12-07-ITER.json": iterable,
    "2026-12-07-S3.json": s3_images,
}


def main(names: list[str]) -> None:
    """Draw the charts of ``names`` (results file names), or every chart."""
    for name, extract in CHARTS.items():
        if names and name not in names:
            continue
        title, ylabel, bars = extract(json.loads((RESULTS / name).read_text()))
        _bars(
            (RESULTS / name).with_suffix(".png"),
            title,
            ylabel,
            bars,
            "%.0f" if max(bars.values()) > 100 else "%.2f",
        )


if __name__ == "__main__":
    main(sys.argv[1:])
