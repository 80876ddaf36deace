"""The coordinator's public port: a reverse proxy that forwards the Fleet API and nothing else.

Flower 1.42's SuperLink serves three APIs on one HTTP port: the Fleet API (``/v1/fleet/...``,
what SuperNodes call), the Control API (``/v1/control/...``: ``flwr run/ls/log/stop``) and
the Runtime API (``/v1/runtime/...``: the ServerApp's channel). SuperNode authentication
covers the Fleet API only, so whoever reaches that port with the CA certificate could submit
a foreign app that then runs at every site, or stop the federation. ``nearl-server`` therefore
binds the SuperLink to 127.0.0.1 and puts this proxy on the public address: it forwards
``POST /v1/fleet/<name>`` and ``GET/HEAD /health`` with headers and bodies untouched (the
SuperLink still checks each SuperNode's signature) and answers everything else with 403,
logging the path and the peer. TLS for the sites terminates here.

    python -m server.proxy --listen HOST:PORT --upstream https://127.0.0.1:PORT
        [--certfile server.pem --keyfile server.key --ca ca.crt]
"""

from __future__ import annotations

import argparse
import logging
import re
import ssl
import sys
from typing import AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("nearl.proxy")

# A Fleet call is one path segment of lower-case words (register-node, pull-messages, ...):
# no dots, slashes or encodings that a server behind us could read differently.
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
HEALTH_PATH = "/health"
# RFC 9110 hop-by-hop headers (they describe one connection, not the message), plus the
# ones the client library sets from the URL and the body it sends.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade", "host"})
REFUSED_TEXT = "forbidden: this port serves the Flower Fleet API only\n"


def allowed(method: str, path: str) -> bool:
    """Whether ``method path`` is a SuperNode's call (or a health probe)."""
    if FLEET_PATH.fullmatch(path):
        return method == "POST"
    return path == HEALTH_PATH and method in ("GET", "HEAD")


def _printable(text: str, limit: int = 200) -> str:
    """A request path as one safe log token (a peer chooses it: no newlines or escapes reach the log)."""
    return text[:limit].encode("unicode_escape").decode("ascii") + ("..." if len(text) > limit else "")


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown peer"


def create_app(upstream: str, *, verify: ssl.SSLContext | bool = True, timeout: float = 120.0,
               transport: httpx.AsyncBaseTransport | None = None) -> ASGIApp:
    """The proxy as an ASGI app; ``upstream`` is the SuperLink's base URL (``https://127.0.0.1:PORT``).

    ``transport`` replaces the network (tests hand in an in-process upstream app).
    """
    client = httpx.AsyncClient(verify=verify, follow_redirects=False, transport=transport)
    upstream = upstream.rstrip("/")
    timeouts = httpx.Timeout(timeout, connect=10.0).as_dict()

    async def forward(request: Request) -> Response:
        method, path = request.method, request.scope["path"]
        if not allowed(method, path):
            log.warning("refused %s %s from %s (403: not the Fleet API)", method, _printable(path), _peer(request))
            return PlainTextResponse(REFUSED_TEXT, status_code=403)
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        query = request.scope.get("query_string", b"")
        url = f"{upstream}{path}" + (f"?{query.decode('latin-1')}" if query else "")
        body = _body(request) if method == "POST" else None
        # httpx.Request, not client.build_request: no default headers (Accept-Encoding, User-Agent) added
        outgoing = httpx.Request(method, url, headers=headers, content=body, extensions={"timeout": timeouts})
        try:
            answer = await client.send(outgoing, stream=True)
        except httpx.TimeoutException:
            log.warning("%s %s from %s: the SuperLink did not answer in time (504)", method, path, _peer(request))
            return PlainTextResponse("gateway timeout: the SuperLink did not answer\n", status_code=504)
        except httpx.HTTPError as err:
            log.warning("%s %s from %s: SuperLink unreachable: %s (502)", method, path, _peer(request), err)
            return PlainTextResponse("bad gateway: the SuperLink is not reachable\n", status_code=502)
        response = StreamingResponse(answer.aiter_raw(), status_code=answer.status_code,
                                     background=BackgroundTask(answer.aclose))
        # the SuperLink's headers as they came (content-length and -encoding match the raw bytes)
        response.raw_headers = [(k, v) for k, v in answer.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        return response

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # Every request reaches ``forward`` (a router would answer odd paths itself, unlogged).
        if scope["type"] == "http":
            response = await forward(Request(scope, receive))
            await response(scope, receive, send)
        elif scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})

    return app


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


def upstream_context(ca: str) -> ssl.SSLContext:
    """Verify the loopback SuperLink with the federation CA (its certificate always covers 127.0.0.1)."""
    return ssl.create_default_context(cafile=ca)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="public address (sites connect here)")
    p.add_argument("--upstream", required=True, metavar="URL", help="the SuperLink, e.g. https://127.0.0.1:9093")
    p.add_argument("--certfile", help="TLS certificate for the public port (omit for no TLS)")
    p.add_argument("--keyfile", help="its private key")
    p.add_argument("--ca", help="CA certificate that verifies an https upstream")
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or bool(args.certfile) != bool(args.keyfile):
        print(f"proxy: error: --listen {args.listen}: give HOST:PORT, and --certfile with --keyfile", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="nearl-server proxy: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded call is noise
    verify: ssl.SSLContext | bool = upstream_context(args.ca) if args.ca else True
    app = create_app(args.upstream, verify=verify)
    uvicorn.run(app, host=host.strip("[]"), port=int(port), ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
                log_level="warning", access_log=False, server_header=False, date_header=False,
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
