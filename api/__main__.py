"""`python -m api`: run the gateway with uvicorn.

With `--workers N` (N > 1) on Linux, the command opens N listening sockets on the port with
SO_REUSEPORT, so the kernel spreads new connections evenly across them, and runs one gateway
process on each (restarted if it dies; the socket, and the connections queued on it, stay open
meanwhile). uvicorn's own `--workers` shares one socket instead, and whichever process wakes first
accepts every connection waiting: measured here, 300 keep-alive clients connecting at once all
landed on one of two processes about half the time, which then ran at its limit beside an idle one.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import os
import resource
import signal
import socket
import sys
from typing import Any, cast

import uvicorn
from fastapi import FastAPI

from api.app import check, create_app
from api.protocol import Connections, GatewayProtocol, Limits
from api.traffic import shared_between_processes
from core.errors import ConfigError
from core.launcher import Child, Supervisor, module
from core.settings import Settings, load_settings

SHUTDOWN_GRACE_S = 5
FILES_SPARE = 1024  # open files beside client connections: Redis pools, images, the watcher
BACKLOG = 2048
REUSE_PORT = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def factory() -> FastAPI:
    """The app for this process's settings (each gateway process builds its own)."""
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    app = create_app(settings)
    quiet_collector()
    return app


GC_GEN0_THRESHOLD = 50_000  # Python's default is 700


def quiet_collector() -> None:
    """Keep the cyclic garbage collector from pausing requests.

    The ~80,000 objects imported and built at startup live as long as the process, yet every full
    collection walked them all: 45-85 ms with no request served, about once a second under 1,500
    submits/s. Frozen, they are never walked again. A young collection ran whenever the objects
    of the requests in flight (~30 each, hundreds of requests) passed Python's threshold of 700,
    dozens of times a second for nothing: what a request makes, reference counting frees when it
    ends. Measured under the same burst: 275 ms of collections per process at a threshold of
    5,000, none at 20,000 or 50,000.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def options(settings: Settings, host: str, port: int) -> dict[str, Any]:
    """uvicorn's settings for the gateway."""
    return {
        "app": "api.__main__:factory",
        "factory": True,
        "host": host,
        "port": port,
        "log_level": "warning",
        "access_log": False,
        "backlog": BACKLOG,
        # Long polls and event streams may be held for a while: a stopping gateway gives them
        # this long, then cuts them (their clients simply ask again, elsewhere).
        "timeout_graceful_shutdown": SHUTDOWN_GRACE_S,
        **server_options(settings),
    }


def server_options(settings: Settings) -> dict[str, Any]:
    """What hardens uvicorn for the gateway (the tests' in-process gateway uses these too)."""
    proxies = settings.proxies()
    # functools.partial, not a class made here: uvicorn pickles its config for `--workers`.
    protocol = functools.partial(GatewayProtocol, connections=Connections(Limits.of(settings)))
    return {
        "http": cast(type[asyncio.Protocol], protocol),
        "ws": "none",  # no WebSocket routes: upgrades are refused
        "timeout_keep_alive": settings.keepalive_timeout_s,
        # X-Forwarded-For/-Proto only from the proxies named; uvicorn's default trusts loopback.
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": proxies,
        "server_header": False,
    }


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def listening_socket(host: str, port: int, shared: bool) -> socket.socket:
    """A socket listening on host:port; `shared`: others may listen there too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(BACKLOG)
    return sock


def supervise(host: str, port: int, workers: int) -> None:
    """Run `workers` gateway processes, each on its own socket; stop them all on a signal."""
    # Without SO_REUSEPORT this bind fails if anything at all listens there, another gateway
    # included, which would otherwise share the port without a word.
    listening_socket(host, port, shared=False).close()
    sockets = [listening_socket(host, port, shared=True) for _ in range(workers)]
    kids = []
    for i, sock in enumerate(sockets):
        argv = module("api", "--host", host, "--port", str(port), "--fd", str(sock.fileno()))
        kids.append(Child(f"gateway {i + 1}", argv, SHUTDOWN_GRACE_S + 5, (sock.fileno(),)))
    supervisor = Supervisor(kids, dict(os.environ))
    signal.signal(signal.SIGINT, supervisor.stop)
    signal.signal(signal.SIGTERM, supervisor.stop)
    try:
        supervisor.run(lambda: None)
    finally:
        for kid in kids:  # all at once: each may hold long polls for SHUTDOWN_GRACE_S
            if kid.process is not None and kid.process.poll() is None:
                kid.process.terminate()
        supervisor.shutdown()
        for sock in sockets:
            sock.close()


def main(argv: list[str] | None = None) -> int:
    """Parse --host/--port/--workers, check settings, serve."""
    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="gateway processes (one per core)")
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # a socket from `supervise`
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        settings = load_settings()
        check(settings)
        files = raise_open_files_limit()
        if files < settings.max_connections + FILES_SPARE:
            logging.getLogger(__name__).warning(
                "the open-files limit (%d) is below DQ_MAX_CONNECTIONS + %d", files, FILES_SPARE
            )
        if args.fd is not None:
            sock = socket.socket(fileno=args.fd)
            config = uvicorn.Config(**options(settings, args.host, args.port))
            uvicorn.Server(config).run(sockets=[sock])
        elif args.workers > 1 and REUSE_PORT:
            with shared_between_processes(args.workers):  # any process's /metrics counts all
                supervise(args.host, args.port, args.workers)
        else:
            with shared_between_processes(args.workers):
                uvicorn.run(**options(settings, args.host, args.port), workers=args.workers)
    except ConfigError as e:
        print(f"dq api: {e.message}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
