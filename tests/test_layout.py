"""The batch layout: any tree round-trips through a slot; bad layouts are refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchferry import layout
from batchferry.v1 import loader_pb2 as pb

from support import assert_same

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    seed = draw(st.integers(0, 2**31))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 50
    t = t.to(dtype) if dtype != torch.bool else t > 0
    if draw(st.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous input
    return t


leaves = st.one_of(
    tensors(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(max_size=8),
    st.none(),
)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-5, 5)), children, max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(trees)
def test_roundtrip(tree: Any) -> None:
    slot = torch.zeros(1 << 16, dtype=torch.uint8)
    writer = layout.SlotWriter(slot)
    msg = layout.encode(tree, writer)
    wire_msg = pb.Layout.FromString(msg.SerializeToString())
    payload = slot[: wire_msg.payload_bytes].clone()  # what the client receives
    out = layout.decode(wire_msg, payload)
    assert_same(out, tree)
    for spec in _specs(wire_msg.root):
        assert spec.offset % layout.ALIGNMENT == 0


def _specs(node: pb.Node) -> list[pb.TensorSpec]:
    kind = node.WhichOneof("kind")
    if kind == "tensor":
        return [node.tensor]
    if kind in ("list", "tuple"):
        return [s for n in getattr(node, kind).items for s in _specs(n)]
    if kind == "dict":
        return [s for n in node.dict.values for s in _specs(n)]
    return []


def test_tensors_already_in_the_slot_are_not_copied() -> None:
    slot = torch.zeros(4096, dtype=torch.uint8)
    writer = layout.SlotWriter(slot)
    inside = writer.alloc((4, 4), torch.float32)
    inside.fill_(3)
    msg = layout.encode({"x": inside}, writer)
    assert writer.used == 64 and msg.root.dict.values[0].tensor.offset == 0


def test_overflow_reports_the_size_needed() -> None:
    writer = layout.SlotWriter(torch.zeros(128, dtype=torch.uint8))
    with pytest.raises(layout.SlotOverflow) as info:
        layout.encode([torch.zeros(100), torch.zeros(3)], writer)
    assert info.value.needed == layout.align(400) + 12


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (pb.TensorSpec(dtype=pb.FLOAT32, shape=[1000], offset=0), "outside the payload"),
        (pb.TensorSpec(dtype=pb.FLOAT32, shape=[2], offset=3), "outside the payload"),
        (pb.TensorSpec(dtype=pb.FLOAT32, shape=[-2], offset=0), "negative"),
        (pb.TensorSpec(dtype=999, shape=[2], offset=0), "unknown dtype"),
        # 2**64 elements: a 64-bit product would wrap to 0 bytes and pass the bounds check.
        (pb.TensorSpec(dtype=pb.UINT8, shape=[2**32, 2**32], offset=0), "outside the payload"),
    ],
)
def test_decode_refuses_bad_layouts(spec: pb.TensorSpec, needle: str) -> None:
    msg = pb.Layout(root=pb.Node(tensor=spec), payload_bytes=64)
    with pytest.raises(layout.LayoutError, match=needle):
        layout.decode(msg, torch.zeros(64, dtype=torch.uint8))


def test_decode_refuses_short_payload_and_empty_nodes() -> None:
    with pytest.raises(layout.LayoutError, match="spans"):
        layout.decode(
            pb.Layout(root=pb.Node(none=pb.NoneValue()), payload_bytes=10),
            torch.zeros(5, dtype=torch.uint8),
        )
    with pytest.raises(layout.LayoutError, match="no kind"):
        layout.decode(pb.Layout(root=pb.Node()), torch.zeros(0, dtype=torch.uint8))


@pytest.mark.parametrize("value", [b"bytes", object(), {1.5: torch.zeros(1)}, torch.zeros(2).to_sparse()])
def test_encode_refuses_what_it_cannot_send(value: Any) -> None:
    with pytest.raises(layout.LayoutError):
        layout.encode(value, layout.SlotWriter(torch.zeros(1024, dtype=torch.uint8)))
