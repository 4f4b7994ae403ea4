"""deploy/k8s and the KEDA example, checked offline: every manifest against the real Kubernetes
schemas (strict: an unknown field fails), the scaler's Role against the very requests its backend
makes, the worker probes run against a real Redis, and the wiring between the objects."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from core import heartbeats
from core.catalog import Catalog, load_catalog
from core.heartbeats import WorkerBeat, WorkerState
from core.settings import Settings
from scaler.pools import named, pooled
from tests.conftest import ROOT
from tests.test_alerts import METRICS, find_promtool, metrics_in, run_promtool

kubernetes_validate = pytest.importorskip("kubernetes_validate")
kubernetes = pytest.importorskip("kubernetes")

K8S = ROOT / "deploy" / "k8s"
KEDA = ROOT / "deploy" / "keda-scaledobject.yaml"
# The oldest release the manifests need (the preStop `sleep` action is on by default from 1.30),
# and the newest the validator knows.
VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
# Settings of the model catalog, which another part of the work adds to core/settings.py.
PENDING_SETTINGS = {"DQ_MODELS", "DQ_WORKER_MODEL"}
NOT_OURS = {"POD_NAME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every object under deploy/k8s, with the file it comes from."""
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in documents(p)]


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def workers() -> dict[str, dict[str, Any]]:
    return {
        name: d
        for name, d in objects("Deployment").items()
        if pod_labels(d).get("app.kubernetes.io/component") == "worker"
    }


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container(deployment).get("env", [])}


# --- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    for file, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{file} {doc['kind']}/{doc['metadata']['name']}: {e.message}")


def test_strict_validation_catches_a_misspelt_field() -> None:
    gateway = copy.deepcopy(objects("Deployment")["dq-gateway"])
    spec = gateway["spec"]["template"]["spec"]["containers"][0]
    spec["readinesProbe"] = spec.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(gateway, VERSIONS[-1], strict=True)


def test_everything_lives_in_one_namespace_and_nothing_is_cluster_wide() -> None:
    kinds = {d["kind"] for _, d in manifests()}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    for file, doc in manifests():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "dq", file


# --- the scaler's permissions ------------------------------------------------------------------


REQUEST = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/v1)/namespaces/(?P<ns>[^/]+)/(?P<resource>[^/]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)


def attributes(method: str, path: str) -> tuple[str, str, str, str | None]:
    """(API group, resource[/subresource], verb, object name) of one request."""
    match = REQUEST.match(path)
    assert match, path
    resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
    verbs = {"GET": "get" if match["name"] else "list", "PATCH": "patch", "PUT": "update"}
    verbs |= {"POST": "create", "DELETE": "delete"}
    return match["group"] or "", resource, verbs[method], match["name"]


def allowed(rules: list[dict[str, Any]], request: tuple[str, str, str, str | None]) -> bool:
    group, resource, verb, name = request
    return any(
        group in rule["apiGroups"]
        and resource in rule["resources"]
        and verb in rule["verbs"]
        and (not rule.get("resourceNames") or name in rule["resourceNames"])
        for rule in rules
    )


@pytest.fixture
def backend_requests() -> Iterator[list[tuple[str, str, str, str | None]]]:
    """What KubernetesBackend asks a cluster for, driving every operation the scaler uses."""
    from scaler.backends import KubernetesBackend
    from tests.test_backends import FakeApi, recorded

    deployment = objects("Role")["dq-scaler"]["rules"][0]["resourceNames"][0]
    scale = f"/apis/apps/v1/namespaces/dq/deployments/{deployment}/scale"
    pods = "/api/v1/namespaces/dq/pods"
    routes = {
        ("GET", scale): lambda c, m: (200, recorded("k8s_scale.json")),
        ("PATCH", scale): lambda c, m: (200, recorded("k8s_scale.json")),
        ("GET", pods): lambda c, m: (200, recorded("k8s_pods.json")),
        ("PATCH", pods + r"/[\w-]+"): lambda c, m: (200, recorded("k8s_pods.json")["items"][0]),
    }
    with FakeApi(routes) as fake:
        configuration = kubernetes.client.Configuration()
        configuration.host = fake.url
        backend = KubernetesBackend(
            deployment, "dq", api_client=kubernetes.client.ApiClient(configuration)
        )
        backend.list_workers()
        backend.add(1)
        backend.drain("dq-worker-7d9c5b8f6-4kx2p")
        yield [attributes(c.method, c.path) for c in fake.calls]


def test_the_scaler_may_make_every_request_its_backend_makes(
    backend_requests: list[tuple[str, str, str, str | None]],
) -> None:
    rules = objects("Role")["dq-scaler"]["rules"]
    assert {(g, r, v) for g, r, v, _ in backend_requests} == {
        ("apps", "deployments/scale", "get"),
        ("apps", "deployments/scale", "patch"),
        ("", "pods", "list"),
        ("", "pods", "patch"),
    }
    for request in backend_requests:
        assert allowed(rules, request), request


def test_the_scaler_may_do_nothing_else(
    backend_requests: list[tuple[str, str, str, str | None]],
) -> None:
    used = {(g, r, v) for g, r, v, _ in backend_requests}
    for rule in objects("Role")["dq-scaler"]["rules"]:
        granted = {
            (g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
        }
        assert granted <= used, f"granted but never used: {sorted(granted - used)}"
        assert "*" not in str(rule)


def test_a_request_outside_the_role_is_refused() -> None:
    rules = objects("Role")["dq-scaler"]["rules"]
    other = ("apps", "deployments/scale", "patch", "dq-gateway")
    assert not allowed(rules, other)
    assert not allowed(rules, ("", "pods", "delete", "dq-worker-7d9c5b8f6-4kx2p"))


def test_the_scaler_runs_as_the_bound_account_on_the_worker_deployment() -> None:
    scaler = objects("Deployment")["dq-scaler"]
    binding = objects("RoleBinding")["dq-scaler"]
    account = scaler["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "dq-scaler",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "dq"}]
    assert account in objects("ServiceAccount")
    # A pool per catalog model, each one worker Deployment: the Role names exactly those.
    targets = [named(scaler_pattern(), m) for m in pooled(shipped_catalog(), "", scaler_pattern())]
    assert sorted(targets) == sorted(workers())
    assert objects("Role")["dq-scaler"]["rules"][0]["resourceNames"] == targets
    assert env_of(scaler)["DQ_SCALER_K8S_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }
    assert container(scaler)["args"][-2:] == ["--backend", "kubernetes"]


def scaler_pattern() -> str:
    """The scaler's DQ_SCALER_K8S_DEPLOYMENT."""
    return str(env_of(objects("Deployment")["dq-scaler"])["DQ_SCALER_K8S_DEPLOYMENT"]["value"])


def shipped_catalog() -> Catalog:
    """The catalog in ConfigMap dq-models, read by the loader the scaler uses."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "models.toml"
        path.write_text(objects("ConfigMap")["dq-models"]["data"]["models.toml"])
        return load_catalog(path, Settings())


def test_each_catalog_model_has_its_pool_bounds_for_the_scaler() -> None:
    catalog = shipped_catalog()
    for name, spec in catalog.models.items():
        assert 0 <= spec.min_workers <= spec.max_workers, name
        assert f"dq-worker-{name}" in workers(), f"model {name} has no worker Deployment"


def test_only_the_scaler_gets_an_api_token() -> None:
    for name, deployment in objects("Deployment").items():
        mounted = deployment["spec"]["template"]["spec"].get("automountServiceAccountToken", True)
        assert mounted == (name == "dq-scaler"), name


# --- workloads ---------------------------------------------------------------------------------


def test_each_deployment_selects_its_own_pods_only() -> None:
    deployments = objects("Deployment")
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]
        assert selects(selector, pod_labels(deployment)), name
        for other, theirs in deployments.items():
            assert other == name or not selects(selector, pod_labels(theirs)), (name, other)


def test_each_disruption_budget_and_service_covers_one_deployment() -> None:
    deployments = objects("Deployment")
    for kind in ("PodDisruptionBudget", "Service"):
        for name, obj in objects(kind).items():
            selector = obj["spec"]["selector"]
            selector = selector if "matchLabels" in selector else {"matchLabels": selector}
            hits = [d for d, dep in deployments.items() if selects(selector, pod_labels(dep))]
            assert hits == [name], f"{kind} {name} selects {hits}"
    assert set(objects("PodDisruptionBudget")) == {"dq-gateway", *workers()}


def test_the_gateway_is_probed_on_healthz_and_readyz() -> None:
    gateway = container(objects("Deployment")["dq-gateway"])
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["args"][gateway["args"].index("--port") + 1] == str(ports["http"])
    service = objects("Service")["dq-gateway"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}]


def test_a_worker_has_one_gpu_its_model_and_time_to_drain() -> None:
    defaults = Settings()
    assert workers()
    for name, deployment in workers().items():
        spec = deployment["spec"]["template"]["spec"]
        resources = container(deployment)["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        assert resources["limits"]["nvidia.com/gpu"] == "1", name
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > defaults.scaler_drain_timeout_s, name
        assert grace > defaults.loop_stale_s, name
        env = env_of(deployment)
        model = pod_labels(deployment)["diffusion-queue/model"]
        assert env["DQ_WORKER_MODEL"] == {"name": "DQ_WORKER_MODEL", "value": model}
        assert name == f"dq-worker-{model}"
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_a_worker_is_named_after_its_pod() -> None:
    for name, deployment in workers().items():
        args = container(deployment)["args"]
        assert args[:3] == ["python", "-m", "worker"]
        assert args[args.index("--name") + 1] == "$(POD_NAME)", name
        assert env_of(deployment)["POD_NAME"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.name"}
        }


def test_the_model_catalog_is_mounted_where_dq_models_points_and_names_each_model() -> None:
    config = objects("ConfigMap")["dq-config"]["data"]
    catalog_map = objects("ConfigMap")["dq-models"]
    path = Path(config["DQ_MODELS"])
    catalog = tomllib.loads(catalog_map["data"][path.name])
    readers = workers() | {"dq-scaler": objects("Deployment")["dq-scaler"]}
    for name, deployment in readers.items():
        mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        (volume,) = [
            v for v, spec in volumes.items() if spec.get("configMap") == {"name": "dq-models"}
        ]
        assert mounts[volume] == str(path.parent), name
        if name in workers():
            model = env_of(deployment)["DQ_WORKER_MODEL"]["value"]
            assert model in catalog.get("models", catalog), f"{model} is not in the catalog"


def probe_commands(deployment: dict[str, Any]) -> dict[str, list[str]]:
    spec = container(deployment)
    return {kind: spec[kind]["exec"]["command"] for kind in ("startupProbe", "livenessProbe")}


def run_probe(command: list[str], env: dict[str, str], pod: str) -> int:
    """The probe's command as the kubelet runs it in the pod: no shell around it, POD_NAME set."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    full = {**os.environ, **env, "POD_NAME": pod, "PATH": path}
    return subprocess.run(command, cwd=ROOT, env=full, capture_output=True, timeout=30).returncode


def test_the_worker_probes_pass_on_a_moving_loop_and_fail_on_a_stuck_one(
    env: dict[str, str], rclient: redis.Redis
) -> None:
    deployment = next(iter(workers().values()))
    pod = "dq-worker-sd15-7d9c5b8f6-4kx2p"
    node = f"celery@{pod}"  # what `python -m worker --name <pod>` beats as
    now = time.time()
    for loop_at, expected in [(now - 1, 0), (now - 3600, 1)]:
        beat = WorkerBeat(
            name=node, state=WorkerState.BUSY, started_at=now, at=now, loop_at=loop_at
        )
        heartbeats.publish(rclient, beat, ttl_s=30)
        for kind, command in probe_commands(deployment).items():
            assert run_probe(command, env, pod) == expected, (kind, loop_at)


def test_the_liveness_probe_leaves_workers_alone_while_redis_is_down(env: dict[str, str]) -> None:
    deployment = next(iter(workers().values()))
    down = {**env, "DQ_REDIS_URL": "redis://127.0.0.1:1/0"}
    commands = probe_commands(deployment)
    assert run_probe(commands["livenessProbe"], down, "any-pod") == 0
    assert run_probe(commands["startupProbe"], down, "any-pod") != 0


def test_commands_name_modules_that_exist() -> None:
    for name, deployment in objects("Deployment").items():
        commands = [container(deployment)["args"], *probe_commands_of(deployment)]
        for command in commands:
            text = " ".join(command)
            for module in re.findall(r"python -m ([\w.]+)", text):
                assert importlib.util.find_spec(module) is not None, (name, module)


def probe_commands_of(deployment: dict[str, Any]) -> list[list[str]]:
    spec = container(deployment)
    return [spec[k]["exec"]["command"] for k in spec if k.endswith("Probe") and "exec" in spec[k]]


def test_every_dq_variable_is_a_setting_and_every_value_parses() -> None:
    config = objects("ConfigMap")["dq-config"]["data"]
    secret = objects("Secret")["dq-secrets"]["stringData"]
    for name, deployment in objects("Deployment").items():
        refs = {
            ref.get("configMapRef", ref.get("secretRef"))["name"]
            for ref in container(deployment).get("envFrom", [])
        }
        assert refs == {"dq-config", "dq-secrets"}, name
        values = (
            config | secret | {k: e["value"] for k, e in env_of(deployment).items() if "value" in e}
        )
        for key in values:
            known = (
                key.startswith("DQ_") and key.removeprefix("DQ_").lower() in Settings.model_fields
            )
            assert known or key in PENDING_SETTINGS | NOT_OURS, f"{name}: {key} is no setting"
        fields = {
            k.removeprefix("DQ_").lower(): v
            for k, v in values.items()
            if k.startswith("DQ_") and k not in PENDING_SETTINGS
        }
        settings = Settings(**fields)  # type: ignore[arg-type]
        assert settings.redis_sentinels, name


def test_images_are_pinned_and_match_the_dockerfile_targets() -> None:
    for name, deployment in objects("Deployment").items():
        image = container(deployment)["image"]
        repository, _, tag = image.rpartition(":")
        assert tag not in ("", "latest"), name
        expected = "worker" if name in workers() else "api"
        assert repository.endswith(f"diffusion-queue-{expected}"), name


def test_containers_run_unprivileged() -> None:
    for name, deployment in objects("Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert container(deployment)["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }, name
        assert "memory" in container(deployment)["resources"]["limits"], name


def test_another_model_is_a_copy_with_its_name_swapped(tmp_path: Path) -> None:
    """The README's recipe for a second model makes valid objects that do not collide."""
    (original,) = K8S.glob("*worker*.yaml")
    model = next(iter(workers().values()))["metadata"]["labels"]["diffusion-queue/model"]
    copied = documents(original)
    swapped = yaml.safe_load_all(original.read_text().replace(model, "sdxl"))
    second = [d for d in swapped if d]
    for doc in second:
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
    first = next(d for d in copied if d["kind"] == "Deployment")
    other = next(d for d in second if d["kind"] == "Deployment")
    assert other["metadata"]["name"] == "dq-worker-sdxl"
    assert env_of(other)["DQ_WORKER_MODEL"]["value"] == "sdxl"
    assert not selects(first["spec"]["selector"], pod_labels(other))
    assert not selects(other["spec"]["selector"], pod_labels(first))
    budget = next(d for d in second if d["kind"] == "PodDisruptionBudget")
    assert not selects(budget["spec"]["selector"], pod_labels(first))


# --- KEDA --------------------------------------------------------------------------------------

KEDA_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}  # fmt: skip
PROMETHEUS_TRIGGER = {
    "serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
    "ignoreNullValues", "unsafeSsl", "queryParameters",
}  # fmt: skip


def keda() -> dict[str, Any]:
    (doc,) = documents(KEDA)
    return doc


def test_the_keda_object_is_a_scaled_object_on_a_worker_deployment() -> None:
    doc = keda()
    assert (doc["apiVersion"], doc["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert doc["metadata"]["namespace"] == "dq"
    spec = doc["spec"]
    assert set(spec) <= KEDA_SPEC
    assert spec["scaleTargetRef"]["name"] in workers()
    assert 0 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    for key in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[key], int), key


def test_the_keda_trigger_reads_the_backlog_of_the_model_it_scales() -> None:
    spec = keda()["spec"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    metadata = trigger["metadata"]
    assert set(metadata) <= PROMETHEUS_TRIGGER
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA metadata values are strings"
    assert float(metadata["threshold"]) > 0
    assert float(metadata["activationThreshold"]) >= 0
    assert metadata["ignoreNullValues"] == "false"  # no data must not read as an empty queue
    assert metrics_in(metadata["query"]) == {"dq_backlog_units"}
    assert "dq_backlog_units" in METRICS
    target = workers()[spec["scaleTargetRef"]["name"]]
    model = env_of(target)["DQ_WORKER_MODEL"]["value"]
    assert metadata["query"] == f'max(dq_backlog_units{{model="{model}"}})'


def test_the_keda_query_parses(tmp_path: Path) -> None:
    query = keda()["spec"]["triggers"][0]["metadata"]["query"]
    rule = {"record": "keda:backlog", "expr": query}
    path = tmp_path / "keda.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "keda", "rules": [rule]}]}))
    run_promtool(find_promtool(), "check", "rules", str(path), cwd=tmp_path)


def test_the_keda_scale_down_behaviour_is_a_valid_hpa_behaviour() -> None:
    """KEDA hands `horizontalPodAutoscalerConfig` to the HPA it creates: validate it as one."""
    behavior = keda()["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-dq-worker-sd15", "namespace": "dq"},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": "dq-worker-sd15",
            },
            "minReplicas": 1,
            "maxReplicas": 20,
            "behavior": behavior,
        },
    }
    kubernetes_validate.validate(hpa, VERSIONS[-1], strict=True)


def test_the_keda_object_is_not_applied_with_the_dq_scaler() -> None:
    assert KEDA.parent != K8S
