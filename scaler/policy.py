"""The scaling policy: how many workers the queue needs, as a pure function of what was read."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from core.errors import ConfigError
from core.heartbeats import WorkerState

# A worker the backend runs but that has not sent a heartbeat yet counts as STARTING: capacity on
# its way. Only IDLE workers are ever drained; BUSY ones never; DRAINING ones are no capacity.


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as the scaler sees it this tick."""

    id: str
    state: WorkerState
    images_per_s: float | None = None  # measured while busy; None until its first batch
    idle_since: float | None = None  # on the clock `decide` gets as `now`; None unless idle


@dataclass(frozen=True)
class Signals:
    """Everything the policy reads in one tick; `decide` gets None when it could not be read."""

    queued: int  # images queued: waiting in the tenants' lines or dispatched, not yet running
    in_flight: int  # images running
    orphans: int = 0  # images whose worker died, when not also counted in `in_flight`
    oldest_wait_s: float = 0.0  # age of the oldest queued job; 0 when nothing is queued
    workers: tuple[WorkerInfo, ...] = ()
    expired_leases: int = 0  # running jobs whose lease ran out (the sweep hands them back)

    @property
    def backlog(self) -> int:
        """Jobs someone still has to run."""
        return self.queued + self.in_flight + self.orphans


@dataclass(frozen=True)
class PolicyConfig:
    """The policy's knobs; names follow the seed's where it had one."""

    min_workers: int = 1  # 0 allows scale to zero after `cooldown_s` without work
    max_workers: int = 20
    interval_s: float = 5.0  # how often the control loop calls `decide` (the seed: 30 s)
    # The backlog should drain within this long; about one SD batch beyond the running one.
    target_wait_s: float = 5.0
    jobs_per_worker: int = 8  # backlog per worker before any throughput has been measured
    max_step_up: int = 4  # workers added per tick at most
    down_window_s: float = 120.0  # scale down to the highest recommendation in this window
    cooldown_s: float = 300.0  # quiet time (nothing queued, running or orphaned) before zero
    # Time constant of the backlog growth estimate; 0 sizes on the backlog alone.
    growth_smoothing_s: float = 15.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers:
            raise ConfigError("scaler: need 0 <= min_workers <= max_workers")
        if min(self.interval_s, self.target_wait_s, self.jobs_per_worker, self.max_step_up) <= 0:
            raise ConfigError("scaler: interval_s, target_wait_s, jobs_per_worker, max_step_up > 0")
        if min(self.down_window_s, self.cooldown_s, self.growth_smoothing_s) < 0:
            raise ConfigError("scaler: down_window_s, cooldown_s, growth_smoothing_s must be >= 0")


@dataclass(frozen=True)
class PolicyState:
    """What `decide` remembers between ticks; start from `PolicyState()`."""

    history: tuple[tuple[float, int], ...] = ()  # (time, recommendation) within the down window
    last_busy: float | None = None  # last tick that saw work queued, running or orphaned
    last_backlog: tuple[float, int] | None = None  # (time, backlog) at the previous tick
    growth: float = 0.0  # smoothed backlog growth, jobs/s


@dataclass(frozen=True)
class Decision:
    """The worker count to run and, when it goes down, which idle workers to drain."""

    desired: int
    reason: str
    remove: tuple[str, ...] = ()


def decide(
    signals: Signals | None,
    workers_now: int,
    state: PolicyState,
    config: PolicyConfig,
    now: float,
) -> tuple[Decision, PolicyState]:
    """Choose this tick's worker count; `workers_now` counts every worker not draining."""
    if signals is None:
        return Decision(workers_now, f"signals unreadable: holding {workers_now} workers"), state
    state = _observe(state, signals, workers_now, config, now)
    wanted, why = recommend(signals, workers_now, state, config, now)
    state = _remember(state, wanted, now, config.down_window_s)
    if wanted > workers_now:
        return _scale_up(wanted, workers_now, why, config), state
    if wanted == workers_now:
        return Decision(workers_now, why), state
    return _scale_down(signals, workers_now, wanted, why, state, config), state


def recommend(
    signals: Signals, workers_now: int, state: PolicyState, config: PolicyConfig, now: float
) -> tuple[int, str]:
    """The count this tick's signals call for, before the up and down rate limits."""
    count, why = _count_for_work(signals, state.growth, config)
    if count <= workers_now and _stuck(signals, config):
        count = workers_now + 1
        why = (
            f"oldest job waited {signals.oldest_wait_s:.0f} s > {config.target_wait_s:g} s "
            f"target with no worker idle or starting: one more"
        )
    count, why = _clamp(count, why, config)
    quiet_s = now - (state.last_busy if state.last_busy is not None else now)
    if count == 0 and workers_now > 0 and quiet_s < config.cooldown_s:
        return 1, f"{why}; keeping 1 until {config.cooldown_s:g} s quiet ({quiet_s:.0f} s so far)"
    return count, why


def per_worker_target(signals: Signals, config: PolicyConfig) -> tuple[float, str]:
    """Jobs one worker can take and still drain them within the target wait, and how we know."""
    rates = [w.images_per_s for w in signals.workers if w.images_per_s]
    if not rates:
        return float(config.jobs_per_worker), f"{config.jobs_per_worker} jobs/worker (unmeasured)"
    rate = sum(rates) / len(rates)
    # A worker doing r images/s clears r * target_wait_s jobs within the target wait.
    return rate * config.target_wait_s, f"{rate:.2g} img/s/worker"


def estimate_growth(
    state: PolicyState, signals: Signals, config: PolicyConfig, now: float
) -> float:
    """How fast the backlog grows, in jobs/s, smoothed over `growth_smoothing_s`."""
    if state.last_backlog is None or config.growth_smoothing_s == 0:
        return 0.0
    then, backlog_then = state.last_backlog
    if now <= then:
        return state.growth
    sample = (signals.backlog - backlog_then) / (now - then)
    weight = 1.0 - math.exp(-(now - then) / config.growth_smoothing_s)
    return state.growth + weight * (sample - state.growth)


def _count_for_work(signals: Signals, growth: float, config: PolicyConfig) -> tuple[int, str]:
    target, basis = per_worker_target(signals, config)
    # Size for the backlog the target wait will see: a growing one is bigger by then.
    work = signals.backlog + max(0.0, growth) * config.target_wait_s
    count = math.ceil(work / target)
    growing = f" growing {growth:.2g}/s" if growth >= 0.01 else ""
    noun = "worker" if count == 1 else "workers"
    return count, (
        f"backlog {signals.backlog} jobs{growing} at {basis} needs {count} {noun} "
        f"for a {config.target_wait_s:g} s wait"
    )


def _stuck(signals: Signals, config: PolicyConfig) -> bool:
    """Whether the oldest job waits past the target though no help is idle or on its way."""
    late = signals.queued > 0 and signals.oldest_wait_s > config.target_wait_s
    helping = {WorkerState.IDLE, WorkerState.STARTING}
    return late and not any(w.state in helping for w in signals.workers)


def _clamp(count: int, why: str, config: PolicyConfig) -> tuple[int, str]:
    if count > config.max_workers:
        return config.max_workers, f"{why}; capped at max_workers {config.max_workers}"
    if count < config.min_workers:
        return config.min_workers, f"{why}; raised to min_workers {config.min_workers}"
    return count, why


def _observe(
    state: PolicyState, signals: Signals, workers_now: int, config: PolicyConfig, now: float
) -> PolicyState:
    """Fold in this tick; a fresh state counts the start as busy and the current size as wanted."""
    busy = signals.backlog > 0 or state.last_busy is None
    return replace(
        state,
        history=state.history or ((now, workers_now),),
        last_busy=now if busy else state.last_busy,
        last_backlog=(now, signals.backlog),
        growth=estimate_growth(state, signals, config, now),
    )


def _remember(state: PolicyState, wanted: int, now: float, window_s: float) -> PolicyState:
    kept = tuple((t, n) for t, n in state.history if t > now - window_s)
    return replace(state, history=(*kept, (now, wanted)))


def _scale_up(wanted: int, workers_now: int, why: str, config: PolicyConfig) -> Decision:
    desired = min(wanted, workers_now + config.max_step_up)
    capped = f" (max_step_up {config.max_step_up})" if desired < wanted else ""
    return Decision(desired, f"{why}; adding {desired - workers_now}{capped}")


def _scale_down(
    signals: Signals,
    workers_now: int,
    wanted: int,
    why: str,
    state: PolicyState,
    config: PolicyConfig,
) -> Decision:
    # Zero is only ever wanted after the cool-down, which already was the wait: skip the window.
    peak = max(n for _, n in state.history) if wanted else 0
    window = f"{config.down_window_s:g} s"
    if peak >= workers_now:
        return Decision(
            workers_now, f"{why}; holding {workers_now}: {peak} wanted in the last {window}"
        )
    victim = _idlest(signals.workers)
    if victim is None:
        return Decision(workers_now, f"{why}; holding {workers_now}: no worker is idle to drain")
    return Decision(workers_now - 1, f"{why}; draining idle {victim}", (victim,))


def _idlest(workers: tuple[WorkerInfo, ...]) -> str | None:
    """The worker idle the longest: the surest it has nothing buffered."""
    idle = [w for w in workers if w.state is WorkerState.IDLE]
    idle.sort(key=lambda w: (w.idle_since if w.idle_since is not None else math.inf, w.id))
    return idle[0].id if idle else None
