"""The site console's web app (Starlette): one page, its stylesheet, and the two decisions.

Who may use it (:class:`Guard`, in front of every request, static files included):

* bound to loopback (the default), no token: the request's ``Host`` must be a loopback
  name (a page on another site that re-points its own name at 127.0.0.1, DNS rebinding,
  is refused), and a POST must come from the console's own origin (its ``Origin``, or
  without one its ``Referer``): another site's page cannot press the buttons (CSRF);
* bound to any other address, a token: every request without it is refused with 401.  A
  GET may carry it in the query (the URL ``nearl-client console`` prints; the page then
  sets it as an HttpOnly, SameSite=Strict cookie), the cookie or an ``Authorization:
  Bearer`` header; a POST must carry it explicitly (the forms post to ``?token=``, or the
  header), never by the cookie alone, and from the console's own origin.

Every response forbids scripts, frames and outside resources (Content-Security-Policy).
The buttons call :func:`client.approvals.approve` and :func:`client.approvals.refuse`, the
same functions as ``nearl-client approve`` / ``refuse``.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from client import audit
from client.approvals import approve, refuse
from client.console.page import h, render
from client.console.readers import read_view
from client.console.style import CSS
from nearl_core.errors import NearlError

COOKIE = "nearl_console_token"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
                                      "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
           "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin",
           "Cache-Control": "no-store"}
MAX_BODY = 16_384  # a decision's form is a few bytes


@dataclass(frozen=True)
class ConsoleSettings:
    state_dir: Path
    token: str | None  # None: loopback only, no token


def _host_name(host_header: str) -> str:
    """``127.0.0.1:8765`` -> ``127.0.0.1``; ``[::1]:8765`` -> ``[::1]``."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _same_origin(request: Request, *, required: bool) -> bool:
    """The request's ``Origin`` (else ``Referer``) is this console's own; ``required``: one must be there."""
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        referer = request.headers.get("referer")
        if referer is None:
            return not required and origin is None
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    return bool(host) and origin in (f"http://{host}", f"https://{host}")


def _given_token(request: Request, *, cookie: bool) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return (request.query_params.get("token") or request.headers.get("x-nearl-token")
            or (request.cookies.get(COOKIE) if cookie else None))


class Guard:
    """ASGI middleware: the token or loopback checks of the module docstring, then the security headers."""

    def __init__(self, app: Any, settings: ConsoleSettings):
        self.app, self.settings = app, settings

    def problem(self, request: Request) -> tuple[int, str] | None:
        post = request.method not in ("GET", "HEAD")
        token = self.settings.token
        if token is None:
            if _host_name(request.headers.get("host", "")) not in LOOPBACK_NAMES:
                return 403, "403: this console answers loopback names only (open http://127.0.0.1:PORT/)"
            if post and not _same_origin(request, required=True):
                return 403, "403: a decision must come from the console's own page (cross-site request refused)"
            return None
        given = _given_token(request, cookie=not post)
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            if post and request.cookies.get(COOKIE):
                return 403, "403: a decision must carry the console's token itself, not only its cookie"
            return 401, ("401: this console needs its token: open the URL nearl-client console printed "
                         "(the token is in the console-token file of the site's state dir)")
        if post and not _same_origin(request, required=False):
            return 403, "403: a decision must come from the console's own page (cross-site request refused)"
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
            await send(message)

        problem = self.problem(Request(scope))
        if problem is not None:
            await PlainTextResponse(problem[1], status_code=problem[0])(scope, receive, with_headers)
            return
        await self.app(scope, receive, with_headers)


def _back(settings: ConsoleSettings, **params: str) -> str:
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    token = f"&token={quote(settings.token, safe='')}" if settings.token else ""
    return f"/?{query}{token}#approvals"


def _message(status: int, text: str, settings: ConsoleSettings) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><meta charset=utf-8><title>{status}</title><p>{h(text)}</p>"
                        f'<p><a href="{h(_back(settings))}">back to the console</a></p>', status_code=status)


def create_app(settings: ConsoleSettings) -> Any:
    """The console for one state dir, guarded."""

    async def page(request: Request) -> Response:
        view = read_view(settings.state_dir)
        done, run = request.query_params.get("done"), request.query_params.get("run")
        flash = {"approved": f"run {run} approved: its next round trains",
                 "refused": f"run {run} refused: its later messages are answered with your reason"}.get(done or "", "")
        response = HTMLResponse(render(view, token=settings.token, flash=flash,
                                       audit_runs=audit.summarise(reversed(view.messages))))
        if settings.token and request.query_params.get("token"):
            response.set_cookie(COOKIE, settings.token, httponly=True, samesite="strict")
        return response

    async def stylesheet(request: Request) -> Response:
        return Response(CSS, media_type="text/css")

    async def decide(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return _message(413, "the form is too large", settings)
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        run, action = request.path_params["run"], request.path_params["action"]
        if action not in ("approve", "refuse"):
            return _message(404, f"no such decision {action!r}: approve or refuse", settings)
        try:
            if action == "approve":
                approve(settings.state_dir, run, by="console")
            else:
                refuse(settings.state_dir, run, form.get("reason", ""), by="console")
        except NearlError as err:
            return _message(409, str(err), settings)
        return RedirectResponse(_back(settings, done=f"{action}d", run=run), status_code=303)

    app = Starlette(routes=[Route("/", page, methods=["GET"]),
                            Route("/static/console.css", stylesheet, methods=["GET"]),
                            Route("/runs/{run}/{action}", decide, methods=["POST"])])
    return Guard(app, settings)
