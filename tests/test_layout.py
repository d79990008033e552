"""The batch layout: any tree round-trips through a slot; bad layouts are refused."""

from __future__ import annotations

import sys
import types
from collections import namedtuple
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchferry import layout
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same

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


Point = namedtuple("Point", ["x", "y"])


class Record(NamedTuple):
    features: torch.Tensor
    label: int


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
        st.tuples(children, children).map(lambda xy: Point(*xy)),
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
    if kind in ("list", "tuple", "namedtuple"):
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


def _roundtrip(tree: Any) -> Any:
    slot = torch.zeros(1 << 12, dtype=torch.uint8)
    msg = pb.Layout.FromString(layout.encode(tree, layout.SlotWriter(slot)).SerializeToString())
    return layout.decode(msg, slot)


def _named(module: str, qualname: str, fields: list[str], items: int | None = None) -> pb.Layout:
    values = [pb.Node(int=i) for i in range(len(fields) if items is None else items)]
    node = pb.NodeNamed(module=module, qualname=qualname, fields=fields, items=values)
    return pb.Layout(root=pb.Node(namedtuple=node))


def test_namedtuples_come_back_as_their_class() -> None:
    tree = [Point(torch.arange(3), "a"), {"r": Record(torch.ones(2, 2), 7)}, Point(Point(1, 2), None)]
    out = _roundtrip(tree)
    assert_same(out, tree)
    assert type(out[0]) is Point and type(out[1]["r"]) is Record and type(out[2].x) is Point
    assert out[1]["r"].label == 7 and torch.equal(out[0].x, torch.arange(3))
    assert layout.describe(tree[1]) == "{'r': Record(features=Tensor[float32, 2x2], label=int)}"


def test_a_namedtuple_class_not_imported_here_comes_back_equivalent() -> None:
    missing = "batchferry_tests_never_imported"
    first = layout.decode(_named(missing, "Outer.Pair", ["left", "right"]), torch.zeros(0, dtype=torch.uint8))
    again = layout.decode(_named(missing, "Outer.Pair", ["left", "right"]), torch.zeros(0, dtype=torch.uint8))
    assert missing not in sys.modules  # looked for, never imported
    assert type(first).__name__ == "Pair" and type(first)._fields == ("left", "right")
    assert (first.left, first.right) == (0, 1) and first == (0, 1)
    assert type(again) is type(first)  # one class per (module, name, fields)
    other = layout.decode(_named(missing, "Outer.Pair", ["left"]), torch.zeros(0, dtype=torch.uint8))
    assert type(other) is not type(first) and other._fields == ("left",)


def test_an_imported_class_with_other_fields_or_in_a_function_is_not_used() -> None:
    here = Point.__module__
    wrong_fields = layout.decode(_named(here, "Point", ["x", "z"]), torch.zeros(0, dtype=torch.uint8))
    assert type(wrong_fields) is not Point and wrong_fields._fields == ("x", "z")
    local = layout.decode(_named(here, "f.<locals>.Point", ["x", "y"]), torch.zeros(0, dtype=torch.uint8))
    assert type(local) is not Point and local._fields == ("x", "y")
    right = layout.decode(_named(here, "Point", ["x", "y"]), torch.zeros(0, dtype=torch.uint8))
    assert type(right) is Point


def test_looking_for_a_class_runs_no_module_code(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    lazy = types.ModuleType("batchferry_tests_lazy")
    vars(lazy)["__getattr__"] = calls.append  # getattr(lazy, name) would call it
    monkeypatch.setitem(sys.modules, "batchferry_tests_lazy", lazy)
    out = layout.decode(
        _named("batchferry_tests_lazy", "Point", ["x", "y"]), torch.zeros(0, dtype=torch.uint8)
    )
    assert calls == [] and out._fields == ("x", "y")


def test_renamed_fields_round_trip() -> None:
    renamed = namedtuple("Renamed", ["a", "def", "a"], rename=True)  # fields a, _1, _2
    out = _roundtrip(renamed(1, 2, 3))
    assert out == (1, 2, 3) and out._fields == ("a", "_1", "_2")


@pytest.mark.parametrize(
    ("fields", "items", "qualname", "needle"),
    [
        (["x", "y"], 1, "P", "2 fields but 1 items"),
        (["x"], 3, "P", "1 fields but 3 items"),
        (["x", "not valid"], None, "P", "not a field name"),
        (["x", "class"], None, "P", "not a field name"),
        (["_private"], None, "P", "not a field name"),
        (["_1"], None, "P", "not a field name"),  # rename=True would make _0 here
        (["x", "x"], None, "P", "repeat"),
        (["x" * 2000], None, "P", "not a field name"),
        ([f"f{i}" for i in range(layout.MAX_FIELDS + 1)], None, "P", "at most"),
        (["x"], None, "A.not-a-name", "not an identifier"),
        (["x"], None, "A.for", "not an identifier"),
        (["x"], None, "", "not an identifier"),
        (["x"], None, "P" * 2000, "at most"),
    ],
)
def test_decode_refuses_bad_namedtuples(
    fields: list[str], items: int | None, qualname: str, needle: str
) -> None:
    with pytest.raises(layout.LayoutError, match=needle):
        layout.decode(_named("some.module", qualname, fields, items), torch.zeros(0, dtype=torch.uint8))


def test_decode_refuses_an_absurd_module_name() -> None:
    with pytest.raises(layout.LayoutError, match="at most"):
        layout.decode(_named("m" * 5000, "P", ["x"]), torch.zeros(0, dtype=torch.uint8))


def test_encode_refuses_a_tuple_with_bogus_fields() -> None:
    class Odd(tuple):  # type: ignore[type-arg]
        _fields = ("a", "b")  # but one item

    with pytest.raises(layout.LayoutError, match="2 fields but 1 items"):
        layout.encode(Odd((1,)), layout.SlotWriter(torch.zeros(1024, dtype=torch.uint8)))


def test_decode_refuses_dict_keys_that_are_not_str_or_int() -> None:
    keys = [pb.Node(list=pb.NodeList())]
    msg = pb.Layout(root=pb.Node(dict=pb.NodeMap(keys=keys, values=[pb.Node(int=1)])))
    with pytest.raises(layout.LayoutError, match="not a str or an int"):
        layout.decode(msg, torch.zeros(0, dtype=torch.uint8))
