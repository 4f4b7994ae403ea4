"""Typed settings read once per process from `DQ_`-prefixed environment variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.callbacks import DEFAULT_SCHEDULE
from core.errors import ConfigError
from core.signing import InvalidSecret, parse_secret

DAY_S = 86_400
TENANT_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
MIN_API_KEY_LENGTH = 24  # ~143 bits as token_urlsafe characters: out of reach of guessing


class Settings(BaseSettings):
    """Every knob of the service; each field is the env var `DQ_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="DQ_", extra="ignore", frozen=True)

    # Where things live.
    redis_url: str | None = Field(None, description="redis://host:port/db; unset under `dq up`")
    # Redis behind Sentinel (core/connections.py): the sentinels' addresses turn it on; the
    # master's password, user and DB still come from redis_url, whose host is then not used.
    redis_sentinels: Annotated[tuple[tuple[str, int], ...], NoDecode] = Field(
        (), description="host:port,host:port of the Redis Sentinels (failover)"
    )
    redis_master: str = Field("mymaster", description="the master's name the sentinels monitor")
    redis_sentinel_password: SecretStr | None = Field(None, description="the sentinels' own")
    redis_timeout_s: float = Field(5.0, gt=0, description="longest wait for one Redis reply")
    data_dir: Path = Field(Path("data"), description="local state for `dq up` (Redis, images)")
    storage_url: str | None = Field(None, description="s3://bucket/prefix or file:///dir")
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    url_ttl_s: int = Field(3600, ge=10, le=7 * DAY_S)
    secret_key: SecretStr | None = Field(None, description="signs local file URLs")

    # The model.
    model: str = "tiny"
    worker_model: str | None = Field(None, description="the catalog model a worker serves")
    upload_ttl_s: int = Field(3600, ge=60, description="how long an unused upload is kept")
    max_run_s: float | None = Field(
        None, gt=0, description="a job running longer fails (run_timeout); a catalog entry's wins"
    )
    model_cache: Path = Path.home() / ".cache" / "diffusion-queue" / "models"
    # How a worker runs its jobs: whole pipeline calls per batch, or the step engine's loop that
    # jobs join at every denoising step (worker/stepper.py); jobs it cannot run go in batches.
    engine: Literal["batch", "step"] = Field(
        "batch", description="batch: a pipeline call per batch; step: jobs join at every step"
    )
    # A `module:function` the worker calls instead of worker.inference.load_engine, with the same
    # arguments, for an engine of one's own (a custom runtime, or the faulty engines of the tests).
    engine_factory: str | None = Field(
        None, pattern=r"^[\w.]+:\w+$", description="module:function that loads the engine"
    )
    device: str | None = None
    dtype: str | None = None
    cpu_threads: int | None = Field(None, ge=1, le=256)
    max_side: int = Field(2048, ge=64, le=4096)
    # Many models: a catalog file (TOML) naming each, and a folder of LoRA files.
    models: Path | None = Field(None, description="catalog file; unset: DQ_MODEL alone")
    loras: Path | None = Field(None, description="folder of LoRA *.safetensors files")
    lora_cache_mb: int = Field(1024, ge=0, description="LoRA weights a worker keeps loaded")
    # Image inputs (img2img, inpaint) are untrusted: caps on what a worker fetches and decodes.
    input_max_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    input_max_pixels: int = Field(4096 * 4096, ge=64 * 64)
    input_timeout_s: float = Field(15.0, gt=0)
    input_allow_private: bool = Field(False, description="local development only")

    # Batching (the seed's knob names).
    max_batch_size: int = Field(4, ge=1, le=64)
    batch_timeout_s: float = Field(0.5, ge=0.0, le=60.0)
    max_batch_pixels: int = Field(2048 * 2048, ge=64 * 64)
    early_flush: bool = True
    progress_interval_s: float = Field(0.25, ge=0.0)

    # Jobs and the queue.
    queue_name: str = "dq.jobs"
    job_ttl_s: int = Field(7 * DAY_S, ge=60)
    max_queue: int = Field(10_000, ge=1)
    max_attempts: int = Field(3, ge=1, le=100)
    lease_s: float = Field(30.0, gt=0)
    heartbeat_s: float = Field(5.0, gt=0)
    # A worker whose work loop has not moved (an iteration, a denoising step) for this long is
    # stuck: the scaler and the recovery sweep count it dead, whatever its heartbeat thread says,
    # and its liveness probe (worker/health.py) fails. Above the slowest model's slowest step.
    loop_stale_s: float = Field(120.0, gt=0)
    # A call whose every row was canceled is abandoned (the worker restarts itself) if it has not
    # stopped this long after the cancel was seen: one step of a huge job can take minutes.
    cancel_grace_s: float = Field(10.0, gt=0)
    # The same failure of the batch loop this many times in a row: the worker exits non-zero for
    # its supervisor to replace it.
    max_loop_failures: int = Field(5, ge=1)
    visibility_timeout_s: int = Field(600, ge=10)
    # A queued job that no broker message names for this long (a worker killed in the instant
    # between taking its message and kombu recording it) gets a new message from the reaper.
    lost_message_s: float = Field(60.0, gt=0)
    idempotency_ttl_s: int = Field(DAY_S, ge=60)
    # How often (at most) some process runs the recovery sweep: expired leases, lost dispatches,
    # deadlines, expired jobs' images. Every worker, scaler and gateway offers to; a lock picks one.
    sweep_interval_s: float = Field(5.0, gt=0)

    # Admission and dispatch: the ledger owns the queue (see README "Admission and dispatch").
    dispatch: Literal["fair", "fifo"] = Field(
        "fair", description="fair: priority classes and weighted fair sharing; fifo: arrival"
    )
    dispatch_margin: int = Field(
        2, ge=1, description="jobs dispatched beyond each live worker's next batch"
    )
    low_priority_max_wait_s: float = Field(
        120.0, gt=0, description="a `low` job waiting this long is dispatched next"
    )
    # A tenant's limits unless the key store sets its own (0: no limit).
    tenant_weight: float = Field(1.0, gt=0)
    tenant_rate: float = Field(20.0, ge=0, description="submits per second, sustained")
    tenant_burst: int = Field(200, ge=1, description="submits at once above the rate")
    tenant_max_queued: int = Field(1000, ge=0)
    tenant_max_running: int = Field(0, ge=0)
    tenant_quota_units: float = Field(0.0, ge=0, description="work units per quota window")
    tenant_quota_window_s: float = Field(3600.0, gt=0)
    tenant_max_job_units: float = Field(64.0, ge=0, description="the largest single job")
    tenant_max_priority: Literal["high", "normal", "low"] = "high"
    read_rate: float = Field(200.0, ge=0, description="reads per second per tenant (0: no limit)")
    read_burst: int = Field(400, ge=1)
    redeliver_per_job: int = Field(5, ge=1, description="webhook redeliveries per job per hour")
    redeliver_per_tenant: int = Field(60, ge=1, description="... per tenant per hour")

    # The gateway.
    api_keys: SecretStr = Field(SecretStr(""), description="tenant:key,tenant:key")
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    public_url: str | None = Field(None, description="base URL clients reach the gateway at")
    # Hardening of the gateway's HTTP server (api/protocol.py, api/middleware.py).
    trusted_proxies: str = Field(
        "", description="addresses or networks (10.0.0.0/8) whose X-Forwarded-* are believed"
    )
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request line and headers")
    max_headers: int = Field(100, ge=8)
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers arrive within")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's body arrives within")
    keepalive_timeout_s: int = Field(5, ge=1, description="idle keep-alive connections")
    max_connections: int = Field(2048, ge=16, description="open connections per process")
    auth_failures: int = Field(20, ge=1, description="failed authentications per peer and window")
    auth_failure_window_s: float = Field(60.0, gt=0)

    # Webhooks.
    webhook_secret: SecretStr = Field(
        SecretStr(""), description="whsec_… for every tenant (comma-separated while rotating)"
    )
    webhook_secrets: SecretStr = Field(
        SecretStr(""), description="tenant:whsec_…,… (a tenant listed twice is rotating)"
    )
    webhook_allow_private: bool = Field(False, description="local development only")
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = Field(
        DEFAULT_SCHEDULE, description="seconds to wait after attempt 1, 2, … (comma-separated)"
    )
    webhook_progress_interval_s: float = Field(5.0, ge=0.0)
    webhook_queue: str = "dq.webhooks"
    webhook_concurrency: int = Field(8, ge=1, le=256)
    webhook_tenant_concurrency: int = Field(
        2, ge=1, le=256, description="deliveries of one tenant at once per sender process"
    )
    webhook_connect_timeout_s: float = Field(5.0, gt=0)
    webhook_timeout_s: float = Field(15.0, gt=0)

    # The scaler (the seed's knobs: min/max workers, interval; ours: target wait, windows).
    scaler_backend: Literal["process", "docker", "kubernetes"] = "process"
    scaler_min: int = Field(1, ge=0)
    scaler_max: int = Field(1, ge=1)
    scaler_interval_s: float = Field(5.0, gt=0)
    scaler_target_wait_s: float = Field(5.0, gt=0)
    scaler_down_window_s: float = Field(120.0, ge=0)
    scaler_cooldown_s: float = Field(300.0, ge=0)
    scaler_max_step_up: int = Field(4, ge=1)
    scaler_drain_timeout_s: float = Field(300.0, gt=0, description="longer than the worst batch")
    scaler_gpus: str = Field("", description="GPU ids for the process backend, e.g. 0,1,2,3")
    scaler_docker_project: str = "diffusion-queue"
    # Backend names of a model's workers; `{model}` becomes the catalog name. A name without it
    # is one model's: the catalog's default.
    scaler_docker_service: str = Field("worker", description="compose service, e.g. worker-{model}")
    scaler_k8s_deployment: str = Field(
        "dq-worker", description="Deployment, e.g. dq-worker-{model}"
    )
    scaler_models: str = Field(
        "", description="models the scaler sizes, comma-separated; empty: every catalog model"
    )
    scaler_backend_timeout_s: float = Field(
        30.0, gt=0, description="longest wait for one Docker or Kubernetes API call"
    )
    scaler_k8s_namespace: str = "default"
    scaler_low_priority_scales: bool = Field(
        True, description="false: `low` work alone never adds workers above the minimum"
    )

    log_level: str = "INFO"

    @field_validator("storage_url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme == "s3" and parts.netloc:
            return value
        if parts.scheme == "file" and parts.path:
            return value
        raise ValueError(
            f"unsupported storage URL {value!r}: use s3://bucket/prefix or file:///absolute/dir"
        )

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _addresses(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(_address(item) for item in value.replace(" ", "").split(",") if item)
        return value

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _delays(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(v) for v in value.replace(" ", "").split(",") if v)
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v < 0 for v in value):
            raise ValueError("retry delays are seconds and must not be negative, e.g. 5,300,1800")
        return value

    @model_validator(mode="after")
    def _webhook_secrets_parse(self) -> Self:
        try:
            for secret in self._global_secrets() + [s for _, s in self._tenant_secrets()]:
                parse_secret(secret)
        except InvalidSecret as e:
            raise ValueError(f"DQ_WEBHOOK_SECRET(S): {e.message}") from e
        return self

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Self:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError("DQ_HEARTBEAT_S must be shorter than DQ_LEASE_S")
        return self

    @property
    def storage(self) -> str:
        """The storage URL, defaulting to a folder under the data dir."""
        return self.storage_url or (self.data_dir.resolve() / "images").as_uri()

    def tenants(self) -> dict[str, tuple[str, str]]:
        """Map each configured API key to its tenant and role (`tenant:key[:admin]`)."""
        keys: dict[str, tuple[str, str]] = {}
        for item in self.api_keys.get_secret_value().split(","):
            if not item.strip():
                continue
            tenant, sep, rest = item.strip().partition(":")
            key, _, role = rest.partition(":")
            if not sep or not re.fullmatch(TENANT_NAME, tenant) or not key:
                raise ConfigError("DQ_API_KEYS must look like tenant:key,tenant2:key2[:admin]")
            if role not in ("", "user", "admin"):
                raise ConfigError(f"DQ_API_KEYS: unknown role {role!r}: use user or admin")
            if len(key) < MIN_API_KEY_LENGTH:
                raise ConfigError(
                    f"DQ_API_KEYS: the key of tenant {tenant!r} has {len(key)} characters; use at"
                    f" least {MIN_API_KEY_LENGTH} random ones, e.g. from"
                    " `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
                )
            keys[key] = (tenant, role or "user")
        return keys

    def url_secret(self) -> bytes | None:
        """The key that signs local file URLs; None when unset or empty."""
        if self.secret_key is None or not self.secret_key.get_secret_value().strip():
            return None
        return self.secret_key.get_secret_value().encode()

    def proxies(self) -> list[str]:
        """The trusted proxies' addresses (X-Forwarded-* from anyone else is ignored)."""
        return [p.strip() for p in self.trusted_proxies.split(",") if p.strip()]

    def webhook_signing_secrets(self, tenant: str) -> list[str]:
        """The secrets that sign a tenant's webhooks: its own, else the global ones."""
        own = [secret for name, secret in self._tenant_secrets() if name == tenant]
        return own or self._global_secrets()

    def _global_secrets(self) -> list[str]:
        raw = self.webhook_secret.get_secret_value()
        return [s for s in raw.replace(" ", ",").split(",") if s]

    def _tenant_secrets(self) -> list[tuple[str, str]]:
        pairs = []
        for item in self.webhook_secrets.get_secret_value().split(","):
            if not item.strip():
                continue
            tenant, sep, secret = item.strip().partition(":")
            if not sep or not tenant or not secret:
                raise ValueError("DQ_WEBHOOK_SECRETS must look like tenant:whsec_…,tenant2:whsec_…")
            pairs.append((tenant, secret))
        return pairs

    def require_redis(self) -> str:
        """The Redis URL, or a clear error naming the variable to set."""
        if not self.redis_url:
            raise ConfigError("DQ_REDIS_URL is not set: point it at Redis (redis://host:6379/0)")
        return self.redis_url


def _address(item: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as a pair; a clear error otherwise."""
    host, sep, port = item.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{item!r} is not host:port (e.g. sentinel-0:26379,sentinel-1:26379)")
    return host.strip("[]"), int(port)


def load_settings(**overrides: object) -> Settings:
    """Read the environment once, turning validation errors into one readable ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        lines = [
            f"DQ_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: {err['msg']}"
            for err in e.errors()
        ]
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from e
