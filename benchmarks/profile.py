"""Where the byte stream's time goes, on both sides: W2 from one server to one loader.

Reports GB/s, each side's CPU seconds per GB moved, and (with py-spy on PATH) the
share of wall time each process holds the interpreter lock, with the frames that
hold it most. A process whose lock share nears 1 is bound by its interpreter.

With ``--receive-processes`` the loader receives through receiver processes, and the
first of them is profiled too (``receiver_gil``, ``receivers_cpu_s_per_gb``).

``batchferry bench PROFILE [--streams 4] [--seconds 8] [--num-workers 8]
[--receive-processes]``; the loader runs as ``python -m batchferry.benchmarks.profile
ADDRESS STREAMS SECONDS [--receive-processes]``, a process of its own to profile.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from batchferry.client import DataLoader

from .harness import machine, save_report, served
from .workloads import DATA_ENV, WORKLOADS, data_dir

_RATE = 250  # py-spy samples per second


def _client(address: str, streams: int, seconds: float, receivers: bool) -> None:
    nbytes, start = 0, time.perf_counter()
    with DataLoader(
        address, "W2", 256, shuffle=True, transport="grpc", streams=streams, receive_processes=receivers
    ) as loader:
        while time.perf_counter() - start < seconds:
            for x, _y in loader:
                nbytes += x.numel()
                if time.perf_counter() - start >= seconds:
                    break
    elapsed = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the receivers, ended with the loader
    print(json.dumps({"gb": nbytes / 1e9, "seconds": elapsed, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "children_cpu_s": kids.ru_utime + kids.ru_stime}))  # fmt: skip


def _gil(pid: int, seconds: float) -> dict[str, Any] | None:
    """py-spy's samples of ``pid`` holding the GIL: the share of wall time, top frames."""
    spy = shutil.which("py-spy")
    if spy is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
        cmd = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(_RATE), "--gil",
               "-f", "raw", "-o", raw.name, "--nonblocking"]  # fmt: skip
        run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=seconds + 30)
        if run.returncode != 0:
            return {"error": run.stderr.strip()[-300:]}
        leaves: collections.Counter[str] = collections.Counter()
        total = 0
        for line in Path(raw.name).read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            total += int(count)
            leaves[stack.split(";")[-1]] += int(count)
    return {
        "gil_share": total / (_RATE * int(seconds)),
        "top": [(frame, round(n / max(total, 1), 3)) for frame, n in leaves.most_common(8)],
    }


def main(
    *,
    out: Path,
    streams: int = 4,
    seconds: float = 8.0,
    num_workers: int = 8,
    receive_processes: bool = False,
) -> dict[str, Any]:
    receivers = receive_processes
    os.environ[DATA_ENV] = str(data_dir())
    workload = WORKLOADS["W2"]
    workload.factory()
    report: dict[str, Any] = {"streams": streams, "num_workers": num_workers, "receive_processes": receivers}
    with served(workload, num_workers) as address:
        server = next(p for p in psutil.Process().children() if "serve" in " ".join(p.cmdline()))
        before = sum(p.cpu_times().user + p.cpu_times().system for p in [server, *server.children(True)])
        main_before = server.cpu_times().user + server.cpu_times().system
        client = subprocess.Popen(
            [sys.executable, "-m", "batchferry.benchmarks.profile", address, str(streams), str(seconds),
             *(["--receive-processes"] if receivers else [])],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(min(2.0, seconds / 4))  # past the first batches
        window = max(1.0, seconds / 2 - 1)
        report["server_gil"] = _gil(server.pid, window)
        report["client_gil"] = _gil(client.pid, window)
        relays = [p for p in psutil.Process(client.pid).children() if "batchferry.relay.child" in p.cmdline()]
        if relays:
            report["receiver_gil"] = _gil(relays[0].pid, window)
        said, _ = client.communicate(timeout=seconds + 120)
        moved = json.loads(said.strip().splitlines()[-1])
        after = sum(p.cpu_times().user + p.cpu_times().system for p in [server, *server.children(True)])
        main_after = server.cpu_times().user + server.cpu_times().system
    report["gb_per_s"] = moved["gb"] / moved["seconds"]
    report["client_cpu_s_per_gb"] = moved["cpu_s"] / moved["gb"]
    if receivers:
        report["receivers_cpu_s_per_gb"] = moved["children_cpu_s"] / moved["gb"]
    report["server_cpu_s_per_gb"] = (main_after - main_before) / moved["gb"]
    report["server_and_workers_cpu_s_per_gb"] = (after - before) / moved["gb"]
    print(json.dumps(report, indent=2))
    report["date"] = _dt.date.today().isoformat()
    report["machine"] = machine()
    save_report(report, out, "PROFILE")
    return report


if __name__ == "__main__":  # the loader under profile, started by main()
    _client(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), "--receive-processes" in sys.argv[4:])
