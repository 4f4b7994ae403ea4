"""The denoising loop itself: tracks join and leave at step boundaries, one denoiser call a step.

Synchronous and owned by one thread (the step engine's loop thread, or a test). Each `step()`
advances the tracks of one loop key (keys take turns) with a single denoiser call over all their
rows, each row at its own timestep, the key's LoRA set held on the UNet through the call; guidance
and the scheduler step are then per job. When the shared call raises, each job's rows run again
alone, so one bad job fails alone.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from worker.families import Conditioning
from worker.tracks import LoopKey, LoraSet, Track

log = logging.getLogger(__name__)

# A denoiser call's outcome for one track: its noise prediction, or what it raised.
Outcome = torch.Tensor | Exception


class Adapters(Protocol):
    """LoRA adapters as the step engine's threads use them (worker.loras.StepAdapters in a worker).

    The intake (text encoders) and the loop (UNet) hold a set on their own threads at the same
    time, so an implementation must keep one thread's switch from changing the weights another is
    calling with.
    """

    def hold(self, loras: LoraSet, part: str) -> AbstractContextManager[object]:
        """`loras` active on `part` ("unet", or "text": the text encoders) for the block, and
        kept so until it ends; raises on entry when the set cannot be made active."""


def held(adapters: Adapters | None, loras: LoraSet, part: str) -> AbstractContextManager[object]:
    """`adapters.hold(loras, part)`; without adapters only the empty set (the base weights)."""
    if adapters is not None:
        return adapters.hold(loras, part)
    if loras:
        raise RuntimeError("a LoRA set reached the step engine without adapters to apply it")
    return nullcontext()


class Stopwatch(Protocol):
    """Times denoiser calls: on the host clock, or with CUDA events on a GPU."""

    def begin(self) -> None:
        """Just before a call is issued."""

    def end(self, rows: int, pixels: int) -> None:
        """Just after it is issued."""

    def laps(self) -> list[tuple[int, int, float]]:
        """(rows, pixels, seconds) of the calls timed since the last ask that have completed."""


class HostStopwatch:
    """Wall-clock timing: exact where the call returns when done (the CPU)."""

    def __init__(self) -> None:
        self._began = 0.0
        self._laps: list[tuple[int, int, float]] = []

    def begin(self) -> None:
        """Note the start."""
        self._began = time.perf_counter()

    def end(self, rows: int, pixels: int) -> None:
        """Note the lap."""
        self._laps.append((rows, pixels, time.perf_counter() - self._began))

    def laps(self) -> list[tuple[int, int, float]]:
        """The laps so far, once."""
        laps, self._laps = self._laps, []
        return laps


class CudaStopwatch:
    """GPU timing with events: the host returns before the GPU is done, so the wall clock lies."""

    def __init__(self) -> None:
        self._began: Any = None
        self._pending: list[tuple[int, int, Any, Any]] = []

    def begin(self) -> None:
        """Record a start event on the current stream."""
        self._began = _event()

    def end(self, rows: int, pixels: int) -> None:
        """Record an end event; its lap is read once the GPU has passed it."""
        ended = _event()
        self._pending.append((rows, pixels, self._began, ended))

    def laps(self) -> list[tuple[int, int, float]]:
        """The laps whose end the GPU has reached (never waits for one)."""
        laps, pending = [], []
        for rows, px, start, end in self._pending:
            if end.query():
                laps.append((rows, px, start.elapsed_time(end) / 1000))
            else:
                pending.append((rows, px, start, end))
        self._pending = pending
        return laps


def _event() -> Any:
    """A timing event recorded now on the current CUDA stream."""
    make: Any = torch.cuda.Event  # untyped in torch
    event = make(enable_timing=True)
    event.record()
    return event


def _to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """A float32 vector on `device`; from pinned memory on CUDA, so the copy does not wait."""
    host = torch.tensor(values, dtype=torch.float32)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def stopwatch_for(device: torch.device) -> Stopwatch:
    """The stopwatch that tells the truth on `device`."""
    return CudaStopwatch() if device.type == "cuda" else HostStopwatch()


@dataclass
class Step:
    """What one `step()` did."""

    key: LoopKey | None = None
    rows: int = 0  # denoiser rows in the call
    advanced: list[Track] = field(default_factory=list)  # did a timestep (finished ones too)
    finished: list[Track] = field(default_factory=list)  # left the loop: every timestep done
    failed: list[tuple[Track, Exception]] = field(default_factory=list)  # left the loop


class Loop:
    """Running tracks by job id (in admission order), parked tracks, and the step itself."""

    def __init__(
        self, unet: Any, adapters: Adapters | None = None, stopwatch: Stopwatch | None = None
    ) -> None:
        self.unet = unet
        self.adapters = adapters
        self.stopwatch = stopwatch or stopwatch_for(unet.device)
        self.tracks: dict[str, Track] = {}
        self.parked: dict[str, Track] = {}
        self._turn = 0
        self._conds: dict[LoopKey, tuple[tuple[Track, ...], Conditioning]] = {}  # last, by key

    def join(self, track: Track) -> None:
        """Run `track` from the next step on (a parked one resumes where it stopped)."""
        self.parked.pop(track.job_id, None)
        self.tracks[track.job_id] = track

    def park(self, job_id: str) -> Track:
        """Take a running track out of the calls, keeping all its state."""
        track = self.tracks.pop(job_id)
        self.parked[job_id] = track
        return track

    def leave(self, job_id: str) -> Track | None:
        """Drop a running or parked track (canceled); None if it is not here."""
        return self.tracks.pop(job_id, None) or self.parked.pop(job_id, None)

    def keys(self) -> list[LoopKey]:
        """The loop keys running, in order of their first admission."""
        return list(dict.fromkeys(t.key for t in self.tracks.values()))

    @torch.inference_mode()
    def step(self) -> Step:
        """One denoiser call over the next key's tracks; each then takes its own scheduler step."""
        keys = self.keys()
        if not keys:
            return Step()
        key = keys[self._turn % len(keys)]
        self._turn += 1
        group = [t for t in self.tracks.values() if t.key == key]
        result = Step(key=key, rows=sum(t.rows for t in group))
        with ExitStack() as stack:
            try:  # the key's LoRA set stays on the UNet until its call is issued
                stack.enter_context(held(self.adapters, key.loras, "unet"))
            except Exception as e:  # the adapters would not switch: this key's jobs cannot run
                log.exception("switching to LoRA set %s raised", key.loras)
                result.failed = [(t, e) for t in group]
                group = []
            ready = []
            for track in group:
                try:
                    ready.append((track, track.model_input()))
                except Exception as e:
                    result.failed.append((track, e))
            outcomes = self._denoise(ready, key)
        for (track, _), outcome in zip(ready, outcomes, strict=True):
            self._advance(track, outcome, result)
        for track in [*result.finished, *(t for t, _ in result.failed)]:
            self.tracks.pop(track.job_id, None)
        return result

    def _advance(self, track: Track, outcome: Outcome, result: Step) -> None:
        """Apply one job's share of the call: guidance and its scheduler's step."""
        try:
            if isinstance(outcome, Exception):
                raise outcome
            track.advance(outcome)
        except Exception as e:
            result.failed.append((track, e))
            return
        result.advanced.append(track)
        if track.done:
            result.finished.append(track)

    def _denoise(self, ready: list[tuple[Track, torch.Tensor]], key: LoopKey) -> list[Outcome]:
        """Each track's noise prediction from one call; after a failure, from one call each."""
        if not ready:
            return []
        try:
            return self._call(ready, key)
        except Exception as e:
            if len(ready) == 1:
                log.warning("job %s: the denoiser raised: %s", ready[0][0].job_id, e)
                return [e]
            log.warning("a denoiser call of %d jobs raised (%s); each runs alone", len(ready), e)
            return [outcome for item in ready for outcome in self._denoise([item], key)]

    def _call(self, ready: list[tuple[Track, torch.Tensor]], key: LoopKey) -> list[Outcome]:
        """One denoiser call over the rows of `ready`, split back per track."""
        tracks = [t for t, _ in ready]
        sample = torch.cat([x for _, x in ready])
        rows = [value for t in tracks for value in t.timestep_rows()]
        timesteps = _to_device(rows, sample.device)
        cond = self._conditioning(tracks, key)
        self.stopwatch.begin()
        noise = self.unet(sample, timesteps, **cond.unet_kwargs(), return_dict=False)[0]
        self.stopwatch.end(len(sample), key.pixels)
        return list(noise.split([t.rows for t in tracks]))

    def _conditioning(self, tracks: list[Track], key: LoopKey) -> Conditioning:
        """The call's conditioning rows, rebuilt only when the key's tracks change."""
        members = tuple(tracks)  # compared by identity: a job id may come back as a new track
        cached = self._conds.get(key)
        if cached is None or cached[0] != members:
            cached = self._conds[key] = (members, Conditioning.cat([t.cond for t in tracks]))
            for gone in self._conds.keys() - set(self.keys()):
                del self._conds[gone]
        return cached[1]
