"""`dq up`: the whole system on one machine, supervised, stopped cleanly on Ctrl-C.

Starts an embedded Redis (unless DQ_REDIS_URL is set), the gateway, the scaler (which runs the
workers through its `process` backend, replaces any that die, and runs the reaper) and the webhook
sender, and keeps them alive: a child that dies is started again. SIGINT or SIGTERM stops every
child (workers drain) and then the Redis.

What it prints: one status block once the gateway answers (where everything is, what model is
served, how to stop), then its children's lines through `core.console` (prefixed, concise).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from core.catalog import BUILT_IN_FAMILIES, Catalog
from core.console import Console
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
    # Where its output goes: the terminal as is, or (with a relay) a pipe the relay reads.
    relay: Callable[[str, IO[bytes]], object] | None = None
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        """Start (or restart) the process in its own session, so Ctrl-C reaches only us."""
        piped = subprocess.PIPE if self.relay else None
        self.process = subprocess.Popen(
            self.argv,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            pass_fds=self.pass_fds,
            stdout=piped,
            stderr=subprocess.STDOUT if self.relay else None,
        )
        if self.relay is not None and self.process.stdout is not None:
            self.relay(self.name, self.process.stdout)
        log.debug("started %s (pid %d)", self.name, self.process.pid)

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
    verbose: bool = False  # every line of every child, as written

    @property
    def url(self) -> str:
        """Where the gateway is reached."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def children(settings: Settings, launch: Launch, console: Console | None = None) -> list[Child]:
    """The gateway, the scaler (it runs the workers and the reaper), the webhook sender."""
    relay = console.relay if console is not None else None
    api_argv = module("api", "--host", launch.host, "--port", str(launch.port))
    given = {"--min": launch.min_workers, "--max": launch.max_workers}
    bounds = [f"{flag}={n}" for flag, n in given.items() if n is not None]
    scaler_argv = module("scaler", "--backend", "process", *bounds)
    drain_s = settings.scaler_drain_timeout_s + 10
    return [
        Child("gateway", api_argv, 10, relay=relay),
        Child("scaler", scaler_argv, drain_s, relay=relay),
        Child("webhooks", module("worker.webhooks"), 20, relay=relay),
        *launch.extra,
    ]


# README.md's section on serving a real model (the tiny ones have random weights).
REAL_MODELS = 'README.md, "Real models, LoRAs and image inputs"'


def model_lines(catalog: Catalog) -> list[str]:
    """What each model is, saying plainly when its weights are random."""
    lines = []
    for name, spec in catalog.models.items():
        default = " (default)" if name == catalog.default and len(catalog.models) > 1 else ""
        if spec.source in BUILT_IN_FAMILIES:
            lines.append(f"{name}{default}: random weights, so every image is noise (a test model)")
        else:
            lines.append(f"{name}{default}: {spec.source}")
    if any(spec.source in BUILT_IN_FAMILIES for spec in catalog.models.values()):
        lines.append(f"for real pictures serve a real model: {REAL_MODELS}")
    return lines


def status_block(settings: Settings, launch: Launch, catalog: Catalog, data_dir: Path) -> list[str]:
    """What `dq up` prints once the gateway answers: where everything is and how to stop."""
    url, keys = launch.url, settings.tenants()
    if launch.min_workers == launch.max_workers:
        workers = f"{launch.min_workers} (dq up --min-workers/--max-workers to change)"
    else:
        workers = f"{launch.min_workers} to {launch.max_workers}, as the queue needs"
    if keys:
        access = f"{len(keys)} keys (DQ_API_KEYS); send Authorization: Bearer <key>"
    else:
        access = f"none set: the API is open to anyone who reaches {launch.host}"
    rows = [
        ("web page", [f"{url}/"]),
        ("API", [f"{url}/v1/jobs   reference: {url}/docs"]),
        ("model" + ("s" if len(catalog.models) > 1 else ""), model_lines(catalog)),
        ("workers", [workers]),
        ("API keys", [access]),
        ("data", _where_data_lives(settings, data_dir)),
        ("stop", ["Ctrl-C (running batches finish first)"]),
    ]
    auth = "" if not keys else ' -H "Authorization: Bearer $KEY"'
    lines = ["", "diffusion-queue is running", ""]
    for name, values in rows:
        lines += [f"  {name if i == 0 else '':<9} {value}" for i, value in enumerate(values)]
    lines += [
        "",
        f"  try it: curl -s {url}/v1/jobs{auth} -H 'Content-Type: application/json' \\",
        '              -d \'{"prompt": "a lighthouse at dusk", "width": 64, "height": 64}\'',
        "",
        "  logs follow, one line per event (dq up --verbose: every line)",
        "",
    ]
    return lines


def _where_data_lives(settings: Settings, data_dir: Path) -> list[str]:
    if settings.redis_url:
        redis = urlsplit(settings.redis_url)
        jobs = f"jobs in Redis at {redis.hostname}:{redis.port or 6379}"
    else:
        jobs = "jobs in Redis (append-only file in redis/)"
    images = settings.storage
    where = "images/" if images.startswith("file:") and "/images" in images else images
    return [f"{data_dir}", f"{jobs}, images in {where}, the URL-signing key"]


class Supervisor:
    """Keeps children running until told to stop."""

    def __init__(self, kids: list[Child], env: dict[str, str]) -> None:
        self.kids, self.env = kids, env
        self.stopping = False

    def run(self, on_ready: Callable[[], None], ready: Callable[[], bool] | None = None) -> None:
        """Start all, restart the ones that die, return after a stop signal.

        `on_ready` is called once: at once, or the first time `ready()` says yes.
        """
        for kid in self.kids:
            kid.start(self.env)
        announced = False
        while not self.stopping:
            if not announced and (ready is None or ready()):
                on_ready()
                announced = True
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

# Celery warns every worker started as root that it should not be; its danger is pickle, which
# this service never accepts (JSON only; Celery refuses to start as root with pickle anyway).
# Said once in the README, not by every worker: the filter matches the warning's first words.
ROOT_WARNING = "ignore:You're running the worker with superuser privileges"


def child_env(settings: Settings, launch: Launch, data_dir: Path) -> dict[str, str]:
    """The environment every child gets (Redis and the secret are added by `up`)."""
    env = {**os.environ, "DQ_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    env.setdefault("DQ_PUBLIC_URL", launch.url)
    if not launch.verbose:
        env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), ROOT_WARNING]))
    return env


def check_port(host: str, port: int) -> None:
    """Refuse to start when the port is taken (the gateway would fail, again and again)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from e
            raise ConfigError(
                f"{host}:{port} is in use (another dq up?): stop it, or dq up --port {port + 1}"
            ) from e


def answers(url: str) -> bool:
    """Whether the gateway at `url` is ready (Redis and storage reachable)."""
    host = urlsplit(url).hostname
    if host in ("0.0.0.0", "::"):  # listening everywhere: ask on loopback
        url = url.replace(f"//{host}", "//127.0.0.1" if host == "0.0.0.0" else "//[::1]", 1)
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=0.5) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def up(settings: Settings, launch: Launch, console: Console | None = None) -> int:
    """Run the whole system in the foreground."""
    if not settings.tenants() and launch.host not in LOOPBACK:
        raise ConfigError(
            f"refusing to serve an open API on {launch.host}: set DQ_API_KEYS=tenant:key first"
        )
    check_port(launch.host, launch.port)
    catalog = Catalog.from_settings(settings)
    console = console or Console.for_terminal(verbose=launch.verbose)
    data_dir = settings.data_dir.resolve()
    redis = None
    env = child_env(settings, launch, data_dir)
    if not settings.redis_url:
        redis = EmbeddedRedis(data_dir / "redis", aof=True).start()
        env["DQ_REDIS_URL"] = redis.url
        (data_dir / "redis.url").write_text(redis.url)  # for `dq keys` beside `dq up`
        log.debug("embedded Redis on %s (append-only file in %s)", redis.url, data_dir / "redis")
    if settings.secret_key is None:
        env["DQ_SECRET_KEY"] = kept_secret(
            data_dir / "secret_key", lambda: secrets.token_urlsafe(32)
        )
    supervisor = Supervisor(children(settings, launch, console), env)
    signal.signal(signal.SIGINT, supervisor.stop)
    signal.signal(signal.SIGTERM, supervisor.stop)
    block = status_block(settings, launch, catalog, data_dir)
    console.hold()  # the children's first lines come after the status block
    try:
        supervisor.run(lambda: console.release(block), ready=Readiness(launch.url, console))
    finally:
        console.release()
        drain_s = settings.scaler_drain_timeout_s
        log.info("stopping: running batches finish first (at most %.0f s)", drain_s)
        signal.signal(signal.SIGINT, lambda *_: log.info("still stopping: a batch is finishing"))
        supervisor.shutdown()
        if redis is not None:
            redis.stop()
        log.info("stopped")
    return 0


READY_WAIT_S = 30.0  # after this long without an answer, show what the children said meanwhile


class Readiness:
    """Whether the gateway answers yet; past READY_WAIT_S, the lines held back are shown."""

    def __init__(self, url: str, console: Console) -> None:
        self.url, self.console = url, console
        self.since = time.monotonic()
        self.late = False

    def __call__(self) -> bool:
        """True once the gateway is ready."""
        if answers(self.url):
            return True
        if not self.late and time.monotonic() - self.since > READY_WAIT_S:
            self.late = True
            self.console.release()
            log.warning("the gateway does not answer at %s/readyz yet; its lines say why", self.url)
        return False
