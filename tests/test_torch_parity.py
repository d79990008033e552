"""torch's own DataLoader behaviours, run on torch's DataLoader (num_workers=0) and on ours.

Every expectation is what torch does in the same test, on the same dataset: a
behaviour is written once as a function of a "make a loader" callable taking torch's
keyword arguments, run with a maker of torch loaders and with one of ours (over
each transport), and the two records must be the same.

Not compared, by design: ``collate_fn`` is a name from the server's registry, not a
function (it reads back as the name of torch's function: ``default``, ``convert``).
torch iterates a single-process loader only with ``timeout=0``, so other timeouts are
compared as attributes only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, get_args, get_origin

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    default_collate,
    default_convert,
)
from torch.utils.data import DataLoader as TorchLoader

from batchferry import protocol
from batchferry.client import DataLoader
from batchferry.errors import DatasetError, ServerSideWarning
from batchferry.server import Server

import parity_data
from parity_data import BAD, ERROR_LENGTH, SAMPLES, N
from reading import outcomes

DATASETS = parity_data.datasets()
TRANSPORTS = ["grpc", "shm"]
EPOCHS = 3
# Each test takes a second or two; one that waits on a batch that never comes fails soon.
pytestmark = pytest.mark.timeout(20)


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """One server with two workers for the module, serving every dataset in parity_data."""
    with Server(DATASETS, host="127.0.0.1", port=0, num_workers=2) as srv:
        yield srv.address


# -- comparing --------------------------------------------------------------------------


def same(ours: Any, theirs: Any, path: str = "record") -> None:
    """``ours`` is what torch gave: structure and container types (a namedtuple its class),
    tensors' dtype, shape and values, plain values' type and value. Where torch raised,
    ours raised an instance of torch's exception class that is also a DatasetError and
    carries the dataset's message."""
    if isinstance(theirs, BaseException):
        assert isinstance(ours, type(theirs)), f"{path}: {ours!r} is not a {type(theirs).__name__}"
        assert isinstance(ours, DatasetError), f"{path}: {type(ours).__name__} is not a DatasetError"
        assert str(theirs.args[0]) in str(ours), f"{path}: {ours} does not say {theirs.args[0]!r}"
    elif isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{path}: {type(ours).__name__} is not a tensor"
        assert ours.device == theirs.device, f"{path}: device {ours.device} != {theirs.device}"
        assert ours.dtype == theirs.dtype, f"{path}: dtype {ours.dtype} != {theirs.dtype}"
        assert ours.shape == theirs.shape, f"{path}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
        if not torch.equal(ours, theirs):
            differ = (ours != theirs).flatten().nonzero().flatten().tolist()
            at = differ[0]
            first = f"{ours.flatten()[at].item()!r} != {theirs.flatten()[at].item()!r}"
            raise AssertionError(
                f"{path}: {len(differ)} of {theirs.numel()} values differ, first at {at}: {first}"
            )
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs), f"{path}: {type(ours).__name__} != {type(theirs).__name__}"
        assert list(ours) == list(theirs), f"{path}: keys {list(ours)} != {list(theirs)}"
        for key in theirs:
            same(ours[key], theirs[key], f"{path}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs), f"{path}: {type(ours).__name__} != {type(theirs).__name__}"
        assert len(ours) == len(theirs), f"{path}: length {len(ours)} != {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            same(a, b, f"{path}[{i}]")
    else:
        assert type(ours) is type(theirs), f"{path}: {type(ours).__name__} != {type(theirs).__name__}"
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"


# -- the adapter: one behaviour, two implementations -------------------------------------

Make = Callable[..., Any]  # torch DataLoader keyword arguments -> a loader of one dataset
Behaviour = Callable[[Make], Any]  # a record of what the loaders it makes did


class Maker:
    """Makes loaders of one dataset: torch's over the object, or ours over the served copy."""

    def __init__(self, name: str, address: str | None = None, transport: str = "auto") -> None:
        self.name, self.address, self.transport = name, address, transport
        self.made: list[DataLoader] = []

    def __call__(self, **kwargs: Any) -> Any:
        if self.address is None:
            return TorchLoader(DATASETS[self.name], **kwargs)
        loader = DataLoader(self.address, self.name, transport=self.transport, **kwargs)
        self.made.append(loader)
        return loader

    def run(self, behaviour: Behaviour) -> Any:
        try:
            return behaviour(self)
        finally:
            for loader in self.made:
                loader.close()


def check(behaviour: Behaviour, address: str, name: str, transport: str) -> Any:
    """Run ``behaviour`` on torch's loader and on ours; what ours did must be what torch did."""
    theirs = Maker(name).run(behaviour)
    ours = Maker(name, address, transport).run(behaviour)
    same(ours, theirs)
    return ours


# -- 1. batching -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [1, 7, N, N + 5])
def test_batches_and_len(address: str, transport: str, batch_size: int, drop_last: bool) -> None:
    def behaviour(make: Make) -> Any:
        loader = make(batch_size=batch_size, drop_last=drop_last)
        return [len(loader), list(loader), list(loader)]

    check(behaviour, address, "rows", transport)


# -- 2. shuffling ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("drop_last", [False, True])
def test_shuffle_with_a_generator_epoch_after_epoch(address: str, transport: str, drop_last: bool) -> None:
    def behaviour(make: Make) -> Any:
        g = torch.Generator().manual_seed(21)
        loader = make(batch_size=6, shuffle=True, drop_last=drop_last, generator=g)
        return [(list(loader), g.get_state()) for _ in range(EPOCHS)]

    check(behaviour, address, "rows", transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_seed_gives_what_torch_gives_with_a_generator_so_seeded(address: str, transport: str) -> None:
    theirs = TorchLoader(DATASETS["rows"], 6, shuffle=True, generator=torch.Generator().manual_seed(21))
    with DataLoader(address, "rows", 6, shuffle=True, seed=21, transport=transport) as ours:
        for epoch in range(EPOCHS):
            same(list(ours), list(theirs), f"epoch {epoch}")


# -- 3. samplers and batch samplers ------------------------------------------------------

SAMPLERS = [
    "sequential",
    "random",
    "random_with_replacement",
    "subset_random",
    "weighted",
    "weighted_without_replacement",
    "list",
    "batch_sampler",
    "batch_sampler_keep_last",
    "list_of_lists",
]


def sampler_args(kind: str) -> tuple[dict[str, Any], torch.Generator]:
    """Fresh loader arguments with a sampler of ``kind``, and the generator that drives it."""
    g = torch.Generator().manual_seed(11)
    ds = DATASETS["rows"]
    weights = torch.linspace(0.1, 1.0, N).tolist()
    args: dict[str, Any] = {
        "sequential": {"sampler": SequentialSampler(ds), "batch_size": 5},
        "random": {"sampler": RandomSampler(ds, generator=g), "batch_size": 5},
        "random_with_replacement": {
            "sampler": RandomSampler(ds, replacement=True, num_samples=30, generator=g),
            "batch_size": 4,
        },
        "subset_random": {"sampler": SubsetRandomSampler(list(range(0, N, 2)), generator=g), "batch_size": 3},
        "weighted": {"sampler": WeightedRandomSampler(weights, 30, generator=g), "batch_size": 4},
        "weighted_without_replacement": {
            "sampler": WeightedRandomSampler(weights, 20, replacement=False, generator=g),
            "batch_size": 6,
        },
        "list": {"sampler": [5, 3, 3, 0, N - 1, 2, 17], "batch_size": 2},
        "batch_sampler": {"batch_sampler": BatchSampler(RandomSampler(ds, generator=g), 6, drop_last=True)},
        "batch_sampler_keep_last": {"batch_sampler": BatchSampler(SequentialSampler(ds), 6, drop_last=False)},
        "list_of_lists": {"batch_sampler": [[3, 1], [0], [4, 5, 6, 2], [N - 1]]},
    }[kind]
    return args, g


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", SAMPLERS)
def test_samplers_epoch_after_epoch(address: str, transport: str, kind: str) -> None:
    def behaviour(make: Make) -> Any:
        args, g = sampler_args(kind)
        loader = make(**args)
        return [len(loader)] + [(list(loader), g.get_state()) for _ in range(EPOCHS)]

    check(behaviour, address, "rows", transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("drop_last", [False, True])
def test_a_distributed_sampler_with_set_epoch(address: str, transport: str, drop_last: bool) -> None:
    def behaviour(make: Make) -> Any:
        sampler = DistributedSampler(
            DATASETS["rows"], num_replicas=3, rank=1, shuffle=True, seed=5, drop_last=drop_last
        )
        loader = make(batch_size=4, sampler=sampler)
        got: list[Any] = [len(loader)]
        for epoch in (0, 1, 1, 4):
            sampler.set_epoch(epoch)
            got.append(list(loader))
        return got

    check(behaviour, address, "rows", transport)


# -- 4. generator reproducibility ------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_equal_seeds_give_equal_epochs(address: str, transport: str) -> None:
    def behaviour(make: Make) -> Any:
        a = make(batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
        b = make(batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
        return [[list(a), list(b)] for _ in range(2)]

    ours = check(behaviour, address, "rows", transport)
    for a, b in ours:
        same(a, b, "the second loader")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("shuffle", [True, False])
def test_generator_state_after_a_break_and_a_new_iter(address: str, transport: str, shuffle: bool) -> None:
    def behaviour(make: Make) -> Any:
        g = torch.Generator().manual_seed(17)
        loader = make(batch_size=5, shuffle=shuffle, generator=g)
        got: list[Any] = []
        for k, batch in enumerate(loader):
            got.append(batch)
            if k == 2:
                break
        got.append(g.get_state())
        it = iter(loader)
        got.append(g.get_state())
        got.append(next(it))
        got.append(g.get_state())
        got.append(list(it))
        got.append(g.get_state())
        return got

    check(behaviour, address, "rows", transport)


# -- 5. what default_collate makes of each sample kind ---------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", list(SAMPLES))
def test_collate_of(address: str, transport: str, kind: str) -> None:
    def behaviour(make: Make) -> Any:
        loader = make(batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1))
        return list(loader)

    check(behaviour, address, f"samples-{kind}", transport)


# -- 6. dataset errors mid-epoch -------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["key", "custom"])
def test_a_dataset_error_fails_its_batch_and_the_epoch_goes_on(
    address: str, transport: str, kind: str
) -> None:
    def behaviour(make: Make) -> Any:
        in_order = make(batch_size=4)
        shuffled = make(batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2))
        loaders = [in_order, shuffled, shuffled]  # the second epoch starts where torch's does
        return [outcomes(iter(loader), 2 * ERROR_LENGTH) for loader in loaders]

    epochs = check(behaviour, address, kind, transport)
    raised = [x for epoch in epochs for x in epoch if isinstance(x, Exception)]
    assert raised, f"samples {sorted(BAD)} raised nothing"
    expected = KeyError if kind == "key" else parity_data.CorruptSample
    assert all(isinstance(e, expected) and isinstance(e, DatasetError) for e in raised)


# -- 7. attributes -----------------------------------------------------------------------


def _init_worker(worker_id: int) -> None:
    del worker_id


ATTRIBUTES = [
    "batch_size",
    "drop_last",
    "num_workers",
    "pin_memory",
    "timeout",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
    "generator",
    "worker_init_fn",
]

ARGUMENTS: dict[str, Callable[[], dict[str, Any]]] = {
    "defaults": lambda: {"timeout": 0},
    "shuffled": lambda: {
        "batch_size": 5, "shuffle": True, "generator": torch.Generator().manual_seed(1), "drop_last": True,
        "pin_memory": True, "pin_memory_device": "cuda", "timeout": 7.5,
    },
    "workers": lambda: {
        "batch_size": 4, "num_workers": 2, "prefetch_factor": 3, "persistent_workers": True,
        "in_order": False, "worker_init_fn": _init_worker, "timeout": 30,
    },
    "workers_default_prefetch": lambda: {"batch_size": 4, "num_workers": 2, "timeout": 0},
    "sampler": lambda: {"batch_size": 3, "sampler": SubsetRandomSampler([4, 1, 9]), "timeout": 0},
    "list_sampler": lambda: {"sampler": [2, 2, 7], "timeout": 0},
    "batch_sampler": lambda: {
        "batch_sampler": BatchSampler(SequentialSampler(range(N)), 6, drop_last=False), "timeout": 0,
    },
    "list_of_lists": lambda: {"batch_sampler": [[0, 1], [2, 3, 4]], "timeout": 0},
    "no_batching": lambda: {
        "batch_size": None, "shuffle": True, "generator": torch.Generator().manual_seed(1), "timeout": 0,
    },
    "no_batching_with_sampler": lambda: {"batch_size": None, "sampler": [3, 0, 3], "timeout": 0},
}  # fmt: skip


@pytest.mark.filterwarnings(f"ignore::{ServerSideWarning.__module__}.{ServerSideWarning.__name__}")
@pytest.mark.parametrize("case", list(ARGUMENTS))
def test_attributes_read_as_torchs(address: str, case: str) -> None:
    args = ARGUMENTS[case]()  # the very same objects (generator, samplers, functions) for both
    theirs = TorchLoader(DATASETS["rows"], **args)
    with DataLoader(address, "rows", **args, collate_fn="default") as ours:
        checks: dict[str, Callable[[], None]] = {
            name: lambda name=name: same(getattr(ours, name), getattr(theirs, name), name)
            for name in ATTRIBUTES
        }

        def identical(name: str) -> None:
            assert getattr(ours, name) is getattr(theirs, name), f"{name} is not the object passed"

        checks["generator is"] = lambda: identical("generator")
        checks["worker_init_fn is"] = lambda: identical("worker_init_fn")

        def sampler() -> None:
            if "sampler" in args:
                assert ours.sampler is args["sampler"], "sampler is not the one passed"
            else:
                same(type(ours.sampler), type(theirs.sampler), "type(sampler)")
                same(len(ours.sampler), len(theirs.sampler), "len(sampler)")

        def batch_sampler() -> None:
            if "batch_sampler" in args:
                assert ours.batch_sampler is args["batch_sampler"], "batch_sampler is not the one passed"
            elif theirs.batch_sampler is None:
                assert ours.batch_sampler is None, f"batch_sampler {ours.batch_sampler!r} is not None"
            else:
                same(type(ours.batch_sampler), type(theirs.batch_sampler), "type(batch_sampler)")
                for name in ("batch_size", "drop_last"):
                    same(getattr(ours.batch_sampler, name), getattr(theirs.batch_sampler, name), name)
                assert ours.batch_sampler.sampler is ours.sampler, "batch_sampler.sampler is not sampler"

        def dataset() -> None:
            same(len(ours.dataset), len(theirs.dataset), "len(dataset)")
            for i in (0, 1, N - 1):
                same(ours.dataset[i], default_convert(theirs.dataset[i]), f"dataset[{i}]")

        def collate_fn() -> None:  # a name from the server's registry for torch's function
            names = {default_collate: "default", default_convert: protocol.CONVERT_COLLATE}
            assert ours.collate_fn == names[theirs.collate_fn], f"collate_fn {ours.collate_fn!r}"

        checks.update(
            sampler=sampler,
            batch_sampler=batch_sampler,
            len=lambda: same(len(ours), len(theirs), "len(loader)"),
            dataset=dataset,
            collate_fn=collate_fn,
        )
        # Every attribute checked, each failure named: they are independent facts.
        failed = []
        for name, check_one in checks.items():
            try:
                check_one()
            except (AssertionError, AttributeError, TypeError) as exc:
                failed.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
        assert not failed, "\n".join(failed)


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_a_served_datasets_samples_read_as_torch_converts_them(address: str, kind: str) -> None:
    ds = DATASETS[f"samples-{kind}"]
    with DataLoader(address, f"samples-{kind}") as ours:
        same(len(ours.dataset), len(ds), "len(dataset)")
        for i in (0, 5, N - 1):
            same(ours.dataset[i], default_convert(ds[i]), f"dataset[{i}]")


# -- 8. setting attributes after construction --------------------------------------------

GUARDED = {
    "batch_size": 8,
    "batch_sampler": None,
    "sampler": None,
    "drop_last": True,
    "dataset": DATASETS["rows"],
    "persistent_workers": True,
}


@pytest.mark.parametrize("attr", list(GUARDED))
def test_guarded_attributes_refuse_a_new_value_as_torch_does(address: str, attr: str) -> None:
    theirs = TorchLoader(DATASETS["rows"], 4, timeout=0)
    with DataLoader(address, "rows", 4, timeout=0) as ours:
        before = getattr(ours, attr)
        with pytest.raises(ValueError) as torch_refused:
            setattr(theirs, attr, GUARDED[attr])
        with pytest.raises(ValueError) as we_refused:
            setattr(ours, attr, GUARDED[attr])
        message = str(torch_refused.value).replace(type(theirs).__name__, type(ours).__name__)
        assert str(we_refused.value) == message
        assert getattr(ours, attr) is before
        same(list(ours), list(theirs))


# torch guards only the attributes above; these it lets a caller set (first value, then the new one).
UNGUARDED = {
    "timeout": (5.0, 0),  # torch iterates a single-process loader only with timeout 0
    "pin_memory": (True, False),  # ... and warns when it pins without an accelerator
    "worker_init_fn": (None, _init_worker),
}


@pytest.mark.filterwarnings(f"ignore::{ServerSideWarning.__module__}.{ServerSideWarning.__name__}")
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("attr", list(UNGUARDED))
def test_other_attributes_can_be_set_as_in_torch(address: str, transport: str, attr: str) -> None:
    first, then = UNGUARDED[attr]

    def behaviour(make: Make) -> Any:
        loader = make(batch_size=10, **{"timeout": 0, attr: first})
        setattr(loader, attr, then)
        return [getattr(loader, attr), list(loader)]

    check(behaviour, address, "rows", transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_generator_set_after_construction(address: str, transport: str) -> None:
    """torch's RandomSampler keeps the generator it was made with; only the base seed
    comes from the new one."""

    def behaviour(make: Make) -> Any:
        first, then = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
        loader = make(batch_size=8, shuffle=True, generator=first)
        loader.generator = then
        return [[list(loader), first.get_state(), then.get_state()] for _ in range(2)]

    check(behaviour, address, "rows", transport)


# -- 9. typing ---------------------------------------------------------------------------


def test_the_class_subscripts_as_torchs_does(address: str) -> None:
    theirs_alias, ours_alias = TorchLoader[torch.Tensor], DataLoader[torch.Tensor]
    assert get_origin(theirs_alias) is TorchLoader
    assert get_origin(ours_alias) is DataLoader
    same(get_args(ours_alias), get_args(theirs_alias), "get_args")
    theirs = theirs_alias(DATASETS["rows"], 5)
    with ours_alias(address, "rows", 5) as ours:
        assert isinstance(theirs, TorchLoader)
        assert isinstance(ours, DataLoader)
        same(list(ours), list(theirs))


# -- 10. batch_size=None: samples one by one, converted ---------------------------------


def no_batching_args(kind: str) -> tuple[dict[str, Any], torch.Generator]:
    g = torch.Generator().manual_seed(9)
    args: dict[str, Any] = {
        "sequential": {},
        "shuffled": {"shuffle": True, "generator": g},
        "sampler": {"sampler": SubsetRandomSampler(list(range(0, N, 3)), generator=g)},
    }[kind]
    return {"batch_size": None, **args}, g


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", ["rows", "samples-numpy", "samples-namedtuple", "samples-nested"])
@pytest.mark.parametrize("kind", ["sequential", "shuffled", "sampler"])
def test_batch_size_none_yields_converted_samples(address: str, transport: str, name: str, kind: str) -> None:
    def behaviour(make: Make) -> Any:
        args, g = no_batching_args(kind)
        loader = make(**args)
        return [len(loader)] + [(list(loader), g.get_state()) for _ in range(2)]

    check(behaviour, address, name, transport)


# -- 11. the iteration protocol ----------------------------------------------------------


def iter_twice(loader: Any) -> Any:
    return [list(iter(loader)), list(iter(loader))]


def abandoned_iter(loader: Any) -> Any:
    iter(loader)  # never read
    return list(loader)


def break_then_for(loader: Any) -> Any:
    got: list[Any] = []
    for k, batch in enumerate(loader):
        got.append(batch)
        if k == 1:
            break
    got.append([batch for batch in loader])
    got.append([batch for batch in loader])
    return got


def enumerated(loader: Any) -> Any:
    return list(enumerate(loader))


def zipped(loader: Any) -> Any:
    return list(zip(loader, loader))


def second_iter_while_the_first_is_alive(loader: Any) -> Any:
    first = iter(loader)
    head = next(first)
    second = list(iter(loader))
    return [head, second, list(first)]


def exhausted(loader: Any) -> Any:
    it = iter(loader)
    got: list[Any] = [len(it), list(it)]
    got.append(outcomes(it, 3))  # an ended iterator stays ended
    return got


PROTOCOL: dict[str, Callable[[Any], Any]] = {
    f.__name__: f
    for f in (
        iter_twice,
        abandoned_iter,
        break_then_for,
        enumerated,
        zipped,
        second_iter_while_the_first_is_alive,
        exhausted,
    )
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("use", list(PROTOCOL))
def test_iteration(address: str, transport: str, shuffle: bool, use: str) -> None:
    def behaviour(make: Make) -> Any:
        g = torch.Generator().manual_seed(4)
        loader = make(batch_size=9, shuffle=shuffle, generator=g)
        return [PROTOCOL[use](loader), g.get_state()]

    check(behaviour, address, "rows", transport)
