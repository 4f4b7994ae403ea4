"""Failed authentications per peer: past a limit in a window, a peer is refused until it ends."""

from __future__ import annotations

import ipaddress
import math
import time

MAX_PEERS = 65_536  # peers remembered; past this, expired windows go, then the oldest


def peer_key(host: str) -> str:
    """Who a failure counts against: the address, or its /64 for IPv6 (one host holds a /64)."""
    if ":" not in host:
        return host
    try:
        return str(ipaddress.IPv6Network(f"{host}/64", strict=False))
    except ValueError:
        return host


class Lockout:
    """Fixed windows of failures per peer, in this process (no peer is trusted to say who it is).

    Owned by the event loop's thread: only the gateway's middleware calls it.
    """

    def __init__(self, limit: int, window_s: float, max_peers: int = MAX_PEERS) -> None:
        self.limit, self.window_s, self.max_peers = limit, window_s, max_peers
        self._windows: dict[str, tuple[float, int]] = {}  # peer -> (window start, failures)

    def retry_after(self, host: str, now: float | None = None) -> int:
        """Seconds until `host` may try again; 0 when it may now."""
        if not self._windows:
            return 0
        key = peer_key(host)
        entry = self._windows.get(key)
        if entry is None:
            return 0
        now = time.monotonic() if now is None else now
        start, failures = entry
        left = start + self.window_s - now
        if left <= 0:
            del self._windows[key]
            return 0
        return math.ceil(left) if failures >= self.limit else 0

    def fail(self, host: str, now: float | None = None) -> None:
        """Count one failed authentication from `host`."""
        now = time.monotonic() if now is None else now
        key = peer_key(host)
        start, failures = self._windows.get(key, (now, 0))
        if now - start >= self.window_s:
            start, failures = now, 0
        self._windows[key] = (start, failures + 1)
        if len(self._windows) > self.max_peers:
            self._prune(now)

    def _prune(self, now: float) -> None:
        expired = [k for k, (start, _) in self._windows.items() if now - start >= self.window_s]
        for key in expired:
            del self._windows[key]
        if len(self._windows) > self.max_peers:  # a flood of fresh peers: forget the oldest half
            for key in list(self._windows)[: len(self._windows) - self.max_peers // 2]:
                del self._windows[key]
