"""A lean keep-alive HTTP/1.1 client for the load generator.

httpx spends most of a core on its connection pool once a few dozen requests are in flight (74
submits/s at 300 clients, the client at 98 % CPU and the gateway at 12 %), so the generator would
measure itself. This client writes a request, reads one Content-Length or chunked response, and
keeps the socket: tens of microseconds per request, so nearly all the CPU is left to the system.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class HttpError(Exception):
    """The server broke the protocol or closed the connection mid-response."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A response: status and body."""

    status: int
    body: bytes

    def json_body(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class Connection:
    """One keep-alive connection to `base_url`; one request at a time."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the load generator speaks plain http only, not {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.head = f"Host: {self.host}:{self.port}\r\n{extra}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, payload: Any = None) -> Reply:
        """Send one request (a JSON body when `payload` is given) and read its response."""
        body = b"" if payload is None else json.dumps(payload).encode()
        kind = "Content-Type: application/json\r\n" if payload is not None else ""
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\n{self.head}{kind}"
        data = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        reused = self.writer is not None
        try:
            return await self._exchange(data)
        except (OSError, asyncio.IncompleteReadError, HttpError) as e:
            await self.close()
            if not (reused and _unanswered(e)):
                raise HttpError(f"{method} {path}: {type(e).__name__}: {e}") from e
        # A kept-alive socket the server had closed while idle (uvicorn after 5 s) answers
        # nothing at all: the request never reached the server, so it is sent again, once.
        try:
            return await self._exchange(data)
        except (OSError, asyncio.IncompleteReadError, HttpError) as e:
            await self.close()
            raise HttpError(f"{method} {path}: {type(e).__name__}: {e}") from e

    async def _exchange(self, data: bytes) -> Reply:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(data)
        return await _read_reply(self.reader)

    async def close(self) -> None:
        """Drop the socket; the next request opens a new one."""
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _unanswered(error: Exception) -> bool:
    """Whether the server closed the connection without a byte of response."""
    if isinstance(error, asyncio.IncompleteReadError):
        return not error.partial
    return isinstance(error, ConnectionResetError | BrokenPipeError)


async def _read_reply(reader: asyncio.StreamReader) -> Reply:
    """One response: status line, headers, then a Content-Length or chunked body."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError) as e:
        raise HttpError(f"bad status line {lines[0]!r}") from e
    headers = dict(_header(line) for line in lines[1:] if line)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return Reply(status=status, body=await _read_chunks(reader))
    length = int(headers.get("content-length", "0"))
    return Reply(status=status, body=await reader.readexactly(length))


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()


async def _read_chunks(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readuntil(b"\r\n")  # the empty trailer
    return b"".join(parts)


class Pool:
    """Connections handed out one per in-flight request, for open-loop arrivals."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        self.base_url, self.headers = base_url, headers
        self.idle: list[Connection] = []
        self.all: list[Connection] = []

    def acquire(self) -> Connection:
        """An idle connection, or a new one."""
        if self.idle:
            return self.idle.pop()
        conn = Connection(self.base_url, self.headers)
        self.all.append(conn)
        return conn

    def release(self, conn: Connection) -> None:
        """Give a connection back for reuse."""
        self.idle.append(conn)

    async def close(self) -> None:
        """Close every connection."""
        for conn in self.all:
            await conn.close()
