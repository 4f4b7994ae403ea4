"""Real parts for the webhook tests: receivers and a canary on 127.0.0.1, the sender process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import redis

from core.events import DeliveryOrder
from tests.conftest import ROOT


@dataclass(frozen=True)
class Answer:
    """One reply of a receiver."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    hang_s: float = 0.0


@dataclass(frozen=True)
class Hit:
    """One request as the receiver got it."""

    at: float
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 answering POSTs from a script (its last answer repeats)."""

    answers: list[Answer] = field(default_factory=lambda: [Answer()])
    hits: list[Hit] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """Where to point a webhook."""
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/dq"

    def start(self) -> Receiver:
        """Serve in a thread."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                answer = receiver.answers[min(len(receiver.hits), len(receiver.answers) - 1)]
                receiver.hits.append(Hit(time.time(), self.path, headers, body))
                time.sleep(answer.hang_s)
                self.send_response(answer.status)
                for name, value in answer.headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Shut down."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class Canary:
    """A TCP listener on 127.0.0.1 that counts every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def __enter__(self) -> Canary:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def stop(self) -> None:
        """Stop listening."""
        self.stopped.set()
        self.thread.join(1)
        self.sock.close()


class SenderProcess:
    """A real `python -m worker.webhooks` process."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.webhooks"],
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def wait_deliveries(
    client: httpx.Client,
    job_id: str,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 20,
) -> list[dict[str, Any]]:
    """Poll a job until its delivery log satisfies `done`."""
    deadline = time.monotonic() + timeout
    log: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        log = client.get(f"/v1/jobs/{job_id}").json()["webhook"]["deliveries"]
        if done(log):
            return log
        time.sleep(0.05)
    raise AssertionError(f"deliveries of {job_id} never settled: {log}")


def queued_orders(rclient: redis.Redis, queue: str) -> list[DeliveryOrder]:
    """The delivery orders waiting in the webhook queue, oldest first."""
    orders = []
    for raw in reversed(rclient.lrange(queue, 0, -1)):  # type: ignore[arg-type]
        body = json.loads(json.loads(raw)["body"])
        orders.append(DeliveryOrder.model_validate(body[0][0]))
    return orders
