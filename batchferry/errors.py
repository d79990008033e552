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
    ├── BatchTimeout           (also TimeoutError) no batch within ``timeout``
    └── ProtocolError          the peer sent bytes that break the wire contract

Every exception raised from ``grpc.RpcError`` keeps it as ``__cause__`` and carries
the status code name in ``code``.

A :class:`DatasetError` stands for one batch, as the worker's exception does in
torch's DataLoader: the loop may catch it, and the next ``next()`` yields the
batch after it. ``except KeyError:`` catches a server's ``KeyError`` as it catches
torch's, and ``except DatasetError:`` catches every dataset's error.
"""

from __future__ import annotations

import sys
from typing import Any, cast

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
    "dataset_error",
    "from_rpc_error",
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
