"""Packaging facts: generated code is fresh, public names are sorted and importable."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_proto_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2.py*"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed"
        assert committed.read_text() == (tmp_path / rel).read_text(), (
            f"{rel} is stale: run python scripts/gen_proto.py"
        )


def _modules() -> list[str]:
    """Every module of the package that declares ``__all__`` (generated code and the
    benchmarks, which import optional extras, aside)."""
    # The installed layout maps server/ and client/ into the package: walk each.
    roots = ["batchferry", "batchferry.server", "batchferry.client"]
    names = set(roots)
    for root in roots:
        path = importlib.import_module(root).__path__
        for info in pkgutil.walk_packages(path, f"{root}."):
            if not info.name.startswith(("batchferry.v1", "batchferry.benchmarks")):
                names.add(info.name)
    return sorted(n for n in names if "__all__" in vars(importlib.import_module(n)))


@pytest.mark.parametrize("module", _modules())
def test_all_is_sorted_and_importable(module: str) -> None:
    mod = importlib.import_module(module)
    names = list(mod.__all__)
    # isort style, as ruff keeps it: CONSTANTS, then Classes, then functions.
    kinds = {True: 0, False: 1}
    assert names == sorted(names, key=lambda n: (kinds[n.isupper()] if n[0].isupper() else 2, n)), (
        f"{module}.__all__ is not sorted"
    )
    for name in names:
        assert hasattr(mod, name), f"{module}.{name} is listed but missing"


def test_wheel_installs_only_the_batchferry_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("batchferry-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
        names = set(zf.namelist())
    assert tops == {
        "batchferry",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    for module in ("server/ring.py", "client/loader.py", "v1/loader_pb2.py", "py.typed"):
        assert f"batchferry/{module}" in names
