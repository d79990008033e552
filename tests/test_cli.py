"""The command line: datasets listing (table and JSON), demo, argument errors."""

from __future__ import annotations

import json
import re

import pytest

from batchferry import cli
from batchferry.demo import run_demo
from batchferry.server import Server


def _columns(table: str) -> list[dict[str, str]]:
    """Rows of a table as {header: cell} (columns are two or more spaces apart)."""
    header, *rows = (re.split(r" {2,}", line.strip()) for line in table.splitlines())
    assert all(len(row) == len(header) for row in rows), table
    return [dict(zip(header, row)) for row in rows]


def test_datasets_prints_an_aligned_table(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["datasets", server.address]) == 0
    out = capsys.readouterr().out
    rows = {row["NAME"]: row for row in _columns(out)}
    assert out.splitlines()[0].split() == ["NAME", "SAMPLES", "SAMPLE", "STRUCTURE"]
    assert rows["tensor"]["SAMPLES"] == "103"
    assert rows["tensor"]["SAMPLE STRUCTURE"] == "(Tensor[float32, 4], Tensor[int64, scalar])"
    assert rows["plain"]["SAMPLE STRUCTURE"].startswith("(Tensor[float32, 3], int)")
    # Numbers are right-aligned under their header.
    lines = out.splitlines()
    end = lines[0].index("SAMPLES") + len("SAMPLES")
    assert all(line[end - 1].isdigit() for line in lines[1:])


def test_datasets_json_has_stable_keys(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["datasets", server.address, "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert set(reply) == {"datasets", "replica_index", "num_replicas", "server_id"}
    assert (reply["replica_index"], reply["num_replicas"], reply["server_id"]) == (0, 1, server.id)
    by_name = {d["name"]: d for d in reply["datasets"]}
    assert by_name["tensor"] == {
        "name": "tensor",
        "length": 103,
        "sample_structure": "(Tensor[float32, 4], Tensor[int64, scalar])",
    }
    assert sorted(by_name) == ["nested", "plain", "tensor", "varlen"]


def test_table_sizes_are_human(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli._progress(1234, 5000) == "1,234/5,000 (24%)"
    assert cli._progress(0, 0) == "0/0"
    table = cli._table(["A", "NUMBER"], [["x", "1,234,567"], ["longer", "5"]], numeric=[1])
    assert table.splitlines() == ["A          NUMBER", "x       1,234,567", "longer          5"]


def test_datasets_reports_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["datasets", "127.0.0.1:1", "--timeout", "0.3"]) == 1
    assert "error:" in capsys.readouterr().err


def test_serve_rejects_bad_dataset_specs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--dataset", "nospec", "--port", "0"]) == 2
    assert "NAME=SPEC" in capsys.readouterr().err
    assert cli.main(["serve", "--dataset", "x=tape:/dev/st0", "--port", "0"]) == 2
    assert "unknown kind 'tape'" in capsys.readouterr().err


def test_demo_trains(capsys: pytest.CaptureFixture[str]) -> None:
    figures = run_demo(num_workers=1, epochs=2, samples=4096)
    out = capsys.readouterr().out
    assert "epoch 1: loss" in out and "samples/s" in out
    assert figures["samples_per_s"] > 0 and 0 <= figures["data_wait_share"] <= 1


def test_health_reports_serving_and_not_serving(tensor_ds, capsys: pytest.CaptureFixture[str]) -> None:
    srv = Server({"tensor": tensor_ds}, port=0, num_workers=0)
    address = srv.address
    assert cli.main(["health", address]) == 0
    assert cli.main(["health", address, "--service", "batchferry.v1.Loader"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{address}: SERVING"] * 2
    assert cli.main(["health", address, "--service", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    srv.close()
    assert cli.main(["health", address, "--timeout", "0.5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err or "DEADLINE_EXCEEDED" in capsys.readouterr().err


def test_health_and_listings_answer_while_every_stream_slot_is_taken(tensor_ds) -> None:
    """Probes must not fail under load: max_streams limits batch streams only."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from batchferry import errors
    from batchferry.client import DataLoader

    with (
        Server({"tensor": tensor_ds}, port=0, num_workers=1, max_streams=1) as srv,
        DataLoader(srv.address, "tensor", 4, prefetch_factor=1) as busy,
        DataLoader(srv.address, "tensor", 4, timeout=5) as refused,
    ):
        it = iter(busy)
        next(it)  # holds the only stream
        with grpc.insecure_channel(srv.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert len(refused) == 26  # the dataset listing is answered
        with pytest.raises(errors.ResourceExhausted, match="max_streams=1"):
            next(iter(refused))
        assert len(list(it)) == 25
