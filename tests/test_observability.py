"""Prometheus metrics and gRPC reflection: scraped and asked over the network from real servers."""

from __future__ import annotations

import os
import re
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batchferry import errors, wire
from batchferry.client import DataLoader
from batchferry.server import Server, ServerConfig
from batchferry.v1 import loader_pb2 as pb

from support import Filled, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "metrics-test-token-0123456789"

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Series:
    """Every sample at ``http://127.0.0.1:port/metrics``: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(series: Series, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and want <= ls)


@pytest.fixture(scope="module")
def filled() -> Filled:
    return Filled(length=96, n=4096)  # 16 KiB samples: batches of 8 are 128 KiB


def test_metrics_move_during_a_run(filled: Filled) -> None:
    port = free_port()
    # One batch per frame, so that streams are still open at the "during" scrapes (grouped
    # frames are counted in tests/test_groups.py).
    with Server({"f": filled}, port=0, num_workers=1, metrics_port=port, group_bytes=0) as srv:
        assert srv.metrics_port == port
        before = scrape(port)
        assert value(before, "batchferry_batches_built_total") == 0
        assert value(before, "batchferry_streams_open") == 0
        assert value(before, "batchferry_ring_bytes") > 0  # the ring's first slots
        assert value(before, "batchferry_ring_bytes", state="leased") == 0
        assert value(before, "batchferry_workers") == 1

        # Byte stream: batches built, sent and their bytes counted while the stream is open.
        with DataLoader(srv.address, "f", 8, True, seed=1, transport="grpc") as loader:
            it = iter(loader)
            next(it), next(it)
            during = scrape(port)
            stripes = loader.stripes  # the byte stream's parallel streams
            assert value(during, "batchferry_streams_open") == stripes
            assert value(during, "batchferry_batches_built_total", dataset="f", mode="independent") >= 2
            assert value(during, "batchferry_batches_sent_total", transport="grpc") >= 2
            assert value(during, "batchferry_batch_bytes_total", transport="grpc") >= 2 * 8 * 4096 * 4
            rest = list(it)
        assert len(rest) == 10
        handled = {"grpc_method": "StreamBatches", "grpc_code": "OK"}
        assert wait_until(lambda: value(scrape(port), "batchferry_grpc_handled_total", **handled) == stripes)
        after = scrape(port)
        assert (
            value(after, "batchferry_batches_sent_total", dataset="f", mode="independent", transport="grpc")
            == 12
        )
        assert value(after, "batchferry_batch_send_seconds_count", transport="grpc") == 12
        payload = value(after, "batchferry_batch_bytes_total", transport="grpc")
        assert payload == 12 * 8 * 4096 * 4
        assert value(after, "batchferry_sent_bytes_total", transport="grpc") > payload  # and the headers
        assert value(after, "batchferry_batches_sent_total", transport="shm") == 0
        assert value(after, "batchferry_batch_build_seconds_count", dataset="f") == value(
            after, "batchferry_batches_built_total", dataset="f"
        )
        assert value(after, "batchferry_batch_build_seconds_sum", dataset="f") > 0
        assert value(after, "batchferry_grpc_handled_total", grpc_method="ListDatasets", grpc_code="OK") >= 1

        # Same host: the slots a client holds are leased ring bytes, its batches counted as shm.
        with DataLoader(srv.address, "f", 8, True, seed=1, transport="shm") as loader:
            it = iter(loader)
            held = next(it)
            assert wait_until(lambda: value(scrape(port), "batchferry_ring_bytes", state="leased") > 0)
            now = scrape(port)
            assert value(now, "batchferry_batches_sent_total", transport="shm") >= 1
            assert value(now, "batchferry_batch_bytes_total", transport="shm") >= held.numel() * 4
            del held
        assert wait_until(lambda: value(scrape(port), "batchferry_streams_open") == 0)

        # Two ranks of a sharded job at different paces: the slower one lags.
        ranks = [
            DataLoader(srv.address, "f", 4, True, seed=1, mode="sharded", job="train", rank=r, world_size=2,
                       prefetch_factor=2)
            for r in (0, 1)
        ]  # fmt: skip
        fast, slow = (iter(loader) for loader in ranks)
        # Taken counts whole frames (small batches travel several to one): the fast rank
        # takes its whole shard (12 batches), the slow one its first (always alone).
        for _ in range(12):
            next(fast)
        next(slow)

        def lags() -> tuple[float, float]:
            s = scrape(port)
            lag = "batchferry_job_consumer_lag_batches"
            return value(s, lag, job="train", rank="0"), value(s, lag, job="train", rank="1")

        assert wait_until(lambda: lags()[0] == 0 and lags()[1] >= 5)
        jobs = scrape(port)
        assert value(jobs, "batchferry_job_consumers", job="train", mode="sharded", dataset="f") == 2
        assert value(jobs, "batchferry_job_batches_built_total", job="train") >= 9
        assert value(jobs, "batchferry_streams_open") == 2
        for loader in ranks:
            loader.close()
    with pytest.raises(urllib.error.URLError):
        scrape(port)  # the endpoint stops with the server


def test_errors_are_counted_by_status_code(tensor_ds, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    port = free_port()
    with Server({"t": tensor_ds}, port=0, num_workers=0, metrics_port=port, token_file=str(tokens)) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            call = channel.unary_unary(wire.LIST_DATASETS)
            with pytest.raises(grpc.RpcError) as malformed:
                call(b"\xff\xff", metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
            assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            for name in ("/batchferry.v1.Loader/Nope", "/made.up.Service/Method"):
                with pytest.raises(grpc.RpcError) as unknown:
                    channel.unary_unary(name)(b"", timeout=10)
                assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with DataLoader(srv.address, "t", 4, token=TOKEN, collate_fn="missing", timeout=5) as loader:
            with pytest.raises(errors.NotFound):
                next(iter(loader))
        with DataLoader(srv.address, "t", 4, timeout=5) as loader:
            with pytest.raises(errors.Unauthenticated):
                len(loader)
        s = scrape(port)
        stream = {"grpc_service": "batchferry.v1.Loader", "grpc_method": "StreamBatches"}
        assert value(s, "batchferry_grpc_handled_total", **stream, grpc_code="NOT_FOUND") == 1
        listing = {"grpc_service": "batchferry.v1.Loader", "grpc_method": "ListDatasets"}
        assert value(s, "batchferry_grpc_handled_total", **listing, grpc_code="INVALID_ARGUMENT") == 1
        assert value(s, "batchferry_grpc_handled_total", **listing, grpc_code="UNAUTHENTICATED") >= 1
        assert value(s, "batchferry_grpc_handled_total", **stream, grpc_code="OK") == 0
        # Methods nobody registered are one series, whatever their names.
        unknown = {"grpc_service": "unknown", "grpc_method": "unknown", "grpc_code": "UNIMPLEMENTED"}
        assert value(s, "batchferry_grpc_handled_total", **unknown) == 2
        assert not any("Nope" in v or "made.up" in v for _, labels in s for _, v in labels)


def test_worker_restarts_are_counted(tensor_ds) -> None:
    port = free_port()
    with Server({"t": tensor_ds}, port=0, num_workers=1, metrics_port=port) as srv:
        assert value(scrape(port), "batchferry_worker_restarts_total") == 0
        os.kill(srv.pool.worker_pids()[0], signal.SIGKILL)
        assert wait_until(lambda: value(scrape(port), "batchferry_worker_restarts_total") == 1, timeout=60)
        assert value(scrape(port), "batchferry_workers") == 1


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def test_metric_names_follow_prometheus_conventions_and_are_documented(tensor_ds) -> None:
    port = free_port()
    with Server({"t": tensor_ds}, port=0, num_workers=1, metrics_port=port) as srv:
        with DataLoader(srv.address, "t", 16, mode="shared", job="j") as loader:
            assert len(list(loader)) == 7
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                assert reply.headers["Content-Type"].startswith("text/plain")
                families = list(text_string_to_metric_families(reply.read().decode()))
    # The text format carries a counter's or histogram's creation time as a gauge of its own.
    created = {f.name + "_created" for f in families if f.type in ("counter", "histogram")}
    ours = [f for f in families if f.name.startswith("batchferry_") and f.name not in created]
    assert {f.name for f in families} - {f.name for f in ours} - created <= {
        f.name for f in families if f.name.startswith("process_")
    }, "every other metric is the standard process collector's"
    for family in ours:
        assert _NAME.fullmatch(family.name), family.name
        assert family.documentation.strip(), f"{family.name} has no help"
        assert not re.search(r"_(ms|milliseconds|kb|kib|mb|mib|percent)(_|$)", family.name), family.name
        # Units are base units and end the name (a counter's _total comes after them).
        for unit in ("seconds", "bytes"):
            if unit in family.name:
                assert family.name.endswith(f"_{unit}"), family.name
        assert not family.name.endswith(("_total", "_count", "_sum", "_bucket", "_created")), family.name
        suffixes = {
            "counter": ("_total", "_created"),
            "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
        }[family.type]
        for sample in family.samples:
            assert sample.name in {family.name + s for s in suffixes}, (family.type, sample.name)
            for label in sample.labels:
                assert _LABEL.fullmatch(label) and not label.startswith("__"), label
        if family.type == "histogram":
            assert family.name.endswith("_seconds")
    names = {f.name for f in ours}
    assert {
        "batchferry_batches_built", "batchferry_batches_sent", "batchferry_batch_build_seconds",
        "batchferry_batch_send_seconds", "batchferry_sent_bytes", "batchferry_batch_bytes",
        "batchferry_worker_restarts", "batchferry_ring_slots", "batchferry_ring_bytes",
        "batchferry_streams_open", "batchferry_job_consumers", "batchferry_job_consumer_lag_batches",
        "batchferry_grpc_handled",
    } <= names  # fmt: skip
    # The README's table, with those of the manual pages under docs/, names every metric,
    # counters with their _total, and no other.
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Observability", 1)[1].split("\n## ", 1)[0]
    pages = [section, *(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))]
    documented = {
        name for text in pages for name in re.findall(r"^\| `(batchferry_\w+)`", text, re.MULTILINE)
    }
    exposed = {f.name + ("_total" if f.type == "counter" else "") for f in ours}
    assert documented == exposed


# Label names a series may carry, and nothing else: no peer, port or batch index. A stream's
# name (``stream``, ``blocked_by``) labels only series of open streams (at most max_streams).
_BOUNDED_LABELS = {"dataset", "mode", "transport", "state", "grpc_service", "grpc_method", "grpc_code",
                   "job", "rank", "consumer", "le", "stream", "blocked_by"}  # fmt: skip


def _ours(series: Series) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    return {key for key in series if key[0].startswith("batchferry_")}


def test_label_sets_stay_bounded_after_many_streams(tensor_ds) -> None:
    port = free_port()
    with Server({"t": tensor_ds}, port=0, num_workers=1, metrics_port=port, job_idle_s=0.2) as srv:
        streams = 0  # StreamBatches calls: one per epoch and stripe

        def many_streams() -> None:
            nonlocal streams
            for transport in ("shm", "grpc"):
                with DataLoader(srv.address, "t", 16, True, seed=1, transport=transport) as loader:
                    for _ in range(2):
                        assert len(list(loader)) == 7
                        streams += loader.stripes
            for mode in ("shared", "dynamic"):
                with DataLoader(srv.address, "t", 16, mode=mode, job=f"{mode}-job") as loader:
                    assert len(list(loader)) == 7
                    streams += loader.stripes
            for rank in (0, 1):
                with DataLoader(srv.address, "t", 16, mode="sharded", job="ranks", rank=rank,
                                world_size=2) as loader:  # fmt: skip
                    assert len(list(loader)) == 4
                    streams += loader.stripes
            with DataLoader(srv.address, "unknown", 16, timeout=5) as loader:
                with pytest.raises(errors.NotFound):
                    next(iter(loader))

        many_streams()
        first = _ours(scrape(port))
        for _ in range(3):
            many_streams()
        last = scrape(port)
        # The same series after 4 rounds as after 1 (jobs aside: they come and go with the job).
        assert {k for k in _ours(last) if "job" not in dict(k[1])} == {
            k for k in first if "job" not in dict(k[1])
        }
        ok = {"grpc_method": "StreamBatches", "grpc_code": "OK"}
        assert wait_until(lambda: value(scrape(port), "batchferry_grpc_handled_total", **ok) == streams)
        assert streams > 4 * 8  # the byte stream's loaders opened more than one stream each
        for _name, labels in _ours(last):
            assert dict(labels).keys() <= _BOUNDED_LABELS, labels
            for label, text in labels:
                assert not re.search(r"ip[v46]*:|\d+\.\d+\.\d+\.\d+|:\d+$", text), (label, text)
        # A job's series vanish once it is forgotten.
        assert wait_until(lambda: not any("job" in dict(k[1]) for k in _ours(scrape(port))))


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_metrics_are_off_by_default_and_their_port_is_checked(tensor_ds, busy_port: int) -> None:
    assert ServerConfig().metrics_port == 0
    with Server({"t": tensor_ds}, port=0, num_workers=0) as srv:
        assert srv.metrics_port == 0
        # Still counted, for a process that exposes the registry itself.
        with DataLoader(srv.address, "t", 16) as loader:
            assert len(list(loader)) == 7
        text = generate_latest(srv.metrics.registry).decode()
        assert 'batchferry_batches_built_total{dataset="t",mode="independent"} 7.0' in text
        taken = srv.port
        with pytest.raises(OSError, match=f"127.0.0.1:{busy_port} for metrics_port"):
            Server({"t": tensor_ds}, port=0, num_workers=0, metrics_port=busy_port)
    with pytest.raises(ValueError, match="metrics_port must differ"):
        ServerConfig(port=taken, metrics_port=taken)
    with pytest.raises(ValueError, match="metrics_port must be in"):
        ServerConfig(metrics_port=70000)


# -- reflection ------------------------------------------------------------------------
def test_reflection_lists_and_describes_the_loader(tensor_ds) -> None:
    with (
        Server({"t": tensor_ds}, port=0, num_workers=0) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == {
            "batchferry.v1.Loader",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        pool = descriptor_pool.DescriptorPool(database)
        loader = pool.FindServiceByName("batchferry.v1.Loader")
        methods = {m.name: m for m in loader.methods}
        compiled = pb.DESCRIPTOR.services_by_name["Loader"].methods
        assert set(methods) == {m.name for m in compiled} >= {"ListDatasets", "StreamBatches", "GetSample"}
        stream = methods["StreamBatches"]
        assert (stream.input_type.full_name, stream.output_type.full_name) == (
            "batchferry.v1.ClientMessage",
            "batchferry.v1.ServerFrame",
        )
        assert stream.client_streaming and stream.server_streaming
        assert methods["ListDatasets"].output_type.full_name == "batchferry.v1.ListDatasetsResponse"
        opened = pool.FindMessageTypeByName("batchferry.v1.OpenStream")
        assert {"dataset", "batch_size", "shuffle", "mode", "job", "rank", "world_size"} <= set(
            opened.fields_by_name
        )
        assert opened.fields_by_name["mode"].enum_type.full_name == "batchferry.v1.Mode"
        health = pool.FindServiceByName("grpc.health.v1.Health")
        assert {m.name for m in health.methods} >= {"Check", "Watch"}


def _list_services(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
    return [s.name for s in reply.list_services_response.service]


def test_reflection_needs_a_token_when_tokens_are_on(tensor_ds, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    with (
        Server({"t": tensor_ds}, port=0, num_workers=0, token_file=str(tokens)) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        with pytest.raises(grpc.RpcError) as refused:
            _list_services(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "batchferry.v1.Loader" in _list_services(channel, (("authorization", f"Bearer {TOKEN}"),))
