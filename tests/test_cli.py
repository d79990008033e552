"""The command line: datasets listing, demo, argument errors."""

from __future__ import annotations

import pytest

from batchferry import cli
from batchferry.demo import run_demo
from batchferry.server import Server


def test_datasets_lists_names_lengths_and_structure(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["datasets", server.address]) == 0
    lines = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["tensor"] == "103\t(Tensor[float32, 4], Tensor[int64, scalar])"
    assert lines["plain"].startswith("50\t(Tensor[float32, 3], int)")


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
