"""The public-port proxy (server/proxy.py) against a tiny in-process upstream.

Checked: Fleet calls and health reach the upstream with body and headers byte for byte
(the SuperNode signature headers included) and come back unchanged; the Control API, the
Runtime API, unknown paths, path tricks and wrong methods are refused with 403, logged with
path and peer, and never reach the upstream; an upstream that is down gives 502.
"""

from __future__ import annotations

import asyncio
import logging
import os

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nearl_protocol.processes import free_port
from server.proxy import allowed, create_app

PEER = ("203.0.113.7", 40123)


def upstream_app(seen: list[dict]) -> Starlette:
    """Records every request it gets and answers with a body derived from it."""

    async def any_path(request: Request) -> Response:
        body = await request.body()
        seen.append({"method": request.method, "path": request.url.path, "body": body,
                     "headers": [(k.decode(), v.decode()) for k, v in request.headers.raw]})
        return Response(b"\x00answer:" + body[::-1], status_code=200, media_type="application/protobuf",
                        headers={"x-upstream": "yes"})

    return Starlette(routes=[Route("/{rest:path}", any_path, methods=["GET", "HEAD", "POST", "PUT", "DELETE"])])


def call(method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None,
         upstream: str = "http://superlink.test", seen: list[dict] | None = None) -> httpx.Response:
    transport = None if seen is None else httpx.ASGITransport(app=upstream_app(seen))
    proxy = create_app(upstream, transport=transport)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy, client=PEER),
                                     base_url="http://proxy.test") as client:
            return await client.request(method, path, content=body, headers=headers)

    return asyncio.run(go())


def test_fleet_calls_are_forwarded_byte_for_byte_with_their_headers():
    seen: list[dict] = []
    body = os.urandom(4096) + b"\r\n\x00"
    auth = {"content-type": "application/protobuf", "accept": "application/protobuf",
            "flwr-public-key": "AAAA+/==", "flwr-signature": "c2lnbmF0dXJl", "flwr-timestamp": "2026-01-01T00:00:00"}
    res = call("POST", "/v1/fleet/pull-messages", body=body, headers=auth, seen=seen)
    assert res.status_code == 200 and res.content == b"\x00answer:" + body[::-1]
    assert res.headers["x-upstream"] == "yes" and res.headers["content-type"] == "application/protobuf"
    (got,) = seen
    assert got["method"] == "POST" and got["path"] == "/v1/fleet/pull-messages" and got["body"] == body
    # exactly the client's end-to-end headers, in order, nothing added (Host names the upstream; Connection
    # describes the client's own connection)
    client_sent = [(k.decode().lower(), v.decode()) for k, v in res.request.headers.raw
                   if k.lower() not in (b"host", b"connection")]
    assert [h for h in got["headers"] if h[0] != "host"] == client_sent
    assert set(auth.items()) <= set(client_sent)


def test_health_is_forwarded():
    seen: list[dict] = []
    assert call("GET", "/health", seen=seen).status_code == 200
    assert call("HEAD", "/health", seen=seen).status_code == 200
    assert [(s["method"], s["path"]) for s in seen] == [("GET", "/health"), ("HEAD", "/health")]


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/control/start-run"),            # flwr run
    ("POST", "/v1/control/stop-run"),             # flwr stop
    ("POST", "/v1/control/list-runs"),            # flwr ls
    ("POST", "/v1/runtime/pull-messages"),        # the ServerApp's channel
    ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/"),
    ("POST", "/v1/fleet/../control/stop-run"),    # dot segments
    ("POST", "/v1/fleet/%2e%2e/control/stop-run"),
    ("POST", "/v1/fleet/pull-messages/../../control/stop-run"),
    ("POST", "/v1/fleet//pull-messages"),
    ("POST", "/v1/fleet/"),
    ("POST", "/v1/Fleet/pull-messages"),
    ("GET", "/v1/fleet/pull-messages"),           # Fleet calls are POST only
    ("POST", "/health"),
    ("DELETE", "/v1/fleet/pull-messages"),
])
def test_everything_else_is_refused_logged_and_never_reaches_the_upstream(method, path, caplog):
    seen: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="nearl.proxy"):
        res = call(method, path, body=b"x" if method == "POST" else b"", seen=seen)
    assert res.status_code == 403 and "Fleet API only" in res.text
    assert seen == []
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"refused {method} /v1/") or line.startswith(f"refused {method} /"), line
    assert "from 203.0.113.7:40123" in line


def test_a_path_cannot_inject_lines_into_the_log(caplog):
    with caplog.at_level(logging.WARNING, logger="nearl.proxy"):
        call("GET", "/x%0Afake%20line", seen=[])
    (record,) = caplog.records
    assert "\n" not in record.getMessage() and "\\n" in record.getMessage()


def test_an_upstream_that_is_down_gives_502():
    res = call("POST", "/v1/fleet/send-node-heartbeat", body=b"hb", upstream=f"http://127.0.0.1:{free_port()}")
    assert res.status_code == 502 and "not reachable" in res.text


def test_allowed_is_an_allowlist():
    assert allowed("POST", "/v1/fleet/register-node") and allowed("HEAD", "/health")
    assert not allowed("POST", "/v1/fleet/register-node/") and not allowed("POST", "/v1/fleet/a.b")
    assert not allowed("POST", "/v1/control/start-run") and not allowed("GET", "/health/x")
