"""The Helm chart, rendered and validated offline.

Helm's own Go SDK (helm-python-sdk) lints and renders the chart, and
kubernetes-validate checks every rendered object in strict mode against the
oldest and newest Kubernetes API schemas the chart supports.  The daemon is
then started with exactly the environment the chart renders, so chart and
daemon cannot drift apart.
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
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, HelmRenderError, HelmValuesError, lint

from sidecar.config import load_config, settings_help, unknown_env_names
from sidecar.dev import LocalZooKeeper, free_port
from sidecar.dev.process import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "zk-cache-sidecar"
NEWEST = kubernetes_validate.latest_version()
OLDEST_NATIVE = "1.29.0"  # restartPolicy on init containers (native sidecars)
OLDEST_PLAIN = "1.25.0"  # the oldest schema kubernetes-validate carries

# Settings the chart fills in itself rather than from sidecar.config.
CHART_OWNED = {"zk", "listen", "ops_listen", "member_id", "zk_auth", "auth_token"}

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
    [container] = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "zk-cache-sidecar"]
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


def test_lint_is_clean() -> None:
    report = lint(str(CHART), strict=True)
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
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
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
def test_chart_and_daemon_agree_on_every_setting(name: str) -> None:
    sidecar = sidecar_of(pod_spec(render(VALUE_SETS[name])))
    env = rendered_env(
        sidecar, ZKCACHE_MEMBER_ID="cache-example-7d9f-x2x4z", ZKCACHE_ZK_AUTH="digest:app:pw", ZKCACHE_AUTH_TOKEN="t"
    )
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
    ],
)
def test_templates_refuse_settings_that_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmRenderError, match=re.escape(message)):
        render(values)


def test_memory_check_accepts_a_limit_that_fits() -> None:
    values = {"sidecar": {"config": {"max_bytes": "200Mi"}, "resources": {"limits": {"memory": "314Mi"}}}}
    assert sidecar_of(pod_spec(render(values)))["resources"]["limits"]["memory"] == "314Mi"


def readme_snippet() -> str:
    text = (CHART / "README.md").read_text()
    match = re.search(r"<!-- snippet: pod-spec[^>]*-->\s*```yaml\n(.*?)```", text, re.S)
    assert match, "the chart README lost its pod-spec snippet"
    return match.group(1)


def test_readme_snippet_works_from_a_parent_chart(tmp_path: Path) -> None:
    parent = tmp_path / "shop"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "zk-cache-sidecar")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: shop\nversion: 1.0.0\n"
        "dependencies:\n  - name: zk-cache-sidecar\n    version: 0.1.0\n    repository: file://../zk-cache-sidecar\n"
    )
    (parent / "values.yaml").write_text(
        "zk-cache-sidecar:\n  example: {enabled: false}\n  externalZookeeper: {connect: 'zk-0.zk:2181'}\n"
    )
    (parent / "templates" / "deployment.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\nspec:\n"
        "  selector:\n    matchLabels: {app: shop}\n  template:\n    metadata:\n      labels: {app: shop}\n"
        + readme_snippet()
    )
    docs = render({}, chart=parent)
    assert [d["kind"] for d in docs] == ["Deployment"], "the example must be off in a parent chart"
    kubernetes_validate.validate(docs[0], NEWEST, strict=True)
    spec = pod_spec(docs)
    sidecar = sidecar_of(spec)
    assert sidecar in spec["initContainers"] and sidecar["restartPolicy"] == "Always"
    assert rendered_env(sidecar, ZKCACHE_MEMBER_ID="p")["ZKCACHE_ZK"] == "zk-0.zk:2181"


@pytest.mark.slow
def test_daemon_answers_probes_with_the_rendered_environment(
    tmp_path: Path, zk_server: LocalZooKeeper, namespace: str
) -> None:
    port, ops_port = free_port(), free_port()
    values = {"sidecar": {"port": port, "opsPort": ops_port, "config": {"namespace": namespace}}}
    sidecar = sidecar_of(pod_spec(render(values)))
    env = rendered_env(sidecar, ZKCACHE_MEMBER_ID="cache-example-0")
    # Only what a cluster would supply differently: the ensemble's address, a
    # writable data dir, and loopback for the ops port (tests bind no wider).
    env |= {
        "ZKCACHE_ZK": zk_server.hosts,
        "ZKCACHE_ORIGIN": f"sqlite:///{tmp_path}/zkcache.db",
        "ZKCACHE_OPS_LISTEN": env["ZKCACHE_OPS_LISTEN"].replace("0.0.0.0", "127.0.0.1"),
    }
    log = open(tmp_path / "sidecar.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar"], env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
    )
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    try:
        for kind in ("startup", "readiness", "liveness"):
            probe = sidecar[f"{kind}Probe"]["httpGet"]
            url = f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}"
            assert _eventually_200(url, proc), f"{kind} probe {url} never answered 200:\n{_tail(tmp_path)}"
        assert "ignoring" not in _tail(tmp_path), "the daemon warned about a rendered variable"
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


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
