"""Hostile clients for the coordinator's public port, on loopback only (bench/flood.py, tests/test_flood.py).

Each attack opens plain TCP connections from a chosen 127.x.y.z source address to a
127.x.y.z target, speaks just enough HTTP/1.1 to be refused, and is bounded in count and
in time: every read, write and connect has a timeout and every loop a deadline, so an
attack ends by itself whatever the server does. Outcomes are tallied by kind:

- ``413`` a body over the limit; ``408`` a sender too slow; ``403`` a path that is not
  the Fleet API;
- ``429 rate`` / ``429 connections`` the per-address request rate or connection limit;
- ``forwarded NNN``: the request passed the proxy and the SuperLink answered NNN (an
  unauthenticated, garbage protobuf body gets 4xx there);
- ``reset``: the connection ended without a response (a refused body's sender that is
  still writing when the proxy closes sees this instead of its 413).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

Target = tuple[str, int]
Going = Callable[[], bool]  # whether an attack goes on (a deadline, a stop flag)
CHUNK = b"\0" * 65536
IO_TIMEOUT = 15.0


def loopback_only(*hosts: str) -> None:
    """Refuse anything but loopback: these clients exist to be pointed at a local test coordinator."""
    for host in hosts:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"{host} is not a loopback address: the flood runs on loopback only")


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    held_seconds: list[float] = field(default_factory=list)  # how long each slow sender kept its connection

    def add(self, kind: str) -> None:
        self.counts[kind] += 1


async def connect(target: Target, source: str, tls: ssl.SSLContext | None = None
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from ``source`` (TLS with ``tls``, the server's name taken as ``localhost``)."""
    opened = asyncio.open_connection(*target, local_addr=(source, 0), ssl=tls,
                                     server_hostname="localhost" if tls else None)
    return await asyncio.wait_for(opened, IO_TIMEOUT)


async def read_response(reader: asyncio.StreamReader, timeout: float = IO_TIMEOUT) -> tuple[int | None, bytes]:
    """(status, body) of one response, or (None, b"") when the connection ends without one."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
        return status, body
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, asyncio.TimeoutError,
            ValueError, IndexError):
        return None, b""


def kind_of(status: int | None, body: bytes) -> str:
    if status is None:
        return "reset"
    if status == 429:
        return "429 connections" if b"connections" in body else "429 rate"
    return str(status) if status in (403, 408, 413) else f"forwarded {status}"


def close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except (ConnectionError, RuntimeError):
        pass


def request_head(path: str, length: int | None, extra: str = "") -> bytes:
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nhost: coordinator\r\ncontent-type: application/protobuf\r\n"
            f"{framing}\r\n{extra}\r\n").encode()


async def big_body(target: Target, source: str, size: int, chunked: bool, tally: Tally,
                   tls: ssl.SSLContext | None = None) -> int | None:
    """One push-messages request of ``size`` zero bytes (declared, or chunked); returns the status."""
    try:
        reader, writer = await connect(target, source, tls)
    except (OSError, asyncio.TimeoutError) as err:
        tally.add(f"connect failed ({type(err).__name__})")
        return None
    answer = asyncio.ensure_future(read_response(reader, timeout=120))
    writer.write(request_head("/v1/fleet/push-messages", None if chunked else size))
    sent, deadline = 0, time.monotonic() + 120
    try:
        while sent < size and not answer.done() and time.monotonic() < deadline:
            piece = CHUNK[:min(len(CHUNK), size - sent)]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            sent += len(piece)
        if chunked and not answer.done():
            writer.write(b"0\r\n\r\n")
    except (OSError, asyncio.TimeoutError):
        pass
    status, body = await answer
    tally.bytes_sent += sent
    tally.add(kind_of(status, body))
    close(writer)
    return status


async def small_requests(target: Target, source: str, count: int, per_second: float, going: Going,
                         tally: Tally, workers: int = 4) -> None:
    """Up to ``count`` unauthenticated Fleet calls (random protobuf bytes; one in ten to the Control API),
    paced at ``per_second``, each on a new connection."""
    spacing = workers / per_second
    todo = [count]

    async def worker() -> None:
        while todo[0] > 0 and going():
            todo[0] -= 1
            started = time.monotonic()
            path = "/v1/control/stop-run" if todo[0] % 10 == 0 else "/v1/fleet/pull-messages"
            try:
                reader, writer = await connect(target, source)
                body = os.urandom(64)
                writer.write(request_head(path, len(body)) + body)
                tally.add(kind_of(*await read_response(reader)))
                close(writer)
            except (OSError, asyncio.TimeoutError) as err:
                tally.add(f"connect failed ({type(err).__name__})")
            await asyncio.sleep(max(0.0, spacing - (time.monotonic() - started)))

    await asyncio.gather(*(worker() for _ in range(workers)))


SLOW_MODES = ("headers", "trickle", "stall")


async def slow_sender(target: Target, source: str, mode: str, seconds: float, tally: Tally,
                      going: Going = lambda: True, tls: ssl.SSLContext | None = None) -> None:
    """One slow connection, until the server ends it or ``seconds`` pass. ``mode``: ``headers`` sends a
    header byte a second (slowloris); ``trickle`` complete headers, then a body byte a second; ``stall``
    complete headers and 100 body bytes, then nothing."""
    started = time.monotonic()
    try:
        reader, writer = await connect(target, source, tls)
    except (OSError, asyncio.TimeoutError) as err:
        tally.add(f"connect failed ({type(err).__name__})")
        return
    answer = asyncio.ensure_future(read_response(reader, timeout=seconds + IO_TIMEOUT))
    first = b"POST /v1/fleet/push-messages HTTP/1.1\r\n" if mode == "headers" else request_head(
        "/v1/fleet/push-messages", 10_000)
    writer.write(first + (b"\0" * 100 if mode == "stall" else b""))
    try:
        while not answer.done() and time.monotonic() - started < seconds and going():
            if mode != "stall":
                writer.write(b"x" if mode == "headers" else b"\0")
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            await asyncio.wait([answer], timeout=1.0)
    except (OSError, asyncio.TimeoutError):
        pass
    if not answer.done():
        answer.cancel()
        tally.add("still open at the deadline" if going() else "stopped by the attacker")
    else:
        tally.add(kind_of(*answer.result()))
    tally.held_seconds.append(time.monotonic() - started)
    close(writer)


async def slow_senders(target: Target, source: str, mode: str, going: Going, tally: Tally,
                       seconds: float = 90.0) -> None:
    """One slow connection after another while ``going()``: what a slowloris keeps up."""
    while going():
        await slow_sender(target, source, mode, seconds, tally, going)
        await asyncio.sleep(1.0)  # a refused connection comes back at once: no tight loop
