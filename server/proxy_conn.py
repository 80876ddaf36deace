"""The public port's connections: the per-address connection limit, the header deadline, a lingering close.

server/proxy_guard.py limits requests inside the ASGI app; what happens before a request
exists (a connection opens, its headers trickle in) or after its answer (the connection
closes) happens in uvicorn's protocol class, which :func:`guarded_protocol` extends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.proxy_guard import Guard

REASONS = {408: "Request Timeout", 413: "Content Too Large", 429: "Too Many Requests"}
LINGER_SECONDS = 2.0
MAX_LINGERING = 256


def raw_response(status: int, text: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for refusals made below the ASGI app."""
    body = text.encode()
    return (f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class _LingeringTransport:
    """A connection's transport whose ``close`` lets the peer read the last response first.

    Closing a socket that still has unread input makes the kernel send a reset, and a
    client still sending its body (the one a 413 refuses) then loses the response it was
    about to read. So a close first shuts down writing, discards what still arrives for
    ``LINGER_SECONDS`` (or until the peer closes), then closes; at most ``MAX_LINGERING``
    connections do so at once, the rest close at once.
    """

    def __init__(self, transport: asyncio.Transport, protocol: Any):
        self._transport, self._protocol = transport, protocol

    def close(self) -> None:
        self._protocol._linger()

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def guarded_protocol(base: type[asyncio.Protocol], guard: Guard) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with the per-address connection limit, the header deadline and
    a lingering close.

    uvicorn itself has no deadline for a request's headers (its keep-alive timer restarts
    with every byte), so a client that sends a header line every few seconds would hold
    its connection for ever. Here a timer starts when the connection opens and again after
    each response; if no new request's headers are complete when it fires, the connection
    gets 408 and is closed.
    """
    lingering = [0]

    class GuardedProtocol(base):  # type: ignore[valid-type, misc]
        _address: str | None = None
        _deadline: asyncio.TimerHandle | None = None
        _armed_for: object = None
        _lingering = False
        _counted_lingering = False
        _lost = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._raw = transport
            self.transport = _LingeringTransport(transport, self)  # type: ignore[assignment]
            address = self.client[0] if self.client else "unknown"
            if not guard.connections.open(address):
                guard.refusals.refused("connections", address, f"refused a connection from {address} (429: over "
                                       f"{guard.limits.max_connections} open connections from this address)")
                self.transport.write(raw_response(429, "too many connections from this address\n"))
                self.transport.close()
                return
            self._address = address
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self._lingering:  # input after the last response is discarded unread
                super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self._lost = True
            if self._deadline is not None:
                self._deadline.cancel()
            if self._address is not None:
                guard.connections.close(self._address)
                self._address = None
            if self._counted_lingering:
                lingering[0] -= 1
                self._counted_lingering = False
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _linger(self) -> None:
            if self._lingering:
                return
            self._lingering = True
            if self._deadline is not None:
                self._deadline.cancel()
            if self._lost or lingering[0] >= MAX_LINGERING:
                self._raw.close()
                return
            lingering[0] += 1
            self._counted_lingering = True
            if self._raw.can_write_eof():
                self._raw.write_eof()
            self._raw.resume_reading()
            self.loop.call_later(LINGER_SECONDS, self._raw.close)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            if guard.limits.client_timeout > 0 and not self.transport.is_closing():
                self._armed_for = self.cycle  # a new request replaces self.cycle once its headers are in
                self._deadline = self.loop.call_later(guard.limits.client_timeout, self._headers_late)

        def _headers_late(self) -> None:
            self._deadline = None
            in_flight = self.cycle is not None and not self.cycle.response_complete  # a pipelined request
            if self.cycle is not self._armed_for or in_flight or self.transport.is_closing():
                return
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown peer"
            guard.refusals.refused("408-headers", self._address or "unknown", f"closed a connection from {peer} "
                                   f"(408: no complete request headers within {guard.limits.client_timeout:g}s)")
            self.transport.write(raw_response(408, "request headers too slow\n"))
            self.transport.close()

    return GuardedProtocol
