"""The ``batchferry`` command: serve, health, demo, datasets, jobs, bench."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchferry import wire
from batchferry.server.config import KEYS, describe_setting, flag_name, has_flag

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    from batchferry.server import Server
    from batchferry.server.config import KEYS, load_settings

    flags = {key: getattr(args, key, None) for key in KEYS}
    flags["log_level"] = args.log_level
    flags["config"] = args.config
    settings = load_settings(flags)
    logging.getLogger().setLevel(settings.log_level)
    for module in settings.imports:
        importlib.import_module(module)  # registers collates or datasets as a side effect
    with Server(settings.datasets, config=settings.server) as server:
        cfg = settings.server
        replica = f" as replica {cfg.replica_index} of {cfg.num_replicas}" if cfg.num_replicas > 1 else ""
        print(f"batchferry serving {', '.join(settings.datasets)} on {server.address}{replica}", flush=True)
        server.wait()  # until SIGTERM or SIGINT, which close it
    return 0


def _security(args: argparse.Namespace) -> dict[str, Any]:
    """The DataLoader's security arguments from the client flags."""
    from batchferry.security import read_token

    return {
        "tls": True if args.tls else None,
        "root_certificates": args.ca,
        "client_cert": args.cert,
        "client_key": args.key,
        "token": read_token(args.token_file) if args.token_file else None,
    }


def _channel(args: argparse.Namespace, target: str) -> tuple[Any, tuple[tuple[str, str], ...]]:
    from batchferry.security import ClientSecurity

    security = ClientSecurity.create(**_security(args))
    return security.channel(target), security.metadata


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the server reports SERVING (container HEALTHCHECK, scripts)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from batchferry.server.config import local_target

    target = args.target or local_target()
    channel, metadata = _channel(args, target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _ask(args: argparse.Namespace, method: str) -> bytes | None:
    """One unary call to a server; prints the error and returns None on failure."""
    import grpc

    from batchferry.errors import from_rpc_error

    channel, metadata = _channel(args, args.target)
    with channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            return bytes(call(b"", timeout=args.timeout, wait_for_ready=True, metadata=metadata))
        except grpc.RpcError as exc:
            print(f"error: {from_rpc_error(exc)}", file=sys.stderr)
            return None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """Columns two spaces apart, each as wide as its widest cell; ``numeric`` ones right-aligned."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in (header, *rows)
    )


def _progress(done: int, total: int) -> str:
    """``1,234/5,000 (25%)``."""
    share = f" ({100 * done // total}%)" if total > 0 else ""
    return f"{done:,}/{total:,}{share}"


def _datasets(args: argparse.Namespace) -> int:
    import json

    from batchferry.v1 import loader_pb2 as _pb2

    raw = _ask(args, wire.LIST_DATASETS)
    if raw is None:
        return 1
    reply = _pb2.ListDatasetsResponse.FromString(raw)
    if args.json:
        print(json.dumps({
            "datasets": [
                {"name": d.name, "length": d.length, "sample_structure": d.sample_structure}
                for d in reply.datasets
            ],
            "replica_index": reply.replica_index,
            "num_replicas": max(1, reply.num_replicas),
            "server_id": reply.server_id,
        }, indent=2))  # fmt: skip
        return 0
    # An IterableDataset without __len__ has no number of samples to show.
    rows = [
        [d.name, "(iterable)" if d.iterable and not d.sized else f"{d.length:,}", d.sample_structure]
        for d in reply.datasets
    ]
    print(_table(["NAME", "SAMPLES", "SAMPLE STRUCTURE"], rows, numeric=[1]))
    if reply.num_replicas > 1:
        print(f"\nreplica {reply.replica_index} of {reply.num_replicas}: it serves batches b with "
              f"b % {reply.num_replicas} == {reply.replica_index} of each epoch")  # fmt: skip
    return 0


def _worlds(worlds: Sequence[Any]) -> str:
    """A job's world sizes, oldest first: "4", or "4 -> 2 (epoch 1)" after a resize."""
    text = f"{worlds[0].world_size}" if worlds else "?"
    for world in worlds[1:]:
        text += f" -> {world.world_size} (epoch {world.epoch})"
    return text


def _jobs(args: argparse.Namespace) -> int:
    import json

    from batchferry import protocol
    from batchferry.v1 import loader_pb2 as _pb2

    raw = _ask(args, wire.LIST_JOBS)
    if raw is None:
        return 1
    jobs = _pb2.ListJobsResponse.FromString(raw).jobs
    modes = {job.name: protocol.MODE_NAMES.get(job.mode, "unknown") for job in jobs}
    if args.json:
        print(json.dumps({"jobs": [
            {
                "name": job.name, "mode": modes[job.name], "dataset": job.dataset,
                "batch_size": job.batch_size, "world_size": job.world_size,
                "batches_built": job.batches_built, "epoch": job.epoch,
                "worlds": [{"world_size": w.world_size, "epoch": w.epoch} for w in job.worlds],
                "consumers": [
                    {"peer": c.peer, "rank": c.rank, "epoch": c.epoch, "batches_sent": c.batches_sent,
                     "num_batches": c.num_batches, "batches_taken": c.batches_taken}
                    for c in job.consumers
                ],
            }
            for job in jobs
        ]}, indent=2))  # fmt: skip
        return 0
    if not jobs:
        print("no jobs")
        return 0
    rows = [
        [job.name, modes[job.name], job.dataset, f"{job.batch_size:,}", f"{job.epoch:,}", _worlds(job.worlds),
         f"{len(job.consumers):,}", f"{job.batches_built:,}"]
        for job in jobs
    ]  # fmt: skip
    print(_table(["JOB", "MODE", "DATASET", "BATCH SIZE", "EPOCH", "WORLD", "CONSUMERS", "BATCHES BUILT"],
                 rows, numeric=[3, 4, 6, 7]))  # fmt: skip
    consumers = [
        [job.name, c.peer, f"{c.rank:,}", f"{c.epoch:,}", _progress(c.batches_sent, c.num_batches),
         f"{c.batches_taken:,}"]
        for job in jobs
        for c in job.consumers
    ]  # fmt: skip
    if consumers:
        print()
        print(_table(["JOB", "CONSUMER", "RANK", "EPOCH", "SENT THIS EPOCH", "TAKEN"], consumers,
                     numeric=[2, 3, 4, 5]))  # fmt: skip
    return 0


def _demo(args: argparse.Namespace) -> int:
    from batchferry.demo import run_demo

    run_demo(
        num_workers=args.num_workers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        samples=args.samples,
        device=args.device,
        connect=args.connect,
        dataset=args.dataset,
        security=_security(args),
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from batchferry.benchmarks.registry import OPTIONS, benches, run

    if args.names == ["list"]:
        for name, bench in benches().items():
            takes = " ".join(f"--{o.replace('_', '-')}" for o in bench.options)
            print(f"{name:<10}{bench.summary}" + (f" [{takes}]" if takes else ""))
        return 0
    names = [n for n, b in benches().items() if b.together] if args.names == ["all"] else args.names
    run(names, {option: getattr(args, option) for option in OPTIONS}, Path(args.out))
    return 0


def _client_flags() -> argparse.ArgumentParser:
    """How client commands reach a secured server (TLS, mutual TLS, a token)."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("connection security")
    group.add_argument("--tls", action="store_true", help="use TLS (implied by --ca or --cert)")
    group.add_argument("--ca", metavar="PEM", help="CA that signed the server's certificate (TLS)")
    group.add_argument("--cert", metavar="PEM", help="this client's certificate (mutual TLS)")
    group.add_argument("--key", metavar="PEM", help="this client's private key (mutual TLS)")
    group.add_argument(
        "--token-file", metavar="PATH", help="file holding a bearer token (default: BATCHFERRY_TOKEN)"
    )
    return flags


def _bench_parser(sub: Any) -> None:
    """``batchferry bench``: its options come from the benchmark registry."""
    from batchferry.benchmarks.registry import BENCHES, DEFAULT_OUT, OPTIONS, takers

    bench = sub.add_parser(
        "bench",
        help="measure batchferry against torch's DataLoader and its peers",
        description="Run benchmarks by name: the harness's workloads (W1, W2, ...: batchferry "
        "against torch's DataLoader, in one report), or " + ", ".join(BENCHES) + ". "
        "'list' lists them all with their options; 'all' runs every workload.",
    )
    bench.add_argument("names", nargs="+", metavar="NAME", help="benchmarks to run, 'list' or 'all'")
    bench.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default ./{DEFAULT_OUT})")
    for name, option in OPTIONS.items():
        where = f" ({', '.join(takers(name))})"
        flag = "--" + name.replace("_", "-")
        if option.type is None:
            bench.add_argument(flag, dest=name, action="store_true", help=option.help + where)
        else:
            bench.add_argument(
                flag, dest=name, type=option.type, metavar=option.metavar, help=option.help + where
            )
    bench.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchferry", description=__doc__)
    client = _client_flags()
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run a loader server",
        description="Run a loader server. Every flag can also come from the environment "
        "(BATCHFERRY_NUM_WORKERS=8, BATCHFERRY_DATASETS='train=npy:/d/x.npy;val=...') or from a TOML "
        "file (--config) whose keys are the flags' names with underscores; flags win over the "
        "environment, which wins over the file.",
    )
    serve.add_argument("--config", metavar="PATH", help="TOML settings file (or BATCHFERRY_CONFIG)")
    for key in KEYS:
        if key == "log_level" or not has_flag(key):
            continue  # the global --log-level; secrets stay off the command line
        # Values are parsed by the settings loader, so that a flag, a variable and a file
        # key give the same errors.
        repeat = key in ("datasets", "import")
        serve.add_argument(
            flag_name(key),
            dest=key,
            action="append" if repeat else "store",
            metavar="NAME=SPEC" if key == "datasets" else ("MODULE" if key == "import" else None),
            help=describe_setting(key).replace("%", "%%"),
        )
    serve.set_defaults(func=_serve)

    health = sub.add_parser(
        "health", parents=[client], help="ask a server's grpc.health.v1 service; exit 0 when SERVING"
    )
    health.add_argument(
        "target", nargs="?", help="host:port (default: this host's server, port from BATCHFERRY_PORT)"
    )
    health.add_argument("--service", default="", help="service name ('' is the whole server)")
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(func=_health)

    demo = sub.add_parser("demo", parents=[client], help="embedded server + a short training loop")
    demo.add_argument("--num-workers", type=int, default=2)
    demo.add_argument("--epochs", type=int, default=3)
    demo.add_argument("--batch-size", type=int, default=256)
    demo.add_argument("--samples", type=int, default=32768)
    demo.add_argument("--device", default=None, help="e.g. cuda (default: cuda when available)")
    demo.add_argument(
        "--connect",
        metavar="ADDRESS",
        help="train from running servers instead of an embedded one: host:port, a,b (replicas) "
        "or dns:///NAME:PORT",
    )
    demo.add_argument("--dataset", default="demo", help="dataset name on those servers (default demo)")
    demo.set_defaults(func=_demo)

    _bench_parser(sub)
    jobs = sub.add_parser(
        "jobs", parents=[client], help="list the jobs of a server, their consumers and progress"
    )
    jobs.add_argument("target", help="host:port")
    jobs.add_argument("--timeout", type=float, default=10.0)
    jobs.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of tables: {jobs: [{name, mode, dataset, batch_size, world_size, "
        "batches_built, epoch, worlds: [{world_size, epoch}], "
        "consumers: [{peer, rank, epoch, batches_sent, num_batches, batches_taken}]}]}",
    )
    jobs.set_defaults(func=_jobs)

    datasets = sub.add_parser("datasets", parents=[client], help="list the datasets of a server")
    datasets.add_argument("target", help="host:port")
    datasets.add_argument("--timeout", type=float, default=10.0)
    datasets.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of a table: {datasets: [{name, length, sample_structure}], "
        "replica_index, num_replicas, server_id}",
    )
    datasets.set_defaults(func=_datasets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level or "INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
