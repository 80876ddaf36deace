"""A site's connection rule without processes: the supervisor's view of its coordinator, and the health check.

The rule (client/connection.py, docs/deployment.md): a site reconnects while it runs, but
spends no longer than ``--connect-timeout`` seconds in a row without its coordinator; past
that it exits with status 69 so that its service manager starts it again; 0 means no limit.
Here a fake clock drives :class:`client.connection.Connection` through the SuperNode's log
events and exits, and the health check (``nearl-client health`` and the image's
deploy/docker/healthcheck.py) reads a status file for every state.  tests/test_reconnect_e2e.py
does the same on real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client import connection, health
from client.connection import CONNECTED, CONNECTING, DISCONNECTED, EXIT_DISCONNECTED, Connection

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    monkeypatch.setattr(connection, "port_reason", lambda address, timeout=1.0: "Connection refused")
    return Clock()


def test_a_site_connects_loses_its_coordinator_reconnects_and_says_so(clock):
    link = Connection("fl:9092", 180.0, clock=clock)
    assert link.state == CONNECTING and link.status()["connection"] == "connecting"
    clock.now += 3
    assert link.on_event("retrying") is None  # before the first connection: the periodic line reports it
    assert link.on_event("connected") == "connected to the coordinator at fl:9092"
    assert link.on_event("connected") is None and link.offline_for() == 0
    clock.now += 100
    assert link.on_event("retrying") == ("lost the coordinator at fl:9092 (Connection refused); reconnecting for up "
                                         "to 180s more (--connect-timeout 180)")
    assert link.state == DISCONNECTED and link.on_event("retrying") is None  # one line per outage, not per try
    clock.now += 42
    assert link.on_event("connected") == "connected to the coordinator at fl:9092 again after 42s without it"
    assert link.state == CONNECTED and not link.over_limit()


def test_status_lines_while_offline_come_at_doubling_intervals_up_to_five_minutes(clock):
    link = Connection("fl:9092", None, clock=clock)
    link.on_event("connected")
    link.on_event("retrying")
    seen = []
    for _ in range(2000):
        clock.now += 1
        if link.status_line():
            seen.append(round(link.offline_for()))
    assert seen[:6] == [10, 30, 70, 150, 310, 610] and seen[6] - seen[5] == 300
    clock.now += 1
    line = Connection("fl:9092", None, clock=clock)
    clock.now += 10
    assert line.status_line() == ("not yet connected to the coordinator at fl:9092 for 10s (Connection refused); "
                                  "still reconnecting for as long as this site runs (--connect-timeout 0)")


def test_past_the_limit_the_site_gives_up_and_without_a_limit_never(clock):
    limited, forever = Connection("fl:9092", 10.0, clock=clock), Connection("fl:9092", None, clock=clock)
    for link in (limited, forever):
        link.on_event("connected")
        link.on_event("retrying")
    clock.now += 9.9
    assert not limited.over_limit()
    clock.now += 0.1
    assert limited.over_limit() and not forever.over_limit()
    clock.now += 10 ** 6
    assert not forever.over_limit()
    assert limited.give_up_line().startswith(
        "no connection to the coordinator at fl:9092 for 1000010s (--connect-timeout 10; Connection refused); "
        f"stopping this site with exit status {EXIT_DISCONNECTED} so that its service manager")
    assert connection.limit_of(0) is None and connection.limit_of(float("inf")) is None
    assert connection.limit_of(7.5) == 7.5


def test_a_site_that_never_connects_gives_up_after_the_limit_counted_from_its_supernodes_start(clock):
    link = Connection("fl:9092", 10.0, clock=clock)
    clock.now += 8  # the SuperNode starting (importing Flower) on a busy machine
    link.supernode_up()
    clock.now += 9
    assert not link.over_limit()
    clock.now += 1
    assert link.over_limit() and link.state == CONNECTING
    never = Connection("fl:9092", 10.0, clock=clock)
    clock.now += 10
    assert never.over_limit()  # a SuperNode that never comes up does not stop the clock
    link.on_event("connected")
    link.on_event("retrying")
    clock.now += 5
    link.supernode_up()  # during an outage a new SuperNode's start counts as time without the coordinator
    clock.now += 5
    assert link.over_limit()


def test_a_dead_supernode_is_replaced_after_1_2_4_up_to_30_seconds_and_the_delay_resets_once_connected(clock):
    link = Connection("fl:9092", None, clock=clock)
    link.on_event("connected")
    line, delay = link.supernode_ended("the SuperNode (pid 7) was killed by SIGKILL")
    assert line == ("the SuperNode (pid 7) was killed by SIGKILL; starting a new SuperNode in 1s, reconnecting for as "
                    "long as this site runs (--connect-timeout 0)")
    assert link.state == DISCONNECTED and link.offline_for() == 0
    delays = [delay] + [link.supernode_ended("again")[1] for _ in range(7)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    link.supernode_started()
    assert link.on_event("connected").endswith("again after 0s without it; 1 SuperNode restart so far")
    assert link.supernode_ended("once more")[1] == 1


def test_the_status_records_the_connection_in_wall_clock_time(clock):
    link = Connection("fl:9092", 30.0, clock=clock)
    before = time.time()
    status = link.status()
    assert status["connection"] == "connecting" and status["connect_timeout"] == 30.0
    assert abs(status["offline_since"] - before) < 5 and status["coordinator"] == "fl:9092"
    link.on_event("connected")
    assert link.status()["offline_since"] is None and link.status()["supernode_restarts"] == 0


# -- the health check -------------------------------------------------------------------------------------
def status_of(state: str, **extra) -> dict:
    """A status.json as the supervisor writes it, with live pids (this test process)."""
    now = time.time()
    offline = {"connected": None, "reconnecting": now - 40, "over": now - 400, "connecting": now - 5}[state]
    status = {"time": now, "supervisor_pid": os.getpid(), "site": "siteA", "mode": "warm",
              "supernode_pid": os.getpid(), "worker_pid": os.getpid(), "worker_restarts": 0,
              "connection": {"over": "disconnected", "reconnecting": "disconnected"}.get(state, state),
              "offline_since": offline, "connect_timeout": 180.0, "coordinator": "fl:9092", "supernode_restarts": 1}
    return {**status, **extra}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def cases() -> dict[str, tuple[dict, bool, str]]:
    """name: (status, healthy, what the report says), made now: the times are relative to this moment."""
    return {
        "connected": (status_of("connected"), True, "healthy: site siteA worker pid"),
        "connecting": (status_of("connecting"), True, "; connecting to fl:9092 for 5s (limit 180s)"),
        "reconnecting": (status_of("reconnecting"), True, "; reconnecting to fl:9092 for 40s (limit 180s); 1 SuperNode"),
        "between SuperNodes": (status_of("reconnecting", supernode_pid=None), True, "reconnecting to fl:9092"),
        "beyond the limit": (status_of("over"), False, "no connection to the coordinator at fl:9092 for 400s "
                                                       "(more than 180s)"),
        "no limit, past 180 s": (status_of("over", connect_timeout=None), False, "(more than 180s)"),
        "SuperNode dead": (status_of("connected", supernode_pid=dead_pid()), False, "supernode not running"),
        "worker dead": (status_of("connected", worker_pid=None), False, "worker not running"),
        "stale": (status_of("connected", time=time.time() - 60), False, "status 60s old"),
        "cold": (status_of("connected", mode="cold", worker_pid=None), True, "healthy: site siteA (cold) SuperNode pid"),
        "older status": ({k: v for k, v in status_of("connected").items() if k not in
                          ("mode", "connection", "offline_since", "connect_timeout", "coordinator",
                           "supernode_restarts")}, True, "healthy: site siteA worker pid"),
    }


CASES = list(cases())


@pytest.mark.parametrize("case", CASES)
def test_nearl_client_health_reports_each_state(tmp_path, capsys, case):
    status, healthy, says = cases()[case]
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "status.json").write_text(json.dumps(status))
    code = health.main(["--state-dir", str(tmp_path)])
    out = capsys.readouterr().out.strip()
    assert code == (0 if healthy else 1) and out.startswith("healthy: " if healthy else "unhealthy: "), out
    assert says in out and "\n" not in out, out
    if case == "older status":  # the line older tools read, unchanged
        assert out == f"healthy: site siteA worker pid {os.getpid()} (0 restarts)"


def test_max_offline_overrides_the_sites_own_limit(tmp_path, capsys):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "status.json").write_text(json.dumps(status_of("reconnecting")))
    assert health.main(["--state-dir", str(tmp_path), "--max-offline", "30"]) == 1
    assert "for 40s (more than 30s)" in capsys.readouterr().out
    assert health.main(["--state-dir", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().out.startswith("unhealthy: no status at ")


@pytest.mark.parametrize("case", ["connected", "reconnecting", "beyond the limit", "SuperNode dead", "cold"])
def test_the_images_health_check_agrees(tmp_path, case):
    """deploy/docker/healthcheck.py site: the SuperNode's /health (a stand-in here), then client/health.py."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    status, healthy, says = cases()[case]
    (tmp_path / "state" / "runtime").mkdir(parents=True)
    (tmp_path / "state" / "runtime" / "status.json").write_text(json.dumps(status))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "NEARL_NODE_PORT": str(server.server_address[1]), "NEARL_CLIENT_HOME": str(tmp_path),
               "PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, str(ROOT / "deploy" / "docker" / "healthcheck.py"), "site"], env=env,
                             capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert res.returncode == (0 if healthy else 1), res.stdout + res.stderr
    if not healthy:
        assert says in res.stderr, res.stderr


# -- the supervisor's SuperNode handling, with a stand-in SuperNode -----------------------------------------
class FakeNode:
    """What the supervisor uses of client.supernode_watch.SuperNodeWatch."""

    started: list["FakeNode"] = []

    def __init__(self, cmd, runtime_address, events, generation, hang_seconds):
        self.events, self.generation, self.code, self.ended = events, generation, None, []
        self.pid, self.url, self.shutting_down = 1000 + generation, f"http://{runtime_address}/health", False
        self.answered, self.announced = None, False
        FakeNode.started.append(self)

    def poll(self):
        return self.code

    def hung(self) -> bool:
        return False

    def end(self, timeout=20.0, *, kill=False):
        self.ended.append(kill)
        self.code = -9 if kill else 0

    def exit_reason(self) -> str:
        return f"the SuperNode (pid {self.pid}) exited with code {self.code}"

    def say(self, event: str) -> None:
        self.events.put((self.generation, event))


def test_the_supervisor_replaces_a_supernode_that_exits_or_gives_up_once_each(tmp_path, monkeypatch, capsys):
    from client import supervisor as sv

    monkeypatch.setattr(sv, "SuperNodeWatch", FakeNode)
    monkeypatch.setattr(sv.time, "sleep", lambda s: None)
    monkeypatch.setattr(connection, "port_reason", lambda address, timeout=1.0: "Connection refused")
    FakeNode.started = []
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"site": "siteA", "mode": "cold", "supernode_cmd": ["x"], "coordinator": "fl:9092",
                                "runtime_address": "127.0.0.1:1", "connect_timeout": None}))
    sup = sv.Supervisor(spec)
    sup.start_supernode()
    first = FakeNode.started[0]
    first.say("connected")
    sup.read_events()
    first.code = 0  # a restarted coordinator no longer knows it: Flower exits 0
    sup.check_supernode()
    assert sup.supernode is None and sup.link.state == DISCONNECTED
    sup.restart_at = 0.0
    sup.check_supernode()  # its delay is over: the next one starts
    second = FakeNode.started[1]
    assert sup.supernode is second and sup.link.supernode_restarts == 1
    first.say("connected")  # a late line of the replaced SuperNode changes nothing
    sup.read_events()
    assert sup.link.state == DISCONNECTED
    second.say("gave-up")
    second.code = 76  # ... and its process ended right after
    sup.check_supernode()
    out = capsys.readouterr().out
    assert out.count("starting a new SuperNode") == 2, out  # once for each SuperNode, not twice for the second
    assert "the SuperNode (pid 1001) exited with code 0; starting a new SuperNode in 1s" in out
    assert "the SuperNode (pid 1002) gave up reconnecting; starting a new SuperNode in 2s" in out
    assert sup.link.failures == 2
