"""Signatures checked by the Standard Webhooks reference library, as receivers will check them."""

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from core.signing import InvalidSecret, new_secret, parse_secret, sign, signature_headers

BODY = b'{"type":"job.succeeded","data":{"id":"job_1"}}'


def test_new_secret_parses_to_32_random_bytes() -> None:
    a, b = new_secret(), new_secret()
    assert a.startswith("whsec_")
    assert len(parse_secret(a)) == 32
    assert a != b


def test_parse_secret_accepts_unpadded_base64() -> None:
    key = bytes(range(25))
    unpadded = base64.b64encode(key).decode().rstrip("=")
    assert parse_secret("whsec_" + unpadded) == key


@pytest.mark.parametrize(
    ("secret", "says"),
    [
        ("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "must start with 'whsec_'"),
        ("whsec_not*base64!", "not valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "24-64 bytes, not 5"),
    ],
)
def test_parse_secret_refuses_malformed(secret: str, says: str) -> None:
    with pytest.raises(InvalidSecret, match=says):
        parse_secret(secret)


def test_signature_verifies_with_reference_library() -> None:
    secret = new_secret()
    headers = signature_headers([secret], "msg_1", int(time.time()), BODY)
    assert Webhook(secret).verify(BODY, headers) == {
        "type": "job.succeeded",
        "data": {"id": "job_1"},
    }
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}


def test_sign_matches_reference_library_byte_for_byte() -> None:
    secret, ts = new_secret(), int(time.time())
    ours = sign(secret, "msg_1", ts, BODY)
    theirs = Webhook(secret).sign("msg_1", datetime.fromtimestamp(ts, tz=UTC), BODY.decode())
    assert ours == theirs


def test_tampered_body_is_rejected() -> None:
    secret = new_secret()
    headers = signature_headers([secret], "msg_1", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(secret).verify(BODY.replace(b"job_1", b"job_2"), headers)


def test_stale_timestamp_is_rejected() -> None:
    secret = new_secret()
    headers = signature_headers([secret], "msg_1", int(time.time()) - 600, BODY)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(BODY, headers)


def test_rotation_sends_one_signature_per_secret_and_both_verify() -> None:
    old, new = new_secret(), new_secret()
    headers = signature_headers([old, new], "msg_1", int(time.time()), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_id_with_a_dot_is_refused() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        sign(new_secret(), "msg.1", 0, BODY)


def test_no_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        signature_headers([], "msg_1", 0, BODY)
