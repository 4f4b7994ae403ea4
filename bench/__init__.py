"""`dq bench`: measure the system against its baselines and write one JSON report with charts."""

from __future__ import annotations

from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from core.errors import ServiceError


class BenchError(ServiceError):
    """A benchmark step could not run; the message says which and why."""

    code = "bench"


def stop_child(process: BaseProcess, conn: Connection) -> None:
    """Ask a pipe-driven child process to finish (it reads None as 'stop'), then make sure."""
    if process.is_alive():
        conn.send(None)
        process.join(10)
    if process.is_alive():
        process.kill()
        process.join()
