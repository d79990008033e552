"""TLS, mutual TLS and tokens: the right client is served, every other one is refused and served nothing."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
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

from checks import assert_same
from processes import free_port, wait_until

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


@pytest.fixture(scope="module")
def plain_server(tensor_ds) -> Iterator[Server]:
    with Server({"t": tensor_ds}, port=0, num_workers=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def token_server(tensor_ds) -> Iterator[Server]:
    with Server({"t": tensor_ds}, port=0, num_workers=0, tokens=TOKEN) as srv:
        yield srv


# Each way a client's TLS or token can miss the server's: (server, client arguments, error, words).
MISMATCHES = {
    "plaintext at TLS": ("tls", {}, errors.TLSError, "speaks TLS .* pass root_certificates= .* or tls=True"),
    "plaintext at mutual TLS": (
        "mtls",
        {},
        errors.TLSError,
        "speaks TLS .* and client_cert= and client_key=",
    ),
    "TLS at plaintext": ("plain", {"ca": True}, errors.TLSError, "does not speak TLS .* --tls-cert"),
    "tls=True at plaintext": ("plain", {"tls": True}, errors.TLSError, "does not speak TLS"),
    "untrusted CA": ("tls", {"ca": "rogue"}, errors.TLSError, "not signed by root_certificates="),
    "system CAs": ("tls", {"tls": True}, errors.TLSError, "not signed by this system's CAs"),
    "no client certificate": ("mtls", {"ca": True}, errors.TLSError, "requires a client certificate .* none"),
    "rogue client certificate": (
        "mtls",
        {"ca": True, "cert": "rogue"},
        errors.TLSError,
        "refused this loader's",
    ),
    "expired client certificate": (
        "mtls",
        {"ca": True, "cert": "expired"},
        errors.TLSError,
        "--tls-client-ca",
    ),
    "no token": ("token", {}, errors.Unauthenticated, "token"),
    "wrong token": ("token", {"token": OTHER}, errors.Unauthenticated, "token"),
}


@pytest.mark.parametrize("call", ["iter", "len"])
@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_tls_or_token_mismatch_fails_at_once_naming_what_to_change(
    request: pytest.FixtureRequest, pki: dict[str, object], case: str, call: str
) -> None:
    """No wait for ``timeout``: the refusal, the server and the setting to change, at once."""
    which, given, error, words = MISMATCHES[case]
    server = request.getfixturevalue(f"{which}_server")
    kwargs: dict[str, object] = {}
    if "ca" in given:
        kwargs["root_certificates"] = pki["ca"] if given["ca"] is True else pki["rogue"].cert  # type: ignore[attr-defined]
    if "cert" in given:
        pair = pki[str(given["cert"])]
        assert isinstance(pair, Pair)
        kwargs.update(client_cert=pair.cert, client_key=pair.key)
    kwargs.update({k: v for k, v in given.items() if k in ("tls", "token")})
    with DataLoader(server.address, "t", 10, timeout=30, **kwargs) as loader:  # type: ignore[arg-type]
        began = time.monotonic()
        with pytest.raises(error, match=words) as info:
            iter(loader) if call == "iter" else len(loader)
        assert time.monotonic() - began < 3
    assert server.address in str(info.value) or error is errors.Unauthenticated
    assert TOKEN not in str(info.value) and OTHER not in str(info.value) and "PRIVATE" not in str(info.value)
    assert issubclass(errors.TLSError, errors.ServerUnavailable)  # as before, for code that catches that


@pytest.mark.parametrize("tls", [False, True])
def test_a_server_not_up_yet_is_waited_for_until_timeout(pki: dict[str, object], tls: bool) -> None:
    """Nothing listens (yet): not a TLS failure, whatever the client's TLS; it waits for ``timeout``."""
    kwargs = {"root_certificates": pki["ca"]} if tls else {}
    with DataLoader(f"127.0.0.1:{free_port()}", "t", 10, timeout=1.5, **kwargs) as loader:  # type: ignore[arg-type]
        began = time.monotonic()
        with pytest.raises(errors.ServerUnavailable, match=r"not reachable within 1\.5s") as info:
            iter(loader)
        assert 1.4 < time.monotonic() - began < 5
    assert type(info.value) is errors.ServerUnavailable
    assert "Connection refused" in str(info.value)


@pytest.mark.parametrize("tls", [False, True])
def test_a_server_that_closes_every_connection_is_not_taken_for_tls(
    pki: dict[str, object], tls: bool
) -> None:
    """A peer that hangs up on every connection (a restarting server, a proxy with no
    backend) looks like a TLS refusal to gRPC: it is waited for, as a server not up yet."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        stop = threading.Event()

        def hang_up() -> None:
            listener.settimeout(0.1)
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    listener.accept()[0].close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        kwargs = {"root_certificates": pki["ca"]} if tls else {}
        try:
            address = f"127.0.0.1:{listener.getsockname()[1]}"
            with DataLoader(address, "t", 10, timeout=1.5, **kwargs) as loader:  # type: ignore[arg-type]
                began = time.monotonic()
                with pytest.raises(errors.ServerUnavailable, match="not reachable") as info:
                    iter(loader)
                assert time.monotonic() - began > 1.4
            assert type(info.value) is errors.ServerUnavailable
        finally:
            stop.set()
            thread.join()


def test_mutual_tls_serves_only_clients_the_ca_signed(
    mtls_server: Server, tensor_ds, pki: dict[str, object]
) -> None:
    good = pki["client"]
    assert isinstance(good, Pair)
    with DataLoader(
        mtls_server.address, "t", 10, root_certificates=pki["ca"], client_cert=good.cert, client_key=good.key
    ) as loader:
        assert_same(list(loader), _expected(tensor_ds))
    # Every other client: test_a_tls_or_token_mismatch_fails_at_once_naming_what_to_change


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
    port = free_port()
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
