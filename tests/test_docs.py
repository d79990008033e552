"""The documentation cannot rot: the site builds strictly, and every example that talks to a
server runs against a real one.

Every ``python`` and ``bash`` block of the README and of ``docs/`` runs, in page order, in
a folder of its own per page, with the ports 50051-50053 replaced by free ones. An HTML
comment on the line before a block says otherwise: ``<!-- run: background -->`` starts it
as a server (stopped when the page ends) and waits for its port to answer;
``<!-- no-run: REASON -->`` leaves it out.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from processes import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = ("python", "bash")
PORT = re.compile(r"\b5005[1-3]\b")
MARKER = re.compile(r"^<!--\s*(?:(run: background)|no-run:\s*(.*?))\s*-->$")
SETUP = (
    "python3 -m pip install -q torch==2.13.0 -e '.[dev]' && batchferry demo\n"
    "python3 -m pip install -q torch==2.13.0 -e '.[dev]' && python3 -m pytest\n"
)


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    language: str
    code: str
    background: bool = False
    skip: str | None = None  # why it does not run

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def examples(page: Path) -> list[Example]:
    """Every fenced block of ``page`` with its marker (blocks of any language)."""
    lines = page.read_text().splitlines()
    found: list[Example] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)", lines[i])
        if fence is None:
            i += 1
            continue
        start = i
        i += 1
        while not lines[i].startswith("```"):
            i += 1
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = MARKER.match(before.strip())
        found.append(
            Example(
                page,
                start + 1,
                fence.group(1),
                "\n".join(lines[start + 1 : i]) + "\n",
                background=bool(marker and marker.group(1)),
                skip=marker.group(2) if marker and marker.group(2) is not None else None,
            )
        )
        i += 1
    return found


def test_markers_name_a_reason_and_mark_only_runnable_blocks() -> None:
    run = 0
    for page in PAGES:
        text = page.read_text()
        for example in examples(page):
            if example.skip is not None:
                assert example.skip, f"{example}: no-run needs a reason"
            if example.background or example.skip is not None:
                assert example.language in RUNNABLE, f"{example}: a marker on a {example.language} block"
            run += example.language in RUNNABLE and example.skip is None
        stray = [m for m in re.findall(r"<!--\s*(?:run|no-run)\b[^>]*-->", text) if not MARKER.match(m)]
        assert not stray, f"{page.name}: markers this test does not read: {stray}"
    assert run >= 20, f"only {run} examples run"


def test_readme_opens_with_the_two_setup_commands() -> None:
    first = examples(ROOT / "README.md")[0]
    assert first.code == SETUP
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_docs_build_strictly(tmp_path: Path) -> None:
    """A broken link, a missing page or a docstring reference to nothing fails the build."""
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "dataloader" / "index.html").read_text().count("persistent_workers") >= 2
    assert "--max-streams-per-peer" in (tmp_path / "site" / "operations" / "index.html").read_text()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing answered on port {port} within {timeout} s:\n{log.read_text()}")


# Runs the page's python examples one after another in one interpreter, each as __main__
# (so spawned workers import its functions), and says on fd ARGV[1] how each went.
_RUNNER = """
import os, runpy, sys, traceback
said = os.fdopen(int(sys.argv[1]), "w", buffering=1)
for line in sys.stdin:
    try:
        runpy.run_path(line.strip(), run_name="__main__")
    except BaseException:
        traceback.print_exc()
        said.write("failed\\n")
    else:
        said.write("ok\\n")
"""


class _Runner:
    """One interpreter for a page's python examples: torch is imported once, not per example."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.log = folder / "examples.log"
        read, write = os.pipe()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _RUNNER, str(write)], cwd=folder, env=env, stdin=subprocess.PIPE,
                stdout=out, stderr=subprocess.STDOUT, pass_fds=(write,), text=True,
            )  # fmt: skip
        os.close(write)
        self.said = os.fdopen(read)

    def run(self, script: Path, timeout: float = 120.0) -> bool:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{script}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.said], [], [], timeout)
        return bool(ready) and self.said.readline().strip() == "ok"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.said.close()


def _command(example: Example, folder: Path) -> list[str]:
    if example.language == "bash":
        # A server replaces the shell, so that stopping it stops the server.
        code = f"exec {example.code}" if example.background else example.code
        return ["bash", "-e", "-o", "pipefail", "-c", code]
    script = folder / f"example_{example.line}.py"  # a file: spawned workers import its functions
    script.write_text(example.code)
    return [sys.executable, str(script)]


# A page starts up to three servers, each with its worker processes: more than the suite's
# 120 s on a loaded 2-core machine.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", [p for p in PAGES if any(
    e.language in RUNNABLE and e.skip is None for e in examples(p))], ids=lambda p: p.name)  # fmt: skip
def test_examples_run(page: Path, tmp_path: Path) -> None:
    ports = {str(p): str(free_port()) for p in (50051, 50052, 50053)}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    servers: list[subprocess.Popen[bytes]] = []
    runner = _Runner(tmp_path, env)
    try:
        for written in examples(page):
            if written.language not in RUNNABLE or written.skip is not None:
                continue
            code = PORT.sub(lambda m: ports[m.group()], written.code)
            example = Example(**{**written.__dict__, "code": code})
            command = _command(example, tmp_path)
            if example.background:
                log = tmp_path / f"server_{example.line}.log"
                with log.open("wb") as out:
                    proc = subprocess.Popen(
                        command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
                    )
                servers.append(proc)
                port = next(int(p) for p in re.findall(r"\b\d{4,5}\b", example.code) if p in ports.values())
                _wait_for_port(port, proc, log)
                continue
            if example.language == "python":
                assert runner.run(Path(command[1])), (
                    f"{example} failed:\n{example.code}\n{runner.log.read_text()}"
                )
                continue
            ran = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
            assert ran.returncode == 0, f"{example} failed:\n{example.code}\n{ran.stdout}\n{ran.stderr}"
    finally:
        runner.close()
        for proc in servers:
            proc.send_signal(signal.SIGTERM)
        for proc in servers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
