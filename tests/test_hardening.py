"""The gateway's defences, over real HTTP and raw sockets, against a real Redis (issue 18)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from core import keys
from core.embedded import EmbeddedRedis
from core.errors import ConfigError
from core.jobs import JobRequest, JobStatus, Metrics, StoredImage, new_job_id
from core.records import encode
from core.settings import load_settings
from core.storage import FileStore
from tests.conftest import ALICE_KEY, BOB_KEY, Gateway, client_for, settings_from
from tests.test_page import browser  # noqa: F401  (a fixture)

GOOD = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2}
JSON = {"Content-Type": "application/json"}


def nested(depth: int) -> dict[str, Any]:
    """A dict nesting `depth` levels deep."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def exchange(port: int, data: bytes, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one HTTP response: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (None: still open after `seconds`)."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
    return None


def put_job(r: redis.Redis, tenant: str, **fields: Any) -> str:
    """A job written straight into the ledger."""
    job_id = new_job_id()
    values: dict[str, Any] = {
        "tenant": tenant,
        "status": JobStatus.QUEUED.value,
        "attempt": 0,
        "created_at": time.time(),
        "request": JobRequest(prompt="p", seed=1, width=64, height=64),
        "metrics": Metrics(),
        **fields,
    }
    r.hset(keys.job(job_id), mapping=encode(**values))
    return job_id


def error_of(resp: httpx.Response) -> dict[str, Any]:
    """The JSON error of a response (fails on anything else)."""
    assert resp.headers["content-type"] == "application/json", resp.text[:200]
    error: dict[str, Any] = resp.json()["error"]
    return error


# 1. Free-form fields are bounded at submit, far below what any reader of a record parses.


@pytest.mark.parametrize("depth", [33, 210, 255, 300, 900])
def test_deep_metadata_is_a_422_naming_the_field(client: httpx.Client, depth: int) -> None:
    resp = client.post("/v1/jobs", json={**GOOD, "metadata": nested(depth)})
    assert resp.status_code == 422, resp.text[:200]
    assert error_of(resp)["field"] == "metadata"


def test_metadata_32_levels_deep_is_accepted(client: httpx.Client) -> None:
    resp = client.post("/v1/jobs", json={**GOOD, "metadata": nested(32)})
    assert resp.status_code == 202


def test_a_record_that_cannot_be_read_is_read_listed_and_canceled_as_a_failed_job(
    client: httpx.Client, rclient: redis.Redis
) -> None:
    job = client.post("/v1/jobs", json=GOOD).json()
    request = json.loads(str(rclient.hget(keys.job(job["id"]), "request")))
    # Written by something else than this API (an older bug, a hand edit): no reader parses it.
    planted = json.dumps({**request, "metadata": nested(300)})
    rclient.hset(keys.job(job["id"]), "request", planted)
    listed = client.get("/v1/jobs")
    assert listed.status_code == 200, listed.text[:200]
    assert job["id"] in [j["id"] for j in listed.json()["jobs"]]
    read = client.get(f"/v1/jobs/{job['id']}")
    assert read.status_code == 200
    assert (read.json()["status"], read.json()["error"]["code"]) == ("failed", "unreadable_record")
    canceled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 409
    assert error_of(canceled)["code"] == "already_finished"
    assert client.post("/v1/jobs", json=GOOD).status_code == 202  # and the API goes on


# 2. The body limit counts streamed bytes; the key is checked before the body; headers bounded.


def test_a_chunked_body_over_the_limit_is_a_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "a cat", "metadata": {"k": "'
        for _ in range(40):
            yield b"x" * 4096
        yield b'"}}'

    resp = client.post("/v1/jobs", content=chunks(), headers=JSON)
    assert resp.status_code == 413
    assert error_of(resp)["code"] == "too_large"


def test_a_request_without_a_key_is_refused_before_its_body_is_sent(gateway: Gateway) -> None:
    head = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, headers, body = exchange(gateway.port, head, timeout=3)  # no body ever follows
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Big", "y" * 20_000)],
        [(f"X-H{i}", "v") for i in range(150)],
    ],
    ids=["20-kb-header", "150-headers"],
)
def test_headers_over_the_limits_are_a_431(
    gateway: Gateway, headers: list[tuple[str, str]]
) -> None:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
    request = f"GET /healthz HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode()
    status, _, body = exchange(gateway.port, request)
    assert status == 431
    assert json.loads(body)["error"]["code"] == "too_large"


def test_headers_that_never_end_are_a_431_once_past_the_limit(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: ")
        for _ in range(100):  # 400 KB, never a line end
            try:
                sock.sendall(b"y" * 4096)
            except OSError:
                break
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        assert reply.status == 431


# 3. Connections that send nothing, or too slowly, are closed; a full process makes room.


@pytest.fixture
def strict_env(env: dict[str, str]) -> dict[str, str]:
    """Short timeouts and a small connection cap, to see them act within a test."""
    return {
        **env,
        "DQ_HEADER_TIMEOUT_S": "1",
        "DQ_BODY_TIMEOUT_S": "1",
        "DQ_KEEPALIVE_TIMEOUT_S": "1",
        "DQ_MAX_CONNECTIONS": "40",
    }


def test_idle_slow_and_half_sent_connections_are_closed(
    strict_env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway]
) -> None:
    gw = gateway_factory(strict_env)
    idle = socket.create_connection(("127.0.0.1", gw.port))
    half = socket.create_connection(("127.0.0.1", gw.port))
    half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    body = socket.create_connection(("127.0.0.1", gw.port))
    body.sendall(
        f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
    )
    drip = socket.create_connection(("127.0.0.1", gw.port))
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 100
    dripped, start = 0, time.monotonic()
    while time.monotonic() - start < 4:  # a byte every 50 ms: always sending, never done
        try:
            drip.send(request[dripped % len(request) : dripped % len(request) + 1])
        except OSError:
            break
        dripped += 1
        time.sleep(0.05)
    for sock in (idle, half, body, drip):
        assert closed_within(sock, 4) is not None
        sock.close()


def test_a_kept_alive_connection_is_closed_when_idle(
    strict_env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway]
) -> None:
    gw = gateway_factory(strict_env)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = http.client.HTTPResponse(sock)
    reply.begin()
    reply.read()
    assert closed_within(sock, 4) is not None
    sock.close()


@pytest.mark.parametrize("opening", [b"", b"GET /healthz HTTP/1.1\r\nX-Slow: "])
def test_a_full_process_closes_its_oldest_waiting_connection_to_serve_a_new_one(
    strict_env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    opening: bytes,
) -> None:
    gw = gateway_factory({**strict_env, "DQ_HEADER_TIMEOUT_S": "60"})
    flood = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(100)]
    for sock in flood:  # idle, or headers begun and never finished
        with contextlib.suppress(OSError):  # the oldest were closed to make room already
            sock.sendall(opening)
    try:
        for _ in range(20):
            assert httpx.get(f"{gw.url}/healthz", timeout=5).status_code == 200
        assert closed_within(flood[0], 2) is not None  # the oldest made room
        assert closed_within(flood[-1], 0.5) is None  # the newest still waits
    finally:
        for sock in flood:
            sock.close()


def test_the_open_files_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import resource; from api.__main__ import raise_open_files_limit as r;"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE);"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); r();"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# 7. Every error is the JSON error; nothing of an exception or of Redis reaches a client.


def test_a_request_that_is_not_http_is_a_json_400(gateway: Gateway) -> None:
    status, headers, body = exchange(gateway.port, b"HELLO THERE\r\n\r\n")
    assert (status, headers["content-type"]) == (400, "application/json")
    assert json.loads(body)["error"]["code"] == "bad_request"


def test_a_non_ascii_signature_is_a_json_404_in_one_log_line(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        resp = httpx.get(f"{gateway.url}/v1/files/job_x/0.png?expires=9999999999&sig=%C3%A9")
    assert resp.status_code == 404
    assert error_of(resp)["code"] == "not_found"
    lines = [r for r in caplog.records if r.name.startswith(("api", "uvicorn"))]
    assert len(lines) == 1
    assert lines[0].exc_info is None
    assert "signature" in lines[0].getMessage()


@pytest.mark.parametrize(
    "raw", [b'{"b": NaN, "s": []}', b'{"b": Infinity, "s": []}', b'{"b": 1, "s": [1]}', b"[]"]
)
def test_a_cursor_this_api_did_not_make_is_a_422(client: httpx.Client, raw: bytes) -> None:
    cursor = base64.urlsafe_b64encode(raw).decode()
    resp = client.get("/v1/jobs", params={"cursor": cursor, "status": "queued"})
    assert resp.status_code == 422
    assert error_of(resp)["field"] == "cursor"


@pytest.fixture
def counted(
    env: dict[str, str],
    private_redis: EmbeddedRedis,
    gateway_factory: Callable[[dict[str, str]], Gateway],
) -> Iterator[tuple[httpx.Client, redis.Redis]]:
    """Alice's client on a gateway whose Redis serves this test alone: its commands are counted."""
    gw = gateway_factory({**env, "DQ_REDIS_URL": private_redis.url})
    r = redis.Redis.from_url(private_redis.url, decode_responses=True)
    with client_for(gw) as c:
        yield c, r
    r.close()


def test_an_id_not_of_the_job_id_form_is_404_before_redis_is_asked(
    counted: tuple[httpx.Client, redis.Redis],
) -> None:
    client, rclient = counted
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    rclient.config_resetstat()
    replies = [
        client.get(f"/v1/jobs/{job_id}:deliveries"),
        client.get(f"/v1/jobs/{'job_' + '0' * 32}:deliveries"),
        client.get("/v1/jobs/anything"),
        client.post(f"/v1/jobs/{job_id}:deliveries/cancel"),
    ]
    assert [r.status_code for r in replies] == [404] * 4
    assert all(error_of(r)["code"] == "not_found" for r in replies)
    # The same answer whether the job exists or not, and Redis never saw the ids.
    assert replies[0].json()["error"]["message"].startswith("no job job_")
    stats = rclient.info("commandstats")
    assert not any(name in stats for name in ("cmdstat_hgetall", "cmdstat_type"))


def test_an_unexpected_exception_is_a_json_500_that_shows_nothing_of_it(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    gw = Gateway(settings_from(env))

    async def boom() -> None:
        raise RuntimeError("a prompt that must not leak")

    gw.server.config.app.add_api_route("/v1/boom", boom)
    gw.start()
    try:
        with client_for(gw) as c, caplog.at_level(logging.INFO):
            resp = c.get("/v1/boom")
    finally:
        gw.stop()
    assert resp.status_code == 500
    assert error_of(resp)["code"] == "internal"
    assert "prompt" not in resp.text
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    assert "RuntimeError" in logged
    assert "must not leak" not in logged
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_redis_being_down_shows_nothing_of_redis(
    env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway], tmp_path: Path
) -> None:
    from core.embedded import EmbeddedRedis

    own = EmbeddedRedis(tmp_path / "r").start()
    gw = gateway_factory({**env, "DQ_REDIS_URL": own.url})
    own.stop()
    with client_for(gw) as c:
        for resp in (c.get("/readyz"), c.get("/v1/queue"), c.get(f"/v1/jobs/job_{'a' * 32}")):
            assert resp.status_code == 503
            assert error_of(resp)["code"] == "unavailable"
            assert str(own.port) not in resp.text
            assert "Error" not in resp.text


# 8. Signed URLs: decoded once; pointing at DQ_PUBLIC_URL; forwarded headers from proxies only.


def test_a_file_url_is_decoded_once(env: dict[str, str], gateway: Gateway) -> None:
    settings = settings_from(env)
    store = FileStore(Path(settings.storage.removeprefix("file://")), env["DQ_SECRET_KEY"].encode())
    key = "job_x/100%41.png"  # a literal percent sign: decoded twice it would read 100A.png
    store.put(key, b"the image", "image/png")
    store.put("job_x/100A.png", b"another file", "image/png")
    resp = httpx.get(gateway.url + store.url(key, 60))
    assert (resp.status_code, resp.content) == (200, b"the image")


def test_minted_urls_start_with_the_public_url_whatever_the_host_header(
    env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    rclient: redis.Redis,
) -> None:
    gw = gateway_factory({**env, "DQ_PUBLIC_URL": "https://images.example.com"})
    image = StoredImage(key="out/0.png", seed=1, width=64, height=64)
    job_id = put_job(rclient, "alice", status=JobStatus.SUCCEEDED.value, outputs=[image])
    forged = {"Host": "evil.example", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil"}
    with client_for(gw) as c:
        url = c.get(f"/v1/jobs/{job_id}", headers=forged).json()["outputs"][0]["url"]
    assert url.startswith("https://images.example.com/v1/files/out/0.png?expires=")


# 10. Failed authentication is throttled per peer; keys are long; /docs is offline; headers.


@pytest.fixture
def throttled_env(env: dict[str, str]) -> dict[str, str]:
    """Three failures a minute."""
    return {**env, "DQ_AUTH_FAILURES": "3", "DQ_AUTH_FAILURE_WINDOW_S": "60"}


def from_address(gw: Gateway, address: str, key: str, **headers: str) -> httpx.Client:
    """A client whose connections leave from `address` (any 127.x.y.z is loopback)."""
    transport = httpx.HTTPTransport(local_address=address)
    auth = {"Authorization": f"Bearer {key}", **headers}
    return httpx.Client(base_url=gw.url, transport=transport, headers=auth, timeout=10)


def test_failed_authentication_is_throttled_per_peer_not_per_forwarded_header(
    throttled_env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway]
) -> None:
    gw = gateway_factory(throttled_env)
    with from_address(gw, "127.0.0.1", "not-a-key-not-a-key-not-a-key") as guesser:
        codes = [
            guesser.get("/v1/queue", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
            for i in range(5)
        ]
        assert codes == [401, 401, 401, 429, 429]
        refused = guesser.get("/v1/queue", headers={"Authorization": f"Bearer {ALICE_KEY}"})
        assert refused.status_code == 429  # a right guess now is no use
        assert 50 <= int(refused.headers["retry-after"]) <= 60
        assert error_of(refused)["code"] == "too_many_failures"
    with from_address(gw, "127.0.0.2", BOB_KEY) as other:
        assert other.get("/v1/queue").status_code == 200


def test_forwarded_for_counts_only_from_a_trusted_proxy(
    throttled_env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway]
) -> None:
    gw = gateway_factory({**throttled_env, "DQ_TRUSTED_PROXIES": "127.0.0.1"})
    with from_address(gw, "127.0.0.1", "not-a-key-not-a-key-not-a-key") as proxy:
        for _ in range(4):
            assert proxy.get("/v1/queue", headers={"X-Forwarded-For": "10.0.0.1"}).status_code in (
                401,
                429,
            )
        other = proxy.get("/v1/queue", headers={"X-Forwarded-For": "10.0.0.2"})
        assert other.status_code == 401  # another client behind the proxy, not throttled


@pytest.mark.parametrize("keys_", ["alice:short", f"alice:{'k' * 23}", f"a:{ALICE_KEY},b:pw"])
def test_short_api_keys_are_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, keys_: str
) -> None:
    monkeypatch.setenv("DQ_API_KEYS", keys_)
    with pytest.raises(ConfigError, match="at least 24"):
        load_settings().tenants()


def test_json_and_pages_carry_the_security_headers(client: httpx.Client) -> None:
    api = client.get("/v1/queue")
    for reply in (api, client.get("/"), client.get("/docs"), client.get("/v1/jobs/nope")):
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["x-frame-options"] == "DENY"
        assert reply.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
    assert api.headers["cache-control"] == "no-store"
    page = client.get("/").headers["content-security-policy"]
    # The page's scripts and styles are its own files: nothing inline runs, no other origin.
    assert "script-src 'self';" in page
    assert "style-src 'self';" in page
    assert "unsafe-inline" not in page


def test_docs_and_every_asset_they_name_come_from_the_gateway(client: httpx.Client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert urls
    for url in urls:
        assert url.startswith("/"), url  # nothing from another host
        assert client.get(url).status_code == 200, url
    assert client.get("/openapi.json").json()["info"]["title"] == "diffusion-queue"


@pytest.mark.browser
def test_docs_render_in_a_browser_with_no_network(
    gateway: Gateway,
    browser: object,  # noqa: F811
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(browser, WebDriver)
    browser.get(f"{gateway.url}/docs")
    wait = WebDriverWait(browser, 20)
    title = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".information-container .title"))
    assert "diffusion-queue" in title[0].text
    paths = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    assert "/v1/jobs" in {p.text.replace("\u200b", "") for p in paths}
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    # Everything the page loaded came from the gateway (this machine reaches no CDN anyway).
    assert loaded
    assert all(u.startswith(gateway.url) for u in loaded)


def test_a_status_filtered_list_reads_a_bounded_slice_per_request(
    counted: tuple[httpx.Client, redis.Redis],
) -> None:
    from api.routes import LIST_SCAN

    client, rclient = counted

    total = 3000
    pipe = rclient.pipeline(transaction=False)
    oldest = None
    for i in range(total):
        status = JobStatus.CANCELED if i == 0 else JobStatus.QUEUED
        job_id = new_job_id()
        oldest = oldest or job_id
        values = encode(
            tenant="alice",
            status=status.value,
            attempt=0,
            created_at=1_000_000 + i,
            request=JobRequest(prompt="p", seed=1, width=64, height=64),
            metrics=Metrics(),
        )
        pipe.hset(keys.job(job_id), mapping=values)
        pipe.zadd(keys.tenant_jobs("alice"), {job_id: 1_000_000 + i})
    pipe.execute()

    pages, found, cursor = 0, [], None
    while True:
        rclient.config_resetstat()
        params = {"status": "canceled", "limit": 10, **({"cursor": cursor} if cursor else {})}
        started = time.monotonic()
        page = client.get("/v1/jobs", params=params).json()
        took = time.monotonic() - started
        stats = rclient.info("commandstats")
        # The records of the slice, and (once per process, then cached) the tenant's limits.
        assert stats.get("cmdstat_hgetall", {"calls": 0})["calls"] <= LIST_SCAN + 1
        assert took < 1.0
        pages += 1
        found += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert found == [oldest]
    # A page per LIST_SCAN entries, and maybe one more to learn that the index ended.
    assert -(-total // LIST_SCAN) <= pages <= -(-total // LIST_SCAN) + 1


def test_the_lockout_counts_failures_per_window_and_per_ipv6_64() -> None:
    from api.lockout import Lockout

    lock = Lockout(limit=2, window_s=10, max_peers=8)
    lock.fail("10.0.0.1", now=0)
    assert lock.retry_after("10.0.0.1", now=1) == 0
    lock.fail("10.0.0.1", now=1)
    assert (lock.retry_after("10.0.0.1", now=1.5), lock.retry_after("10.0.0.2", now=1.5)) == (9, 0)
    assert lock.retry_after("10.0.0.1", now=10) == 0  # the window is over
    lock.fail("2001:db8::1", now=20)
    lock.fail("2001:db8::ffff:1", now=20)  # the same /64
    assert lock.retry_after("2001:db8::2", now=21) == 9
    for i in range(50):  # a flood of addresses never grows the table past its bound
        lock.fail(f"192.0.2.{i}", now=30)
    assert len(lock._windows) <= 8
