"""One delivery attempt against real HTTP(S) servers on 127.0.0.1, and the retry decisions."""

import datetime as dt
import random
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.callbacks import (
    DEFAULT_SCHEDULE,
    MAX_RETRY_AFTER_S,
    Attempt,
    deliver,
    is_retryable,
    next_delay,
    parse_retry_after,
)
from core.urlguard import GuardedUrl, check_url

BODY = b'{"type":"job.succeeded"}'
SIGNED = {"webhook-id": "msg_1", "webhook-timestamp": "1700000000", "webhook-signature": "v1,x"}


@dataclass(frozen=True)
class Seen:
    """One request as the receiver got it."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    """What a receiver answers to every POST."""

    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b"ok"
    # Repeat the body this many times, to play a receiver that answers with far too much.
    repeat: int = 1
    seen: list[Seen] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    reply: Reply

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.reply.seen.append(
            Seen(self.path, _lowered(self.headers.items()), self.rfile.read(length))
        )
        self.send_response(self.reply.status)
        for name, value in self.reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(self.reply.body) * self.reply.repeat))
        self.end_headers()
        try:
            for _ in range(self.reply.repeat):
                self.wfile.write(self.reply.body)
        except OSError:
            pass  # the sender hung up after reading its fill, as it should

    def log_message(self, format: str, *args: object) -> None:
        pass


def _lowered(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header names in lower case, as HTTP compares them."""
    return {name.lower(): value for name, value in headers}


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


Serve = Callable[..., tuple[int, Reply]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start receivers on 127.0.0.1 answering with a Reply; returns (port, reply)."""
    servers: list[ThreadingHTTPServer] = []

    def start(
        reply: Reply | None = None, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> tuple[int, Reply]:
        reply = reply or Reply()
        handler = type("Handler", (_Handler,), {"reply": reply})
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        server = server_class((host, 0), handler)
        server.daemon_threads = True
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server.server_address[1], reply

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def pinned(url: str, *addresses: str) -> GuardedUrl:
    """Check url as the sender does, with the name answering only the given addresses."""
    return check_url(url, allow_private=True, resolve=lambda host, port: list(addresses))


def test_ok_sends_body_and_headers_to_the_pinned_address(serve: Serve) -> None:
    port, reply = serve()
    target = pinned(f"http://example.invalid:{port}/hook?x=1", "127.0.0.1")
    attempt = deliver(target, BODY, SIGNED)
    assert (attempt.status_code, attempt.error, attempt.ok) == (200, None, True)
    [seen] = reply.seen
    assert (seen.path, seen.body) == ("/hook?x=1", BODY)
    assert seen.headers["host"] == f"example.invalid:{port}"
    assert seen.headers["content-type"] == "application/json"
    assert {k: seen.headers[k] for k in SIGNED} == SIGNED


def test_caller_cannot_override_host(serve: Serve) -> None:
    port, reply = serve()
    target = pinned(f"http://example.invalid:{port}/", "127.0.0.1")
    deliver(target, BODY, {"Host": "internal.example", "Content-Type": "text/plain"})
    assert reply.seen[0].headers["host"] == f"example.invalid:{port}"
    assert reply.seen[0].headers["content-type"] == "text/plain"


def test_ipv6_literal_host_is_bracketed(serve: Serve) -> None:
    try:
        port, reply = serve(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    attempt = deliver(check_url(f"http://[::1]:{port}/", allow_private=True), BODY, {})
    assert attempt.ok
    assert reply.seen[0].headers["host"] == f"[::1]:{port}"


def test_next_address_is_tried_when_the_first_refuses(serve: Serve) -> None:
    port, reply = serve()
    # Nothing listens on 127.0.0.2 at this port (the receiver is bound to 127.0.0.1 only).
    attempt = deliver(pinned(f"http://example.invalid:{port}/", "127.0.0.2", "127.0.0.1"), BODY, {})
    assert attempt.ok
    assert len(reply.seen) == 1


def test_refused_everywhere_is_a_retryable_connection_failure() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    attempt = deliver(pinned(f"http://example.invalid:{port}/", "127.0.0.1"), BODY, {})
    assert attempt.status_code is None
    assert attempt.error is not None
    assert attempt.error.startswith("connection failed: ")
    assert is_retryable(attempt)


def test_server_error_is_retryable(serve: Serve) -> None:
    port, _ = serve(Reply(status=500))
    attempt = deliver(pinned(f"http://example.invalid:{port}/", "127.0.0.1"), BODY, {})
    assert (attempt.status_code, attempt.ok, is_retryable(attempt)) == (500, False, True)


def test_gone_stops_retries(serve: Serve) -> None:
    port, _ = serve(Reply(status=410))
    attempt = deliver(pinned(f"http://example.invalid:{port}/", "127.0.0.1"), BODY, {})
    assert (attempt.status_code, attempt.ok, is_retryable(attempt)) == (410, False, False)


def test_redirect_is_a_failure_and_not_followed(serve: Serve) -> None:
    other_port, other = serve()
    location = f"http://127.0.0.1:{other_port}/internal"
    port, _ = serve(Reply(status=302, headers=[("Location", location)]))
    attempt = deliver(pinned(f"http://example.invalid:{port}/", "127.0.0.1"), BODY, {})
    assert (attempt.status_code, attempt.ok, is_retryable(attempt)) == (302, False, True)
    assert other.seen == []


def test_retry_after_seconds_and_date_are_read(serve: Serve) -> None:
    port, _ = serve(Reply(status=429, headers=[("Retry-After", "120")]))
    attempt = deliver(pinned(f"http://example.invalid:{port}/", "127.0.0.1"), BODY, {})
    assert (attempt.status_code, attempt.retry_after_s) == (429, 120.0)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=600)
    http_date = later.strftime("%a, %d %b %Y %H:%M:%S GMT")
    port, _ = serve(Reply(status=503, headers=[("Retry-After", http_date)]))
    attempt = deliver(pinned(f"http://example.invalid:{port}/", "127.0.0.1"), BODY, {})
    assert attempt.retry_after_s == pytest.approx(600, abs=5)


def test_huge_response_body_is_not_read_to_the_end(serve: Serve) -> None:
    port, _ = serve(Reply(body=b"x" * 65536, repeat=16384))  # 1 GiB announced and sent
    target = pinned(f"http://example.invalid:{port}/", "127.0.0.1")
    attempt = deliver(target, BODY, {}, total_timeout=5.0, max_response_bytes=4096)
    assert attempt.ok
    # Reading it all (or until the deadline) would take seconds; stopping at the cap does not.
    assert attempt.elapsed_s < 1.0


def test_receiver_that_never_answers_times_out() -> None:
    with socket.socket() as silent:
        # The kernel completes the handshake from the backlog; nobody ever reads or answers.
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = pinned(f"http://example.invalid:{silent.getsockname()[1]}/", "127.0.0.1")
        attempt = deliver(target, BODY, {}, connect_timeout=0.5, total_timeout=1.0)
    assert (attempt.status_code, attempt.error) == (None, "timeout")
    assert 0.9 < attempt.elapsed_s < 1.5
    assert is_retryable(attempt)


def test_receiver_that_trickles_is_cut_off_at_the_total_timeout() -> None:
    # A byte every 0.1 s resets any per-read timeout; only an overall deadline stops it.
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        threading.Thread(target=_trickle, args=(listener, stop), daemon=True).start()
        target = pinned(f"http://example.invalid:{listener.getsockname()[1]}/", "127.0.0.1")
        attempt = deliver(target, BODY, {}, connect_timeout=0.5, total_timeout=1.0)
        stop.set()
    assert attempt.error == "timeout"
    assert attempt.elapsed_s < 1.5


def _trickle(listener: socket.socket, stop: threading.Event) -> None:
    """Accept one connection and send a never-ending status line, one byte at a time."""
    conn, _ = listener.accept()
    with conn:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not stop.wait(0.1):
            try:
                conn.sendall(b"a")
            except OSError:
                return


def test_https_uses_sni_and_certificate_of_the_original_host(serve: Serve, tmp_path: Path) -> None:
    server_tls, client_tls, sni = _tls_pair("example.invalid", tmp_path)
    port, reply = serve(tls=server_tls)
    target = pinned(f"https://example.invalid:{port}/hook", "127.0.0.1")
    attempt = deliver(target, BODY, {}, ssl_context=client_tls)
    assert (attempt.status_code, attempt.error) == (200, None)
    assert sni == ["example.invalid"]
    assert reply.seen[0].headers["host"] == f"example.invalid:{port}"


def test_https_refuses_a_certificate_for_another_host(serve: Serve, tmp_path: Path) -> None:
    server_tls, client_tls, _ = _tls_pair("example.invalid", tmp_path)
    port, reply = serve(tls=server_tls)
    target = pinned(f"https://other.invalid:{port}/hook", "127.0.0.1")
    attempt = deliver(target, BODY, {}, ssl_context=client_tls)
    assert attempt.status_code is None
    assert attempt.error is not None
    assert "certificate verify failed" in attempt.error.lower()
    assert reply.seen == []


def _tls_pair(hostname: str, tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, list[str]]:
    """Server and client TLS contexts for a fresh self-signed certificate, and the SNI seen."""
    cert_pem, key_pem = _self_signed(hostname)
    # ssl loads a server's certificate and key only from files.
    (tmp / "cert.pem").write_bytes(cert_pem)
    (tmp / "key.pem").write_bytes(key_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    sni: list[str] = []

    def remember(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        sni.append(name or "")

    server.sni_callback = remember
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client, sni


def _self_signed(hostname: str) -> tuple[bytes, bytes]:
    """A self-signed CA certificate that is also valid for hostname, as PEM (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_default_schedule_is_ten_attempts_over_about_three_days() -> None:
    assert len(DEFAULT_SCHEDULE) + 1 == 10
    assert sum(DEFAULT_SCHEDULE) / 3600 == pytest.approx(75.6, abs=0.1)


@pytest.mark.parametrize(
    ("attempt_no", "retry_after_s", "low", "high"),
    [
        (1, None, 4.0, 6.0),
        (2, None, 240.0, 360.0),
        (9, None, 86400 * 0.8, 86400 * 1.2),
        (1, 60.0, 60.0, 60.0),  # the receiver asked for longer
        (3, 60.0, 1800 * 0.8, 1800 * 1.2),  # the schedule is already longer
        (1, 10 * 86400.0, MAX_RETRY_AFTER_S, MAX_RETRY_AFTER_S),  # capped
    ],
)
def test_next_delay(attempt_no: int, retry_after_s: float | None, low: float, high: float) -> None:
    rng = random.Random(7)
    delays = {next_delay(attempt_no, DEFAULT_SCHEDULE, retry_after_s, rng) for _ in range(50)}
    assert all(d is not None and low <= d <= high for d in delays)


def test_next_delay_jitters() -> None:
    rng = random.Random(7)
    assert len({next_delay(5, DEFAULT_SCHEDULE, None, rng) for _ in range(20)}) == 20


def test_next_delay_gives_up_after_the_schedule() -> None:
    assert next_delay(10, DEFAULT_SCHEDULE, 30.0, random.Random(7)) is None
    with pytest.raises(ValueError, match="start at 1"):
        next_delay(0, DEFAULT_SCHEDULE, None, random.Random(7))


@pytest.mark.parametrize(
    ("attempt", "retry"),
    [
        (Attempt(200, None, None, 0.1), False),
        (Attempt(204, None, None, 0.1), False),
        (Attempt(301, None, None, 0.1), True),
        (Attempt(400, None, None, 0.1), True),
        (Attempt(404, None, None, 0.1), True),
        (Attempt(410, None, None, 0.1), False),
        (Attempt(429, None, 30.0, 0.1), True),
        (Attempt(503, None, None, 0.1), True),
        (Attempt(None, "timeout", None, 15.0), True),
        (Attempt(None, "connection failed: refused", None, 0.1), True),
    ],
)
def test_is_retryable(attempt: Attempt, retry: bool) -> None:
    assert is_retryable(attempt) is retry


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Wed, 21 Oct 2015 07:30:00 GMT", 240.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # already past
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("", None),
    ],
)
def test_parse_retry_after(value: str, seconds: float | None) -> None:
    now = dt.datetime(2015, 10, 21, 7, 26, tzinfo=dt.UTC)
    assert parse_retry_after(value, now) == seconds
