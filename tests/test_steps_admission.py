"""worker.admission: who joins the running loop at a step boundary, and the adaptive row budget."""

from __future__ import annotations

import pytest

from worker.admission import Admission, Budget, Priority, Seat, StepTimes, admit, row_budget

H, N, L = Priority.HIGH, Priority.NORMAL, Priority.LOW
PX = 64 * 64


def seat(job_id: str, since: float, rows: int = 2, priority: Priority = N, key: str = "a") -> Seat:
    """A job of `rows` denoiser rows at 64x64 under loop key `key`."""
    return Seat(job_id, key, priority, since, rows, PX)


BIG = Budget(max_rows=8, max_pixels=10**9)

CASES = [
    pytest.param([], [], BIG, Admission(), id="nothing-waits"),
    pytest.param(
        [seat("b", 2), seat("a", 1)], [], BIG, Admission(admit=("a", "b")), id="arrival-order"
    ),
    pytest.param(
        [seat("a", 1), seat("b", 2), seat("c", 3)],
        [seat("r", 0, rows=4)],
        BIG,
        Admission(admit=("a", "b")),
        id="up-to-the-row-budget",
    ),
    pytest.param(
        [seat("a", 1, rows=6), seat("b", 2, rows=1)],
        [seat("r", 0, rows=4)],
        BIG,
        Admission(),
        id="no-overtaking-the-head-of-the-line",
    ),
    pytest.param(
        [seat("a", 1, rows=12)], [], BIG, Admission(admit=("a",)), id="too-big-runs-alone"
    ),
    pytest.param(
        [seat("a", 1, rows=12)],
        [seat("r", 0, rows=1)],
        BIG,
        Admission(),
        id="too-big-waits-for-an-empty-loop",
    ),
    pytest.param(
        [seat("a", 1, rows=12), seat("b", 2)], [], BIG, Admission(admit=("a",)), id="then-alone"
    ),
    pytest.param(
        [seat("n", 1), seat("h", 5, priority=H), seat("l", 0, priority=L)],
        [],
        Budget(max_rows=4, max_pixels=10**9),
        Admission(admit=("h", "n")),
        id="by-priority-then-arrival",
    ),
    pytest.param(
        [seat("a", 1), seat("b", 2)],
        [],
        Budget(max_rows=8, max_pixels=3 * PX),
        Admission(admit=("a",)),
        id="pixel-budget",
    ),
    pytest.param(
        [seat("a", 1, key="k1"), seat("b", 2, key="k2"), seat("c", 3, key="k1")],
        [seat("r", 0, key="k1")],
        Budget(max_rows=8, max_pixels=10**9, call_rows={"k1": 4}),
        Admission(admit=("a", "b")),
        id="a-key-call-cap-holds-the-line",
    ),
    pytest.param(
        [seat("h", 5, priority=H)],
        [seat("n1", 1), seat("n2", 2), seat("l", 0, priority=L)],
        Budget(max_rows=6, max_pixels=10**9),
        Admission(admit=("h",), park=("l",)),
        id="high-parks-the-least-urgent",
    ),
    pytest.param(
        [seat("h", 5, rows=4, priority=H)],
        [seat("n1", 1), seat("n2", 2), seat("l", 0, priority=L)],
        Budget(max_rows=6, max_pixels=10**9),
        Admission(admit=("h",), park=("l", "n2")),
        id="then-the-latest-admitted",
    ),
    pytest.param(
        [seat("h", 5, priority=H)],
        [seat("h1", 1, priority=H), seat("h2", 2, priority=H)],
        Budget(max_rows=4, max_pixels=10**9),
        Admission(),
        id="never-parks-as-urgent",
    ),
    pytest.param(
        [seat("n", 5)],
        [seat("l1", 1, priority=L), seat("l2", 2, priority=L)],
        Budget(max_rows=4, max_pixels=10**9),
        Admission(admit=("n",), park=("l2",)),
        id="normal-parks-low",
    ),
    pytest.param(
        [seat("h", 5, rows=6, priority=H)],
        [seat("n", 1, rows=2), seat("h1", 2, rows=2, priority=H)],
        Budget(max_rows=6, max_pixels=10**9),
        Admission(),
        id="parks-nothing-when-parking-cannot-make-room",
    ),
]


@pytest.mark.parametrize(("waiting", "running", "budget", "expected"), CASES)
def test_admit(
    waiting: list[Seat], running: list[Seat], budget: Budget, expected: Admission
) -> None:
    assert admit(waiting, running, budget) == expected


def test_admit_without_preemption_waits() -> None:
    running = [seat("n1", 1), seat("n2", 2)]
    budget = Budget(max_rows=4, max_pixels=10**9)
    assert admit([seat("h", 5, priority=H)], running, budget, preempt=False) == Admission()


def test_call_cap_never_exceeds_the_row_budget() -> None:
    assert Budget(4, 10**9, {"a": 16}).rows_for("a") == 4
    assert Budget(4, 10**9, {"a": 2}).rows_for("a") == 2
    assert Budget(4, 10**9).rows_for("b") == 4


# Seconds per call by rows: a GPU-like curve, flat while the card has room, then linear.
SATURATING = {1: 0.010, 2: 0.010, 4: 0.011, 8: 0.014, 16: 0.022, 32: 0.044}

BUDGETS = [
    pytest.param({}, 2, 32, 4, id="nothing-measured-probes-twice-the-floor"),
    pytest.param({2: 0.01}, 2, 32, 4, id="one-count-probes-twice"),
    pytest.param({4: 0.02}, 2, 32, 8, id="a-count-alone-is-given-the-benefit-of-the-doubt"),
    pytest.param({2: 0.010, 4: 0.012}, 2, 32, 8, id="still-falling-probes-further"),
    pytest.param(SATURATING, 1, 64, 16, id="stops-where-doubling-stops-paying"),
    pytest.param({1: 0.01, 2: 0.02, 4: 0.04}, 1, 32, 1, id="linear-from-the-start"),
    pytest.param(SATURATING, 1, 8, 8, id="never-above-the-ceiling"),
    pytest.param({1: 0.01, 2: 0.02, 4: 0.04}, 3, 32, 3, id="never-below-the-floor"),
    pytest.param({1: 0.01, 2: 0.02}, 4, 32, 8, id="counts-under-the-floor-decide-nothing"),
    pytest.param({1: 0.010, 2: 0.015, 4: 0.0285}, 1, 32, 2, id="gain-under-ten-percent-stops"),
]


@pytest.mark.parametrize(("step_s", "floor", "ceiling", "expected"), BUDGETS)
def test_row_budget(step_s: dict[int, float], floor: int, ceiling: int, expected: int) -> None:
    assert row_budget(step_s, floor, ceiling) == expected


def test_step_times_trust_a_count_after_enough_samples() -> None:
    times = StepTimes(alpha=0.5, min_samples=3)
    for seconds in (0.10, 0.20):
        times.add(PX, 4, seconds)
    times.add(2 * PX, 4, 0.5)
    assert times.table(PX) == {}
    times.add(PX, 4, 0.30)
    assert times.table(PX) == {4: pytest.approx(0.225)}  # 0.1 -> 0.15 -> 0.225
    assert times.table(2 * PX) == {}
