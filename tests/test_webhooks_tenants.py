"""Webhooks between tenants: each signs with its own secret, names itself in the payload, and
cannot hold up another's deliveries; redeliveries are limited (real gateway, sender, receivers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.conftest import BOB_KEY, ROOT, Gateway, client_for, wait_until
from tests.test_webhooks import GatewayFactory, receivers, sender_factory, submit_and_cancel
from tests.webhook_parts import Answer, Receiver, SenderProcess

__all__ = ["receivers", "sender_factory"]  # fixtures


@pytest.fixture
def tenant_env(env: dict[str, str]) -> dict[str, str]:
    """Webhooks on with no shared secret: every tenant signs with its own."""
    return {
        **env,
        "DQ_WEBHOOK_ALLOW_PRIVATE": "1",
        "DQ_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2",
        "DQ_WEBHOOK_CONNECT_TIMEOUT_S": "1",
        "DQ_WEBHOOK_TIMEOUT_S": "3",
        "DQ_REDELIVER_PER_JOB": "40",
    }


def tenant_secret(env: dict[str, str], tenant: str) -> str:
    """A tenant's webhook secret, as the operator reads it with `dq keys webhook-secret`."""
    out = subprocess.run(
        [sys.executable, "-m", "core.cli", "keys", "webhook-secret", tenant],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_each_tenant_signs_with_its_own_secret_and_is_named(
    tenant_env: dict[str, str],
    gateway_factory: GatewayFactory,
    receivers: Callable[..., Receiver],
    sender_factory: Callable[[dict[str, str]], SenderProcess],
) -> None:
    gateway = gateway_factory(tenant_env)
    sender_factory(tenant_env)
    receiver = receivers(Answer())
    with client_for(gateway) as alice:
        submit_and_cancel(alice, receiver.url)
    wait_until(lambda: receiver.hits, 30, "alice's delivery")
    hit = receiver.hits[0]
    alices, bobs = tenant_secret(tenant_env, "alice"), tenant_secret(tenant_env, "bob")
    assert alices != bobs
    event = Webhook(alices).verify(hit.body, hit.headers)
    assert event["tenant"] == "alice"
    assert json.loads(hit.body)["tenant"] == "alice"
    with pytest.raises(WebhookVerificationError):
        Webhook(bobs).verify(hit.body, hit.headers)  # another tenant cannot sign as alice


def test_a_slow_receiver_of_one_tenant_does_not_delay_another(
    tenant_env: dict[str, str],
    gateway_factory: GatewayFactory,
    receivers: Callable[..., Receiver],
    sender_factory: Callable[[dict[str, str]], SenderProcess],
) -> None:
    gateway = gateway_factory(tenant_env)
    sender_factory(tenant_env)
    hanging, quick = receivers(Answer(hang_s=30)), receivers(Answer())
    with client_for(gateway) as alice, client_for(gateway, BOB_KEY) as bob:
        job = submit_and_cancel(alice, hanging.url)
        wait_until(lambda: hanging.hits, 30, "alice's first delivery")
        for _ in range(24):  # every sender thread would be busy waiting on alice's receiver
            assert alice.post(f"/v1/jobs/{job}/webhooks/redeliver").status_code == 202
        time.sleep(0.5)
        sent = time.monotonic()
        submit_and_cancel(bob, quick.url)
        wait_until(lambda: quick.hits, 30, "bob's delivery")
    delay = time.monotonic() - sent
    assert delay < 2.0
    print(f"\nbob's event delivered in {delay * 1000:.0f} ms beside 24 of alice's hanging ones")


def test_redeliveries_are_limited_per_job_and_per_tenant(
    tenant_env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway]
) -> None:
    env = {**tenant_env, "DQ_REDELIVER_PER_JOB": "3", "DQ_REDELIVER_PER_TENANT": "5"}
    gateway = gateway_factory(env)
    with client_for(gateway) as alice:
        first = submit_and_cancel(alice, "http://127.0.0.1:9/hook")
        second = submit_and_cancel(alice, "http://127.0.0.1:9/hook")
        answers = [alice.post(f"/v1/jobs/{first}/webhooks/redeliver") for _ in range(4)]
        assert [a.status_code for a in answers] == [202, 202, 202, 429]
        assert answers[3].json()["error"]["limit"] == "redeliver_per_job"
        assert int(answers[3].headers["retry-after"]) > 0
        more = [alice.post(f"/v1/jobs/{second}/webhooks/redeliver") for _ in range(3)]
        assert [a.status_code for a in more] == [202, 202, 429]
        assert more[2].json()["error"]["limit"] == "redeliver_per_tenant"


def test_a_tenants_secret_rotates_with_both_signing_until_it_is_finished(
    tenant_env: dict[str, str],
    gateway_factory: GatewayFactory,
    receivers: Callable[..., Receiver],
    sender_factory: Callable[[dict[str, str]], SenderProcess],
) -> None:
    gateway = gateway_factory(tenant_env)
    sender_factory(tenant_env)
    receiver = receivers(Answer())
    old = tenant_secret(tenant_env, "alice")
    rotate = [sys.executable, "-m", "core.cli", "keys", "webhook-secret", "alice"]
    run = {"cwd": ROOT, "env": {**os.environ, **tenant_env}, "capture_output": True, "text": True}
    both = subprocess.run([*rotate, "--rotate"], **run).stdout.split()  # type: ignore[call-overload]
    assert both[0] == old
    new = both[1]
    with client_for(gateway) as alice:
        submit_and_cancel(alice, receiver.url)
        wait_until(lambda: receiver.hits, 30, "a delivery during the rotation")
        during = receiver.hits[-1]
        assert subprocess.run([*rotate, "--finish"], **run).stdout.split() == [new]  # type: ignore[call-overload]
        submit_and_cancel(alice, receiver.url)
        wait_until(lambda: len(receiver.hits) == 2, 30, "a delivery after it")
        after = receiver.hits[-1]
    for secret in (old, new):  # receivers on either secret accept what is sent meanwhile
        Webhook(secret).verify(during.body, during.headers)
    Webhook(new).verify(after.body, after.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(after.body, after.headers)
