"""How a failed build is told: the exception's text for the server's log and for the
client (server paths reduced to file names, a bounded length), and a worker's death.

A client learns the class, message and traceback of what its dataset raised, never the
server's filesystem layout; the server's log keeps everything under an error id.
"""

from __future__ import annotations

import re
import signal

__all__ = ["DIED", "TRACEBACK_LIMIT", "death", "for_client", "message_of", "short_error"]

TRACEBACK_LIMIT = 8 << 10  # characters of a traceback (or message) a client is sent: the end
_PATH = re.compile(r"(?<![\w.~])(?:/[^\s'\"/:,;()\[\]]+)+/([^\s'\"/:,;()\[\]]*)")
_SHORT = 300
DIED = "builtins.RuntimeError"  # the class a batch whose worker died fails with, as torch's does
_CUT_TRACE = "Traceback (most recent call last):\n  [earlier lines cut]\n"
_CUT = "[...] "


def message_of(exc: BaseException) -> str:
    """``str(exc)``, or what ``traceback`` prints where that raises (a dataset's exception may:
    the worker reports it, it does not die of it)."""
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"


def short_error(exc: BaseException) -> str:
    """``Type: message`` for the server's log lines: no server paths (a file's name is kept),
    a few hundred characters at most. The whole traceback goes to the server's log."""
    text = _PATH.sub(r"\1", f"{type(exc).__name__}: {message_of(exc)}")
    return text if len(text) <= _SHORT else text[: _SHORT - 3] + "..."


def for_client(text: str, *, traceback: bool = False) -> str:
    """A message (or with ``traceback``, a formatted traceback) as a client is sent it: server
    paths reduced to file names as :func:`short_error` does, and at most
    ``TRACEBACK_LIMIT`` characters, its end kept (where a traceback names the failing line)."""
    text = _PATH.sub(r"\1", text)
    if len(text) <= TRACEBACK_LIMIT:
        return text
    mark = _CUT_TRACE if traceback else _CUT
    tail = text[len(text) - TRACEBACK_LIMIT + len(mark) :]
    # From a whole line (or word): never from the middle of a path.
    for sep in ("\n", " "):
        at = tail.find(sep)
        if 0 <= at < len(tail) // 2:
            tail = tail[at + 1 :]
            break
    return mark + tail


def death(pid: int, code: int | None) -> str:
    """How worker ``pid`` ended, for the log and the batch it was building."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker process {pid} was killed by {name}"
    return f"worker process {pid} died (exit code {code})"
