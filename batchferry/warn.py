"""Warnings that point at the caller's line, not at batchferry's.

A warning raised deep in the package (``len(loader)`` -> discovery -> the check that
warns) would name a line of batchferry with a fixed ``stacklevel``, and a different
one for each path that leads to it. :func:`warn` counts the frames instead: the
warning names the first frame outside the package, the user's line.
"""

from __future__ import annotations

import sys
import warnings
from types import FrameType

__all__ = ["stacklevel", "warn"]

_PACKAGE = __name__.partition(".")[0]


def stacklevel() -> int:
    """The ``stacklevel`` that names the first frame outside batchferry, for a
    ``warnings.warn`` called by the function that calls this one."""
    frame: FrameType | None = sys._getframe(2)  # the caller of our caller: level 2
    level = 2
    while frame is not None and _inside(frame) and frame.f_back is not None:
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside batchferry."""
    warnings.warn(message, category, stacklevel=stacklevel())


def _inside(frame: FrameType) -> bool:
    name = str(frame.f_globals.get("__name__", ""))
    return name == _PACKAGE or name.startswith(f"{_PACKAGE}.")
