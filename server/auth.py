"""Who may use the server: TLS, mutual TLS and bearer tokens, and who a caller is.

* TLS (``tls_cert``, ``tls_key``): the channel is encrypted and the server proven.
* Mutual TLS (``tls_client_ca``): a client must present a certificate that CA signed.
* Tokens (``token_file`` and/or ``tokens``): every call but health checks (reflection
  included) carries ``authorization: Bearer TOKEN``; a server interceptor checks it in constant time
  against every accepted token. The file holds one token per line and is read again
  when it changes, so a Kubernetes Secret can rotate tokens: add the new one, move
  the clients, remove the old one.

A caller's identity (for per-peer limits and listings) is its token's fingerprint,
else its certificate's subject, else its IP address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

__all__ = ["AuthInterceptor", "Tokens", "identity", "is_loopback_peer", "server_credentials"]

log = logging.getLogger("batchferry.server")

# Health checks are answered without a token: probes carry none, and they reveal nothing.
# Reflection is not: no probe needs it, and each of its streams holds an RPC thread.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_MAX_TOKENS = 64


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Tokens:
    """The bearer tokens the server accepts (none: tokens are not required)."""

    def __init__(self, tokens: Sequence[str] = (), file: str | os.PathLike[str] | None = None) -> None:
        self._fixed = [_digest(t) for t in _clean(tokens, "tokens")]
        self._file = Path(file) if file else None
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._from_file: list[bytes] = []
        if self._file is not None:
            self._reload(required=True)

    @property
    def enabled(self) -> bool:
        return bool(self._fixed) or self._file is not None

    def _reload(self, *, required: bool = False) -> None:
        assert self._file is not None
        try:
            stat = self._file.stat()
            stamp = (stat.st_mtime, stat.st_size)
            if stamp == self._stamp:
                return
            lines = self._file.read_text().splitlines()
        except OSError as exc:
            if required:
                raise ValueError(f"token_file {self._file}: cannot read it ({exc.strerror})") from None
            log.warning("token file %s unreadable (%s); keeping the tokens read before", self._file, exc)
            return
        tokens = _clean(
            [line.strip() for line in lines if line.strip() and not line.startswith("#")], "token_file"
        )
        if required and not tokens:
            raise ValueError(f"token_file {self._file}: holds no token")
        self._from_file, self._stamp = [_digest(t) for t in tokens], stamp

    def check(self, presented: str) -> str | None:
        """The caller's identity when ``presented`` is an accepted token, else None."""
        if self._file is not None:
            with self._lock:
                self._reload()
        digest = _digest(presented)
        # Compare against every token, without stopping early: the time taken says nothing.
        ok = False
        for accepted in (*self._fixed, *self._from_file):
            ok |= hmac.compare_digest(digest, accepted)
        return f"token:{digest.hex()[:12]}" if ok and presented else None


def _clean(tokens: Sequence[str], where: str) -> list[str]:
    out = [t.strip() for t in tokens if t.strip()]
    if len(out) > _MAX_TOKENS:
        raise ValueError(f"{where}: at most {_MAX_TOKENS} tokens, got {len(out)}")
    for t in out:
        if len(t) < 16 or any(c.isspace() for c in t):
            raise ValueError(f"{where}: tokens must be at least 16 characters without spaces")
    return out


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return ""


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuse every call without an accepted token with UNAUTHENTICATED (health checks pass)."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        if self._tokens.check(_bearer(details.invocation_metadata)) is not None:
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or unknown token: give the loader token= (or BATCHFERRY_TOKEN), as the server's "
            "token_file or tokens name",
        )

    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (None without a certificate); ValueError naming the setting."""
    if not cert and not key:
        if client_ca:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (mutual TLS runs over TLS)")
        return None
    if not cert or not key:
        raise ValueError("tls_cert and tls_key go together: give both")
    pems = {name: _read(name, path) for name, path in (("tls_cert", cert), ("tls_key", key))}
    ca = _read("tls_client_ca", client_ca) if client_ca else None
    return grpc.ssl_server_credentials(
        [(pems["tls_key"], pems["tls_cert"])], root_certificates=ca, require_client_auth=ca is not None
    )


def _read(name: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name} {path}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{name} {path}: not a PEM file")
    return data


def identity(context: grpc.ServicerContext, tokens: Tokens) -> tuple[str, bool]:
    """Who is calling, and whether they proved it (a token or a client certificate)."""
    if tokens.enabled:
        who = tokens.check(_bearer(context.invocation_metadata()))
        if who is not None:
            return who, True
    auth = context.auth_context() or {}
    subject = auth.get("x509_common_name") or auth.get("x509_subject")
    if subject:
        return f"cert:{subject[0].decode(errors='replace')}", True
    return f"ip:{_peer_host(context.peer())}", False


def _peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``; ``ipv6:[::1]:5678`` -> ``::1``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") or rest
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


def is_loopback_peer(context: grpc.ServicerContext) -> bool:
    host = _peer_host(context.peer())
    try:
        return bool(ipaddress.ip_address(host.replace("%25", "%").split("%")[0]).is_loopback)
    except ValueError:
        return bool(context.peer().startswith("unix"))
