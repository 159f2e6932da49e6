"""The deployment files (issue 5): Docker, compose, Kubernetes, the Helm chart, the dashboard.

Nothing here needs a Docker engine or a cluster. Each file is parsed and checked for what breaks
a deployment when it is wrong: the flags are run through the server's real argument parser, so
ports, probe paths and the buffer size agree with what `kvdepot serve` actually does; volumes,
host networking and the absence of a GPU request are checked field by field; the Kubernetes
objects are validated against the Kubernetes OpenAPI schemas (kubernetes-validate), and the chart
is linted and rendered by Helm's own engine (helm-python-sdk, Helm v4 compiled as a library).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kvdepot.server.config import ServerConfig, parse_args
from kvdepot.server.metrics import ServerMetrics
from ops_fakes import fake_stats, fake_tier
from ops_server import REPO_ROOT, OpsServer
from server_process import free_port

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
    final_base = docker.last("FROM").replace("${PYTHON_VERSION}", docker.arg_default("PYTHON_VERSION"))
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


@pytest.mark.parametrize("manifest", ["kvdepot-daemonset.yaml", "vllm-deployment.yaml"])
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
    container = ds["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/kvdepot:9.9.9"
    assert parse_quantity(container["resources"]["requests"]["memory"]) == 102.5e9
    assert env_of(container)["KVDEPOT_LOG_LEVEL"]["value"] == "DEBUG"


def test_rendered_chart_matches_the_kubernetes_schema(helm):
    for values in ({}, {"server": {"enableAdminApi": True}, "priorityClassName": "high"}):
        for objects in render_chart(helm, values).values():
            for doc in objects:
                validate_schema(doc)


def test_chart_can_turn_off_the_scrape_annotations(helm):
    (ds,) = render_chart(helm, {"prometheus": {"scrape": False}})["DaemonSet"]
    annotations = ds["spec"]["template"]["metadata"].get("annotations") or {}
    assert not any(key.startswith("prometheus.io/") for key in annotations)


# --- Grafana dashboard and docs ------------------------------------------------------------------


def exposed_sample_names() -> set[str]:
    metrics = ServerMetrics()
    metrics.update_from_stats(fake_stats(tiers=[fake_tier()]))  # a server with a disk tier
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
                   "--build-arg", "--values", "--gpus", "--follow", "--format"}  # fmt: skip
    unknown_flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", doc)) - server_flags - other_tools
    assert not unknown_flags, f"docs/deploy.md names flags kvdepot serve does not have: {unknown_flags}"
