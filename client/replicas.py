"""The servers behind a loader's address: one server, a list of replicas, or a DNS name.

Scale-out runs R replicas of one server; replica i serves the batches b with
b % R == i of every epoch. A loader is given all of them, as a list of
``host:port`` addresses or as ``dns:///NAME:PORT`` (a Kubernetes headless
Service's name resolves to every pod). Each server says which replica it is, so
the order of the addresses does not matter, and a set that misses a replica,
names one twice, or disagrees on R or on the dataset is refused before any batch.

Owner of one gRPC channel per replica. A DNS set is resolved again when a
replica is lost (a restarted pod comes back with a new address).

Waiting for a server: a server that is not up yet is asked again until ``timeout``;
one that refuses this client (its TLS settings, its token) is an error at once. A
wait that fails leaves no channel behind, so the next one connects at once rather
than after gRPC's reconnect backoff.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import math
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc

from batchferry import wire
from batchferry.errors import (
    BatchferryError,
    InvalidArgument,
    NotFound,
    ProtocolError,
    ServerUnavailable,
    TLSError,
    closed_in_handshake,
    from_rpc_error,
    refused_at_handshake,
    unreachable,
)
from batchferry.security import ClientSecurity
from batchferry.v1 import loader_pb2 as _pb2

__all__ = ["Replica", "ReplicaSet", "parse_address", "resolve"]

_DNS = "dns:"
_RESOLVE_EVERY = 0.5  # seconds between DNS lookups while a replica is missing
_RESOLVE_TIMEOUT = 5.0
# A server not up yet is asked again after this pause, doubled each time up to _RETRY_MAX
# (while gRPC waits out its reconnect backoff, an ask fails at once and costs nothing).
_RETRY_FIRST = 0.02
_RETRY_MAX = 0.25
# A look at a server's TLS when it closed a connection being set up, at most every
# _PROBE_EVERY seconds while it keeps doing so.
_PROBE_TIMEOUT = 2.0
_PROBE_EVERY = 1.0
# Each channel has its own connection and its own reconnect backoff: a fresh one after a
# failed wait is not held back by another loader's channel to the same server.
_OPTIONS = [*wire.CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


_Answer = _pb2.ListDatasetsResponse | BatchferryError


@dataclass
class _Tries:
    """One target's failed calls within one wait."""

    last: grpc.RpcError | None = None  # the last connection attempt's error
    suspect: TLSError | None = None  # what a look at the server's TLS says, until confirmed
    probed: float = -math.inf

    def verdict(self, target: str, timeout: float) -> ServerUnavailable:
        """The error when time is up: a suspected refusal rather than nothing at all."""
        return self.suspect or unreachable(target, timeout, self.last)


@dataclass
class Replica:
    index: int
    address: str
    channel: grpc.Channel
    info: _pb2.ListDatasetsResponse


def parse_address(address: str | Sequence[str]) -> tuple[tuple[str, ...], tuple[str, int] | None]:
    """Static ``host:port`` targets, or the (name, port) of a ``dns:`` target."""
    if isinstance(address, str):
        if not address:
            raise InvalidArgument("address must be 'host:port', a list of them, or 'dns:///NAME:PORT'")
        if address.startswith(_DNS):
            return (), _dns_target(address)
        return (address,), None
    if not isinstance(address, Sequence) or not address:
        raise InvalidArgument(
            f"address must be 'host:port', a list of them, or 'dns:///NAME:PORT', got {address!r}"
        )
    targets = tuple(address)
    for target in targets:
        if not isinstance(target, str) or not target or target.startswith(_DNS):
            raise InvalidArgument(
                f"each address of a replica list must be 'host:port', got {target!r} "
                "(give a dns:/// name on its own)"
            )
    if len(set(targets)) != len(targets):
        raise InvalidArgument(f"address list names a server twice: {list(targets)}")
    return targets, None


def _dns_target(address: str) -> tuple[str, int]:
    rest = address[len(_DNS) :]
    if rest.startswith("//"):
        authority, _, rest = rest[2:].partition("/")
        if authority:
            raise InvalidArgument(
                f"address {address!r}: a DNS server in the target (dns://SERVER/...) is not supported; "
                "use dns:///NAME:PORT, resolved by this host's resolver"
            )
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"address {address!r}: expected dns:///NAME:PORT")
    return host, int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ipaddress.ip_address(host).version == 6 else f"{host}:{port}"


def resolve(name: str, port: int, timeout: float = _RESOLVE_TIMEOUT) -> list[str]:
    """Every address ``name`` resolves to, as sorted ``ip:port`` targets ([] if none
    within ``timeout``: the host's resolver has no timeout of its own)."""
    answer: list[list[str]] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            infos = []
        answer.append(sorted({_join(str(info[4][0]), port) for info in infos}))

    thread = threading.Thread(target=lookup, name="batchferry-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else []


class ReplicaSet:
    """Finds, checks and keeps the channels of all replicas behind one loader address."""

    def __init__(self, address: str | Sequence[str], security: ClientSecurity | None = None) -> None:
        self._static, self._dns = parse_address(address)
        self.description = f"dns:///{self._dns[0]}:{self._dns[1]}" if self._dns else ", ".join(self._static)
        security = security or ClientSecurity()
        if security.tls and self._dns and not security.server_name:
            # Pods are reached by address; their certificate names the service.
            security = replace(security, server_name=self._dns[0])
        self.security = security
        self._channels: dict[str, grpc.Channel] = {}
        self.replicas: list[Replica] = []

    @property
    def size(self) -> int:
        return len(self.replicas)

    def _channel(self, target: str) -> grpc.Channel:
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = self.security.channel(target, _OPTIONS)
        return channel

    def _drop(self, target: str) -> None:
        """Close ``target``'s channel (one with no connection): the next is a fresh one."""
        channel = self._channels.pop(target, None)
        if channel is not None:
            channel.close()

    def stripe_channel(self, index: int, stripe: int) -> grpc.Channel:
        """The channel of replica ``index`` for stripe ``stripe``: each stripe on a connection of
        its own (stripe 0 shares the replica's), so streams are not queued behind one another."""
        if stripe == 0:
            return self.replicas[index].channel
        target = self.replicas[index].address
        key = f"{target}#{stripe}"
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = self.security.channel(target, _OPTIONS)
        return channel

    def _targets(self) -> list[str]:
        return resolve(*self._dns) if self._dns else list(self._static)

    def _ask(self, targets: list[str], timeout: float) -> dict[str, _Answer]:
        """ListDatasets on every target at once; each answer or the error it gave. A target
        not up yet is asked again until ``timeout``; a refusal is its answer at once."""
        deadline = time.monotonic() + timeout
        answers: dict[str, _Answer] = {}
        tries = {target: _Tries() for target in targets}
        pending, pause = list(targets), _RETRY_FIRST
        while pending:
            calls = {target: self._list_datasets(target, deadline) for target in pending}
            pending = []
            for target, call in calls.items():
                try:
                    answers[target] = wire.parse(_pb2.ListDatasetsResponse, call.result())
                except grpc.RpcError as exc:
                    err = self._refusal(target, exc, tries[target], deadline)
                    if err is None and time.monotonic() < deadline:
                        pending.append(target)
                    else:
                        answers[target] = err or tries[target].verdict(target, timeout)
                except (ValueError, concurrent.futures.CancelledError) as exc:
                    answers[target] = InvalidArgument(f"server {target} sent a malformed dataset list: {exc}")
            if pending:
                time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                pause = min(2 * pause, _RETRY_MAX)
        return answers

    def _list_datasets(self, target: str, deadline: float) -> grpc.Future:
        stub = self._channel(target).unary_unary(
            wire.LIST_DATASETS, request_serializer=None, response_deserializer=None
        )
        # Not wait_for_ready: a failed connection attempt ends the call with gRPC's reason,
        # which tells a server not up yet from one that refuses this client's TLS.
        timeout = max(deadline - time.monotonic(), 0.01)
        return stub.future(b"", timeout=timeout, metadata=self.security.metadata)

    def _refusal(
        self, target: str, exc: grpc.RpcError, tries: _Tries, deadline: float
    ) -> BatchferryError | None:
        """The error ``target``'s failed call is final with, or None to ask again."""
        err = from_rpc_error(exc, server=target, client=self.security.settings)
        if err.code == "DEADLINE_EXCEEDED":
            return None  # no answer in the time left: unreachable
        if not isinstance(err, ServerUnavailable) or isinstance(err, TLSError):
            return err
        tries.last = exc
        if not closed_in_handshake(exc):
            tries.suspect = None
            return None  # not up yet, or restarting
        # The server closed the connection while it was set up: as a server that refuses this
        # client's TLS does, or one that restarts. A look at its TLS tells which, and a second
        # attempt on a fresh connection confirms it.
        if tries.suspect is not None:
            return tries.suspect
        now = time.monotonic()
        if now - tries.probed >= _PROBE_EVERY:
            tries.probed = now
            seen = self.security.probe(target, min(_PROBE_TIMEOUT, max(deadline - now, 0.01)))
            tries.suspect = refused_at_handshake(target, self.security.settings, seen)
            if tries.suspect is not None:
                self._drop(target)
        return None

    def discover(self, dataset: str, timeout: float) -> list[Replica]:
        """Every replica, by index, checked to form one complete set serving ``dataset``
        (before any stream: a failed discover closes every channel it opened)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                targets = self._targets()
                # A DNS name may not list every pod yet (one is restarting): look again shortly.
                wait = min(remaining, _RESOLVE_EVERY) if self._dns else remaining
                try:
                    self.replicas = self._check(self._ask(targets, wait), dataset)
                    return self.replicas
                except TLSError:
                    raise
                except ServerUnavailable:
                    if not self._dns or time.monotonic() + _RESOLVE_EVERY >= deadline:
                        raise
                time.sleep(_RESOLVE_EVERY / 5)
        except BaseException:
            # gRPC keeps a channel's reconnect backoff (which grows while the server is away):
            # the next discover starts on fresh channels and finds a server up at once.
            self.close()
            raise

    def _check(self, answers: dict[str, _Answer], dataset: str) -> list[Replica]:
        if not answers:
            raise ServerUnavailable(f"{self.description} resolves to no address")
        by_index: dict[int, Replica] = {}
        counts: dict[str, int] = {}
        errors = {t: a for t, a in answers.items() if isinstance(a, BatchferryError)}
        seen: set[str] = set()
        for target, answer in answers.items():
            if isinstance(answer, BatchferryError):
                continue
            if answer.server_id:
                if answer.server_id in seen:
                    continue  # the same server through another address (IPv4 and IPv6, say)
                seen.add(answer.server_id)
            index, count = int(answer.replica_index), int(answer.num_replicas) or 1
            if not (1 <= count <= wire.MAX_REPLICAS and 0 <= index < count):
                raise ProtocolError(
                    f"server {target} reports itself as replica {index} of {count} "
                    f"(at most {wire.MAX_REPLICAS} replicas, index in [0, count))"
                )
            counts[target] = count
            if index in by_index:
                raise InvalidArgument(
                    f"{by_index[index].address} and {target} are both replica {index} of {count}; "
                    "every replica needs its own --replica-index"
                )
            by_index[index] = Replica(index, target, self._channel(target), answer)
        if len(set(counts.values())) > 1:
            raise InvalidArgument(f"servers disagree on num_replicas: {counts}")
        count = next(iter(counts.values()), 0)
        missing = [i for i in range(count) if i not in by_index]
        if errors and (missing or not count):
            # e.g. one server, unreachable: its own error; a refusal before a server not up yet
            raise min(errors.values(), key=lambda e: type(e) is ServerUnavailable)
        if missing:
            found = ", ".join(f"{r.address} is replica {i}" for i, r in sorted(by_index.items()))
            raise ServerUnavailable(
                f"{self.description}: replica(s) {missing} of {count} missing ({found}); give the loader "
                "every replica's address, or a dns:/// name that resolves to all of them"
            )
        replicas = [by_index[i] for i in range(count)]
        lengths = {}
        for r in replicas:
            infos = {d.name: d for d in r.info.datasets}
            if dataset not in infos:
                raise NotFound(
                    f"dataset {dataset!r} not found on {r.address}; it has: {', '.join(sorted(infos))}"
                )
            lengths[r.address] = int(infos[dataset].length)
        if len(set(lengths.values())) > 1:
            raise InvalidArgument(f"replicas disagree on the length of dataset {dataset!r}: {lengths}")
        return replicas

    def refresh(self, index: int, timeout: float) -> Replica | None:
        """After replica ``index`` was lost: where it is now and what it says of itself
        (None if it does not answer yet). With a DNS name the pod may have moved; a
        static address is asked again (a restarted server has a new shared-memory ring)."""
        known = {r.address for r in self.replicas if r.index != index}
        fresh = (
            [t for t in self._targets() if t not in known] if self._dns else [self.replicas[index].address]
        )
        for target, answer in self._ask(fresh, min(timeout, _RESOLVE_EVERY)).items():
            if isinstance(answer, BatchferryError) and type(answer) is not ServerUnavailable:
                raise answer  # it refuses (a token no longer accepted, a certificate, say)
            if isinstance(answer, _pb2.ListDatasetsResponse) and int(answer.replica_index) == index:
                old = self.replicas[index].address
                self.replicas[index] = Replica(index, target, self._channel(target), answer)
                if old != target:
                    for key in [k for k in self._channels if k == old or k.startswith(f"{old}#")]:
                        self._channels.pop(key).close()  # the pod that had it is gone
                return self.replicas[index]
        return None

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
