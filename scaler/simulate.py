"""A discrete-event simulator: the real `decide` and its rivals against replayed load traces."""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from core.heartbeats import WorkerState
from scaler.policy import PolicyConfig, PolicyState, Signals, WorkerInfo, decide
from scaler.traces import TRACES, Trace

SAMPLE_S = 5.0  # the clock every scaler ticks on (their intervals are multiples) and plots sample


@dataclass(frozen=True)
class WorkerModel:
    """How a simulated GPU worker behaves; the defaults are SD 1.5-like at 512x512."""

    cold_start_s: float = 20.0
    batch_base_s: float = 1.0
    batch_per_image_s: float = 0.35
    max_batch: int = 8

    def batch_s(self, size: int) -> float:
        """Seconds one batch of `size` images takes."""
        return self.batch_base_s + self.batch_per_image_s * size

    @property
    def peak_rate(self) -> float:
        """Images per second with every batch full."""
        return self.max_batch / self.batch_s(self.max_batch)


@dataclass(frozen=True)
class Action:
    """What a scaler asks of the cluster in one tick."""

    add: int = 0
    drain: tuple[str, ...] = ()  # finish the running batch, then exit
    kill: tuple[str, ...] = ()  # stop at once: the running batch is lost and re-queued


class Autoscaler(Protocol):
    """A scaling policy under test: sees the same signals the real control loop reads."""

    name: str
    interval_s: float

    def step(self, signals: Signals, workers_now: int, now: float) -> Action:
        """What to do this tick; `workers_now` counts the workers not draining."""
        ...


class Ours:
    """The production policy, `scaler.policy.decide`, with its state carried between ticks."""

    name = "ours"

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.interval_s = config.interval_s
        self.state = PolicyState()

    def step(self, signals: Signals, workers_now: int, now: float) -> Action:
        """Decide, and turn the decision into cluster operations."""
        decision, self.state = decide(signals, workers_now, self.state, self.config, now)
        return Action(add=max(0, decision.desired - workers_now), drain=decision.remove)


@dataclass
class Seed:
    """Muse: every 30 s, +1 above a fixed count, kill the newest below another, never under 1."""

    name: str = "seed"
    interval_s: float = 30.0
    up_limit: int = 8  # initial_num_workers * max_batch_size
    down_limit: int = 1  # initial_num_workers
    min_workers: int = 1
    max_workers: int = 20

    def step(self, signals: Signals, workers_now: int, now: float) -> Action:
        """Muse's `autoscale`, on its in-flight request count (queued plus running)."""
        requests = signals.queued + signals.in_flight
        if requests > self.up_limit and workers_now < self.max_workers:
            return Action(add=1)
        if requests < self.down_limit and workers_now > self.min_workers:
            return Action(kill=(signals.workers[-1].id,))
        return Action()


@dataclass
class Keda:
    """KEDA's Redis list trigger driving an HPA with default behaviour: ceil(LLEN / listLength)."""

    name: str = "keda"
    interval_s: float = 15.0  # the HPA sync period
    list_length: int = 8  # one full batch per replica
    cooldown_s: float = 300.0  # cooldownPeriod: last active to zero
    window_s: float = 300.0  # HPA scale-down stabilization
    max_workers: int = 20
    history: list[tuple[float, int]] = field(default_factory=list)
    last_active: float = 0.0

    def step(self, signals: Signals, workers_now: int, now: float) -> Action:
        """Activation and cool-down as KEDA does them, 1..N as the HPA does."""
        if signals.queued > 0:
            self.last_active = now
        if now - self.last_active >= self.cooldown_s:
            return _shrink(signals, workers_now, 0, _replicaset_order)
        if workers_now == 0:
            return Action(add=1)
        return _resize(signals, workers_now, self._hpa(signals.queued, workers_now, now))

    def _hpa(self, llen: int, current: int, now: float) -> int:
        want = min(max(math.ceil(llen / self.list_length), 1), self.max_workers)
        if abs(llen / (self.list_length * current) - 1.0) <= 0.1:
            want = current  # the HPA's 10 % tolerance
        self.history = [(t, n) for t, n in self.history if t > now - self.window_s]
        self.history.append((now, want))
        if want > current:
            return min(want, current + max(4, current))  # 4 pods or 100 % per period
        return max(n for _, n in self.history)


class Oracle:
    """Knows every future arrival: runs what the next minute needs, a cold start ahead of it."""

    name = "oracle"
    interval_s = SAMPLE_S

    def __init__(self, arrivals: Sequence[float], model: WorkerModel, target_wait_s: float) -> None:
        self.arrivals = arrivals
        self.model = model
        self.target_wait_s = target_wait_s
        self.horizon_s = 60.0
        self.utilization = 0.85

    def step(self, signals: Signals, workers_now: int, now: float) -> Action:
        """Size for the busier of now and one cold start from now, plus the current backlog."""
        rate = max(self._rate(now), self._rate(now + self.model.cold_start_s))
        work = rate + signals.backlog / self.target_wait_s
        need = math.ceil(work / (self.model.peak_rate * self.utilization))
        return _resize(signals, workers_now, need, _idle_first)

    def _rate(self, start: float) -> float:
        lo = bisect.bisect_left(self.arrivals, start)
        hi = bisect.bisect_left(self.arrivals, start + self.horizon_s)
        return (hi - lo) / self.horizon_s


Order = Callable[[list[WorkerInfo]], list[WorkerInfo]]


def _replicaset_order(live: list[WorkerInfo]) -> list[WorkerInfo]:
    """A ReplicaSet deletes pods not yet ready first, then the newest."""
    newest_first = live[::-1]
    return [w for w in newest_first if w.state is WorkerState.STARTING] + [
        w for w in newest_first if w.state is not WorkerState.STARTING
    ]


def _idle_first(live: list[WorkerInfo]) -> list[WorkerInfo]:
    rank = {WorkerState.IDLE: 0, WorkerState.STARTING: 1, WorkerState.BUSY: 2}
    return sorted(live, key=lambda w: rank.get(w.state, 3))


def _resize(
    signals: Signals, workers_now: int, desired: int, order: Order = _replicaset_order
) -> Action:
    if desired >= workers_now:
        return Action(add=desired - workers_now)
    return _shrink(signals, workers_now, desired, order)


def _shrink(signals: Signals, workers_now: int, desired: int, order: Order) -> Action:
    live = [w for w in signals.workers if w.state is not WorkerState.DRAINING]
    return Action(drain=tuple(w.id for w in order(live)[: workers_now - desired]))


@dataclass
class SimWorker:
    """One simulated worker."""

    id: str
    born: float
    state: WorkerState
    wake_at: float  # when it is ready, or when its batch ends
    batch: list[int] = field(default_factory=list)
    rate: float | None = None
    idle_since: float | None = None


class Cluster:
    """The simulated world: one FIFO queue and workers that cold-start, then run batches."""

    def __init__(self, arrivals: Sequence[float], model: WorkerModel) -> None:
        self.arrivals = arrivals
        self.model = model
        self.queue: deque[int] = deque()
        self.workers: dict[str, SimWorker] = {}
        self.idle: dict[str, None] = {}  # in the order they fell idle: Redis serves BRPOP FIFO
        self.wakeups: list[tuple[float, int, str]] = []
        self.started = [math.nan] * len(arrivals)
        self.worker_s = 0.0
        self.lost = 0
        self._ids = itertools.count(1)

    def add(self, now: float, *, warm: bool = False) -> None:
        """Start a worker; it serves after a cold start (at once when `warm`)."""
        worker = SimWorker(f"w{next(self._ids)}", now, WorkerState.STARTING, now)
        self.workers[worker.id] = worker
        if warm:
            self._become_idle(worker, now)
        else:
            self._wake(worker, now + self.model.cold_start_s)

    def arrive(self, now: float, job: int) -> None:
        """A job is submitted."""
        self.queue.append(job)
        self._dispatch(now)

    def wake(self, now: float, worker_id: str) -> None:
        """A worker finished its cold start or its batch (stale wake-ups are ignored)."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.wake_at != now:
            return
        if worker.state is WorkerState.STARTING:
            self._become_idle(worker, now)
        else:
            self._finish(worker, now)

    def drain(self, now: float, worker_id: str) -> None:
        """Graceful stop: a busy worker finishes its batch first."""
        worker = self.workers[worker_id]
        if worker.state is WorkerState.BUSY:
            worker.state = WorkerState.DRAINING
        elif worker.state is not WorkerState.DRAINING:
            self._exit(worker, now)

    def kill(self, now: float, worker_id: str) -> None:
        """Hard stop: the running batch is lost and its jobs go back to the head of the queue."""
        worker = self.workers[worker_id]
        self.lost += len(worker.batch)
        for job in worker.batch:
            self.started[job] = math.nan
        self.queue.extendleft(reversed(worker.batch))
        self._exit(worker, now)
        self._dispatch(now)

    def signals(self, now: float) -> Signals:
        """What the real control loop would read from Redis and the heartbeats."""
        oldest = now - self.arrivals[self.queue[0]] if self.queue else 0.0
        workers = tuple(
            WorkerInfo(w.id, w.state, w.rate, w.idle_since) for w in self.workers.values()
        )
        in_flight = sum(len(w.batch) for w in self.workers.values())
        return Signals(len(self.queue), in_flight, 0, oldest, workers)

    def workers_now(self) -> int:
        """Workers not draining: what a backend reports as serving or about to."""
        return sum(w.state is not WorkerState.DRAINING for w in self.workers.values())

    def close(self, now: float) -> None:
        """Stop the clock: bill every worker still alive."""
        for worker in list(self.workers.values()):
            self._exit(worker, now)

    def _wake(self, worker: SimWorker, at: float) -> None:
        worker.wake_at = at
        heapq.heappush(self.wakeups, (at, next(self._ids), worker.id))

    def _become_idle(self, worker: SimWorker, now: float) -> None:
        worker.state, worker.idle_since = WorkerState.IDLE, now
        self.idle[worker.id] = None
        self._dispatch(now)

    def _dispatch(self, now: float) -> None:
        """A batch forms when a GPU is free, from whatever waits: no fill timer."""
        while self.queue and self.idle:
            worker_id = next(iter(self.idle))
            del self.idle[worker_id]
            self._run(self.workers[worker_id], now)

    def _run(self, worker: SimWorker, now: float) -> None:
        size = min(self.model.max_batch, len(self.queue))
        worker.batch = [self.queue.popleft() for _ in range(size)]
        for job in worker.batch:
            self.started[job] = now
        worker.state, worker.idle_since = WorkerState.BUSY, None
        self._wake(worker, now + self.model.batch_s(size))

    def _finish(self, worker: SimWorker, now: float) -> None:
        size = len(worker.batch)
        sample = size / self.model.batch_s(size)
        # Workers report a smoothed images/s, as a real one would from its last few batches.
        worker.rate = sample if worker.rate is None else 0.7 * worker.rate + 0.3 * sample
        worker.batch = []
        if worker.state is WorkerState.DRAINING:
            self._exit(worker, now)
        else:
            self._become_idle(worker, now)

    def _exit(self, worker: SimWorker, now: float) -> None:
        self.worker_s += now - worker.born
        del self.workers[worker.id]
        self.idle.pop(worker.id, None)


@dataclass(frozen=True)
class Result:
    """How one policy did on one trace."""

    policy: str
    jobs: int
    p50_wait_s: float
    p95_wait_s: float
    max_wait_s: float
    over_target: int  # jobs that waited longer than the target
    worker_s: float  # worker-seconds billed, cold starts and drains included
    peak_workers: int
    lost: int  # images computed, then thrown away by a kill
    series: tuple[tuple[float, int, int], ...]  # (time, workers alive, queued jobs)


def simulate(trace: Trace, scaler: Autoscaler, model: WorkerModel, target_wait_s: float) -> Result:
    """Replay `trace` against `scaler`, starting from one warm worker."""
    cluster = Cluster(trace.arrivals, model)
    cluster.add(0.0, warm=True)
    series: list[tuple[float, int, int]] = []
    next_job, next_sample, next_scale = 0, 0.0, 0.0
    while True:
        arrival = trace.arrivals[next_job] if next_job < len(trace.arrivals) else math.inf
        wakeup = cluster.wakeups[0][0] if cluster.wakeups else math.inf
        now = min(arrival, wakeup, next_sample)
        if now >= trace.duration_s:
            break
        if now == next_sample:
            if now >= next_scale:
                _apply(cluster, scaler.step(cluster.signals(now), cluster.workers_now(), now), now)
                next_scale += scaler.interval_s
            series.append((now, len(cluster.workers), len(cluster.queue)))
            next_sample += SAMPLE_S
        elif now == wakeup:
            cluster.wake(now, heapq.heappop(cluster.wakeups)[2])
        else:
            cluster.arrive(now, next_job)
            next_job += 1
    cluster.close(trace.duration_s)
    return _summarize(scaler.name, trace, cluster, series, target_wait_s)


def _apply(cluster: Cluster, action: Action, now: float) -> None:
    for _ in range(action.add):
        cluster.add(now)
    for worker_id in action.drain:
        cluster.drain(now, worker_id)
    for worker_id in action.kill:
        cluster.kill(now, worker_id)


def _summarize(
    name: str, trace: Trace, cluster: Cluster, series: list[tuple[float, int, int]], target: float
) -> Result:
    # A job still waiting at the end counts with the wait it has had so far.
    waits = sorted(
        (start if start == start else trace.duration_s) - arrival
        for start, arrival in zip(cluster.started, trace.arrivals, strict=True)
    )
    return Result(
        name,
        len(waits),
        _percentile(waits, 0.50),
        _percentile(waits, 0.95),
        waits[-1] if waits else 0.0,
        len(waits) - bisect.bisect_right(waits, target),
        cluster.worker_s,
        max((workers for _, workers, _ in series), default=0),
        cluster.lost,
        tuple(series),
    )


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def sim_config() -> PolicyConfig:
    """Our policy as compared: default knobs, allowed to reach zero like KEDA."""
    return PolicyConfig(min_workers=0)


def compare(trace: Trace, model: WorkerModel | None = None) -> list[Result]:
    """Run every policy on the same trace: ours, the seed's, KEDA's, and the oracle."""
    model = model or WorkerModel()
    config = sim_config()
    rivals: list[Autoscaler] = [
        Ours(config),
        Seed(),
        Keda(),
        Oracle(trace.arrivals, model, config.target_wait_s),
    ]
    return [simulate(trace, rival, model, config.target_wait_s) for rival in rivals]


def format_table(trace: Trace, results: Sequence[Result], target_wait_s: float) -> str:
    """A fixed-width table, one row per policy, worker-seconds also as a ratio to the oracle."""
    oracle = next((r.worker_s for r in results if r.policy == "oracle"), math.nan)
    head = (
        f"{'trace':<8} {'policy':<7} {'jobs':>6} {'p50 s':>7} {'p95 s':>7} {'max s':>7} "
        f"{f'>{target_wait_s:g} s':>7} {'worker-s':>9} {'x oracle':>8} {'peak':>5} {'lost':>5}"
    )
    rows = [f"{trace.name}: {trace.description}", head]
    for r in results:
        rows.append(
            f"{trace.name:<8} {r.policy:<7} {r.jobs:>6} {r.p50_wait_s:>7.1f} {r.p95_wait_s:>7.1f} "
            f"{r.max_wait_s:>7.1f} {r.over_target:>7} {r.worker_s:>9.0f} "
            f"{r.worker_s / oracle:>8.2f} {r.peak_workers:>5} {r.lost:>5}"
        )
    return "\n".join(rows)


def plot(trace: Trace, results: Sequence[Result], out: Path) -> Path:
    """Workers and queue length over time, one line per policy, as `out/<trace>.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.5))
    for r in results:
        minutes = [t / 60.0 for t, _, _ in r.series]
        top.step(minutes, [w for _, w, _ in r.series], where="post", label=r.policy)
        bottom.step(minutes, [q for _, _, q in r.series], where="post", label=r.policy)
    top.set(ylabel="workers alive", title=f"{trace.name}: {trace.description}")
    bottom.set(ylabel="queued jobs", xlabel="minutes")
    top.legend(loc="upper left")
    path = out / f"{trace.name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """`dq scaler simulate`: compare the policies on one trace or all, print a table per trace."""
    parser = argparse.ArgumentParser(prog="dq scaler simulate", description=__doc__)
    parser.add_argument("--trace", choices=[*TRACES, "all"], default="all")
    parser.add_argument("--out", type=Path, help="write a PNG per trace into this folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    args = parser.parse_args(argv)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for name in TRACES if args.trace == "all" else [args.trace]:
        trace = TRACES[name](args.seed)
        results = compare(trace)
        print(format_table(trace, results, sim_config().target_wait_s), end="\n\n")
        if args.out:
            print(f"wrote {plot(trace, results, args.out)}", end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
