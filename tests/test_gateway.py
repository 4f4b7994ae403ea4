"""What keeps the gateway cheap under a burst: shared round trips, one ETA read, N processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from api.resources import Throughput
from core import heartbeats
from core.coalesce import ScriptBatcher
from core.embedded import EmbeddedRedis, free_port
from core.heartbeats import WorkerBeat, WorkerState

from .conftest import ALICE_KEY, ROOT

# Counts every call in KEYS[1]; refuses ARGV[1] == "bad"; answers ARGV[1].
ECHO = """
redis.call('INCR', KEYS[1])
if ARGV[1] == 'bad' then return redis.error_reply('refused ' .. ARGV[1]) end
return ARGV[1]
"""


def clients_connected(client: redis.Redis) -> int:
    return int(client.info("clients")["connected_clients"])


def test_concurrent_script_calls_share_round_trips_and_each_gets_its_own_reply(
    private_redis: EmbeddedRedis,
) -> None:
    rclient = redis.Redis.from_url(private_redis.url, decode_responses=True)

    async def scenario() -> list[object]:
        async with AsyncRedis.from_url(private_redis.url, decode_responses=True) as client:
            batcher = ScriptBatcher(client, ECHO)
            args = ["bad" if i % 10 == 3 else f"v{i}" for i in range(200)]
            replies = await asyncio.gather(
                *(batcher(["count"], [a]) for a in args), return_exceptions=True
            )
            # Every call was a script run of its own, over one or two connections, not 200
            # (the third is this test's own client).
            assert clients_connected(rclient) <= 3
            return replies

    replies = asyncio.run(scenario())
    assert rclient.get("count") == "200"
    rclient.close()
    for i, reply in enumerate(replies):
        if i % 10 == 3:
            assert isinstance(reply, ResponseError)
            assert "refused bad" in str(reply)
        else:
            assert reply == f"v{i}"


def test_a_batch_survives_redis_forgetting_its_scripts(
    redis_url: str, rclient: redis.Redis
) -> None:
    async def scenario() -> tuple[list[object], object]:
        async with AsyncRedis.from_url(redis_url, decode_responses=True) as client:
            batcher = ScriptBatcher(client, ECHO)
            await batcher(["count"], ["first"])
            await client.script_flush()  # as after a Redis restart without persistence
            many = await asyncio.gather(*(batcher(["count"], [f"v{i}"]) for i in range(20)))
            await client.script_flush()
            one = await batcher(["count"], ["alone"])
            return list(many), one

    many, one = asyncio.run(scenario())
    assert many == [f"v{i}" for i in range(20)]
    assert one == "alone"
    assert rclient.get("count") == "22"


def test_when_redis_is_unreachable_every_waiting_call_fails_with_the_connection_error() -> None:
    async def scenario() -> list[object]:
        client = AsyncRedis(port=free_port(), socket_connect_timeout=1)
        batcher = ScriptBatcher(client, ECHO)
        try:
            return await asyncio.gather(
                *(batcher(["count"], [str(i)]) for i in range(5)), return_exceptions=True
            )
        finally:
            await client.aclose()

    replies = asyncio.run(scenario())
    assert all(isinstance(r, RedisConnectionError) for r in replies), replies


def test_a_burst_of_requests_reads_the_workers_throughput_once(
    private_redis: EmbeddedRedis,
) -> None:
    redis_url = private_redis.url
    rclient = redis.Redis.from_url(redis_url, decode_responses=True)
    for name, rate in (("w1", 2.0), ("w2", 1.5)):
        now = time.time()
        beat = WorkerBeat(
            name=name, state=WorkerState.IDLE, images_per_s=rate, started_at=now, at=now
        )
        heartbeats.publish(rclient, beat, ttl_s=30)
    rclient.config_resetstat()

    async def scenario() -> list[float | None]:
        async with AsyncRedis.from_url(redis_url, decode_responses=True) as client:
            throughput = Throughput(client, live_within_s=30)
            first = await asyncio.gather(*(throughput.get() for _ in range(100)))
            again = await throughput.get()  # within max_age_s: from memory
            return [*first, again]

    values = asyncio.run(scenario())
    assert values == [3.5] * 101
    stats = rclient.info("commandstats")
    rclient.close()
    assert stats["cmdstat_zrangebyscore"]["calls"] == 1
    assert stats["cmdstat_mget"]["calls"] == 1


def sockets_of(pid: int) -> set[str]:
    """Inode numbers of the sockets a process holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def established_on(port: int) -> set[str]:
    """Inodes of the established TCP connections whose local port is `port`."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            found.add(fields[9])
    return found


def children_of(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


@pytest.fixture
def multi_gateway(
    env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    log = (tmp_path / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "api", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield process, port
    if process.poll() is None:
        process.kill()
        process.wait()
    log.close()


def wait_serving(url: str, process: subprocess.Popen[bytes], count: int) -> list[int]:
    """Wait until the supervisor has `count` gateway processes and the port answers."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the gateway exited"
        kids = children_of(process.pid)
        try:
            ok = httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok and len(kids) == count:
            return kids
        time.sleep(0.2)
    raise AssertionError("the gateway processes did not come up")


def wait_accepting(url: str, port: int, pids: list[int], timeout: float = 60) -> None:
    """Open connections until each of `pids` has accepted one (is past its startup)."""
    probes: list[httpx.Client] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            probe = httpx.Client(base_url=url, timeout=timeout)
            probes.append(probe)
            assert probe.get("/healthz").status_code == 200
            open_here = established_on(port)
            if all(sockets_of(pid) & open_here for pid in pids):
                return
            assert time.monotonic() < deadline, "a gateway process accepts no connection"
    finally:
        for probe in probes:
            probe.close()


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreads connections on Linux")
def test_workers_share_the_port_and_connections_spread_over_them(
    multi_gateway: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = multi_gateway
    url = f"http://127.0.0.1:{port}"
    kids = wait_serving(url, process, 2)
    wait_accepting(url, port, kids)

    # 60 keep-alive connections opened at once, as a burst of clients would.
    clients = [
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE_KEY}"})
        for _ in range(60)
    ]
    try:
        for c in clients:
            assert c.get("/healthz").status_code == 200
        open_here = established_on(port)
        per_process = [len(sockets_of(pid) & open_here) for pid in kids]
        assert sum(per_process) == 60
        # The kernel hashes each connection to one of the two sockets: far from all on one.
        assert min(per_process) >= 12, per_process

        # A gateway process that dies is replaced. Its socket stays open in the supervisor, so
        # new connections hashed to it wait for the replacement instead of being refused.
        os.kill(kids[0], signal.SIGKILL)
        auth = {"Authorization": f"Bearer {ALICE_KEY}"}
        for _ in range(20):  # a new connection each
            reply = httpx.post(f"{url}/v1/jobs", json={"prompt": "a fox"}, headers=auth, timeout=60)
            assert reply.status_code == 202
        replaced = wait_serving(url, process, 2)
        assert kids[0] not in replaced
        assert kids[1] in replaced
    finally:
        for c in clients:
            c.close()

    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in replaced)


def test_a_second_gateway_on_a_taken_port_refuses_to_start(
    multi_gateway: tuple[subprocess.Popen[bytes], int], env: dict[str, str]
) -> None:
    process, port = multi_gateway
    wait_serving(f"http://127.0.0.1:{port}", process, 2)
    second = subprocess.run(
        [sys.executable, "-m", "api", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in second.stdout
