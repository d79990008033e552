from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_INDEPENDENT: _ClassVar[Mode]
    MODE_SHARDED: _ClassVar[Mode]
    MODE_SHARED: _ClassVar[Mode]
    MODE_DYNAMIC: _ClassVar[Mode]

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_BYTES: _ClassVar[Transport]
    TRANSPORT_SHM: _ClassVar[Transport]

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_NONE: _ClassVar[Codec]
    CODEC_LZ4: _ClassVar[Codec]
    CODEC_ZSTD: _ClassVar[Codec]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    COMPLEX64: _ClassVar[DType]
    COMPLEX128: _ClassVar[DType]
    UINT16: _ClassVar[DType]
    UINT32: _ClassVar[DType]
    UINT64: _ClassVar[DType]
MODE_INDEPENDENT: Mode
MODE_SHARDED: Mode
MODE_SHARED: Mode
MODE_DYNAMIC: Mode
TRANSPORT_BYTES: Transport
TRANSPORT_SHM: Transport
CODEC_NONE: Codec
CODEC_LZ4: Codec
CODEC_ZSTD: Codec
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
UINT8: DType
INT8: DType
INT16: DType
INT32: DType
INT64: DType
BOOL: DType
COMPLEX64: DType
COMPLEX128: DType
UINT16: DType
UINT32: DType
UINT64: DType

class GetSampleRequest(_message.Message):
    __slots__ = ("dataset", "index")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    index: int
    def __init__(self, dataset: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class GetSampleResponse(_message.Message):
    __slots__ = ("layout", "payload", "error")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    layout: Layout
    payload: bytes
    error: BatchError
    def __init__(self, layout: _Optional[_Union[Layout, _Mapping]] = ..., payload: _Optional[bytes] = ..., error: _Optional[_Union[BatchError, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConsumerInfo(_message.Message):
    __slots__ = ("peer", "rank", "epoch", "batches_sent", "num_batches", "batches_taken")
    PEER_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_SENT_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_TAKEN_FIELD_NUMBER: _ClassVar[int]
    peer: str
    rank: int
    epoch: int
    batches_sent: int
    num_batches: int
    batches_taken: int
    def __init__(self, peer: _Optional[str] = ..., rank: _Optional[int] = ..., epoch: _Optional[int] = ..., batches_sent: _Optional[int] = ..., num_batches: _Optional[int] = ..., batches_taken: _Optional[int] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("name", "mode", "dataset", "batch_size", "world_size", "consumers", "batches_built", "epoch", "worlds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_BUILT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WORLDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    mode: Mode
    dataset: str
    batch_size: int
    world_size: int
    consumers: _containers.RepeatedCompositeFieldContainer[ConsumerInfo]
    batches_built: int
    epoch: int
    worlds: _containers.RepeatedCompositeFieldContainer[JobWorld]
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., dataset: _Optional[str] = ..., batch_size: _Optional[int] = ..., world_size: _Optional[int] = ..., consumers: _Optional[_Iterable[_Union[ConsumerInfo, _Mapping]]] = ..., batches_built: _Optional[int] = ..., epoch: _Optional[int] = ..., worlds: _Optional[_Iterable[_Union[JobWorld, _Mapping]]] = ...) -> None: ...

class JobWorld(_message.Message):
    __slots__ = ("world_size", "epoch")
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    world_size: int
    epoch: int
    def __init__(self, world_size: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "length", "sample_structure", "iterable", "sized")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    ITERABLE_FIELD_NUMBER: _ClassVar[int]
    SIZED_FIELD_NUMBER: _ClassVar[int]
    name: str
    length: int
    sample_structure: str
    iterable: bool
    sized: bool
    def __init__(self, name: _Optional[str] = ..., length: _Optional[int] = ..., sample_structure: _Optional[str] = ..., iterable: _Optional[bool] = ..., sized: _Optional[bool] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "shm_probe", "shm_token", "replica_index", "num_replicas", "server_id", "num_workers")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    SHM_PROBE_FIELD_NUMBER: _ClassVar[int]
    SHM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REPLICA_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    shm_probe: str
    shm_token: bytes
    replica_index: int
    num_replicas: int
    server_id: str
    num_workers: int
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ..., shm_probe: _Optional[str] = ..., shm_token: _Optional[bytes] = ..., replica_index: _Optional[int] = ..., num_replicas: _Optional[int] = ..., server_id: _Optional[str] = ..., num_workers: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("dtype", "shape", "offset")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class NodeList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, items: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class NodeMap(_message.Message):
    __slots__ = ("keys", "values")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Node]
    values: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, keys: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., values: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class NoneValue(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeNamed(_message.Message):
    __slots__ = ("module", "qualname", "fields", "items")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    QUALNAME_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    module: str
    qualname: str
    fields: _containers.RepeatedScalarFieldContainer[str]
    items: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, module: _Optional[str] = ..., qualname: _Optional[str] = ..., fields: _Optional[_Iterable[str]] = ..., items: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("tensor", "list", "tuple", "dict", "str", "int", "float", "bool", "none", "namedtuple")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    TUPLE_FIELD_NUMBER: _ClassVar[int]
    DICT_FIELD_NUMBER: _ClassVar[int]
    STR_FIELD_NUMBER: _ClassVar[int]
    INT_FIELD_NUMBER: _ClassVar[int]
    FLOAT_FIELD_NUMBER: _ClassVar[int]
    BOOL_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    NAMEDTUPLE_FIELD_NUMBER: _ClassVar[int]
    tensor: TensorSpec
    list: NodeList
    tuple: NodeList
    dict: NodeMap
    str: str
    int: int
    float: float
    bool: bool
    none: NoneValue
    namedtuple: NodeNamed
    def __init__(self, tensor: _Optional[_Union[TensorSpec, _Mapping]] = ..., list: _Optional[_Union[NodeList, _Mapping]] = ..., tuple: _Optional[_Union[NodeList, _Mapping]] = ..., dict: _Optional[_Union[NodeMap, _Mapping]] = ..., str: _Optional[str] = ..., int: _Optional[int] = ..., float: _Optional[float] = ..., bool: _Optional[bool] = ..., none: _Optional[_Union[NoneValue, _Mapping]] = ..., namedtuple: _Optional[_Union[NodeNamed, _Mapping]] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("root", "payload_bytes")
    ROOT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    root: Node
    payload_bytes: int
    def __init__(self, root: _Optional[_Union[Node, _Mapping]] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class OpenStream(_message.Message):
    __slots__ = ("dataset", "batch_size", "shuffle", "sampler_state", "drop_last", "collate", "epoch", "start_batch", "credits", "chunk_bytes", "transport", "mode", "job", "rank", "world_size", "seed", "replica_index", "num_replicas", "taken", "any_order", "client_batches", "stripe", "stripes", "compression", "groups", "unbatched", "num_iterators", "base_seed", "places", "next_iterator", "consumed", "resume", "consumer")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_STATE_FIELD_NUMBER: _ClassVar[int]
    DROP_LAST_FIELD_NUMBER: _ClassVar[int]
    COLLATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_BATCH_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TAKEN_FIELD_NUMBER: _ClassVar[int]
    ANY_ORDER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_BATCHES_FIELD_NUMBER: _ClassVar[int]
    STRIPE_FIELD_NUMBER: _ClassVar[int]
    STRIPES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    UNBATCHED_FIELD_NUMBER: _ClassVar[int]
    NUM_ITERATORS_FIELD_NUMBER: _ClassVar[int]
    BASE_SEED_FIELD_NUMBER: _ClassVar[int]
    PLACES_FIELD_NUMBER: _ClassVar[int]
    NEXT_ITERATOR_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    batch_size: int
    shuffle: bool
    sampler_state: bytes
    drop_last: bool
    collate: str
    epoch: int
    start_batch: int
    credits: int
    chunk_bytes: int
    transport: Transport
    mode: Mode
    job: str
    rank: int
    world_size: int
    seed: int
    replica_index: int
    num_replicas: int
    taken: bytes
    any_order: bool
    client_batches: bool
    stripe: int
    stripes: int
    compression: Codec
    groups: bool
    unbatched: bool
    num_iterators: int
    base_seed: int
    places: _containers.RepeatedCompositeFieldContainer[IteratorPlace]
    next_iterator: int
    consumed: bytes
    resume: bool
    consumer: bytes
    def __init__(self, dataset: _Optional[str] = ..., batch_size: _Optional[int] = ..., shuffle: _Optional[bool] = ..., sampler_state: _Optional[bytes] = ..., drop_last: _Optional[bool] = ..., collate: _Optional[str] = ..., epoch: _Optional[int] = ..., start_batch: _Optional[int] = ..., credits: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., transport: _Optional[_Union[Transport, str]] = ..., mode: _Optional[_Union[Mode, str]] = ..., job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., seed: _Optional[int] = ..., replica_index: _Optional[int] = ..., num_replicas: _Optional[int] = ..., taken: _Optional[bytes] = ..., any_order: _Optional[bool] = ..., client_batches: _Optional[bool] = ..., stripe: _Optional[int] = ..., stripes: _Optional[int] = ..., compression: _Optional[_Union[Codec, str]] = ..., groups: _Optional[bool] = ..., unbatched: _Optional[bool] = ..., num_iterators: _Optional[int] = ..., base_seed: _Optional[int] = ..., places: _Optional[_Iterable[_Union[IteratorPlace, _Mapping]]] = ..., next_iterator: _Optional[int] = ..., consumed: _Optional[bytes] = ..., resume: _Optional[bool] = ..., consumer: _Optional[bytes] = ...) -> None: ...

class IteratorPlace(_message.Message):
    __slots__ = ("batches", "state")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    batches: int
    state: bytes
    def __init__(self, batches: _Optional[int] = ..., state: _Optional[bytes] = ...) -> None: ...

class BatchIndices(_message.Message):
    __slots__ = ("index", "lengths", "samples", "end", "total")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    index: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    samples: _containers.RepeatedScalarFieldContainer[int]
    end: bool
    total: int
    def __init__(self, index: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., samples: _Optional[_Iterable[int]] = ..., end: _Optional[bool] = ..., total: _Optional[int] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: int
    def __init__(self, batches: _Optional[int] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("open", "credit", "release", "detach", "stop", "batches")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    DETACH_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    open: OpenStream
    credit: Credit
    release: Release
    detach: Release
    stop: Stop
    batches: BatchIndices
    def __init__(self, open: _Optional[_Union[OpenStream, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ..., detach: _Optional[_Union[Release, _Mapping]] = ..., stop: _Optional[_Union[Stop, _Mapping]] = ..., batches: _Optional[_Union[BatchIndices, _Mapping]] = ...) -> None: ...

class Stop(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamStart(_message.Message):
    __slots__ = ("num_batches", "state_after_order", "state_after_epoch", "first_batch")
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    STATE_AFTER_ORDER_FIELD_NUMBER: _ClassVar[int]
    STATE_AFTER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FIRST_BATCH_FIELD_NUMBER: _ClassVar[int]
    num_batches: int
    state_after_order: bytes
    state_after_epoch: bytes
    first_batch: int
    def __init__(self, num_batches: _Optional[int] = ..., state_after_order: _Optional[bytes] = ..., state_after_epoch: _Optional[bytes] = ..., first_batch: _Optional[int] = ...) -> None: ...

class BatchHeader(_message.Message):
    __slots__ = ("index", "layout", "num_chunks", "slot", "codec", "more", "error", "iterator", "iterator_state")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ITERATOR_FIELD_NUMBER: _ClassVar[int]
    ITERATOR_STATE_FIELD_NUMBER: _ClassVar[int]
    index: int
    layout: Layout
    num_chunks: int
    slot: str
    codec: Codec
    more: _containers.RepeatedCompositeFieldContainer[BatchPart]
    error: BatchError
    iterator: int
    iterator_state: bytes
    def __init__(self, index: _Optional[int] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., num_chunks: _Optional[int] = ..., slot: _Optional[str] = ..., codec: _Optional[_Union[Codec, str]] = ..., more: _Optional[_Iterable[_Union[BatchPart, _Mapping]]] = ..., error: _Optional[_Union[BatchError, _Mapping]] = ..., iterator: _Optional[int] = ..., iterator_state: _Optional[bytes] = ...) -> None: ...

class BatchError(_message.Message):
    __slots__ = ("type", "message", "traceback")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    type: str
    message: str
    traceback: str
    def __init__(self, type: _Optional[str] = ..., message: _Optional[str] = ..., traceback: _Optional[str] = ...) -> None: ...

class BatchPart(_message.Message):
    __slots__ = ("index", "layout")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    index: int
    layout: Layout
    def __init__(self, index: _Optional[int] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("start", "batch", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: StreamStart
    batch: BatchHeader
    end: StreamEnd
    def __init__(self, start: _Optional[_Union[StreamStart, _Mapping]] = ..., batch: _Optional[_Union[BatchHeader, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ...) -> None: ...
