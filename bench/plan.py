"""What one `dq bench` invocation measures: the mode's defaults with the command line on top."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

Variant = Literal["direct", "system", "unbatched", "fixed", "peer", "gateway"]
Served = Literal["system", "unbatched", "fixed", "peer"]  # the variants that make images
VARIANTS: tuple[Variant, ...] = ("direct", "system", "unbatched", "fixed", "peer", "gateway")
Mode = Literal["quick", "full", "gpu"]


class Plan(BaseModel):
    """Every knob of a run; the report repeats it."""

    model_config = ConfigDict(frozen=True)

    mode: Mode
    out: Path
    url: str | None = None  # a running gateway: only it (and the direct baseline) is measured
    api_key: str | None = None

    model: str = "tiny"
    model_cache: Path
    device: str | None = None
    dtype: str | None = None
    width: int = 64
    height: int = 64
    steps: int = 4
    guidance_scale: float = 7.5
    threads: int | None = 1  # the model's CPU threads (DQ_CPU_THREADS), in every variant

    batch: int = 4  # max_batch_size of the batched variants and the peer
    batch_timeout_s: float = 0.5  # the batched system's and the peer's
    fixed_timeout_s: float = 10.0  # the fixed-timeout variant's (early flush off)
    workers: int = 1
    storage: str = "file"  # file, moto (S3 on loopback), or s3://bucket/prefix (with endpoint env)

    users: tuple[int, ...] = (1, 8)  # closed-loop sweep of the batched system and the peer
    rates: tuple[float, ...] = ()  # open-loop arrivals/s; empty: fractions of saturation
    load_fractions: tuple[float, ...] = (0.5,)
    duration_s: float = 8.0  # per load point, warm-up included
    warmup_s: float = 2.0
    poll_s: float = 0.02
    wait: Literal["hold", "fixed", "eta"] = "hold"  # how clients wait for a job (see load.LoadSpec)
    direct_repeats: int = 5
    rounds: int = 1  # saturation points of system, unbatched and peer, taken in turn this often

    gateway_clients: int = 300
    gateway_rate: float = 1500.0  # paced submits/s for the latency target
    gateway_duration_s: float = 3.0

    variants: tuple[Variant, ...] = VARIANTS
    gpu_batches: tuple[int, ...] = (1, 4, 8)
    gpu_compile: bool = True  # GPU mode: also time the UNet under torch.compile

    @property
    def saturation_users(self) -> int:
        """Closed-loop users that keep every worker's next batch waiting: two batches each."""
        return 2 * self.batch * self.workers

    def wants(self, variant: Variant) -> bool:
        """Whether this run measures `variant`."""
        return variant in self.variants and (self.url is None or variant in ("direct", "system"))


QUICK = {
    "steps": 4,
    "batch": 4,
    "load_fractions": (0.5,),
    "duration_s": 5.5,
    "warmup_s": 1.5,
    "rounds": 3,
    "fixed_timeout_s": 2.0,
    "direct_repeats": 4,
    "gateway_duration_s": 2.0,
}
FULL = {
    "steps": 8,
    "batch": 8,
    "load_fractions": (0.25, 0.5, 0.75, 1.0, 1.2),
    "duration_s": 30.0,
    "warmup_s": 5.0,
    "fixed_timeout_s": 10.0,
    "direct_repeats": 10,
    "rounds": 3,
    "gateway_duration_s": 10.0,
}
GPU = {
    "model": "sd15-random",
    "device": "cuda",
    "dtype": "bf16",
    "width": 512,
    "height": 512,
    "steps": 25,
    "threads": None,
    "batch": 8,
    "duration_s": 60.0,
    "warmup_s": 15.0,
    "batch_timeout_s": 0.1,
    "direct_repeats": 5,
}
DEFAULTS: dict[Mode, dict[str, object]] = {"quick": QUICK, "full": FULL, "gpu": GPU}


def make_plan(mode: Mode, out: Path, model_cache: Path, **given: object) -> Plan:
    """The mode's defaults, overridden by what was given (None means not given)."""
    chosen = {k: v for k, v in given.items() if v is not None}
    fields = {**DEFAULTS[mode], **chosen, "mode": mode, "out": out, "model_cache": model_cache}
    plan = Plan.model_validate(fields)
    if "users" in chosen:
        return plan
    return plan.model_copy(update={"users": default_users(mode, plan.saturation_users)})


def default_users(mode: Mode, saturation: int) -> tuple[int, ...]:
    """A lone user and saturation; the full mode also the powers of two between and 2x beyond."""
    if mode != "full":
        return (1, saturation)
    sweep = {1, saturation, 2 * saturation}
    sweep |= {2**k for k in range(1, saturation.bit_length()) if 2**k < saturation}
    return tuple(sorted(sweep))
