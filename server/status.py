"""How a stream ends early: the exceptions the stream code raises and the servicer turns into a status.

* :class:`Abort`: end the call with a gRPC status code and a message naming the problem;
* :class:`StreamGone`: the client went away or cancelled; nobody is left to tell.
"""

from __future__ import annotations

import logging
import secrets

import grpc

__all__ = ["Abort", "StreamGone", "dataset_failed", "invalid"]

log = logging.getLogger("batchferry.server")


class Abort(Exception):
    """End the call with ``code`` and ``details``; ``dataset_error`` marks the dataset's fault."""

    def __init__(self, code: grpc.StatusCode, details: str, *, dataset_error: bool = False) -> None:
        super().__init__(details)
        self.code, self.details, self.dataset_error = code, details, dataset_error


class StreamGone(Exception):
    """The client cancelled or went away (or the server is closing): stop quietly."""


def invalid(details: str) -> Abort:
    return Abort(grpc.StatusCode.INVALID_ARGUMENT, details)


def dataset_failed(dataset: str, index: int, error: str, detail: str = "") -> Abort:
    """The dataset or collate raised (or its worker died) while building batch ``index``.

    The client gets the exception's type and a short message, and an id; the server's
    log has the whole traceback under that id.
    """
    error_id = secrets.token_hex(4)
    log.error("dataset %r, batch %d failed [error %s]: %s\n%s", dataset, index, error_id, error, detail)
    return Abort(
        grpc.StatusCode.INTERNAL,
        f"dataset {dataset!r}, batch {index}: {error} [error {error_id}: details in the server log]",
        dataset_error=True,
    )
