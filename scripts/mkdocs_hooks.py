"""MkDocs hooks (mkdocs.yml ``hooks:``): what the docs generate from the code at build time.

* The API reference: the package installs ``server/`` and ``client/`` as
  ``batchferry.server`` and ``batchferry.client``, a layout griffe (which reads the
  docstrings for mkdocstrings) cannot follow, so the build lays the package out as it
  installs, as symbolic links under ``build/api-src``.
* The server settings table: ``<!-- server-settings -->`` in a page becomes a table of
  every ``batchferry serve`` setting, read from ``batchferry.server.config``, so a
  setting's default and help are written once, in ``ServerConfig``.
"""

from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

from batchferry.server.config import (
    KEYS,
    SERVE_DEFAULTS,
    ServerConfig,
    describe_setting,
    env_name,
    flag_name,
    format_size,
    has_flag,
    parse_size,
)

ROOT = Path(__file__).resolve().parent.parent
API_SRC = ROOT / "build" / "api-src"
# Where each subpackage's files live in the repository (pyproject.toml's package-dir).
LAYOUT = {"": "batchferry", "server": "server", "client": "client", "benchmarks": "benchmarks"}
MARKER = "<!-- server-settings -->"


@event_priority(100)  # before mkdocstrings reads its handler's paths
def on_config(config: Any) -> Any:
    shutil.rmtree(API_SRC, ignore_errors=True)
    package = API_SRC / "batchferry"
    package.mkdir(parents=True)
    for entry in (ROOT / "batchferry").iterdir():
        (package / entry.name).symlink_to(entry)
    for name, folder in LAYOUT.items():
        if name:
            (package / name).symlink_to(ROOT / folder)
    return config


def _default(key: str) -> str:
    field_ = next((f for f in fields(ServerConfig) if f.name == key), None)
    if field_ is None:
        value = SERVE_DEFAULTS.get(key, "")
    else:
        value = field_.default
        if field_.metadata["parse"] is parse_size:
            value = format_size(value)
    return f"`{value}`" if value != "" else ""


def settings_table() -> str:
    """Every setting: its TOML key, flag, environment variable, default and meaning."""
    rows = ["| key | flag | environment | default | what |", "|---|---|---|---|---|"]
    for key in KEYS:
        help_ = describe_setting(key).split(" (default ")[0].replace("|", "\\|")
        flag = f"`{flag_name(key)}`" if has_flag(key) and key != "log_level" else ""
        if key == "log_level":
            flag = "`--log-level`"
        rows.append(f"| `{key}` | {flag} | `{env_name(key)}` | {_default(key)} | {help_} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return markdown.replace(MARKER, settings_table()) if MARKER in markdown else markdown
