"""The load generator's process: the bench sends it specs through a pipe, it answers with results.

It runs apart from the bench (spawned, so it inherits no threads or torch state) and on uvloop
when installed, so that its own CPU is small and measured on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import traceback
from collections.abc import Callable, Coroutine, Iterator
from multiprocessing.connection import Connection as Pipe
from typing import Any

from pydantic import BaseModel

from bench import BenchError, stop_child
from bench.burst import BurstResult, BurstSpec, run_burst
from bench.load import LoadResult, LoadSpec, run_load


def _event_loop() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when installed (a cheaper client), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def serve(conn: Pipe) -> None:
    """The generator process: run each spec sent, answer with its result, until told to stop."""
    handlers: dict[str, Callable[[str], Coroutine[Any, Any, BaseModel]]] = {
        "load": lambda raw: run_load(LoadSpec.model_validate_json(raw)),
        "burst": lambda raw: run_burst(BurstSpec.model_validate_json(raw)),
    }
    with asyncio.Runner(loop_factory=_event_loop()) as runner:
        while (message := conn.recv()) is not None:
            kind, raw = message
            try:
                with collector_paused():
                    result = runner.run(handlers[kind](raw))
                conn.send(("ok", result.model_dump_json()))
            except Exception:
                conn.send(("error", traceback.format_exc()))


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection while a spec runs; one before, and whatever is left after.

    A collection in the generator stops every client at once, and the pause is counted as the
    system's latency: a full one took up to 31 ms under the gateway burst, about as many requests
    as make its 99th percentile. A spec runs for seconds and leaves little cyclic garbage.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


class LoadGenerator:
    """The generator's process, seen from the bench: send a spec, get its result."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child,), name="dq-bench-load", daemon=True)

    def start(self) -> LoadGenerator:
        """Start the process."""
        self.process.start()
        return self

    @property
    def pid(self) -> int | None:
        """The process id, once started."""
        return self.process.pid

    def _call(self, kind: str, spec: BaseModel) -> str:
        self.conn.send((kind, spec.model_dump_json()))
        status, raw = self.conn.recv()
        if status != "ok":
            raise BenchError(f"the load generator failed:\n{raw}")
        return str(raw)

    def run(self, spec: LoadSpec) -> LoadResult:
        """Drive one load point."""
        return LoadResult.model_validate_json(self._call("load", spec))

    def burst(self, spec: BurstSpec) -> BurstResult:
        """Drive the gateway-only burst."""
        return BurstResult.model_validate_json(self._call("burst", spec))

    def stop(self) -> None:
        """Tell the process to finish, then wait for it."""
        stop_child(self.process, self.conn)
