"""deploy/nginx/nearl-fleet.conf enforces the built-in proxy's limits, for real (nginx on loopback).

nginx runs the shipped config as one foreground process, with only what a test must change:
free loopback ports, the certificates from deploy/make-certs.sh, the upstream pointed at a
recording HTTPS server (tests/test_proxy_limits.py's) and the client timeouts shortened from
30 s to 2 s. Checked, each from its own loopback address: 413 by Content-Length before
anything reaches the upstream and 413 for a chunked body at 16 MiB; 429 once an address's
burst is spent and for requests beyond its 32 in progress; a slow sender cut off.
nginx's ``limit_conn`` counts connections with a request in progress (the built-in proxy
counts open connections): both bound what one address holds at once.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from nearl_protocol.processes import free_port
from server.proxy import Limits
from tests.test_proxy_limits import Upstream, serving, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import flood_attacks as attacks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")


def site_config(text: str, certs: Path, port: int, health: int, upstream: int) -> str:
    rewritten = (text.replace("nearl-coordinator:9092", f"127.0.0.1:{upstream}")
                 .replace("listen 9092 ssl;", f"listen 127.0.0.1:{port} ssl;")
                 .replace("listen 127.0.0.1:8081;", f"listen 127.0.0.1:{health};")
                 .replace("/etc/nginx/certs", str(certs))
                 .replace("client_header_timeout    30s;", "client_header_timeout    2s;")
                 .replace("client_body_timeout      30s;", "client_body_timeout      2s;"))
    assert rewritten.count("2s;") == 2 and str(upstream) in rewritten, "the shipped config changed: update the test"
    return rewritten


@pytest.fixture(scope="module")
def nginx(tmp_path_factory) -> Iterator[tuple[int, Upstream, ssl.SSLContext]]:
    tmp = tmp_path_factory.mktemp("nginx")
    certs = tmp / "certs"
    subprocess.run([str(ROOT / "deploy" / "make-certs.sh"), "--out", str(certs), "localhost"], check=True,
                   capture_output=True, timeout=120)
    upstream, port, health = Upstream(), free_port(), free_port()
    with serving(upstream, ssl_certfile=str(certs / "server.pem"), ssl_keyfile=str(certs / "server.key")) as up:
        (tmp / "site.conf").write_text(site_config((ROOT / "deploy/nginx/nearl-fleet.conf").read_text(), certs, port,
                                                   health, up))
        temp = " ".join(f"{k}_temp_path {tmp / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (tmp / "nginx.conf").write_text(
            f"daemon off; master_process off; pid {tmp / 'nginx.pid'}; error_log {tmp / 'error.log'} warn;\n"
            f"events {{}}\nhttp {{ access_log off; {temp} include {tmp / 'site.conf'}; }}\n")
        proc = subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf")], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not _open(port):
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "nginx did not open its port"
                time.sleep(0.1)
            yield port, upstream, ssl.create_default_context(cafile=str(certs / "ca.crt"))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def _open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def client(port: int, tls: ssl.SSLContext, source: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(verify=tls, local_address=source, limits=httpx.Limits(max_connections=64))
    return httpx.AsyncClient(transport=transport, base_url=f"https://127.0.0.1:{port}", timeout=30)


def test_nginx_refuses_a_declared_body_over_the_limit_before_it_reaches_the_coordinator(nginx):
    port, upstream, tls = nginx
    before = len(upstream.requests)

    async def go():
        reader, writer = await attacks.connect(("127.0.0.1", port), "127.0.0.21", tls)
        writer.write(attacks.request_head("/v1/fleet/push-messages", 400 * 10**6))
        answer = await attacks.read_response(reader)
        attacks.close(writer)
        return answer

    status, _ = asyncio.run(go())
    assert status == 413 and len(upstream.requests) == before


def test_nginx_cuts_a_chunked_body_at_the_limit(nginx):
    port, upstream, tls = nginx
    before, tally = len(upstream.requests), attacks.Tally()
    status = asyncio.run(attacks.big_body(("127.0.0.1", port), "127.0.0.22", 40 * 2**20, True, tally, tls))
    assert status == 413, status
    wait_until(lambda: all(r["complete"] or r["disconnected"] for r in upstream.requests[before:]))
    assert all(not r["complete"] and r["bytes"] <= Limits().max_body_bytes for r in upstream.requests[before:])


def test_nginx_limits_the_request_rate_per_address(nginx):
    port, upstream, tls = nginx

    async def go(source: str, n: int) -> tuple[list[int], float]:
        start = time.monotonic()
        async with client(port, tls, source) as c:
            codes = [(await c.post("/v1/fleet/pull-messages", content=b"x")).status_code for _ in range(n)]
        return codes, time.monotonic() - start

    codes, seconds = asyncio.run(go("127.0.0.23", 250))
    limits = Limits()
    allowed = codes.count(200)
    assert set(codes) == {200, 429} and allowed >= limits.burst, codes
    assert allowed <= limits.burst + 1 + limits.rate * seconds + 1, (allowed, seconds)
    assert asyncio.run(go("127.0.0.24", 1))[0] == [200]  # another address has its own bucket


def test_nginx_limits_the_requests_in_progress_per_address(nginx):
    port, upstream, tls = nginx

    async def go() -> list[int]:
        async with client(port, tls, "127.0.0.25") as c:
            answers = await asyncio.gather(*(c.post("/v1/fleet/slow-answer", content=b"x") for _ in range(40)))
        return [a.status_code for a in answers]

    codes = asyncio.run(go())
    assert codes.count(200) <= Limits().max_connections and codes.count(429) >= 40 - Limits().max_connections, codes


@pytest.mark.parametrize("mode", ["headers", "stall"])
def test_nginx_cuts_off_a_slow_sender(nginx, mode):
    port, upstream, tls = nginx
    tally = attacks.Tally()
    asyncio.run(attacks.slow_sender(("127.0.0.1", port), "127.0.0.26", mode, 20, tally, tls=tls))
    assert tally.held_seconds[0] < 8 and "still open at the deadline" not in tally.counts, tally
