"""The benchmark harness runs end to end on tiny data (figures are not checked: speed is not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchferry import cli


def test_bench_writes_results_and_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHFERRY_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BATCHFERRY_BENCH_SCALE", "1")  # restored after the harness sets it
    out = tmp_path / "results"
    args = ["--log-level", "WARNING", "bench", "W1", "W4", "--reps", "1", "--scale", "0.001"]
    assert cli.main([*args, "--no-ceiling", "--out", str(out)]) == 0
    (result,) = out.glob("*.json")
    report = json.loads(result.read_text())
    assert set(report["workloads"]) == {"W1", "W4"}
    for res in report["workloads"].values():
        assert set(res["batchferry"]) == {"grpc", "shm"} and set(res["ratios"]) == {"grpc", "shm"}
        assert all(r["batches_per_s"] > 0 for r in res["torch"].values())
    assert result.with_suffix(".png").stat().st_size > 1000


def test_bench_rejects_unknown_workloads(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "W9", "--no-ceiling"]) == 2
    assert "unknown workload" in capsys.readouterr().err


def test_scale_bench_compares_replicas_with_one_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchferry.benchmarks.replicas import main as scale_main

    monkeypatch.setenv("BATCHFERRY_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BATCHFERRY_BENCH_SCALE", "1")
    report = scale_main(reps=1, num_workers=2, replicas=2, out=tmp_path, ids=("W1",), scale=0.001)
    w1 = report["workloads"]["W1"]
    assert set(w1["replicas_vs_one_server"]) == {"grpc", "shm"}
    assert all(r["batches_per_s"] > 0 for r in w1["2_replicas"].values())
    assert json.loads(next(tmp_path.glob("*-SCALE-*.json")).read_text())["replicas"] == 2
