"""The public port's limits (server/proxy_guard.py) against hostile clients, on loopback.

The proxy runs in uvicorn (with its connection protocol) in a thread, in front of a
recording upstream in another. Checked: 413 by Content-Length before a byte is forwarded
and 413 by count for a chunked body, with the upstream request aborted at the limit; 429
per address for the request rate and for open connections, other addresses unaffected;
408 for slow headers, a stalled body and a trickling one, while a slow *upstream* and a
keep-alive connection between requests are left alone; the same on TLS; one log line per
address, kind and interval; the limits' flags from nearl-server to the proxy; the body
limit a run derives from its adapter schema.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from nearl_protocol.processes import fleet_proxy_command, free_port
from server.proxy import Limits, build_parser, create_app
from server.proxy_conn import guarded_protocol
from server.proxy_guard import Guard, RateLimiter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import flood_attacks as attacks  # noqa: E402

LIMIT = 64 * 1024


class Upstream:
    """Records each request: path, body bytes received, whether it completed or the proxy went away."""

    def __init__(self):
        self.requests: list[dict] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        entry = {"path": scope["path"], "bytes": 0, "complete": False, "disconnected": False}
        self.requests.append(entry)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                entry["disconnected"] = True
                return
            entry["bytes"] += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        entry["complete"] = True
        if scope["path"] == "/v1/fleet/slow-answer":
            await asyncio.sleep(2.5)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def serving(app, http=H11Protocol, **tls: str) -> Iterator[int]:
    """``app`` on a free loopback port in a uvicorn thread (``ssl_certfile``/``ssl_keyfile``: TLS); stopped
    (bounded) on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=http, ws="none", log_level="warning",
                                           lifespan="off", access_log=False, **tls))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextmanager
def proxy(certs: Path | None = None, **limits) -> Iterator[tuple[int, Upstream, Guard]]:
    """The proxy in front of a recording upstream; with ``certs`` (deploy/make-certs.sh) on TLS."""
    upstream = Upstream()
    guard = Guard.create(Limits(**{"max_body_bytes": LIMIT, **limits}))
    tls = {"ssl_certfile": str(certs / "server.pem"), "ssl_keyfile": str(certs / "server.key")} if certs else {}
    with serving(upstream) as up_port:
        app = create_app(f"http://127.0.0.1:{up_port}", guard=guard)
        with serving(app, guarded_protocol(H11Protocol, guard), **tls) as port:
            yield port, upstream, guard


def exchange(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 10.0) -> tuple[int | None, bytes]:
    """Send ``data`` on a fresh connection and read one response."""

    async def go():
        reader, writer = await attacks.connect(("127.0.0.1", port), source)
        writer.write(data)
        answer = await attacks.read_response(reader, timeout)
        attacks.close(writer)
        return answer

    return asyncio.run(go())


def post(path: str = "/v1/fleet/pull-messages", body: bytes = b"x" * 10) -> bytes:
    return attacks.request_head(path, len(body)) + body


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- bodies ---------------------------------------------------------------------------------------------
def test_a_declared_body_over_the_limit_gets_413_before_a_byte_is_forwarded(caplog):
    with caplog.at_level(logging.WARNING, logger="nearl.proxy"), proxy() as (port, upstream, guard):
        status, body = exchange(port, attacks.request_head("/v1/fleet/push-messages", 400 * 10**6))
        assert status == 413 and b"too large" in body
        assert upstream.requests == []
        assert exchange(port, post(body=b"\1" * LIMIT))[0] == 200  # exactly the limit passes
        assert upstream.requests[-1] == {"path": "/v1/fleet/pull-messages", "bytes": LIMIT, "complete": True,
                                         "disconnected": False}
    (line,) = [r.getMessage() for r in caplog.records]
    assert "refused POST /v1/fleet/push-messages from 127.0.0.1:" in line and "(413: Content-Length 400,000,000" in line


def test_a_chunked_body_is_counted_and_its_upstream_request_aborted_at_the_limit():
    with proxy() as (port, upstream, guard):
        tally = attacks.Tally()
        status = asyncio.run(attacks.big_body(("127.0.0.1", port), "127.0.0.1", 100 * LIMIT, True, tally))
        assert status == 413 and tally.bytes_sent < 100 * LIMIT
        wait_until(lambda: upstream.requests and upstream.requests[0]["disconnected"])
        (aborted,) = upstream.requests
        assert not aborted["complete"] and aborted["bytes"] <= LIMIT
        assert guard.refusals.counts == {"413": 1}
        small = attacks.Tally()  # a chunked body within the limit goes through whole
        assert asyncio.run(attacks.big_body(("127.0.0.1", port), "127.0.0.1", LIMIT // 2, True, small)) == 200
        assert upstream.requests[-1]["bytes"] == LIMIT // 2 and upstream.requests[-1]["complete"]


# -- rate and connections --------------------------------------------------------------------------------
def test_the_request_rate_is_limited_per_address_with_429():
    with proxy(rate=0.01, burst=3) as (port, upstream, guard):
        statuses = [exchange(port, post(), "127.0.0.2")[0] for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        assert exchange(port, post(), "127.0.0.3")[0] == 200  # another address has its own bucket
        assert exchange(port, post("/v1/control/stop-run"), "127.0.0.2")[0] == 429  # counted before the path
        assert len(upstream.requests) == 4 and guard.refusals.counts == {"429": 3}


def test_the_bucket_refills_at_the_rate():
    now = [0.0]
    bucket = RateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    assert [bucket.allow("a") for _ in range(3)] == [True, True, False]
    now[0] += 0.5  # one token back
    assert [bucket.allow("a") for _ in range(2)] == [True, False]
    assert bucket.allow("b") and RateLimiter(rate=0, burst=1).allow("a")  # rate 0: no limit


def test_open_connections_are_limited_per_address_with_429():
    with proxy(max_connections=2) as (port, upstream, guard):
        held = [socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
                for _ in range(2)]
        try:
            wait_until(lambda: guard.connections.open_by_address["127.0.0.2"] == 2)
            status, body = exchange(port, post(), "127.0.0.2")
            assert (status, body) == (429, b"too many connections from this address\n")
            assert exchange(port, post(), "127.0.0.3")[0] == 200
            held.pop().close()
            wait_until(lambda: guard.connections.open_by_address["127.0.0.2"] == 1)
            assert exchange(port, post(), "127.0.0.2")[0] == 200
        finally:
            for s in held:
                s.close()
        assert guard.refusals.counts == {"connections": 1}


# -- slow senders ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", attacks.SLOW_MODES)
def test_a_slow_sender_is_cut_off_with_408(mode):
    # "trickle" sends a byte a second: never a pause over the timeout, but far under the minimum rate
    with proxy(client_timeout=1.5) as (port, upstream, guard):
        tally = attacks.Tally()
        asyncio.run(attacks.slow_sender(("127.0.0.1", port), "127.0.0.2", mode, 20, tally))
        assert tally.counts == {"408": 1} and tally.held_seconds[0] < 8, (tally, mode)
        if mode != "headers":  # the body had started to flow upstream: that request is aborted
            wait_until(lambda: upstream.requests and upstream.requests[0]["disconnected"])
            assert upstream.requests[0]["bytes"] <= 100
        else:
            assert upstream.requests == []
        assert guard.refusals.counts == {"408-headers" if mode == "headers" else "408": 1}


def test_a_slow_upstream_and_an_idle_keep_alive_connection_are_not_cut_off():
    with proxy(client_timeout=1.0) as (port, upstream, guard):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            assert client.post("/v1/fleet/slow-answer", content=b"x").status_code == 200  # 2.5 s > the timeout
            time.sleep(0.5)  # within the timeout (and uvicorn's 5 s keep-alive): the same connection
            assert client.post("/v1/fleet/pull-messages", content=b"y").status_code == 200
        assert guard.refusals.counts == {} and len(upstream.requests) == 2


def test_the_limits_hold_on_tls_as_on_plain_http(tmp_path):
    import ssl
    import subprocess

    certs = tmp_path / "certs"
    subprocess.run([str(Path(__file__).resolve().parents[1] / "deploy" / "make-certs.sh"), "--out", str(certs),
                    "localhost"], check=True, capture_output=True, timeout=120)
    tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with proxy(certs, client_timeout=1.5, max_connections=1) as (port, upstream, guard):
        target = ("127.0.0.1", port)

        async def go():
            reader, writer = await attacks.connect(target, "127.0.0.2", tls)
            writer.write(post())
            ok = await attacks.read_response(reader)
            refused = attacks.Tally()  # a second connection from 127.0.0.2 while the first stays open
            await attacks.big_body(target, "127.0.0.2", 10, False, refused, tls)
            attacks.close(writer)
            big, slow = attacks.Tally(), attacks.Tally()
            await attacks.big_body(target, "127.0.0.3", 100 * LIMIT, True, big, tls)
            await attacks.slow_sender(target, "127.0.0.4", "headers", 20, slow, tls=tls)
            return ok[0], refused.counts, big.counts, slow

        status, refused, big, slow = asyncio.run(go())
        assert status == 200 and refused == {"429 connections": 1} and big == {"413": 1}
        assert slow.counts == {"408": 1} and slow.held_seconds[0] < 8
        wait_until(lambda: upstream.requests[-1]["disconnected"])
        assert upstream.requests[-1]["bytes"] <= LIMIT and not upstream.requests[-1]["complete"]


# -- the log -------------------------------------------------------------------------------------------------
def test_refusals_are_logged_once_per_address_kind_and_interval(caplog):
    now = [100.0]
    guard = Guard.create(Limits(rate=0.001, burst=1, log_interval=60.0), clock=lambda: now[0])
    app = create_app("http://superlink.test", guard=guard, transport=httpx.ASGITransport(app=Upstream()))

    async def calls(peer: str, n: int) -> list[int]:
        transport = httpx.ASGITransport(app=app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
            return [(await client.post("/v1/fleet/pull-messages", content=b"x")).status_code for _ in range(n)]

    with caplog.at_level(logging.WARNING, logger="nearl.proxy"):
        assert asyncio.run(calls("198.51.100.1", 21)) == [200] + [429] * 20
        assert asyncio.run(calls("198.51.100.2", 3)) == [200, 429, 429]
        now[0] += 61
        assert asyncio.run(calls("198.51.100.1", 1)) == [429]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "from 198.51.100.1:40000 (429: over 0.001 requests/s" in lines[0] and "more like it" not in lines[0]
    assert "198.51.100.2" in lines[1]
    assert lines[2].endswith("; 19 more like it from 198.51.100.1 in the last 60s")
    assert guard.refusals.counts == {"429": 23}
    assert "by status: 429 23" in guard.summary() and "forwarded 2 requests" in guard.summary()


# -- flags ---------------------------------------------------------------------------------------------------
def test_the_limits_travel_from_nearl_server_to_the_proxy_flag_for_flag():
    from server.cli import build_parser as server_parser

    custom = Limits(max_body_bytes=1_598_128, rate=2.5, burst=7, max_connections=3, client_timeout=4.0)
    for limits in (Limits(), custom):
        args = build_parser().parse_args(["--listen", "127.0.0.1:1", "--upstream", "http://x", *limits.to_args()])
        assert Limits.from_args(args) == limits
    server_args = server_parser().parse_args([])
    assert server_args.max_body_mb is None  # derived from the run's config unless given
    assert Limits.from_args(server_args, max_body_bytes=Limits().max_body_bytes) == Limits()
    cmd = fleet_proxy_command(host="0.0.0.0", port=9092, upstream_port=9093, certs=None, limits=custom.to_args())
    assert cmd[cmd.index("--rate-burst") + 1] == "7" and cmd[cmd.index("--max-body-mb") + 1] == "1.598128"


# -- the body limit of a run --------------------------------------------------------------------------------
def test_the_body_limit_is_the_largest_message_times_the_margin_plus_the_allowance():
    from nearl_protocol.secagg import EXTRA_SLOTS
    from server.body_bound import SECAGG_EXTRA_SLOTS, body_limit, largest_message_bytes
    from server.proxy import BODY_ALLOWANCE, BODY_MARGIN

    schema = {"a": ((1000,), "float32"), "b": ((2, 5), "float32")}
    assert largest_message_bytes(schema, "float32", False) == 4040
    assert largest_message_bytes(schema, "fp16", False) == largest_message_bytes(schema, "bf16", False) == 2020
    assert largest_message_bytes(schema, "fp16", True) == 4 * (1010 + EXTRA_SLOTS)  # masked: uint32 whatever the dtype
    assert SECAGG_EXTRA_SLOTS == EXTRA_SLOTS
    assert body_limit(4040) == 6060 + BODY_ALLOWANCE and (BODY_MARGIN, BODY_ALLOWANCE) == (1.5, 2**20)


def test_nearl_server_takes_max_body_mb_as_given_and_refuses_an_unusable_limit(tmp_path):
    from nearl_core.errors import NearlError
    from server.body_bound import LimitsResolver
    from server.cli import build_parser as server_parser

    def resolve(*flags: str):
        return LimitsResolver(server_parser().parse_args(list(flags)), tmp_path / "unused.yaml", "float32",
                              False).result()  # with --max-body-mb no model is built

    limits, note = resolve("--max-body-mb", "2.5", "--rate-limit", "0")
    assert (limits.max_body_bytes, limits.rate, note) == (2_500_000, 0.0, "--max-body-mb")
    with pytest.raises(NearlError, match=r"^--max-body-mb 0.0001 is below 1 kB: no Fleet call fits$"):
        resolve("--max-body-mb", "0.0001")
    with pytest.raises(NearlError, match=r"^--rate-limit, --max-connections and --client-timeout must be 0 or more"):
        resolve("--max-body-mb", "2", "--max-connections", "-1")


def test_a_config_the_body_limit_cannot_be_derived_from_is_refused_in_one_line(tmp_path):
    from nearl_core.errors import NearlError
    from server.body_bound import measure_in_child

    (tmp_path / "bad.yaml").write_text("adapter:\n  nonsense: 3\n")
    with pytest.raises(NearlError, match=r"^cannot derive the body limit from the config \(body_bound: error: .*"
                                         r"nonsense.*\); fix the config or pass --max-body-mb$"):
        measure_in_child(str(tmp_path / "bad.yaml"), "float32", False)
