"""Exceptions raised by batchferry, and the one place gRPC errors map onto them.

::

    BatchferryError
    ├── InvalidArgument        (also ValueError)  a request field is wrong
    ├── NotFound               (also LookupError) unknown dataset or collate
    ├── ResourceExhausted      the server is out of slots, memory or streams
    ├── Unauthenticated        (also PermissionError) no token, or not one the server accepts
    ├── DatasetError           the dataset or collate raised on the server
    ├── ServerUnavailable      (also ConnectionError) cannot reach the server
    ├── BatchTimeout           (also TimeoutError) no batch within ``timeout``
    └── ProtocolError          the peer sent bytes that break the wire contract

Every exception raised from ``grpc.RpcError`` keeps it as ``__cause__`` and carries
the status code name in ``code``.
"""

from __future__ import annotations

import grpc

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
    "Unauthenticated",
    "from_rpc_error",
]

# Trailing-metadata key the server sets when user code (dataset, collate) failed,
# so the client can tell that apart from a server fault.
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
    """The dataset's ``__getitem__``/``__getitems__`` or the collate raised on the server."""

    code = "INTERNAL"


class ServerUnavailable(BatchferryError, ConnectionError):
    """The server could not be reached, or went away."""

    code = "UNAVAILABLE"


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


def from_rpc_error(exc: grpc.RpcError) -> BatchferryError:
    """The batchferry exception for a failed call (raise it ``from exc``)."""
    code: grpc.StatusCode = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    if any(key == DATASET_ERROR_KEY for key, _ in trailing or ()):
        return DatasetError(details or "dataset raised", code=code.name)
    cls = _BY_CODE.get(code, BatchferryError)
    return cls(f"{code.name}: {details}", code=code.name)
