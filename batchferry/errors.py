"""Exceptions raised by batchferry, and the one place gRPC errors map onto them.

::

    BatchferryError
    ├── InvalidArgument        (also ValueError)  a request field is wrong
    ├── NotFound               (also LookupError) unknown dataset or collate
    ├── ResourceExhausted      the server is out of slots, memory or streams
    ├── Unauthenticated        (also PermissionError) no token, or not one the server accepts
    ├── DatasetError           the dataset or collate raised on the server building a batch
    │   └── (its class)        also the dataset's own exception class, e.g. KeyError, where
    │                          the client has that class (see dataset_error)
    ├── ServerUnavailable      (also ConnectionError) cannot reach the server
    │   └── TLSError           the TLS handshake failed: this client's TLS settings do not fit the server's
    ├── BatchTimeout           (also TimeoutError) no batch within ``timeout``
    └── ProtocolError          the peer sent bytes that break the wire contract

Every exception raised from ``grpc.RpcError`` keeps it as ``__cause__`` and carries
the status code name in ``code``. A ``TLSError`` names the server, what failed and
the setting to change; it never carries a token or key material.

A :class:`DatasetError` stands for one batch, as the worker's exception does in
torch's DataLoader: the loop may catch it, and the next ``next()`` yields the
batch after it. ``except KeyError:`` catches a server's ``KeyError`` as it catches
torch's, and ``except DatasetError:`` catches every dataset's error.
"""

from __future__ import annotations

import re
import sys
from typing import Any, cast

import grpc

from batchferry.handshake import ClientTLS, ServerTLS

__all__ = [
    "BatchTimeout",
    "BatchferryError",
    "DatasetError",
    "InvalidArgument",
    "NotFound",
    "ProtocolError",
    "ResourceExhausted",
    "ServerSideWarning",
    "ServerUnavailable",
    "TLSError",
    "Unauthenticated",
    "closed_in_handshake",
    "dataset_error",
    "from_rpc_error",
    "refused_at_handshake",
    "unreachable",
]

# Trailing-metadata key with which servers that predate per-batch error frames
# ended a call whose batch the dataset failed to build.
DATASET_ERROR_KEY = "batchferry-dataset-error"


class BatchferryError(Exception):
    """Base class of every error batchferry raises."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(BatchferryError, ValueError):
    """A request field (or client argument) has a value the server refuses."""

    code = "INVALID_ARGUMENT"


class NotFound(BatchferryError, LookupError):
    """The named dataset or collate function does not exist on the server."""

    code = "NOT_FOUND"


class ResourceExhausted(BatchferryError):
    """The server cannot take the request now (slots, memory, concurrent streams)."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(BatchferryError, PermissionError):
    """The server requires a token (or a client certificate) this client did not present."""

    code = "UNAUTHENTICATED"


class DatasetError(BatchferryError):
    """The dataset's ``__getitem__``/``__getitems__`` or the collate raised on the server
    (or its worker process died) while building one batch; made by :func:`dataset_error`."""

    code = "INTERNAL"
    #: The class the server's dataset raised, as ``module.qualname`` ("" when not known).
    error_type: str = ""
    #: Its traceback on the server, paths reduced to file names ("" when there is none).
    server_traceback: str = ""


class ServerUnavailable(BatchferryError, ConnectionError):
    """The server could not be reached, or went away."""

    code = "UNAVAILABLE"


class TLSError(ServerUnavailable):
    """The TLS handshake with the server failed: a plaintext client at a TLS server (or
    the other way round), a server certificate the client does not trust, a client
    certificate the server requires or refuses. Waiting does not help: it is raised at once."""


class BatchTimeout(BatchferryError, TimeoutError):
    """No batch arrived within the loader's ``timeout``."""

    code = "DEADLINE_EXCEEDED"


class ProtocolError(BatchferryError):
    """The peer sent a message that does not follow the batchferry wire contract."""

    code = "INTERNAL"


class ServerSideWarning(UserWarning):
    """A torch DataLoader argument that the server's settings decide (num_workers, ...)."""


_BY_CODE: dict[grpc.StatusCode, type[BatchferryError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailable,
    # A call this client did not cancel was cancelled by the server: it is going away
    # (a restart, a rolling update), so the loader reconnects as for UNAVAILABLE.
    grpc.StatusCode.CANCELLED: ServerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: BatchTimeout,
}


def from_rpc_error(
    exc: grpc.RpcError, *, server: str = "", client: ClientTLS | None = None
) -> BatchferryError:
    """The batchferry exception for a failed call (raise it ``from exc``); with the
    ``server``'s address and the ``client``'s TLS settings, a TLSError for a handshake
    that failed on this side."""
    code, details = _status(exc)
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    if any(key == DATASET_ERROR_KEY for key, _ in trailing or ()):
        return DatasetError(details or "dataset raised", code=code.name)
    if code == grpc.StatusCode.UNAVAILABLE and client is not None:
        failed = _handshake_failure(server, client, details)
        if failed is not None:
            return failed
    cls = _BY_CODE.get(code, BatchferryError)
    return cls(f"{code.name}: {details}", code=code.name)


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code: grpc.StatusCode = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    return code, (exc.details() if hasattr(exc, "details") else str(exc)) or ""


# What gRPC says of the last connection attempt, after "last error: " (grpcio 1.6x-1.8x):
# a status name, the address, then the reason.
_LAST_ERROR = re.compile(r"last error: (?:[A-Z_]+: )?(?:(?:ipv4|ipv6|unix):\S+?: )?(.*)")
_VERIFY = re.compile(r"CERTIFICATE_VERIFY_FAILED(?:: ([^:]+))?")


def _reason(details: str) -> str:
    """The reason of gRPC's last connection attempt, without its status name and address."""
    match = _LAST_ERROR.search(details)
    return (match.group(1) if match else details).removesuffix(": OK").strip()


def _handshake_failure(server: str, client: ClientTLS, details: str) -> TLSError | None:
    """A TLSError for a handshake that gRPC reports failed on this side, else None."""
    reason = _reason(details)
    if "WRONG_VERSION_NUMBER" in details:
        return TLSError(
            f"server {server} does not speak TLS (it answered this loader's TLS handshake in "
            "plaintext): connect without tls=, root_certificates= and client_cert=, or start the server "
            "with --tls-cert and --tls-key"
        )
    verify = _VERIFY.search(details)
    if verify is not None:
        why = verify.group(1) or "verification failed"
        if "expired" in why:
            return TLSError(f"server {server}'s TLS certificate has expired ({why}): renew its --tls-cert")
        if client.credentials:
            trusted = "the root certificates in credentials="
        elif client.root_certificates:
            trusted = "root_certificates="
        else:
            trusted = "this system's CAs"
        return TLSError(
            f"server {server}'s TLS certificate is not signed by {trusted} ({why}): pass the CA that "
            "signed the server's --tls-cert as root_certificates="
        )
    if "Hostname Verification" in details or "Peer name" in details:
        host = server.rpartition(":")[0] or server
        return TLSError(
            f"server {server}'s TLS certificate does not name {host}: connect by a name the "
            "certificate carries, or give the server a certificate for this one"
        )
    if "andshake failed" in details or "SSL_ERROR" in details:
        return TLSError(
            f"TLS handshake with server {server} failed ({reason}): check tls=, "
            "root_certificates= and client_cert= against the server's --tls-* settings"
        )
    return None


def closed_in_handshake(exc: grpc.RpcError) -> bool:
    """Whether the server closed the connection before it was set up: it may have refused
    this client's TLS (or lack of it), which only :func:`refused_at_handshake` can tell."""
    code, details = _status(exc)
    return code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in details


def refused_at_handshake(server: str, client: ClientTLS, seen: ServerTLS) -> TLSError | None:
    """A TLSError if how the server answers a TLS client (:func:`~batchferry.handshake.probe`)
    explains why it closed this client's connection, else None (a restart, say)."""
    if not client.tls and seen in (ServerTLS.TLS, ServerTLS.CLIENT_CERT):
        also = ", and client_cert= and client_key= (it requires a client certificate)"
        return TLSError(
            f"server {server} speaks TLS and this loader connected in plaintext: pass root_certificates= "
            f"(the CA that signed the server's certificate) or tls=True (this system's CAs)"
            f"{also if seen is ServerTLS.CLIENT_CERT else ''}"
        )
    if client.tls and seen is ServerTLS.CLIENT_CERT:
        if client.client_cert:
            return TLSError(
                f"server {server} refused this loader's client certificate: client_cert= must be signed "
                "by the CA the server trusts (its --tls-client-ca) and be valid now (not expired)"
            )
        if client.credentials:
            return TLSError(
                f"server {server} requires a client certificate (mutual TLS) and refused the one in "
                "credentials=, if any: it must be signed by the CA the server trusts (its --tls-client-ca)"
            )
        return TLSError(
            f"server {server} requires a client certificate (mutual TLS) and this loader presented none: "
            "pass client_cert= and client_key=, signed by the CA the server trusts (its --tls-client-ca)"
        )
    return None


def unreachable(server: str, timeout: float, last: grpc.RpcError | None = None) -> ServerUnavailable:
    """No answer from ``server`` within ``timeout``; ``last``: the last attempt's error."""
    why = f" ({_reason(_status(last)[1])})" if last is not None else ""
    return ServerUnavailable(f"server {server} not reachable within {timeout:.3g}s{why}")


def dataset_error(type_name: str, message: str, traceback: str, where: str) -> DatasetError:
    """The exception for a batch the server's dataset failed to build, made as torch's
    ``ExceptionWrapper.reraise`` makes a worker's: ``Caught KeyError in batchferry server
    HOST:PORT (dataset 'train', batch 7).`` then ``Original Traceback ...`` (``where`` is
    the part after ``Caught KeyError``).

    ``type_name`` (module.qualname) names the class the dataset raised. The exception
    is an instance of that class and of :class:`DatasetError` when the class is one the
    client already has: a builtin, or in a module already imported (a module a server
    names is never imported: that would run code of the server's choosing) and an
    ``Exception``. Otherwise, or when that class cannot be made from a message (torch
    then raises ``RuntimeError``), it is a plain :class:`DatasetError` naming the type.
    """

    def text(name: str) -> str:
        return f"Caught {name} {where}.\n" + (f"Original {traceback}" if traceback else message)

    cls = _known_class(type_name)
    exc = _made(cls, text(cls.__name__)) if cls is not None else None
    if exc is None:
        exc = DatasetError(text(type_name))
    exc.error_type, exc.server_traceback = type_name, traceback
    return exc


class _KeyErrorMessage(str):
    """A message whose repr is itself: ``str(KeyError(m))`` is ``repr(m)``, which would quote
    the whole traceback on one line (torch works around it the same way)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str.__str__(self)


def _known_class(type_name: str) -> type[Exception] | None:
    """The ``Exception`` class ``type_name`` names in a module already imported, else None.
    Looked up in the modules' and classes' own dictionaries: nothing is imported or run."""
    parts = type_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        found: object = sys.modules.get(".".join(parts[:cut]))
        if found is None:
            continue
        for part in parts[cut:]:
            found = getattr(found, "__dict__", {}).get(part)
        if isinstance(found, type) and issubclass(found, Exception):
            return found
        return None
    return None


def _made(cls: type[Exception], message: str) -> DatasetError | None:
    """An instance of ``cls`` and DatasetError with ``message``, as torch makes one of ``cls``;
    None when the class cannot be made or will not take a message."""
    try:
        made = cls if issubclass(cls, DatasetError) else _with_dataset_error(cls)
        if issubclass(cls, KeyError):
            message = _KeyErrorMessage(message)
        elif getattr(cls, "message", None):  # some classes take it by that name (as in torch)
            try:
                return made(message=message)
            except Exception:
                pass
        return made(message)
    except Exception:
        return None


_COMBINED: dict[type[Exception], type[DatasetError]] = {}


def _with_dataset_error(cls: type[Exception]) -> type[DatasetError]:
    """``cls`` and DatasetError in one class, named as ``cls`` is (made once per class)."""
    combined = _COMBINED.get(cls)
    if combined is None:
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__reduce__": _reduce,
        }
        made = cast("type[DatasetError]", type(cls.__name__, (cls, DatasetError), namespace))
        combined = _COMBINED.setdefault(cls, made)
    return combined


def _reduce(self: BaseException) -> tuple[Any, ...]:
    # Pickled by the class it stands for: its own name is that class's.
    return (_remade, (type(self).__bases__[0], self.args), self.__dict__)


def _remade(cls: type[Exception], args: tuple[Any, ...]) -> DatasetError:
    return _with_dataset_error(cls)(*args)
