"""Scale backends against fake Docker and Kubernetes API servers that answer recorded responses.

No Docker engine or cluster runs here, so each fake serves JSON shaped like the real API's
(Docker Engine API 1.45 and compose v2 labels; Kubernetes apps/v1 and core/v1) through the real
SDKs, and records what the backend asked for: paths, queries, bodies and content types.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import requests
import urllib3

from core import heartbeats, keys
from core.errors import ConfigError
from core.recovery import Recovery, RecoveryConfig
from core.settings import Settings
from scaler.__main__ import backends_of
from scaler.backends import (
    DELETION_COST,
    NUMBER,
    SERVICE,
    DockerBackend,
    KubernetesBackend,
    WorkerHandle,
)
from scaler.loop import ControlLoop, Lock
from scaler.policy import PolicyConfig
from scaler.pools import Pool, named
from scaler.signals import Reading
from tests.test_store import claim, store_with, submit

docker = pytest.importorskip("docker")
kubernetes = pytest.importorskip("kubernetes")

FIXTURES = Path(__file__).parent / "fixtures"
W1 = "84464c930e5f3760667c3aa2e48627b62fb9f5f2dd23193a984b8748a54b9277"
W2 = "1ee70e52fbd4fa418fd68328275d3a920596063f6e0c6ee6417c87bf00258d4c"
NEW = "49b9890697462d298f1c0ee337a86781054d5c24c904deca4f04945508baf075"


def recorded(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@dataclass(frozen=True)
class Call:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    content_type: str | None


Reply = tuple[int, Any]
Route = Callable[[Call, re.Match[str]], Reply]


class FakeApi:
    """An HTTP server on 127.0.0.1 that answers from routes and keeps every request."""

    def __init__(self, routes: dict[tuple[str, str], Route]) -> None:
        self.routes = routes
        self.calls: list[Call] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeApi:
        serve = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        serve.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, call: Call) -> Reply:
        self.calls.append(call)
        for (method, pattern), route in self.routes.items():
            match = re.fullmatch(pattern, call.path)
            if method == call.method and match:
                return route(call, match)
        return 404, {"message": f"no route for {call.method} {call.path}"}

    def requests(self, method: str | None = None) -> list[tuple[str, str]]:
        return [(c.method, c.path) for c in self.calls if method in (None, c.method)]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                call = Call(
                    self.command,
                    url.path,
                    parse_qs(url.query),
                    json.loads(raw) if raw else None,
                    self.headers.get("Content-Type"),
                )
                status, body = fake.answer(call)
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            # http.server dispatches on these names.
            do_GET = do_POST = do_PATCH = do_DELETE = handle_one  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        return Handler


# --- Docker -----------------------------------------------------------------------------------

API = r"/v1\.45"


def docker_routes(
    containers: list[dict[str, Any]],
    stop_gate: threading.Event,
    inspect: dict[str, Any] | None = None,
) -> dict[tuple[str, str], Route]:
    inspect = inspect or recorded("docker_inspect.json")

    def listing(call: Call, _: re.Match[str]) -> Reply:
        every = call.query.get("all") == ["1"]
        # The engine keeps the containers carrying every label the filter names.
        wanted = json.loads(call.query.get("filters", ["{}"])[0]).get("label", [])
        labelled = [c for c in containers if all(_has(c["Labels"], label) for label in wanted)]
        return 200, [c for c in labelled if every or c["State"] == "running"]

    def created(call: Call, _: re.Match[str]) -> Reply:
        number = call.query["name"][0].rsplit("-", 1)[1]
        reply = recorded("docker_create.json")
        return 201, reply | {"Id": reply["Id"][:-2] + number.zfill(2)}

    def stopped(call: Call, _: re.Match[str]) -> Reply:
        stop_gate.wait(5)
        return 204, None

    return {
        ("GET", r"/version"): lambda c, m: (200, recorded("docker_version.json")),
        ("GET", API + r"/containers/json"): listing,
        ("GET", API + r"/containers/(\w+)/json"): lambda c, m: (200, inspect[m[1]]),
        ("POST", API + r"/containers/create"): created,
        ("POST", API + r"/containers/(\w+)/start"): lambda c, m: (204, None),
        ("POST", API + r"/containers/(\w+)/stop"): stopped,
        ("DELETE", API + r"/containers/(\w+)"): lambda c, m: (204, None),
    }


def _has(labels: dict[str, str], label: str) -> bool:
    key, _, value = label.partition("=")
    return labels.get(key) == value


@pytest.fixture
def stop_gate() -> threading.Event:
    gate = threading.Event()
    gate.set()
    return gate


@pytest.fixture
def docker_api(stop_gate: threading.Event) -> Iterator[FakeApi]:
    with FakeApi(docker_routes(recorded("docker_containers.json"), stop_gate)) as fake:
        yield fake


def docker_backend(fake: FakeApi, **options: Any) -> DockerBackend:
    base_url = fake.url.replace("http://", "tcp://")
    return DockerBackend("diffusion-queue", "worker", base_url=base_url, **options)


COMPOSE_FILTER = {
    "label": [
        "com.docker.compose.project=diffusion-queue",
        "com.docker.compose.service=worker",
        "com.docker.compose.oneoff=False",
    ]
}


def test_docker_lists_the_service_replicas(docker_api: FakeApi) -> None:
    assert docker_backend(docker_api).list_workers() == [
        WorkerHandle(W2, W2[:12]),
        WorkerHandle(W1, W1[:12]),
    ]
    listing = next(c for c in docker_api.calls if c.path.endswith("/containers/json"))
    assert json.loads(listing.query["filters"][0]) == COMPOSE_FILTER
    assert listing.query["all"] == ["0"]


def expected_create(number: int, device_request: dict[str, Any]) -> dict[str, Any]:
    """The create body a replica copied from worker-1 must carry."""
    template = recorded("docker_inspect.json")[W1]
    config = template["Config"]
    return {
        "Image": "diffusion-queue-worker",
        "Entrypoint": ["dq"],
        "Cmd": ["worker"],
        "Env": config["Env"],
        "WorkingDir": "/app",
        "Labels": config["Labels"] | {"com.docker.compose.container-number": str(number)},
        "Healthcheck": config["Healthcheck"],
        "StopSignal": "SIGTERM",
        "StopTimeout": 150,
        "HostConfig": template["HostConfig"] | {"DeviceRequests": [device_request]},
        "NetworkingConfig": {
            "EndpointsConfig": {"diffusion-queue_default": {"Aliases": ["worker"]}}
        },
    }


def gpu_request(**fields: Any) -> dict[str, Any]:
    base = {"Driver": "", "Count": 0, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    return base | fields


def creates(fake: FakeApi) -> list[tuple[str, dict[str, Any]]]:
    """(name, body) of each create call, the SDK's unset defaults left out."""
    return [
        (c.query["name"][0], {k: v for k, v in c.body.items() if v not in (None, False)})
        for c in fake.calls
        if c.path.endswith("/containers/create")
    ]


def test_docker_add_copies_a_replica_onto_free_gpus(docker_api: FakeApi) -> None:
    docker_backend(docker_api, gpu_ids=("0", "1", "2", "3")).add(2)
    assert creates(docker_api) == [
        ("diffusion-queue-worker-3", expected_create(3, gpu_request(DeviceIDs=["2"]))),
        ("diffusion-queue-worker-4", expected_create(4, gpu_request(DeviceIDs=["3"]))),
    ]
    assert docker_api.requests("POST")[-1] == ("POST", f"/v1.45/containers/{NEW[:-2]}04/start")
    assert ("POST", f"/v1.45/containers/{NEW[:-2]}03/start") in docker_api.requests("POST")


def test_docker_add_without_gpu_ids_asks_for_a_count(docker_api: FakeApi) -> None:
    docker_backend(docker_api, gpus_per_worker=1).add(1)
    assert creates(docker_api) == [
        ("diffusion-queue-worker-3", expected_create(3, gpu_request(Count=1))),
    ]


def test_docker_add_starts_none_when_every_gpu_is_taken(docker_api: FakeApi) -> None:
    docker_backend(docker_api, gpu_ids=("0", "1")).add(1)
    assert creates(docker_api) == []


def test_docker_add_needs_a_replica_to_copy(stop_gate: threading.Event) -> None:
    with FakeApi(docker_routes([], stop_gate)) as fake, pytest.raises(ConfigError) as caught:
        docker_backend(fake).add(1)
    assert "docker compose up -d worker" in str(caught.value)


def test_docker_drain_stops_gracefully_then_removes(
    docker_api: FakeApi, stop_gate: threading.Event
) -> None:
    backend = docker_backend(docker_api)
    stop_gate.clear()
    backend.drain(W2)
    assert WorkerHandle(W2, W2[:12], stopping=True) in backend.list_workers()
    stop_gate.set()
    backend.wait_drained(5)
    stop = next(c for c in docker_api.calls if c.path.endswith("/stop"))
    assert (stop.path, stop.query["t"]) == (f"/v1.45/containers/{W2}/stop", ["150"])
    assert docker_api.requests("DELETE") == [("DELETE", f"/v1.45/containers/{W2}")]
    # Done draining: no longer marked (the recorded listing itself does not change).
    assert WorkerHandle(W2, W2[:12]) in backend.list_workers()


def test_docker_drain_keeps_the_last_replica_as_the_template(stop_gate: threading.Event) -> None:
    last = [c for c in recorded("docker_containers.json") if c["Id"] == W1]
    with FakeApi(docker_routes(last, stop_gate)) as fake:
        backend = docker_backend(fake)
        backend.drain(W1)
        backend.wait_drained(5)
    assert fake.requests("POST")[-1] == ("POST", f"/v1.45/containers/{W1}/stop")
    assert fake.requests("DELETE") == []


def two_services() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The recorded replicas as one of service worker-sd15 (W1) and one of worker-sdxl (W2)."""
    containers, inspect = recorded("docker_containers.json"), recorded("docker_inspect.json")
    for summary in containers:
        model = "sd15" if summary["Id"] == W1 else "sdxl"
        for labels in (summary["Labels"], inspect[summary["Id"]]["Config"]["Labels"]):
            labels |= {SERVICE: f"worker-{model}", NUMBER: "1"}
        inspect[summary["Id"]]["Config"]["Env"].append(f"DQ_WORKER_MODEL={model}")
    return containers, inspect


def test_docker_pools_scale_a_service_per_model(
    stop_gate: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    containers, inspect = two_services()
    with FakeApi(docker_routes(containers, stop_gate, inspect)) as fake:
        # The scaler's own construction: DQ_SCALER_DOCKER_SERVICE, docker.from_env().
        monkeypatch.setenv("DOCKER_HOST", fake.url.replace("http://", "tcp://"))
        settings = Settings(scaler_docker_service="worker-{model}")
        backend_for, pattern, processes = backends_of("docker", settings)
        sd15, sdxl = backend_for("sd15"), backend_for("sdxl")
        assert (pattern, processes) == ("worker-{model}", None)
        assert sd15.list_workers() == [WorkerHandle(W1, W1[:12])]
        assert sdxl.list_workers() == [WorkerHandle(W2, W2[:12])]
        sd15.add(1)
        sdxl.drain(W2)  # its service's last container: kept, stopped, as sdxl's template
        assert isinstance(sdxl, DockerBackend)
        sdxl.wait_drained(5)
    ((name, body),) = creates(fake)
    assert name == "diffusion-queue-worker-sd15-2"
    assert body["Labels"][SERVICE] == "worker-sd15"
    assert body["Labels"][NUMBER] == "2"
    assert "DQ_WORKER_MODEL=sd15" in body["Env"]
    assert body["NetworkingConfig"]["EndpointsConfig"] == {
        "diffusion-queue_default": {"Aliases": ["worker-sd15"]}
    }
    assert ("POST", f"/v1.45/containers/{W2}/stop") in fake.requests("POST")
    assert fake.requests("DELETE") == []


# --- Kubernetes -------------------------------------------------------------------------------

SCALE = "/apis/apps/v1/namespaces/dq/deployments/dq-worker/scale"
PODS = "/api/v1/namespaces/dq/pods"
MERGE = "application/strategic-merge-patch+json"


class Cluster:
    """The slice of a cluster the backend touches: one Deployment's scale, its pods."""

    def __init__(self, *, forbid_scaling: bool = False) -> None:
        self.scale = recorded("k8s_scale.json")
        self.pods = recorded("k8s_pods.json")
        self.forbid_scaling = forbid_scaling

    def routes(self) -> dict[tuple[str, str], Route]:
        return {
            ("GET", SCALE): lambda c, m: (200, self.scale),
            ("PATCH", SCALE): self.patch_scale,
            ("GET", PODS): lambda c, m: (200, self.pods),
            ("PATCH", PODS + r"/([\w-]+)"): self.patch_pod,
        }

    def patch_scale(self, call: Call, _: re.Match[str]) -> Reply:
        if self.forbid_scaling:
            return 403, recorded("k8s_forbidden.json")
        self.scale = copy.deepcopy(self.scale)
        self.scale["spec"]["replicas"] = call.body["spec"]["replicas"]
        return 200, self.scale

    def patch_pod(self, call: Call, match: re.Match[str]) -> Reply:
        pod = next(p for p in self.pods["items"] if p["metadata"]["name"] == match[1])
        patched = copy.deepcopy(pod)
        notes = patched["metadata"].setdefault("annotations", {})
        for key, value in call.body["metadata"]["annotations"].items():
            notes.pop(key, None) if value is None else notes.__setitem__(key, value)
        return 200, patched


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


@pytest.fixture
def k8s_api(cluster: Cluster) -> Iterator[FakeApi]:
    with FakeApi(cluster.routes()) as fake:
        yield fake


def k8s_backend(fake: FakeApi, **options: Any) -> KubernetesBackend:
    configuration = kubernetes.client.Configuration()
    configuration.host = fake.url
    api_client = kubernetes.client.ApiClient(configuration)
    return KubernetesBackend("dq-worker", "dq", api_client=api_client, **options)


def test_k8s_lists_running_and_pending_pods(k8s_api: FakeApi) -> None:
    assert k8s_backend(k8s_api).list_workers() == [
        WorkerHandle("dq-worker-7d9c5b8f6-4kx2p", "dq-worker-7d9c5b8f6-4kx2p"),
        WorkerHandle("dq-worker-7d9c5b8f6-9zq7m", "dq-worker-7d9c5b8f6-9zq7m", stopping=True),
        WorkerHandle("dq-worker-7d9c5b8f6-h5w8r", "dq-worker-7d9c5b8f6-h5w8r"),
    ]
    pods = next(c for c in k8s_api.calls if c.path == PODS)
    assert pods.query["labelSelector"] == [
        "app.kubernetes.io/component=worker,app.kubernetes.io/name=diffusion-queue"
    ]


def test_k8s_add_patches_the_scale_subresource(k8s_api: FakeApi, cluster: Cluster) -> None:
    k8s_backend(k8s_api).add(2)
    assert [(c.method, c.path, c.body, c.content_type) for c in k8s_api.calls] == [
        ("GET", SCALE, None, "application/json"),
        ("PATCH", SCALE, {"spec": {"replicas": 5}}, MERGE),
    ]
    assert cluster.scale["spec"]["replicas"] == 5


def test_k8s_drain_marks_the_pod_cheapest_then_scales_down(k8s_api: FakeApi) -> None:
    k8s_backend(k8s_api).drain("dq-worker-7d9c5b8f6-4kx2p")
    assert [(c.method, c.path, c.body, c.content_type) for c in k8s_api.calls] == [
        ("GET", SCALE, None, "application/json"),
        (
            "PATCH",
            f"{PODS}/dq-worker-7d9c5b8f6-4kx2p",
            {"metadata": {"annotations": {DELETION_COST: "-1000"}}},
            MERGE,
        ),
        ("PATCH", SCALE, {"spec": {"replicas": 2}}, MERGE),
    ]


def test_k8s_drain_unmarks_the_pod_when_scaling_is_refused() -> None:
    cluster = Cluster(forbid_scaling=True)
    with FakeApi(cluster.routes()) as fake:
        with pytest.raises(kubernetes.client.ApiException) as caught:
            k8s_backend(fake).drain("dq-worker-7d9c5b8f6-4kx2p")
        assert caught.value.status == 403
    marks = [c.body for c in fake.calls if c.path.startswith(f"{PODS}/")]
    assert marks == [
        {"metadata": {"annotations": {DELETION_COST: "-1000"}}},
        {"metadata": {"annotations": {DELETION_COST: None}}},
    ]


class ModelCluster:
    """Two models' worker Deployments, dq-worker-sd15 (2 pods) and dq-worker-sdxl (none yet)."""

    def __init__(self) -> None:
        pods = recorded("k8s_pods.json")
        self.scales: dict[str, dict[str, Any]] = {}
        for model, replicas in (("sd15", 2), ("sdxl", 0)):
            scale = copy.deepcopy(recorded("k8s_scale.json"))
            scale["metadata"]["name"] = f"dq-worker-{model}"
            scale["spec"]["replicas"] = scale["status"]["replicas"] = replicas
            scale["status"]["selector"] += f",diffusion-queue/model={model}"
            self.scales[model] = scale
        self.pods = copy.deepcopy(pods)
        for pod in self.pods["items"]:
            pod["metadata"]["labels"]["diffusion-queue/model"] = "sd15"

    def routes(self) -> dict[tuple[str, str], Route]:
        scale = r"/apis/apps/v1/namespaces/dq/deployments/dq-worker-([\w-]+)/scale"
        return {
            ("GET", scale): lambda c, m: (200, self.scales[m[1]]),
            ("PATCH", scale): self.patch_scale,
            ("GET", PODS): self.list_pods,
            ("PATCH", PODS + r"/([\w-]+)"): lambda c, m: (200, self.pods["items"][0]),
        }

    def patch_scale(self, call: Call, match: re.Match[str]) -> Reply:
        self.scales[match[1]]["spec"]["replicas"] = call.body["spec"]["replicas"]
        return 200, self.scales[match[1]]

    def list_pods(self, call: Call, _: re.Match[str]) -> Reply:
        """Pods matching an equality-based selector, as the API server filters them."""
        wanted = call.query["labelSelector"][0].split(",")
        items = [
            p for p in self.pods["items"] if all(_has(p["metadata"]["labels"], w) for w in wanted)
        ]
        return 200, self.pods | {"items": items}


def test_k8s_pools_scale_a_deployment_per_model() -> None:
    cluster = ModelCluster()
    with FakeApi(cluster.routes()) as fake:
        configuration = kubernetes.client.Configuration()
        configuration.host = fake.url
        api_client = kubernetes.client.ApiClient(configuration)
        sd15, sdxl = (
            KubernetesBackend(named("dq-worker-{model}", m), "dq", api_client=api_client)
            for m in ("sd15", "sdxl")
        )
        assert [h.id for h in sd15.list_workers()] == [
            "dq-worker-7d9c5b8f6-4kx2p",
            "dq-worker-7d9c5b8f6-9zq7m",
            "dq-worker-7d9c5b8f6-h5w8r",
        ]
        assert sdxl.list_workers() == []
        sdxl.add(1)
        sd15.drain("dq-worker-7d9c5b8f6-4kx2p")
    assert {m: s["spec"]["replicas"] for m, s in cluster.scales.items()} == {"sd15": 1, "sdxl": 1}
    patched = [(c.path, c.body) for c in fake.calls if c.method == "PATCH" and "scale" in c.path]
    assert patched == [
        ("/apis/apps/v1/namespaces/dq/deployments/dq-worker-sdxl/scale", {"spec": {"replicas": 1}}),
        ("/apis/apps/v1/namespaces/dq/deployments/dq-worker-sd15/scale", {"spec": {"replicas": 1}}),
    ]


# --- A hung API server ---------------------------------------------------------------------------


@pytest.fixture
def hung() -> Iterator[threading.Event]:
    """Set at the end of the test: until then, a hanging route never answers."""
    release = threading.Event()
    yield release
    release.set()


def hangs(release: threading.Event) -> Route:
    """A route that accepts the request and answers nothing until released."""

    def route(call: Call, _: re.Match[str]) -> Reply:
        release.wait(60)
        return 503, {"message": "too late"}

    return route


def test_every_docker_call_has_a_deadline(
    stop_gate: threading.Event, hung: threading.Event
) -> None:
    routes = docker_routes(recorded("docker_containers.json"), stop_gate)
    routes[("GET", API + r"/containers/json")] = hangs(hung)
    with FakeApi(routes) as fake:
        backend = docker_backend(fake, timeout_s=0.5)
        start = time.monotonic()
        with pytest.raises(requests.exceptions.Timeout):
            backend.list_workers()
    assert time.monotonic() - start < 3


K8S_CALLS: dict[str, Callable[[KubernetesBackend], object]] = {
    "list": lambda b: b.list_workers(),
    "add": lambda b: b.add(1),
    "drain": lambda b: b.drain("dq-worker-7d9c5b8f6-4kx2p"),
}


@pytest.mark.parametrize("operation", sorted(K8S_CALLS))
def test_every_kubernetes_call_has_a_deadline(operation: str, hung: threading.Event) -> None:
    routes = Cluster().routes()
    routes[("GET", SCALE)] = hangs(hung)
    with FakeApi(routes) as fake:
        backend = k8s_backend(fake, timeout_s=0.5)
        start = time.monotonic()
        with pytest.raises(urllib3.exceptions.HTTPError):  # a read timeout, retried or not
            K8S_CALLS[operation](backend)
    assert time.monotonic() - start < 5


def control_loop(rclient: redis.Redis, backend: Any, interval_s: float) -> ControlLoop:
    """The scaler's loop on the test's Redis, offering the sweep every tick."""
    store = store_with(rclient, margin=2)
    recovery = Recovery(rclient, store, RecoveryConfig(heartbeat_ttl_s=1.0, interval_s=0.01))
    policy = PolicyConfig(min_workers=0, max_workers=10, interval_s=interval_s)
    pool = Pool("m", backend, policy, Reading("m", heartbeat_ttl_s=1.0))
    return ControlLoop(rclient, [pool], recovery, interval_s)


def test_a_hung_engine_does_not_stop_the_scalers_recovery(
    rclient: redis.Redis, stop_gate: threading.Event, hung: threading.Event
) -> None:
    routes = docker_routes(recorded("docker_containers.json"), stop_gate)
    listed = threading.Event()

    def hang_once_listed(call: Call, match: re.Match[str]) -> Reply:
        listed.set()
        return hangs(hung)(call, match)

    routes[("GET", API + r"/containers/json")] = hang_once_listed
    with FakeApi(routes) as fake:
        loop = control_loop(rclient, docker_backend(fake, timeout_s=0.5), interval_s=0.1)
        ticking = threading.Thread(target=loop.run, daemon=True)
        ticking.start()
        try:
            assert listed.wait(10)  # a tick is stuck in the engine now
            store = store_with(rclient, margin=2)
            job_id = submit(store)
            assert claim(store, job_id) == 1
            rclient.zadd(keys.RUNNING, {job_id: time.time() - 1})  # its worker died
            deadline = time.monotonic() + 10
            while rclient.hget(keys.job(job_id), "status") != "queued":
                assert time.monotonic() < deadline, "no sweep ran after the engine hung"
                time.sleep(0.05)
        finally:
            loop.stop()
            ticking.join(5)
    assert not ticking.is_alive()


def test_a_scaler_that_lost_its_lock_mid_tick_applies_nothing(
    rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = Cluster()
    routes = cluster.routes()
    list_pods = routes[("GET", PODS)]
    rival = Lock(rclient, ttl_s=10)
    steal = threading.Event()

    def slow_listing(call: Call, match: re.Match[str]) -> Reply:
        if steal.is_set():  # the tick took longer than the lock's TTL; another scaler took it
            rclient.delete(keys.SCALER_LOCK)
            assert rival.hold()
        return list_pods(call, match)

    routes[("GET", PODS)] = slow_listing
    store = store_with(rclient, margin=2)
    for _ in range(40):
        submit(store)  # work for five workers, two run
    with FakeApi(routes) as fake:
        loop = control_loop(rclient, k8s_backend(fake), interval_s=1.0)
        steal.set()
        assert loop.tick() is None
        assert fake.requests("PATCH") == []
        assert heartbeats.scaler_status(rclient) is None
        assert "lost the scaler lock during the tick" in caplog.text
        rival.release()
        steal.clear()
        decisions = loop.tick()  # the same tick, the lock kept: it applies
        assert decisions is not None
        assert decisions["m"].desired == 5
        assert fake.requests("PATCH") == [("PATCH", SCALE)]
