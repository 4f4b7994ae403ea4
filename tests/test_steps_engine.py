"""The step engine's threads: jobs submitted while others run, cancel, failure, drain, priority.

The real tiny pipeline on the CPU. Where a test needs something to happen at an exact step, a hook
on the loop thread (the stopwatch's `begin`, just before each denoiser call) does it there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.steps_parts import (
    PARITY,
    CheckedUNet,
    HookedStopwatch,
    Recorder,
    distances,
    init_image,
    reference,
)
from worker.admission import Priority
from worker.families import StepUnsupported
from worker.models import load_pipeline
from worker.steps import LoopSettings, StepEngine
from worker.tracks import StepJob


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a small shared machine more threads only fight over the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(model_cache: Path) -> Any:
    """The tiny SD pipeline, shared by this module's tests."""
    return load_pipeline("tiny", model_cache, device="cpu")


@pytest.fixture
def recorder() -> Recorder:
    """A fresh listener."""
    return Recorder()


@pytest.fixture
def engines() -> Iterator[list[StepEngine]]:
    """Engines a test starts, closed after it."""
    started: list[StepEngine] = []
    yield started
    for engine in started:
        engine.close()


def job(job_id: str, **fields: Any) -> StepJob:
    """A 64x64 job with a prompt of its own."""
    fields = {"width": 64, "height": 64, "steps": 4, "seed": len(job_id), **fields}
    return StepJob(job_id, f"a harbour at dawn, {job_id}", **fields)


def engine_for(
    pipe: Any, listener: Recorder, engines: list[StepEngine], **options: Any
) -> StepEngine:
    """A started engine with `options` split between its settings and its parts."""
    parts = {k: options.pop(k) for k in ("stopwatch", "denoiser") if k in options}
    engine = StepEngine(pipe, listener, model="tiny", settings=LoopSettings(**options), **parts)
    engines.append(engine.start())
    return engine


def test_jobs_submitted_while_others_run_join_and_match(
    tiny: Any, recorder: Recorder, engines: list[StepEngine]
) -> None:
    engine = engine_for(tiny, recorder, engines, adaptive=False)
    first = job("first", steps=8, scheduler="euler_a")
    later = [
        job("second", steps=3, guidance_scale=4.0, num_images=2),
        job("third", steps=5, scheduler="dpmpp_2m", guidance_scale=1.0),
    ]

    def submit_more(report: Any) -> None:
        if report.job_id == "first" and report.done == 2:
            for j in later:
                engine.submit(j)

    recorder.on_report = submit_more
    engine.submit(first)
    recorder.wait_for(lambda: len(recorder.done) == 3)
    for j in [first, *later]:
        assert max(distances(recorder.done[j.job_id], reference(tiny, j))) <= PARITY
    assert recorder.done_steps("first") == list(range(1, 9))
    assert max(rows for rows in engine.snapshot().by_rows) >= 2 + 4  # they shared calls
    assert max(r.call_rows for r in recorder.reports if r.job_id == "first") >= 2 + 4
    assert engine.open_jobs() == 0
    # Each job's last progress comes before its images.
    for j in ["first", "second", "third"]:
        events = [kind for kind, job_id in recorder.order if job_id == j]
        assert events[-1] == "done"
        assert events[:-1] == ["progress"] * (len(events) - 1)


def test_a_canceled_job_leaves_at_the_next_step(
    tiny: Any, recorder: Recorder, engines: list[StepEngine]
) -> None:
    engines_: list[StepEngine] = []

    def cancel_at_third_call(n: int) -> None:
        if n == 3:
            assert engines_[0].cancel("doomed")

    engine = engine_for(tiny, recorder, engines, stopwatch=HookedStopwatch(cancel_at_third_call))
    engines_.append(engine)
    engine.submit(job("doomed", steps=10))
    engine.submit(job("kept", steps=6))
    recorder.wait_for(lambda: recorder.ended() == {"doomed", "kept"})
    # Canceled just before the third call: that step still ran, the next did not.
    assert recorder.done_steps("doomed") == [1, 2, 3]
    assert recorder.canceled == ["doomed"]
    assert set(recorder.done) == {"kept"}
    assert max(distances(recorder.done["kept"], reference(tiny, job("kept", steps=6)))) <= PARITY
    assert not engine.cancel("doomed")  # gone


def test_a_canceled_waiting_job_never_runs(
    tiny: Any, recorder: Recorder, engines: list[StepEngine]
) -> None:
    engines_: list[StepEngine] = []

    def submit_and_cancel(n: int) -> None:
        if n == 1:
            engines_[0].submit(job("waits"))
            assert engines_[0].cancel("waits")

    engine = engine_for(
        tiny, recorder, engines, max_rows=2, adaptive=False,
        stopwatch=HookedStopwatch(submit_and_cancel),
    )  # fmt: skip
    engines_.append(engine)
    engine.submit(job("runs", steps=3))
    recorder.wait_for(lambda: recorder.ended() == {"runs", "waits"})
    assert recorder.canceled == ["waits"]
    assert recorder.done_steps("waits") == []


def test_a_failing_job_fails_alone(
    tiny: Any, recorder: Recorder, engines: list[StepEngine]
) -> None:
    denoiser = CheckedUNet(tiny.unet)
    engine = engine_for(tiny, recorder, engines, denoiser=denoiser, adaptive=False)
    grey = init_image().convert("L")  # one channel: the VAE's encoder refuses it
    bad = [
        job("nan", steps=4, guidance_scale=float("inf")),  # its latents turn NaN after one step
        job("grey", steps=4, image=grey),
    ]
    good = [job("fine", steps=4), job("also-fine", steps=3, scheduler="euler_a")]
    for j in [*good, *bad]:
        engine.submit(j)
    recorder.wait_for(lambda: len(recorder.ended()) == 4)
    assert set(recorder.failed) == {"nan", "grey"}
    assert isinstance(recorder.failed["nan"], FloatingPointError)
    assert set(recorder.done) == {"fine", "also-fine"}
    for j in good:
        assert max(distances(recorder.done[j.job_id], reference(tiny, j))) <= PARITY
    # The shared call raised; then each job's rows ran alone, and only the bad job's raised.
    calls = denoiser.calls
    shared = next(i for i, (rows, raised) in enumerate(calls) if raised and rows > 2)
    alone = calls[shared + 1 : shared + 1 + calls[shared][0] // 2]
    assert {rows for rows, _ in alone} == {2}
    assert [raised for _, raised in alone].count(True) == 1


def test_drain_finishes_what_started_and_hands_back_the_rest(
    tiny: Any, recorder: Recorder, engines: list[StepEngine]
) -> None:
    engine = engine_for(tiny, recorder, engines, max_rows=2, adaptive=False)
    engine.submit(job("running", steps=6))
    recorder.wait_for(lambda: bool(recorder.done_steps("running")))
    engine.submit(job("waiting"))  # no room beside "running": it waits
    drained = engine.drain(timeout=120)
    assert drained.returned == ["waiting"]
    assert drained.unfinished == []
    assert set(recorder.done) == {"running"}
    assert recorder.done_steps("waiting") == []
    with pytest.raises(StepUnsupported):
        engine.submit(job("late"))


def test_a_high_priority_job_parks_a_running_one_and_both_match(
    tiny: Any, recorder: Recorder, engines: list[StepEngine]
) -> None:
    engines_: list[StepEngine] = []
    urgent = job("urgent", steps=3, priority=Priority.HIGH)

    def submit_urgent(n: int) -> None:
        if n == 2:
            engines_[0].submit(urgent)

    engine = engine_for(
        tiny, recorder, engines, max_rows=2, adaptive=False,
        stopwatch=HookedStopwatch(submit_urgent),
    )  # fmt: skip
    engines_.append(engine)
    slow = job("slow", steps=10, scheduler="dpmpp_2m")
    engine.submit(slow)
    recorder.wait_for(lambda: len(recorder.done) == 2)
    assert [j for kind, j in recorder.order if kind == "done"] == ["urgent", "slow"]
    assert recorder.done_steps("slow") == list(range(1, 11))  # resumed where it stopped
    for j in (slow, urgent):
        assert max(distances(recorder.done[j.job_id], reference(tiny, j))) <= PARITY
    assert set(engine.snapshot().by_rows) == {2}  # never both at once: the row budget held


def test_refusals(tiny: Any, recorder: Recorder, engines: list[StepEngine]) -> None:
    engine = engine_for(tiny, recorder, engines)
    with pytest.raises(StepUnsupported):
        engine.submit(job("lora", loras=(("ink", 1.0),)))  # no adapters given
    engine.submit(job("twice", steps=2))
    with pytest.raises(StepUnsupported):
        engine.submit(job("twice", steps=2))
    recorder.wait_for(lambda: "twice" in recorder.done)


def test_the_loop_reports_where_its_time_went(
    tiny: Any, recorder: Recorder, engines: list[StepEngine]
) -> None:
    engine = engine_for(tiny, recorder, engines)
    for i in range(3):
        engine.submit(job(f"j{i}", steps=4))
    recorder.wait_for(lambda: len(recorder.done) == 3)
    stats = engine.snapshot()
    assert stats.steps >= 4
    assert sum(calls for calls, _ in stats.by_rows.values()) == stats.steps
    assert 0 < stats.denoise_s < stats.busy_s
    assert stats.outside_share is not None
    assert 0 < stats.outside_share < 1
    assert stats.last_step_at is not None


def test_the_adaptive_row_budget_starts_small_and_grows_with_measurements(
    tiny: Any, recorder: Recorder, engines: list[StepEngine]
) -> None:
    engine = engine_for(tiny, recorder, engines, min_rows=2, max_rows=12)
    for i in range(6):
        engine.submit(job(f"j{i}", steps=8))  # 6 guided jobs: 12 rows
    recorder.wait_for(lambda: len(recorder.done) == 6)
    sizes = engine.snapshot().by_rows
    assert max(rows for rows in sizes if sizes[rows][0] >= 3) >= 4  # first capped, then measured
    assert max(sizes) > 4  # then probed larger


def test_the_line_is_the_seats_the_next_steps_free_and_no_more(
    tiny: Any, recorder: Recorder, engines: list[StepEngine]
) -> None:
    """What the owner may hand in (`wants`): a longer line would hold jobs here, claimed, in
    arrival order, while the ledger keeps later ones in fair order."""
    engines_: list[StepEngine] = []
    seen: dict[int, tuple[int, int]] = {}  # call: (line, wants), read just before it

    def look(n: int) -> None:
        engine = engines_[0]
        if n == 1:
            engine.submit(job("third", steps=2))
        seen[n] = (engine.line(), engine.wants())

    engine = engine_for(
        tiny, recorder, engines, max_rows=4, adaptive=False, stopwatch=HookedStopwatch(look)
    )  # two guided jobs run at once
    engines_.append(engine)
    assert (engine.line(), engine.wants()) == (2, 2)  # idle: the open seats
    engine.submit(job("first", steps=8))
    engine.submit(job("second", steps=8))
    recorder.wait_for(lambda: recorder.ended() == {"first", "second", "third"})
    # Calls 1-6: both seats taken, neither job within two steps of its end: a line of one, the
    # third job in it. Calls 7-8: both end soon, so two may wait; the third already does.
    assert [seen[n] for n in range(1, 9)] == [(1, 0)] * 6 + [(2, 1)] * 2
    assert (engine.line(), engine.wants()) == (2, 2)
