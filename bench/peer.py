"""The peer: LitServe serving the same pipeline with the same batch size and timeout.

`Peer` runs `python -m bench.litapi` as a child process on loopback and waits for its health
check; the load generator then drives it like the gateway, one request per image.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import httpx

from bench import BenchError
from bench.cpu import descendants, start_ticks
from bench.direct import DirectSpec
from bench.system import Child, child_env
from core.embedded import free_port


class Peer:
    """The LitServe server as a child process."""

    def __init__(self, spec: DirectSpec, max_batch_size: int, batch_timeout: float) -> None:
        self.port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "bench.litapi",
            f"--port={self.port}",
            f"--spec={spec.model_dump_json()}",
            f"--max-batch-size={max_batch_size}",
            f"--batch-timeout={batch_timeout}",
        ]
        self.child: Child | None = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, logs: Path) -> Peer:
        """Start the server (without waiting for it)."""
        self.child = Child(self.args, child_env({}), logs / "peer-litserve.log")
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        """Block until the server's health check passes (its model is loaded)."""
        assert self.child is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.child.check()
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise BenchError(f"LitServe was not ready after {timeout:.0f} s")

    def roles(self) -> dict[str, list[int]]:
        """Its process id (the meter adds the processes it forks)."""
        return {"peer": [self.child.pid] if self.child else []}

    def _signal(self, signum: int) -> None:
        """Send `signum` to the server and every process it started."""
        if self.child is None:
            return
        for pid in descendants(self.child.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def pause(self) -> None:
        """Freeze the idle server while other variants are measured."""
        # Idle, LitServe still polls its queue every millisecond: 0.15 of a core on this machine.
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw the server before it is measured."""
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server and the processes it started."""
        if self.child is None:
            return
        self.resume()  # a stopped process would not act on SIGTERM
        family = {pid: start_ticks(pid) for pid in descendants(self.child.pid)[1:]}
        self.child.stop(timeout=20)
        for pid, started in family.items():  # processes it forked and failed to stop
            Child.kill_orphan(pid, started)
