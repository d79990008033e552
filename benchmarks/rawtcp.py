"""Raw TCP throughput: one connection, a sender writing a reused buffer, a receiver reading it.

No framing and no copies beyond the kernel's: the most bytes a Python process moves
over one TCP connection on a link, to compare the byte stream against.

``python -m batchferry.benchmarks.rawtcp send HOST`` listens on ``HOST`` (port 0),
prints its port, and sends to every connection until the peer closes it.
:func:`receive` connects and reads for a while.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from typing import Any

CHUNK = 4 << 20


def _send(conn: socket.socket) -> None:
    payload = memoryview(bytearray(CHUNK))
    with conn:
        try:
            while True:
                conn.sendall(payload)
        except OSError:
            pass  # the receiver closed: done


def serve(host: str) -> None:
    """Send to every connection on ``host``'s port (printed first) until stdin closes."""
    listener = socket.create_server((host, 0))
    print(listener.getsockname()[1], flush=True)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_send, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()  # until the parent closes our stdin
    listener.close()


def receive(host: str, port: int, seconds: float, warmup: float = 0.5) -> dict[str, Any]:
    """Read from the sender for ``warmup`` seconds, then measure for ``seconds``."""
    buffer = memoryview(bytearray(CHUNK))
    with socket.create_connection((host, port), timeout=30) as conn:
        end_warmup = time.perf_counter() + warmup
        while time.perf_counter() < end_warmup:
            conn.recv_into(buffer)
        received = 0
        start = time.perf_counter()
        deadline = start + seconds
        while (now := time.perf_counter()) < deadline:
            received += conn.recv_into(buffer)
        elapsed = now - start
    return {"bytes": received, "seconds": elapsed, "gb_per_s": received / elapsed / 1e9}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "send":
        serve(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "receive":
        print(json.dumps(receive(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))), flush=True)
    else:
        sys.exit("usage: rawtcp send HOST | rawtcp receive HOST PORT SECONDS")
