"""Server settings: the ``ServerConfig`` object, and ``batchferry serve``'s sources for it.

``batchferry serve`` takes every setting from, highest first: its command-line
flag, a ``BATCHFERRY_*`` environment variable, a TOML file (``--config`` or
``BATCHFERRY_CONFIG``), the default. The file's keys are the flags' names with
underscores (``--num-workers`` is ``num_workers``)::

    host = "0.0.0.0"
    port = 50051
    num_workers = 8
    shm_bytes = "8GiB"          # bytes, or a size with KiB/MiB/GiB
    num_replicas = 3            # replica_index defaults to the StatefulSet ordinal
    import = ["mytraining.collates"]

    [datasets]
    train = "npy:/data/train.npy,labels=/data/train_labels.npy"

Every mistake is reported naming where it came from: the file and key, the
environment variable, or the flag.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from batchferry import wire

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "ENV_PREFIX",
    "KEYS",
    "SERVE_DEFAULTS",
    "ConfigError",
    "ServeSettings",
    "ServerConfig",
    "describe_setting",
    "format_size",
    "has_flag",
    "load_settings",
    "local_target",
    "parse_size",
    "statefulset_ordinal",
]

ENV_PREFIX = "BATCHFERRY_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A setting is missing, unknown, or has a value of the wrong kind or range."""


_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(value: str | int) -> int:
    """``4194304``, ``"4MiB"``, ``"2GiB"``, ``"512KiB"`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a size (bytes, or e.g. '4GiB'), got {value!r}")
    lower = value.strip().lower()
    for suffix, factor in _UNITS.items():
        if lower.endswith(suffix):
            try:
                number = float(lower[: -len(suffix)])
            except ValueError:
                break
            if not math.isfinite(number) or number < 0:
                break
            return int(number * factor)
    try:
        return int(lower)
    except ValueError:
        raise ValueError(f"must be a size (bytes, or e.g. '4GiB'), got {value!r}") from None


def _setting(default: Any, help: str, *, parse: Callable[[Any], Any] | None = None, flag: bool = True) -> Any:
    """A ServerConfig field: its default, its help text and (if not by type) its parser.

    The CLI flags, environment variables and file keys are generated from these;
    ``flag=False`` keeps a secret off the command line (where any user sees it).
    """
    return field(default=default, metadata={"help": help, "parse": parse, "flag": flag})


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything a server is configured with (``batchferry serve`` flags map 1:1 onto these)."""

    host: str = _setting("127.0.0.1", "interface to listen on")
    port: int = _setting(50051, "port to listen on (0: any free port)")
    num_workers: int = _setting(2, "worker processes building batches (0: build in the server process)")
    slots: int = _setting(0, "shared-memory ring slots (0: 4 per worker plus 4, at least 8)")
    shm_bytes: int = _setting(
        4 << 30,
        "shared-memory budget of every segment together, lingering and retired ones included "
        "(at most what /dev/shm holds), e.g. 4GiB",
        parse=parse_size,
    )
    chunk_bytes: int = _setting(
        wire.DEFAULT_CHUNK_BYTES, "byte-stream chunk size, e.g. 4MiB", parse=parse_size
    )
    group_bytes: int = _setting(
        4 << 20,
        "small batches are built and sent several at a time, up to this many bytes together "
        "(0: one at a time), e.g. 4MiB",
        parse=parse_size,
    )
    max_streams: int = _setting(
        128,
        "concurrent batch streams (a byte-stream loader opens 2 by default); health checks and "
        "listings are always answered",
    )
    max_streams_per_peer: int = _setting(
        32, "concurrent batch streams of one client (its token, certificate or IP address)"
    )
    stream_idle_s: float = _setting(
        300.0,
        "end a stream whose client sent nothing this long while the stream waits on it "
        "(10 s at most for its open message)",
    )
    max_batch_bytes: int = _setting(
        1 << 30,
        "largest batch the server builds: refused before any build when sample 0 says it is larger, "
        "stopped while building when it grows past it; e.g. 1GiB",
        parse=parse_size,
    )
    max_index_bytes: int = _setting(
        2 << 30,
        "memory for epoch orders (shuffled permutations) of all streams together: one per distinct "
        "order, shared by the streams that read it",
        parse=parse_size,
    )
    job_idle_s: float = _setting(300.0, "forget a job (its settings no longer bind) after this long unused")
    max_iterators: int = _setting(
        64, "iterators (a loader's num_workers) one stream of an IterableDataset may ask for"
    )
    max_jobs: int = _setting(
        256,
        "jobs (shared, sharded, dynamic) known at once; a new one evicts the longest-idle job, "
        "and is refused when every job has consumers",
    )
    state_dir: str = _setting(
        "",
        "directory where dynamic jobs journal which batches went to which consumer, so that a "
        "restarted server hands none out twice (empty: no journal; a restart during a dynamic "
        "epoch can then repeat batches handed out just before it)",
    )
    rejoin_s: float = _setting(
        5.0,
        "after a restart with state_dir: how long batches a consumer had stay reserved for it "
        "to reconnect before they go to the job's other consumers",
    )
    slot_timeout_s: float = _setting(
        60.0, "how long a stream waits for a free shared-memory slot before RESOURCE_EXHAUSTED"
    )
    linger_s: float = _setting(
        5.0, "how long slots sent to a client whose stream the server ended keep their names"
    )
    replica_index: int = _setting(
        0, "this replica's index (default: the StatefulSet ordinal of the host name when num_replicas > 1)"
    )
    num_replicas: int = _setting(1, "replicas sharing each epoch: replica i serves the batches b % R == i")
    tls_cert: str = _setting("", "PEM certificate (chain) of the server: serve over TLS")
    tls_key: str = _setting("", "PEM private key of tls_cert")
    tls_client_ca: str = _setting("", "PEM CA bundle: clients must present a certificate it signed (mTLS)")
    token_file: str = _setting(
        "", "file of accepted bearer tokens, one per line, read again when it changes (rotation)"
    )
    tokens: str = _setting(
        "", "accepted bearer tokens, comma-separated (environment or file only)", flag=False
    )
    health_port: int = _setting(
        0, "also answer grpc.health.v1 in plaintext on this port (for probes that speak no TLS); 0: off"
    )
    metrics_port: int = _setting(0, "serve Prometheus metrics over plain HTTP on this port of host; 0: off")
    cache_dir: str = _setting(
        "", "directory caching files read from object storage (default $XDG_CACHE_HOME/batchferry/remote)"
    )
    cache_bytes: int = _setting(
        10 << 30,
        "files held in cache_dir together, e.g. 10GiB (least recently used go first)",
        parse=parse_size,
    )
    fetch_ahead: int = _setting(2, "files (shards) of a remote dataset fetched ahead of need, per process")
    fetch_threads: int = _setting(8, "concurrent downloads from object storage, per process")
    fetch_retries: int = _setting(4, "retries (with backoff) of a failed download before its sample fails")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.slots < 0:
            raise ValueError(f"slots must be >= 0, got {self.slots}")
        if self.shm_bytes < 1 << 20:
            raise ValueError(f"shm_bytes must be at least 1 MiB, got {self.shm_bytes}")
        if self.shm_bytes < self.num_slots << 20:
            raise ValueError(
                f"shm_bytes must hold the ring's {self.num_slots} slots of 1 MiB, got {self.shm_bytes}"
            )
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {self.max_streams}")
        if self.max_streams_per_peer < 1:
            raise ValueError(f"max_streams_per_peer must be >= 1, got {self.max_streams_per_peer}")
        if self.max_iterators < 1:
            raise ValueError(f"max_iterators must be >= 1, got {self.max_iterators}")
        if self.cache_bytes < 1:
            raise ValueError(f"cache_bytes must be > 0, got {self.cache_bytes}")
        if self.fetch_threads < 1:
            raise ValueError(f"fetch_threads must be >= 1, got {self.fetch_threads}")
        for name in ("fetch_ahead", "fetch_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {self.max_jobs}")
        if not 0 <= self.group_bytes <= 1 << 30:
            raise ValueError(f"group_bytes must be in [0, 1GiB], got {self.group_bytes}")
        for name in ("max_batch_bytes", "max_index_bytes"):
            if getattr(self, name) < 1 << 20:
                raise ValueError(f"{name} must be at least 1 MiB, got {getattr(self, name)}")
        for name in ("health_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if self.metrics_port and self.metrics_port in (self.port, self.health_port):
            raise ValueError(f"metrics_port must differ from port and health_port, got {self.metrics_port}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (mutual TLS runs over TLS)")
        for name in ("job_idle_s", "rejoin_s", "slot_timeout_s", "linger_s", "stream_idle_s"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be > 0 seconds, got {value}")
        if not wire.MIN_CHUNK_BYTES <= self.chunk_bytes <= wire.MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be in [{wire.MIN_CHUNK_BYTES}, {wire.MAX_CHUNK_BYTES}], "
                f"got {self.chunk_bytes}"
            )
        if not 1 <= self.num_replicas <= wire.MAX_REPLICAS:
            raise ValueError(f"num_replicas must be in [1, {wire.MAX_REPLICAS}], got {self.num_replicas}")
        if not 0 <= self.replica_index < self.num_replicas:
            raise ValueError(
                f"replica_index must be in [0, num_replicas={self.num_replicas}), got {self.replica_index}"
            )

    @property
    def num_slots(self) -> int:
        return self.slots or max(8, 4 * self.num_workers + 4)


def _scalar(kind: type[int] | type[float], what: str) -> Callable[[Any], Any]:
    """A parser for ``kind`` from a TOML value or an environment/flag string."""

    def parse(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return kind(value.strip())
            except ValueError:
                pass
        elif not isinstance(value, bool) and isinstance(value, (int, kind)):
            return kind(value)
        raise ValueError(f"must be {what}, got {value!r}")

    return parse


_integer = _scalar(int, "an integer")
_number = _scalar(float, "a number")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _log_level(value: Any) -> str:
    level = _text(value).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def _names(value: Any) -> tuple[str, ...]:
    """A list of module names (file), or a comma-separated string (environment, flags)."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError(f"must be a list of module names, got {value!r}")


def _datasets(value: Any) -> dict[str, str]:
    """A table of name = spec (file), ``NAME=SPEC`` entries (flags), or such entries
    separated by ``;`` in one string (environment)."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(";") if part.strip()]
    if isinstance(value, (list, tuple)):
        entries: dict[str, str] = {}
        for part in value:
            name, sep, spec = str(part).partition("=")
            if not sep or not name.strip() or not spec.strip():
                raise ValueError(f"expects NAME=SPEC, got {part!r}")
            entries[name.strip()] = spec.strip()
        return entries
    if isinstance(value, Mapping) and all(isinstance(k, str) and k for k in value):
        bad = {k: v for k, v in value.items() if not isinstance(v, str) or not v}
        if bad:
            name = next(iter(bad))
            raise ValueError(f"dataset {name!r} must be a spec string, got {bad[name]!r}")
        return dict(value)
    raise ValueError(f'must be a table of name = "spec", got {value!r}')


def _parser(f: Any) -> Callable[[Any], Any]:
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse  # type: ignore[no-any-return]
    return {"int": _integer, "float": _number, "str": _text}[str(f.type)]


# Key -> parser: ServerConfig's fields, plus what `serve` itself needs.
_SERVER_KEYS: dict[str, Callable[[Any], Any]] = {f.name: _parser(f) for f in fields(ServerConfig)}
KEYS: dict[str, Callable[[Any], Any]] = {
    "datasets": _datasets,
    "import": _names,
    "log_level": _log_level,
    **_SERVER_KEYS,
}
# Defaults `batchferry serve` applies to its own keys (not ServerConfig fields).
SERVE_DEFAULTS: dict[str, Any] = {"log_level": "INFO"}
# Help for the settings that are not ServerConfig fields.
_HELP = {
    "datasets": "NAME=SPEC, a spec being KIND:PATH[,option=value,...] such as npy:/data/x.npy "
    "(every kind: the Datasets page of the documentation; repeatable)",
    "import": "import MODULE first, e.g. one that calls register_collate (repeatable)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


def describe_setting(key: str) -> str:
    """Help text for a setting, with its default as `serve` applies it."""
    field_ = next((f for f in fields(ServerConfig) if f.name == key), None)
    if field_ is None:
        return _HELP[key]
    default = SERVE_DEFAULTS.get(key, field_.default)
    if field_.metadata["parse"] is parse_size:
        default = format_size(default)
    if default == "":
        return str(field_.metadata["help"])
    return f"{field_.metadata['help']} (default {default})"


def has_flag(key: str) -> bool:
    """Whether ``batchferry serve`` takes ``key`` as a flag (secrets do not)."""
    field_ = next((f for f in fields(ServerConfig) if f.name == key), None)
    return field_ is None or bool(field_.metadata["flag"])


def format_size(n: int) -> str:
    """4194304 -> '4MiB' (exact units only)."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    return "--dataset" if key == "datasets" else "--" + key.replace("_", "-")


@dataclass(frozen=True)
class ServeSettings:
    """What ``batchferry serve`` runs with, every source merged and checked."""

    datasets: dict[str, str]
    server: ServerConfig
    imports: tuple[str, ...] = ()
    log_level: str = "INFO"
    # Where each setting came from ("flag --port", "config serve.toml key 'port'", ...).
    origins: dict[str, str] = field(default_factory=dict)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    for key in data:
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(KEYS))}"
            raise ConfigError(f"config file {path}: unknown key {key!r}{hint}")
    return data


def local_target(environ: Mapping[str, str] | None = None) -> str:
    """Where this host's server answers health checks, for ``batchferry health`` without a
    target (container HEALTHCHECK): its plaintext health_port if it has one, else its port;
    each from BATCHFERRY_*, else the config file BATCHFERRY_CONFIG names, else the default."""
    env = os.environ if environ is None else environ
    file = _read_file(Path(env[env_name("config")])) if env.get(env_name("config")) else {}

    def setting(key: str, default: int) -> int:
        raw: Any = env.get(env_name(key), file.get(key))
        try:
            return _integer(raw) if raw is not None else default
        except ValueError as exc:
            raise ConfigError(f"{key} for the health check: {exc}") from None

    health = setting("health_port", 0)
    return f"127.0.0.1:{health or setting('port', ServerConfig.port)}"


def statefulset_ordinal(hostname: str) -> int | None:
    """The ordinal of a StatefulSet pod from its host name (``loader-2`` -> 2), or None."""
    match = re.fullmatch(r".+-(\d+)", hostname)
    return int(match.group(1)) if match else None


def load_settings(
    flags: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
) -> ServeSettings:
    """Merge flags (None where not given), environment, config file and defaults.

    ``flags`` holds the settings keys; ``config`` names the file. Raises
    ConfigError naming the offending flag, variable or file key.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    datasets: dict[str, str] = {}

    def take(key: str, raw: Any, origin: str) -> None:
        try:
            value = KEYS[key](raw)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
        if key == "datasets":  # merged by name: a later source overrides one dataset
            datasets.update(value)
        else:
            values[key], origins[key] = value, origin

    config_path = flags.get("config") or env.get(env_name("config"))
    if config_path:
        path = Path(config_path)
        for key, raw in _read_file(path).items():
            take(key, raw, f"config file {path} key {key!r}")
    for key in KEYS:
        if env_name(key) in env:
            take(key, env[env_name(key)], f"environment {env_name(key)}")
    for key in KEYS:
        if flags.get(key) is not None:
            take(key, flags[key], f"flag {flag_name(key)}")

    for key, default in SERVE_DEFAULTS.items():
        values.setdefault(key, default)
    if "replica_index" not in values:
        values["replica_index"], origins["replica_index"] = _default_replica(
            values.get("num_replicas", 1), hostname or env.get("HOSTNAME")
        )
    if not datasets:
        raise ConfigError(
            "datasets: none given; use --dataset NAME=SPEC, BATCHFERRY_DATASETS or a [datasets] table "
            "in the config file"
        )
    server_values = {k: v for k, v in values.items() if k in _SERVER_KEYS}
    try:
        server = ServerConfig(**server_values)
    except ValueError as exc:
        key = next((k for k in server_values if str(exc).startswith(k)), "")
        where = origins.get(key, "")
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None
    return ServeSettings(
        datasets=datasets,
        server=server,
        imports=values.get("import", ()),
        log_level=values["log_level"],
        origins=origins,
    )


def _default_replica(num_replicas: int, hostname: str | None) -> tuple[int, str]:
    """One replica is replica 0; of several, a StatefulSet pod is its ordinal."""
    if num_replicas <= 1:
        return 0, "default"
    host = hostname or socket.gethostname()
    ordinal = statefulset_ordinal(host)
    if ordinal is None:
        raise ConfigError(
            f"replica_index: not given, and the host name {host!r} does not end in a StatefulSet "
            f"ordinal (-N); set --replica-index or {env_name('replica_index')}"
        )
    return ordinal, f"host name {host!r}"
