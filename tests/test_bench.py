"""The benchmark harness runs end to end on tiny data (figures are not checked: speed is not tested)."""

from __future__ import annotations

import json
import os
import subprocess
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest

from batchferry import cli


def test_bench_writes_results_and_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHFERRY_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BATCHFERRY_BENCH_SCALE", "1")  # restored after the harness sets it
    out = tmp_path / "results"
    args = ["--log-level", "WARNING", "bench", "W1", "W4", "W4T", "--reps", "1", "--scale", "0.001"]
    assert cli.main([*args, "--no-ceiling", "--out", str(out)]) == 0
    (result,) = out.glob("*.json")
    report = json.loads(result.read_text())
    assert set(report["workloads"]) == {"W1", "W4", "W4T"}
    assert report["workloads"]["W4T"]["in_process"]["batchferry_gather_us"] > 0
    for res in report["workloads"].values():
        assert set(res["batchferry"]) == {"grpc", "shm"} and set(res["ratios"]) == {"grpc", "shm"}
        assert all(r["batches_per_s"] > 0 for r in res["torch"].values())
    assert result.with_suffix(".png").stat().st_size > 1000


def test_bench_writes_into_the_working_directory_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import batchferry.benchmarks

    package = Path(batchferry.benchmarks.__file__).resolve().parent
    before = sorted(package.rglob("*.json"))
    monkeypatch.setenv("BATCHFERRY_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BATCHFERRY_BENCH_SCALE", "1")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--log-level", "WARNING", "bench", "W1", "--reps", "1", "--scale", "0.001",
                     "--no-ceiling"]) == 0  # fmt: skip
    assert [p.suffix for p in sorted((tmp_path / "bench-results").iterdir())] == [".json", ".png"]
    assert sorted(package.rglob("*.json")) == before


def test_bench_rejects_unknown_names_and_options_none_takes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "W9", "--no-ceiling"]) == 2
    assert "unknown benchmark(s) ['W9']" in capsys.readouterr().err
    assert cli.main(["bench", "W1", "MEM", "--port", "9"]) == 2
    assert "--port applies to SCRAPE only" in capsys.readouterr().err


def test_every_registered_benchmark_takes_its_options() -> None:
    import inspect

    from batchferry.benchmarks import registry

    for name, bench in registry.benches().items():
        module, function = bench.run.split(":")
        params = inspect.signature(
            getattr(import_module(f"batchferry.benchmarks.{module}"), function)
        ).parameters
        wanted = {*bench.options, *(["out"] if bench.writes else []), *(["ids"] if bench.together else [])}
        assert wanted <= set(params), f"{name}: {bench.run} takes no {sorted(wanted - set(params))}"
        assert set(bench.options) <= set(registry.OPTIONS), name


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


def test_net_bench_measures_over_namespaces_and_removes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchferry.benchmarks import netns
    from batchferry.benchmarks.network import main as net_main

    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("BATCHFERRY_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BATCHFERRY_BENCH_SCALE", "1")
    report = net_main(reps=1, num_workers=1, out=tmp_path, scale=0.001, link_rates=(0, 10), tcp_seconds=0.5)
    assert set(report["links"]) == {"veth", "tbf 10 Gbit/s"}
    for link in report["links"].values():
        assert link["byte_stream"]["gb_per_s"] > 0 and link["raw_tcp_gb_per_s"] > 0
        assert link["runs"]["w2"][0]["transport"] == "grpc"
    assert report["links"]["tbf 10 Gbit/s"]["link_gb_per_s"] == 1.25
    assert json.loads(next(tmp_path.glob("*-NET.json")).read_text())["links"].keys() == report["links"].keys()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"{netns.PREFIX}{os.getpid()}-" not in names


def test_net_bench_says_why_it_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchferry.benchmarks.network import main as net_main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert net_main(out=tmp_path) == {"skipped": "network namespaces need root (running as uid 1000)"}
    assert "NET skipped: network namespaces need root" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_codec_comparison_round_trips_every_candidate() -> None:
    from batchferry.benchmarks import codecs

    tokens = np.arange(200_000, dtype=np.int64) % 977  # small ids in int64: shuffled, very compressible
    measured = {
        name: codecs.measure(tokens, codec, repeats=1, chunk=256 << 10)  # checks every chunk comes back
        for name, codec in codecs.candidates(tokens.dtype.itemsize).items()
        if codec is not None
    }
    assert {"lz4 block", "zstd 1", "blosc2 lz4 shuffle"} <= set(measured)
    assert all(r["ratio"] > 2 and r["compress_gb_s"] > 0 for r in measured.values()), measured
