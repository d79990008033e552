"""What a loader keeps toward its servers across epochs, and how it reaches each.

Owner: one DataLoader. A :class:`Connection` owns the replica set (a gRPC channel per
replica and stripe), the receiver processes (``receive_processes=True``), the pooled
(pinned) host buffers, the mapped shared-memory segments and the CUDA copier;
:meth:`Connection.close` releases them all. Once the servers have answered it decides,
per replica, the transport (shared memory when the server's is visible here), the
streams per replica (stripes) and the frames each stream may have in flight.
"""

from __future__ import annotations

from typing import Any

import grpc
import torch

from batchferry import codec, layout, wire
from batchferry.errors import InvalidArgument, ProtocolError, dataset_error, from_rpc_error
from batchferry.relay.parent import ReceiverProcess, ReceiverProcesses
from batchferry.v1 import loader_pb2 as _pb2

from .buffers import BufferPool
from .device import CudaCopier
from .options import LoaderConfig
from .replicas import Replica, ReplicaSet
from .segments import SegmentCache, probe

__all__ = ["Connection"]

# Byte-stream connections per server by default: one stream moves one message at a time.
_BYTE_STREAMS = 2
_SEGMENTS = 256  # mapped segments besides receivers' slots (a server's ring, with room)


class Connection:
    """A loader's servers and the resources it reads their batches with."""

    def __init__(self, replicas: ReplicaSet, config: LoaderConfig) -> None:
        self.config = config
        self.replicas = replicas
        dev = config.device
        pin = (config.pin_memory or dev is not None) and torch.cuda.is_available()
        # Grown to cover every replica's stream once the replicas are known.
        self.pool = BufferPool(config.prefetch_factor + 2, pin=pin)
        self.copier = CudaCopier(dev) if dev is not None else None
        self.segments = SegmentCache(register_with_cuda=dev is not None)
        # The replicas' settings: with a dns:/// name they check certificates against it.
        self.receivers = ReceiverProcesses(replicas.security) if config.receive_processes else None
        self._info: _pb2.DatasetInfo | None = None
        self._use_shm: list[bool] | None = None  # per replica

    # -- the servers ------------------------------------------------------------------
    def dataset_info(self) -> _pb2.DatasetInfo:
        """The dataset as the servers describe it (asked once, within ``timeout``)."""
        if self._info is None:
            replicas = self.replicas.discover(self.config.dataset, self.config.timeout)
            self._info = {d.name: d for d in replicas[0].info.datasets}[self.config.dataset]
            # Room for every stream's frames, before the transport (and so the stripes) is known.
            parts = len(replicas) * (self.config.streams or _BYTE_STREAMS)
            per_stream = max(2, -(-self.config.prefetch_factor // parts))
            self.pool.max_buffers = max(self.pool.max_buffers, parts * per_stream + 2)
        return self._info

    @property
    def described(self) -> bool:
        """Whether the servers have been asked about the dataset yet."""
        return self._info is not None

    @property
    def dataset_length(self) -> int:
        return int(self.dataset_info().length)

    @property
    def server_workers(self) -> int:
        self.dataset_info()
        return int(self.replicas.replicas[0].info.num_workers)

    @property
    def size(self) -> int:
        """Servers sharing each epoch (1 for a single server)."""
        self.dataset_info()
        return self.replicas.size

    def use_shm(self, r: int) -> bool:
        """Whether replica ``r``'s batches come by shared memory (decided once, at first use)."""
        if self._use_shm is None:
            self.dataset_info()
            self._use_shm = [self._shm_visible(replica) for replica in self.replicas.replicas]
        return self._use_shm[r]

    @property
    def transport(self) -> str:
        """``"shm"``, ``"grpc"``, or ``"shm+grpc"`` with replicas on several hosts."""
        shm = [self.use_shm(r) for r in range(self.size)]
        if all(shm):
            return "shm"
        return "shm+grpc" if any(shm) else "grpc"

    def links(self) -> tuple[tuple[str, ...], int]:
        """Each replica's transport and the streams per replica, once decided (for stats)."""
        if self._use_shm is None:
            return (), 0
        return tuple("shm" if shm else "grpc" for shm in self._use_shm), self.stripes

    def sample(self, index: int) -> Any:
        """Sample ``index`` of the dataset, built by a server worker (GetSample)."""
        self.dataset_info()
        replica = self.replicas.replicas[0]  # every replica serves every sample
        call = replica.channel.unary_unary(
            wire.GET_SAMPLE, request_serializer=None, response_deserializer=None
        )
        request = _pb2.GetSampleRequest(dataset=self.config.dataset, index=index).SerializeToString()
        try:
            raw = call(request, timeout=self.config.timeout, metadata=self.replicas.security.metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        try:
            answer = wire.parse(_pb2.GetSampleResponse, raw)
            if not answer.HasField("error"):
                payload = torch.frombuffer(bytearray(answer.payload) or bytearray(1), dtype=torch.uint8)
                return layout.decode(answer.layout, payload[: len(answer.payload)])
        except (ValueError, layout.LayoutError) as exc:
            raise ProtocolError(f"{replica.address} sent a malformed sample: {exc}") from exc
        failure, dataset = answer.error, self.config.dataset
        where = f"in batchferry server {replica.address} (dataset {dataset!r}, sample {index})"
        raise dataset_error(failure.type, failure.message, failure.traceback, where)

    def rediscover(self, r: int, timeout: float) -> Replica | None:
        """After replica ``r`` was lost: it again, if it answers. A restarted server has a new
        ring, and a rescheduled pod may be on another host, so its transport is decided again."""
        found = self.replicas.refresh(r, timeout)
        if found is not None and self._use_shm is not None:
            self._use_shm[r] = self._shm_visible(found)
        return found

    def _shm_visible(self, replica: Replica) -> bool:
        visible = probe(replica.info.shm_probe, replica.info.shm_token)
        if self.config.transport == "shm" and not visible:
            raise InvalidArgument(
                f"transport='shm' needs the server's shared memory, but the segment "
                f"{replica.info.shm_probe or '(none)'} of {replica.address} is not visible here (another "
                "host, or a container without the server's IPC namespace and /dev/shm); use 'auto' or 'grpc'"
            )
        return visible and self.config.transport != "grpc"

    # -- streams ----------------------------------------------------------------------
    @property
    def stripes(self) -> int:
        """Streams (each on its own connection) per server: more than one only on the byte
        stream, where one stream waits on each message in turn."""
        if self.config.streams is not None:
            return self.config.streams
        if self.config.mode not in ("independent", "sharded") or self.transport == "shm":
            return 1
        if self.dataset_info().iterable:
            return 1  # one stream carries the iterators' round robin
        return _BYTE_STREAMS

    def credits_for(self, parts: int) -> int:
        """Frames in flight per stream of an epoch of ``parts`` streams: prefetch_factor in
        all, at least 2 per stream."""
        if parts <= 1:
            return self.config.prefetch_factor
        return max(2, -(-self.config.prefetch_factor // parts))

    def codec(self, r: int) -> _pb2.Codec:
        """The codec replica ``r``'s streams ask for: none over shared memory; with "auto",
        lz4 only to a server on another host (its shared memory is not visible here)."""
        wanted = self.config.compression
        if self.use_shm(r) or wanted == "none":
            return _pb2.CODEC_NONE
        if wanted == "auto":
            info = self.replicas.replicas[r].info
            return _pb2.CODEC_NONE if probe(info.shm_probe, info.shm_token) else _pb2.CODEC_LZ4
        return codec.CODECS[wanted]

    def relayed(self, r: int) -> bool:
        """Whether replica ``r``'s streams are received by processes of their own."""
        return not self.use_shm(r) and self.receivers is not None

    def receiver(self, j: int, credits: int, parts: int) -> ReceiverProcess:
        """Stream ``j``'s receiver process (of ``parts``, ``credits`` each). Its slots: a frame
        per credit in flight, those the loop still views (two steps) and those queued here,
        with room to spare."""
        assert self.receivers is not None
        max_slots = 2 * credits + 8
        self.segments.reserve(_SEGMENTS + parts * max_slots)
        return self.receivers.get(j, self.replicas.replicas[j % self.size].address, max_slots=max_slots)

    def where(self, j: int) -> str:
        """Stream ``j``'s server, as messages name it."""
        r = j % self.size
        address = self.replicas.replicas[r].address
        return f"replica {r} of {self.size} ({address})" if self.size > 1 else f"server {address}"

    def close(self) -> None:
        if self.receivers is not None:
            self.receivers.close()
        self.replicas.close()
        self.segments.close()
        self.pool.close()
