"""The `process` backend: local `python -m worker` processes of any model, one per GPU if any."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scaler.backends import WorkerHandle

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class Spawned:
    """One worker process this backend started."""

    name: str
    model: str
    process: subprocess.Popen[bytes]
    gpu: str | None
    stopping: bool = False


class ProcessBackend:
    """Starts, drains and reaps worker processes on this machine, each serving one model.

    Every model's pool drives its own share (`pool(model)`); GPUs are handed out across all of
    them, so two models' workers never share a GPU while one is free.
    """

    def __init__(
        self,
        env: dict[str, str],
        gpus: Sequence[str] = (),
        prefix: str = "dq-worker",
        command: Sequence[str] = (sys.executable, "-m", "worker"),  # `--name NAME` is added
    ) -> None:
        self.env, self.command = env, list(command)
        self.gpus = list(gpus)
        self.prefix, self.host = f"{prefix}-{os.getpid()}", socket.gethostname()
        self.spawned: dict[str, Spawned] = {}
        self.counter = 0

    def pool(self, model: str) -> ModelProcesses:
        """The workers of one model, as the backend its pool drives."""
        return ModelProcesses(self, model)

    def workers(self, model: str) -> list[WorkerHandle]:
        """A model's workers still running (those that exited, of any model, are reaped here)."""
        self._reap()
        return [
            WorkerHandle(s.name, s.name, s.stopping)
            for s in self.spawned.values()
            if s.model == model
        ]

    def start(self, model: str, n: int) -> None:
        """Start `n` workers of `model`, each on a GPU no other live worker holds (if any)."""
        for _ in range(n):
            self.counter += 1
            # Celery names a node `celery@NAME` unless NAME has an `@`; the worker's heartbeat
            # carries the node name, and the scaler joins heartbeats to processes by it.
            name = f"{self.prefix}-{model}-{self.counter}@{self.host}"
            gpu = self._free_gpu()
            env = {**self.env, "DQ_WORKER_MODEL": model}
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            argv = [*self.command, "--name", name]
            # A session of its own: Ctrl-C reaches the scaler, which drains the workers in turn.
            process = subprocess.Popen(
                argv, env=env, start_new_session=True, preexec_fn=_drain_when_orphaned(os.getpid())
            )
            self.spawned[name] = Spawned(name, model, process, gpu)
            log.info("started worker %s (pid %d, gpu %s)", name, process.pid, gpu or "none")

    def drain(self, worker_id: str) -> None:
        """SIGTERM: the worker finishes its batch, hands back its buffer and exits."""
        spawned = self.spawned.get(worker_id)
        if spawned and not spawned.stopping and spawned.process.poll() is None:
            spawned.stopping = True
            spawned.process.send_signal(signal.SIGTERM)
            log.info("draining worker %s", worker_id)

    def stop_all(self, timeout_s: float) -> None:
        """Drain every worker and wait for them (the scaler is exiting)."""
        for name in list(self.spawned):
            self.drain(name)
        deadline = time.monotonic() + timeout_s
        for spawned in self.spawned.values():
            try:
                spawned.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "worker %s did not drain in %.0f s; killing it", spawned.name, timeout_s
                )
                spawned.process.kill()
                spawned.process.wait()
        self.spawned.clear()

    def _free_gpu(self) -> str | None:
        if not self.gpus:
            return None
        taken = [s.gpu for s in self.spawned.values() if s.process.poll() is None]
        free = [g for g in self.gpus if g not in taken]
        return free[0] if free else self.gpus[self.counter % len(self.gpus)]

    def _reap(self) -> None:
        for name, spawned in list(self.spawned.items()):
            code = spawned.process.poll()
            if code is not None:
                how = "drained" if spawned.stopping else f"died (exit {code})"
                log.log(
                    logging.INFO if spawned.stopping else logging.WARNING, "worker %s %s", name, how
                )
                del self.spawned[name]


class ModelProcesses:
    """One model's share of the processes: the backend of that model's pool."""

    def __init__(self, processes: ProcessBackend, model: str) -> None:
        self.processes, self.model = processes, model

    def list_workers(self) -> list[WorkerHandle]:
        """This model's workers running or draining."""
        return self.processes.workers(self.model)

    def add(self, n: int) -> None:
        """Start `n` more workers of this model."""
        self.processes.start(self.model, n)

    def drain(self, worker_id: str) -> None:
        """Drain one of them."""
        self.processes.drain(worker_id)


def _drain_when_orphaned(parent: int) -> Callable[[], None] | None:
    """A pre-exec hook: SIGTERM (a drain) reaches the worker if the scaler dies, even by kill -9.

    Without it a killed scaler leaves workers that no scaler knows about, consuming forever.
    """
    if not sys.platform.startswith("linux"):
        return None

    def hook() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the scaler died before the hook ran: never start
            os._exit(1)

    return hook
