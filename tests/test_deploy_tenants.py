"""The Helm chart's tenants: values rendered as the tenant file (a ConfigMap the server's own
parser accepts), the --tenants flag, its mount, a checksum that restarts pods on a change, and
the values the server would refuse refused at render time."""

from __future__ import annotations

import re

import pytest
import yaml
from test_deploy_manifests import CURVE_VALUES, check_kvdepot_daemonset, helm, render_chart  # noqa: F401

from kvdepot.server.tenants import parse_tenants

TENANTS = [
    {"name": "team-a", "keys": ["engine-a", "engine-a-2"], "salt": "s-a", "models": ["Qwen/Qwen3-14B"],
     "buffer_gb": 4, "disk_gb": 10, "segment": {"user": 1001, "mode": "0600"}},
    {"name": "team-b", "keys": ["engine-b"], "buffer_gb": 2},
]  # fmt: skip


def with_tenants(tenants: list[dict]) -> dict:
    return {"auth": {**CURVE_VALUES["auth"], "tenants": tenants}}


def test_chart_renders_the_tenant_file_its_flag_and_its_mount(helm):  # noqa: F811
    objects = render_chart(helm, with_tenants(TENANTS))
    (cm,) = objects["ConfigMap"]
    tenants = parse_tenants(cm["data"]["tenants.yaml"])  # the server's own parser
    assert [t.name for t in tenants] == ["team-a", "team-b"]
    assert tenants[0].segment.user == 1001 and tenants[0].models == ["Qwen/Qwen3-14B"]
    (ds,) = objects["DaemonSet"]
    config = check_kvdepot_daemonset(ds)
    assert config.tenants_file == "/etc/kvdepot/tenants/tenants.yaml"
    pod = ds["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tenants"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "tenants"]
    assert mount["mountPath"] == "/etc/kvdepot/tenants" and mount["readOnly"] is True
    first = ds["spec"]["template"]["metadata"]["annotations"]["kvdepot.io/tenants-checksum"]
    changed = [dict(TENANTS[0], buffer_gb=5), TENANTS[1]]
    (ds2,) = render_chart(helm, with_tenants(changed))["DaemonSet"]
    assert ds2["spec"]["template"]["metadata"]["annotations"]["kvdepot.io/tenants-checksum"] != first


def test_chart_without_tenants_renders_no_tenant_file(helm):  # noqa: F811
    objects = render_chart(helm, CURVE_VALUES)
    assert "ConfigMap" not in objects
    (ds,) = objects["DaemonSet"]
    assert check_kvdepot_daemonset(ds).tenants_file is None


def test_chart_refuses_tenants_without_curve(helm):  # noqa: F811
    with pytest.raises(Exception, match=re.escape("auth.tenants needs auth.curve.enabled=true")):
        render_chart(helm, {"auth": {"tenants": TENANTS}})


def test_values_file_documents_tenants():
    from test_deploy_manifests import CHART

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["auth"]["tenants"] == []
