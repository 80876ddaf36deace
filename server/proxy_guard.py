"""What keeps hostile traffic on the public port from reaching (or starving) the SuperLink.

server/proxy.py forwards the Fleet API; this module holds the limits it applies on the way,
per client address (the peer of the TCP connection; server/proxy_conn.py applies the ones
that act on connections):

- a token bucket per address: ``rate`` requests a second on average, ``burst`` at once
  (429 beyond, before the request is read further);
- at most ``max_connections`` open connections per address (a connection over the limit is
  answered 429 and closed at once);
- a request's headers must arrive within ``client_timeout`` seconds of the connection
  opening (or of the previous response); its body may not pause longer than that, nor,
  after that long, average less than ``min_body_rate`` bytes a second (408, connection
  closed): a slow sender (slowloris, or one trickling its body) holds a connection for
  about one timeout;
- a body may not exceed ``max_body_bytes`` (413): refused by Content-Length before a byte
  is forwarded, or by counting the bytes of a chunked body as they stream, which aborts
  the upstream request.

Every refusal (and every request the SuperLink fails, 502/504) is counted by kind; the
log gets one line per address and kind per ``log_interval`` (with the number suppressed
since), never one per request: a flood must not become a flood of log lines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, MutableMapping

log = logging.getLogger("nearl.proxy")
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]  # an ASGI receive callable
MAX_TRACKED = 65536  # addresses the rate and log tables remember at once (about 100 bytes each)

class BodyTooLarge(Exception):
    """A streamed body passed the limit: the upstream request is aborted and the client gets 413."""


class SlowSender(Exception):
    """The body paused longer than the client timeout: the upstream request is aborted, the client gets 408."""


class ClientGone(Exception):
    """The client disconnected before its body was complete: nothing is forwarded further."""


class RateLimiter:
    """A token bucket per address: ``rate`` tokens a second up to ``burst``; a request takes one.

    Buckets that have refilled carry no state and are dropped when the table grows past
    ``MAX_TRACKED``, so a sweep over many addresses cannot grow it without bound.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, time of last update)
        self.lowest = float(burst)  # the fewest tokens any address was left with: how close sites came

    def allow(self, address: str) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, then = self.buckets.get(address, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        tokens -= 1.0 if allowed else 0.0
        self.buckets[address] = (tokens, now)
        if allowed:
            self.lowest = min(self.lowest, tokens)
        if len(self.buckets) > MAX_TRACKED:
            self._prune(now)
        return allowed

    def _prune(self, now: float) -> None:
        full = [a for a, (t, then) in self.buckets.items() if t + (now - then) * self.rate >= self.burst]
        for address in full or sorted(self.buckets, key=lambda a: self.buckets[a][1])[:len(self.buckets) // 2]:
            del self.buckets[address]


class ConnectionTable:
    """Open connections per address; ``open`` says whether one more is within ``limit`` (0: no limit)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open_by_address: Counter[str] = Counter()

    def open(self, address: str) -> bool:
        if self.limit > 0 and self.open_by_address[address] >= self.limit:
            return False
        self.open_by_address[address] += 1
        return True

    def close(self, address: str) -> None:
        self.open_by_address[address] -= 1
        if self.open_by_address[address] <= 0:
            del self.open_by_address[address]


@dataclass
class RefusalLog:
    """Counts refusals by kind; logs the first per (kind, address) and then one per ``interval`` seconds."""

    interval: float = 60.0
    clock: Callable[[], float] = time.monotonic
    counts: Counter[str] = field(default_factory=Counter)
    _last: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)  # -> (logged at, suppressed)

    def refused(self, kind: str, address: str, line: str) -> None:
        self.counts[kind] += 1
        now, key = self.clock(), (kind, address)
        logged, suppressed = self._last.get(key, (None, 0))
        if logged is not None and now - logged < self.interval:
            self._last[key] = (logged, suppressed + 1)
            return
        more = f"; {suppressed} more like it from {address} in the last {self.interval:.0f}s" if suppressed else ""
        log.warning("%s%s", line, more)
        self._last[key] = (now, 0)
        if len(self._last) > MAX_TRACKED:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}

    def summary(self) -> str:
        return ", ".join(f"{kind} {n}" for kind, n in sorted(self.counts.items())) or "none"


@dataclass
class Guard:
    """The limits' state for one proxy process, shared by the ASGI app and the connection protocol."""

    limits: Any  # server.proxy.Limits
    refusals: RefusalLog
    rate: RateLimiter
    connections: ConnectionTable
    forwarded: int = 0
    largest_body: int = 0

    @classmethod
    def create(cls, limits: Any, clock: Callable[[], float] = time.monotonic) -> "Guard":
        return cls(limits, RefusalLog(limits.log_interval, clock), RateLimiter(limits.rate, limits.burst, clock),
                   ConnectionTable(limits.max_connections))

    def summary(self) -> str:
        used = self.limits.burst - self.rate.lowest if self.limits.rate > 0 else float("nan")
        return (f"forwarded {self.forwarded} requests (largest body {self.largest_body:,} bytes; the busiest "
                f"address used {used:.0f} of its burst of {self.limits.burst}); refused or failed, by status: "
                f"{self.refusals.summary()}")


async def limited_body(receive: Receive, guard: Guard) -> AsyncIterator[bytes]:
    """The request body as it arrives, cut off at ``max_body_bytes`` or when the sender is too slow.

    Too slow: a pause over ``client_timeout``, or, after the first ``client_timeout``
    seconds, an average under ``min_body_rate`` bytes a second (a sender that trickles a
    byte at a time never pauses long). The exceptions end the upstream request mid-body
    (httpx closes that connection), so the SuperLink never holds more than the limit of one request.
    """
    limits = guard.limits
    seen, started = 0, time.monotonic()
    while True:
        message = await _next_message(receive, limits, started, seen)
        if message["type"] == "http.disconnect":
            raise ClientGone(seen)
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limits.max_body_bytes:
            raise BodyTooLarge(seen)
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            guard.largest_body = max(guard.largest_body, seen)
            return


async def _next_message(receive: Receive, limits: Any, started: float, seen: int) -> dict:
    if limits.client_timeout <= 0:
        return dict(await receive())
    deadline = started + limits.client_timeout + seen / limits.min_body_rate
    wait = min(limits.client_timeout, deadline - time.monotonic())
    try:
        if wait <= 0:
            raise asyncio.TimeoutError
        return dict(await asyncio.wait_for(receive(), wait))
    except asyncio.TimeoutError:
        raise SlowSender(seen, time.monotonic() - started) from None
