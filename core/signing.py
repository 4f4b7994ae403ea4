"""Standard Webhooks (v1, HMAC-SHA256) signatures for outgoing callbacks."""

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from secrets import token_bytes

from core.errors import ConfigError

SECRET_PREFIX = "whsec_"
# The spec asks for 24 to 64 random bytes; we generate 32.
_MIN_SECRET_BYTES = 24
_MAX_SECRET_BYTES = 64
_NEW_SECRET_BYTES = 32


class InvalidSecret(ConfigError):
    """A webhook secret that is not `whsec_` followed by 24 to 64 base64-encoded bytes."""


def new_secret() -> str:
    """Return a fresh random secret in the spec's `whsec_<base64>` form."""
    raw = token_bytes(_NEW_SECRET_BYTES)
    return SECRET_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_secret(secret: str) -> bytes:
    """Return the key bytes of a `whsec_<base64>` secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSecret(f"webhook secret must start with {SECRET_PREFIX!r}")
    encoded = secret.removeprefix(SECRET_PREFIX)
    # Receivers' libraries accept unpadded base64, so we do too.
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except binascii.Error as e:
        raise InvalidSecret("webhook secret is not valid base64 after 'whsec_'") from e
    if not _MIN_SECRET_BYTES <= len(key) <= _MAX_SECRET_BYTES:
        raise InvalidSecret(
            f"webhook secret must decode to {_MIN_SECRET_BYTES}-{_MAX_SECRET_BYTES} bytes,"
            f" not {len(key)}; generate one with new_secret()"
        )
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the `v1,<base64>` signature of one message attempt."""
    # A dot in the id would make two different (id, timestamp) pairs sign the same bytes.
    if "." in msg_id:
        raise ValueError(f"webhook id must not contain '.': {msg_id!r}")
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(parse_secret(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_headers(
    secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Return the three webhook headers, one signature per secret (several while rotating)."""
    if not secrets:
        raise ValueError("at least one webhook secret is needed to sign")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets),
    }
