"""Every benchmark ``batchferry bench`` runs: its name, what it measures, the function that
runs it and the options it takes, each option declared once in :data:`OPTIONS`.

A benchmark is a function in a module of ``batchferry.benchmarks`` taking keyword
arguments named as its options (and ``out``, the results folder, when it writes one);
it leaves its own defaults in its signature, so an option the user does not give is
not passed. Adding one is one :data:`BENCHES` entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHES",
    "DEFAULT_OUT",
    "HARNESS_OPTIONS",
    "OPTIONS",
    "Bench",
    "Option",
    "benches",
    "run",
    "takers",
]

# Results go to the caller's working directory, never into the installed package.
DEFAULT_OUT = Path("bench-results")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--link-rates: comma-separated Gbit/s, got {text!r}") from None


@dataclass(frozen=True)
class Option:
    """One command-line option; ``batchferry bench --NAME`` (underscores as dashes)."""

    help: str
    type: Callable[[str], Any] | None = None  # None: a switch (store_true)
    metavar: str | None = None


OPTIONS: dict[str, Option] = {
    "reps": Option("repetitions; medians are reported", int),
    "num_workers": Option("server worker processes", int),
    "scale": Option("shrink the datasets (smoke runs)", float),
    "no_ceiling": Option("skip the raw gRPC-Python ceiling"),
    "replicas": Option("server replicas", int),
    "link_rates": Option("link settings in Gbit/s, 0 for the bare veth", _floats, "R,R,..."),
    "device": Option("the device batches go to (e.g. cpu for a smoke run)", str),
    "workload": Option("the workload measured", str),
    "transport": Option("grpc or shm", str),
    "batches": Option("batches measured (within one epoch)", int),
    "server_flags": Option("more `batchferry serve` flags", str, "FLAGS"),
    "receive_processes": Option("the loader's receive_processes=True"),
    "compression": Option("the loader's compression= (byte stream)", str),
    "streams": Option("byte-stream connections of the loader (streams=)", int),
    "seconds": Option("seconds measured", float),
    "port": Option("the metrics port", int),
    "chunk_kib": Option("chunk size in KiB", int),
    "images": Option("images per image payload", int),
    "repeats": Option("timed repetitions per codec", int),
}


@dataclass(frozen=True)
class Bench:
    """``run`` is ``module:function`` within ``batchferry.benchmarks``, imported when it runs."""

    summary: str
    run: str
    options: tuple[str, ...] = ()
    writes: bool = True  # takes ``out=``, the results folder
    together: bool = False  # one call for every requested name, as ``ids=[...]`` (the harness)


HARNESS_OPTIONS = ("reps", "num_workers", "scale", "no_ceiling")

BENCHES: dict[str, Bench] = {
    "W5": Bench("several trainers in shared mode against separate torch loaders", "multi:main",
                ("reps", "num_workers")),
    "SCALE": Bench("one loader over replicas against one server", "replicas:main",
                   ("reps", "num_workers", "replicas", "scale")),
    "MEM": Bench("client memory and the ring over many batches", "memory:main"),
    "HOSTILE": Bench("shared-memory budget and a bystander under hostile clients", "hostile:main", ("reps",)),
    "BYTES": Bench("the byte stream by stripe count against the raw ceiling", "bytestream:main",
                   ("reps", "num_workers")),
    "NET": Bench("a client on another network host (needs root)", "network:main",
                 ("reps", "num_workers", "scale", "link_rates")),
    "NETZ": Bench("W2 and W4T to another host with and without compression (needs root)",
                  "network:compression_main", ("reps", "num_workers", "scale", "link_rates")),
    "ITER": Bench("an IterableDataset against torch's DataLoader over it", "iterable:main",
                  ("reps", "num_workers")),
    "S3": Bench("shards from a local S3 server against webdataset, LitData and torch + fsspec",
                "streaming:main"),
    "G1": Bench("batches to a GPU under a training step (needs CUDA)", "gpu:main"),
    "G2": Bench("a trainer on 2 cores fed by a server on the others (needs CUDA)", "offload:main",
                ("device",)),
    "CODECS": Bench("compression codecs per chunk: speed and ratio", "codecs:main",
                    ("repeats", "images", "chunk_kib")),
    "CPU": Bench("CPU time per batch of loader, server, workers and receivers", "cpu:main",
                 ("workload", "transport", "batches", "server_flags", "receive_processes", "compression"),
                 writes=False),
    "PROFILE": Bench("where the interpreter lock goes on the byte stream (py-spy)", "profile:main",
                     ("streams", "seconds", "num_workers", "receive_processes")),
    "SCRAPE": Bench("the metrics endpoint while loaders read", "scrape:main", ("seconds", "port"),
                    writes=False),
}  # fmt: skip


def benches() -> dict[str, Bench]:
    """:data:`BENCHES` and the harness's workloads (W1, W2, ...: batchferry against torch's
    DataLoader), which run together in one report."""
    from .workloads import WORKLOADS  # noqa: PLC0415 (pyarrow, Pillow: only when a benchmark runs)

    harness = {
        wid: Bench(w.title, "harness:main", HARNESS_OPTIONS, together=True) for wid, w in WORKLOADS.items()
    }
    return {**harness, **BENCHES}


def _function(bench: Bench) -> Callable[..., Any]:
    module, name = bench.run.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)  # type: ignore[no-any-return]


def takers(option: str) -> list[str]:
    """What takes ``option``: the workloads (the harness), and other benchmarks by name."""
    named = sorted(n for n, b in BENCHES.items() if option in b.options)
    return (["the workloads"] if option in HARNESS_OPTIONS else []) + named


def run(names: Sequence[str], given: Mapping[str, Any], out: Path) -> None:
    """Run the benchmarks ``names`` in order with the options the user ``given`` (None: not
    given); ``ValueError`` names an unknown benchmark or an option none of them takes."""
    known = benches()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {sorted(known)}")
    chosen = [known[n] for n in dict.fromkeys(names)]
    for option, value in given.items():
        if value is not None and value is not False and not any(option in b.options for b in chosen):
            raise ValueError(f"--{option.replace('_', '-')} applies to {', '.join(takers(option))} only")
    done: set[str] = set()
    for name in dict.fromkeys(names):
        bench = known[name]
        if bench.run in done:
            continue
        kwargs = {o: given[o] for o in bench.options if given.get(o) not in (None, False)}
        if bench.writes:
            kwargs["out"] = out
        if bench.together:
            done.add(bench.run)
            kwargs["ids"] = [n for n in dict.fromkeys(names) if known[n].run == bench.run]
        _function(bench)(**kwargs)
