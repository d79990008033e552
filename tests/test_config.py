"""`batchferry serve` settings: flags, environment and a TOML file, checked with errors naming the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchferry import cli
from batchferry.server.config import (
    KEYS,
    ConfigError,
    ServerConfig,
    flag_name,
    format_size,
    has_flag,
    load_settings,
    parse_size,
    statefulset_ordinal,
)

DATASET = "synthetic:n=64,shape=4"


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return str(path)


def _serve_flags() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    return [opt for action in serve._actions for opt in action.option_strings if opt.startswith("--")]


def test_every_serve_flag_has_a_file_key_and_an_environment_variable(tmp_path: Path) -> None:
    flags = set(_serve_flags()) - {"--help", "--config"}
    # --log-level is the global flag; secrets have no flag.
    assert {flag_name(key) for key in KEYS if has_flag(key)} == flags | {"--log-level"}
    text = f"""
        host = "127.0.0.1"
        port = 6000
        num_workers = 3
        slots = 12
        shm_bytes = "64MiB"
        chunk_bytes = 262144
        max_streams = 9
        job_idle_s = 12.5
        replica_index = 1
        num_replicas = 2
        import = ["json"]
        log_level = "warning"
        [datasets]
        a = "{DATASET}"
    """
    settings = load_settings({"config": _write(tmp_path, text)}, environ={})
    cfg = settings.server
    assert (cfg.host, cfg.port, cfg.num_workers, cfg.slots) == ("127.0.0.1", 6000, 3, 12)
    assert (cfg.shm_bytes, cfg.chunk_bytes, cfg.max_streams, cfg.job_idle_s) == (64 << 20, 262144, 9, 12.5)
    assert (cfg.replica_index, cfg.num_replicas) == (1, 2)
    assert settings.imports == ("json",) and settings.log_level == "WARNING"
    assert settings.datasets == {"a": DATASET}


def test_flags_win_over_environment_which_wins_over_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, f'port = 1\nnum_workers = 1\nmax_streams = 5\n[datasets]\na = "{DATASET}"\n')
    env = {"BATCHFERRY_CONFIG": path, "BATCHFERRY_PORT": "2", "BATCHFERRY_NUM_WORKERS": "4",
           "BATCHFERRY_DATASETS": f"b={DATASET}; c={DATASET}"}  # fmt: skip
    settings = load_settings({"port": 3, "datasets": ["c=synthetic:n=8,shape=2"]}, environ=env)
    cfg = settings.server
    assert (cfg.port, cfg.num_workers, cfg.max_streams) == (3, 4, 5)
    assert settings.datasets == {"a": DATASET, "b": DATASET, "c": "synthetic:n=8,shape=2"}
    assert settings.origins["port"] == "flag --port"
    assert settings.origins["num_workers"] == "environment BATCHFERRY_NUM_WORKERS"
    assert settings.origins["max_streams"] == f"config file {path} key 'max_streams'"
    assert settings.server.host == "127.0.0.1"  # serve listens on loopback unless told otherwise


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("num_worker = 2", "unknown key 'num_worker'; did you mean 'num_workers'?"),
        ("colour = 2", "unknown key 'colour'; known keys: cache_bytes"),
        ('port = "high"', "key 'port': must be an integer, got 'high'"),
        ("port = 70000", "key 'port': port must be in [0, 65535], got 70000"),
        ("num_workers = true", "key 'num_workers': must be an integer, got True"),
        ('shm_bytes = "lots"', "key 'shm_bytes': must be a size"),
        ("job_idle_s = -1", "key 'job_idle_s': job_idle_s must be > 0"),
        ('log_level = "loud"', "key 'log_level': must be one of DEBUG"),
        ("import = [1]", "key 'import': must be a list of module names"),
        ("datasets = 3", "key 'datasets': must be a table"),
        ("[datasets]\nx = 3", "key 'datasets': dataset 'x' must be a spec string"),
        (
            "num_replicas = 3\nreplica_index = 3",
            "key 'replica_index': replica_index must be in [0, num_replicas=3)",
        ),
        ("port = [", "not valid TOML"),
    ],
)
def test_file_errors_name_the_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    datasets = "" if "datasets" in text else f'\n[datasets]\na = "{DATASET}"\n'
    path = _write(tmp_path, text + datasets)
    with pytest.raises(ConfigError) as info:
        load_settings({"config": path}, environ={})
    assert f"config file {path}" in str(info.value)
    assert needle in str(info.value)


def test_environment_and_flag_errors_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment BATCHFERRY_MAX_STREAMS: must be an integer"):
        load_settings({"datasets": [f"a={DATASET}"]}, environ={"BATCHFERRY_MAX_STREAMS": "many"})
    with pytest.raises(ConfigError, match="flag --dataset: expects NAME=SPEC, got 'nospec'"):
        load_settings({"datasets": ["nospec"]}, environ={})
    with pytest.raises(ConfigError, match=r"config file .*missing.toml: not found"):
        load_settings({"config": str(tmp_path / "missing.toml")}, environ={})
    with pytest.raises(ConfigError, match="datasets: none given"):
        load_settings({}, environ={})
    with pytest.raises(ConfigError, match="flag --max-streams: max_streams must be >= 1"):
        load_settings({"datasets": [f"a={DATASET}"], "max_streams": 0}, environ={})


def test_replica_index_defaults_to_the_statefulset_ordinal() -> None:
    base = {"datasets": [f"a={DATASET}"], "num_replicas": 4}
    assert load_settings(base, environ={}, hostname="batchferry-2").server.replica_index == 2
    assert load_settings(base, environ={"HOSTNAME": "loader-x-3"}).server.replica_index == 3
    assert (
        load_settings({**base, "replica_index": 1}, environ={}, hostname="batchferry-2").server.replica_index
        == 1
    )
    with pytest.raises(ConfigError, match="does not end in a StatefulSet ordinal"):
        load_settings(base, environ={}, hostname="laptop")
    with pytest.raises(
        ConfigError, match=r"host name 'loader-7': replica_index must be in \[0, num_replicas=4\)"
    ):
        load_settings(base, environ={}, hostname="loader-7")
    # One replica never needs an ordinal.
    assert (
        load_settings({"datasets": [f"a={DATASET}"]}, environ={}, hostname="laptop").server.replica_index == 0
    )
    assert statefulset_ordinal("web-12") == 12 and statefulset_ordinal("web") is None


def test_serve_reports_setting_errors_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, f'num_worker = 2\n[datasets]\na = "{DATASET}"\n')
    assert cli.main(["serve", "--config", path]) == 2
    assert "unknown key 'num_worker'" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(number=st.integers(0, 2**40), unit=st.sampled_from(["", "KiB", "MiB", "GiB", "k", "m", "g"]))
def test_parse_size_reads_every_unit(number: int, unit: str) -> None:
    factor = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    assert parse_size(f"{number}{unit}") == number * factor[unit]
    assert parse_size(format_size(number)) == number


@pytest.mark.parametrize("text", ["infGiB", "nanMiB", "-1GiB", "lots", "", "1.5.2KiB", "GiB"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="must be a size"):
        parse_size(text)


def test_serve_help_states_the_defaults_the_server_uses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {format_size(ServerConfig().chunk_bytes)})" in text
    assert "(default 4GiB)" in text and "(default 127.0.0.1)" in text
    assert "--tokens" not in text  # secrets stay off the command line
