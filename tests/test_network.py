"""Servers and clients on hosts of their own: network namespaces joined by veth pairs.

Each test makes its namespaces (named after this process), links them with veth
pairs on addresses of its own, runs ``batchferry serve`` and client processes
inside them, and removes every namespace, link and process afterwards, also when
it fails. Traffic never leaves those namespaces. A client gets its own IPC
namespace and its own ``/dev/shm``, as on another machine, so it reads the byte
stream. Where namespaces cannot be made (not root, no ``ip``), the tests skip,
saying why.

Every process, server or client, also gets its own IPC namespace and its own
``/dev/shm``, as on another machine: a client reads the byte stream, and what a
server leaves in shared memory stays with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from batchferry.benchmarks import netns
from batchferry.server.datasets import parse_spec

SPEC = "synthetic:n=2048,shape=64,classes=10,seed=0"
BATCH, SEED, PORT = 32, 11, 50051
NETNS_ETC = Path("/etc/netns")

pytestmark = pytest.mark.timeout(300)


class Lab(netns.Hosts):
    """The benchmark's hosts, plus what the tests need: ``/etc/hosts`` per namespace,
    ``batchferry serve`` and the client below, links going down and up."""

    def __init__(self) -> None:
        super().__init__()
        self._made_netns_etc = False

    def hosts_file(self, ns: str, lines: list[str]) -> None:
        """/etc/hosts as processes in ``ns`` see it (``ip netns exec`` mounts it there)."""
        self._made_netns_etc |= not NETNS_ETC.exists()
        (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / ns / "hosts").write_text("\n".join(["127.0.0.1 localhost", *lines]) + "\n")
        (NETNS_ETC / ns / "host.conf").write_text("multi on\n")  # every address of a name

    def serve(self, ns: str, host: str, *extra: str) -> subprocess.Popen[str]:
        proc = self.run(
            ns, "-m", "batchferry.cli", "--log-level", "WARNING", "serve", "--dataset", f"d={SPEC}",
            "--host", host, "--port", str(PORT), "--num-workers", "1", *extra,
        )  # fmt: skip
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "serving" in banner, banner
        return proc

    def client(self, ns: str, **config: Any) -> Client:
        return Client(self.run(ns, "-c", CLIENT, json.dumps(config), stdin=subprocess.PIPE))

    def set_link(self, ns: str, dev: str, state: str) -> None:
        _ip("-n", ns, "link", "set", dev, state)

    def close(self) -> None:
        namespaces = list(self.namespaces)
        super().close()
        for ns in namespaces:
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        if self._made_netns_etc:
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()
            self._made_netns_etc = False


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def lab() -> Iterator[Lab]:
    why = netns.unavailable()
    if why is not None:
        pytest.skip(why)
    made = Lab()
    try:
        yield made
    finally:
        made.close()
        left = [ns for ns in _ip("netns", "list").stdout.split() if ns.startswith(made.tag)]
        assert not left, f"namespaces left: {left}"


# The client, run inside a namespace. argv[1] is its JSON config; it prints one JSON
# object per line: its transport, each batch's digest, "paused" (then waits for a
# line on stdin) and "done" or the error that ended it.
CLIENT = """
import hashlib, json, sys, time
import torch
from batchferry import errors
from batchferry.client import DataLoader
cfg = json.loads(sys.argv[1])
def say(**msg):
    print(json.dumps(msg), flush=True)
def digest(x, y):
    return hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
deadline = time.monotonic() + cfg.get("retry_for", 0)
while True:
    try:
        with DataLoader(cfg["address"], "d", cfg["batch"], shuffle=True,
                        generator=torch.Generator().manual_seed(cfg["seed"]),
                        timeout=cfg["timeout"], prefetch_factor=cfg.get("prefetch", 2),
                        streams=cfg.get("streams")) as loader:
            say(transport=loader.transport, replicas=loader.num_replicas)
            resumed = time.monotonic()
            for epoch in range(cfg.get("epochs", 1)):
                for i, (x, y) in enumerate(loader):
                    say(epoch=epoch, batch=i, digest=digest(x, y))
                    if i == cfg.get("pause_at"):
                        say(paused=i)
                        sys.stdin.readline()
                        resumed = time.monotonic()
        say(done=True)
        break
    except errors.BatchferryError as exc:
        say(error=type(exc).__name__, message=str(exc), seconds=time.monotonic() - resumed)
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
"""


class Client:
    """A client process's messages, read as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.messages: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            self.messages.append(message)
            self._queue.put(message)
        self._queue.put(None)

    def wait_for(self, key: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {key!r} from the client within {timeout}s: {self.messages}")
            if message is None:
                pytest.fail(f"client ended without {key!r}: {self.messages}")
            if key in message:
                return message

    def resume(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 120) -> list[dict[str, Any]]:
        assert self.proc.wait(timeout=timeout) == 0, self.messages
        self._reader.join(timeout=10)
        return self.messages

    def digests(self, epoch: int = 0) -> list[str]:
        return [m["digest"] for m in self.messages if m.get("epoch") == epoch]

    def batches(self) -> int:
        return sum("digest" in m for m in self.messages)


def _torch_epochs(epochs: int) -> list[list[str]]:
    """What torch's DataLoader yields on its first ``epochs`` passes for the same generator."""
    loader = torch.utils.data.DataLoader(
        parse_spec(SPEC), BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED)
    )
    return [
        [hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest() for x, y in loader]
        for _ in range(epochs)
    ]


def _server_and_client(lab: Lab, *extra: str) -> tuple[str, str, str, str]:
    """A server host and a client host, linked: (server ns, its address, client ns, client dev)."""
    server_ns, client_ns = lab.host("server"), lab.host("client")
    (_, server_address), (client_dev, _) = lab.link(server_ns, client_ns)
    lab.serve(server_ns, server_address, *extra)
    return server_ns, server_address, client_ns, client_dev


# -- the tests ------------------------------------------------------------------------------
def test_client_on_another_host_reads_the_byte_stream_in_torch_order(lab: Lab) -> None:
    server_ns, client_ns = lab.host("server"), lab.host("client")
    (server_dev, server_address), _ = lab.link(server_ns, client_ns)
    # A slower link than loopback: 200 Mbit/s out of the server.
    subprocess.run(
        ["ip", "netns", "exec", server_ns, "tc", "qdisc", "add", "dev", server_dev, "root", "tbf",
         "rate", "200mbit", "burst", "256kb", "latency", "100ms"],
        check=True, timeout=30,
    )  # fmt: skip
    lab.serve(server_ns, server_address)
    client = lab.client(client_ns, address=f"{server_address}:{PORT}", batch=BATCH, seed=SEED, timeout=30,
                        epochs=2)  # fmt: skip
    client.finish()
    first = client.messages[0]
    assert first == {"transport": "grpc", "replicas": 1}, client.messages
    assert [client.digests(0), client.digests(1)] == _torch_epochs(2)
    assert client.messages[-1] == {"done": True}


def test_link_cut_for_less_than_timeout_the_epoch_completes_with_nothing_lost_or_repeated(lab: Lab) -> None:
    # One batch per frame, so that what is in flight is counted in batches (see the end).
    _, server_address, client_ns, client_dev = _server_and_client(lab, "--group-bytes", "0")
    prefetch, pause_at, timeout, streams = 2, 5, 30, 2
    client = lab.client(client_ns, address=f"{server_address}:{PORT}", batch=BATCH, seed=SEED,
                        timeout=timeout, prefetch=prefetch, pause_at=pause_at, streams=streams)  # fmt: skip
    client.wait_for("paused")
    lab.set_link(client_ns, client_dev, "down")
    client.resume()
    time.sleep(3)  # the cut: well inside timeout
    before = client.batches()
    lab.set_link(client_ns, client_dev, "up")
    client.finish()
    assert client.messages[-1] == {"done": True}, client.messages
    assert client.digests() == _torch_epochs(1)[0]
    # Only what was already in flight got through the cut (each stream holds at least 2
    # credits); the rest came after it.
    in_flight = streams * max(2, -(-prefetch // streams))
    assert before <= pause_at + 1 + in_flight + 1 < len(client.digests())


def test_link_cut_for_longer_than_timeout_raises_server_unavailable_naming_the_address(lab: Lab) -> None:
    _, server_address, client_ns, client_dev = _server_and_client(lab)
    timeout = 5
    client = lab.client(client_ns, address=f"{server_address}:{PORT}", batch=BATCH, seed=SEED,
                        timeout=timeout, pause_at=3)  # fmt: skip
    client.wait_for("paused")
    lab.set_link(client_ns, client_dev, "down")
    client.resume()
    error = client.wait_for("error", timeout=timeout + 60)
    assert error["seconds"] < timeout + 10, error  # generous: 'within timeout' on a busy machine
    assert error["error"] == "ServerUnavailable", error
    assert f"{server_address}:{PORT}" in error["message"], error


def _server_sockets(ns: str) -> tuple[int, int]:
    """(bytes sent, bytes not yet acknowledged) over the connections of the server in ``ns``."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ss", "-Htni", "state", "established", f"sport = :{PORT}"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    sent = sum(int(m) for m in re.findall(r"bytes_sent:(\d+)", out))
    unacked = sum(int(line.split()[1]) for line in lines if line and not line[0].isspace())
    return sent, unacked


def _until_server_is_idle(ns: str, quiet: float = 2.0, timeout: float = 60) -> None:
    """Until the server has sent all it may (every credit used) and all of it was acknowledged."""
    deadline = time.monotonic() + timeout
    last, since = (-1, -1), time.monotonic()
    while time.monotonic() < deadline:
        now = _server_sockets(ns)
        if now != last:
            last, since = now, time.monotonic()
        elif now[1] == 0 and time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)
    pytest.fail(f"the server kept sending for {timeout}s: {last}")


def _abandoned_stream_is_freed(lab: Lab, *, sending: bool) -> None:
    """A client's link is cut for good and the client dies; another client, on the
    server's own host, must then get a whole epoch within a generous deadline."""
    server_ns, client_ns = lab.host("server"), lab.host("client")
    (server_dev, server_address), (client_dev, _) = lab.link(server_ns, client_ns)
    if sending:  # a slow link keeps the server's socket backlogged: a batch takes 1/4 s
        subprocess.run(
            ["ip", "netns", "exec", server_ns, "tc", "qdisc", "add", "dev", server_dev, "root", "tbf",
             "rate", "256kbit", "burst", "4kb", "latency", "1s"],
            check=True, timeout=30,
        )  # fmt: skip
    # One stream and two slots that cannot grow: a dead stream holding either blocks everyone.
    lab.serve(server_ns, server_address, "--max-streams", "1", "--slots", "2", "--shm-bytes", "2MiB")
    address = f"{server_address}:{PORT}"
    gone = lab.client(client_ns, address=address, batch=BATCH, seed=SEED, timeout=5, streams=1,
                      pause_at=None if sending else 3)  # fmt: skip
    if sending:
        gone.wait_for("digest")
        deadline = time.monotonic() + 30
        while not _server_sockets(server_ns)[1]:
            assert time.monotonic() < deadline, "the server never had data in flight"
            time.sleep(0.01)
    else:
        gone.wait_for("paused")
        _until_server_is_idle(server_ns)
    lab.set_link(client_ns, client_dev, "down")
    gone.proc.kill()  # the peer is gone for good; the link stays down
    gone.proc.wait(timeout=30)
    other = lab.client(
        server_ns, address=address, batch=BATCH, seed=SEED, timeout=10, retry_for=60, streams=1
    )
    other.finish(timeout=120)
    assert other.messages[-1] == {"done": True}, other.messages
    assert other.digests() == _torch_epochs(1)[0]


def test_server_frees_a_stream_cut_off_while_it_sends(lab: Lab) -> None:
    # Unacknowledged data ends the connection (gRPC servers set TCP_USER_TIMEOUT, 20 s).
    _abandoned_stream_is_freed(lab, sending=True)


def test_server_frees_a_stream_cut_off_while_it_waits_for_credits(lab: Lab) -> None:
    _abandoned_stream_is_freed(lab, sending=False)


def test_two_replicas_on_two_hosts_behind_one_name_merge_as_one_server(lab: Lab) -> None:
    client_ns = lab.host("client")
    addresses = []
    for index in range(2):
        server_ns = lab.host(f"replica{index}")
        (_, server_address), _ = lab.link(server_ns, client_ns)
        lab.serve(server_ns, server_address, "--num-replicas", "2", "--replica-index", str(index))
        addresses.append(server_address)
    name = "replicas.batchferry.test"
    lab.hosts_file(client_ns, [f"{address} {name}" for address in reversed(addresses)])
    client = lab.client(client_ns, address=f"dns:///{name}:{PORT}", batch=BATCH, seed=SEED, timeout=30)
    client.finish()
    assert client.messages[0] == {"transport": "grpc", "replicas": 2}, client.messages
    assert client.digests() == _torch_epochs(1)[0]
