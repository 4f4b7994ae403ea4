"""`dq up`: the whole system on one machine, supervised, stopped cleanly on Ctrl-C.

Starts an embedded Redis (unless DQ_REDIS_URL is set), the gateway, the scaler (which runs the
workers through its `process` backend, replaces any that die, and runs the reaper) and the webhook
sender, and keeps them alive: a child that dies is started again. SIGINT or SIGTERM stops every
child (workers drain) and then the Redis.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.embedded import EmbeddedRedis
from core.errors import ConfigError
from core.settings import Settings

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the launcher dies, so nothing is left behind."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    stop_timeout_s: float
    pass_fds: tuple[int, ...] = ()  # file descriptors the process inherits (listening sockets)
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        """Start (or restart) the process in its own session, so Ctrl-C reaches only us."""
        self.process = subprocess.Popen(
            self.argv,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            pass_fds=self.pass_fds,
        )
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def exited(self) -> int | None:
        """The exit code if the process has ended."""
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, self.stop_timeout_s)
            self.process.kill()
            self.process.wait()


def module(name: str, *args: str) -> list[str]:
    """argv running one of the project's modules with this interpreter."""
    return [sys.executable, "-m", name, *args]


def kept_secret(path: Path, make: Callable[[], str]) -> str:
    """A secret made once and kept in the data dir, so it survives restarts of `dq up`."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


@dataclass
class Launch:
    """What `dq up` runs."""

    host: str = "127.0.0.1"
    port: int = 8000
    min_workers: int | None = None  # the default model's pool; None: its catalog entry's
    max_workers: int | None = None
    extra: Sequence[Child] = ()


def children(settings: Settings, launch: Launch) -> list[Child]:
    """The gateway, the scaler (it runs the workers and the reaper), the webhook sender."""
    api = Child("gateway", module("api", "--host", launch.host, "--port", str(launch.port)), 10)
    given = {"--min": launch.min_workers, "--max": launch.max_workers}
    bounds = [f"{flag}={n}" for flag, n in given.items() if n is not None]
    scaler = Child(
        "scaler",
        module("scaler", "--backend", "process", *bounds),
        settings.scaler_drain_timeout_s + 10,
    )
    sender = Child("webhook sender", module("worker.webhooks"), 20)
    return [api, scaler, sender, *launch.extra]


def banner(launch: Launch, open_api: bool) -> str:
    """What `dq up` prints once everything started."""
    url = f"http://{launch.host}:{launch.port}"
    auth = "" if open_api else ' -H "Authorization: Bearer $KEY"'
    lines = [
        f"diffusion-queue is up at {url}  (web page: {url}/  API docs: {url}/docs)",
        "submit a job:",
        f"  curl -s {url}/v1/jobs{auth} -H 'Content-Type: application/json' \\",
        '       -d \'{"prompt": "a lighthouse at dusk", "width": 64, "height": 64}\'',
        "wait for it (answered the moment it ends):",
        f"  curl -s '{url}/v1/jobs/<id>?wait=30'{auth}",
        "Ctrl-C stops everything.",
    ]
    if open_api:
        lines.insert(
            1, "WARNING: DQ_API_KEYS is empty, so the API is open to anyone who reaches it."
        )
    return "\n".join(lines)


class Supervisor:
    """Keeps children running until told to stop."""

    def __init__(self, kids: list[Child], env: dict[str, str]) -> None:
        self.kids, self.env = kids, env
        self.stopping = False

    def run(self, on_ready: Callable[[], None]) -> None:
        """Start all, restart the ones that die, return after a stop signal."""
        for kid in self.kids:
            kid.start(self.env)
        on_ready()
        while not self.stopping:
            for kid in self.kids:
                self._revive(kid)
            time.sleep(0.5)

    def _revive(self, kid: Child) -> None:
        code = kid.exited()
        if code is None or self.stopping:
            return
        recent = [t for t in kid.restarts if time.monotonic() - t < 60]
        delay = min(30.0, 0.5 * 2 ** len(recent))
        log.warning("%s exited with %s; starting it again in %.1f s", kid.name, code, delay)
        time.sleep(delay)
        kid.restarts = [*recent, time.monotonic()]
        if not self.stopping:
            kid.start(self.env)

    def stop(self, *_: object) -> None:
        """Ask the supervisor to stop (a signal handler)."""
        self.stopping = True

    def shutdown(self) -> None:
        """Terminate every child and wait for each."""
        for kid in reversed(self.kids):
            kid.stop()


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def up(settings: Settings, launch: Launch) -> int:
    """Run the whole system in the foreground."""
    if not settings.tenants() and launch.host not in LOOPBACK:
        raise ConfigError(
            f"refusing to serve an open API on {launch.host}: set DQ_API_KEYS=tenant:key first"
        )
    data_dir = settings.data_dir.resolve()
    redis = None
    env = {**os.environ, "DQ_DATA_DIR": str(data_dir)}
    if not settings.redis_url:
        redis = EmbeddedRedis(data_dir / "redis", aof=True).start()
        env["DQ_REDIS_URL"] = redis.url
        (data_dir / "redis.url").write_text(redis.url)  # for `dq keys` beside `dq up`
        log.info("embedded Redis on %s (append-only file in %s)", redis.url, data_dir / "redis")
    if settings.secret_key is None:
        env["DQ_SECRET_KEY"] = kept_secret(
            data_dir / "secret_key", lambda: secrets.token_urlsafe(32)
        )
    env.setdefault("DQ_PUBLIC_URL", f"http://{launch.host}:{launch.port}")
    supervisor = Supervisor(children(settings, launch), env)
    signal.signal(signal.SIGINT, supervisor.stop)
    signal.signal(signal.SIGTERM, supervisor.stop)
    try:
        supervisor.run(lambda: print(banner(launch, not settings.tenants()), flush=True))
    finally:
        print("stopping…", flush=True)
        supervisor.shutdown()
        if redis is not None:
            redis.stop()
    return 0
