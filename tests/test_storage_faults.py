"""S3 that fails: a small fault proxy in front of moto's S3 server."""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest

from tests.conftest import Gateway, WorkerProcess, client_for
from tests.fault_parts import FaultRow, ended, pipeline_runs

pytestmark = pytest.mark.slow

SMALL = {"prompt": "a storm", "width": 64, "height": 64, "steps": 2}


class FaultProxy:
    """Forwards to S3, but answers 503 to the next `failures` uploads (-1: every one)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.failures = 0
        self.failed = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        """Where boto3 should point."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def should_fail(self, method: str) -> bool:
        """Decide for one request; only uploads fail."""
        with self.lock:
            if method != "PUT" or self.failures == 0:
                return False
            self.failures -= 1 if self.failures > 0 else 0
            self.failed += 1
            return True

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if proxy.should_fail(self.command):
                    self.send_response(503)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port)
                conn.request(self.command, self.path, body, dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any  # noqa: N815

        return Handler

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of moto with a fresh bucket."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="flaky")
    p = FaultProxy(s3_endpoint)
    yield p
    p.close()


def job_through(
    failures: int,
    env: dict[str, str],
    proxy: FaultProxy,
    gateway_factory: Callable[[dict[str, str]], Gateway],
    worker_factory: Callable[..., WorkerProcess],
) -> tuple[dict[str, Any], Counter[str]]:
    """Run one job with S3 behind the proxy failing `failures` uploads (-1: all); the ended job
    and the pipeline runs its worker logged."""
    s3_env = {**env, "DQ_STORAGE_URL": "s3://flaky/out", "DQ_S3_ENDPOINT_URL": proxy.url}
    worker = worker_factory(s3_env)
    proxy.failures = failures
    with client_for(gateway_factory(s3_env)) as client:
        job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
        job = ended(client, [job_id], 120)[job_id]
    return job, pipeline_runs(worker.log_path)


def test_storage_errors_are_retried_then_succeed(
    env: dict[str, str],
    proxy: FaultProxy,
    gateway_factory: Callable[[dict[str, str]], Gateway],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    job, runs = job_through(4, env, proxy, gateway_factory, worker_factory)
    row = FaultRow.of("S3 answering 503 four times, then healthy", {job["id"]: job}, runs, 0)
    replace(row, outcome=f"{job['status']} after {proxy.failed} failed uploads").print()
    assert job["status"] == "succeeded", job
    assert proxy.failed == 4
    assert (row.lost, row.second_attempt, row.run_twice) == (0, 0, 0)


def test_storage_down_for_good_fails_the_job_with_a_storage_error(
    env: dict[str, str],
    proxy: FaultProxy,
    gateway_factory: Callable[[dict[str, str]], Gateway],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    job, runs = job_through(-1, env, proxy, gateway_factory, worker_factory)
    row = FaultRow.of("S3 down for good", {job["id"]: job}, runs, 0)
    replace(row, outcome=f"{job['status']} `{job['error']['code']}`").print()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "storage_error"
    assert job["outputs"] == []
    assert (row.lost, row.second_attempt, row.run_twice) == (0, 0, 0)
