"""A site is never alive-but-dead, on real processes (nearl-server / flower-superlink + nearl-client).

* a federation whose coordinator is stopped after round 1 and resumed (``nearl-server
  --resume``) only after the sites' limit has passed finishes with both sites: site1
  (``--connect-timeout 10``) exits 69 and this test, acting as its service manager
  (systemd ``Restart=on-failure``), starts it again until the coordinator is back; site2
  (``--connect-timeout 0``) keeps reconnecting in the same process, its worker (and backbone)
  kept: one worker pid answers every round;
* under a warm site, a SuperNode killed with SIGKILL and one that hangs (SIGSTOP) are replaced
  and the site connects again with the same worker; a coordinator that stays away ends the
  site with exit 69, its worker and SuperNode stopped;
* ``nearl-client health`` reports each state on the way: connected, reconnecting within the
  limit, offline past ``--max-offline``, gone.

Tiny ``demo`` config, 16-24 training images per site, loopback, every process stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from client.worker import pid_alive
from nearl_core.demo_data import generate_demo_data
from nearl_protocol import processes as flower
from tests.fed_helpers import BIN, Procs, dump, env, history, mlflow_run, nearl_client, nearl_server, wait_for

pytestmark = [pytest.mark.slow]
LIMIT = "10"  # site1's --connect-timeout (seconds)


def status(state: Path) -> dict:
    try:
        return json.loads((state / "runtime" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def health(state: Path, *extra: str) -> tuple[int, str]:
    res = subprocess.run([str(BIN / "nearl-client"), "health", "--state-dir", str(state), *extra],
                         capture_output=True, text=True, timeout=120)
    return res.returncode, res.stdout.strip()


def wait_until(what: str, check, procs: Procs, timeout: float, tick=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"not seen within {timeout:.0f}s: {what}\n{dump(procs)}")


class ServiceManager:
    """What systemd's Restart=on-failure (or Docker's restart policy) does for a site: start it again when it
    exits non-zero, after a second; records every exit."""

    def __init__(self, procs: Procs, name: str, start):
        self.procs, self.name, self.start = procs, name, start
        self.exits: list[int] = []
        self.start()

    def tick(self) -> None:
        code = self.procs.procs[self.name].poll()
        if code is None:
            return
        self.exits.append(code)
        assert code != 0, f"{self.name} exited 0: a service manager would not restart it\n{dump(self.procs)}"
        time.sleep(1.0)
        self.start()


@pytest.mark.timeout(1800)
def test_a_coordinator_resumed_after_the_sites_limit_finishes_with_both_sites(tmp_path):
    sites = generate_demo_data(tmp_path / "data", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    procs = Procs(tmp_path / "logs")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    port = flower.free_port()
    args = ["--insecure", "--rounds", "3", "--min-sites", "2", "--round-timeout", "900", "--wait-timeout", "300",
            "--checkpoint-dir", str(tmp_path / "ck"), "--mlflow-uri", uri]
    state = {i: tmp_path / f"state-site{i}" for i in (1, 2)}

    def site(i: int, limit: str):
        return lambda: nearl_client(procs, f"site{i}", sites[i - 1], port, tmp_path, "--insecure", "--state-dir",
                                    str(state[i]), "--connect-timeout", limit)

    try:
        nearl_server(procs, port, tmp_path, *args)
        wait_for(procs, "server", "submitted", 300)
        manager = ServiceManager(procs, "site1", site(1, LIMIT))
        site(2, "0")()
        site2 = procs.procs["site2"]
        wait_until("round 1 with both sites", lambda: "round 1/3  sites 2/2" in procs.text("server"), procs, 900,
                   manager.tick)
        assert health(state[2])[1].startswith("healthy: site site2 worker pid")
        procs.kill("server", signal.SIGTERM)  # the coordinator goes away after round 1
        down, before = time.monotonic(), len(manager.exits)
        assert procs.procs["server"].returncode == 130, dump(procs)

        # the outage outlasts site1's limit: it exits 69 (at least once) and is started again by its manager
        wait_until("site1 exiting 69", lambda: 69 in manager.exits[before:], procs, 120, manager.tick)
        wait_until("site2 reconnecting", lambda: status(state[2]).get("connection") == "disconnected", procs, 60,
                   manager.tick)
        code, said = health(state[2])
        assert code == 0 and "; reconnecting to 127.0.0.1:" in said and "(no limit)" in said, said
        wait_until("an outage longer than the limit", lambda: time.monotonic() - down > 2 * float(LIMIT), procs,
                   60, manager.tick)
        code, said = health(state[2], "--max-offline", LIMIT)
        assert code == 1 and "no connection to the coordinator at 127.0.0.1:" in said, said
        assert site2.poll() is None, "site2 (no limit) must keep running"

        nearl_server(procs, port, tmp_path, *args, "--resume", str(tmp_path / "ck"), name="resumed")
        wait_until("the resumed run", lambda: procs.procs["resumed"].poll() is not None, procs, 1200, manager.tick)
        assert procs.procs["resumed"].returncode == 0, dump(procs)
        assert site2.poll() is None and procs.procs["site2"] is site2, "site2 ran in one process throughout"
    finally:
        procs.stop_all()
    out = procs.text("resumed")
    assert "round 2/3  sites 2/2" in out and "round 3/3  sites 2/2" in out, out

    log1, log2 = procs.text("site1"), procs.text("site2")
    assert set(manager.exits) == {69}, manager.exits  # every exit of site1 was 'no coordinator'
    outage = log1[log1.index(f"lost the coordinator at 127.0.0.1:{port} (Connection refused); reconnecting for up "
                             f"to {LIMIT}s more (--connect-timeout {LIMIT})"):]
    assert re.search(rf"^nearl-client: error: no connection to the coordinator at 127\.0\.0\.1:{port} for 1\ds "
                     rf"\(--connect-timeout {LIMIT}; Connection refused\); stopping this site with exit status 69 so "
                     r"that its service manager \(systemd, Docker, Kubernetes\) starts it again$", outage, re.M), log1
    assert f"lost the coordinator at 127.0.0.1:{port} (Connection refused); reconnecting for as long as this " \
           "site runs (--connect-timeout 0)" in log2, log2
    assert f"no connection to the coordinator at 127.0.0.1:{port} for " in log2 and "still reconnecting" in log2
    assert f"connected to the coordinator at 127.0.0.1:{port} again after " in log2, log2

    client, run = mlflow_run(uri)
    rid = run.info.run_id
    assert history(client, rid, "sites_answered") == {1: 2.0, 2: 2.0, 3: 2.0}
    assert len(set(history(client, rid, "site2/worker_pid").values())) == 1  # one worker across the outage
    assert set(history(client, rid, "site2/worker_builds").values()) == {1.0}  # its backbone built once


@pytest.mark.timeout(900)
def test_a_killed_or_hung_supernode_is_replaced_and_a_lost_coordinator_ends_the_site_with_69(tmp_path):
    sites = generate_demo_data(tmp_path / "data", 1, train_per_site=16, val_per_site=4, test_per_site=4)
    procs = Procs(tmp_path / "logs")
    port = flower.free_port()
    state = tmp_path / "state"
    try:
        link = procs.start("superlink", flower.superlink_command(host="127.0.0.1", port=port, certs=None,
                                                                 database=None), env=env(tmp_path / "home-link"))
        flower.wait_for_port("127.0.0.1", port, link, procs.log("superlink"), "SuperLink")
        cmd = [str(BIN / "nearl-client"), "--site", "site1", "--data", str(sites[0]), "--server", f"127.0.0.1:{port}",
               "--threads", "1", "--insecure", "--state-dir", str(state), "--connect-timeout", "20"]
        procs.start("site1", cmd, env=env(tmp_path / "home-site1", NEARL_SUPERNODE_HANG_SECONDS=8), cwd=tmp_path)
        connected = lambda: status(state).get("connection") == "connected" and status(state).get("worker_pid")  # noqa: E731
        wait_until("site1 connected with its worker", connected, procs, 300)
        code, said = health(state)
        assert code == 0 and f"; connected to 127.0.0.1:{port}; 0 SuperNode restarts" in said, said
        worker = status(state)["worker_pid"]

        first = status(state)["supernode_pid"]
        os.kill(first, signal.SIGKILL)
        wait_until("a new SuperNode connected", lambda: connected() and status(state)["supernode_pid"] != first,
                   procs, 180)
        second = status(state)["supernode_pid"]
        time.sleep(3)  # its Runtime API has answered the supervisor's probe (each second until it does)
        os.kill(second, signal.SIGSTOP)  # hung: alive, answering nothing
        wait_until("the hung SuperNode replaced", lambda: connected() and status(state)["supernode_pid"] != second,
                   procs, 180)
        assert not pid_alive(second)
        code, said = health(state)
        assert code == 0 and said.endswith("; 2 SuperNode restarts") and status(state)["worker_pid"] == worker, said

        flower.stop_process(link)  # the coordinator goes away for good
        wait_until("site1 reconnecting", lambda: status(state).get("connection") == "disconnected", procs, 60)
        code, said = health(state)
        assert code == 0 and f"; reconnecting to 127.0.0.1:{port} for " in said and "(limit 20s)" in said, said
        time.sleep(3)
        code, said = health(state, "--max-offline", "2")
        assert code == 1 and f"no connection to the coordinator at 127.0.0.1:{port} for " in said, said
        third = status(state)["supernode_pid"]
        assert procs.wait("site1", 120) == 69
    finally:
        procs.stop_all()
    log = procs.text("site1")
    assert f"the SuperNode (pid {first}) was killed by SIGKILL; starting a new SuperNode in 1s" in log, log
    assert f"the SuperNode (pid {second}) has not answered on its Runtime API" in log, log
    assert f"connected to the coordinator at 127.0.0.1:{port} again after " in log
    assert re.search(rf"nearl-client: error: no connection to the coordinator at 127\.0\.0\.1:{port} for 2\ds "
                     r"\(--connect-timeout 20; Connection refused\); stopping this site with exit status 69", log), log
    assert not pid_alive(worker) and not pid_alive(third)
    code, said = health(state)
    assert code == 1 and said.startswith("unhealthy: no status at "), said
