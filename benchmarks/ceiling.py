"""The raw gRPC-Python ceiling: a server streaming prebuilt bytes, no batchferry code.

``python -m batchferry.benchmarks.ceiling`` prints GB/s for several message sizes;
``--serve [HOST]`` only serves (on loopback by default), printing its port, until
stdin closes, for :func:`read` to measure from elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

_METHOD = "/ceiling.Raw/Stream"
_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def _serve(host: str = "127.0.0.1") -> None:
    payload = bytes(64 << 20)

    def stream(request: bytes, _context: grpc.ServicerContext) -> Any:
        size, count = (int(x) for x in request.decode().split(","))
        chunk = payload[:size]
        for _ in range(count):
            yield chunk

    server = grpc.server(ThreadPoolExecutor(16), options=_OPTIONS)
    handler = grpc.unary_stream_rpc_method_handler(stream)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("ceiling.Raw", {"Stream": handler})]
    )
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # run until the parent closes our stdin
    server.stop(0)


def read(
    address: str, message_bytes: int = 4 << 20, total_bytes: int = 2_000_000_000, streams: int = 1
) -> dict[str, Any]:
    """GB/s received from the ceiling server at ``address`` by one client process over
    ``streams`` concurrent calls, each on its own HTTP/2 connection (as a loader's stripes
    are), after a short warm-up."""
    count = max(8, total_bytes // message_bytes // streams)
    options = [*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(address, options=options) for _ in range(streams)]
    try:
        calls = [
            c.unary_stream(_METHOD, request_serializer=None, response_deserializer=None) for c in channels
        ]
        for call in calls:
            for _ in call(f"{message_bytes},4".encode(), wait_for_ready=True, timeout=60):
                pass  # warm up

        def drain(call: Any) -> int:
            return sum(len(m) for m in call(f"{message_bytes},{count}".encode(), timeout=600))

        start = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            received = sum(pool.map(drain, calls))
        elapsed = time.perf_counter() - start
    finally:
        for channel in channels:
            channel.close()
    return {"message_bytes": message_bytes, "streams": streams, "gb_per_s": received / elapsed / 1e9}


def measure(
    message_bytes: int = 4 << 20, total_bytes: int = 2_000_000_000, streams: int = 1
) -> dict[str, Any]:
    """:func:`read` from a ceiling server this process starts on loopback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchferry.benchmarks.ceiling", "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        return read(f"127.0.0.1:{port}", message_bytes, total_bytes, streams)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    if "--serve" in sys.argv:
        args = sys.argv[sys.argv.index("--serve") + 1 :]
        _serve(*args[:1])
    else:
        for size in (64 << 10, 1 << 20, 2 << 20, 4 << 20, 16 << 20):
            r = measure(size, 1_000_000_000)
            print(f"{size >> 10:>6} KiB messages: {r['gb_per_s']:.2f} GB/s")
