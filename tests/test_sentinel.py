"""Redis behind Sentinel: every client finds the master through the sentinels, before and after a
failover. Real processes on loopback: a master, a replica, three sentinels, a gateway, a worker."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from core import connections, heartbeats, keys
from core.connections import Broker, RedisTarget
from core.embedded import free_port, redis_binary
from core.errors import ConfigError
from core.processes import stop_process
from core.settings import load_settings
from tests.conftest import Gateway, WorkerProcess, client_for, settings_from, wait_for, wait_until

MASTER = "dqmaster"


class Node:
    """One redis-server process (a data node or, with `--sentinel`, a sentinel) on 127.0.0.1."""

    def __init__(self, workdir: Path, *args: str, sentinel: bool = False) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True)
        if sentinel:
            # A sentinel rewrites its config file as it learns the topology, so it needs one.
            conf = workdir / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {workdir}\n" + "\n".join(args))
            argv = [redis_binary(), str(conf), "--sentinel"]
        else:
            argv = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
            argv += ["--dir", str(workdir), "--save", "", "--appendonly", "no", *args]
        log = (workdir / "log").open("wb")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.client = redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)
        wait_until(self._pings, 10, f"redis-server on {self.port}")

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        self.client.close()
        stop_process(self.process, 5)


class Cluster:
    """A master, its replica, and three sentinels that agree on both."""

    def __init__(self, root: Path) -> None:
        self.master = Node(root / "master")
        self.replica = Node(root / "replica", "--replicaof", "127.0.0.1", str(self.master.port))
        monitor = [
            f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2",
            f"sentinel down-after-milliseconds {MASTER} 1000",
            f"sentinel failover-timeout {MASTER} 10000",
        ]
        self.sentinels = [Node(root / f"sentinel{i}", *monitor, sentinel=True) for i in range(3)]
        wait_until(self._settled, 30, "the sentinels to find the replica and each other")

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def _settled(self) -> bool:
        for sentinel in self.sentinels:
            replicas = sentinel.client.execute_command("SENTINEL", "REPLICAS", MASTER)
            peers = sentinel.client.execute_command("SENTINEL", "SENTINELS", MASTER)
            if len(peers) != 2 or not replicas or "s_down" in str(replicas):
                return False
        return True

    def master_port(self) -> set[int]:
        """The master's port as each sentinel names it."""
        named = [
            s.client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
            for s in self.sentinels
        ]
        return {int(port) for _, port in named}

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.master]:
            node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    started = Cluster(tmp_path / "redis")
    yield started
    started.stop()


@pytest.fixture
def sentinel_env(env: dict[str, str], cluster: Cluster) -> dict[str, str]:
    """Every process reaches Redis through the sentinels only: the URL's host resolves nowhere."""
    return env | {
        "DQ_REDIS_URL": f"redis://{MASTER}.invalid:6379/3",
        "DQ_REDIS_SENTINELS": cluster.addresses,
        "DQ_REDIS_MASTER": MASTER,
    }


def submit_and_finish(client: httpx.Client, prompt: str) -> dict[str, object]:
    reply = client.post("/v1/jobs", json={"prompt": prompt, "width": 64, "height": 64, "steps": 2})
    assert reply.status_code == 202, reply.text
    return wait_for(client, reply.json()["id"], timeout=60)


@pytest.mark.slow
def test_jobs_finish_before_and_after_the_master_dies(
    cluster: Cluster,
    sentinel_env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    tmp_path: Path,
) -> None:
    ledger = connections.sync_client(settings_from(sentinel_env))
    name = "sentinel-worker@test"
    worker = WorkerProcess(sentinel_env, tmp_path / "worker.log", name)
    try:
        gateway = gateway_factory(sentinel_env)
        worker.wait_ready(ledger)
        with client_for(gateway) as client:
            before = submit_and_finish(client, "a lighthouse before the failover")
            assert before["status"] == "succeeded"
            # The job went to the master, in the URL's database; the gateway listens there.
            with redis.Redis(port=cluster.master.port, db=3) as direct:
                assert direct.exists(f"dq:job:{before['id']}") == 1
                assert direct.pubsub_numsub(keys.CHANGES) == [(keys.CHANGES.encode(), 1)]

            cluster.master.process.kill()  # SIGKILL: no goodbye to anyone
            killed = time.monotonic()
            wait_until(lambda: cluster.master_port() == {cluster.replica.port}, 30, "the failover")
            promoted = time.monotonic() - killed
            after = submit_and_finish(client, "a lighthouse after the failover")
            assert after["status"] == "succeeded", after
            print(
                f"\nSentinel failover: replica promoted {promoted:.1f} s after the kill, "
                f"a job submitted then done {time.monotonic() - killed:.1f} s after the kill"
            )
            # The first job's record survived on the promoted replica, and reads still find it.
            assert client.get(f"/v1/jobs/{before['id']}").json()["status"] == "succeeded"
            # The gateway's change subscription moved to the new master.
            promoted_master = cluster.replica.client
            wait_until(
                lambda: promoted_master.pubsub_numsub(keys.CHANGES) == [(keys.CHANGES, 1)],
                10,
                "the gateway to subscribe on the new master",
            )
        assert [b.name for b in heartbeats.live(ledger, 30)] == [name]
    finally:
        worker.stop()
        ledger.close()


def test_the_celery_broker_goes_through_the_sentinels() -> None:
    settings = load_settings(
        redis_url="redis://:p%40ss@ignored:6379/2",
        redis_sentinels="10.0.0.1:26379,sentinel-1:26380,[fd00::1]:26379",
        redis_master="jobs",
        redis_sentinel_password="s3",
    )
    assert connections.celery_broker(settings) == Broker(
        "sentinel://:p%40ss@10.0.0.1:26379/2;sentinel://:p%40ss@sentinel-1:26380/2;"
        "sentinel://:p%40ss@[fd00::1]:26379/2",
        {
            "master_name": "jobs",
            "sentinel_kwargs": {
                "socket_timeout": connections.CONNECT_TIMEOUT_S,
                "socket_connect_timeout": connections.CONNECT_TIMEOUT_S,
                "password": "s3",
            },
        },
    )


def test_without_sentinels_the_broker_is_the_url() -> None:
    settings = load_settings(redis_url="redis://:pw@redis:6379/0")
    assert connections.celery_broker(settings) == Broker("redis://:pw@redis:6379/0", {})


def test_the_master_login_comes_from_the_url() -> None:
    target = RedisTarget("redis://dq:secret@ignored:6380/5")
    assert target.login() == {"db": 5, "username": "dq", "password": "secret"}


def test_tls_through_sentinel_is_refused_rather_than_dropped() -> None:
    settings = load_settings(redis_url="rediss://:pw@x/0", redis_sentinels="s:26379")
    with pytest.raises(ConfigError, match="TLS to Redis behind Sentinel"):
        connections.celery_broker(settings)


def test_a_malformed_sentinel_list_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match=r"DQ_REDIS_SENTINELS.*'sentinel-0' is not host:port"):
        load_settings(redis_url="redis://x/0", redis_sentinels="sentinel-0,sentinel-1:26379")


def test_a_plain_url_client_retries_connection_errors_only(redis_url: str) -> None:
    client = connections.sync_client(load_settings(redis_url=redis_url))
    assert client.ping() is True
    retry = client.get_retry()
    assert retry is not None
    assert retry.get_retries() == connections.RETRIES
    assert retry._supported_errors == (redis.ConnectionError,)
    client.close()
