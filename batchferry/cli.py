"""The ``batchferry`` command: serve, demo, datasets."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from batchferry import wire

__all__ = ["main"]


def _size(text: str) -> int:
    """``4194304``, ``4MiB``, ``2GiB``, ``512KiB``."""
    units = {
        "kib": 1 << 10,
        "mib": 1 << 20,
        "gib": 1 << 30,
        "k": 1 << 10,
        "m": 1 << 20,
        "g": 1 << 30,
    }
    lower = text.strip().lower()
    for suffix, factor in units.items():
        if lower.endswith(suffix):
            try:
                return int(float(lower[: -len(suffix)]) * factor)
            except ValueError:
                break
    try:
        return int(lower)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use bytes or KiB/MiB/GiB)") from None


def _serve(args: argparse.Namespace) -> int:
    from batchferry.server import Server, ServerConfig
    from batchferry.server.datasets import parse_dataset_arg

    for module in args.import_module:
        importlib.import_module(module)  # registers collates or datasets as a side effect
    datasets = dict(parse_dataset_arg(arg) for arg in args.dataset)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        num_workers=args.num_workers,
        slots=args.slots,
        shm_bytes=args.shm_bytes,
        chunk_bytes=args.chunk_bytes,
        max_streams=args.max_streams,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("batchferry.server").info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    with Server(datasets, config=config) as server:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        print(f"batchferry serving {', '.join(datasets)} on {server.address}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


def _ask(target: str, method: str, timeout: float) -> bytes | None:
    """One unary call to a server; prints the error and returns None on failure."""
    import grpc

    from batchferry.errors import from_rpc_error

    with grpc.insecure_channel(target, options=wire.CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            return bytes(call(b"", timeout=timeout, wait_for_ready=True))
        except grpc.RpcError as exc:
            print(f"error: {from_rpc_error(exc)}", file=sys.stderr)
            return None


def _datasets(args: argparse.Namespace) -> int:
    from batchferry.v1 import loader_pb2 as _pb2

    raw = _ask(args.target, wire.LIST_DATASETS, args.timeout)
    if raw is None:
        return 1
    for info in _pb2.ListDatasetsResponse.FromString(raw).datasets:
        print(f"{info.name}\t{info.length}\t{info.sample_structure}")
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from batchferry.v1 import loader_pb2 as _pb2

    raw = _ask(args.target, wire.LIST_JOBS, args.timeout)
    if raw is None:
        return 1
    jobs = _pb2.ListJobsResponse.FromString(raw).jobs
    if not jobs:
        print("no jobs")
    for job in jobs:
        mode = _pb2.Mode.Name(job.mode).removeprefix("MODE_").lower()
        print(f"{job.name}\t{mode}\t{job.dataset}\tbatch {job.batch_size}\tworld {job.world_size}\t"
              f"{len(job.consumers)} consumer(s)\t{job.batches_built} batches built")  # fmt: skip
        for c in job.consumers:
            print(f"  {c.peer}\trank {c.rank}\tepoch {c.epoch}\t{c.batches_sent}/{c.num_batches} batches")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from batchferry.demo import run_demo

    run_demo(
        num_workers=args.num_workers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        samples=args.samples,
        device=args.device,
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from batchferry.benchmarks.harness import RESULTS
    from batchferry.benchmarks.harness import main as bench_main
    from batchferry.benchmarks.workloads import WORKLOADS

    ids = sorted(WORKLOADS) if args.workloads == ["all"] else list(args.workloads)
    if "W5" in ids:
        from batchferry.benchmarks.multi import main as multi_main

        ids.remove("W5")
        multi_main(reps=args.reps, num_workers=args.num_workers, out=Path(args.out or RESULTS))
    if "MEM" in ids:
        from batchferry.benchmarks.memory import main as memory_main

        ids.remove("MEM")
        memory_main(out=Path(args.out or RESULTS))
    if "G1" in ids:
        from batchferry.benchmarks.gpu import main as gpu_main

        ids.remove("G1")
        gpu_main(out=Path(args.out or RESULTS))
    if not ids:
        return 0
    bench_main(
        ids, reps=args.reps, num_workers=args.num_workers, out=Path(args.out or RESULTS),
        scale=args.scale, with_ceiling=not args.no_ceiling,
    )  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchferry", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a loader server")
    serve.add_argument(
        "--dataset",
        action="append",
        default=[],
        required=True,
        metavar="NAME=SPEC",
        help="npy:PATH[,labels=PATH] | synthetic:n=N,shape=AxB,... | python:MODULE:CALLABLE (repeatable)",
    )
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--num-workers", type=int, default=2)
    serve.add_argument("--slots", type=int, default=0, help="shared-memory ring slots (0: automatic)")
    serve.add_argument("--shm-bytes", type=_size, default=4 << 30, help="shared-memory budget, e.g. 4GiB")
    serve.add_argument("--chunk-bytes", type=_size, default=wire.DEFAULT_CHUNK_BYTES)
    serve.add_argument("--max-streams", type=int, default=64)
    serve.add_argument(
        "--import",
        dest="import_module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (e.g. one that calls register_collate)",
    )
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="embedded server + a short training loop")
    demo.add_argument("--num-workers", type=int, default=2)
    demo.add_argument("--epochs", type=int, default=3)
    demo.add_argument("--batch-size", type=int, default=256)
    demo.add_argument("--samples", type=int, default=32768)
    demo.add_argument("--device", default=None, help="e.g. cuda (default: cuda when available)")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="batchferry vs torch DataLoader on the standard workloads")
    bench.add_argument(
        "workloads",
        nargs="+",
        metavar="W",
        help="W1 W2 W3 W4, W5 (shared mode), MEM (memory bounds), G1 (needs CUDA), or all (W1-W4)",
    )
    bench.add_argument("--reps", type=int, default=3)
    bench.add_argument("--num-workers", type=int, default=2)
    bench.add_argument("--scale", type=float, default=1.0, help="shrink datasets (smoke runs)")
    bench.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    bench.add_argument("--no-ceiling", action="store_true", help="skip the raw gRPC ceiling")
    bench.set_defaults(func=_bench)

    jobs = sub.add_parser("jobs", help="list the jobs of a server, their consumers and progress")
    jobs.add_argument("target", help="host:port")
    jobs.add_argument("--timeout", type=float, default=10.0)
    jobs.set_defaults(func=_jobs)

    datasets = sub.add_parser("datasets", help="list the datasets of a server")
    datasets.add_argument("target", help="host:port")
    datasets.add_argument("--timeout", type=float, default=10.0)
    datasets.set_defaults(func=_datasets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
