"""What a submit is checked and shaped by before the ledger sees it: the catalog's defaults and
limits, the tenant's key limits, the webhook, the deadline, and the 429 for a limit the submit
script hit."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re

from api.resources import Resources
from core import keys
from core.choice import check_request
from core.errors import LimitExceeded, ValidationFailed
from core.events import WebhookSpec
from core.jobs import JobCreate, JobRequest, LoraRef
from core.store import Admission
from core.tenants import TenantLimits, signing_secrets
from core.urlguard import check_url


def fingerprint(request: JobCreate) -> str:
    """What makes two submissions 'the same' for Idempotency-Key: the body as sent (fields left
    at their defaults left out, so a field added later does not change it)."""
    body = request.model_dump(mode="json", exclude_defaults=True)
    canonical = json.dumps(body, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def checked_webhook(res: Resources, tenant: str, spec: WebhookSpec | None) -> None:
    """Refuse a webhook this server cannot sign or must not call (the guard runs again at send)."""
    if spec is None:
        return
    if not signing_secrets(res.settings, tenant, None):
        raise ValidationFailed(
            "webhooks are not enabled on this server: its operator must set DQ_SECRET_KEY",
            field="webhook",
            code="webhooks_disabled",
        )
    # Resolving the host blocks; keep it off the event loop.
    await asyncio.to_thread(check_url, spec.url, allow_private=res.settings.webhook_allow_private)


def resolved(res: Resources, request: JobCreate) -> JobRequest:
    """The request as it will run: its model's defaults filled in, checked against the catalog
    (model, task, inputs, LoRAs, size, steps), or a 422 naming the field to fix."""
    checked = check_request(res.catalog, request)
    spec = checked.spec
    guidance = request.guidance_scale
    return request.job_request(
        model=spec.name,
        task=checked.task,
        width=checked.width,
        height=checked.height,
        steps=checked.steps,
        guidance_scale=spec.defaults.guidance_scale if guidance is None else guidance,
        strength=checked.strength,
        loras=[LoraRef(name=name, scale=scale) for name, scale in checked.loras],
    )


DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_DEADLINE_S = 7 * 86_400


def deadline_of(deadline_s: float | None, cancel_after: str | None) -> float | None:
    """Seconds after submit the job must have finished by: the body's, else the header's."""
    if deadline_s is not None or cancel_after is None:
        return deadline_s
    match = DURATION.fullmatch(cancel_after.strip())
    seconds = float(match.group(1)) * UNITS_S[match.group(2)] if match else 0.0
    if not 0 < seconds <= MAX_DEADLINE_S:
        raise ValidationFailed(
            "Cancel-After must be a duration such as 30, 90s, 5m or 1h, at most 7 days",
            field="Cancel-After",
        )
    return seconds


def admissible(asked: JobRequest, limits: TenantLimits) -> JobRequest:
    """The request as the tenant's key may have it run, or a 422 naming the limit."""
    if limits.max_job_units and asked.units > limits.max_job_units:
        raise ValidationFailed(
            f"the job is {asked.units:.2f} work units; your key may submit at most "
            f"{limits.max_job_units:g} per job (fewer images, steps or pixels)",
            field="body",
            code="job_too_large",
        )
    capped = CLASS_RANK[asked.priority] < CLASS_RANK[limits.max_priority]
    return asked.model_copy(update={"priority": limits.max_priority}) if capped else asked


CLASS_RANK = {klass: i for i, klass in enumerate(keys.CLASSES)}  # 0 = served first


def limit_error(admission: Admission, limits: TenantLimits) -> LimitExceeded:
    """The 429 for a limit the submit script hit, with the IETF RateLimit policy it enforces."""
    name, retry = admission.limit, admission.retry_after_s
    if name == "rate":
        window = max(1, round(limits.burst / limits.rate)) if limits.rate else 1
        policy = f'"rate";q={limits.burst};w={window}'
        message = f"over {limits.rate:g} submits/s (burst {limits.burst}); retry in {retry:.1f} s"
    elif name == "quota":
        policy = f'"quota";q={limits.quota_units:g};w={round(limits.quota_window_s)}'
        message = f"over the quota of {limits.quota_units:g} work units per window"
    else:
        policy = f'"max_queued";q={limits.max_queued}'
        message = f"already {limits.max_queued} jobs queued; wait for some to run"
    return LimitExceeded(
        message, limit=name, retry_after_s=retry, policy=policy, remaining=admission.remaining
    )
