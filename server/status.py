"""How a stream ends early: the exceptions the stream code raises and the servicer turns into a status.

* :class:`Abort`: end the call with a gRPC status code and a message naming the problem;
* :class:`StreamGone`: the client went away or cancelled; nobody is left to tell.
"""

from __future__ import annotations

import grpc

__all__ = ["Abort", "StreamGone", "invalid"]


class Abort(Exception):
    """End the call with ``code`` and ``details``; with ``dataset_error`` the client raises a
    DatasetError (the dataset's side failed, not the request)."""

    def __init__(self, code: grpc.StatusCode, details: str, *, dataset_error: bool = False) -> None:
        super().__init__(details)
        self.code, self.details, self.dataset_error = code, details, dataset_error


class StreamGone(Exception):
    """The client cancelled or went away (or the server is closing): stop quietly."""


def invalid(details: str) -> Abort:
    return Abort(grpc.StatusCode.INVALID_ARGUMENT, details)
