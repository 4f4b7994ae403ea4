"""Real parts for the client tests: a whole `dq up`, and a TCP proxy that loses answers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.embedded import free_port
from tests.conftest import ALICE_KEY, ROOT, TEST_KEYS
from tests.test_cli import descendants

KEY = ALICE_KEY
TINY = {"width": 64, "height": 64, "steps": 2}


class DqUp:
    """A real `dq up` (embedded Redis, gateway, scaler, worker, webhook sender) on a free port."""

    def __init__(self, tmp: Path, model_cache: Path, **env: str) -> None:
        self.port = free_port()
        self.data_dir = tmp / "data"
        self.log_path = tmp / "up.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
        self.env = base | {
            "DQ_DATA_DIR": str(self.data_dir),
            "DQ_MODEL_CACHE": str(model_cache),
            "DQ_API_KEYS": TEST_KEYS,
            "DQ_CPU_THREADS": "1",
            "DQ_SCALER_INTERVAL_S": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "up", "--port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180) -> DqUp:
        """Wait until a job goes through end to end (the worker has loaded its model)."""
        headers = {"Authorization": f"Bearer {KEY}"}
        deadline = time.monotonic() + timeout
        job_id = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dq up exited:\n{self.tail()}")
            try:
                if job_id is None:
                    body = {"prompt": "warm up", **TINY}
                    job_id = httpx.post(f"{self.url}/v1/jobs", json=body, headers=headers).json()[
                        "id"
                    ]
                job = httpx.get(f"{self.url}/v1/jobs/{job_id}?wait=5", headers=headers).json()
                if job["status"] == "succeeded":
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"dq up not ready:\n{self.tail()}")

    def gateway_pid(self) -> int | None:
        """The pid of the gateway process (`python -m api`) under `dq up`, if one runs."""
        for pid in descendants(self.process.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[1:3] == [b"-m", b"api"]:
                return pid
        return None

    def tail(self) -> str:
        """The end of its log."""
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """Ctrl-C, as a user stops it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@dataclass
class Cut:
    """Cut the next connection whose request contains `marker`, once the answer relayed so far
    contains `after` (None: relay none of the answer: it is lost, the request was not)."""

    marker: bytes
    after: bytes | None = None


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of the gateway that cuts connections as told."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.cuts: list[Cut] = []
        self.requests: list[bytes] = []  # the request line of each request seen
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def cut(self, marker: bytes, after: bytes | None = None) -> None:
        """Arm a cut."""
        with self.lock:
            self.cuts.append(Cut(marker, after))

    def seen(self, marker: bytes) -> int:
        """How many requests contained `marker` in their request line."""
        with self.lock:
            return sum(marker in line for line in self.requests)

    def close(self) -> None:
        """Stop accepting."""
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            armed: list[Cut] = []
            threading.Thread(target=self._up, args=(client, upstream, armed), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, armed), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, armed: list[Cut]) -> None:
        """Client to gateway: note each request, and arm a cut if one matches."""
        while data := _recv(client):
            with self.lock:
                for line in data.split(b"\r\n"):
                    if line.endswith((b" HTTP/1.1", b" HTTP/1.0")):
                        self.requests.append(line)
                match = next((c for c in self.cuts if c.marker in data), None)
                if match is not None:
                    self.cuts.remove(match)
                    armed.append(match)
            try:
                upstream.sendall(data)
            except OSError:
                break
        _close(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, armed: list[Cut]) -> None:
        """Gateway to client, until an armed cut says stop."""
        relayed = b""  # of the answer to the request that armed the cut
        while data := _recv(upstream):
            cut = armed[0] if armed else None
            if cut is not None and cut.after is None:
                break  # the answer is lost: the request went through
            try:
                client.sendall(data)
            except OSError:
                break
            if cut is not None:
                relayed += data
                if cut.after is not None and cut.after in relayed:
                    break
        _close(client, upstream)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
