"""The server image, built and run on a real Docker engine.

Every container uses the host's network (servers listen on a loopback port of
their own) or none, so nothing here needs a bridge or leaves the machine. The
engine is the one at ``DOCKER_HOST`` (or the default socket); without one every
test skips, saying why. ``scripts/container_check`` starts an engine where none
runs and builds the image; ``BATCHFERRY_TEST_IMAGE`` names an image already built
(and makes a missing engine an error, not a skip), otherwise the image is built
here from ``deploy/Dockerfile``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from batchferry import errors
from batchferry.client import DataLoader
from batchferry.server.datasets import parse_spec

from processes import free_port

ROOT = Path(__file__).resolve().parent.parent
SPEC = "synthetic:n=4096,shape=64,classes=10,seed=0"
BATCH, SEED = 64, 7
IMAGE_UID = "10001"
GRACE = 10  # docker stop's default grace period, in seconds
_names = count()

# The build (when no image is given) and the containers' start-ups take a while;
# every wait below has its own deadline.
pytestmark = pytest.mark.timeout(900)


# -- engine and image ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    docker = pytest.importorskip("docker")
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    # An image built for these tests means an engine was there: losing it is an error.
    skip = pytest.fail if os.environ.get("BATCHFERRY_TEST_IMAGE") else pytest.skip
    if host.startswith("unix://") and not Path(host.removeprefix("unix://")).exists():
        skip(f"no Docker engine reachable: {host} does not exist (scripts/container_check starts one)")
    # A fixed API version: the client asks nothing before ping(), and can be closed when it fails.
    client = docker.from_env(timeout=60, version="1.41")
    try:
        client.ping()
    except Exception as exc:
        client.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()  # the SDK leaves the socket of a failed connection behind
        skip(f"no Docker engine reachable at {host} ({type(exc).__name__}: {exc})")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def image(docker_client: Any) -> Any:
    tag = os.environ.get("BATCHFERRY_TEST_IMAGE")
    if tag:
        return docker_client.images.get(tag)
    # The host's network: an engine started without a bridge has no other for the build.
    built, _ = docker_client.images.build(
        path=str(ROOT), dockerfile="deploy/Dockerfile", tag="batchferry:test", rm=True, network_mode="host"
    )
    return built


@contextmanager
def _container(client: Any, image: Any, **kwargs: Any) -> Iterator[Any]:
    kwargs.setdefault("network_mode", "host")
    container = client.containers.run(
        image.id, detach=True, name=f"batchferry-test-{os.getpid()}-{next(_names)}", **kwargs
    )
    try:
        yield container
    finally:
        container.remove(force=True)


def _server(
    client: Any,
    image: Any,
    port: int,
    *,
    metrics_port: int = 0,
    image_healthcheck: bool = False,
    **kwargs: Any,
) -> Any:
    """The image's entrypoint serving SPEC on 127.0.0.1:``port`` (the host's loopback), its
    metrics on ``metrics_port`` (a free one by default, not the image's fixed one)."""
    if not image_healthcheck:
        # The image's own check, asked every second instead of every ten.
        kwargs["healthcheck"] = {"interval": 1_000_000_000, "start_period": 60_000_000_000}
    environment = {
        "BATCHFERRY_HOST": "127.0.0.1",
        "BATCHFERRY_PORT": str(port),
        "BATCHFERRY_METRICS_PORT": str(metrics_port or free_port()),
    }
    return _container(
        client, image, environment=environment,
        command=["--dataset", f"demo={SPEC}", "--num-workers", "1"], shm_size="256m", **kwargs,
    )  # fmt: skip


def _wait_healthy(container: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        if container.attrs["State"].get("Health", {}).get("Status") == "healthy":
            return
        assert container.status != "exited", container.logs().decode()
        time.sleep(0.5)
    pytest.fail(f"container not healthy within {timeout}s: {container.logs().decode()}")


def _wait_log(container: Any, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = str(container.logs().decode())
        if text in logs:
            return logs
        container.reload()
        assert container.status != "exited", logs
        time.sleep(0.2)
    pytest.fail(f"{text!r} not in the logs within {timeout}s: {container.logs().decode()}")


# -- what a trainer reads ------------------------------------------------------------------
def _digest(x: torch.Tensor, y: torch.Tensor) -> str:
    return hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def torch_epoch() -> list[str]:
    """Epoch 0 as torch's DataLoader yields it for the same seed."""
    loader = torch.utils.data.DataLoader(
        parse_spec(SPEC), BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED)
    )
    return [_digest(x, y) for x, y in loader]


# A trainer inside a container: reads epoch 0, pausing after batch PAUSE_AT until
# /tmp/go exists, and prints its transport and every batch's digest.
TRAINER = """
import hashlib, json, logging, os, sys, time
from batchferry.client import DataLoader
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
address, batch, seed, pause_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with DataLoader(address, "demo", batch, shuffle=True, seed=seed, timeout=60) as loader:
    print("transport", loader.transport, flush=True)
    digests = []
    for i, (x, y) in enumerate(loader):
        digests.append(hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
        if i == pause_at:
            print("paused", flush=True)
            while not os.path.exists("/tmp/go"):
                time.sleep(0.05)
    print("digests", json.dumps(digests), flush=True)
"""


def _trainer(client: Any, image: Any, address: str, pause_at: int = -1, **kwargs: Any) -> Any:
    return _container(
        client, image, entrypoint=["python3", "-c", TRAINER],
        command=[address, str(BATCH), str(SEED), str(pause_at)], **kwargs,
    )  # fmt: skip


def _finished(container: Any) -> tuple[str, list[str]]:
    """A trainer container's transport and digests, once it exited 0."""
    status = container.wait(timeout=300)["StatusCode"]
    logs = container.logs().decode()
    assert status == 0, logs
    lines = logs.splitlines()
    transport = next(line.split()[1] for line in lines if line.startswith("transport "))
    digests = json.loads(next(line.split(" ", 1)[1] for line in lines if line.startswith("digests ")))
    return transport, digests


# -- the tests -----------------------------------------------------------------------------
def test_image_runs_as_non_root_turns_healthy_and_a_host_client_trains_from_it(
    docker_client: Any, image: Any, torch_epoch: list[str]
) -> None:
    assert image.attrs["Config"]["User"].split(":")[0] == IMAGE_UID
    port, metrics_port = free_port(), free_port()
    with _server(docker_client, image, port, metrics_port=metrics_port, image_healthcheck=True) as server:
        _wait_healthy(server)  # the image's HEALTHCHECK, as built
        status = server.exec_run(["cat", "/proc/1/status"]).output.decode()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uids) == {IMAGE_UID}, status  # the server process itself, not only the config

        torch.manual_seed(0)
        model = nn.Linear(64, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        with DataLoader(f"127.0.0.1:{port}", "demo", BATCH, shuffle=True, seed=SEED) as loader:
            assert loader.transport == "grpc"  # its own IPC namespace: the byte stream over TCP
            for epoch in range(3):
                total, digests = 0.0, []
                for x, y in loader:
                    digests.append(_digest(x, y))
                    loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.item()
                losses.append(total / len(digests))
                if epoch == 0:
                    assert digests == torch_epoch
        assert losses[-1] < 0.7 * losses[0], losses
        # The metrics port answers from the container (the host's network) and counted the epochs.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        sent = re.findall(r'^batchferry_batches_sent_total\{.*transport="grpc"\} (\S+)$', text, re.MULTILINE)
        assert sum(float(v) for v in sent) == 3 * len(torch_epoch), text[:2000]


def test_a_trainer_sharing_the_servers_ipc_reads_by_shm_and_one_without_by_the_byte_stream(
    docker_client: Any, image: Any, torch_epoch: list[str]
) -> None:
    """compose.yaml's set-up: ipc shareable on the server, container:SERVER on the trainer."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    with _server(docker_client, image, port, ipc_mode="shareable") as server:
        _wait_healthy(server)
        with (
            _trainer(docker_client, image, address, ipc_mode=f"container:{server.id}") as sharing,
            _trainer(docker_client, image, address) as apart,
        ):
            assert _finished(sharing) == ("shm", torch_epoch)
            assert _finished(apart) == ("grpc", torch_epoch)


def test_server_killed_mid_epoch_and_restarted_the_host_trainer_loses_and_repeats_nothing(
    docker_client: Any, image: Any, torch_epoch: list[str]
) -> None:
    port = free_port()
    with _server(docker_client, image, port) as server:
        _wait_healthy(server)
        with DataLoader(f"127.0.0.1:{port}", "demo", BATCH, shuffle=True, seed=SEED, timeout=60) as loader:
            digests = []
            for x, y in loader:
                digests.append(_digest(x, y))
                if len(digests) == 10:
                    server.kill()  # SIGKILL: no clean-up, as when a node dies
                    assert server.wait(timeout=60)["StatusCode"] == 137
                    server.start()  # as compose's restart policy would
        assert digests == torch_epoch


def test_server_killed_mid_epoch_and_restarted_a_trainer_sharing_its_ipc_loses_and_repeats_nothing(
    docker_client: Any, image: Any, torch_epoch: list[str]
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    with _server(docker_client, image, port, ipc_mode="shareable") as server:
        _wait_healthy(server)
        with _trainer(docker_client, image, address, 10, ipc_mode=f"container:{server.id}") as trainer:
            _wait_log(trainer, "paused")
            server.kill()
            assert server.wait(timeout=60)["StatusCode"] == 137
            server.start()
            assert trainer.exec_run(["touch", "/tmp/go"]).exit_code == 0
            transport, digests = _finished(trainer)
            assert transport == "shm"
            assert digests == torch_epoch


def test_docker_stop_mid_epoch_exits_within_the_grace_period_and_leaves_no_segment(
    docker_client: Any, image: Any
) -> None:
    """SIGTERM while a client streams: the server exits by itself (not SIGKILLed after the
    grace period) and its /dev/shm, seen from a container sharing it, is empty."""
    port = free_port()
    with _server(docker_client, image, port, ipc_mode="shareable") as server:
        _wait_healthy(server)
        with _container(
            docker_client, image, network_mode="none", ipc_mode=f"container:{server.id}",
            entrypoint=["sleep", "600"],
        ) as sidecar:  # fmt: skip
            shm = sidecar.exec_run(["ls", "/dev/shm"]).output.decode().split()
            assert any(name.startswith("batchferry_") for name in shm), shm
            with DataLoader(f"127.0.0.1:{port}", "demo", BATCH, shuffle=True, seed=SEED, timeout=5) as loader:
                batches = iter(loader)
                next(batches)
                started = time.monotonic()
                server.stop(timeout=GRACE)
                stopped = time.monotonic() - started
                with pytest.raises(errors.ServerUnavailable):
                    for _ in batches:
                        pass
            server.reload()
            state = server.attrs["State"]
            assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, server.logs().decode())
            assert stopped < GRACE, f"docker stop took {stopped:.1f}s: the grace period ran out"
            left = sidecar.exec_run(["ls", "-A", "/dev/shm"]).output.decode().split()
            assert left == [], f"left in the server's /dev/shm: {left}"
