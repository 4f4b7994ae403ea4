"""The scaling policy, rule by rule, as tables of signals in and decisions out."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from core.errors import ConfigError
from scaler.policy import (
    Decision,
    PolicyConfig,
    PolicyState,
    Signals,
    WorkerInfo,
    WorkerState,
    decide,
)

CONFIG = PolicyConfig(
    min_workers=1,
    max_workers=10,
    target_wait_s=10.0,
    jobs_per_worker=8,
    max_step_up=4,
    down_window_s=60.0,
    cooldown_s=300.0,
    growth_smoothing_s=15.0,
)
UNMEASURED = "8 jobs/worker (unmeasured)"


def busy(worker_id: str, rate: float | None = None) -> WorkerInfo:
    return WorkerInfo(worker_id, WorkerState.BUSY, rate)


def idle(worker_id: str, since: float = 0.0, rate: float | None = None) -> WorkerInfo:
    return WorkerInfo(worker_id, WorkerState.IDLE, rate, since)


def starting(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id, WorkerState.STARTING)


ONE_TICK = [
    pytest.param(
        Signals(queued=32, in_flight=8, workers=(busy("a"),)),
        1,
        CONFIG,
        Decision(5, f"backlog 40 jobs at {UNMEASURED} needs 5 workers for a 10 s wait; adding 4"),
        id="up at once",
    ),
    pytest.param(
        Signals(queued=72, in_flight=8, workers=(busy("a"),)),
        1,
        CONFIG,
        Decision(
            5,
            f"backlog 80 jobs at {UNMEASURED} needs 10 workers for a 10 s wait; "
            "adding 4 (max_step_up 4)",
        ),
        id="up limited by max_step_up",
    ),
    pytest.param(
        Signals(queued=16, in_flight=8, workers=(busy("a"), starting("b"), starting("c"))),
        3,
        CONFIG,
        Decision(3, f"backlog 24 jobs at {UNMEASURED} needs 3 workers for a 10 s wait"),
        id="starting workers count as capacity",
    ),
    pytest.param(
        Signals(queued=34, in_flight=16, workers=(busy("a", 2.0), busy("b", 2.0))),
        2,
        CONFIG,
        Decision(3, "backlog 50 jobs at 2 img/s/worker needs 3 workers for a 10 s wait; adding 1"),
        id="target from measured throughput",
    ),
    pytest.param(
        Signals(queued=34, in_flight=16, workers=(busy("a"), busy("b"))),
        2,
        CONFIG,
        Decision(
            6,
            f"backlog 50 jobs at {UNMEASURED} needs 7 workers for a 10 s wait; "
            "adding 4 (max_step_up 4)",
        ),
        id="unmeasured falls back to jobs_per_worker",
    ),
    pytest.param(
        Signals(4, 4, oldest_wait_s=12.0, workers=(busy("a", 2.0), busy("b", 2.0))),
        2,
        CONFIG,
        Decision(
            3,
            "oldest job waited 12 s > 10 s target with no worker idle or starting: one more; "
            "adding 1",
        ),
        id="oldest wait adds one though the count says no",
    ),
    pytest.param(
        Signals(4, 4, oldest_wait_s=12.0, workers=(busy("a", 2.0), starting("b"))),
        2,
        CONFIG,
        Decision(
            2,
            "backlog 8 jobs at 2 img/s/worker needs 1 worker for a 10 s wait; "
            "holding 2: 2 wanted in the last 60 s",
        ),
        id="no oldest-wait bump while help is starting",
    ),
    pytest.param(
        Signals(queued=190, in_flight=10, workers=tuple(busy(f"w{i}") for i in range(10))),
        10,
        CONFIG,
        Decision(
            10,
            f"backlog 200 jobs at {UNMEASURED} needs 25 workers for a 10 s wait; "
            "capped at max_workers 10",
        ),
        id="clamped to max_workers",
    ),
    pytest.param(
        Signals(queued=0, in_flight=0, workers=(idle("a"), idle("b"))),
        2,
        replace(CONFIG, min_workers=2),
        Decision(
            2,
            f"backlog 0 jobs at {UNMEASURED} needs 0 workers for a 10 s wait; "
            "raised to min_workers 2",
        ),
        id="clamped to min_workers",
    ),
    pytest.param(
        Signals(queued=0, in_flight=0, orphans=3),
        0,
        replace(CONFIG, min_workers=0),
        Decision(1, f"backlog 3 jobs at {UNMEASURED} needs 1 worker for a 10 s wait; adding 1"),
        id="orphans wake a fleet of zero",
    ),
    pytest.param(
        None,
        3,
        CONFIG,
        Decision(3, "signals unreadable: holding 3 workers"),
        id="hold when signals cannot be read",
    ),
]


@pytest.mark.parametrize(("signals", "workers_now", "config", "expected"), ONE_TICK)
def test_one_tick(
    signals: Signals | None, workers_now: int, config: PolicyConfig, expected: Decision
) -> None:
    decision, _ = decide(signals, workers_now, PolicyState(), config, now=100.0)
    assert decision == expected


def test_unreadable_signals_leave_the_state_alone() -> None:
    state = PolicyState(history=((90.0, 4),), last_busy=80.0, last_backlog=(90.0, 12), growth=1.5)
    _, after = decide(None, 4, state, CONFIG, now=100.0)
    assert after is state


def run(ticks: list[tuple[float, Signals, int]], config: PolicyConfig = CONFIG) -> list[Decision]:
    """Feed a sequence of ticks through `decide`, threading its state like the control loop."""
    state, decisions = PolicyState(), []
    for now, signals, workers_now in ticks:
        decision, state = decide(signals, workers_now, state, config, now)
        decisions.append(decision)
    return decisions


def quiet(*workers: WorkerInfo) -> Signals:
    return Signals(queued=0, in_flight=0, workers=workers)


def test_down_waits_for_the_window_then_drains_one_idle_worker_per_step() -> None:
    fleet = (idle("w1", 7.0), idle("w2", 3.0), busy("w3"), idle("w4", 5.0))
    ticks = [(0.0, Signals(24, 8, workers=fleet), 4)]
    ticks += [(float(t), quiet(*fleet), 4) for t in range(5, 60, 5)]
    ticks += [(60.0, quiet(*fleet), 4), (65.0, quiet(idle("w1", 7.0), busy("w3")), 3)]
    decisions = run(ticks)
    assert {d.desired for d in decisions[:-2]} == {4}
    assert all(d.remove == () for d in decisions[:-2])
    assert decisions[-2] == Decision(
        3,
        f"backlog 0 jobs at {UNMEASURED} needs 0 workers for a 10 s wait; raised to "
        "min_workers 1; draining idle w2",
        ("w2",),
    )
    assert decisions[-1].desired == 2
    assert decisions[-1].remove == ("w1",)


def test_down_never_drains_a_busy_worker() -> None:
    fleet = (busy("w1"), busy("w2"))
    ticks = [(0.0, Signals(0, 2, workers=fleet), 2), (61.0, Signals(0, 2, workers=fleet), 2)]
    assert run(ticks)[-1] == Decision(
        2,
        f"backlog 2 jobs at {UNMEASURED} needs 1 worker for a 10 s wait; "
        "holding 2: no worker is idle to drain",
    )


def test_a_fresh_state_does_not_scale_down_at_once() -> None:
    decision, _ = decide(quiet(idle("w1"), idle("w2")), 2, PolicyState(), CONFIG, now=0.0)
    assert (decision.desired, decision.remove) == (2, ())


ZERO = replace(CONFIG, min_workers=0)


def test_zero_only_after_the_cooldown() -> None:
    ticks = [(0.0, Signals(0, 5, workers=(busy("w1"),)), 1)]
    ticks += [(float(t), quiet(idle("w1", 5.0)), 1) for t in range(5, 305, 5)]
    decisions = run(ticks, ZERO)
    assert {d.desired for d in decisions[:-1]} == {1}
    assert decisions[-2].reason.endswith("keeping 1 until 300 s quiet (295 s so far)")
    assert decisions[-1] == Decision(
        0,
        f"backlog 0 jobs at {UNMEASURED} needs 0 workers for a 10 s wait; draining idle w1",
        ("w1",),
    )


def test_orphans_restart_the_cooldown() -> None:
    ticks = [(0.0, Signals(0, 5, workers=(busy("w1"),)), 1)]
    ticks += [(200.0, Signals(0, 0, orphans=1, workers=(idle("w1", 5.0),)), 1)]
    ticks += [(float(t), quiet(idle("w1", 5.0)), 1) for t in range(205, 505, 5)]
    decisions = run(ticks, ZERO)
    assert [d.desired for d in decisions].index(0) == len(decisions) - 1
    assert decisions[-1].remove == ("w1",)


def test_growing_backlog_is_sized_for_where_it_will_be() -> None:
    rates = (busy("a", 2.0), busy("b", 2.0))
    ticks = [(0.0, Signals(2, 8, workers=rates), 2), (5.0, Signals(22, 8, workers=rates), 2)]
    assert run(ticks)[-1] == Decision(
        3,
        "backlog 30 jobs growing 1.1/s at 2 img/s/worker needs 3 workers for a 10 s wait; adding 1",
    )
    assert run(ticks, replace(CONFIG, growth_smoothing_s=0.0))[-1] == Decision(
        2, "backlog 30 jobs at 2 img/s/worker needs 2 workers for a 10 s wait"
    )


def test_decide_depends_on_its_arguments_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """No memory between calls but the state it returns, and no clock but `now`."""
    signals = Signals(10, 5, oldest_wait_s=3.0, workers=(busy("a", 1.5), idle("b", 2.0)))
    state = PolicyState(history=((50.0, 2),), last_busy=50.0, last_backlog=(95.0, 9), growth=0.4)
    first = decide(signals, 2, state, CONFIG, 100.0)
    # Other decisions in between, on other states, clocks and knobs...
    run([(0.0, Signals(80, 8, workers=(busy("x"),)), 1), (5.0, quiet(idle("x", 1.0)), 9)])
    decide(quiet(), 0, PolicyState(), replace(CONFIG, min_workers=0), 1e9)
    # ... and a wall clock stopped in 1970: the same question gets the same answer.
    for clock in ("time", "monotonic", "perf_counter"):
        monkeypatch.setattr(time, clock, lambda: 0.0)
    assert decide(signals, 2, state, CONFIG, 100.0) == first
    assert first[0] == Decision(
        2, "backlog 15 jobs growing 0.63/s at 1.5 img/s/worker needs 2 workers for a 10 s wait"
    )


@pytest.mark.parametrize(
    "knobs",
    [
        {"min_workers": 3, "max_workers": 2},
        {"min_workers": -1},
        {"target_wait_s": 0.0},
        {"max_step_up": 0},
        {"cooldown_s": -1.0},
    ],
)
def test_nonsense_knobs_are_refused(knobs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        PolicyConfig(**knobs)  # type: ignore[arg-type]
