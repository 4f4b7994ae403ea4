"""How each variant is set up: its DQ_ settings, the jobs it is sent, and the order of its points.

The system variants differ only in settings: batched (the defaults with early flush), unbatched
(`DQ_MAX_BATCH_SIZE=1`), fixed timeout (`DQ_EARLY_FLUSH=false` and the seed's `batch_timeout_s`),
and the gateway alone (no worker). The direct baseline and the peer load the same model the same
way; every variant gets the same job body.
"""

from __future__ import annotations

from pathlib import Path

from bench.direct import DirectSpec
from bench.machine import machine
from bench.plan import Plan, Served, Variant
from bench.report import CpuSharing
from bench.system import API_KEY

PROMPT = "a red fox in the snow, watercolour"
STACKS: tuple[Variant, ...] = ("system", "unbatched", "fixed", "gateway")
# A Redis database per stack keeps their queues and ledgers apart.
DATABASES = {name: i + 1 for i, name in enumerate(STACKS)}


def direct_spec(plan: Plan) -> DirectSpec:
    """The direct baseline (and the peer's model) for this plan."""
    return DirectSpec(
        model=plan.model,
        cache_dir=plan.model_cache,
        device=plan.device,
        dtype=plan.dtype,
        threads=plan.threads,
        width=plan.width,
        height=plan.height,
        steps=plan.steps,
        guidance_scale=plan.guidance_scale,
        prompt=PROMPT,
        batch_sizes=tuple(sorted({1, plan.batch})),
        repeats=plan.direct_repeats,
    )


def job_body(plan: Plan) -> dict[str, object]:
    """What every job asks for (each gets its own seed)."""
    return {
        "prompt": PROMPT,
        "width": plan.width,
        "height": plan.height,
        "steps": plan.steps,
        "guidance_scale": plan.guidance_scale,
    }


def base_env(plan: Plan, work: Path) -> dict[str, str]:
    """The DQ_ settings every stack shares."""
    env = {
        "DQ_MODEL": plan.model,
        "DQ_MODEL_CACHE": str(plan.model_cache),
        "DQ_DATA_DIR": str(work / "data"),
        "DQ_SECRET_KEY": "bench-secret-for-local-urls-only",
        "DQ_API_KEYS": f"bench:{API_KEY}",
        "DQ_LOG_LEVEL": "WARNING",
        "DQ_HEARTBEAT_S": "1",  # a worker is seen ready within a second of loading
        "DQ_MAX_BATCH_SIZE": str(plan.batch),
        "DQ_BATCH_TIMEOUT_S": str(plan.batch_timeout_s),
        "DQ_EARLY_FLUSH": "true",
        # The load generator is one tenant: no rate, queue or size limit may shape what it sees.
        "DQ_TENANT_RATE": "0",
        "DQ_TENANT_MAX_QUEUED": "0",
        "DQ_TENANT_MAX_JOB_UNITS": "0",
        "DQ_READ_RATE": "0",
    }
    optional = {"DQ_CPU_THREADS": plan.threads, "DQ_DEVICE": plan.device, "DQ_DTYPE": plan.dtype}
    return env | {k: str(v) for k, v in optional.items() if v is not None}


def stack_env(plan: Plan, name: Variant) -> dict[str, str]:
    """What sets each stack apart."""
    return {
        "system": {},
        "unbatched": {"DQ_MAX_BATCH_SIZE": "1"},
        "fixed": {"DQ_EARLY_FLUSH": "false", "DQ_BATCH_TIMEOUT_S": str(plan.fixed_timeout_s)},
        "gateway": {"DQ_MAX_QUEUE": "10000000"},  # the burst queues tens of thousands of jobs
    }.get(name, {})


def schedule(plan: Plan) -> list[tuple[Served, int]]:
    """Closed-loop points in the order run: saturation of every variant first, then one user."""
    sat, full = plan.saturation_users, plan.mode == "full"
    users: dict[Served, tuple[int, ...]] = {
        "system": plan.users,
        "unbatched": (1, sat) if full else (sat,),
        "fixed": tuple(sorted({1, max(1, plan.batch // 2), sat})) if full else (1,),
        "peer": plan.users if full else (1, sat),
    }
    points = [(v, n) for v, ns in users.items() for n in ns if plan.wants(v)]
    return sorted(points, key=lambda p: (p[1] != sat, p[1] != 1, p[1]))


def cpu_sharing(plan: Plan) -> CpuSharing:
    """How the run divided the cores, in words and numbers."""
    cores = machine().cores
    threads = plan.threads
    rest = "the rest" if threads is None else f"the other {max(0, cores - threads)} core(s)"
    note = (
        f"The model runs {threads or 'torch-default'} CPU thread(s) (DQ_CPU_THREADS: torch's "
        f"intra- and inter-op pools) in each of {plan.workers} worker(s), in the direct baseline "
        f"and in LitServe; {rest} are left to the load generator, the gateway, Redis and "
        "the worker's Celery and batching threads. Each point's cpu_cores says how many cores "
        "each role used, and `others` the load from outside the bench (other users of the machine)."
    )
    return CpuSharing(cores=cores, model_threads=threads, note=note)
