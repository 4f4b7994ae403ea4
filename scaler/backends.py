"""Where workers run: one protocol, and its Docker and Kubernetes implementations."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from core.errors import ConfigError

log = logging.getLogger(__name__)

# Compose's own labels (docker/compose pkg/api/labels.go); replicas we start carry them too.
PROJECT = "com.docker.compose.project"
SERVICE = "com.docker.compose.service"
NUMBER = "com.docker.compose.container-number"
ONEOFF = "com.docker.compose.oneoff"
REPLACE = "com.docker.compose.replace"
# Lower is deleted first when a ReplicaSet scales down (KEP-2255, on by default since 1.22).
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
CONNECT_TIMEOUT_S = 5.0  # the longest wait to open a connection to a Kubernetes API server
# Network modes that are not a network to attach to by name.
BUILTIN_NETWORKS = {"default", "bridge", "host", "none"}


@dataclass(frozen=True)
class WorkerHandle:
    """One worker as its backend knows it."""

    id: str  # what `drain` takes: a container id, a pod name, a pid
    hostname: str  # the host name in its Celery heartbeats, to join the two
    stopping: bool = False  # a drain is under way


class ScaleBackend(Protocol):
    """What the control loop needs from wherever workers run."""

    def list_workers(self) -> list[WorkerHandle]:
        """Every worker running or starting, the ones draining marked `stopping`."""
        ...

    def add(self, n: int) -> None:
        """Launch `n` more workers; returns once launched, not once they serve."""
        ...

    def drain(self, worker_id: str) -> None:
        """Start a graceful stop (finish the batch, return the buffer, exit); returns at once."""
        ...


class DockerBackend:
    """Replicas of a compose project's worker service, through the Docker Engine API."""

    def __init__(
        self,
        project: str,
        service: str = "worker",
        *,
        base_url: str | None = None,  # the engine's address; default: DOCKER_HOST or the socket
        timeout_s: float = 30.0,  # the longest wait for one API call (a stop: plus its timeout)
        stop_timeout_s: int = 150,  # past the worst batch plus its upload: then comes SIGKILL
        gpu_ids: Sequence[str] = (),  # on a box with several GPUs: one of these per new worker
        gpus_per_worker: int = 1,  # without gpu_ids: a GPU count per worker (0: CPU workers)
    ) -> None:
        """Scale `service` of compose project `project`."""
        import docker  # here, so that the scaler starts without the SDK

        # Every call has a deadline: a hung engine must not freeze the scaler's loop, and with it
        # the recovery sweep it offers each tick.
        if base_url is None:
            client = docker.from_env(timeout=timeout_s)
        else:
            client = docker.DockerClient(base_url=base_url, timeout=timeout_s)
        self._api = client.api
        self.project, self.service = project, service
        self.stop_timeout_s = stop_timeout_s
        self.gpu_ids, self.gpus_per_worker = tuple(gpu_ids), gpus_per_worker
        self._draining: dict[str, threading.Thread] = {}

    def list_workers(self) -> list[WorkerHandle]:
        """The service's running replicas."""
        return [self._handle(summary) for summary in self._containers(every=False)]

    def add(self, n: int) -> None:
        """Start `n` replicas copied from an existing one, numbered after the highest."""
        existing = self._containers(every=True)
        if not existing:
            raise ConfigError(
                f"no container of service {self.service!r} in compose project {self.project!r} "
                f"to copy: run `docker compose up -d {self.service}` once"
            )
        template = self._api.inspect_container(_template_id(existing))
        first = 1 + max(int(c["Labels"].get(NUMBER, 0)) for c in existing)
        running = [c for c in existing if c["State"] == "running"]
        for number, devices in enumerate(self._device_requests(n, running), start=first):
            self._launch(template, number, devices)

    def drain(self, worker_id: str) -> None:
        """`docker stop` with a long timeout in the background, then remove the container."""
        # The service's last container stays, stopped, as the template to scale up from zero.
        keep = len(self._containers(every=True)) <= 1
        stopper = threading.Thread(
            target=self._stop, args=(worker_id, keep), name=f"drain-{worker_id[:12]}", daemon=True
        )
        self._draining[worker_id] = stopper
        stopper.start()

    def wait_drained(self, timeout_s: float | None = None) -> None:
        """Block until the drains started here have finished (at shutdown, and in tests)."""
        for stopper in list(self._draining.values()):
            stopper.join(timeout_s)

    def _containers(self, *, every: bool) -> list[dict[str, Any]]:
        labels = [f"{PROJECT}={self.project}", f"{SERVICE}={self.service}", f"{ONEOFF}=False"]
        found: list[dict[str, Any]] = self._api.containers(all=every, filters={"label": labels})
        return found

    def _handle(self, summary: dict[str, Any]) -> WorkerHandle:
        container_id = str(summary["Id"])
        # Docker names a container's host after the first 12 digits of its id, unless the
        # compose file sets `hostname:` (which a scaled service must not).
        return WorkerHandle(container_id, container_id[:12], container_id in self._draining)

    def _device_requests(self, n: int, running: list[dict[str, Any]]) -> list[list[Any]]:
        """The GPU request of each new worker: one free id each, or a plain count."""
        from docker.types import DeviceRequest

        if not self.gpu_ids:
            count = [DeviceRequest(count=self.gpus_per_worker, capabilities=[["gpu"]])]
            return [count if self.gpus_per_worker else []] * n
        taken = {gpu for c in running for gpu in self._gpus_of(str(c["Id"]))}
        free = [gpu for gpu in self.gpu_ids if gpu not in taken]
        if len(free) < n:
            log.warning(
                "%d of %d GPUs free: starting %d workers, not %d",
                len(free),
                len(self.gpu_ids),
                len(free),
                n,
            )
        return [[DeviceRequest(device_ids=[gpu], capabilities=[["gpu"]])] for gpu in free[:n]]

    def _gpus_of(self, container_id: str) -> list[str]:
        host = self._api.inspect_container(container_id)["HostConfig"]
        return [str(g) for r in host.get("DeviceRequests") or [] for g in r.get("DeviceIDs") or []]

    def _launch(self, template: dict[str, Any], number: int, devices: list[Any]) -> None:
        name = f"{self.project}-{self.service}-{number}"
        created = self._api.create_container(name=name, **self._spec(template, number, devices))
        container_id = str(created["Id"])
        # The network mode's network came with the create call; join the others as compose does.
        mode = template["HostConfig"].get("NetworkMode")
        for network in template["NetworkSettings"]["Networks"]:
            if network != mode and network not in BUILTIN_NETWORKS:
                self._api.connect_container_to_network(
                    container_id, network, aliases=[self.service]
                )
        self._api.start(container_id)
        log.info("started worker %s (%s)", name, container_id[:12])

    def _spec(self, template: dict[str, Any], number: int, devices: list[Any]) -> dict[str, Any]:
        """Create arguments: the template's image, command, env, mounts, network; our labels."""
        config = template["Config"]
        labels = {k: v for k, v in (config.get("Labels") or {}).items() if k != REPLACE}
        mode = template["HostConfig"].get("NetworkMode", "default")
        endpoints = {} if mode in BUILTIN_NETWORKS else {mode: {"Aliases": [self.service]}}
        return {
            "image": config["Image"],
            "command": config.get("Cmd"),
            "entrypoint": config.get("Entrypoint"),
            "environment": config.get("Env"),
            "working_dir": config.get("WorkingDir") or None,
            "user": config.get("User") or None,
            "labels": labels | {NUMBER: str(number), ONEOFF: "False"},
            "healthcheck": config.get("Healthcheck"),
            "stop_signal": config.get("StopSignal"),
            "stop_timeout": self.stop_timeout_s,
            "host_config": template["HostConfig"] | {"DeviceRequests": devices},
            "networking_config": {"EndpointsConfig": endpoints} if endpoints else None,
            "detach": True,
            "use_config_proxy": False,  # the template's env already is what the worker needs
        }

    def _stop(self, container_id: str, keep: bool) -> None:
        """SIGTERM, wait for the batch (Docker sends SIGKILL after the timeout), remove."""
        try:
            self._api.stop(container_id, timeout=self.stop_timeout_s)
            if not keep:
                self._api.remove_container(container_id)
            log.info("drained worker %s", container_id[:12])
        except Exception:
            # The top of a thread is a loop boundary: log it, the next tick lists what is left.
            log.exception("draining worker %s failed", container_id[:12])
        finally:
            self._draining.pop(container_id, None)


def _template_id(existing: list[dict[str, Any]]) -> str:
    """The replica to copy: a running one if any, the lowest-numbered first."""
    ranked = sorted(
        existing, key=lambda c: (c["State"] != "running", int(c["Labels"].get(NUMBER, 0)))
    )
    return str(ranked[0]["Id"])


class KubernetesBackend:
    """A Deployment's pods, sized through its scale subresource."""

    # The Deployment's pods need a terminationGracePeriodSeconds past the worst batch plus its
    # upload, and no HPA or KEDA may scale the same Deployment.

    def __init__(
        self,
        deployment: str,
        namespace: str = "default",
        *,
        api_client: Any = None,  # a kubernetes.client.ApiClient; default: in-cluster or kubeconfig
        victim_cost: int = -1000,  # the drained pod's deletion cost; unmarked pods cost 0
        timeout_s: float = 30.0,  # the longest wait for one API call
    ) -> None:
        """Scale Deployment `deployment` in `namespace`."""
        from kubernetes import client, config  # here, so that the scaler starts without it

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self._apps = client.AppsV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self.deployment, self.namespace, self.victim_cost = deployment, namespace, victim_cost
        # (connect, read) deadlines for every call: the client's default is to wait forever.
        self.timeout = (min(timeout_s, CONNECT_TIMEOUT_S), timeout_s)

    def list_workers(self) -> list[WorkerHandle]:
        """The Deployment's pods that run or are on their way, terminating ones `stopping`."""
        selector = self._scale().status.selector
        pods = self._core.list_namespaced_pod(
            self.namespace, label_selector=selector, _request_timeout=self.timeout
        ).items
        return [
            WorkerHandle(
                p.metadata.name, p.metadata.name, p.metadata.deletion_timestamp is not None
            )
            for p in pods
            if p.status.phase in ("Pending", "Running")
        ]

    def add(self, n: int) -> None:
        """Raise the Deployment's replica count by `n`."""
        self._set_replicas(int(self._scale().spec.replicas) + n)

    def drain(self, worker_id: str) -> None:
        """Mark the pod cheapest to delete, then lower the replica count by one."""
        replicas = int(self._scale().spec.replicas)
        self._mark(worker_id, str(self.victim_cost))
        try:
            self._set_replicas(replicas - 1)
        except Exception:
            # Left marked, this pod would be the next victim of any later scale-down.
            self._mark(worker_id, None)
            raise

    def _scale(self) -> Any:
        return self._apps.read_namespaced_deployment_scale(
            self.deployment, self.namespace, _request_timeout=self.timeout
        )

    def _set_replicas(self, replicas: int) -> None:
        body = {"spec": {"replicas": replicas}}
        self._apps.patch_namespaced_deployment_scale(
            self.deployment, self.namespace, body, _request_timeout=self.timeout
        )
        log.info("deployment %s/%s scaled to %d", self.namespace, self.deployment, replicas)

    def _mark(self, pod: str, cost: str | None) -> None:
        # A null value deletes the annotation in a merge patch.
        body = {"metadata": {"annotations": {DELETION_COST: cost}}}
        self._core.patch_namespaced_pod(pod, self.namespace, body, _request_timeout=self.timeout)
