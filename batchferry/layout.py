"""The batch memory layout, shared by server and client.

A collated batch is a tree: tensors at the leaves (plus plain ``str``/``int``/
``float``/``bool``/``None`` values), inside ``list``/``tuple``/``dict`` and namedtuple
nodes. On the wire and in shared memory it is two parts:

* a :class:`~batchferry.v1.loader_pb2.Layout` message: the tree, each tensor as
  (dtype, shape, byte offset into the payload);
* the payload: every tensor's bytes, contiguous, each starting on a 64-byte
  boundary (so any dtype can be viewed in place, and SIMD loads stay aligned).

The server encodes a tree whose tensors already lie in a slot (collates write
there directly) without copying them; the client decodes a payload buffer into
tensors that are views of it, again without copying.

A namedtuple travels as its class's module and qualified name, its fields and its
items. The receiver rebuilds the dataset's own class when that class is already
there to find (its module in ``sys.modules``: nothing is imported, since importing
a module the peer names would run code the peer chose) and has the same fields;
otherwise an equivalent ``collections.namedtuple`` of the same name and fields, one
class per (module, qualified name, fields), so attribute access works either way.
"""

from __future__ import annotations

import collections
import inspect
import keyword
import math
import sys
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from batchferry.v1 import loader_pb2 as _pb2

__all__ = [
    "ALIGNMENT",
    "MAX_FIELDS",
    "LayoutError",
    "SlotOverflow",
    "SlotWriter",
    "align",
    "batch_bytes_hint",
    "decode",
    "describe",
    "element_size",
    "encode",
]

ALIGNMENT = 64
MAX_FIELDS = 1024  # fields of a namedtuple
_MAX_NAME = 1024  # characters of a namedtuple's module, qualified name or field name
_MAX_MADE = 1024  # equivalent namedtuple classes kept (a peer may name any number)

_DTYPES: dict[torch.dtype, _pb2.DType] = {
    torch.float32: _pb2.FLOAT32,
    torch.float64: _pb2.FLOAT64,
    torch.float16: _pb2.FLOAT16,
    torch.bfloat16: _pb2.BFLOAT16,
    torch.uint8: _pb2.UINT8,
    torch.int8: _pb2.INT8,
    torch.int16: _pb2.INT16,
    torch.int32: _pb2.INT32,
    torch.int64: _pb2.INT64,
    torch.bool: _pb2.BOOL,
    torch.complex64: _pb2.COMPLEX64,
    torch.complex128: _pb2.COMPLEX128,
    torch.uint16: _pb2.UINT16,
    torch.uint32: _pb2.UINT32,
    torch.uint64: _pb2.UINT64,
}
_TORCH_DTYPES = {code: dtype for dtype, code in _DTYPES.items()}


class LayoutError(ValueError):
    """A tree cannot be encoded, or a Layout message does not fit its payload."""


class SlotOverflow(Exception):
    """The batch needs more bytes than the slot holds; ``needed`` says how many."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"batch needs {needed} bytes")
        self.needed = needed


def align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class SlotWriter:
    """Bump allocator of tensors inside one payload buffer (a slot).

    Collates call :meth:`alloc` to build their output in place; :func:`encode`
    then records those tensors by offset and copies in only what lies elsewhere.
    When the buffer is too small, allocation keeps counting and :meth:`check`
    raises :class:`SlotOverflow` with the total needed, so one failed attempt is
    enough to size the next slot.
    """

    def __init__(self, buffer: torch.Tensor, limit: int | None = None) -> None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise TypeError("slot buffer must be a 1-D uint8 tensor")
        self._buffer = buffer
        self._base = buffer.data_ptr()
        self._capacity = buffer.numel()
        # Past the slot, allocations go to scratch memory up to ``limit`` bytes in all;
        # beyond it the batch is refused at once instead of built in memory it may not have.
        self._limit = limit
        self._scratch: dict[int, int] = {}  # data_ptr -> offset of allocations past the slot
        self.used = 0
        self._batch_start = 0  # where the batch being written begins (several may share a slot)

    def start_batch(self, limit: int | None) -> None:
        """Begin the next batch after those written already; it may take up to ``limit``
        bytes. :class:`SlotOverflow` then reports that batch's own size."""
        self._batch_start = align(self.used)
        self._limit = None if limit is None else self._batch_start + limit

    def alloc(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in _DTYPES:
            raise LayoutError(f"unsupported dtype {dtype}")
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * dtype.itemsize  # np.prod costs microseconds per call
        start = align(self.used)
        self.used = start + nbytes
        if self.used > self._capacity:
            if self._limit is not None and self.used > self._limit:
                raise SlotOverflow(self.used - self._batch_start)
            # Keep going on scratch memory so the collate can finish and report its size;
            # the scratch tensor already counts, so encode() does not count it again.
            scratch = torch.empty(shape, dtype=dtype)
            self._scratch[scratch.data_ptr()] = start
            return scratch
        return self._buffer[start : start + nbytes].view(dtype).view(shape)

    def check(self) -> None:
        if self.used > self._capacity:
            raise SlotOverflow(self.used - self._batch_start)

    def offset_of(self, tensor: torch.Tensor) -> int | None:
        """Offset of ``tensor`` if it is a contiguous CPU tensor inside this slot."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
        if tensor.data_ptr() in self._scratch:
            return self._scratch[tensor.data_ptr()]  # counted; the slot overflowed anyway
        offset = tensor.data_ptr() - self._base
        if offset >= 0 and offset + tensor.numel() * tensor.element_size() <= min(self.used, self._capacity):
            return offset
        return None


def encode(tree: Any, writer: SlotWriter) -> _pb2.Layout:
    """Layout of ``tree``; tensors not already in the writer's slot are copied in."""
    root = _node(tree, writer)
    writer.check()
    return _pb2.Layout(root=root, payload_bytes=writer.used)


# A module-level function, not a closure: a recursive closure is a reference cycle,
# and one holding the writer would keep the slot's mapping alive until the next
# garbage collection (an idle worker may never run one).
def _node(obj: Any, writer: SlotWriter) -> _pb2.Node:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "OUSV":
            raise LayoutError(f"numpy arrays of dtype {obj.dtype} cannot be sent")
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, torch.Tensor):
        return _pb2.Node(tensor=_tensor_spec(obj, writer))
    if obj is None:
        return _pb2.Node(none=_pb2.NoneValue())
    if isinstance(obj, bool):
        return _pb2.Node(bool=obj)
    if isinstance(obj, int):
        return _pb2.Node(int=obj)
    if isinstance(obj, float):
        return _pb2.Node(float=obj)
    if isinstance(obj, str):
        return _pb2.Node(str=obj)
    if isinstance(obj, Mapping):
        keys = []
        for key in obj:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise LayoutError(f"dict keys must be str or int, got {type(key).__name__}")
            keys.append(_node(key, writer))
        return _pb2.Node(dict=_pb2.NodeMap(keys=keys, values=[_node(v, writer) for v in obj.values()]))
    if isinstance(obj, tuple):
        fields = getattr(type(obj), "_fields", None)  # a namedtuple, as torch's collate tells
        if fields is not None:
            return _pb2.Node(namedtuple=_named(obj, fields, writer))
        return _pb2.Node(tuple=_pb2.NodeList(items=[_node(v, writer) for v in obj]))
    if isinstance(obj, list):
        return _pb2.Node(list=_pb2.NodeList(items=[_node(v, writer) for v in obj]))
    raise LayoutError(f"cannot send a value of type {type(obj).__name__} in a batch")


def _named(obj: tuple[Any, ...], fields: Any, writer: SlotWriter) -> _pb2.NodeNamed:
    cls = type(obj)
    module, qualname = getattr(cls, "__module__", ""), getattr(cls, "__qualname__", cls.__name__)
    if (
        not isinstance(fields, tuple)
        or not all(isinstance(f, str) for f in fields)
        or not isinstance(module, str)
        or not isinstance(qualname, str)
    ):
        raise LayoutError(f"cannot send a {cls.__name__}: its _fields are not a tuple of names")
    _check_named(module, qualname, fields, len(obj))
    return _pb2.NodeNamed(
        module=module, qualname=qualname, fields=fields, items=[_node(v, writer) for v in obj]
    )


def _check_named(module: str, qualname: str, fields: tuple[str, ...], items: int) -> None:
    """LayoutError unless these describe a namedtuple ``collections.namedtuple`` can make."""
    if len(module) > _MAX_NAME or len(qualname) > _MAX_NAME:
        raise LayoutError(f"namedtuple module and qualified name: at most {_MAX_NAME} characters each")
    if len(fields) > MAX_FIELDS:
        raise LayoutError(f"namedtuple {qualname[:64]!r} has {len(fields)} fields; at most {MAX_FIELDS}")
    if len(fields) != items:
        raise LayoutError(f"namedtuple {qualname[:64]!r} has {len(fields)} fields but {items} items")
    name = qualname.rpartition(".")[2]
    if not name.isidentifier() or keyword.iskeyword(name):
        raise LayoutError(f"namedtuple class name {name[:64]!r} is not an identifier")
    for i, field in enumerate(fields):
        # What namedtuple accepts: identifiers, not keywords; a leading underscore only as
        # rename=True makes it, "_" and the field's position.
        if (
            len(field) > _MAX_NAME
            or not field.isidentifier()
            or keyword.iskeyword(field)
            or (field.startswith("_") and field != f"_{i}")
        ):
            raise LayoutError(f"namedtuple {name!r}: field {i} {field[:64]!r} is not a field name")
    if len(set(fields)) != len(fields):
        raise LayoutError(f"namedtuple {name!r}: field names repeat")


def _tensor_spec(tensor: torch.Tensor, writer: SlotWriter) -> _pb2.TensorSpec:
    if tensor.layout != torch.strided:
        raise LayoutError(f"cannot send a {tensor.layout} tensor; make it dense first")
    if tensor.dtype not in _DTYPES:
        raise LayoutError(f"unsupported dtype {tensor.dtype}")
    offset = writer.offset_of(tensor)
    if offset is None:
        out = writer.alloc(tensor.shape, tensor.dtype)
        out.copy_(tensor)
        offset = writer.offset_of(out)
        if offset is None:  # overflowed: the writer reports it in check()
            offset = 0
    return _pb2.TensorSpec(dtype=_DTYPES[tensor.dtype], shape=list(tensor.shape), offset=offset)


def decode(layout: _pb2.Layout, payload: torch.Tensor) -> Any:
    """The tree described by ``layout``; tensors are views of ``payload`` (uint8, 1-D)."""
    size = payload.numel()
    if layout.payload_bytes > size:
        raise LayoutError(f"layout spans {layout.payload_bytes} bytes, payload has {size}")

    def tensor(spec: _pb2.TensorSpec) -> torch.Tensor:
        dtype = _TORCH_DTYPES.get(spec.dtype)
        if dtype is None:
            raise LayoutError(f"unknown dtype code {spec.dtype}")
        shape = tuple(spec.shape)
        if any(s < 0 for s in shape):
            raise LayoutError(f"negative dimension in shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize  # exact (no int64 wrap-around) and cheap
        if spec.offset % ALIGNMENT or spec.offset + nbytes > size:
            raise LayoutError(f"tensor at offset {spec.offset} (+{nbytes} bytes) is outside the payload")
        return payload[spec.offset : spec.offset + nbytes].view(dtype).view(shape)

    return _walk(layout.root, tensor)


def element_size(layout: _pb2.Layout) -> int:
    """Bytes per element of the tensor spanning the most payload (1 without tensors): the
    stride a byte shuffle groups by before compression."""
    best, size = -1, 1
    stack = [layout.root]
    while stack:
        node = stack.pop()
        kind = node.WhichOneof("kind")
        if kind == "tensor":
            dtype = _TORCH_DTYPES.get(node.tensor.dtype)
            if dtype is not None:
                nbytes = math.prod(node.tensor.shape) * dtype.itemsize
                if nbytes > best:
                    best, size = nbytes, dtype.itemsize
        elif kind in ("list", "tuple", "namedtuple"):
            stack.extend(getattr(node, kind).items)
        elif kind == "dict":
            stack.extend(node.dict.values)
    return size


def _walk(node: _pb2.Node, tensor: Callable[[_pb2.TensorSpec], torch.Tensor]) -> Any:
    kind = node.WhichOneof("kind")
    if kind == "tensor":
        return tensor(node.tensor)
    if kind == "list":
        return [_walk(n, tensor) for n in node.list.items]
    if kind == "tuple":
        return tuple(_walk(n, tensor) for n in node.tuple.items)
    if kind == "namedtuple":
        named = node.namedtuple
        cls = _named_class(named.module, named.qualname, tuple(named.fields), len(named.items))
        # tuple.__new__, as namedtuple's own _make: no __new__ of the class runs on the values.
        return tuple.__new__(cls, [_walk(n, tensor) for n in named.items])
    if kind == "dict":
        if len(node.dict.keys) != len(node.dict.values):
            raise LayoutError("dict node has different numbers of keys and values")
        if any(k.WhichOneof("kind") not in ("str", "int") for k in node.dict.keys):
            raise LayoutError("dict node has a key that is not a str or an int")
        return {
            _walk(k, tensor): _walk(v, tensor) for k, v in zip(node.dict.keys, node.dict.values, strict=True)
        }
    if kind in ("str", "int", "float", "bool"):
        return getattr(node, kind)
    if kind == "none":
        return None
    raise LayoutError("layout node has no kind")


_made: collections.OrderedDict[tuple[str, str, tuple[str, ...]], type[tuple[Any, ...]]] = (
    collections.OrderedDict()
)
_made_lock = threading.Lock()


def _named_class(module: str, qualname: str, fields: tuple[str, ...], items: int) -> type[tuple[Any, ...]]:
    """The class a namedtuple node decodes to (see the module's docstring); LayoutError
    when the node could not describe a namedtuple."""
    _check_named(module, qualname, fields, items)
    known = _imported_class(module, qualname, fields)
    if known is not None:
        return known
    key = (module, qualname, fields)
    with _made_lock:
        cached = _made.get(key)
        if cached is not None:
            return cached
        made: type[tuple[Any, ...]] = collections.namedtuple(  # type: ignore[misc]
            qualname.rpartition(".")[2], fields, rename=True
        )
        if len(_made) >= _MAX_MADE:
            _made.popitem(last=False)
        _made[key] = made
        return made


def _imported_class(module: str, qualname: str, fields: tuple[str, ...]) -> type[tuple[Any, ...]] | None:
    """``module.qualname`` if already imported and a tuple class with these ``_fields``.

    Only dictionaries are read (no ``getattr``: a module's ``__getattr__`` or a descriptor
    would run code, and could import).
    """
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if not isinstance(obj, (types.ModuleType, type)):
            return None  # not imported, or a part that is no class ("<locals>")
        obj = vars(obj).get(part)
    if not isinstance(obj, type) or not issubclass(obj, tuple):
        return None
    own = inspect.getattr_static(obj, "_fields", None)
    return obj if type(own) is tuple and own == fields else None


def batch_bytes_hint(sample: Any, batch_size: int) -> int:
    """Payload bytes a default-collated batch of samples like ``sample`` needs."""
    leaves = 0
    per_sample = 0
    stack = [sample]
    while stack:
        obj = stack.pop()
        if isinstance(obj, (torch.Tensor, np.ndarray)):
            per_sample += obj.nbytes
            leaves += 1
        elif isinstance(obj, Mapping):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, (int, float, np.generic)):
            per_sample += 8
            leaves += 1
    return per_sample * batch_size + leaves * ALIGNMENT


def describe(obj: Any) -> str:
    """Short structure of a sample or batch, e.g. ``(Tensor[float32, 3x224x224], int)``."""
    if isinstance(obj, np.ndarray):
        return f"ndarray[{obj.dtype}, {'x'.join(map(str, obj.shape)) or 'scalar'}]"
    if isinstance(obj, torch.Tensor):
        dtype = str(obj.dtype).removeprefix("torch.")
        return f"Tensor[{dtype}, {'x'.join(map(str, obj.shape)) or 'scalar'}]"
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, tuple):
        fields = getattr(type(obj), "_fields", None)
        if isinstance(fields, tuple) and len(fields) == len(obj):
            inner = ", ".join(f"{f}={describe(v)}" for f, v in zip(fields, obj, strict=True))
            return f"{type(obj).__name__}({inner})"
        return "(" + ", ".join(describe(v) for v in obj) + ("," if len(obj) == 1 else "") + ")"
    if isinstance(obj, list):
        return "[" + ", ".join(describe(v) for v in obj) + "]"
    return type(obj).__name__
