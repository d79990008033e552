"""Clean-up that finalizers may ask for, and clean-up at interpreter exit.

A finalizer (``__del__``, ``weakref.finalize``) can run on any thread, including
one inside a lock the clean-up needs, or while the interpreter shuts down with
daemon threads frozen mid-call: it must never wait. So finalizers only hand the
work to :func:`later` (a lock-free queue put); one daemon thread does it.

Objects registered with :func:`close_at_exit` that are still open when the
interpreter exits are closed by an ``atexit`` hook, newest first, while threads
still run: a script that ends without ``close()`` (or is stopped by Ctrl-C)
exits promptly instead of hanging on a live stream.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = ["close_at_exit", "forget_at_exit", "later", "process_alive", "start"]

log = logging.getLogger("batchferry")


class _Closable(Protocol):
    def close(self) -> None: ...


_work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_thread_lock = threading.Lock()
_live: dict[int, weakref.ref[_Closable]] = {}
_live_lock = threading.Lock()


def start() -> None:
    """Start the clean-up thread (from ordinary code: finalizers must not start threads)."""
    global _thread
    with _thread_lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="batchferry-cleanup", daemon=True)
            _thread.start()


def _run() -> None:
    while True:
        job = _work.get()
        try:
            job()
        except Exception:
            log.debug("deferred clean-up failed", exc_info=True)


def later(job: Callable[[], None]) -> None:
    """Run ``job`` on the clean-up thread. Safe in a finalizer: it never blocks, and it
    does nothing once the interpreter is shutting down (the atexit hook ran before)."""
    if not _exiting:
        _work.put(job)


def close_at_exit(obj: _Closable) -> None:
    """Close ``obj`` at interpreter exit unless it was closed (and forgotten) before."""
    key = id(obj)
    with _live_lock:
        # The callback runs when obj is collected: a plain dict pop, no lock.
        _live[key] = weakref.ref(obj, lambda _ref: _live.pop(key, None))


def forget_at_exit(obj: _Closable) -> None:
    with _live_lock:
        _live.pop(id(obj), None)


_exiting = False


@atexit.register
def _close_all() -> None:
    global _exiting
    _exiting = True
    with _live_lock:
        refs = list(_live.values())[::-1]
        _live.clear()
    for ref in refs:
        obj = ref()
        if obj is not None:
            try:
                obj.close()
            except Exception:
                log.debug("closing %r at exit failed", obj, exc_info=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists: what leftovers named for their maker (a cache's
    partial download, a benchmark's network namespace) are judged stale by."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's, and alive
    return True
