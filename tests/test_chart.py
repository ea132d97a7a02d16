"""The Helm chart, rendered and validated offline.

Helm's own Go SDK (helm-python-sdk) lints and renders the chart, and
kubernetes-validate checks every rendered object in strict mode against the
oldest and newest Kubernetes API schemas the chart supports.  Prometheus
Operator's objects (ServiceMonitor, PrometheusRule) are checked against the
CRDs vendored in tests/chart_schemas/, and every alert expression is parsed
as PromQL.  The daemon is then started with exactly the environment the chart
renders, so chart and daemon cannot drift apart.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import promql_parser
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from helm_python import Chart, HelmRenderError, HelmValuesError, lint
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from harness import LocalZooKeeper, free_port
from harness.process import die_with_parent
from sidecar.config import load_config, settings_help, unknown_env_names
from tests.conftest import make_tls_files

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "zk-cache-sidecar"
NEWEST = kubernetes_validate.latest_version()
OLDEST_NATIVE = "1.29.0"  # restartPolicy on init containers (native sidecars)
OLDEST_PLAIN = "1.25.0"  # the oldest schema kubernetes-validate carries

# Settings the chart fills in itself rather than from sidecar.config.
CHART_OWNED = {
    "zk",
    "listen",
    "ops_listen",
    "member_id",
    "zk_auth",
    "auth_token",
    "zk_tls",
    "zk_tls_ca",
    "zk_tls_cert",
    "zk_tls_key",
    "zk_tls_verify",
}

# Prometheus Operator's objects, as kube-prometheus-stack's default selectors want them.
MONITORING: dict[str, Any] = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}, "alertLabels": {"team": "cache"}},
    }
}
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}

# What each alert reads: the family name and type the daemon registers
# (sidecar/metrics.py). prometheus_client decides the sample names a scrape
# sees (a counter "x" is scraped as x_total), and the test asks it.
ALERT_METRICS: dict[str, dict[str, str]] = {
    "ZkCacheNotReady": {"zkcache_ready": "gauge"},
    "ZkCachePropagationLag": {"zkcache_key_event_delivery_seconds": "counter", "zkcache_key_events": "counter"},
    "ZkCacheInconsistent": {"zkcache_consistency_probes": "counter"},
    "ZkCacheZooKeeperSlow": {"zkcache_zookeeper_request_seconds": "histogram"},
    "ZkCacheNoHousekeeper": {"zkcache_leader": "gauge"},
}
# metrics.prometheusRule.alerts.<key> -> the alert it renders.
ALERT_KEYS = {
    "notReady": "ZkCacheNotReady",
    "propagationLag": "ZkCachePropagationLag",
    "inconsistent": "ZkCacheInconsistent",
    "zooKeeperSlow": "ZkCacheZooKeeperSlow",
    "noHousekeeper": "ZkCacheNoHousekeeper",
}
# Labels Prometheus gives every series it scrapes through the ServiceMonitor (not the daemon's own).
TARGET_LABELS = {"namespace", "job"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "plain-container": {"sidecar": {"native": False}},
    "zookeeper": {"zookeeper": {"enabled": True, "antiAffinity": "hard"}},
    "network-policy": {
        "zookeeper": {"enabled": True},
        "networkPolicy": {
            "enabled": True,
            "extraEgress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 8080}]}],
        },
    },
    "custom": {
        "image": {"digest": "sha256:" + "a" * 64},
        "externalZookeeper": {"connect": "zk-0.zk:2181,zk-1.zk:2181/apps"},
        "sidecar": {
            "config": {
                "origin": "http://origin.shop.svc:8080/kv",
                "max_bytes": "400Mi",
                "max_entries": 1000000,  # reaches the template as a float: must not print as 1e+06
                "ttl": "5m",
                "consistency": "strong",
                "shutdown_timeout": "20s",
                "suspended_grace": "2s",
            },
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
            "terminationGracePeriodSeconds": 45,
            "probes": {"readinessPath": "/healthz", "startup": {"periodSeconds": 1, "failureThreshold": 300}},
            "zkAuthSecret": {"name": "zk-creds", "key": "auth"},
            "apiTokenSecret": {"name": "cache-api", "key": "token"},
            "extraEnv": [{"name": "TZ", "value": "UTC"}],
        },
    },
    # The ZooKeeper ensemble's Services too, for the ServiceMonitor not to pick them.
    "monitoring": {**MONITORING, "zookeeper": {"enabled": True}},
    "tls-and-origin-secret": {
        "externalZookeeper": {"connect": "zk-0.zk:2281,zk-1.zk:2281"},
        "sidecar": {
            "zkTls": {"enabled": True, "secretName": "zk-client-tls"},
            "originSecret": {"name": "cache-origin", "key": "url"},
        },
    },
}


def render(values: dict[str, Any], chart: Path = CHART) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for ``values``."""
    loaded = Chart.load(str(chart))
    try:
        manifests = loaded.render(values, name="cache", namespace="shop", is_install=True)
    finally:
        loaded.close()
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".txt"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def pod_spec(docs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    [workload] = [d for d in docs if d["kind"] == kind]
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def sidecar_of(spec: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = spec.get("initContainers", []) + spec["containers"]
    [container] = [c for c in containers if c["name"] == "zk-cache-sidecar"]
    return container


def rendered_env(container: dict[str, Any], **valued_from: str) -> dict[str, str]:
    """The container's environment, with the downward API and Secrets filled in by ``valued_from``."""
    env = {}
    for item in container["env"]:
        env[item["name"]] = item["value"] if "value" in item else valued_from[item["name"]]
    return env


def merged(values: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(values)
    for key, value in override.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


# --- Prometheus Operator's CRDs (tests/chart_schemas/README.md says where they come from).


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``, rejecting unknown fields wherever it lists the known ones.

    CRD schemas leave additionalProperties out: the API server prunes unknown
    fields, silently unless asked for strict field validation.  Here a typo in
    a template fails, as kubernetes-validate's strict mode does for built-in kinds.
    """
    out = dict(schema)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    if "properties" in out:
        out["properties"] = {name: _strict(s) for name, s in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """x-kubernetes-list-type, as the API server checks it: no duplicate in a set, no duplicate key in a map."""
    if list_type not in ("set", "map") or not validator.is_type(instance, "array"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for item in instance:
        key = json.dumps({k: item.get(k) for k in keys} if list_type == "map" else item, sort_keys=True)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry {key} in a list of type {list_type}")
        seen.add(key)


# Kubernetes validates CRD schemas with OpenAPI v3.0 semantics, close to JSON Schema draft 4.
_CrdValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})


def _crd_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) to a validator of every served version of the vendored CRDs."""
    validators = {}
    for path in sorted((ROOT / "tests" / "chart_schemas").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["served"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                validators[key] = _CrdValidator(_strict(version["schema"]["openAPIV3Schema"]))
    return validators


CRDS = _crd_validators()


def validate(doc: dict[str, Any], version: str) -> None:
    """Validate one rendered object strictly: built-in kinds with kubernetes-validate, CRD kinds with their schema.

    Raises kubernetes_validate.ValidationError or jsonschema.ValidationError.
    """
    crd = CRDS.get((doc["apiVersion"], doc["kind"]))
    if crd is None:
        kubernetes_validate.validate(doc, version, strict=True)
        return
    error = jsonschema.exceptions.best_match(crd.iter_errors(doc))
    if error is not None:
        raise jsonschema.ValidationError(f"at {error.json_path}: {error.message}")
    # A CRD schema leaves metadata to the API server: check it as any object's ObjectMeta.
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, version, strict=True
    )


@pytest.mark.parametrize("values", [{}, MONITORING], ids=["defaults", "monitoring"])
def test_lint_is_clean(values: dict[str, Any]) -> None:
    report = lint(str(CHART), values, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_validates_against_oldest_and_newest_kubernetes(name: str) -> None:
    values = VALUE_SETS[name]
    docs = render(values)
    assert docs, "nothing rendered"
    native = values.get("sidecar", {}).get("native", True)
    for version in (OLDEST_NATIVE if native else OLDEST_PLAIN, NEWEST):
        for doc in docs:
            try:
                validate(doc, version)
            except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} invalid on {version}: {exc.message}")


def test_native_sidecar_needs_kubernetes_1_29() -> None:
    # The validation is real: before 1.29's API, restartPolicy on a container does not exist.
    deployment = next(d for d in render({}) if d["kind"] == "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(deployment, "1.27.0", strict=True)


def test_default_pod_runs_a_hardened_native_sidecar() -> None:
    spec = pod_spec(render({}))
    sidecar = sidecar_of(spec)
    assert sidecar in spec["initContainers"] and sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "ghcr.io/zk-cache-sidecar/zk-cache-sidecar:0.1.0"
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sidecar["resources"]["requests"] and sidecar["resources"]["limits"]["memory"] == "256Mi"
    # Every path the daemon writes to is a mounted volume.
    mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"] for v in spec["volumes"]}
    assert mounts == {"/data", "/tmp"} and {m["name"] for m in sidecar["volumeMounts"]} <= volumes
    env = rendered_env(sidecar, ZKCACHE_MEMBER_ID="pod-0")
    assert env["ZKCACHE_LISTEN"] == "127.0.0.1:7070", "the API must stay on loopback"
    # Probes: startup and readiness on /readyz, liveness on /healthz, on the ops port.
    ops_port = int(env["ZKCACHE_OPS_LISTEN"].rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    probes = {kind: sidecar[f"{kind}Probe"]["httpGet"] for kind in ("startup", "readiness", "liveness")}
    assert {kind: (p["path"], ports[p["port"]]) for kind, p in probes.items()} == {
        "startup": ("/readyz", ops_port),
        "readiness": ("/readyz", ops_port),
        "liveness": ("/healthz", ops_port),
    }
    # The stop bound fits in the grace period.
    assert load_config(env=env).shutdown_timeout < spec["terminationGracePeriodSeconds"]


def test_plain_container_fallback() -> None:
    spec = pod_spec(render({"sidecar": {"native": False}}))
    sidecar = sidecar_of(spec)
    assert "initContainers" not in spec and sidecar in spec["containers"] and "restartPolicy" not in sidecar


def test_bundled_zookeeper_ensemble() -> None:
    docs = render(VALUE_SETS["zookeeper"])
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "PodDisruptionBudget", "Service", "Service", "StatefulSet"]
    statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
    headless = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
    assert statefulset["spec"]["serviceName"] == headless["metadata"]["name"]
    assert statefulset["spec"]["replicas"] == 3
    affinity = statefulset["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in affinity
    env = rendered_env(sidecar_of(pod_spec(docs)), ZKCACHE_MEMBER_ID="pod-0")
    hosts = env["ZKCACHE_ZK"].split(",")
    assert hosts == [
        f"cache-zk-cache-sidecar-zk-{i}.{headless['metadata']['name']}.shop.svc.cluster.local:2181" for i in range(3)
    ]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_and_daemon_agree_on_every_setting(name: str, tmp_path: Path) -> None:
    sidecar = sidecar_of(pod_spec(render(VALUE_SETS[name])))
    env = rendered_env(
        sidecar,
        ZKCACHE_MEMBER_ID="cache-example-7d9f-x2x4z",
        ZKCACHE_ZK_AUTH="digest:app:pw",
        ZKCACHE_AUTH_TOKEN="t",
        ZKCACHE_ORIGIN="redis://:pw@redis.shop.svc:6379/0",
    )
    # The TLS Secret's files, as the kubelet would mount them (the daemon loads them at startup).
    files = make_tls_files(tmp_path / "zk-tls")
    mounted = {"ca.crt": files.ca, "tls.crt": files.cert, "tls.key": files.key}
    for name_, value in env.items():
        if value.startswith("/etc/zkcache/zk-tls/"):
            env[name_] = mounted[value.rsplit("/", 1)[1]]
    assert unknown_env_names(env) == [], "the chart sets variables the daemon does not know"
    config = load_config(env=env)  # raises ConfigError on any value the daemon cannot parse
    assert config.member_id == "cache-example-7d9f-x2x4z"
    values = merged(yaml.safe_load((CHART / "values.yaml").read_text()), VALUE_SETS[name])
    assert {f"ZKCACHE_{setting.upper()}" for setting in values["sidecar"]["config"]} <= set(env)
    if name == "custom":
        assert config.max_entries == 1_000_000 and config.max_bytes == 400 * 1024**2 and config.ttl == 300
        assert config.zk == "zk-0.zk:2181,zk-1.zk:2181/apps" and config.zk_auth == "digest:app:pw"


def test_every_daemon_setting_is_a_chart_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    config_keys = set(schema["properties"]["sidecar"]["properties"]["config"]["properties"])
    daemon = {name for name, *_ in settings_help()}
    assert config_keys | CHART_OWNED == daemon and not config_keys & CHART_OWNED


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sidecar": {"config": {"max_bytes": "-64Mi"}}}, "/sidecar/config/max_bytes"),
        ({"sidecar": {"config": {"max_entries": 0}}}, "/sidecar/config/max_entries"),
        ({"sidecar": {"config": {"lock_timeout": "0s"}}}, "/sidecar/config/lock_timeout"),
        ({"sidecar": {"config": {"consistency": "linearizable"}}}, "/sidecar/config/consistency"),
        ({"sidecar": {"config": {"listen": "0.0.0.0:80"}}}, "additional properties 'listen'"),
        ({"sidecar": {"confg": {}}}, "additional properties 'confg'"),
        ({"sidecar": {"port": 70000}}, "/sidecar/port"),
        ({"externalZookeeper": {"connect": "zk1"}}, "/externalZookeeper/connect"),
        ({"externalZookeeper": {"connect": "zk1:2181,"}}, "/externalZookeeper/connect"),
        ({"zookeeper": {"replicas": 2}}, "/zookeeper/replicas"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"metrics": {"serviceMonitor": {"enable": True}}}, "additional properties 'enable'"),
        ({"metrics": {"serviceMonitor": {"interval": "30"}}}, "/metrics/serviceMonitor/interval"),
        ({"metrics": {"serviceMonitor": {"labels": {"release": "prom etheus"}}}}, "/metrics/serviceMonitor/labels"),
        ({"metrics": {"podSelector": {"app": 3}}}, "/metrics/podSelector/app"),
        ({"metrics": {"prometheusRule": {"seriesSelector": '{job="shop"}'}}}, "/metrics/prometheusRule/seriesSelector"),
        ({"metrics": {"prometheusRule": {"alertLabels": {"severity": "page"}}}}, "/metrics/prometheusRule/alertLabels"),
        ({"metrics": {"prometheusRule": {"alerts": {"inconsistent": {"window": "0m"}}}}}, "/inconsistent/window"),
        ({"metrics": {"prometheusRule": {"alerts": {"notReady": {"for": "2 min"}}}}}, "/notReady/for"),
        ({"metrics": {"prometheusRule": {"alerts": {"zooKeeperSlow": {"thresholdSeconds": 0}}}}}, "/thresholdSeconds"),
        ({"metrics": {"prometheusRule": {"alerts": {"lag": {}}}}}, "additional properties 'lag'"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmValuesError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"sidecar": {"config": {"max_bytes": "200Mi"}}},
            "sidecar.config.max_bytes=200Mi needs a memory limit of at least 314Mi",
        ),
        (
            {"sidecar": {"config": {"shutdown_timeout": "30s"}}},
            "shutdown_timeout=30s must be below sidecar.terminationGracePeriodSeconds=30",
        ),
        ({"sidecar": {"opsPort": 7070}}, "sidecar.port and sidecar.opsPort are both 7070"),
        (
            {"metrics": {"serviceMonitor": {"enabled": True, "interval": "1m30s", "scrapeTimeout": "1m31s"}}},
            "metrics.serviceMonitor.scrapeTimeout=1m31s exceeds interval=1m30s",
        ),
        (
            {"example": {"enabled": False}, "metrics": {"serviceMonitor": {"enabled": True}}},
            "metrics.serviceMonitor.enabled needs metrics.podSelector",
        ),
        ({"sidecar": {"zkTls": {"enabled": True}}}, "sidecar.zkTls.enabled needs sidecar.zkTls.secretName"),
        (
            {"zookeeper": {"enabled": True}, "sidecar": {"zkTls": {"enabled": True, "secretName": "s"}}},
            "the bundled ensemble has none",
        ),
        (
            {"metrics": {"prometheusRule": {"enabled": True}}},
            "without metrics.serviceMonitor.enabled needs metrics.prometheusRule.seriesSelector",
        ),
        (
            merged(
                MONITORING, {"metrics": {"prometheusRule": {"alerts": {a: {"enabled": False} for a in ALERT_KEYS}}}}
            ),
            "metrics.prometheusRule.enabled with every alert disabled",
        ),
    ],
)
def test_templates_refuse_settings_that_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmRenderError, match=re.escape(message)):
        render(values)


def test_zk_tls_and_the_origin_come_from_secrets() -> None:
    spec = pod_spec(render(VALUE_SETS["tls-and-origin-secret"]))
    sidecar = sidecar_of(spec)
    env = {item["name"]: item for item in sidecar["env"]}
    assert env["ZKCACHE_ORIGIN"]["valueFrom"]["secretKeyRef"] == {"name": "cache-origin", "key": "url"}
    assert [item["name"] for item in sidecar["env"]].count("ZKCACHE_ORIGIN") == 1, "config.origin must give way"
    assert env["ZKCACHE_ZK_TLS_CA"]["value"] == "/etc/zkcache/zk-tls/ca.crt"
    assert env["ZKCACHE_ZK_TLS_VERIFY"]["value"] == "true"
    [mount] = [m for m in sidecar["volumeMounts"] if m["mountPath"] == "/etc/zkcache/zk-tls"]
    assert mount["readOnly"] is True
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "zk-client-tls"
    assert {i["key"] for i in volume["secret"]["items"]} == {"ca.crt", "tls.crt", "tls.key"}
    without_cert = render({"sidecar": {"zkTls": {"enabled": True, "secretName": "ca-only", "certKey": ""}}})
    env = {item["name"] for item in sidecar_of(pod_spec(without_cert))["env"]}
    assert "ZKCACHE_ZK_TLS_CA" in env and "ZKCACHE_ZK_TLS_CERT" not in env
    # A public CA (an ACME issuer's Secret has no ca.crt): the image's trust store.
    public = render({"sidecar": {"zkTls": {"enabled": True, "secretName": "acme", "caKey": ""}}})
    env = {item["name"] for item in sidecar_of(pod_spec(public))["env"]}
    assert "ZKCACHE_ZK_TLS_CA" not in env and "ZKCACHE_ZK_TLS_CERT" in env
    [volume] = [v for v in pod_spec(public)["volumes"] if v["name"] == "zkcache-zk-tls"]
    assert {i["key"] for i in volume["secret"]["items"]} == {"tls.crt", "tls.key"}


def test_memory_check_accepts_a_limit_that_fits() -> None:
    values = {"sidecar": {"config": {"max_bytes": "200Mi"}, "resources": {"limits": {"memory": "314Mi"}}}}
    assert sidecar_of(pod_spec(render(values)))["resources"]["limits"]["memory"] == "314Mi"


# --- Monitoring: Prometheus Operator's ServiceMonitor and PrometheusRule.


def alert_rules(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    [rule] = of_kind(docs, "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    """The series selectors of ``expr``, which must parse as PromQL (with its functions' argument types)."""
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def equal_matchers(selector: promql_parser.VectorSelector) -> dict[str, str]:
    return {m.name: m.value for m in selector.matchers.matchers if m.op == promql_parser.MatchOp.Equal}


def ranges(expr: str) -> set[timedelta]:
    found: set[timedelta] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.MatrixSelector):
            found.add(node.range)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


class _Families(Collector):
    """Empty metric families of the given names and types, for prometheus_client to name their samples."""

    def __init__(self, families: dict[str, str]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for name, kind in self._families.items():
            if kind == "counter":
                yield CounterMetricFamily(name, name, value=0)
            elif kind == "gauge":
                yield GaugeMetricFamily(name, name, value=0)
            else:
                yield HistogramMetricFamily(name, name, buckets=[("+Inf", 0)], sum_value=0)


def scraped_names(families: dict[str, str]) -> set[str]:
    """The sample names a scrape of these families shows, as prometheus_client writes them."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    text = generate_latest(registry).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_monitoring_is_off_by_default() -> None:
    metrics = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]
    assert metrics["serviceMonitor"]["enabled"] is False and metrics["prometheusRule"]["enabled"] is False
    for name, values in VALUE_SETS.items():
        if name == "monitoring":
            continue
        docs = render(values)
        assert not [d for d in docs if d["kind"] in MONITORING_KINDS], name
        assert not [d for d in of_kind(docs, "Service") if "metrics" in d["metadata"]["name"]], name


def test_monitoring_objects_validate_against_prometheus_operator_crds() -> None:
    docs = render(MONITORING)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "PrometheusRule", "Service", "ServiceMonitor"]
    for doc in docs:
        if doc["kind"] in MONITORING_KINDS:
            assert (doc["apiVersion"], doc["kind"]) in CRDS, f"no vendored CRD for {doc['apiVersion']} {doc['kind']}"
            assert doc["metadata"]["labels"]["release"] == "prometheus", "the Prometheus' selector label is missing"
        validate(doc, NEWEST)


@pytest.mark.parametrize(
    ("kind", "breakage", "message"),
    [
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(scrapeTimout="10s"), "'scrapeTimout' was unexp"),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="30 s"), "'30 s' does not match"),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(scheme="tcp"), "'tcp' is not one of"),
        ("ServiceMonitor", lambda d: d["spec"].pop("selector"), "'selector' is a required property"),
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr"), "'expr' is a required property"),
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(For="5m"), "'For' was unexpected"),
        ("PrometheusRule", lambda d: d["spec"]["groups"].append(d["spec"]["groups"][0]), "duplicate entry"),
        ("PrometheusRule", lambda d: d["metadata"]["labels"].update(release=1), "1 is not of type 'string'"),
    ],
)
def test_crd_validation_catches_broken_objects(
    kind: str, breakage: Callable[[dict[str, Any]], object], message: str
) -> None:
    # The check is real: the vendored schemas, made strict, reject what the API server would refuse or prune.
    [doc] = of_kind(render(MONITORING), kind)
    breakage(doc)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        validate(doc, NEWEST)


def test_service_monitor_scrapes_the_sidecars_ops_port() -> None:
    docs = render(VALUE_SETS["monitoring"])  # the ZooKeeper ensemble's Services and pods too
    [monitor] = of_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["shop"]}
    # The Service it picks: the metrics one only, not ZooKeeper's.
    services = [
        s
        for s in of_kind(docs, "Service")
        if s["metadata"]["namespace"] == "shop"
        and labels_match(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == ["cache-zk-cache-sidecar-metrics"]
    [service] = services
    # Headless, and NotReady pods (a sidecar without ZooKeeper) still scraped.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    # The pods that Service picks: the sidecar's, not ZooKeeper's.
    workloads = [
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        and labels_match(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
    ]
    assert [w["kind"] for w in workloads] == ["Deployment"]
    # The port: ServiceMonitor endpoint -> Service port -> the sidecar's named container port -> ops_listen.
    sidecar = sidecar_of(pod_spec(workloads))
    [endpoint] = monitor["spec"]["endpoints"]
    [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    [container_port] = [p for p in sidecar["ports"] if p["name"] == port["targetPort"]]
    host, _, ops_port = rendered_env(sidecar, ZKCACHE_MEMBER_ID="pod-0")["ZKCACHE_OPS_LISTEN"].rpartition(":")
    assert container_port["containerPort"] == port["port"] == int(ops_port)
    assert host == "0.0.0.0", "Prometheus scrapes the pod IP: the metrics listener must not be loopback"
    assert (endpoint["scheme"], endpoint["path"], endpoint["interval"], endpoint["scrapeTimeout"]) == (
        "http",
        "/metrics",
        "30s",
        "10s",
    )


def test_service_monitor_for_the_sidecar_in_your_own_pods(tmp_path: Path) -> None:
    extra = (
        "  metrics:\n    podSelector: {app: shop}\n"
        "    serviceMonitor: {enabled: true}\n    prometheusRule: {enabled: true}\n"
    )
    docs = render({}, chart=parent_chart(tmp_path, extra))
    assert sorted(d["kind"] for d in docs) == ["Deployment", "PrometheusRule", "Service", "ServiceMonitor"]
    [service] = of_kind(docs, "Service")
    [deployment] = of_kind(docs, "Deployment")
    assert labels_match(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in sidecar_of(pod_spec(docs))["ports"]}
    for doc in docs:
        validate(doc, NEWEST)


def test_alert_expressions_parse_as_promql_and_read_the_scraped_series() -> None:
    docs = render(MONITORING)
    rules = alert_rules(docs)
    assert set(rules) == set(ALERT_METRICS) == set(ALERT_KEYS.values())
    # Prometheus Operator names the job after the Service the ServiceMonitor picks.
    [service] = of_kind(docs, "Service")
    release = {"namespace": "shop", "job": service["metadata"]["name"]}
    for alert, rule in rules.items():
        try:
            found = selectors(rule["expr"])
        except ValueError as exc:
            pytest.fail(f"{alert}: {rule['expr']!r} is not PromQL: {exc}")
        scraped = scraped_names(ALERT_METRICS[alert])
        assert {s.name for s in found} <= scraped, f"{alert} reads a series no scrape shows: {rule['expr']}"
        for family, kind in ALERT_METRICS[alert].items():
            assert {s.name for s in found} & scraped_names({family: kind}), f"{alert} does not read {family}"
        for selector in found:
            matchers = equal_matchers(selector)
            assert {k: matchers.get(k) for k in release} == release, f"{alert}: {selector} is not this release's"
            assert len(selector.matchers.matchers) == len(matchers), f"{alert}: {selector}: only = matchers expected"
        own = {k: v for s in found for k, v in equal_matchers(s).items() if k not in TARGET_LABELS}
        assert own == ({"result": "disagreed"} if alert == "ZkCacheInconsistent" else {}), alert
        assert rule["labels"]["severity"] and rule["labels"]["team"] == "cache"
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_thresholds_durations_and_labels_are_values() -> None:
    alerts: dict[str, dict[str, Any]] = {
        "notReady": {"for": "10m", "severity": "page"},
        "propagationLag": {"thresholdSeconds": 0.25, "window": "15m", "for": "1h", "severity": "ticket"},
        "inconsistent": {"window": "1h", "for": "1m", "severity": "page"},
        "zooKeeperSlow": {"thresholdSeconds": 2, "window": "30m", "for": "15m", "severity": "ticket"},
        "noHousekeeper": {"for": "1h30m", "severity": "ticket"},
    }
    values = merged(
        MONITORING,
        {
            "metrics": {
                "serviceMonitor": {"interval": "1m30s", "scrapeTimeout": "90s"},  # equal is fine
                "prometheusRule": {"seriesSelector": 'job="shop", namespace=~"shop|shop-canary"', "alerts": alerts},
            }
        },
    )
    docs = render(values)
    [endpoint] = of_kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("1m30s", "90s")
    rules = alert_rules(docs)
    for key, settings in alerts.items():
        rule = rules[ALERT_KEYS[key]]
        assert rule["for"] == settings["for"]
        assert rule["labels"] == {"severity": settings["severity"], "team": "cache"}
        window = {promql_parser.parse_duration(settings["window"])} if "window" in settings else set()
        assert ranges(rule["expr"]) == window, rule["expr"]
        comparison = promql_parser.parse(rule["expr"])
        assert isinstance(comparison, promql_parser.BinaryExpr) and isinstance(
            comparison.rhs, promql_parser.NumberLiteral
        )
        assert comparison.rhs.val == settings.get("thresholdSeconds", 0), rule["expr"]
        for selector in selectors(rule["expr"]):
            assert 'job="shop"' in str(selector) and 'namespace=~"shop|shop-canary"' in str(selector), rule["expr"]
    off = merged(MONITORING, {"metrics": {"prometheusRule": {"alerts": {"noHousekeeper": {"enabled": False}}}}})
    assert set(alert_rules(render(off))) == set(ALERT_KEYS.values()) - {"ZkCacheNoHousekeeper"}


def readme_snippet() -> str:
    text = (CHART / "README.md").read_text()
    match = re.search(r"<!-- snippet: pod-spec[^>]*-->\s*```yaml\n(.*?)```", text, re.S)
    assert match, "the chart README lost its pod-spec snippet"
    return match.group(1)


def parent_chart(tmp_path: Path, extra_values: str = "") -> Path:
    """A chart "shop" with this one as a dependency and the README's snippet in its Deployment (pods: app=shop)."""
    parent = tmp_path / "shop"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "zk-cache-sidecar")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: shop\nversion: 1.0.0\n"
        "dependencies:\n  - name: zk-cache-sidecar\n    version: 0.1.0\n    repository: file://../zk-cache-sidecar\n"
    )
    (parent / "values.yaml").write_text(
        "zk-cache-sidecar:\n  example: {enabled: false}\n  externalZookeeper: {connect: 'zk-0.zk:2181'}\n"
        + extra_values
    )
    (parent / "templates" / "deployment.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\nspec:\n"
        "  selector:\n    matchLabels: {app: shop}\n  template:\n    metadata:\n      labels: {app: shop}\n"
        + readme_snippet()
    )
    return parent


def test_readme_snippet_works_from_a_parent_chart(tmp_path: Path) -> None:
    docs = render({}, chart=parent_chart(tmp_path))
    assert [d["kind"] for d in docs] == ["Deployment"], "the example must be off in a parent chart"
    kubernetes_validate.validate(docs[0], NEWEST, strict=True)
    spec = pod_spec(docs)
    sidecar = sidecar_of(spec)
    assert sidecar in spec["initContainers"] and sidecar["restartPolicy"] == "Always"
    assert rendered_env(sidecar, ZKCACHE_MEMBER_ID="p")["ZKCACHE_ZK"] == "zk-0.zk:2181"


@contextmanager
def rendered_daemon(
    sidecar: dict[str, Any], tmp_path: Path, zk_hosts: str, **valued_from: str
) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon, started with the environment the chart renders for ``sidecar``."""
    env = rendered_env(sidecar, **valued_from)
    # Only what a cluster would supply differently: the ensemble's address, a
    # writable data dir, and loopback for the ops port (tests bind no wider).
    env |= {
        "ZKCACHE_ZK": zk_hosts,
        "ZKCACHE_ORIGIN": f"sqlite:///{tmp_path}/zkcache.db",
        "ZKCACHE_OPS_LISTEN": env["ZKCACHE_OPS_LISTEN"].replace("0.0.0.0", "127.0.0.1"),
    }
    with open(tmp_path / "sidecar.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
        )
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(15)


@pytest.mark.slow
def test_daemon_answers_probes_with_the_rendered_environment(
    tmp_path: Path, zk_server: LocalZooKeeper, namespace: str
) -> None:
    port, ops_port = free_port(), free_port()
    values = {"sidecar": {"port": port, "opsPort": ops_port, "config": {"namespace": namespace}}}
    sidecar = sidecar_of(pod_spec(render(values)))
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    with rendered_daemon(sidecar, tmp_path, zk_server.hosts, ZKCACHE_MEMBER_ID="cache-example-0") as proc:
        for kind in ("startup", "readiness", "liveness"):
            probe = sidecar[f"{kind}Probe"]["httpGet"]
            url = f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}"
            assert _eventually_200(url, proc), f"{kind} probe {url} never answered 200:\n{_tail(tmp_path)}"
        assert "ignoring" not in _tail(tmp_path), "the daemon warned about a rendered variable"


@pytest.mark.slow
def test_daemon_exposes_every_series_the_alerts_read(tmp_path: Path, zk_server: LocalZooKeeper, namespace: str) -> None:
    port, ops_port = free_port(), free_port()
    values = merged(
        MONITORING,
        {
            "sidecar": {
                "port": port,
                "opsPort": ops_port,
                "config": {"namespace": namespace},
                # The API wants a token; the metrics port must not (the ServiceMonitor sends none).
                "apiTokenSecret": {"name": "cache-api"},
            }
        },
    )
    docs = render(values)
    sidecar = sidecar_of(pod_spec(docs))
    [endpoint] = of_kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"]
    [service_port] = [p for p in of_kind(docs, "Service")[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    [container_port] = [p for p in sidecar["ports"] if p["name"] == service_port["targetPort"]]
    base = f"http://127.0.0.1:{container_port['containerPort']}"
    with rendered_daemon(
        sidecar, tmp_path, zk_server.hosts, ZKCACHE_MEMBER_ID="cache-example-0", ZKCACHE_AUTH_TOKEN="secret"
    ) as proc:
        assert _eventually_200(f"{base}/readyz", proc), f"never ready:\n{_tail(tmp_path)}"
        with urllib.request.urlopen(f"{base}{endpoint['path']}", timeout=5) as resp:
            text = resp.read().decode()
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    missing = []
    for alert, rule in alert_rules(docs).items():
        for selector in selectors(rule["expr"]):
            own = {k: v for k, v in equal_matchers(selector).items() if k not in TARGET_LABELS}
            if not any(s.name == selector.name and own.items() <= s.labels.items() for s in samples):
                missing.append(f"{alert}: {selector.name}{own or ''}")
    # A labelled series must be there (at 0) before it first counts, or increase() misses that first count.
    assert not missing, "series the alerts read that the daemon does not expose:\n" + "\n".join(missing)


def _eventually_200(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "sidecar.log").read_text(errors="replace")[-3000:]
