"""TLS, mutual TLS and tokens: the right client is served, every other one is refused and served nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from certs import Authority, Pair
from torch.utils.data import DataLoader as TorchLoader

from batchferry import cli, errors, wire
from batchferry.client import DataLoader
from batchferry.client import replicas as replicas_mod
from batchferry.server import Server
from batchferry.server.auth import Tokens

from support import assert_same, wait_until

TOKEN = "s3cret-token-of-the-tests-0001"
OTHER = "s3cret-token-of-the-tests-0002"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(folder, "test CA"), Authority(folder, "rogue CA")
    return {
        "ca": ca.pem,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "expired": ca.issue("expired", server=False, expired=True),
        "rogue": rogue.issue("rogue-client", server=False),
        "named": ca.issue("named", server=True, names=("loader.example",)),  # a Service's name only
    }


def _expected(tensor_ds: torch.utils.data.TensorDataset) -> list[object]:
    return list(TorchLoader(tensor_ds, 10))


@pytest.fixture(scope="module")
def tls_server(tensor_ds, pki: dict[str, object]) -> Iterator[Server]:
    server = pki["server"]
    assert isinstance(server, Pair)
    with Server(
        {"t": tensor_ds}, port=0, num_workers=0, tls_cert=str(server.cert), tls_key=str(server.key)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_server(tensor_ds, pki: dict[str, object]) -> Iterator[Server]:
    server = pki["server"]
    assert isinstance(server, Pair)
    with Server(
        {"t": tensor_ds}, port=0, num_workers=0, tls_cert=str(server.cert), tls_key=str(server.key),
        tls_client_ca=str(pki["ca"]),
    ) as srv:  # fmt: skip
        yield srv


def test_tls_serves_a_client_that_trusts_the_ca(
    tls_server: Server, tensor_ds, pki: dict[str, object]
) -> None:
    with DataLoader(tls_server.address, "t", 10, root_certificates=pki["ca"], transport="grpc") as loader:
        assert_same(list(loader), _expected(tensor_ds))


@pytest.mark.parametrize("receivers", [False, True])
def test_replicas_found_by_name_are_checked_against_that_name(
    tensor_ds, pki: dict[str, object], monkeypatch: pytest.MonkeyPatch, receivers: bool
) -> None:
    """Pods are reached by address, but their certificate names the Service: the loader and
    its receiver processes check it against the name."""
    named = pki["named"]
    assert isinstance(named, Pair)
    with Server(
        {"t": tensor_ds}, port=0, num_workers=0, tls_cert=str(named.cert), tls_key=str(named.key)
    ) as srv:
        monkeypatch.setattr(replicas_mod, "resolve", lambda name, port: [f"127.0.0.1:{port}"])
        with DataLoader(
            f"dns:///loader.example:{srv.port}", "t", 10, root_certificates=pki["ca"], transport="grpc",
            receive_processes=receivers, timeout=20,
        ) as loader:  # fmt: skip
            assert_same(list(loader), _expected(tensor_ds))


@pytest.mark.parametrize("how", ["plaintext", "untrusted CA"])
def test_tls_refuses_a_client_that_cannot_check_it(
    tls_server: Server, pki: dict[str, object], how: str
) -> None:
    kwargs = {} if how == "plaintext" else {"root_certificates": Path(str(pki["rogue"].cert))}  # type: ignore[attr-defined]
    with DataLoader(tls_server.address, "t", 10, timeout=2, **kwargs) as loader:  # type: ignore[arg-type]
        with pytest.raises(errors.ServerUnavailable):
            next(iter(loader))


def test_mutual_tls_serves_only_clients_the_ca_signed(
    mtls_server: Server, tensor_ds, pki: dict[str, object]
) -> None:
    good = pki["client"]
    assert isinstance(good, Pair)
    with DataLoader(
        mtls_server.address, "t", 10, root_certificates=pki["ca"], client_cert=good.cert, client_key=good.key
    ) as loader:
        assert_same(list(loader), _expected(tensor_ds))
    for name in ("none", "expired", "rogue"):
        kwargs: dict[str, object] = {"root_certificates": pki["ca"]}
        if name != "none":
            pair = pki[name]
            assert isinstance(pair, Pair)
            kwargs.update(client_cert=pair.cert, client_key=pair.key)
        with DataLoader(mtls_server.address, "t", 10, timeout=2, **kwargs) as loader:  # type: ignore[arg-type]
            with pytest.raises(errors.ServerUnavailable):
                next(iter(loader))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# accepted tokens\n{TOKEN}\n")
    return path


def test_tokens_are_required_checked_and_rotated(tensor_ds, token_file: Path) -> None:
    with Server({"t": tensor_ds}, port=0, num_workers=0, token_file=str(token_file)) as srv:
        for token in (None, "", OTHER, TOKEN[:-1]):
            with DataLoader(srv.address, "t", 10, token=token) as loader:
                with pytest.raises(errors.Unauthenticated, match="token"):
                    next(iter(loader))
            # Nothing is served on the raw wire either.
            with grpc.insecure_channel(srv.address) as channel:
                call = channel.unary_unary(
                    wire.LIST_JOBS, request_serializer=None, response_deserializer=None
                )
                with pytest.raises(grpc.RpcError) as info:
                    call(b"", timeout=10, metadata=(("authorization", f"Bearer {token}"),) if token else ())
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with DataLoader(srv.address, "t", 10, token=TOKEN) as loader:
            assert_same(list(loader), _expected(tensor_ds))
        # Rotation: the new token is added, clients move, the old one goes.
        token_file.write_text(f"{TOKEN}\n{OTHER}\n")
        with DataLoader(srv.address, "t", 10, token=OTHER) as loader:
            assert len(list(loader)) == 11
        token_file.write_text(f"{OTHER}\n")
        with DataLoader(srv.address, "t", 10, token=TOKEN) as loader:
            with pytest.raises(errors.Unauthenticated):
                next(iter(loader))
        # Health checks need no token (probes carry none).
        assert cli.main(["health", srv.address]) == 0


def test_token_from_the_environment_and_the_cli(
    tensor_ds,
    token_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Server({"t": tensor_ds}, port=0, num_workers=0, tokens=f"{TOKEN},{OTHER}") as srv:
        monkeypatch.setenv("BATCHFERRY_TOKEN", OTHER)
        with DataLoader(srv.address, "t", 10) as loader:
            assert len(list(loader)) == 11
        monkeypatch.delenv("BATCHFERRY_TOKEN")
        assert cli.main(["datasets", srv.address, "--timeout", "5"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert cli.main(["datasets", srv.address, "--token-file", str(token_file)]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["t", "103"]


def test_tokens_must_be_strong_and_files_readable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        Tokens(["short"])
    with pytest.raises(ValueError, match="cannot read it"):
        Tokens(file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        Tokens(file=tmp_path / "empty")


def test_tls_settings_are_checked_naming_the_setting(
    tensor_ds, tmp_path: Path, pki: dict[str, object]
) -> None:
    server = pki["server"]
    assert isinstance(server, Pair)
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        Server({"t": tensor_ds}, port=0, num_workers=0, tls_cert=str(server.cert))
    with pytest.raises(ValueError, match="tls_client_ca needs tls_cert"):
        Server({"t": tensor_ds}, port=0, num_workers=0, tls_client_ca=str(pki["ca"]))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"tls_cert .*junk\.pem: not a PEM file"):
        Server(
            {"t": tensor_ds},
            port=0,
            num_workers=0,
            tls_cert=str(tmp_path / "junk.pem"),
            tls_key=str(server.key),
        )


def test_health_port_answers_plaintext_probes_of_a_tls_server(tensor_ds, pki: dict[str, object]) -> None:
    server = pki["server"]
    assert isinstance(server, Pair)
    port = _free_port()
    with Server(
        {"t": tensor_ds}, port=0, num_workers=0, tls_cert=str(server.cert), tls_key=str(server.key),
        health_port=port,
    ) as srv:  # fmt: skip
        assert srv.health_port == port
        assert cli.main(["health", f"127.0.0.1:{port}"]) == 0
        assert cli.main(["health", srv.address, "--ca", str(pki["ca"])]) == 0
        # The plaintext port serves health only.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                wire.LIST_DATASETS, request_serializer=None, response_deserializer=None
            )
            with pytest.raises(grpc.RpcError) as info:
                call(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _free_port() -> int:
    from support import free_port

    return free_port()


def test_serve_warns_when_it_listens_beyond_loopback_unprotected(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchferry.cli", "serve", "--dataset", "s=synthetic:n=16,shape=2",
         "--host", "0.0.0.0", "--port", "0", "--num-workers", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and "serving" in proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "without TLS or tokens" in err
    assert wait_until(lambda: proc.poll() is not None)
