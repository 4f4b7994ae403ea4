"""What the step engine tells its owner, and the thread that tells it.

Every job submitted ends in exactly one of `on_done`, `on_failed` or `on_canceled` (unless a drain
hands it back unstarted), after all of its progress. The listener is called from the reporter's
own thread, in the order events were posted, so ledger writes never run on the loop's thread;
progress queued meanwhile is merged into one call with each job's latest report.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL.Image import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """A job's progress after a step."""

    job_id: str
    done: int  # timesteps done
    total: int  # timesteps in its schedule
    steps: int  # the steps the request asked for
    call_rows: int = 0  # denoiser rows in the call that did this step (the batch it shared)

    @property
    def step(self) -> int:
        """Progress in the request's steps (PNDM's warm-up and img2img's strength scaled away)."""
        return self.done * self.steps // self.total


class Listener(Protocol):
    """What the engine tells its owner. Each call should be quick: hand slow work (uploads) to
    threads of your own."""

    def on_progress(self, reports: Sequence[StepReport]) -> None:
        """Jobs advanced (the latest report of each job since the last call)."""

    def on_done(self, job_id: str, images: list[Image]) -> None:
        """A job finished; its images, one per seed."""

    def on_failed(self, job_id: str, error: Exception) -> None:
        """A job failed alone (its encoding, start, denoiser rows or decode raised)."""

    def on_canceled(self, job_id: str) -> None:
        """A canceled job left: it made no images and will not be reported again."""


@dataclass(frozen=True)
class _Event:
    """One thing to tell the listener."""

    kind: str  # progress, done, failed, canceled
    job_id: str = ""
    payload: Any = None  # the reports, the images, or the error


class Reporter:
    """The listener's one caller: a queue of events and the thread that delivers them."""

    def __init__(self, listener: Listener, ended: Callable[[str], None]) -> None:
        """`ended(job_id)` is called once a job's end has been delivered."""
        self.listener, self.ended = listener, ended
        self._queue: queue.SimpleQueue[_Event | None] = queue.SimpleQueue()

    def progress(self, reports: list[StepReport]) -> None:
        """Queue reports of one step."""
        self._queue.put(_Event("progress", payload=reports))

    def end(self, kind: str, job_id: str, payload: Any = None) -> None:
        """Queue a job's end: done (payload: images), failed (the error) or canceled."""
        self._queue.put(_Event(kind, job_id, payload))

    def stop(self) -> None:
        """Let `run` return once everything queued before is delivered."""
        self._queue.put(None)

    def run(self) -> None:
        """Deliver events until stopped (the thread's body)."""
        while (first := self._queue.get()) is not None:
            burst, stopping = [first], False
            while not stopping:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    break
                if event is None:
                    stopping = True
                else:
                    burst.append(event)
            self._deliver(burst)
            if stopping:
                return

    def _deliver(self, burst: list[_Event]) -> None:
        """A burst in order; its progress merged up to each end."""
        latest: dict[str, StepReport] = {}
        for event in burst:
            if event.kind == "progress":
                latest.update({r.job_id: r for r in event.payload})
                continue
            self._progress(latest)
            self._end(event)
        self._progress(latest)

    def _progress(self, latest: dict[str, StepReport]) -> None:
        """Deliver the merged progress, if any."""
        if latest:
            self._call("progress", self.listener.on_progress, list(latest.values()))
            latest.clear()

    def _end(self, event: _Event) -> None:
        """Deliver a job's end, then say it ended."""
        if event.kind == "done":
            self._call(event.job_id, self.listener.on_done, event.job_id, event.payload)
        elif event.kind == "failed":
            self._call(event.job_id, self.listener.on_failed, event.job_id, event.payload)
        else:
            self._call(event.job_id, self.listener.on_canceled, event.job_id)
        self.ended(event.job_id)

    def _call(self, what: str, fn: Callable[..., object], *args: Any) -> None:
        """A listener call; what it raises is logged, and the reporter goes on."""
        try:
            fn(*args)
        except Exception:
            log.exception("the step engine's listener raised for %s", what)
