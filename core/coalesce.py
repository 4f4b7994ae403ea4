"""Calls of one Lua script from many concurrent requests, sent to Redis together.

Under load the gateway makes hundreds of record-and-enqueue calls at once, and redis-py spends more
CPU on each call's plumbing (taking a pooled connection, its retry and timeout wrappers, a write and
a read per call) than Redis spends running the script. A `ScriptBatcher` sends every call made while
the previous round trip was in flight as one pipeline, like a database's group commit: a lone call
goes out on the next turn of the event loop, and a busy gateway pays the plumbing once per batch.
Each call is still its own script run, atomic on its own; only the round trip is shared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Call = tuple[Sequence[str], Sequence[Any], "asyncio.Future[Any]"]  # keys, args, the reply


class ScriptBatcher:
    """`await batcher(keys, args)` runs the script; calls that meet share one pipeline."""

    def __init__(self, redis: Redis, script: str, max_batch: int = 256) -> None:
        self.redis = redis
        self.script = redis.register_script(script)
        self.max_batch = max_batch
        self._waiting: list[Call] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's reply to this call."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((keys, args, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self.max_batch]
                del self._waiting[: self.max_batch]
                await self._send(batch)
        finally:
            self._flusher = None

    async def _send(self, batch: list[Call]) -> None:
        try:
            replies = await self._run([(k, a) for k, a, _ in batch])
        except BaseException as e:  # the round trip failed: every call in it fails the same way
            for *_, future in batch:
                if not future.done():
                    future.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _run(self, calls: list[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        if len(calls) == 1:
            keys, args = calls[0]
            return [await self.script(keys, args)]
        replies = await self._pipeline(calls)
        if any(isinstance(r, NoScriptError) for r in replies):  # Redis restarted or flushed
            await self.redis.script_load(self.script.script)
            replies = await self._pipeline(calls)
        return replies

    async def _pipeline(self, calls: list[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self.script.sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)
