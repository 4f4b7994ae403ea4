"""The asyncio client: `Client`'s twin, method for method, with `await` and `async for`."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from dq_client import calls
from dq_client.calls import Call, Config
from dq_client.errors import APIError, Conflict, ConnectionFailed, DQError, WaitTimeout
from dq_client.images import EXPIRED, Image, finished, image_of, with_urls
from dq_client.models import Job, JobStatus, Model, Page, QueueStatus
from dq_client.retry import Retrying, RetryPolicy
from dq_client.stream import JobEvents

log = logging.getLogger("dq_client")


class AsyncClient:
    """A diffusion-queue server, for asyncio; see `Client` for what each method does."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.config = Config.resolve(url, key, timeout_s, retry)
        self._http = httpx.AsyncClient(
            base_url=self.config.url, headers=self.config.headers(), timeout=timeout_s
        )
        # Output URLs carry their own signature; S3 refuses a request that also has our key.
        self._files = httpx.AsyncClient(timeout=timeout_s, follow_redirects=True)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()
        await self._files.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def submit(
        self, prompt: str, *, idempotency_key: str | None = None, **options: Any
    ) -> Job:
        """Submit a job: `options` are the request's fields (`width`, `steps`, `model`, …)."""
        call = calls.submit(prompt, options, idempotency_key)
        return Job.from_dict(await self._json(call))

    async def get(self, job: Job | str, *, wait_s: float = 0) -> Job:
        """The job now, or, with `wait_s` (up to 60), as soon as it ends within that time."""
        return Job.from_dict(await self._json(calls.get(job, wait_s)))

    async def wait(self, job: Job | str, timeout: float | None = None) -> Job:
        """The job once it has ended, by long polls that outlast server restarts."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            hold = calls.poll_s(deadline, time.monotonic())
            log.debug("waiting on %s for up to %.1f s", calls.job_id(job), hold)
            current = Job.from_dict(await self._json(calls.get(job, hold), until=deadline))
            if current.terminal:
                return current
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(current, timeout or 0)

    async def events(self, job: Job | str) -> AsyncIterator[Job]:
        """The job at each change of status, progress or queue position, until it ends."""
        stream = JobEvents(calls.job_id(job))
        retrying = self.config.retry.start()
        while not stream.done:
            try:
                call = calls.events(job, stream.reconnecting())
                async for current in self._stream(call, stream, retrying):
                    yield current
            except DQError as e:
                pause = retrying.delay_s(e, resend=True)
                if pause is None:
                    raise
                log.info("event stream of %s broke (%s); again in %.1f s", stream.job_id, e, pause)
                await asyncio.sleep(pause)

    async def run(
        self, prompt: str, *, timeout: float | None = None, **options: Any
    ) -> builtins.list[Image]:
        """Submit, wait and fetch the images; raises `JobFailed` if the job fails."""
        return await self.images(await self.wait(await self.submit(prompt, **options), timeout))

    async def images(self, job: Job | str) -> builtins.list[Image]:
        """A succeeded job's images, in memory."""
        current = finished(with_urls(job) or await self.get(job))
        return [await self._image(current, i) for i in range(len(current.outputs))]

    async def download(self, job: Job | str, folder: str | os.PathLike[str]) -> builtins.list[Path]:
        """Write a succeeded job's images into `folder` as `<job id>-<index>.<format>`."""
        images = await self.images(job)
        return [image.save(Path(folder) / image.filename) for image in images]

    async def list(
        self, status: str | None = None, *, limit: int | None = None, page_size: int = 50
    ) -> AsyncIterator[Job]:
        """Your jobs, newest first, page after page (at most `limit` of them)."""
        cursor, count = None, 0
        while limit is None or count < limit:
            size = page_size if limit is None else min(page_size, limit - count)
            page = Page.from_dict(await self._json(calls.page(status, size, cursor)))
            for job in page.jobs:
                yield job
                count += 1
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job: Job | str) -> Job:
        """Cancel a job that has not ended; raises `Conflict` if it has."""
        try:
            return Job.from_dict(await self._json(calls.cancel(job)))
        except Conflict as e:
            if e.attempts > 1:  # an earlier try whose answer was lost may have canceled it
                current = await self.get(job)
                if current.status == JobStatus.CANCELED:
                    return current
            raise

    async def delete(self, job: Job | str) -> None:
        """Delete a job and its images (servers that support `DELETE /v1/jobs/{id}`)."""
        await self._request(calls.delete(job))

    async def redeliver_webhook(self, job: Job | str) -> dict[str, Any]:
        """Send the job's last webhook event again."""
        answer: dict[str, Any] = await self._json(calls.redeliver(job))
        return answer

    async def queue(self) -> QueueStatus:
        """The queue: depth, running jobs, workers, throughput, the scaler's last decision."""
        return QueueStatus.from_dict(await self._json(calls.queue()))

    async def models(self) -> builtins.list[Model]:
        """The models the server offers, and their state."""
        return calls.models_of(await self._json(calls.models()))

    async def _image(self, job: Job, index: int) -> Image:
        try:
            return image_of(job, index, await self._fetch(job.outputs[index].url))
        except APIError as e:
            if e.status not in EXPIRED:
                raise
        fresh = finished(await self.get(job))  # its URL expired: read the job again
        return image_of(fresh, index, await self._fetch(fresh.outputs[index].url))

    async def _fetch(self, url: str) -> bytes:
        return (await self._request(Call("GET", url), http=self._files)).content

    async def _json(self, call: Call, until: float | None = None) -> Any:
        return (await self._request(call, until=until)).json()

    async def _request(
        self, call: Call, *, http: httpx.AsyncClient | None = None, until: float | None = None
    ) -> httpx.Response:
        """Send a call, again after each retryable failure, as the retry policy allows."""
        retrying = self.config.retry.start()
        while True:
            try:
                return await self._once(call, http or self._http)
            except DQError as e:
                pause = retrying.delay_s(e, resend=call.resend, until=until)
                if pause is None:
                    if isinstance(e, APIError):
                        e.attempts = retrying.attempts
                    raise
                log.info("%s %s failed (%s); again in %.1f s", call.method, call.path, e, pause)
                await asyncio.sleep(pause)

    async def _once(self, call: Call, http: httpx.AsyncClient) -> httpx.Response:
        try:
            response = await http.request(
                call.method,
                call.path,
                params=call.params or None,  # {} would drop the query of a signed URL
                json=call.json,
                headers=call.headers,
                timeout=call.timeout_s or self.config.timeout_s,
            )
        except httpx.TransportError as e:
            raise calls.failure(e) from e
        return calls.checked(response)

    async def _stream(
        self, call: Call, stream: JobEvents, retrying: Retrying
    ) -> AsyncIterator[Job]:
        """The new jobs of one connection to the event stream."""
        try:
            async with self._http.stream(
                call.method, call.path, headers=call.headers, timeout=call.timeout_s
            ) as response:
                if response.is_error:
                    await response.aread()
                    calls.checked(response)
                async for line in response.aiter_lines():
                    seen = stream.seen
                    current = stream.feed(line)
                    if stream.seen != seen:
                        retrying.reset()  # events flow: a later cut is a new failure series
                    if current is not None:
                        yield current
                    if stream.done:
                        return
        except httpx.TransportError as e:
            raise calls.failure(e) from e
        raise ConnectionFailed("the event stream ended before the job did", sent=True)
