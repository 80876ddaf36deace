"""The site console: what the page shows, escaping, the token, the same-origin rule for decisions.

In process through Starlette's test client over a state dir written by hand
(tests/console_helpers.py); then a real ``nearl-client console`` process read by a real
headless chromium.  The console during a real federation is in tests/test_site_policy_e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from client.approvals import RunBook
from client.console.app import COOKIE, ConsoleSettings, create_app
from client.console.readers import LEDGER_FILE, read_view
from client.console.serve import TOKEN_FILE, is_loopback, write_token
from nearl_protocol import processes as flower
from tests.console_helpers import NO_BROWSER, XSS, browse, chromium, write_state

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
ORIGIN = "http://127.0.0.1:8765"


def client(state: Path, token: str | None = None, base: str = ORIGIN):
    from starlette.testclient import TestClient

    return TestClient(create_app(ConsoleSettings(state, token)), base_url=base, follow_redirects=False)


@pytest.fixture
def state(tmp_path) -> Path:
    return write_state(tmp_path / "state")


def test_the_page_shows_every_part_of_the_sites_state(state):
    page = client(state).get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    for expected in ("connected", "fl.example.org:9092", "warm (backbone built)", "train: replied",  # status
                     "Approve run 77", 'action="/runs/77/approve"', "No config was approved before",  # waiting
                     "1234", "accepted", "within the site policy", "approved",  # runs and decisions
                     "adapters.oca.0.weight", "ffffffffffffffff", "4,321", "8,642 bytes in all",  # what left
                     '<svg class="ledger"', "ceiling 4", "ledger epsilon 2.500",  # privacy ledger
                     "/data/siteA", "no test images of opacity",  # the data
                     "federated", "0.720", "123,456", "654,321", "42.000"):  # the verdict
        assert expected in text, expected
    assert "Content-Security-Policy" in page.headers and "script-src" not in page.headers["Content-Security-Policy"]
    css = client(state).get("/static/console.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert not re.search(r"(src|href)=\"https?://", text), "the page loads nothing from outside"
    assert text.index("<th>train</th>") < text.index("<th>val</th>") < text.index("<th>test</th>")


def test_markup_in_what_the_coordinator_controls_is_shown_as_text(state):
    RunBook(state).note(999, site="siteA", coordinator='"><b>c</b>', server_round=1, kind="train",
                        asked={"nearl-config": {"train": {"lr": XSS}}}, status="pending", reason=XSS, by=None)
    text = client(state).get("/").text
    assert "<script>" not in text and "<img" not in text and "<b>c</b>" not in text
    assert "&lt;script&gt;alert(&quot;xss&quot;)&lt;/script&gt;" in text
    assert "&quot;&gt;&lt;b&gt;c&lt;/b&gt;" in text


def test_approve_and_refuse_buttons_call_the_same_decisions_as_the_cli(state):
    c = client(state)
    done = c.post("/runs/77/approve", headers={"Origin": ORIGIN})
    assert done.status_code == 303 and done.headers["location"].startswith("/?done=approved&run=77")
    assert "run 77 approved: its next round trains" in c.get(done.headers["location"]).text
    assert RunBook(state).get(77)["status"] == "approved"
    assert c.post("/runs/77/approve", headers={"Origin": ORIGIN}).status_code == 409  # nothing waits any more
    refused = c.post("/runs/77/refuse", headers={"Origin": ORIGIN}, content="reason=not+this+week")
    assert refused.status_code == 303
    assert RunBook(state).get(77)["reason"] == "refused by the site's operator: not this week"
    lines = [json.loads(x) for x in (state / "audit.jsonl").read_text().splitlines()]
    assert [(x["decision"], x["by"]) for x in lines if x.get("decision")][-2:] == [("approved", "console"),
                                                                                   ("refused", "console")]
    assert c.post("/runs/77/explode", headers={"Origin": ORIGIN}).status_code == 404


@pytest.mark.parametrize("headers, code", [
    ({}, 403),  # no Origin, no Referer: cannot tell where it came from
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),  # a sandboxed or file:// page
    ({"Referer": "http://evil.example/page"}, 403),
    ({"Referer": f"{ORIGIN}/"}, 303),
    ({"Origin": ORIGIN}, 303),
])
def test_on_loopback_a_decision_must_come_from_the_consoles_own_page(state, headers, code):
    assert client(state).post("/runs/77/approve", headers=headers).status_code == code
    assert RunBook(state).get(77)["status"] == ("approved" if code == 303 else "pending")


def test_on_loopback_another_host_name_is_refused(state):
    """A page whose own name was re-pointed at 127.0.0.1 (DNS rebinding) reaches the console as that name."""
    assert client(state, base="http://evil.example:8765").get("/").status_code == 403
    assert client(state, base="http://localhost:8765").get("/").status_code == 200


def test_with_a_token_every_request_without_it_is_refused(state):
    token = "t0k3n"
    c = client(state, token, base="http://10.0.0.5:8765")
    for method, path in (("get", "/"), ("get", "/static/console.css"), ("post", "/runs/77/approve"),
                         ("get", "/nothing-here"), ("get", "/?token=wrong")):
        got = getattr(c, method)(path, headers={"Origin": "http://10.0.0.5:8765"})
        assert got.status_code == 401 and "needs its token" in got.text, (method, path)
    page = c.get(f"/?token={token}")
    assert page.status_code == 200 and "Approve run 77" in page.text and f"/runs/77/approve?token={token}" in page.text
    assert COOKIE in page.headers["set-cookie"] and "httponly" in page.headers["set-cookie"].lower()
    assert c.get("/static/console.css").status_code == 200  # the cookie the page set
    assert c.get("/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    only_cookie = c.post("/runs/77/approve", headers={"Origin": "http://10.0.0.5:8765"})
    assert only_cookie.status_code == 403 and RunBook(state).get(77)["status"] == "pending"  # CSRF
    foreign = c.post(f"/runs/77/approve?token={token}", headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403
    assert c.post(f"/runs/77/approve?token={token}", headers={"Origin": "http://10.0.0.5:8765"}).status_code == 303
    assert RunBook(state).get(77)["status"] == "approved"


def test_the_token_file_is_private_and_renewed_at_each_start(tmp_path):
    first, second = write_token(tmp_path), write_token(tmp_path)
    assert first != second and (tmp_path / TOKEN_FILE).read_text().strip() == second
    assert stat.S_IMODE(os.stat(tmp_path / TOKEN_FILE).st_mode) == 0o600
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.org")


def test_an_empty_or_broken_state_dir_still_renders(tmp_path):
    (tmp_path / "audit.jsonl").write_text('{"run_id": 1}\nnot json\n')
    view = read_view(tmp_path)
    assert not view.running and view.problems == ["1 line(s) of audit.jsonl are not JSON: the trail was edited "
                                                  "or truncated"]
    text = client(tmp_path).get("/").text
    assert "site not running" in text and "No verdict yet" in text and "No privacy ledger yet" in text


def test_the_console_reads_the_ledger_where_the_site_writes_it():
    from nearl_core.privacy import STATE_FILE

    assert LEDGER_FILE == STATE_FILE


# -- a real console process and a real browser -------------------------------------------------------------------
def start_console(state: Path, tmp: Path, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str, Path]:
    port = flower.free_port()
    log = tmp / f"console-{port}.log"
    proc = flower.start_process([sys.executable, "-m", "client.cli", "console", "--state-dir", str(state),
                                 "--host", host, "--port", str(port)], env={**os.environ}, log_file=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "open http" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()
        time.sleep(0.2)
    flower.wait_for_port("127.0.0.1", port, proc, log, "console")
    return proc, f"http://127.0.0.1:{port}", log


@pytest.mark.timeout(300)
def test_a_real_browser_sees_the_page_and_markup_stays_text(state, tmp_path):
    if chromium() is None:
        pytest.skip(NO_BROWSER)
    RunBook(state).note(999, site="siteA", coordinator="c", server_round=1, kind="train",
                        asked={"nearl-config": {"train": {"lr": XSS}}}, status="pending", reason="w", by=None)
    proc, url, _ = start_console(state, tmp_path)
    try:
        dom = browse(url + "/", tmp_path / "profile")
    finally:
        flower.stop_process(proc, timeout=10)
    assert "NEARL site console: siteA" in dom and "Approve run 77" in dom and "Approve run 999" in dom
    assert "<script" not in dom and "<img" not in dom and "&lt;script&gt;alert" in dom
    assert "ceiling 4" in dom and "federated" in dom


@pytest.mark.timeout(300)
def test_a_console_bound_beyond_loopback_prints_its_token_and_refuses_requests_without_it(state, tmp_path):
    proc, url, log = start_console(state, tmp_path, host="0.0.0.0")
    try:
        token = (state / TOKEN_FILE).read_text().strip()
        assert f"?token={token}" in log.read_text()
        assert stat.S_IMODE(os.stat(state / TOKEN_FILE).st_mode) == 0o600
        web = httpx.Client(timeout=60)  # this machine may be busy
        for path in ("/", "/static/console.css"):
            assert web.get(url + path).status_code == 401
        assert web.post(url + "/runs/77/approve", headers={"Origin": url}).status_code == 401
        assert web.get(f"{url}/?token={token}").status_code == 200
        if chromium() is not None:
            assert "needs its token" in browse(url + "/", tmp_path / "profile")
            assert "Approve run 77" in browse(f"{url}/?token={token}", tmp_path / "profile2")
    finally:
        flower.stop_process(proc, timeout=10)
    assert RunBook(state).get(77)["status"] == "pending"
