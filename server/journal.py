"""Dynamic jobs' ledgers on disk (``state_dir``), so that a restarted server hands no batch out twice.

One append-only file per job, named by a hash of the job's name (any string is a
safe file name that way): a first line with the job's settings, then one JSON line
per change of an epoch's ledger::

    {"e": 3, "n": 60}                    epoch 3 has 60 batches (of this replica)
    {"e": 3, "h": [17], "u": "9f..."}    batch 17 was handed to consumer token 9f...
    {"e": 3, "b": [17, 21]}              they came back (to the queue)
    {"e": 3, "d": [4, 9]}                done: a consumer that left took them
    {"e": 3, "r": 1}                     the job restarted from a checkpoint (see DynamicEpoch)

Each line goes out in one ``os.write`` as it happens, so a process killed with -9
loses nothing (the kernel has it); there is no fsync per line, so a machine that
loses power may lose the last lines. A file is rewritten (compacted: the live
epochs' ledgers, fsynced, then renamed over the old one) when it is opened, when an
epoch is pruned, and when the lines appended since outgrow the ledgers
(``COMPACT_GROWTH`` times the compacted file, at least ``COMPACT_MIN_BYTES``): it holds
the ledgers of the newest epochs a job keeps, and a consumer that comes and goes
without end cannot make it grow without bound.
A line that cannot be read (the half-written last line of a killed process, say) is
skipped with a warning. At most ``max_files`` journals: the least recently written
goes first.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["EpochRecord", "Journal", "StateDir"]

log = logging.getLogger("batchferry.server")

_SUFFIX = ".journal"
_VERSION = 1
ANYONE = ""  # the holder of batches reserved for whichever consumer comes back
MAX_TOKEN = 64  # bytes of a consumer's token (OpenStream.consumer; the plan refuses longer)
_LOCK = ".lock"
COMPACT_GROWTH = 4  # appended bytes, in compacted files' worth, that make it compact again
COMPACT_MIN_BYTES = 1 << 20


@dataclass
class EpochRecord:
    """An epoch's ledger as the journal has it: who holds which batch (a token in hex,
    ``ANYONE`` after a checkpoint restart), and which are done."""

    num_batches: int
    holder: dict[int, str] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)  # every consumer handed a batch of it

    @property
    def finished(self) -> bool:
        return len(self.done) >= self.num_batches


class Journal:
    """One job's journal: the ledgers read back from it, and the lines that change them."""

    def __init__(self, path: Path, settings: dict[str, Any], keep: int) -> None:
        self.path = path
        self._settings = settings
        self._keep = keep  # epochs a file holds at most: the newest
        self.epochs: dict[int, EpochRecord] = {}  # read back, not yet taken up by an epoch
        self._fd = -1
        self._broken = False  # a write failed: serving goes on without the journal
        self._closed = False
        # The job's live ledgers, for compacting as lines pile up (None: only when told).
        self.live: Callable[[], dict[int, EpochRecord]] | None = None
        self._appended = 0  # bytes since the last compaction
        self._allowed = COMPACT_MIN_BYTES  # ... before the next
        if path.exists():
            self._read()
        self.compact({})

    def _read(self) -> None:
        try:
            lines = self.path.read_bytes().split(b"\n")
        except OSError as exc:
            log.warning("journal %s unreadable (%s): starting afresh", self.path, exc)
            return
        try:
            header = json.loads(lines[0])
        except (ValueError, RecursionError):
            header = None
        if (
            not isinstance(header, dict)
            or header.get("v") != _VERSION
            or header.get("settings") != self._settings
        ):
            log.warning("journal %s is of another job's settings or version: starting afresh", self.path)
            return
        for number, line in enumerate(lines[1:], 2):
            if not line:
                continue
            try:
                self._apply(json.loads(line))
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
                log.warning("journal %s: line %d skipped (%s)", self.path, number, exc or type(exc).__name__)

    def _apply(self, record: dict[str, Any]) -> None:
        """Apply one line; ``ValueError`` (or a lookup error) for a line that is not one."""
        epoch = record["e"]
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"bad epoch {epoch!r}")
        if "n" in record:
            if not isinstance(record["n"], int) or record["n"] < 0:
                raise ValueError(f"bad length {record['n']!r}")
            known = self.epochs.get(epoch)
            if known is None or known.num_batches != record["n"]:
                self.epochs[epoch] = EpochRecord(record["n"])
            return
        ledger = self.epochs[epoch]
        if "r" in record:
            for p in ledger.done:
                ledger.holder[p] = ANYONE
            ledger.done.clear()
            ledger.holder = dict.fromkeys(ledger.holder, ANYONE)
            return
        kind = next((k for k in ("h", "b", "d") if k in record), None)
        if kind is None:
            raise ValueError("no change in the line")
        positions = record[kind]
        if not isinstance(positions, list) or not all(
            isinstance(p, int) and 0 <= p < ledger.num_batches for p in positions
        ):
            raise ValueError(f"bad positions in {kind!r}")
        if kind == "h":
            token = record["u"]
            if not isinstance(token, str) or len(token) > 2 * MAX_TOKEN:
                raise ValueError("bad token")
            bytes.fromhex(token)  # ValueError: not one of ours
            if token != ANYONE:
                ledger.tokens.add(token)
            for p in positions:
                ledger.holder[p] = token
                ledger.done.discard(p)
        else:
            for p in positions:
                ledger.holder.pop(p, None)
                if kind == "d":
                    ledger.done.add(p)
                else:
                    ledger.done.discard(p)

    def take(self, epoch: int, num_batches: int) -> EpochRecord | None:
        """Epoch ``epoch``'s ledger as read back (once), if it is of an epoch that long."""
        record = self.epochs.pop(epoch, None)
        return record if record is not None and record.num_batches == num_batches else None

    # -- lines ----------------------------------------------------------------------------
    def begin(self, epoch: int, num_batches: int) -> None:
        # Never compacts: the epoch being made is not among the job's live ledgers yet.
        self._write({"e": epoch, "n": num_batches}, compact=False)

    def handed(self, epoch: int, positions: list[int], token: bytes) -> None:
        self._write({"e": epoch, "h": positions, "u": token.hex()})

    def back(self, epoch: int, positions: list[int]) -> None:
        if positions:
            self._write({"e": epoch, "b": positions})

    def done(self, epoch: int, positions: list[int]) -> None:
        if positions:
            self._write({"e": epoch, "d": positions})

    def reset(self, epoch: int) -> None:
        self._write({"e": epoch, "r": 1})

    def _write(self, record: dict[str, Any], *, compact: bool = True) -> None:
        """One line, after the change it records is made in memory (a compaction right
        after it writes the ledgers with the change)."""
        if self._broken or self._closed:
            return
        line = _line(record)
        try:
            os.write(self._fd, line)
        except OSError as exc:
            self._broken = True  # serving goes on; only the guarantee across a restart is lost
            log.error(
                "journal %s: cannot write (%s); a restart may repeat batches of this job", self.path, exc
            )
            return
        self._appended += len(line)
        if compact and self.live is not None and self._appended > self._allowed:
            self.compact(self.live())

    def compact(self, live: dict[int, EpochRecord]) -> None:
        """Rewrite the file as ``live`` (the epochs now kept) and the ledgers read back."""
        if self._closed:
            return
        epochs = {**{e: r for e, r in self.epochs.items() if not r.finished}, **live}
        for epoch in sorted(epochs)[: -self._keep]:
            del epochs[epoch]
            self.epochs.pop(epoch, None)
        lines = [_line({"v": _VERSION, "settings": self._settings})]
        for epoch in sorted(epochs):
            ledger = epochs[epoch]
            lines.append(_line({"e": epoch, "n": ledger.num_batches}))
            by_token: dict[str, list[int]] = {token: [] for token in sorted(ledger.tokens)}
            for p, token in sorted(ledger.holder.items()):
                by_token.setdefault(token, []).append(p)
            lines += [_line({"e": epoch, "h": ps, "u": token}) for token, ps in by_token.items()]
            lines.append(_line({"e": epoch, "d": sorted(ledger.done)}))
        temporary = self.path.with_suffix(".tmp")
        content = b"".join(lines)
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            self._broken = False
            self._appended, self._allowed = 0, max(COMPACT_MIN_BYTES, COMPACT_GROWTH * len(content))
        except OSError as exc:
            self._broken = True
            log.error(
                "journal %s: cannot write (%s); a restart may repeat batches of this job", self.path, exc
            )

    def close(self) -> None:
        self._closed = True  # a stream that ends after this writes nothing
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class StateDir:
    """``state_dir``: checked writable when the server starts; one journal per job in it."""

    def __init__(self, path: str, max_files: int) -> None:
        self.path = Path(path)
        self.max_files = max_files
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            # Two servers writing one job's journal would each hand out the other's
            # batches after a restart: one server per directory, held while it runs
            # (the kernel lets go when the process dies, -9 included).
            self._lock: IO[bytes] | None = open(self.path / _LOCK, "ab")  # noqa: SIM115
        except OSError as exc:
            raise ValueError(f"state_dir {path!r} is not a writable directory: {exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise ValueError(
                f"state_dir {path!r} is in use by another running server; give each server "
                "(each replica) a state directory of its own"
            ) from None

    def close(self) -> None:
        """Let the next server have the directory."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def file(self, job: str) -> Path:
        return self.path / (hashlib.sha256(job.encode()).hexdigest()[:32] + _SUFFIX)

    def open(self, job: str, settings: object, keep: int) -> Journal:
        """Job ``job``'s journal (read back if there is one, its newest ``keep`` epochs),
        room made for it first."""
        path = self.file(job)
        if not path.exists():
            self._make_room()
        plain = json.loads(json.dumps(dataclasses.asdict(settings)))  # type: ignore[call-overload]
        return Journal(path, plain, keep)

    def remove(self, job: str) -> None:
        try:
            self.file(job).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove journal of job %r: %s", job, exc)

    def _make_room(self) -> None:
        files = sorted(self.path.glob("*" + _SUFFIX), key=_mtime)
        for old in files[: max(0, len(files) - self.max_files + 1)]:
            old.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
