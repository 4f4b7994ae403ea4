"""A job's images, fetched: bytes in memory, written to files, or opened with Pillow."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from dq_client.errors import JobFailed, JobNotFinished
from dq_client.models import Job, Output

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


EXPIRED = frozenset({403, 404, 410})  # what an output URL past its expiry answers


def finished(job: Job) -> Job:
    """The job if it succeeded; otherwise why there are no images to fetch."""
    if job.succeeded:
        return job
    raise JobFailed(job) if job.terminal else JobNotFinished(job)


def with_urls(job: Job | str) -> Job | None:
    """The job if it already carries its images' URLs (no need to read it again)."""
    return job if isinstance(job, Job) and job.succeeded and job.outputs else None


def extension(job: Job, output: Output) -> str:
    """The file extension of an output: its URL's, else the requested format's."""
    suffix = Path(urlsplit(output.url).path).suffix.lstrip(".")
    return suffix or job.request.output_format


@dataclass(frozen=True)
class Image:
    """One image of a job: its encoded bytes and how it was made."""

    job_id: str
    index: int
    seed: int
    width: int
    height: int
    format: str
    data: bytes = field(repr=False)

    @property
    def filename(self) -> str:
        """The name `download` gives it: `<job id>-<index>.<format>`."""
        return f"{self.job_id}-{self.index}.{self.format}"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the image to `path` (a file, or a folder to put `filename` in) in one step."""
        target = Path(path)
        if target.is_dir():
            target = target / self.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a reader never sees half an image.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(self.data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def to_pil(self) -> PILImage:
        """The image as a Pillow image (needs `pip install 'diffusion-queue-client[images]'`)."""
        try:
            from PIL import Image as PILModule
        except ImportError as e:
            raise ImportError(
                "to_pil needs Pillow: pip install 'diffusion-queue-client[images]'"
            ) from e
        image = PILModule.open(io.BytesIO(self.data))
        image.load()
        return image


def image_of(job: Job, index: int, data: bytes) -> Image:
    """The `index`-th output of `job`, with its bytes."""
    output = job.outputs[index]
    return Image(
        job_id=job.id,
        index=index,
        seed=output.seed,
        width=output.width,
        height=output.height,
        format=extension(job, output),
        data=data,
    )
