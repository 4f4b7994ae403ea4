"""The step engine: a worker-owned denoising loop that jobs join and leave at every step.

Four threads, each owning its part:
- intake: encodes prompts (one batch for the jobs that arrived together) and prepares each job's
  scheduler and first latents, then hands the tracks to the loop;
- loop: at each step boundary drops canceled jobs, admits waiting ones (`admission.admit`), then
  runs one `Loop.step()`; nothing else runs on it, so CPU work never stalls the denoiser;
- finisher: decodes each finished job's latents to images;
- reporter: calls the listener, in order (`worker.reports`), so that ledger writes and uploads
  never run on the loop.
State shared between them sits behind one condition, `_cond`; see `_Shared`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from worker.admission import Budget, Seat, StepTimes, admit, row_budget
from worker.families import StepUnsupported, family_of
from worker.intake import Intake
from worker.loop import Adapters, Loop, Step, Stopwatch
from worker.reports import Listener, Reporter, StepReport
from worker.tracks import StepJob, Track

log = logging.getLogger(__name__)

# Steps ahead that the owner hands in jobs for: a job handed in is started (its prompt encoded) by
# the time a seat frees for it, and no sooner than it needs to be.
LEAD_STEPS = 2


@dataclass(frozen=True)
class LoopSettings:
    """How much the loop may hold at once."""

    max_rows: int = 16  # denoiser rows of all running jobs (two per guided image)
    max_pixels: int | None = None  # rows x pixels of all running jobs; None: no cap
    adaptive: bool = True  # cap each call's rows where more rows stop paying (admission.row_budget)
    min_rows: int = 2  # the adaptive cap never goes below this
    preempt: bool = True  # more urgent jobs may park less urgent ones
    intake_batch: int = 16  # jobs encoded in one text-encoder batch at most


@dataclass
class LoopStats:
    """Where the loop's busy time went (written by the loop thread under the engine's lock)."""

    steps: int = 0
    rows: int = 0  # denoiser rows over all steps
    busy_s: float = 0.0  # the loop thread's time from admission to hand-off, idle waits excluded
    denoise_s: float = 0.0  # of which the denoiser calls took (GPU time on a GPU)
    by_rows: dict[int, tuple[int, float]] = field(default_factory=dict)  # rows: (calls, seconds)
    last_step_at: float | None = None  # time.monotonic() at the end of the last step: liveness

    @property
    def outside_share(self) -> float | None:
        """The part of busy time spent outside the denoiser."""
        return None if self.busy_s <= 0 else max(0.0, 1 - self.denoise_s / self.busy_s)

    def add_lap(self, rows: int, seconds: float) -> None:
        """Count one timed denoiser call."""
        self.denoise_s += seconds
        calls, total = self.by_rows.get(rows, (0, 0.0))
        self.by_rows[rows] = (calls + 1, total + seconds)

    def copy(self) -> LoopStats:
        """A snapshot."""
        return replace(self, by_rows=dict(self.by_rows))


@dataclass(frozen=True)
class Drained:
    """What a drain left: jobs never started (to hand back), jobs still running at its timeout."""

    returned: list[str]
    unfinished: list[str]


@dataclass
class _Waiting:
    """A prepared track waiting for a seat (fresh, or parked after it ran)."""

    track: Track
    arrived: float
    ran: bool = False


@dataclass
class _Shared:
    """State the threads share; every field is read and written under `StepEngine._cond`."""

    inbox: list[tuple[StepJob, float]] = field(default_factory=list)  # submitted, not yet started
    starting: int = 0  # jobs the intake is starting right now
    waiting: dict[str, _Waiting] = field(default_factory=dict)  # started, not running
    canceled: set[str] = field(default_factory=set)
    open: set[str] = field(default_factory=set)  # submitted, not yet reported as ended
    # The loop thread keeps these, for `wants`: jobs running in the loop, those of them with at
    # most LEAD_STEPS steps to go, and the rows one call may hold by the last admission's budget.
    seated: int = 0
    ending: int = 0
    cap_rows: int = 0
    draining: bool = False
    closing: bool = False


class StepEngine:
    """A step-level batching engine over one loaded SD-family pipeline."""

    def __init__(
        self,
        pipe: Any,
        listener: Listener,
        *,
        model: str = "model",
        settings: LoopSettings | None = None,
        adapters: Adapters | None = None,
        stopwatch: Stopwatch | None = None,
        denoiser: Any = None,
    ) -> None:
        """`adapters`: LoRA support shared by the intake and the loop (in a worker,
        `worker.loras.StepAdapters`); without it jobs with LoRAs are refused. `denoiser`: what to
        call in place of `pipe.unet` (a compiled one, say)."""
        self.family = family_of(pipe)
        self.model, self.listener = model, listener
        self.settings = settings or LoopSettings()
        self.adapters = adapters
        self.intake = Intake(self.family, model, adapters)
        self.loop = Loop(denoiser or pipe.unet, adapters, stopwatch)
        self.stats = LoopStats()
        self.times = StepTimes()
        self._cond = threading.Condition()
        self._shared = _Shared(cap_rows=self.settings.max_rows)
        self._finished: queue.SimpleQueue[Track | None] = queue.SimpleQueue()
        self.reporter = Reporter(listener, self._ended)
        self._threads: list[threading.Thread] = []
        # The loop thread's own: when each running job arrived and was admitted.
        self._arrived: dict[str, float] = {}
        self._admitted: dict[str, float] = {}
        self._woke = 0.0

    # --- the owner's side ---------------------------------------------------------------------

    def start(self) -> StepEngine:
        """Start the engine's threads."""
        for target, name in (
            (self._intake_loop, "intake"),
            (self._step_loop, "loop"),
            (self._finish_loop, "finisher"),
            (self.reporter.run, "reporter"),
        ):
            thread = threading.Thread(target=target, name=f"dq-steps-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def submit(self, job: StepJob) -> None:
        """Take a job; StepUnsupported or ValidationFailed (at once) when it cannot run here."""
        self.intake.check(job)
        if job.loras and self.adapters is None:
            raise StepUnsupported("this step engine has no LoRA support: run the job in batches")
        with self._cond:
            shared = self._shared
            if shared.draining or shared.closing:
                raise StepUnsupported("the step engine is draining and takes no new job")
            if job.job_id in shared.open:
                raise StepUnsupported(f"job {job.job_id} is already in the step engine")
            shared.open.add(job.job_id)
            shared.inbox.append((job, time.monotonic()))
            self._cond.notify_all()

    def cancel(self, job_id: str) -> bool:
        """Drop a job at the next step boundary (no images); False if it is not here."""
        with self._cond:
            if job_id not in self._shared.open:
                return False
            self._shared.canceled.add(job_id)
            self._cond.notify_all()
            return True

    def drain(self, timeout: float) -> Drained:
        """Admit nothing new, finish every job that started, and say what was left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            shared = self._shared
            shared.draining = True
            self._cond.notify_all()
            self._cond.wait_for(
                lambda: self._settled(), timeout=max(0.0, deadline - time.monotonic())
            )
            fresh = [j.job_id for j, _ in shared.inbox]
            fresh += [i for i, w in shared.waiting.items() if not w.ran]
            shared.inbox.clear()
            for job_id in fresh:
                shared.waiting.pop(job_id, None)
                shared.open.discard(job_id)
            return Drained(returned=fresh, unfinished=sorted(shared.open))

    def close(self, timeout: float = 10.0) -> None:
        """Stop every thread (jobs still running are dropped unreported: drain first)."""
        with self._cond:
            self._shared.closing = True
            self._cond.notify_all()
        self._finished.put(None)
        for thread in self._threads:
            thread.join(timeout)
            if thread.name == "dq-steps-finisher":
                self.reporter.stop()

    def open_jobs(self) -> int:
        """Jobs taken and not yet reported as ended (waiting, running or decoding)."""
        with self._cond:
            return len(self._shared.open)

    def wants(self) -> int:
        """How many more jobs the owner should hand in now.

        The line here (handed in, not yet seated) is kept as long as `line()`: the seats the
        next few boundaries will offer, started (prompts encoded) by the time they do. A job
        handed in beyond that would only wait here, claimed, in arrival order, while the ledger
        keeps its queue in fair order: a light tenant's job would queue behind a flood's."""
        with self._cond:
            shared = self._shared
            fresh = sum(1 for w in shared.waiting.values() if not w.ran)
            queued = len(shared.inbox) + shared.starting + fresh
            return max(0, self._line() - queued)

    def line(self) -> int:
        """How many jobs should wait here for a seat: the seats open now (as many two-row,
        guided jobs as the call budget still holds: few where rows do not pay, as on a CPU),
        plus the running jobs within LEAD_STEPS steps of their end, and at least one."""
        with self._cond:
            return self._line()

    def _line(self) -> int:
        shared = self._shared
        open_seats = max(0, shared.cap_rows // 2 - shared.seated)
        return max(1, open_seats + shared.ending)

    def _note_seats(self) -> None:
        """What `wants` reads of the loop (the loop thread, under the lock)."""
        tracks = self.loop.tracks.values()
        self._shared.seated = len(tracks)
        self._shared.ending = sum(1 for t in tracks if t.total - t.index <= LEAD_STEPS)

    def snapshot(self) -> LoopStats:
        """The loop's figures so far."""
        with self._cond:
            return self.stats.copy()

    def _settled(self) -> bool:
        """Draining: nothing started is still running, starting or unreported."""
        shared = self._shared
        fresh = {j.job_id for j, _ in shared.inbox} | {
            i for i, w in shared.waiting.items() if not w.ran
        }
        return shared.starting == 0 and shared.open <= fresh

    # --- intake thread ------------------------------------------------------------------------

    def _intake_loop(self) -> None:
        """Start jobs as they arrive, in batches."""
        while (batch := self._next_intake()) is not None:
            try:
                started = self.intake.start([job for job, _ in batch])
            except Exception as e:  # a loop boundary: fail this batch's jobs, keep serving
                log.exception("the intake raised for %d jobs", len(batch))
                started = {job.job_id: e for job, _ in batch}
            self._hand_over(batch, started)

    def _next_intake(self) -> list[tuple[StepJob, float]] | None:
        """The next jobs to start (None when closing); canceled ones are dropped here."""
        with self._cond:
            shared = self._shared
            self._cond.wait_for(lambda: shared.closing or (shared.inbox and not shared.draining))
            if shared.closing:
                return None
            batch = shared.inbox[: self.settings.intake_batch]
            del shared.inbox[: len(batch)]
            for job, _ in batch:
                if job.job_id in shared.canceled:
                    self.reporter.end("canceled", job.job_id)
            batch = [(job, at) for job, at in batch if job.job_id not in shared.canceled]
            shared.starting = len(batch)
            return batch

    def _hand_over(self, batch: list[tuple[StepJob, float]], started: dict[str, Any]) -> None:
        """Give the started tracks to the loop; report the jobs that failed to start."""
        with self._cond:
            shared = self._shared
            for job, arrived in batch:
                outcome = started[job.job_id]
                if isinstance(outcome, Exception):
                    self.reporter.end("failed", job.job_id, outcome)
                elif job.job_id in shared.canceled:
                    self.reporter.end("canceled", job.job_id)
                else:
                    shared.waiting[job.job_id] = _Waiting(outcome, arrived)
            shared.starting = 0
            self._cond.notify_all()

    # --- loop thread --------------------------------------------------------------------------

    def _step_loop(self) -> None:
        """Admit at each step boundary, then step; idle while there is nothing to run."""
        with torch.inference_mode():
            while self._boundary():
                try:
                    step = self.loop.step()
                except Exception as e:  # a loop boundary: the running jobs fail, the loop goes on
                    log.exception("a step raised outside any one job's rows")
                    step = Step(failed=[(t, e) for t in self.loop.tracks.values()])
                    self.loop.tracks.clear()
                self._after(step)

    def _boundary(self) -> bool:
        """Wait for work, apply cancels and admission; False when closing."""
        with self._cond:
            self._cond.wait_for(lambda: self._shared.closing or self._runnable())
            self._woke = time.perf_counter()
            if self._shared.closing:
                return False
            self._drop_canceled()
            self._admit()
            return True

    def _runnable(self) -> bool:
        """Whether a step could run: tracks in the loop, or admissible ones waiting."""
        shared = self._shared
        admissible = any(w.ran or not shared.draining for w in shared.waiting.values())
        return bool(self.loop.tracks or admissible)

    def _drop_canceled(self) -> None:
        """Canceled jobs leave the loop and the waiting line."""
        shared = self._shared
        for job_id in list(shared.canceled):
            left = self.loop.leave(job_id)  # running or parked
            waited = shared.waiting.pop(job_id, None)  # waiting (parked ones wait too)
            if left or waited:
                self.reporter.end("canceled", job_id)

    def _admit(self) -> None:
        """Join and park as `admission.admit` says."""
        shared = self._shared
        waiting = {i: w for i, w in shared.waiting.items() if w.ran or not shared.draining}
        running = [self._seat(t, since) for t, since in self._running()]
        seats = [self._seat(w.track, w.arrived) for w in waiting.values()]
        budget = self._budget(seats, running)
        plan = admit(seats, running, budget, preempt=self.settings.preempt)
        if keys := {seat.key for seat in [*seats, *running]}:
            shared.cap_rows = max(budget.rows_for(key) for key in keys)
        now = time.monotonic()
        for job_id in plan.park:
            track = self.loop.park(job_id)
            shared.waiting[job_id] = _Waiting(track, self._arrived[job_id], ran=True)
        for job_id in plan.admit:
            item = shared.waiting.pop(job_id)
            self._arrived[job_id] = item.arrived
            self._admitted[job_id] = now
            self.loop.join(item.track)
        self._note_seats()

    def _running(self) -> list[tuple[Track, float]]:
        """Running tracks with when they were admitted."""
        return [(t, self._admitted.get(t.job_id, 0.0)) for t in self.loop.tracks.values()]

    def _seat(self, track: Track, since: float) -> Seat:
        """A track as admission sees it."""
        key = track.key
        return Seat(track.job_id, key, track.job.priority, since, track.rows, key.pixels)

    def _budget(self, waiting: list[Seat], running: list[Seat]) -> Budget:
        """The settings' caps, with each key's adaptive call cap."""
        s = self.settings
        pixels = s.max_pixels if s.max_pixels is not None else 2**62
        if not s.adaptive:
            return Budget(s.max_rows, pixels)
        keys: set[Any] = {seat.key for seat in [*waiting, *running]}
        caps = {
            key: row_budget(self.times.table(key.pixels), s.min_rows, s.max_rows) for key in keys
        }
        return Budget(s.max_rows, pixels, caps)

    def _after(self, step: Step) -> None:
        """Progress and failures to the events thread, then finished tracks to the finisher."""
        with self._cond:
            reports = [
                StepReport(t.job_id, t.index, t.total, t.job.steps, step.rows)
                for t in step.advanced
            ]
            if reports:
                self.reporter.progress(reports)
            for track, error in step.failed:
                self.reporter.end("failed", track.job_id, error)
            for track in [*step.finished, *(t for t, _ in step.failed)]:
                self._admitted.pop(track.job_id, None)
                self._arrived.pop(track.job_id, None)
            self._count(step, time.perf_counter() - self._woke)
            self._note_seats()
        for track in step.finished:
            self._finished.put(track)

    def _count(self, step: Step, busy_s: float) -> None:
        """Fold a step into the figures and the adaptive budget's step times."""
        self.stats.steps += 1
        self.stats.rows += step.rows
        self.stats.busy_s += busy_s
        self.stats.last_step_at = time.monotonic()
        for rows, pixels, seconds in self.loop.stopwatch.laps():
            self.stats.add_lap(rows, seconds)
            self.times.add(pixels, rows, seconds)

    # --- finisher thread ----------------------------------------------------------------------

    def _finish_loop(self) -> None:
        """Decode finished tracks, one job at a time (a failing decode fails its job alone)."""
        with torch.inference_mode():
            while (track := self._finished.get()) is not None:
                if self._is_canceled(track.job_id):
                    self.reporter.end("canceled", track.job_id)
                    continue
                try:
                    images = self.family.decode(track.latents, track.generators)
                except Exception as e:
                    log.warning("job %s could not be decoded: %s", track.job_id, e)
                    self.reporter.end("failed", track.job_id, e)
                    continue
                kind = "canceled" if self._is_canceled(track.job_id) else "done"
                self.reporter.end(kind, track.job_id, images)

    def _is_canceled(self, job_id: str) -> bool:
        with self._cond:
            return job_id in self._shared.canceled

    def _ended(self, job_id: str) -> None:
        """The reporter delivered a job's end: forget the job."""
        with self._cond:
            self._shared.open.discard(job_id)
            self._shared.canceled.discard(job_id)
            self._cond.notify_all()
