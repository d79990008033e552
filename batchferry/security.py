"""How a client reaches a server: plaintext, TLS, mutual TLS, and a bearer token.

>>> sec = ClientSecurity.create(root_certificates="ca.pem", token_file="token")  # doctest: +SKIP
>>> channel = sec.channel("loader.example:50051")  # doctest: +SKIP

One object, made once per loader or CLI command, opens every channel and gives the
metadata every call carries. TLS is on when any certificate (or ``tls=True``, or
ready-made ``credentials``) is given; the token travels as ``authorization:
Bearer TOKEN`` on every call. A token sent without TLS beyond this host can be read
by anyone on the path: that is warned about once.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from batchferry import handshake, wire
from batchferry.errors import InvalidArgument

__all__ = ["TOKEN_ENV", "ClientSecurity", "read_token"]

log = logging.getLogger("batchferry.client")

TOKEN_ENV = "BATCHFERRY_TOKEN"

Pem = bytes | str | os.PathLike[str]


@dataclass(frozen=True)
class ClientSecurity:
    tls: bool = False
    root_certificates: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    token: str = ""
    credentials: grpc.ChannelCredentials | None = None
    server_name: str = ""  # the name the server's certificate must carry, if not the target's

    @classmethod
    def create(
        cls,
        *,
        tls: bool | None = None,
        root_certificates: Pem | None = None,
        client_cert: Pem | None = None,
        client_key: Pem | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
    ) -> ClientSecurity:
        """Check and load what the caller gave; InvalidArgument naming the argument otherwise.

        PEM arguments are the bytes themselves or a file's path. Without ``token`` the
        token comes from ``token_file``, else from the environment (``BATCHFERRY_TOKEN``).
        """
        if (client_cert is None) != (client_key is None):
            raise InvalidArgument("client_cert and client_key go together: give both, or neither")
        if credentials is not None and not isinstance(credentials, grpc.ChannelCredentials):
            raise InvalidArgument(f"credentials must be a grpc.ChannelCredentials, got {credentials!r}")
        if credentials is not None and (root_certificates or client_cert):
            raise InvalidArgument("give credentials, or root_certificates/client_cert/client_key, not both")
        if token is None and token_file is not None:
            token = read_token(token_file)
        if token is None:
            token = os.environ.get(TOKEN_ENV, "")
        if not isinstance(token, str) or any(c in token for c in "\r\n"):
            raise InvalidArgument("token must be a string on one line")
        wants_tls = credentials is not None or root_certificates is not None or client_cert is not None
        if tls is False and wants_tls:
            raise InvalidArgument("tls=False, but certificates or credentials were given")
        return cls(
            tls=bool(tls) or wants_tls,
            root_certificates=_pem("root_certificates", root_certificates),
            client_cert=_pem("client_cert", client_cert),
            client_key=_pem("client_key", client_key),
            token=token.strip(),
            credentials=credentials,
            server_name=server_name or "",
        )

    @property
    def settings(self) -> handshake.ClientTLS:
        """Which TLS settings this client gives, for errors that name the one to change."""
        return handshake.ClientTLS(
            tls=self.tls,
            root_certificates=self.root_certificates is not None,
            client_cert=self.client_cert is not None,
            credentials=self.credentials is not None,
        )

    def probe(self, target: str, timeout: float) -> handshake.ServerTLS:
        """How the server at ``target`` answers a TLS client (see :mod:`batchferry.handshake`)."""
        return handshake.probe(target, server_name=self.server_name, timeout=timeout)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, target: str, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        """A channel to ``target`` with this security (gRPC's standard channels)."""
        opts = list(options if options is not None else wire.CHANNEL_OPTIONS)
        if not self.tls:
            if self.token and not _local(target):
                log.warning("sending a token to %s without TLS: anyone on the path can read it", target)
            return grpc.insecure_channel(target, options=opts)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        creds = self.credentials or grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_key,
            certificate_chain=self.client_cert,
        )
        return grpc.secure_channel(target, creds, options=opts)


def read_token(path: str | os.PathLike[str]) -> str:
    """The token in a file: its first line that is not blank or a ``#`` comment."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InvalidArgument(f"token_file {path}: cannot read it ({exc.strerror})") from None
    token = next((line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
    if not token:
        raise InvalidArgument(f"token_file {path}: holds no token")
    return token


def _pem(name: str, value: Pem | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, (str, os.PathLike)):
        try:
            data = Path(value).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"{name} {value}: cannot read it ({exc.strerror})") from None
    else:
        raise InvalidArgument(f"{name} must be PEM bytes or a file path, got {type(value).__name__}")
    if b"-----BEGIN" not in data:
        raise InvalidArgument(f"{name}: not PEM data")
    return data


def _local(target: str) -> bool:
    host = target.rpartition(":")[0].strip("[]") if ":" in target else target
    if host == "localhost":
        return True
    try:
        return bool(ipaddress.ip_address(host).is_loopback)
    except ValueError:
        return False
