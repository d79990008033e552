"""NET: W2 over the byte stream to a client on another host, against the link and raw TCP.

``batchferry bench NET [--reps 3] [--link-rates 0,25,10]`` makes two hosts of their
own (network namespaces joined by a veth pair, each process with its own
``/dev/shm``: see :mod:`.netns`), runs ``batchferry serve`` with W2 on one, and from
the other, for each link setting (0: the bare veth; N: ``tc tbf`` at N Gbit/s on
the server's side), interleaving the repetitions:

* raw TCP: one connection, the most bytes a Python process moves over that link
  (:mod:`.rawtcp`); and once per repetition, before the links, raw TCP within the
  server's host (loopback), which no link limits;
* the raw gRPC-Python ceiling: a server streaming prebuilt 4 MiB messages
  (:mod:`.ceiling`);
* W2 (batch 256, 38.5 MB) read by a ``DataLoader`` on the client host, which takes
  the byte stream there since it cannot see the server's shared memory: the time
  to the first batch, then the rate over 90 more (about 3 epochs, 3.5 GB).

``batchferry bench NETZ [--link-rates 10]`` (:func:`compression_main`) serves W2 and
W4T (W4's int64 tokens, ``pad``) the same way and reads each over every link with
``compression=None`` and ``"lz4"``, interleaved: GB/s of payload delivered (what the
trainer receives, uncompressed), medians of the repetitions.

NET reports medians and the byte stream as a fraction of the link rate, of raw TCP
over the same link and of loopback TCP, all measured in the same run (payload
bytes only: TCP/IP headers take about 3% of a link), and writes
``OUT/<date>-NET.json``. Where hosts cannot be made (not root, no
``ip``), it says why and measures nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import select
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from batchferry.client import DataLoader

from . import ceiling, rawtcp
from .harness import machine, measure, save_report
from .netns import Hosts, sigterm_unwinds, unavailable
from .workloads import DATA_ENV, SCALE_ENV, WORKLOADS, Workload, data_dir

__all__ = ["DEFAULT_RATES", "compression_main", "main"]

DEFAULT_RATES = (0.0, 25.0, 10.0)  # Gbit/s; 0: the veth as it is
W2 = WORKLOADS["W2"]
W4T = WORKLOADS["W4T"]


ANSWER_TIMEOUT_S = 600


def _readline(proc: subprocess.Popen[str], what: str, timeout: float = ANSWER_TIMEOUT_S) -> str:
    """A line from ``proc`` (which writes whole lines and flushes), or TimeoutError."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"{what}: nothing within {timeout:g} s")
    return proc.stdout.readline()


class _ClientHost:
    """The client host's process: measures what it is asked, one JSON line per answer."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = _readline(self.proc, f"the client host, {command['op']}")
        if not line:
            raise RuntimeError(f"the client host's process ended (exit {self.proc.wait(timeout=30)})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"client host, {command['op']}: {answer['error']}")
        return answer


def _epochs(loader: DataLoader) -> Iterator[Any]:
    """Batch after batch, epoch after epoch (W2 has 32 batches an epoch: too few to time alone)."""
    while True:
        yield from loader


def _client_host() -> None:
    """Run in the client namespace: answer commands from stdin until it closes."""
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "tcp":
                answer = rawtcp.receive(cmd["host"], cmd["port"], cmd["seconds"])
            elif cmd["op"] == "grpc":
                answer = ceiling.read(cmd["address"], 4 << 20, cmd["total_bytes"])
            else:
                with DataLoader(
                    cmd["address"], cmd.get("dataset", "W2"), cmd.get("batch_size", W2.batch_size),
                    shuffle=True, seed=cmd["seed"], timeout=60, collate_fn=cmd.get("collate", "default"),
                    compression=cmd.get("compression"),
                ) as loader:  # fmt: skip
                    answer = {
                        "transport": loader.transport,
                        **asdict(measure(lambda: _epochs(loader), cmd["batches"])),
                    }
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


def _banner_port(proc: subprocess.Popen[str], what: str) -> str:
    line = _readline(proc, what, timeout=120)
    if not line.strip():
        raise RuntimeError(f"{what} did not start (exit {proc.poll()})")
    return line.strip()


def _serve(hosts: Hosts, ns: str, ip: str, specs: dict[str, str], num_workers: int) -> str:
    """``batchferry serve`` of ``specs`` in ``ns`` on ``ip``; its address once it serves."""
    datasets = [arg for name, spec in specs.items() for arg in ("--dataset", f"{name}={spec}")]
    serve = hosts.run(
        ns, "-m", "batchferry.cli", "--log-level", "ERROR", "serve", *datasets,
        "--host", ip, "--port", "0", "--num-workers", str(num_workers),
    )  # fmt: skip
    banner = _banner_port(serve, "batchferry serve")
    if "serving" not in banner:
        raise RuntimeError(f"batchferry serve did not start: {banner!r}")
    return banner.split(" on ", 1)[1].split()[0]


def _link_name(rate: float) -> str:
    return "veth" if not rate else f"tbf {rate:g} Gbit/s"


def _prepare(name: str, scale: float, *workloads: Workload) -> str | None:
    """Why ``name`` cannot run here (printed), or None once the workloads' files are made,
    before any host reads them."""
    reason = unavailable()
    if reason is not None:
        print(f"{name} skipped: {reason}", file=sys.stderr)
        return reason
    os.environ[DATA_ENV] = str(data_dir())
    os.environ[SCALE_ENV] = str(scale)
    for workload in workloads:
        workload.factory()
    return None


def main(
    *,
    reps: int = 3,
    num_workers: int = 2,
    out: Path,
    scale: float = 1.0,
    link_rates: tuple[float, ...] = DEFAULT_RATES,
    tcp_seconds: float = 3.0,
) -> dict[str, Any]:
    """Measure NET; returns the report (``{"skipped": reason}`` where hosts cannot be made)."""
    reason = _prepare("NET", scale, W2)
    if reason is not None:
        return {"skipped": reason}
    batches = max(2, int(90 * min(scale, 1.0)))  # 3.5 GB, about 3 epochs
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "command": f"batchferry bench NET --reps {reps} --link-rates "
        + ",".join(f"{r:g}" for r in link_rates),
        "machine": machine(),
        "workload": "W2 (batch 256, 38.5 MB) over the byte stream to a client in its own network "
        "namespace and /dev/shm, joined to the server's by a veth pair",
        "batches_measured": batches,
        "links": {},
    }
    with sigterm_unwinds(), Hosts() as hosts:
        server_ns, client_ns = hosts.host("server"), hosts.host("client")
        (server_dev, server_ip), _ = hosts.link(server_ns, client_ns)
        address = _serve(hosts, server_ns, server_ip, {"W2": W2.spec}, num_workers)
        tcp = hosts.run(
            server_ns, "-m", "batchferry.benchmarks.rawtcp", "send", server_ip, stdin=subprocess.PIPE
        )
        tcp_port = int(_banner_port(tcp, "the raw TCP sender"))
        grpc = hosts.run(
            server_ns, "-m", "batchferry.benchmarks.ceiling", "--serve", server_ip, stdin=subprocess.PIPE
        )
        grpc_address = f"{server_ip}:{_banner_port(grpc, 'the gRPC ceiling server')}"
        client = _ClientHost(
            hosts.run(
                client_ns, "-m", "batchferry.benchmarks.network", "--client-host", stdin=subprocess.PIPE
            )
        )
        grpc_bytes = int(min(1.0, scale) * 1.5e9)
        loopback = []
        for _ in range(reps):
            receiver = hosts.run(
                server_ns, "-m", "batchferry.benchmarks.rawtcp", "receive", server_ip, str(tcp_port),
                str(tcp_seconds),
            )  # fmt: skip
            loopback.append(json.loads(_readline(receiver, "the loopback TCP receiver")))
            receiver.wait(timeout=30)
        report["loopback_tcp_gb_per_s"] = statistics.median(r["gb_per_s"] for r in loopback)
        for rate in link_rates:
            name = _link_name(rate)
            print(f"NET: {name}", file=sys.stderr, flush=True)
            hosts.shape(server_ns, server_dev, rate * 1e9 if rate else None)
            runs: dict[str, list[Any]] = {"tcp": [], "grpc": [], "w2": []}
            for rep in range(reps):
                runs["tcp"].append(client.ask(op="tcp", host=server_ip, port=tcp_port, seconds=tcp_seconds))
                runs["grpc"].append(client.ask(op="grpc", address=grpc_address, total_bytes=grpc_bytes))
                runs["w2"].append(client.ask(op="w2", address=address, seed=rep, batches=batches))
            report["links"][name] = _summary(rate, runs, report["loopback_tcp_gb_per_s"])
        hosts.shape(server_ns, server_dev, None)
    report["targets"] = {
        "tbf 10 Gbit/s": "byte stream >= 0.9x the link rate",
        "veth": "byte stream >= 0.8x raw TCP",
    }
    print(render(report))
    save_report(report, out, "NET")
    return report


def compression_main(
    *,
    reps: int = 3,
    num_workers: int = 2,
    out: Path,
    scale: float = 1.0,
    link_rates: tuple[float, ...] = (10.0,),
) -> dict[str, Any]:
    """NETZ: W2 and W4T to another host with and without lz4; ``{"skipped": reason}`` where
    hosts cannot be made."""
    reason = _prepare("NETZ", scale, W2, W4T)
    if reason is not None:
        return {"skipped": reason}
    workloads = {
        "W2": {"dataset": "W2", "batch_size": W2.batch_size, "batches": max(2, int(90 * min(scale, 1.0)))},
        "W4T": {"dataset": "W4T", "batch_size": W4T.batch_size, "collate": "pad", "batches": 600},
    }
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "command": f"batchferry bench NETZ --reps {reps} --scale {scale:g} "
        f"--link-rates {','.join(f'{r:g}' for r in link_rates)}",
        "machine": machine(),
        "workload": "W2 (batch 256, uint8 images) and W4T (batch 64, int64 tokens, pad) over the byte "
        "stream to a client in its own network namespace, compression None and lz4",
        "links": {},
    }
    with sigterm_unwinds(), Hosts() as hosts:
        server_ns, client_ns = hosts.host("server"), hosts.host("client")
        (server_dev, server_ip), _ = hosts.link(server_ns, client_ns)
        address = _serve(hosts, server_ns, server_ip, {"W2": W2.spec, "W4T": W4T.spec}, num_workers)
        client = _ClientHost(
            hosts.run(
                client_ns, "-m", "batchferry.benchmarks.network", "--client-host", stdin=subprocess.PIPE
            )
        )
        for rate in link_rates:
            name = _link_name(rate)
            print(f"NETZ: {name}", file=sys.stderr, flush=True)
            hosts.shape(server_ns, server_dev, rate * 1e9 if rate else None)
            runs: dict[str, list[Any]] = {}
            for rep in range(reps):
                for wl, settings in workloads.items():
                    for codec in (None, "lz4"):
                        answer = client.ask(
                            op="load", address=address, seed=rep, compression=codec, **settings
                        )
                        runs.setdefault(f"{wl} {codec or 'none'}", []).append(answer)
            report["links"][name] = {
                "link_gb_per_s": rate / 8 if rate else None,
                "gb_per_s": {k: statistics.median(r["gb_per_s"] for r in v) for k, v in runs.items()},
                "batches_per_s": {
                    k: statistics.median(r["batches_per_s"] for r in v) for k, v in runs.items()
                },
                "runs": runs,
            }
        hosts.shape(server_ns, server_dev, None)
    for name, link in report["links"].items():
        print(f"NETZ {name}: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in link["gb_per_s"].items()))
    save_report(report, out, "NETZ")
    return report


def _summary(rate: float, runs: dict[str, list[Any]], loopback_tcp: float) -> dict[str, Any]:
    transports = {r["transport"] for r in runs["w2"]}
    if transports != {"grpc"}:
        raise RuntimeError(f"the client host read over {transports}, not the byte stream alone")
    tcp = statistics.median(r["gb_per_s"] for r in runs["tcp"])
    grpc = statistics.median(r["gb_per_s"] for r in runs["grpc"])
    w2 = {
        k: statistics.median(r[k] for r in runs["w2"]) for k in ("first_batch_s", "batches_per_s", "gb_per_s")
    }
    link = rate / 8 if rate else None  # GB/s
    return {
        "link_gb_per_s": link,
        "raw_tcp_gb_per_s": tcp,
        "grpc_ceiling_gb_per_s": grpc,
        "byte_stream": w2,
        "of_link": w2["gb_per_s"] / link if link else None,
        "of_raw_tcp": w2["gb_per_s"] / tcp,
        "of_loopback_tcp": w2["gb_per_s"] / loopback_tcp,
        "of_grpc_ceiling": w2["gb_per_s"] / grpc,
        "runs": runs,
    }


def render(report: dict[str, Any]) -> str:
    head = (
        f"{'link':<16}{'link GB/s':>10}{'raw TCP':>9}{'gRPC 4MiB':>11}{'W2 stream':>11}"
        f"{'x link':>8}{'x TCP':>7}{'x lo TCP':>10}{'x gRPC':>8}{'first ms':>10}"
    )
    lines = [
        f"NET: {report['workload']} (GB/s, medians of the repetitions)",
        f"loopback TCP in the server's host: {report['loopback_tcp_gb_per_s']:.2f} GB/s",
        head,
    ]
    for name, r in report["links"].items():
        link = f"{r['link_gb_per_s']:.2f}" if r["link_gb_per_s"] else "-"
        of_link = f"{r['of_link']:.2f}" if r["of_link"] else "-"
        lines.append(
            f"{name:<16}{link:>10}{r['raw_tcp_gb_per_s']:>9.2f}{r['grpc_ceiling_gb_per_s']:>11.2f}"
            f"{r['byte_stream']['gb_per_s']:>11.2f}{of_link:>8}{r['of_raw_tcp']:>7.2f}"
            f"{r['of_loopback_tcp']:>10.2f}{r['of_grpc_ceiling']:>8.2f}"
            f"{1e3 * r['byte_stream']['first_batch_s']:>10.1f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # the client host's process, started by main()
    if sys.argv[1:] != ["--client-host"]:
        sys.exit("this module runs as `batchferry bench NET`")
    _client_host()
