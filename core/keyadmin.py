"""`dq keys`: make, list and revoke API keys; set a tenant's limits; show its webhook secret.

Talks to the ledger's Redis directly (DQ_REDIS_URL, or the one `dq up` runs, which it finds in the
data folder). A key is printed once, when it is made; only its SHA-256 is kept. Every change is
announced, so each gateway process refuses a revoked key within a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from redis import Redis
from redis.exceptions import RedisError

from core import connections
from core.errors import ConfigError
from core.settings import Settings, load_settings
from core.tenants import KeyStore, Role, TenantLimits, signing_secrets, webhook_versions

LIMITS = {
    "weight": "share of the queue against other tenants (default 1)",
    "rate": "submits per second, sustained (0: no limit)",
    "burst": "submits at once above the rate",
    "max_queued": "jobs queued at once (0: no limit)",
    "max_running": "jobs dispatched or running at once (0: no limit)",
    "quota_units": "work units per quota window (0: no quota)",
    "quota_window_s": "the quota window, seconds",
    "max_job_units": "the largest single job, in work units (0: no limit)",
    "max_priority": "the highest class its jobs may ask for: high, normal or low",
    "read_rate": "reads (GETs) per second per gateway process (0: no limit)",
    "read_burst": "reads at once above that",
    "retention_s": "how long finished jobs are kept (at most DQ_JOB_TTL_S)",
}


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="dq keys", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="a new key for a tenant (printed once)")
    create.add_argument("tenant")
    create.add_argument("--role", choices=[r.value for r in Role], default="user")
    _limit_flags(create)
    listing = sub.add_parser("list", help="live keys (ids, tenants, roles; never the keys)")
    listing.add_argument("--json", action="store_true")
    revoke = sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    limits = sub.add_parser("limits", help="show a tenant's limits, or change some")
    limits.add_argument("tenant")
    _limit_flags(limits)
    secret = sub.add_parser("webhook-secret", help="a tenant's webhook signing secret(s)")
    secret.add_argument("tenant")
    turn = secret.add_mutually_exclusive_group()
    turn.add_argument("--rotate", action="store_true", help="start a rotation: old and new sign")
    turn.add_argument("--finish", action="store_true", help="end a rotation: only the new signs")
    return p


def _limit_flags(p: argparse.ArgumentParser) -> None:
    for name, text in LIMITS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, help=text)


def beside_dq_up(settings: Settings) -> Settings:
    """The settings, with what `dq up` keeps in its data folder where the environment is silent:
    the Redis it runs and the deployment's secret key."""
    folder = Path(settings.data_dir)
    update: dict[str, object] = {}
    if not settings.redis_url and (folder / "redis.url").is_file():
        update["redis_url"] = (folder / "redis.url").read_text().strip()
    if settings.secret_key is None and (folder / "secret_key").is_file():
        update["secret_key"] = SecretStr((folder / "secret_key").read_text().strip())
    return settings.model_copy(update=update)


def redis_of(settings: Settings) -> Redis:
    """The ledger's Redis."""
    if not settings.redis_url:
        raise ConfigError(
            "no Redis to talk to: set DQ_REDIS_URL, or run this beside `dq up` (same DQ_DATA_DIR)"
        )
    return connections.sync_client(settings)


def main(argv: list[str] | None = None) -> int:
    """Run one action; exit 2 on bad input, 3 when Redis cannot be reached."""
    args = parser().parse_args(argv)
    try:
        settings = beside_dq_up(load_settings())
        store = KeyStore(redis_of(settings))
        return ACTIONS[args.action](store, settings, args)
    except ConfigError as e:
        print(f"dq keys: {e.message}", file=sys.stderr)
        return 2
    except RedisError as e:
        print(f"dq keys: Redis unreachable: {e}", file=sys.stderr)
        return 3


def create(store: KeyStore, settings: Settings, args: argparse.Namespace) -> int:
    """Make a key; a tenant's first key also shows the tenant's webhook secret."""
    first = not any(r.tenant == args.tenant for r in store.records())
    limits = _given(args)
    key, record = store.create(args.tenant, Role(args.role))
    if limits:
        store.set_limits(args.tenant, limits)
    print(f"key:    {key}")
    print(f"id:     {record.id}  (tenant {record.tenant}, role {record.role.value})")
    print("Keep the key now: it is never shown again (only its hash is stored).")
    if first:
        for secret in _secrets(store, settings, args.tenant):
            print(f"webhook secret: {secret}  (verifies this tenant's deliveries)")
    return 0


def listing(store: KeyStore, settings: Settings, args: argparse.Namespace) -> int:
    """The live keys."""
    records = store.records()
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return 0
    for r in records:
        print(f"{r.id}  {r.tenant:<20} {r.role.value:<6} created {r.created_at:.0f}")
    return 0


def revoke(store: KeyStore, settings: Settings, args: argparse.Namespace) -> int:
    """Revoke a key by id."""
    if not store.revoke(args.key_id):
        print(f"dq keys: no live key {args.key_id}", file=sys.stderr)
        return 2
    print(f"revoked {args.key_id}")
    return 0


def limits(store: KeyStore, settings: Settings, args: argparse.Namespace) -> int:
    """Change some of a tenant's limits (if given) and show them all."""
    given = _given(args)
    if given:
        store.set_limits(args.tenant, given)
    current = TenantLimits.of(settings).merged(store.tenant_settings(args.tenant))
    print(json.dumps(current.model_dump(mode="json"), indent=2))
    return 0


def webhook_secret(store: KeyStore, settings: Settings, args: argparse.Namespace) -> int:
    """Show (and maybe rotate) the secrets that sign a tenant's deliveries."""
    if args.rotate or args.finish:
        store.rotate_webhook_secret(args.tenant, finish=args.finish)
    for secret in _secrets(store, settings, args.tenant):
        print(secret)
    return 0


def _secrets(store: KeyStore, settings: Settings, tenant: str) -> list[str]:
    versions = store.tenant_settings(tenant).get("webhook_versions")
    found = signing_secrets(settings, tenant, versions)
    if not found:
        raise ConfigError("webhooks are off: set DQ_SECRET_KEY (or DQ_WEBHOOK_SECRET)")
    webhook_versions(versions)  # well-formed
    return found


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in LIMITS if getattr(args, name) is not None}


ACTIONS = {
    "create": create,
    "list": listing,
    "revoke": revoke,
    "limits": limits,
    "webhook-secret": webhook_secret,
}


if __name__ == "__main__":
    sys.exit(main())
