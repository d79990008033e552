"""GetSample: one sample of a dataset, for a loader's ``dataset[i]``.

A sample is built as a batch of one is: by a worker, into a ring slot, with the
``convert`` collate (torch's ``default_convert``: no batch dimension), so the
dataset's code never runs in the server's own process, and the same limits hold as
for batches (the ring's budget and ``slot_timeout_s``, ``max_batch_bytes``). The
payload is copied out of the slot into the answer and the slot goes back at once; a
sample the dataset fails to build is answered with its error, as a batch's error frame
carries it.
"""

from __future__ import annotations

import grpc
import numpy as np

from batchferry import protocol, wire
from batchferry.v1 import loader_pb2 as _pb2

from .builder import Builder
from .plan import Plan, shown
from .status import Abort, invalid

__all__ = ["MAX_SAMPLE_BYTES", "check_sample_bytes", "sample_plan", "take_sample"]

# A sample is one answer: within the largest message either side takes.
MAX_SAMPLE_BYTES = wire.MAX_CHUNK_BYTES


def check_sample_bytes(size: int) -> None:
    """Refuse a sample of ``size`` bytes that one answer cannot carry."""
    if size > MAX_SAMPLE_BYTES:
        raise Abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"a sample of this dataset takes about {size} bytes, more than one answer carries "
            f"({MAX_SAMPLE_BYTES} bytes): read it through a loader instead (batch_size=None)",
        )


def sample_plan(request: _pb2.GetSampleRequest, lengths: dict[str, int]) -> Plan:
    """The plan of a batch of sample ``request.index``, or an Abort naming the field."""
    length = lengths.get(request.dataset)
    if length is None:
        raise Abort(
            grpc.StatusCode.NOT_FOUND,
            f"dataset {shown(request.dataset)} not found; this server has: {', '.join(sorted(lengths))}",
        )
    if not 0 <= request.index < length:
        raise invalid(
            f"index must be in [0, {length}) for dataset {shown(request.dataset)}, got {request.index}"
        )
    return Plan(
        dataset=request.dataset,
        collate=protocol.CONVERT_COLLATE,
        batch_size=1,
        num_batches=1,
        start_batch=0,
        credits=1,
        chunk_bytes=0,
        shm=False,
        unbatched=True,  # the collate gets the sample itself: no batch dimension
        length=length,
    )


def take_sample(builder: Builder, index: int) -> _pb2.GetSampleResponse:
    """Build sample ``index`` and copy it out of its slot (the slot goes back here)."""
    build = builder.start(0, wait=True, samples=np.array([index], dtype=np.int64))
    assert build is not None  # a waiting start returns a build or raises
    built = builder.finish(build)
    try:
        if built.error is not None:
            failure = built.error
            error = _pb2.BatchError(type=failure.type, message=failure.message, traceback=failure.traceback)
            return _pb2.GetSampleResponse(error=error)
        check_sample_bytes(built.payload_bytes)
        payload = built.lease.segment.array(built.payload_bytes).tobytes()
    finally:
        built.lease.release()
    return _pb2.GetSampleResponse(layout=built.layout, payload=payload)
