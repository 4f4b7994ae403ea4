"""Checking a webhook delivery's signature (Standard Webhooks, v1 HMAC-SHA256)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from dq_client.errors import WebhookVerificationError

TOLERANCE_S = 300  # the spec's five minutes: older (or newer) deliveries may be replays


def _key(secret: str) -> bytes:
    encoded = secret.removeprefix("whsec_")
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as e:
        raise WebhookVerificationError("the secret is not whsec_ followed by base64") from e


def _headers(headers: Mapping[str, str]) -> tuple[str, str, str]:
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        return lower["webhook-id"], lower["webhook-timestamp"], lower["webhook-signature"]
    except KeyError as e:
        raise WebhookVerificationError(f"missing header {e.args[0]}") from e


def verify_webhook(
    secret: str,
    body: bytes | str,
    headers: Mapping[str, str],
    *,
    tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """The delivery's JSON payload, once its signature and timestamp check out.

    `body` must be the raw request body, byte for byte; `headers` the request's headers (any
    case). Raises `WebhookVerificationError` for a missing header, a stale or future timestamp,
    or no valid `v1` signature. Deliveries are retried with the same `webhook-id`: dedupe on it.
    """
    raw = body.encode() if isinstance(body, str) else body
    msg_id, stamp, signatures = _headers(headers)
    try:
        sent_at = int(stamp)
    except ValueError as e:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from e
    if abs((time.time() if now is None else now) - sent_at) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too old or too new")
    signed = f"{msg_id}.{stamp}.".encode() + raw
    expected = base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest())
    for candidate in signatures.split():  # several during a secret rotation
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            payload: dict[str, Any] = json.loads(raw)
            return payload
    raise WebhookVerificationError("no valid signature")
