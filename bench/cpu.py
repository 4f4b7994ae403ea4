"""CPU time per role (gateway, worker, Redis, load generator, ...), read from /proc.

On two cores the question is not only how fast the system is but who used the cores: the figures
say how much of a core each part of the system took during a load point.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

PROC = Path("/proc")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None once the process is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process (0 where /proc is unavailable)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # After the command name: state, ppid, ..., utime and stime are the 12th and 13th fields.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot: with the pid, its identity."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (LitServe forks its own workers)."""
    if not PROC.is_dir():
        return [pid]
    parents: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(current := todo.pop())
        todo.extend(parents.get(current, []))
    return found


def machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot, by anyone (0 without /proc)."""
    try:
        fields = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Meter:
    """CPU seconds used by each role between `start()` and `read()`."""

    def __init__(self, roles: Mapping[str, Iterable[int]]) -> None:
        self.pids = {
            role: [p for pid in pids for p in descendants(pid)] for role, pids in roles.items()
        }
        self.before: dict[str, float] = {}
        self.at = 0.0

    def _now(self) -> dict[str, float]:
        used = {role: sum(cpu_seconds(p) for p in pids) for role, pids in self.pids.items()}
        return {**used, "machine": machine_busy()}

    def start(self) -> Meter:
        """Take the first reading."""
        self.before, self.at = self._now(), time.monotonic()
        return self

    def read(self) -> dict[str, float]:
        """Cores used per role since `start()`, 1.0 being one core busy all the time."""
        # `total` is the bench's processes together, `machine` every process on the machine, and
        # `others` the difference: load from outside the bench, the noise in the figures.
        wall = max(time.monotonic() - self.at, 1e-9)
        used = {role: (cpu - self.before[role]) / wall for role, cpu in self._now().items()}
        used["total"] = sum(v for role, v in used.items() if role != "machine")
        used["others"] = max(0.0, used["machine"] - used["total"])
        return {role: round(value, 3) for role, value in used.items()}
