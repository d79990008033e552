"""What every file-reading source shares: spec options, errors that name the file, optional imports."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Collection
from pathlib import Path
from types import ModuleType
from typing import Any

from batchferry.errors import DatasetError

__all__ = [
    "MissingDependency",
    "SampleError",
    "load_callable",
    "parse_bool",
    "parse_hw",
    "relative",
    "require",
    "split_options",
]


class SampleError(DatasetError):
    """A file behind sample ``index`` is missing or corrupt.

    ``file`` is relative to the dataset's root, so the message reads the same on
    every host that mounts the data elsewhere.
    """

    def __init__(self, index: int, file: str, reason: str) -> None:
        super().__init__(f"sample {index}: {file}: {reason}")
        self.index, self.file, self.reason = index, file, reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (SampleError, (self.index, self.file, self.reason))


class MissingDependency(ImportError, ValueError):
    """An optional dependency of a source is not installed; the message names the extra."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or say which ``batchferry[extra]`` brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".", maxsplit=1)[0]
        raise MissingDependency(
            f"{what} needs the {package!r} package: pip install 'batchferry[{extra}]'",
            name=module,
        ) from exc


def relative(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """``path`` relative to ``root`` where it lies under it, else as given."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def split_options(rest: str, known: Collection[str], *, path: bool = True) -> tuple[str, dict[str, str]]:
    """``PATH,key=value,...`` into the path and the options.

    A part without ``=`` continues the previous option's value as a list, so
    ``columns=image,label`` gives ``{"columns": "image,label"}``.
    """
    parts = _split_commas(rest)
    head = parts.pop(0) if path else ""
    if path and not head:
        raise ValueError("expected a path first")
    options: dict[str, str] = {}
    last: str | None = None
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            if last is None:
                if not part.strip():
                    continue
                raise ValueError(f"expected key=value, got {part!r}")
            options[last] += "," + part.strip()
            continue
        key = key.strip()
        if key not in known:
            raise ValueError(f"unknown option {key!r}; known: {', '.join(sorted(known)) or 'none'}")
        if key in options:
            raise ValueError(f"option {key!r} given twice")
        options[key], last = value.strip(), key
    return head, options


def _split_commas(text: str) -> list[str]:
    """Split on commas outside braces (brace patterns such as ``{a,b}`` keep theirs)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key} must be true or false, got {value!r}")


def parse_hw(key: str, value: str) -> tuple[int, int]:
    """``224`` or ``224x256`` (height x width)."""
    try:
        sizes = [int(v) for v in value.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or any(s < 1 for s in sizes):
        raise ValueError(f"{key} must be N or HxW with positive integers, got {value!r}")
    return (sizes[0], sizes[-1])


def load_callable(key: str, value: str) -> Callable[..., Any]:
    """``MODULE:CALLABLE`` from an importable module."""
    module_name, sep, attr = value.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{key} must be MODULE:CALLABLE, got {value!r}")
    fn: object = getattr(importlib.import_module(module_name), attr, None)
    if not callable(fn):
        raise ValueError(f"{key}: {module_name}.{attr} is not a callable")
    return fn
