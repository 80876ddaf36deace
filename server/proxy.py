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

It also bounds what one client address can make it do (server/proxy_guard.py): bodies
over the federation's largest message (413, before they reach the SuperLink), more than
``rate`` requests a second beyond a ``burst`` or more than ``max_connections`` open
connections (429), headers slower than ``client_timeout`` or a body that pauses longer or
then averages under ``min_body_rate`` (408).

    python -m server.proxy --listen HOST:PORT --upstream https://127.0.0.1:PORT
        [--certfile server.pem --keyfile server.key --ca ca.crt] [--max-body-mb MB] [--rate-limit R] ...
"""

from __future__ import annotations

import argparse
import logging
import re
import ssl
import sys
from dataclasses import dataclass, fields

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from server.proxy_conn import guarded_protocol
from server.proxy_guard import BodyTooLarge, ClientGone, Guard, SlowSender, limited_body

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

# The body limit of a run: its largest legitimate message (the adapter payload in the transport
# dtype, or the masked uint32 vector of secure aggregation) times BODY_MARGIN plus BODY_ALLOWANCE
# for what travels with it (protobuf framing, metrics, configs, a secure round's keys and shares).
BODY_MARGIN = 1.5
BODY_ALLOWANCE = 2**20
MB = 1e6


@dataclass(frozen=True)
class Limits:
    """What one client address may do on the public port; the one definition of every default.

    Legitimate sites poll every 3 s, send a heartbeat every 30 s and, when a message moves,
    a handful of object calls at once; they keep one or two connections open (two demo sites
    behind one address used at most 21 of the burst in a round). The defaults
    leave several times that headroom, for a consortium of a few hundred sites each behind
    its own address. 0 turns a rate, connection or time limit off.
    """

    max_body_bytes: int = 16 * 2**20  # nginx's client_max_body_size; nearl-server derives the run's own
    rate: float = 10.0  # requests per second per address, on average
    burst: int = 100  # requests per address at once
    max_connections: int = 32  # open connections per address
    client_timeout: float = 30.0  # seconds for a request's headers, and the longest pause inside a body
    min_body_rate: float = 1000.0  # bytes/s a body must average once client_timeout has passed
    log_interval: float = 60.0  # seconds between two log lines about one address and kind of refusal

    def to_args(self) -> list[str]:
        """The proxy command's flags for these limits (nearl-server starts the proxy with them)."""
        return ["--max-body-mb", repr(self.max_body_bytes / MB), "--rate-limit", repr(self.rate),
                "--rate-burst", str(self.burst), "--max-connections", str(self.max_connections),
                "--client-timeout", repr(self.client_timeout)]

    @classmethod
    def from_args(cls, args: argparse.Namespace, max_body_bytes: int | None = None) -> "Limits":
        body = max_body_bytes if max_body_bytes is not None else round(args.max_body_mb * MB)
        return cls(max_body_bytes=body, rate=args.rate_limit, burst=args.rate_burst,
                   max_connections=args.max_connections, client_timeout=args.client_timeout)

    def describe(self) -> str:
        """What gets refused, in one line for the start-up output."""
        rate = f"over {self.rate:g} requests/s after a burst of {self.burst}" if self.rate > 0 else ""
        conns = f"over {self.max_connections} open connections" if self.max_connections > 0 else ""
        per_address = " or ".join(x for x in (rate, conns) if x)
        slow = (f"; headers slower than {self.client_timeout:g}s, body pauses over {self.client_timeout:g}s or under "
                f"{self.min_body_rate:g} bytes/s after that (408)" if self.client_timeout > 0 else "")
        return (f"bodies over {self.max_body_bytes / MB:.2f} MB (413)"
                + (f"; per client address {per_address} (429)" if per_address else "") + slow)


DEFAULTS = {f.name: f.default for f in fields(Limits)}


def add_limit_flags(p: argparse.ArgumentParser, *, body_default: float | None) -> None:
    """The limits' flags, shared by nearl-server and this module's command (defaults from :class:`Limits`)."""
    body = (f"derived from the run's config: its largest message x {BODY_MARGIN:g} + {BODY_ALLOWANCE / 2**20:g} MiB"
            if body_default is None else f"default {body_default:g}")
    p.add_argument("--max-body-mb", type=float, default=body_default, metavar="MB",
                   help=f"refuse Fleet requests with a larger body with 413 ({body})")
    p.add_argument("--rate-limit", type=float, default=DEFAULTS["rate"], metavar="R",
                   help=f"requests per second per client address on the public port (default {DEFAULTS['rate']:g}; "
                        "429 beyond; 0: off, e.g. behind nginx, which limits per client itself)")
    p.add_argument("--rate-burst", type=int, default=DEFAULTS["burst"], metavar="N",
                   help=f"requests one address may make at once before the rate applies (default {DEFAULTS['burst']})")
    p.add_argument("--max-connections", type=int, default=DEFAULTS["max_connections"], metavar="N",
                   help=f"open connections per client address (default {DEFAULTS['max_connections']}; 0: off)")
    p.add_argument("--client-timeout", type=float, default=DEFAULTS["client_timeout"], metavar="S",
                   help=f"seconds a client may take for a request's headers or pause inside its body; after "
                        f"them a body must average {DEFAULTS['min_body_rate']:g} bytes/s (default "
                        f"{DEFAULTS['client_timeout']:g}; 408 and closed beyond; 0: off)")


def limits_problem(limits: Limits) -> str | None:
    """Why these limits cannot run, or None."""
    if limits.max_body_bytes < 1024:
        return f"--max-body-mb {limits.max_body_bytes / MB:g} is below 1 kB: no Fleet call fits"
    if min(limits.rate, limits.max_connections, limits.client_timeout) < 0 or limits.burst < 1:
        return "--rate-limit, --max-connections and --client-timeout must be 0 or more, --rate-burst at least 1"
    return None


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


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def refusal(status: int, text: str) -> Response:
    """A refusal closes the connection: an unread body must not be taken for the next request."""
    headers = {"connection": "close", **({"retry-after": "1"} if status == 429 else {})}
    return PlainTextResponse(text, status_code=status, headers=headers)


def create_app(upstream: str, *, limits: Limits | None = None, guard: Guard | None = None,
               verify: ssl.SSLContext | bool = True, timeout: float = 120.0,
               transport: httpx.AsyncBaseTransport | None = None) -> ASGIApp:
    """The proxy as an ASGI app; ``upstream`` is the SuperLink's base URL (``https://127.0.0.1:PORT``).

    ``guard`` holds the limits' state (made from ``limits`` when not given; the connection
    protocol shares it); ``transport`` replaces the network (tests hand in an in-process upstream app).
    """
    guard = guard or Guard.create(limits or Limits())
    client = httpx.AsyncClient(verify=verify, follow_redirects=False, transport=transport)
    upstream = upstream.rstrip("/")
    timeouts = httpx.Timeout(timeout, connect=10.0).as_dict()

    def refuse(request: Request, status: int, why: str, text: str) -> Response:
        line = f"refused {request.method} {_printable(request.scope['path'])} from {_peer(request)} ({status}: {why})"
        guard.refusals.refused(str(status), request.client.host if request.client else "unknown", line)
        return refusal(status, text)

    def failed(request: Request, status: int, why: str, text: str) -> Response:
        """The SuperLink failed a request: logged like a refusal (once per address and interval)."""
        line = f"{request.method} {_printable(request.scope['path'])} from {_peer(request)}: {why} ({status})"
        guard.refusals.refused(str(status), request.client.host if request.client else "unknown", line)
        return PlainTextResponse(text, status_code=status)

    def screen(request: Request) -> Response | None:
        """The refusals decided from the request line and headers alone, cheapest first."""
        address = request.client.host if request.client else "unknown"
        if not guard.rate.allow(address):
            return refuse(request, 429, f"over {guard.limits.rate:g} requests/s from this address",
                          "too many requests from this address\n")
        if not allowed(request.method, request.scope["path"]):
            return refuse(request, 403, "not the Fleet API", REFUSED_TEXT)
        declared = _declared_length(request)
        if declared is not None and declared > guard.limits.max_body_bytes:
            return refuse(request, 413, f"Content-Length {declared:,} over {guard.limits.max_body_bytes:,} bytes",
                          "content too large for this federation\n")
        return None

    async def forward(request: Request) -> Response:
        refused = screen(request)
        if refused is not None:
            return refused
        method, path = request.method, request.scope["path"]
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        query = request.scope.get("query_string", b"")
        url = f"{upstream}{path}" + (f"?{query.decode('latin-1')}" if query else "")
        body = limited_body(request.receive, guard) if method == "POST" else None
        # httpx.Request, not client.build_request: no default headers (Accept-Encoding, User-Agent) added
        outgoing = httpx.Request(method, url, headers=headers, content=body, extensions={"timeout": timeouts})
        try:
            answer = await client.send(outgoing, stream=True)
        except BodyTooLarge as err:
            return refuse(request, 413, f"body passed {guard.limits.max_body_bytes:,} bytes at {err.args[0]:,}; "
                          "upstream request aborted", "content too large for this federation\n")
        except SlowSender as err:
            return refuse(request, 408, f"body too slow: {err.args[0]:,} bytes in {err.args[1]:.0f}s; upstream "
                          "request aborted", "request body too slow\n")
        except ClientGone:
            return refusal(400, "client disconnected\n")
        except httpx.TimeoutException:
            return failed(request, 504, "the SuperLink did not answer in time",
                          "gateway timeout: the SuperLink did not answer\n")
        except httpx.HTTPError as err:
            return failed(request, 502, f"SuperLink unreachable: {err}", "bad gateway: the SuperLink is not reachable\n")
        guard.forwarded += 1
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
            log.info("%s", guard.summary())
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})

    return app


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
    add_limit_flags(p, body_default=DEFAULTS["max_body_bytes"] / MB)
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    args = build_parser().parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or bool(args.certfile) != bool(args.keyfile):
        print(f"proxy: error: --listen {args.listen}: give HOST:PORT, and --certfile with --keyfile", file=sys.stderr)
        return 2
    limits = Limits.from_args(args)
    if (problem := limits_problem(limits)) is not None:
        print(f"proxy: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="nearl-server proxy: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded call is noise
    verify: ssl.SSLContext | bool = upstream_context(args.ca) if args.ca else True
    guard = Guard.create(limits)
    app = create_app(args.upstream, guard=guard, verify=verify)
    # h11, not httptools: h11 caps a request's headers at 16 KiB, httptools buffers any amount
    uvicorn.run(app, host=host.strip("[]"), port=int(port), ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
                http=guarded_protocol(H11Protocol, guard), ws="none", log_level="warning", access_log=False,
                server_header=False, date_header=False, timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
