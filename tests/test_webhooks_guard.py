"""The SSRF guard with the address check on: refused at submit by the gateway, and at send by the
sender when DNS answers a public address first and a forbidden one later (rebinding).

A canary listens on 127.0.0.1 at the port every URL names; no test may ever reach it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from core import keys
from core.signing import new_secret
from tests.conftest import Gateway, client_for, settings_from
from tests.webhook_parts import Canary, queued_orders
from worker.webhooks import build_sender, send

REBIND_HOST = "rebind.example"
PUBLIC = "93.184.216.34"

# (URL with {port} for the canary's, what the 422 says). Every range in the guard's list is here.
AT_SUBMIT = [
    ("http://127.0.0.1:{port}/", "127.0.0.1, a loopback address"),
    ("http://localhost:{port}/", "a loopback address"),
    ("http://0.0.0.0:{port}/", "0.0.0.0, an unspecified address"),
    ("http://0.1.2.3:{port}/", "a 'this network' (0.0.0.0/8) address"),
    ("http://10.0.0.1:{port}/", "10.0.0.1, a private address"),
    ("http://100.64.0.1:{port}/", "a carrier-grade NAT (100.64.0.0/10) address"),
    ("http://169.254.169.254:{port}/", "a link-local address (this range holds cloud metadata"),
    ("http://172.16.0.1:{port}/", "172.16.0.1, a private address"),
    ("http://192.0.0.8:{port}/", "an IETF protocol-assignment address"),
    ("http://192.0.2.1:{port}/", "a documentation address"),
    ("http://192.88.99.1:{port}/", "a 6to4 relay anycast address"),
    ("http://192.168.1.1:{port}/", "192.168.1.1, a private address"),
    ("http://198.18.0.1:{port}/", "a benchmarking address"),
    ("http://198.51.100.1:{port}/", "a documentation address"),
    ("http://203.0.113.1:{port}/", "a documentation address"),
    ("http://224.0.0.1:{port}/", "a multicast address"),
    ("http://240.0.0.1:{port}/", "a reserved address"),
    ("http://255.255.255.255:{port}/", "a broadcast address"),
    ("http://[::]:{port}/", "::, an unspecified address"),
    ("http://[::1]:{port}/", "::1, a loopback address"),
    ("http://[::ffff:127.0.0.1]:{port}/", "(which carries 127.0.0.1), a loopback address"),
    ("http://[::127.0.0.1]:{port}/", "(which carries 127.0.0.1), a loopback address"),
    ("http://[64:ff9b::7f00:1]:{port}/", "(which carries 127.0.0.1), a loopback address"),
    ("http://[64:ff9b:1::1]:{port}/", "a local-use NAT64 address"),
    ("http://[2002:7f00:1::]:{port}/", "(which carries 127.0.0.1), a loopback address"),
    ("http://[100::1]:{port}/", "a discard-only address"),
    ("http://[2001:2::1]:{port}/", "an IETF protocol-assignment address"),
    ("http://[2001:db8::1]:{port}/", "a documentation address"),
    ("http://[fd00::1]:{port}/", "a unique-local address"),
    ("http://[fe80::1]:{port}/", "a link-local address"),
    ("http://[fec0::1]:{port}/", "a site-local address"),
    ("http://[ff02::1]:{port}/", "a multicast address"),
    ("http://0x7f000001:{port}/", "non-standard spelling of the IPv4 address 127.0.0.1"),
    ("http://2130706433:{port}/", "non-standard spelling of the IPv4 address 127.0.0.1"),
    ("http://0177.0.0.1:{port}/", "non-standard spelling of the IPv4 address 127.0.0.1"),
    ("http://127.1:{port}/", "non-standard spelling of the IPv4 address 127.0.0.1"),
    ("http://example.com@127.0.0.1:{port}/", "must not contain a user name or password"),
    ("ftp://127.0.0.1:{port}/", "scheme is 'ftp'; only http and https are allowed"),
    ("file:///etc/passwd", "scheme is 'file'; only http and https are allowed"),
    ("http://127.0.0.1:{port}/" + "a" * 2048, "the limit is 2048"),
]

# What DNS answers at send time, after answering a public address at submit.
AT_SEND = [
    "127.0.0.1",
    "0.0.0.0",
    "10.0.0.1",
    "100.64.0.1",
    "169.254.169.254",
    "172.16.0.1",
    "192.168.1.1",
    "198.18.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "::1",
    "::ffff:127.0.0.1",
    "64:ff9b::7f00:1",
    "2002:7f00:1::",
    "fd00::1",
    "fe80::1",
]


@pytest.fixture
def guarded_env(env: dict[str, str]) -> dict[str, str]:
    """Webhooks on, the address check on (as in production)."""
    env.update({"DQ_WEBHOOK_SECRET": new_secret(), "DQ_WEBHOOK_ALLOW_PRIVATE": "0"})
    return env


@pytest.fixture
def canary() -> Iterator[Canary]:
    """The listener no webhook may reach."""
    with Canary() as listener:
        yield listener


@pytest.fixture
def rebinding(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Make REBIND_HOST answer a public address once, then `address` ever after."""
    real = socket.getaddrinfo

    def arm(address: str) -> None:
        answers = iter([PUBLIC])

        def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host != REBIND_HOST:
                return real(host, port, *args, **kwargs)
            ip = next(answers, address)
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sockaddr = (ip, port, 0, 0) if ":" in ip else (ip, port)
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]

        monkeypatch.setattr(socket, "getaddrinfo", fake)

    return arm


@pytest.mark.parametrize(("url", "reason"), AT_SUBMIT, ids=[u for u, _ in AT_SUBMIT])
def test_refused_at_submit(
    url: str,
    reason: str,
    guarded_env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    canary: Canary,
    rclient: redis.Redis,
) -> None:
    body = {"prompt": "x", "webhook": {"url": url.format(port=canary.port)}}
    with client_for(gateway_factory(guarded_env)) as client:
        resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["field"]) == ("unsafe_callback_url", "webhook.url")
    assert reason in error["message"]
    assert int(rclient.hget(keys.STATS, "queued") or 0) == 0
    assert canary.connections == 0


@pytest.mark.parametrize("address", AT_SEND)
def test_rebound_host_refused_at_send(
    address: str,
    guarded_env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    canary: Canary,
    rclient: redis.Redis,
    rebinding: Callable[[str], None],
) -> None:
    rebinding(address)
    url = f"http://{REBIND_HOST}:{canary.port}/hook"
    with client_for(gateway_factory(guarded_env)) as client:
        job_id = client.post("/v1/jobs", json={"prompt": "x", "webhook": {"url": url}}).json()["id"]
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        (order,) = queued_orders(rclient, "dq.webhooks")
        entry = send(build_sender(settings_from(guarded_env)), order)
        assert entry is not None
        assert (entry.outcome, entry.status_code) == ("refused", None)
        shown = ipaddress.ip_address(address)  # the guard names it in canonical form
        assert f"callback host resolves to {shown}" in (entry.error or "")
        log = client.get(f"/v1/jobs/{job_id}").json()["webhook"]["deliveries"]
    assert log == [entry.model_dump(mode="json")]
    assert rclient.zcard(keys.WEBHOOK_RETRIES) == 0  # refused for good, no retry parked
    assert canary.connections == 0
