"""CPU time per batch in each process of a served workload: the loader's, the server's, its workers'.

Where the time goes once a path is CPU-bound: on two cores, the rate is about
2 / (the sum of these). Steady state only: the first 50 batches (or what the epoch has
left beyond ``--batches``) are not counted.

``batchferry bench CPU --workload W4T --transport shm [--batches 1400] [--server-flags "--group-bytes 0"]``;
``batchferry bench CPU --workload W2 --transport grpc --batches 80 --receive-processes`` adds the
receiver processes' share; ``--compression lz4`` sets the loader's ``compression=``.
"""

from __future__ import annotations

import shlex
import time

import psutil

from batchferry.client import DataLoader

from .harness import served
from .workloads import WORKLOADS

_WARM = 50


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def measure(
    workload: str,
    transport: str,
    batches: int,
    server_flags: list[str],
    receivers: bool = False,
    compression: str | None = None,
) -> dict[str, float]:
    """Batches/s and CPU microseconds per batch by process (``workers`` and ``receivers`` summed)."""
    w = WORKLOADS[workload]
    with served(w, 2, extra=server_flags) as address:
        server = next(p for p in psutil.Process().children() if "serve" in " ".join(p.cmdline()))
        with DataLoader(
            address, workload, w.batch_size, shuffle=True, transport=transport, collate_fn=w.collate,
            receive_processes=receivers, compression=compression,
        ) as dl:  # fmt: skip
            if batches >= len(dl):
                raise SystemExit(f"--batches {batches}: an epoch of {workload} has only {len(dl)}")
            it = iter(dl)
            for _ in range(min(_WARM, len(dl) - batches)):  # W2's epochs are short
                next(it)
            others = server.children(recursive=True)
            me = psutil.Process()
            relays = [p for p in me.children() if "batchferry.relay.child" in p.cmdline()]
            before = [_cpu(p) for p in (me, server, *others, *relays)]
            start = time.perf_counter()
            for _ in range(batches):
                next(it)
            wall = time.perf_counter() - start
            after = [_cpu(p) for p in (me, server, *others, *relays)]
    used = [1e6 * (b - a) / batches for a, b in zip(before, after, strict=True)]
    return {
        "batches_per_s": batches / wall,
        "client_us": used[0],
        "server_us": used[1],
        "workers_us": sum(used[2 : 2 + len(others)]),
        "receivers_us": sum(used[2 + len(others) :]),
    }


def main(
    *,
    workload: str | None = None,
    transport: str | None = None,
    batches: int = 1400,
    server_flags: str = "",
    receive_processes: bool = False,
    compression: str | None = None,
) -> dict[str, float]:
    """Measure and print one workload over one transport (``batchferry bench CPU``)."""
    if workload not in WORKLOADS or transport not in ("grpc", "shm"):
        raise ValueError(
            f"CPU needs --workload (one of {sorted(WORKLOADS)}) and --transport (grpc or shm), "
            f"got {workload!r} and {transport!r}"
        )
    r = measure(workload, transport, batches, shlex.split(server_flags), receive_processes, compression)
    relayed = f", receivers {r['receivers_us']:.0f}" if receive_processes else ""
    print(
        f"{workload} {transport}: {r['batches_per_s']:,.0f} batches/s; CPU us per batch: "
        f"loader {r['client_us']:.0f}, server {r['server_us']:.0f}, workers {r['workers_us']:.0f}{relayed}"
    )
    return r
