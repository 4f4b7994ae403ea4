"""A pool of workers per model: which models get one and with what bounds, the process backend's
workers per model, the loop deciding each pool on its own, and two models in one real `dq up`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from core import cli, heartbeats, keys
from core.catalog import Catalog, load_catalog
from core.embedded import free_port
from core.errors import ConfigError
from core.heartbeats import ScalerStatus, WorkerState
from core.launcher import Launch, children
from core.processes import stop_process
from core.recovery import Recovery, RecoveryConfig
from core.store import JobStore, Ledger
from scaler.backends import WorkerHandle
from scaler.loop import ControlLoop
from scaler.policy import PolicyConfig
from scaler.pools import Pool, bounds, named, pooled, pools_of
from scaler.process import ProcessBackend
from scaler.signals import Reading
from tests.conftest import ALICE_KEY, ROOT, settings_from, wait_until

CATALOG = """
default = "tiny"

[models.tiny]
source = "tiny"
device = "cpu"
min_workers = 1
max_workers = 2

[models.tiny.defaults]
width = 64
height = 64
steps = 4

[models.tiny-sd2]
source = "tiny-sd2"
device = "cpu"
min_workers = 0
max_workers = 1

[models.tiny-sd2.defaults]
width = 64
height = 64
steps = 4

[models.spare]
source = "tiny"
min_workers = 2
max_workers = 3
"""


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    """Three models: the default `tiny` (1-2 workers), `tiny-sd2` (0-1), `spare` (2-3)."""
    path = tmp_path / "models.toml"
    path.write_text(CATALOG)
    return load_catalog(path, settings_from({}))


# --- which models get a pool, with what bounds ---------------------------------------------------


def test_every_model_gets_a_pool_when_the_backend_can_name_each(catalog: Catalog) -> None:
    assert pooled(catalog) == ["tiny", "tiny-sd2", "spare"]  # the process backend
    assert pooled(catalog, pattern="dq-worker-{model}") == ["tiny", "tiny-sd2", "spare"]
    assert named("dq-worker-{model}", "tiny-sd2") == "dq-worker-tiny-sd2"
    assert named("worker", "tiny-sd2") == "worker"


def test_a_name_without_the_model_is_the_default_models_pool_alone(catalog: Catalog) -> None:
    # Today's single-model deployments: DQ_SCALER_K8S_DEPLOYMENT=dq-worker-sd15, service `worker`.
    assert pooled(catalog, pattern="dq-worker-sd15") == ["tiny"]
    assert pooled(catalog, "tiny-sd2", pattern="worker") == ["tiny-sd2"]
    with pytest.raises(ConfigError, match=r"put \{model\} in it \(e.g. worker-\{model\}\)"):
        pooled(catalog, "tiny,spare", pattern="worker")


def test_dq_scaler_models_leaves_the_others_to_someone_else(catalog: Catalog) -> None:
    assert pooled(catalog, " spare, tiny ", pattern="worker-{model}") == ["tiny", "spare"]
    with pytest.raises(ConfigError, match="names sd15, not in the catalog: use some of tiny, "):
        pooled(catalog, "tiny,sd15")


def test_each_pool_has_its_entrys_bounds_and_the_flags_bound_the_default_only(
    catalog: Catalog,
) -> None:
    base = PolicyConfig(interval_s=0.5, target_wait_s=2)
    reading = Reading("", heartbeat_ttl_s=3)
    backends: dict[str, FakeBackend] = {}

    def backend_for(model: str) -> FakeBackend:
        return backends.setdefault(model, FakeBackend())

    pools = pools_of(catalog, pooled(catalog), base, reading, backend_for, flags=(0, 3))
    assert [(p.model, p.config, p.reading, p.backend) for p in pools] == [
        ("tiny", PolicyConfig(0, 3, 0.5, 2), Reading("tiny", 3), backends["tiny"]),
        ("tiny-sd2", PolicyConfig(0, 1, 0.5, 2), Reading("tiny-sd2", 3), backends["tiny-sd2"]),
        ("spare", PolicyConfig(2, 3, 0.5, 2), Reading("spare", 3), backends["spare"]),
    ]
    assert len({id(p.state) for p in pools}) == 3  # each its own policy state
    spare = catalog.models["spare"]
    assert [bounds(spare), bounds(spare, 5), bounds(spare, None, 1), bounds(spare, 0, 1)] == [
        (2, 3),
        (5, 5),  # `dq up --min-workers 5`: the max rises with it, as it always did
        (2, 2),
        (0, 1),
    ]


def test_dq_up_bounds_the_default_models_pool_only_when_told() -> None:
    def scaler_argv(*argv: str) -> list[str]:
        args = cli.parser().parse_args(["up", *argv])
        launch = Launch(args.host, args.port, args.min_workers, args.max_workers)
        (scaler,) = [c for c in children(settings_from({}), launch) if c.name == "scaler"]
        return scaler.argv[3:]

    assert scaler_argv() == ["--backend", "process"]  # each pool: its catalog entry's bounds
    assert scaler_argv("--min-workers", "0", "--max-workers", "3") == [
        "--backend",
        "process",
        "--min=0",
        "--max=3",
    ]


# --- the process backend: each model's workers, GPUs shared out across models --------------------

# A stand-in for `python -m worker` (its command is the backend's seam): sleeps until SIGTERM.
SLEEPER = (sys.executable, "-c", "import time; time.sleep(120)")


def environ(pid: int) -> dict[str, str]:
    """A child's environment, as the kernel holds it."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.fixture
def processes() -> Iterator[ProcessBackend]:
    """A process backend over three GPUs that starts sleepers; all stopped at the end."""
    backend = ProcessBackend({"PATH": os.environ["PATH"]}, gpus=["0", "1", "2"], command=SLEEPER)
    yield backend
    backend.stop_all(10)


def test_each_models_workers_serve_that_model_on_gpus_of_their_own(
    processes: ProcessBackend,
) -> None:
    tiny, sd2 = processes.pool("tiny"), processes.pool("tiny-sd2")
    tiny.add(2)
    sd2.add(1)
    pid = os.getpid()
    host = processes.host
    assert [h.id for h in tiny.list_workers()] == [
        f"dq-worker-{pid}-tiny-1@{host}",
        f"dq-worker-{pid}-tiny-2@{host}",
    ]
    sd2_name = f"dq-worker-{pid}-tiny-sd2-3@{host}"
    assert sd2.list_workers() == [WorkerHandle(sd2_name, sd2_name)]
    seen = {
        s.name.split("@")[0].removeprefix(f"dq-worker-{pid}-"): (
            environ(s.process.pid)["DQ_WORKER_MODEL"],
            environ(s.process.pid)["CUDA_VISIBLE_DEVICES"],
        )
        for s in processes.spawned.values()
    }
    assert seen == {
        "tiny-1": ("tiny", "0"),
        "tiny-2": ("tiny", "1"),
        "tiny-sd2-3": ("tiny-sd2", "2"),
    }
    first = tiny.list_workers()[0].id
    tiny.drain(first)
    assert tiny.list_workers()[0] == WorkerHandle(first, first, stopping=True)
    wait_until(lambda: len(tiny.list_workers()) == 1, 10, "the drained worker to exit")
    sd2.add(1)  # onto the GPU the drained tiny worker left
    newest = processes.spawned[sd2.list_workers()[-1].id].process.pid
    assert environ(newest)["CUDA_VISIBLE_DEVICES"] == "0"
    assert [len(tiny.list_workers()), len(sd2.list_workers())] == [1, 2]


# --- the loop: a decision per pool ----------------------------------------------------------------


class FakeBackend:
    """A backend whose launches are recorded (the loop test's second pool)."""

    def __init__(self, fail_listing: bool = False) -> None:
        self.fail_listing = fail_listing
        self.added = 0

    def list_workers(self) -> list[WorkerHandle]:
        """Its workers; an API error when it is set to fail."""
        if self.fail_listing:
            raise RuntimeError("the engine API timed out")
        return [WorkerHandle(f"w{i}", f"w{i}") for i in range(self.added)]

    def add(self, n: int) -> None:
        """Record a launch."""
        self.added += n

    def drain(self, worker_id: str) -> None:
        """Never asked to here."""


def test_the_loop_decides_each_pool_alone_and_publishes_each(
    rclient: redis.Redis, redis_url: str, processes: ProcessBackend
) -> None:
    from tests.test_store import record, store_with

    store = store_with(rclient)
    for _ in range(3):  # a backlog for tiny-sd2 only
        assert store.submit(record("alice", model="tiny-sd2", num_images=1)).outcome == "created"
    jobs = JobStore(rclient, Ledger.of(settings_from({"DQ_REDIS_URL": redis_url})))
    recovery = Recovery(rclient, jobs, RecoveryConfig(heartbeat_ttl_s=3))
    config = PolicyConfig(min_workers=0, max_workers=2, interval_s=0.05, cooldown_s=60)
    broken = FakeBackend(fail_listing=True)
    pools = [
        Pool("tiny", processes.pool("tiny"), config, Reading("tiny", 3)),
        Pool("tiny-sd2", processes.pool("tiny-sd2"), config, Reading("tiny-sd2", 3)),
        Pool("spare", broken, config, Reading("spare", 3)),
    ]
    loop = ControlLoop(rclient, pools, recovery, config.interval_s)
    decided = loop.tick()
    assert decided is not None
    assert {m: d.desired for m, d in decided.items()} == {"tiny": 0, "tiny-sd2": 1}
    assert [len(processes.workers(m)) for m in ("tiny", "tiny-sd2")] == [0, 1]
    published = heartbeats.scaler_statuses(rclient)
    assert {m: (s.current, s.desired) for m, s in published.items()} == {
        "tiny": (0, 0),
        "tiny-sd2": (0, 1),
    }
    assert "backlog 3 jobs" in published["tiny-sd2"].reason
    broken.fail_listing = False  # the broken pool's backend answers again: it is decided too
    again = loop.tick()
    assert set(again or {}) == {"tiny", "tiny-sd2", "spare"}
    assert [(p.state.last_backlog or (0, -1))[1] for p in pools] == [0, 3, 0]


def test_the_fleets_status_sums_the_pools() -> None:
    pools = {
        "a": ScalerStatus(current=1, desired=2, reason="x", at=5.0),
        "b": ScalerStatus(current=0, desired=1, reason="y", at=4.0),
    }
    assert heartbeats.fleet_status({}) is None
    assert heartbeats.fleet_status({"a": pools["a"]}) == pools["a"]
    assert heartbeats.fleet_status(pools) == ScalerStatus(
        current=1, desired=3, reason="per model: a 1->2, b 0->1", at=4.0
    )


# --- two models in one `dq up`, for real ----------------------------------------------------------

FAST = {
    "DQ_SCALER_INTERVAL_S": "0.5",
    "DQ_SCALER_TARGET_WAIT_S": "2",
    "DQ_SCALER_DOWN_WINDOW_S": "2",
    "DQ_SCALER_COOLDOWN_S": "3",
    "DQ_HEARTBEAT_S": "0.5",
    "DQ_LEASE_S": "3",
    "DQ_CPU_THREADS": "1",
}
TWO_MODELS = """
default = "tiny"

[models.tiny]
source = "tiny"
device = "cpu"
min_workers = 1
max_workers = 1

[models.tiny-sd2]
source = "tiny-sd2"
device = "cpu"
min_workers = 0
max_workers = 1
"""
JOB = {"width": 64, "height": 64, "steps": 4}


class Up:
    """`python -m core.cli up` (what `./dq up` runs), its output in a log file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log_path, self.log = log, log.open("wb")
        argv = [sys.executable, "-m", "core.cli", "up", "--port", str(self.port)]
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT
        )

    def client(self) -> httpx.Client:
        """Alice's client on the gateway `dq up` started."""
        url = f"http://127.0.0.1:{self.port}"
        return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE_KEY}"})

    def text(self) -> str:
        """What `dq up` and its children logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """Ctrl-C's way: every child stops, the workers drain."""
        code = stop_process(self.process, 120)
        self.log.close()
        return code


@pytest.fixture
def two_models(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Up, dict[str, str]]]:
    """`dq up` serving tiny (1 worker) and tiny-sd2 (0-1 workers) from one catalog."""
    path = tmp_path / "models.toml"
    path.write_text(TWO_MODELS)
    up_env = {**env, **FAST, "DQ_MODELS": str(path)}
    up = Up(up_env, tmp_path / "dq-up.log")
    yield up, up_env
    assert up.stop() == 0


def model_of(r: redis.Redis, worker: str) -> str:
    """The model a worker's last heartbeat says it serves."""
    raw = r.get(keys.worker(worker))
    assert raw, f"no heartbeat of {worker}"
    return heartbeats.WorkerBeat.model_validate_json(raw).model


def serving(r: redis.Redis, env: dict[str, str], model: str) -> list[str]:
    """Workers of `model` with a fresh heartbeat and their model loaded."""
    beats = heartbeats.live(r, float(env["DQ_HEARTBEAT_S"]) * 3)
    return [b.name for b in beats if b.model == model and b.state is not WorkerState.STARTING]


def pool(r: redis.Redis, model: str) -> tuple[int, int] | None:
    """A pool's (current, desired) as the scaler last published it."""
    status = heartbeats.scaler_statuses(r).get(model)
    return None if status is None else (status.current, status.desired)


def gateway_sees_no_worker(client: httpx.Client, model: str) -> bool:
    """Whether GET /v1/models says `model` has no worker serving or starting."""
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    state = models[model]["state"]
    return state["workers_serving"] == 0 and state["workers_starting"] == 0


class Traffic:
    """One user sending jobs for one model, one after another, on a thread of its own."""

    def __init__(self, up: Up, model: str) -> None:
        self.up, self.model = up, model
        self.jobs: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(120)

    def _run(self) -> None:
        with self.up.client() as client:
            while not self.stopped.is_set():
                job = submit(client, self.model, f"steady {len(self.jobs)}")
                self.jobs.append(wait_for(client, job["id"], 120))


def submit(client: httpx.Client, model: str, prompt: str) -> dict[str, Any]:
    """Submit one small job for `model`, and read it back at once."""
    reply = client.post("/v1/jobs", json={"prompt": prompt, "model": model, **JOB})
    assert reply.status_code == 202, reply.text
    job: dict[str, Any] = client.get(f"/v1/jobs/{reply.json()['id']}").json()
    return job


def wait_for(client: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    """The job once it has ended (long polls)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}?wait=5", timeout=10).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
    raise AssertionError(f"job {job_id} did not end in {timeout:.0f} s")


def served_by(job: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """A finished job's status, model and worker, from its metrics."""
    return job["status"], job["metrics"]["model"], job["metrics"]["worker"]


@pytest.mark.slow
def test_two_models_in_one_dq_up_each_with_its_own_pool(
    two_models: tuple[Up, dict[str, str]], rclient: redis.Redis
) -> None:
    up, env = two_models
    (tiny,) = wait_until(lambda: serving(rclient, env, "tiny"), 120, "tiny's first worker")
    wait_until(lambda: pool(rclient, "tiny-sd2") == (0, 0), 30, "tiny-sd2's pool, empty")
    assert pool(rclient, "tiny") == (1, 1)
    with up.client() as client, Traffic(up, "tiny") as steady:
        t0 = time.monotonic()
        cold = submit(client, "tiny-sd2", "a cold model")
        assert cold["status"] == "queued"
        assert "worker of model tiny-sd2" in cold["queue"]["waiting_for"]
        first = wait_for(client, cold["id"], 120)
        started_1 = time.monotonic() - t0
        assert served_by(first)[:2] == ("succeeded", "tiny-sd2")
        sd2_first = first["metrics"]["worker"]
        assert model_of(rclient, sd2_first) == "tiny-sd2"
        # The tiny-sd2 pool goes back to zero after its cool-down; tiny serves all along.
        t_idle = time.monotonic()
        wait_until(
            lambda: pool(rclient, "tiny-sd2") == (0, 0) and not serving(rclient, env, "tiny-sd2"),
            60,
            "tiny-sd2's pool back at zero",
        )
        to_zero = time.monotonic() - t_idle
        # The gateway reads heartbeats at most once a second: wait until it, too, sees none.
        wait_until(
            lambda: gateway_sees_no_worker(client, "tiny-sd2"), 10, "the gateway to see no worker"
        )
        served_before = len(steady.jobs)
        t1 = time.monotonic()
        again = submit(client, "tiny-sd2", "the cold model again")
        assert "worker of model tiny-sd2" in again["queue"]["waiting_for"]
        second = wait_for(client, again["id"], 120)
        started_2 = time.monotonic() - t1
        sd2_second = second["metrics"]["worker"]
        assert served_by(second)[:2] == ("succeeded", "tiny-sd2")
        assert model_of(rclient, sd2_second) == "tiny-sd2"
        wait_until(lambda: len(steady.jobs) > served_before + 2, 60, "tiny to go on serving")
    assert sd2_second != sd2_first  # a new worker: the pool really went to zero and came back
    assert {served_by(j) for j in steady.jobs} == {("succeeded", "tiny", tiny)}
    assert model_of(rclient, tiny) == "tiny"
    assert pool(rclient, "tiny") == (1, 1)
    log = up.text()
    tiny_starts = [
        ln for ln in log.splitlines() if "started worker" in ln and "-tiny-sd2-" not in ln
    ]
    sd2_starts = [ln for ln in log.splitlines() if "started worker" in ln and "-tiny-sd2-" in ln]
    assert (len(tiny_starts), len(sd2_starts)) == (1, 2), log[-3000:]
    print(
        "\nPOOLS (dq up, tiny min 1 max 1, tiny-sd2 min 0 max 1, cool-down 3 s, 2-core CPU):"
        f"\n  a tiny-sd2 job on a cold pool done in {started_1:.1f} s (worker start + model load)"
        f"\n  tiny-sd2 back at zero {to_zero:.1f} s after its last job"
        f"\n  a tiny-sd2 job after that done in {started_2:.1f} s"
        f"\n  tiny served {len(steady.jobs)} jobs meanwhile, all on {tiny}"
    )


@pytest.mark.slow
def test_the_two_model_bench_compares_one_deployment_with_two(
    tmp_path: Path, model_cache: Path
) -> None:
    argv = ["--models", "--out", str(tmp_path), "--model-cache", str(model_cache)]
    argv += ["--duration", "5", "--warmup", "1", "--rounds", "1", "--users", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "models.json").read_text())
    points = {p["shape"]: p for p in report["points"]}
    assert set(points) == {"shared", "separate"}
    for point in points.values():
        assert set(point["models"]) == {"tiny", "tiny-sd2"}
        for share in point["models"].values():
            assert share["succeeded"] == share["jobs"] > 0
            assert share["misrouted"] == 0
    summary = report["summary"]
    assert (summary["misrouted_jobs"], summary["failed_jobs"]) == (0, 0)
    for figure in ("images_per_s", "images_per_core_s"):
        ratio = points["shared"][figure] / points["separate"][figure]
        assert summary[f"shared_vs_separate_{figure}"] == pytest.approx(ratio, abs=0.001)
    for point in points.values():
        assert point["cpu_cores"]["worker"] > 0
        assert point["cpu_cores"]["gateway"] > 0
    assert report["bench"]["users_per_model"] == 2
