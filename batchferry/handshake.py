"""The two sides of a TLS handshake, for telling a client why a server refused it.

gRPC names a handshake that fails on the client's side (an untrusted certificate, a
server that answers in plaintext), but when the *server* ends the handshake (a
plaintext client at a TLS server, a client without the certificate a mutual-TLS
server requires) the client sees only "Socket closed", as when a server restarts.
:func:`probe` then asks the server directly how it answers a TLS client:

>>> probe("127.0.0.1:50051")  # doctest: +SKIP
<ServerTLS.CLIENT_CERT: 'requires a client certificate'>

The probe checks nothing and presents nothing: it sends a TLS hello and, once a
handshake completes, the HTTP/2 connection preface. No token, no request, no key.
"""

from __future__ import annotations

import enum
import socket
import ssl
from dataclasses import dataclass

__all__ = ["ClientTLS", "ServerTLS", "probe"]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass(frozen=True)
class ClientTLS:
    """Which TLS settings a client gave (never their contents)."""

    tls: bool = False
    root_certificates: bool = False  # its own CA; else the system's
    client_cert: bool = False
    credentials: bool = False  # ready-made grpc.ChannelCredentials: what they hold is unknown


class ServerTLS(enum.Enum):
    """How a server answered a TLS client that presented no certificate."""

    PLAINTEXT = "answers a TLS hello in plaintext"
    TLS = "speaks TLS"
    CLIENT_CERT = "requires a client certificate"  # closed the connection right after the handshake
    UNKNOWN = "gave no clear answer"  # unreachable, or silent


def probe(target: str, *, server_name: str = "", timeout: float = 2.0) -> ServerTLS:
    """How the server at ``target`` (``host:port``, ``[v6]:port``) answers a TLS client."""
    address = _address(target)
    if address is None:
        return ServerTLS.UNKNOWN
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a look at the server, not a connection to trust
    context.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection(address, timeout=timeout)
    except OSError:
        return ServerTLS.UNKNOWN
    with raw:
        try:
            conn = context.wrap_socket(raw, server_hostname=server_name or address[0])
        except ssl.SSLEOFError:  # closed during the handshake: cannot tell
            return ServerTLS.UNKNOWN
        except ssl.SSLError as exc:
            return _refusal(exc) or ServerTLS.PLAINTEXT  # WRONG_VERSION_NUMBER and the like
        except OSError:  # reset or silent during the handshake: cannot tell
            return ServerTLS.UNKNOWN
        with conn:
            try:
                conn.sendall(_PREFACE)
                # A gRPC server answers the preface with its SETTINGS frame.
                return ServerTLS.TLS if conn.recv(1) else ServerTLS.CLIENT_CERT
            except ssl.SSLError as exc:
                return _refusal(exc) or ServerTLS.TLS
            except TimeoutError:
                return ServerTLS.TLS  # a TLS server, waiting for a request
            except OSError:
                return ServerTLS.CLIENT_CERT  # reset right after the handshake


def _refusal(exc: ssl.SSLError) -> ServerTLS | None:
    """The server's TLS alert, if ``exc`` is one."""
    reason = str(exc.reason or "")
    if "CERTIFICATE_REQUIRED" in reason:
        return ServerTLS.CLIENT_CERT
    return ServerTLS.TLS if "ALERT" in reason else None


def _address(target: str) -> tuple[str, int] | None:
    for scheme in ("ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)
