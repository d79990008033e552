"""Byte-stream compression (``compression=``): bit-exact batches in every mode, raw where
it does not pay, and clear errors for bad values and bad bytes."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler, Subset, TensorDataset

from batchferry import codec, errors, wire
from batchferry.client import DataLoader
from batchferry.client import connection as loader_module
from batchferry.client.options import COMPRESSION_ENV
from batchferry.server import Server
from batchferry.server import compression as server_compression
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same
from reading import in_step, read_concurrently
from toy_datasets import Docs

CHUNK = wire.MIN_CHUNK_BYTES  # several chunks per batch
CODECS = ["lz4", "zstd"]


def _ints() -> TensorDataset:
    """int64 rows of small values: 8 KiB a sample, compresses several times."""
    return TensorDataset((torch.arange(240 * 1024, dtype=torch.int64).reshape(240, 1024) * 31) % 500)


def _mixed() -> TensorDataset:
    n = 150
    return TensorDataset(
        torch.arange(n * 256, dtype=torch.float32).reshape(n, 256) / 8,
        (torch.arange(n * 512) % 7).to(torch.uint8).reshape(n, 512),
        (torch.arange(n * 512) % 3 == 0).reshape(n, 512),
        torch.arange(n) % 5,
    )


def _noise() -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 32768), np.uint8)))


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    datasets = {"ints": _ints(), "mixed": _mixed(), "noise": _noise(), "docs": Docs()}
    with Server(datasets, host="127.0.0.1", port=0, num_workers=2) as server:
        yield server


def _wire_bytes(server: Server, dataset: str) -> tuple[float, float]:
    """(bytes written to byte streams, payload bytes they carried) for ``dataset`` so far."""
    sent = payload = 0.0
    for metric in server.metrics.registry.collect():
        for sample in metric.samples:
            if sample.labels.get("dataset") != dataset or sample.labels.get("transport") != "grpc":
                continue
            if sample.name == "batchferry_sent_bytes_total":
                sent += sample.value
            elif sample.name == "batchferry_batch_bytes_total":
                payload += sample.value
    return sent, payload


def _loader(server: Server, dataset: str, batch_size: int, **kw: object) -> DataLoader:
    kw.setdefault("transport", "grpc")
    return DataLoader(server.address, dataset, batch_size, chunk_bytes=CHUNK, **kw)  # type: ignore[arg-type]


# -- round trip -------------------------------------------------------------------------
@pytest.mark.parametrize("name", CODECS)
def test_batches_are_bit_exact_and_smaller_on_the_wire(srv: Server, name: str) -> None:
    for dataset, ds in (("ints", _ints()), ("mixed", _mixed())):
        before = _wire_bytes(srv, dataset)
        ref = TorchLoader(ds, 24, shuffle=True, generator=torch.Generator().manual_seed(3))
        with _loader(srv, dataset, 24, shuffle=True, seed=3, compression=name) as loader:
            assert_same(list(loader), list(ref))
        sent, payload = (a - b for a, b in zip(_wire_bytes(srv, dataset), before))
        assert 0 < sent < payload / 2, (dataset, sent, payload)


@pytest.mark.parametrize("name", CODECS)
def test_pad_collated_tokens_are_bit_exact(srv: Server, name: str) -> None:
    with _loader(srv, "docs", 16, collate_fn="pad") as plain:
        expected = list(plain)
    before = _wire_bytes(srv, "docs")
    with _loader(srv, "docs", 16, collate_fn="pad", compression=name) as loader:
        assert_same(list(loader), expected)
    sent, payload = (a - b for a, b in zip(_wire_bytes(srv, "docs"), before))
    assert sent < payload / 2


def test_incompressible_batches_go_raw(srv: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(server_compression.MIN_RATIO_ENV, raising=False)  # as shipped
    before = _wire_bytes(srv, "noise")
    with _loader(srv, "noise", 8, compression="lz4") as loader:
        assert_same(list(loader), list(TorchLoader(_noise(), 8)))
    sent, payload = (a - b for a, b in zip(_wire_bytes(srv, "noise"), before))
    # Raw: the payload plus headers, not the payload plus blosc2's per-chunk overhead.
    assert payload <= sent < payload + 4096


def test_payload_messages_choose_per_batch_and_reassemble(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(server_compression.MIN_RATIO_ENV, raising=False)  # as shipped
    data = {
        "tokens": (np.arange(300_000, dtype=np.int64) % 900).view(np.uint8),
        "noise": np.random.default_rng(1).integers(0, 256, 300_000, np.uint8),
    }
    for kind, payload in data.items():
        layout = pb.Layout(
            root=pb.Node(tensor=pb.TensorSpec(dtype=pb.INT64, shape=[payload.nbytes // 8])),
            payload_bytes=payload.nbytes,
        )
        used, messages = server_compression.payload_messages(payload, CHUNK, pb.CODEC_LZ4, layout)
        assert used == (pb.CODEC_LZ4 if kind == "tokens" else pb.CODEC_NONE)
        chunks = list(messages)
        assert len(chunks) == -(-payload.nbytes // CHUNK)
        out = np.zeros_like(payload)
        offset = 0
        for chunk in chunks:
            if used == pb.CODEC_NONE:
                out[offset : offset + len(chunk)] = np.frombuffer(chunk, np.uint8)
                offset += len(chunk)
            else:
                offset += codec.decompress_into(chunk, out[offset:])
        assert offset == payload.nbytes and np.array_equal(out, payload)


# -- modes, stripes, resume ---------------------------------------------------------------
def _ids(batches: list[object]) -> list[int]:
    return [int(row[0]) for b in batches for row in b[0]]  # type: ignore[index]


@pytest.mark.parametrize("streams", [1, 3])
def test_torch_order_with_stripes_and_resume(srv: Server, streams: int) -> None:
    ref = TorchLoader(_ints(), 16, shuffle=True, generator=torch.Generator().manual_seed(9))
    expected = [list(ref) for _ in range(2)]
    loader = _loader(srv, "ints", 16, shuffle=True, seed=9, streams=streams, compression="lz4")
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    state = loader.state_dict()
    loader.close()
    with _loader(srv, "ints", 16, shuffle=True, seed=1, streams=streams, compression="lz4") as again:
        again.load_state_dict(state)
        got = [head + list(again), list(again)]
    for epoch in range(2):
        assert_same(got[epoch], expected[epoch])


def test_sharded_ranks_match_distributed_sampler(srv: Server) -> None:
    ds = _ints()
    for rank in range(2):
        sampler = DistributedSampler(ds, 2, rank, shuffle=True, seed=4)
        sampler.set_epoch(1)
        expected = list(TorchLoader(ds, 16, sampler=sampler))
        with _loader(
            srv, "ints", 16, shuffle=True, seed=4, mode="sharded", job="c-shard", rank=rank, world_size=2,
            compression="zstd",
        ) as loader:  # fmt: skip
            loader.set_epoch(1)
            assert_same(list(loader), expected)


def test_shared_consumers_get_the_same_batches(srv: Server) -> None:
    ds = _ints()
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(5)).tolist()
    expected = list(TorchLoader(Subset(ds, order), 16))
    loaders = [
        _loader(srv, "ints", 16, shuffle=True, seed=5, mode="shared", job="c-shared", compression="lz4")
        for _ in range(2)
    ]
    got = in_step(loaders, len(expected))
    for seq in got:
        assert_same(seq, expected)
    for loader in loaders:
        loader.close()


def test_dynamic_splits_the_epoch_exactly_once_and_resumes(srv: Server) -> None:
    all_ids = sorted(_ids(list(TorchLoader(_ints(), 16))))

    def dynamic(job: str) -> DataLoader:
        return _loader(srv, "ints", 16, shuffle=True, seed=2, mode="dynamic", job=job, compression="lz4")

    loaders = [dynamic("c-dyn") for _ in range(2)]
    got = read_concurrently(loaders)
    assert sorted(_ids(got[0] + got[1])) == all_ids
    for loader in loaders:
        loader.close()

    first = dynamic("c-dyn-resume")
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = first.state_dict()
    first.close()
    with dynamic("c-dyn-resume") as second:
        second.load_state_dict(state)
        rest = list(second)
    assert sorted(_ids(head + rest)) == all_ids


# -- where it is on ---------------------------------------------------------------------
def test_auto_compresses_only_to_another_host(srv: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _wire_bytes(srv, "ints")
    with _loader(srv, "ints", 16, compression="auto") as loader:  # this host, byte stream forced
        list(loader)
    sent, payload = (a - b for a, b in zip(_wire_bytes(srv, "ints"), before))
    assert sent >= payload
    with _loader(srv, "ints", 16, transport="auto", compression="auto") as loader:
        assert loader.transport == "shm"  # same host: nothing to compress
    # Another host, as the client sees it: the server's shared memory is not visible.
    monkeypatch.setattr(loader_module, "probe", lambda *_: False)
    before = _wire_bytes(srv, "ints")
    with _loader(srv, "ints", 16, transport="auto", compression="auto") as loader:
        assert loader.transport == "grpc"
        assert_same(list(loader), list(TorchLoader(_ints(), 16)))
    sent, payload = (a - b for a, b in zip(_wire_bytes(srv, "ints"), before))
    assert sent < payload / 2


# -- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["LZ4", "gzip", 1, True])
def test_invalid_compression_values_are_refused(srv: Server, value: object) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"compression .*'none', 'lz4', 'zstd', 'auto'"):
        DataLoader(srv.address, "ints", 4, compression=value)  # type: ignore[arg-type]


def test_after_trials_that_do_not_pay_frames_go_raw_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(server_compression.MIN_RATIO_ENV, raising=False)  # as shipped
    calls = []
    real = codec.compress
    monkeypatch.setattr(codec, "compress", lambda *a: calls.append(1) or real(*a))
    noise = np.random.default_rng(2).integers(0, 256, 3 * CHUNK, np.uint8)
    tokens = (np.arange(3 * CHUNK // 8, dtype=np.int64) % 900).view(np.uint8)
    layout = pb.Layout(root=pb.Node(tensor=pb.TensorSpec(dtype=pb.INT64, shape=[3 * CHUNK // 8])))
    trials = server_compression.Trials()

    def send(payload: np.ndarray) -> tuple[int, int]:
        """The codec a batch went with, and the chunks compressed for it."""
        before = len(calls)
        used, messages = server_compression.payload_messages(payload, CHUNK, pb.CODEC_LZ4, layout, trials)
        list(messages)
        return used, len(calls) - before

    tried = [send(noise) for _ in range(64)]
    assert all(used == pb.CODEC_NONE for used, _ in tried)
    # Trials at batches 0, 2, 5, 10, 19, 36, 53: then one in MAX_SKIP + 1.
    assert [i for i, (_, n) in enumerate(tried) if n] == [0, 2, 5, 10, 19, 36, 53]
    assert all(n in (0, 1) for _, n in tried)
    # Compressible data again: raw until the next trial (batch 70: 53 + MAX_SKIP + 1),
    # compressed from then on.
    after = [send(tokens) for _ in range(20)]
    assert after[:6] == [(pb.CODEC_NONE, 0)] * 6
    assert after[6:] == [(pb.CODEC_LZ4, 3)] * 14


def test_a_missing_blosc2_names_the_extra(srv: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    codec.load.cache_clear()
    monkeypatch.setitem(sys.modules, "blosc2", None)  # import blosc2 -> ImportError
    try:
        with pytest.raises(ImportError, match=r"pip install 'batchferry\[compression\]'"):
            DataLoader(srv.address, "ints", 4, compression="lz4")
        # A server without it sends raw.
        payload = np.zeros(1 << 16, np.uint8)
        layout = pb.Layout(root=pb.Node(tensor=pb.TensorSpec(dtype=pb.UINT8, shape=[1 << 16])))
        used, _ = server_compression.payload_messages(payload, CHUNK, pb.CODEC_LZ4, layout)
        assert used == pb.CODEC_NONE
    finally:
        monkeypatch.undo()
        codec.load.cache_clear()


def test_an_unknown_codec_from_a_raw_client_is_refused(srv: Server) -> None:
    request = pb.ClientMessage(
        open=pb.OpenStream(dataset="ints", batch_size=4, credits=2, compression=7)  # type: ignore[arg-type]
    ).SerializeToString()
    with grpc.insecure_channel(srv.address) as channel:
        call = channel.stream_stream(wire.STREAM_BATCHES, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([request]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "compression: unknown value 7" in info.value.details()
    with _loader(srv, "ints", 16, compression="lz4") as loader:  # still serving
        assert len(list(loader)) == len(loader)


def _truncated(chunk: bytes) -> bytes:
    return chunk[:-5]


def _claims_more(chunk: bytes) -> bytes:
    # blosc2's header: bytes 4-7 are the decompressed size (little endian).
    return chunk[:4] + (1 << 30).to_bytes(4, "little") + chunk[8:]


def _not_blosc2(chunk: bytes) -> bytes:
    return b"x" * len(chunk)


@pytest.mark.parametrize("spoil", [_truncated, _claims_more, _not_blosc2])
def test_a_malformed_compressed_chunk_fails_the_stream_cleanly(
    srv: Server, monkeypatch: pytest.MonkeyPatch, spoil: object
) -> None:
    compress = codec.compress
    monkeypatch.setattr(codec, "compress", lambda *a: spoil(compress(*a)))  # type: ignore[operator]
    with _loader(srv, "ints", 16, compression="lz4") as loader:
        with pytest.raises(errors.ProtocolError, match="malformed stream from server: batch"):
            list(loader)
    monkeypatch.undo()
    with _loader(srv, "ints", 16, compression="lz4") as loader:
        assert_same(list(loader), list(TorchLoader(_ints(), 16)))


# -- the environment's defaults -----------------------------------------------------------
def test_loaders_that_name_no_codec_take_the_environments(
    srv: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(server_compression.MIN_RATIO_ENV, raising=False)
    with _loader(srv, "docs", 16, collate_fn="pad", compression="none") as plain:
        expected = list(plain)
    monkeypatch.setenv(COMPRESSION_ENV, "lz4")
    before = _wire_bytes(srv, "docs")
    with _loader(srv, "docs", 16, collate_fn="pad") as loader:
        assert_same(list(loader), expected)
    sent, payload = (a - b for a, b in zip(_wire_bytes(srv, "docs"), before))
    assert sent < payload / 2
    before = _wire_bytes(srv, "docs")
    with _loader(srv, "docs", 16, collate_fn="pad", compression="none") as loader:  # the argument wins
        assert_same(list(loader), expected)
    sent, payload = (a - b for a, b in zip(_wire_bytes(srv, "docs"), before))
    assert sent >= payload
    monkeypatch.setenv(COMPRESSION_ENV, "gzip")
    with pytest.raises(errors.InvalidArgument, match="environment BATCHFERRY_COMPRESSION: must be one of"):
        DataLoader(srv.address, "docs", 4)


@pytest.mark.parametrize("value", ["fast", "-1", "nan"])
def test_a_bad_min_ratio_in_the_environment_fails_the_server_start(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(server_compression.MIN_RATIO_ENV, value)
    with pytest.raises(ValueError, match=f"environment {server_compression.MIN_RATIO_ENV}: must be"):
        Server({"ints": _ints()}, host="127.0.0.1", port=0, num_workers=0)
