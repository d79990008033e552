"""``batchferry.client.DataLoader``: torch's DataLoader loop, batches built by a server.

>>> from batchferry.client import DataLoader
>>> loader = DataLoader("127.0.0.1:50051", "train", batch_size=256, shuffle=True, seed=42)  # doctest: +SKIP
>>> for x, y in loader:  # doctest: +SKIP
...     ...

Order parity: with ``shuffle=True`` and ``generator=g`` (or ``seed=S``), the k-th
iteration yields exactly the batches torch's DataLoader yields on its k-th
iteration with the same generator (see :mod:`batchferry.sampling`).

The loader is a thin face over its stages: :mod:`.options` (the arguments, checked
once), :mod:`.connection` (the servers and what reads from them), :mod:`.epoch`
(one ``iter()``: streams, merge, index lists) and :mod:`.resume` (saved states).
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Generic

import grpc
import torch
from torch.utils.data import Sampler
from typing_extensions import TypeVar

from batchferry import cleanup, sampling
from batchferry.errors import InvalidArgument, ServerSideWarning
from batchferry.security import ClientSecurity
from batchferry.warn import warn

from .connection import Connection
from .dataset import RemoteDataset
from .epoch import Epoch, EpochStart
from .options import LoaderConfig
from .replicas import ReplicaSet
from .rescale import merge_states
from .resume import Resume, World, check_length, check_state, resizes, state_of
from .sampler import ClientSampling, EpochIndices, torch_samplers
from .stats import LoaderStats, Recorder

__all__ = ["DataLoader"]

# What batches are (as torch's DataLoader[T]); Any unless a script says.
_T_co = TypeVar("_T_co", covariant=True, default=Any)

# What torch refuses to change once a DataLoader is made (its __setattr__), and its words.
_GUARDED = ("batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers")


class DataLoader(Generic[_T_co]):
    """Iterate batches of a server-side dataset; mirrors ``torch.utils.data.DataLoader``.

    Every argument of torch's DataLoader (2.4 to 2.13) is accepted in torch's order
    after ``address`` and ``dataset``; what each does here is below.

    Args:
        address: ``"host:port"`` of a batchferry server; with replicas, a list of every
            replica's ``"host:port"`` or a ``"dns:///NAME:PORT"`` that resolves to all of
            them (a Kubernetes headless Service). The batches are the same as from one
            server: replica i of R builds the batches b with b % R == i.
        dataset: name of a dataset on that server (``batchferry datasets ADDRESS``).
        batch_size: as torch: the same batches, in the same order. ``None`` turns
            batching off as in torch: samples come one by one in torch's order, through
            the server's ``convert`` collate (torch's ``default_convert``: numpy arrays
            to tensors, numbers stay numbers, no batch dimension), and ``len(loader)`` is
            the dataset's length; with ``drop_last=True`` or a ``batch_sampler`` it is
            refused with torch's message.
        shuffle: as torch.
        sampler: run here, in the trainer, as torch runs it: any iterable of indices
            (``RandomSampler``, ``WeightedRandomSampler``, ``SubsetRandomSampler``, a
            ``DistributedSampler`` object). The index lists go to the server ahead of need
            (two credit windows, or up to 64 small batches so that it can build them in
            groups) and it builds exactly those batches: the same batches and the same
            sampler RNG state as torch, epoch after epoch. Independent mode only (the job
            modes share one order).
        batch_sampler: as ``sampler``, for an iterable of index lists (length bucketing);
            ``state_dict()`` resumes mid-epoch by replaying the epoch from the RNG states it
            began from (and the sampler's own ``state_dict()``, if it has one).
        num_workers: accepted; the server's workers build the batches, so a value other
            than 0, ``None`` or the server's own brings one ``ServerSideWarning`` per
            loader, at the caller's line (the ``iter()``, ``len()`` or ``for`` that first
            reached the server), naming the server setting that decides.
        collate_fn: the *name* of a collate registered in the server (``"default"``,
            ``"pad"``, ``"pack"``, ``"convert"`` or the server's own): a function cannot
            travel, so register it server-side or use ``batch_transform``. With
            ``batch_size=None`` a named collate gets each sample by itself, as torch
            calls ``collate_fn`` then. Reads back as the name.
        pin_memory: land batches in page-locked host buffers when CUDA is present.
        drop_last: as torch.
        timeout: seconds to wait for a batch, for a server not up yet, or for one that
            went away to come back; ``0``, as in torch, means no limit.
        worker_init_fn: accepted with a ``ServerSideWarning`` (see ``num_workers``): the
            server's ``--import`` or the dataset's constructor does this work.
        multiprocessing_context: accepted with a ``ServerSideWarning``, as ``worker_init_fn``.
        generator: a CPU ``torch.Generator`` driving the shuffle, advanced exactly as
            torch's DataLoader advances it.
        prefetch_factor: batch frames in flight per loader (default 4; a frame is one
            batch, or several small ones the server groups), split across replicas'
            streams (at least 2 each).
        persistent_workers: accepted; with ``True`` and workers, the base seed is drawn
            once, as torch does when it reuses its iterator.
        pin_memory_device: accepted (pinned memory serves every GPU; torch 2.13 ignores it
            too); ``device`` chooses the GPU batches go to.
        in_order: ``False``: batches come as they are built, each exactly once;
            ``state_dict()`` says which were taken and resumes exactly (a state whose
            batches were taken out of order is refused by an in-order loader, unless they
            were the epoch's first).
        seed: shorthand for ``generator=torch.Generator().manual_seed(seed)``; in the job
            modes, the seed of every epoch's order (default 0).
        device: ``"cuda"`` (or ``"cuda:N"``) to receive batches on that GPU, copied
            ``non_blocking`` on a side stream; ``None`` keeps them on the CPU.
        batch_transform: a function applied to every batch here, after the copy to
            ``device``: the place for code that must stay in the trainer, such as GPU
            augmentation.
        transport: ``"shm"`` maps the server's shared memory (same host, or containers
            sharing IPC and /dev/shm); ``"grpc"`` streams the bytes; ``"auto"`` uses shm
            when the server's memory is visible from here, else the byte stream.
        streams: byte-stream connections per server, each carrying every K-th batch of the
            same order, 1 to 16 (default: 2 on the byte stream in independent and sharded
            mode, else 1).
        compression: the byte stream's payload codec: ``"none"`` (off), ``None`` (the
            default: the ``BATCHFERRY_COMPRESSION`` environment variable, else off),
            ``"lz4"`` or ``"zstd"`` (blosc2 with a byte shuffle; lz4 is fast, zstd denser), or
            ``"auto"``: lz4 to servers on another host, off on this one. The server still
            sends a batch raw when its first chunk does not shrink by 10% (its
            ``BATCHFERRY_COMPRESSION_MIN_RATIO``, 1.1, says by how much). Batches sent by
            shared memory are never compressed. Needs ``pip install 'batchferry[compression]'``.
        receive_processes: receive each byte stream in a process of its own, which writes
            the payloads into shared memory that this process maps (as from a server on this
            host): the bytes never pass through this interpreter, so the training loop's
            thread does not compete with receiving for it. For fast links to servers on
            other hosts; no effect on the same host.
        mode: ``"independent"`` (this loader gets its own full epochs), ``"sharded"``,
            ``"shared"`` or ``"dynamic"``: one of the consumers of ``job``, as the
            documentation's "Several trainers" page describes.
        job: the job's name, any string its consumers share (job modes only).
        rank: this consumer's place in a sharded job; left out, as ``DistributedSampler``
            takes it (the initialised process group).
        world_size: the number of ranks of a sharded job; left out, as ``rank``.
        chunk_bytes: byte-stream chunk size asked of the server (0: the server's).
        tls: use TLS with the system's roots (on anyway when a certificate is given).
        root_certificates: the CA that signed the server's certificate, PEM bytes or a
            file path (default: the system's).
        client_cert: this client's certificate, for a server that requires mutual TLS.
        client_key: the private key of ``client_cert``.
        token: a bearer token the server accepts (default: ``BATCHFERRY_TOKEN``).
        credentials: ready-made ``grpc.ChannelCredentials`` instead of the certificates
            (cannot reach receiver processes: give the certificates there).
        log_stats_every: log :meth:`stats` every that many seconds (at INFO, logger
            ``batchferry.client.stats``, from the loop's thread at the next batch);
            default: ``BATCHFERRY_LOG_STATS_EVERY``, else 0 (off).

    Batches have the structure the collate returns (tuples of samples collate to
    lists, as in torch). Errors are raised from :mod:`batchferry.errors`. torch's
    public attributes read as torch's do (``batch_size``, ``sampler``, ``dataset``: a
    :class:`~.dataset.RemoteDataset` handle, ...), and those torch guards refuse to
    change after construction with torch's ValueError.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        dataset: str,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Sampler[int] | Iterable[int] | None = None,
        batch_sampler: Sampler[list[int]] | Iterable[list[int]] | None = None,
        num_workers: int = 0,
        collate_fn: str | None = "default",
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 60.0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        seed: int | None = None,
        device: str | torch.device | None = None,
        batch_transform: Callable[[Any], Any] | None = None,
        transport: str = "auto",
        streams: int | None = None,
        compression: str | None = None,
        receive_processes: bool = False,
        mode: str = "independent",
        job: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        chunk_bytes: int = 0,
        tls: bool | None = None,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        client_cert: bytes | str | os.PathLike[str] | None = None,
        client_key: bytes | str | os.PathLike[str] | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        log_stats_every: float | None = None,
    ) -> None:
        # Every argument by name, checked in one place (LoaderConfig.build).
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self._arguments = arguments  # what a copy of this loader is made from
        security = ClientSecurity.create(
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            token=token,
            credentials=credentials,
        )
        replicas = ReplicaSet(address, security)  # checks the address's form; connects lazily
        self.config = LoaderConfig.build(replicas.description, arguments)
        self._sampling = (
            ClientSampling(sampler, batch_sampler, self.config.batch_size, bool(drop_last))
            if sampler is not None or batch_sampler is not None
            else None
        )
        self._connection = Connection(replicas, self.config)
        self._stats = Recorder(self.config.log_stats_every)
        # torch's attributes, with torch's values.
        self.batch_size = None if batch_sampler is not None else batch_size
        self.drop_last = False if batch_sampler is not None else bool(drop_last)
        self.num_workers = num_workers
        self.collate_fn = self.config.collate_fn  # a name in the server's registry
        self.pin_memory = pin_memory
        self.pin_memory_device = pin_memory_device
        self.timeout = timeout
        self.worker_init_fn = worker_init_fn
        self.multiprocessing_context = multiprocessing_context
        self.prefetch_factor = prefetch_factor if prefetch_factor is not None or not num_workers else 2
        self.persistent_workers = persistent_workers
        self.in_order = in_order
        self.generator = (
            torch.Generator().manual_seed(seed) if seed is not None and mode == "independent" else generator
        )
        self._given_sampler, self._given_batch_sampler = sampler, batch_sampler
        self._samplers: tuple[Any, Any] | None = None
        self._dataset = RemoteDataset(self.config.dataset, self._connection)
        self._batch_transform = batch_transform
        # torch draws the base seed only once with persistent workers (later epochs
        # reuse the iterator): match it, so the order stays torch's.
        self._seed_once = bool(persistent_workers) and bool(num_workers)
        self._warned = False
        self._iterated = False
        self._last_base_seed = 0
        self._len_called: int | None = None  # an IterableDataset's len(), once asked (torch's warning)
        # The generator the shuffle draws from: the one given, as torch's RandomSampler keeps it
        # when loader.generator is set anew (the base seed comes from loader.generator).
        self._order_generator = self.generator
        self._initial_state = self.generator.get_state() if self.generator is not None else None
        self._epoch = 0
        self._resume: Resume | None = None
        # A state was loaded and its epoch not yet begun: the job's server is told that the
        # epoch continues a position, even one with nothing taken (a checkpoint at an epoch's
        # start or end), so a job restarted from a checkpoint gets back what came after it.
        self._loaded = False
        self._saved_length: int | None = None  # of a loaded state, checked at the next iter()
        self._active: Epoch | None = None  # the newest iterator
        self._epochs: weakref.WeakSet[Epoch] = weakref.WeakSet()  # every live one
        self._closed = False
        cleanup.start()
        cleanup.close_at_exit(self)
        self._initialized = True

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _GUARDED and getattr(self, "_initialized", False):
            raise ValueError(f"{name} attribute should not be set after {type(self).__name__} is initialized")
        super().__setattr__(name, value)

    # -- torch's attributes that describe the dataset ------------------------------------
    @property
    def dataset(self) -> RemoteDataset:
        """A handle on the served dataset: ``len()``, its name and sample structure, and
        ``dataset[i]`` fetching one sample from the server."""
        return self._dataset

    @property
    def sampler(self) -> Any:
        """The sampler given, else the one torch would make (``RandomSampler`` with the
        loader's generator when shuffling, ``SequentialSampler`` otherwise), and in sharded
        mode the ``DistributedSampler`` whose indices this rank gets."""
        return self._torch_samplers()[0]

    @property
    def batch_sampler(self) -> Any:
        """The batch sampler given, else ``BatchSampler(sampler, batch_size, drop_last)``."""
        return self._torch_samplers()[1]

    def _torch_samplers(self) -> tuple[Any, Any]:
        # Made on first use: their constructors ask the dataset's length (the server).
        if self._samplers is None:
            self._samplers = torch_samplers(
                self, self._given_sampler, self._given_batch_sampler, self._order_generator
            )
        return self._samplers

    @property
    def seed(self) -> int:
        """The seed of job modes' orders (epoch e shuffles with seed + e)."""
        return self.config.seed

    def _check_iterable(self) -> None:
        """torch's refusals of arguments an IterableDataset cannot take (its ValueError, its words)."""
        given = {
            "shuffle": self._arguments["shuffle"],
            "sampler": self._given_sampler,
            "batch_sampler": self._given_batch_sampler,
        }
        for name, value in given.items():
            if value is not None and value is not False:
                raise InvalidArgument(
                    "DataLoader with IterableDataset: expected unspecified "
                    f"{name} option, but got {name}={value}"
                )
        if self.config.mode == "dynamic":
            raise InvalidArgument(
                "mode='dynamic' hands each batch index of an epoch to one consumer; an IterableDataset "
                "has no indices: use mode='sharded' (each rank its own stream) or mode='shared'"
            )

    def _warn_server_side(self) -> None:
        """One warning per loader for torch arguments the server decides."""
        if self._warned:
            return
        self._warned = True
        notes = []
        iterable = self._connection.dataset_info().iterable  # num_workers iterators: honoured
        if self.num_workers and self.num_workers != self._connection.server_workers and not iterable:
            notes.append(
                f"num_workers={self.num_workers}: the server builds batches with its own "
                f"{self._connection.server_workers} worker process(es) (batchferry serve --num-workers)"
            )
        if self.worker_init_fn is not None:
            notes.append(
                "worker_init_fn does not run: the server's workers set themselves up (the dataset's "
                "constructor, or a module given to batchferry serve --import)"
            )
        if self.multiprocessing_context is not None:
            notes.append("multiprocessing_context: the server's workers are always spawned processes")
        if notes:
            warn("; ".join(notes), ServerSideWarning)  # at the caller's line, whichever call got here

    @property
    def stripes(self) -> int:
        """Streams (each on its own connection) per server."""
        return self._connection.stripes

    @property
    def transport(self) -> str:
        """The transport in use: ``"shm"`` (same host), ``"grpc"`` (byte stream), or with
        replicas on several hosts ``"shm+grpc"`` (each replica uses what it can)."""
        self._warn_server_side()
        return self._connection.transport

    @property
    def num_replicas(self) -> int:
        """Servers sharing each epoch (1 for a single server)."""
        self._warn_server_side()
        return self._connection.size

    def __len__(self) -> int:
        """Batches per epoch (dynamic mode: of the whole job, an upper bound for one consumer).
        An IterableDataset's as torch reckons it: TypeError without ``__len__``, else its
        length in batches (a guess torch warns about when the epoch yields more)."""
        info = self._connection.dataset_info()
        if info.iterable:
            self._check_iterable()
            if not info.sized:
                raise TypeError(
                    f"dataset {self.config.dataset!r} is an IterableDataset without __len__: its loader "
                    "has no len() either, as in torch"
                )
            self._len_called = length = int(info.length)  # what torch compares batches with
            # Unbatched (batch_size=None) is batch_size 1: its length in samples.
            return sampling.num_batches(length, self.config.batch_size, self.config.drop_last)
        if self._sampling is not None:
            return len(self._sampling)
        length = len(self._dataset)
        self._warn_server_side()
        if self.config.mode == "sharded":
            left = len(sampling.remaining(length, self._consumed())) if self._consumed() else length
            length = sampling.shard_length(left, self.config.world_size, self.config.drop_last)
        return sampling.num_batches(length, self.config.batch_size, self.config.drop_last)

    def _consumed(self) -> bytes:
        """What earlier worlds took of the epoch being read (or next), when it was resized."""
        if self._resume is not None:
            return self._resume.consumed
        it = self._active
        return it.consumed if it is not None and not it.finished else b""

    # -- statistics -------------------------------------------------------------------
    def stats(self, *, reset: bool = False) -> LoaderStats:
        """Batches and bytes received and the loop's wait for them (:class:`LoaderStats`),
        over every epoch since the first ``iter()``. ``reset=True`` returns them and begins
        a new window (per-epoch figures: call it at each epoch's end). Asks the server
        nothing; cheap enough for every step."""
        return self._stats.snapshot(time.perf_counter(), *self._connection.links(), reset=reset)

    def _log_stats(self, now: float) -> None:
        name = f"loader {self.config.dataset!r} from {self.config.address}"
        self._stats.log_line(now, *self._connection.links(), name=name)

    # -- epochs and state -------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` starts (or resumes)."""
        return self._resume.epoch if self._resume is not None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` yield epoch ``epoch`` (0-based) of this loader's sequence.

        With a generator or seed, the generator is put where ``epoch`` fully consumed
        torch iterations from its initial state would have left it.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._loaded = self._loaded and epoch == self.epoch
        self._resume = None
        gen = self._order_generator
        if gen is not None and self._initial_state is not None and epoch != self._epoch:
            gen.set_state(self._initial_state)
            for _ in range(epoch):
                sampling.replay_epoch(gen, self._connection.dataset_length, self.config.shuffle)
        self._epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is: plain ints and bytes, a few KiB at most."""
        order = self._order_generator
        gen = sampling.state_bytes(order) if order is not None else b""
        resume, it = self._resume, self._active
        if resume is None and it is not None and not it.finished:
            start = it.indices.start.as_dict() if it.indices is not None else None
            resume = Resume(it.epoch, it.taken, it.sampler_state, it.done, start, it.consumed)
            if it.iterable:
                places = tuple(it.places)
                resume = replace(
                    resume, base_seed=it.base_seed, places=places, next_iterator=it.next_iterator
                )
        # A loader that has not talked to its servers yet records no world (it has no epoch to map).
        world = self._world(ask=False) if self._connection.described else None
        return state_of(self.config, world, self._epoch, gen, resume)

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Continue from ``state``: the next ``iter()`` yields the batch after the saved one.

        ``state`` may come from another world: a sharded job of another size continues
        the epoch exactly (its untaken samples split among this world's ranks). A list
        of every consumer's states is merged first (:func:`merge_states`). A state that
        cannot be mapped is refused with an InvalidArgument naming what differs."""
        if isinstance(state, (list, tuple)):
            state = merge_states(state)
        world = self._world(ask=resizes(self.config, state))
        epoch, gen_state, resume = check_state(self.config, world, state, self._sampling is not None)
        # Checked at the next iter() where the servers were not asked now.
        self._saved_length = state.get("length") if isinstance(state, dict) and world.length is None else None
        if gen_state:
            if self._order_generator is None:
                self._order_generator = torch.Generator()
                self.generator = self.generator or self._order_generator
            self._order_generator.set_state(sampling.generator_from_state(gen_state).get_state())
        self._epoch, self._resume = epoch, resume
        self._loaded = True

    def _world(self, ask: bool) -> World:
        """Where this loader reads from; without ``ask``, only what its servers have said."""
        c = self._connection
        sampler_world = self._sampling.world() if self._sampling is not None else None
        if not ask and not c.described:
            return World(None, None, None, sampler_world)
        return World(c.dataset_length, c.size, c.stripes, sampler_world)

    # -- iteration --------------------------------------------------------------------
    def __iter__(self) -> Epoch:
        began = time.perf_counter()
        self._stats.begin(began)
        try:
            it = self._begin(began)
        finally:
            self._stats.wait_s += time.perf_counter() - began  # opening the streams is waiting too
        self._stats.epochs += 1
        return it

    def _begin(self, began: float) -> Epoch:
        # An earlier iterator goes on by itself, as torch's do (zip(loader, loader)); it
        # closes when dropped, or with the loader. state_dict() follows the newest.
        # Nothing moves until the streams are open: an iter() that fails (server away,
        # bad argument) leaves the epoch, the resume point and the generator as they
        # were, so a retry yields the same epoch torch would.
        before = (
            self._epoch,
            self._resume,
            self.generator.get_state() if self.generator is not None else None,
        )
        global_rng = torch.get_rng_state()  # the caller's sampler may draw from it
        try:
            if self._connection.dataset_info().iterable:
                self._check_iterable()
            start = replace(self._epoch_start(), loaded=self._loaded)
            self.transport  # noqa: B018 - fails fast (NotFound, ServerUnavailable) before a stream opens
            check_length(self.config, self._saved_length, self._connection.dataset_length)
            self._saved_length = None
            it = Epoch(
                self._connection,
                start,
                stats=self._stats,
                generator=self._order_generator,
                transform=self._batch_transform,
                length=self.__len__,
                log_stats=self._log_stats,
                began=began,
                len_called=lambda: self._len_called,
            )
        except BaseException:
            self._epoch, self._resume, gen_state = before
            if self.generator is not None and gen_state is not None:
                self.generator.set_state(gen_state)
            torch.set_rng_state(global_rng)
            raise
        self._resume = None
        self._loaded = False
        self._epoch = start.epoch + 1
        self._iterated = True
        self._active = it
        self._epochs.add(it)
        return it

    def _epoch_start(self) -> EpochStart:
        """Where the next epoch begins, its draws made as torch makes them."""
        resume = self._resume
        indices: EpochIndices | None = None
        if resume is not None:
            if self._sampling is not None:
                assert resume.epoch_start is not None
                skip = 0 if resume.done else resume.batch  # out of order: replay it all, skip what was done
                indices = self._sampling.resume(self.generator, resume.epoch_start, skip)
            return EpochStart(
                resume.epoch,
                resume.batch,
                resume.sampler_state,
                resume.done,
                indices,
                consumed=resume.consumed,
                base_seed=resume.base_seed,
                places=resume.places,
                next_iterator=resume.next_iterator,
            )
        sampler_state = b""
        draw = not (self._seed_once and self._iterated)
        if self._connection.dataset_info().iterable:
            return EpochStart(self._epoch, 0, base_seed=self._base_seed(draw))
        if self._sampling is not None:
            indices = self._sampling.begin(self.generator, draw_base_seed=draw)
        elif self.config.mode == "independent":
            order = self._order_generator
            sampler_state = sampling.begin_iteration(self.generator, self.config.shuffle, draw, order)
        redraw = self._order_generator if sampler_state else None
        return EpochStart(self._epoch, 0, sampler_state, indices=indices, redraw=redraw)

    def _base_seed(self, draw: bool) -> int:
        """An IterableDataset's workers' base seed, drawn as torch draws it at ``iter()``: from the
        loader's generator (else torch's global RNG); in job modes from ``seed + epoch``, the
        same on every rank. Kept where torch keeps its workers (persistent_workers)."""
        if not draw:
            return self._last_base_seed
        generator = self.generator
        if self.config.mode != "independent":
            generator = torch.Generator().manual_seed(self.config.seed + self._epoch)
        self._last_base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
        return self._last_base_seed

    def close(self) -> None:
        """End any iteration and release the connection and buffers. Idempotent; it
        waits a few seconds at most (the server gets the slots back first)."""
        self._closed = True
        cleanup.forget_at_exit(self)
        for it in list(self._epochs):
            it.close()
        self._active = None
        self._connection.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy (copy.copy, deepcopy, pickle) is a loader of its own, with its own connection,
        # made from the same arguments and continuing from this one's state.
        return _restore, (type(self), self._arguments, self.state_dict())

    def __enter__(self) -> DataLoader[_T_co]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped without close(): a finalizer must not wait, so hand the clean-up over.
        # (At interpreter exit the atexit hook has closed it already.)
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # module globals may be gone at shutdown
                cleanup.later(self.close)


def _restore(cls: type[DataLoader[Any]], arguments: dict[str, Any], state: dict[str, Any]) -> DataLoader[Any]:
    loader = cls(**arguments)
    loader.load_state_dict(state)
    return loader
