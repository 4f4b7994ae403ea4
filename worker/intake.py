"""The intake: submitted jobs become tracks, off the loop's thread.

Prompts are encoded in one batch for all the jobs that arrived together (per LoRA set, since an
adapter may change the text encoders; the set is held on them while they encode), each distinct
text once; then each job gets its own scheduler, generators and first latents. A job whose
encoding or start raises fails alone; a LoRA set that cannot be made active (a file that does not
load) fails its own jobs, and the other sets' jobs go on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack

from worker.families import Conditioning, Encoded, Family
from worker.loop import Adapters, held
from worker.tracks import LoraSet, Starter, StepJob, Track

log = logging.getLogger(__name__)

# What became of each job: its track, or what it raised.
Started = dict[str, Track | Exception]


class Intake:
    """Encodes and starts jobs for one model (one thread uses it)."""

    def __init__(self, family: Family, model: str, adapters: Adapters | None = None) -> None:
        self.family = family
        self.starter = Starter(family, model)
        self.adapters = adapters

    def check(self, job: StepJob) -> None:
        """StepUnsupported for a job that cannot run here (before it is accepted)."""
        self.starter.check(job)

    def start(self, jobs: Sequence[StepJob]) -> Started:
        """Tracks for `jobs`, encoded in one batch per LoRA set."""
        started: Started = {}
        groups: dict[LoraSet, list[StepJob]] = {}
        for job in jobs:
            groups.setdefault(job.loras, []).append(job)
        for loras, group in groups.items():
            started.update(self._start_group(loras, group))
        return started

    def _start_group(self, loras: LoraSet, jobs: Sequence[StepJob]) -> Started:
        """Tracks for jobs of one LoRA set (all failed if the set cannot be made active)."""
        with ExitStack() as stack:
            try:
                stack.enter_context(held(self.adapters, loras, "text"))
            except Exception as e:
                log.warning("LoRA set %s failed %d job(s): %s", loras, len(jobs), e)
                return {job.job_id: e for job in jobs}
            conditionings = self._conditionings(jobs)
        started: Started = {}
        for job, cond in zip(jobs, conditionings, strict=True):
            if isinstance(cond, Exception):
                started[job.job_id] = cond
                continue
            try:
                started[job.job_id] = self.starter.start(job, cond)
            except Exception as e:
                log.warning("job %s could not start: %s", job.job_id, e)
                started[job.job_id] = e
        return started

    def _conditionings(self, jobs: Sequence[StepJob]) -> list[Conditioning | Exception]:
        """Each job's conditioning from one encoder batch; after a failure, job by job."""
        try:
            encoded = self._encode(jobs)
            return [self._conditioning(job, encoded) for job in jobs]
        except Exception as e:
            if len(jobs) == 1:
                log.warning("job %s: its prompt could not be encoded: %s", jobs[0].job_id, e)
                return [e]
            log.warning("encoding %d jobs raised (%s); encoding each alone", len(jobs), e)
            return [c for job in jobs for c in self._conditionings([job])]

    def _encode(self, jobs: Sequence[StepJob]) -> dict[str, Encoded]:
        """Every distinct text the jobs need, encoded in one batch."""
        texts = list(dict.fromkeys(t for job in jobs for t in self._texts(job)))
        return dict(zip(texts, self.family.encode(texts), strict=True))

    def _texts(self, job: StepJob) -> list[str]:
        """The texts one job needs: its prompt, and its negative under guidance."""
        negative = self.family.negative(job.negative_prompt)
        if not self.family.guided(job.guidance_scale) or negative is None:
            return [job.prompt]
        return [job.prompt, negative]

    def _conditioning(self, job: StepJob, encoded: dict[str, Encoded]) -> Conditioning:
        """One job's denoiser rows from the batch's encodings."""
        positive = encoded[job.prompt]
        negative = None
        if self.family.guided(job.guidance_scale):
            text = self.family.negative(job.negative_prompt)
            negative = positive.zeros() if text is None else encoded[text]
        size = (job.height, job.width)
        return self.family.conditioning(
            positive, negative, job.num_images, job.guidance_scale, size
        )
