"""Warm sites on real processes: nearl-server + nearl-client (SuperNode with process isolation + site worker).

* warm sites over 2 rounds, bit-identical to a cold run: tests/test_federation_e2e.py (it reads the
  ``secured`` federation, which runs the cold federation alongside);
* a site worker killed during a round: that site fails that round (an error reply naming the
  dead worker), a new worker answers the next round;
* a site refuses runs it did not install: a NEARL bundle with another hash, a foreign Flower app
  (nothing of it runs at the site: its ClientApp would leave a marker file).  One SuperLink for both
  (the ``refusals`` fixture): the coordinator runs the other NEARL version and the operator submits
  the foreign app next to it; the site's audit lines are told apart by run id.

Tiny ``demo`` config, 24 training images per site, loopback, every process stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from client.audit import read_lines
from nearl_core.demo_data import generate_demo_data
from tests.fed_helpers import dump, federation, history, mlflow_run, refusal_federation, wait_for

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """A site that refuses another NEARL version's run and a foreign Flower app on one SuperLink."""
    return refusal_federation(tmp_path_factory.mktemp("refusals"))


def task_file(state: Path) -> Path | None:
    found = sorted((state / "runtime").glob("task-*.json"))
    return found[0] if found else None


@pytest.mark.timeout(1800)
def test_a_killed_worker_fails_its_sites_round_and_a_new_worker_answers_the_next(tmp_path):
    sites = generate_demo_data(tmp_path / "data", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    procs, uri = federation(tmp_path, sites, "--warm", rounds=3)
    state = tmp_path / "state-site2"
    try:
        wait_for(procs, "server", "round 1/3  sites 2/2", 900)
        deadline, killed = time.monotonic() + 600, None
        while killed is None and time.monotonic() < deadline and procs.procs["server"].poll() is None:
            # the worker holds round 2's train message
            path = task_file(state)
            if path is not None:
                try:
                    record = json.loads(path.read_text())
                except (OSError, ValueError):
                    record = {}
                if record.get("round") == 2 and record.get("message_type") == "train":
                    killed = int(record["pid"])
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        assert killed, f"site2's worker never held round 2's train message\n{dump(procs)}"
        assert procs.wait("server", 1200) == 0, dump(procs)
    finally:
        procs.stop_all()
    out = procs.text("server")
    assert "round 2/3  sites 1/2" in out and "round 3/3  sites 2/2" in out, out
    assert "site2: the site worker died while running this train message" in out or \
        "rejected site2: the site worker died" in out, out
    log = procs.text("site2")
    assert f"site worker pid {killed} exited with code -9" in log and "starting a new one" in log, log
    client, run = mlflow_run(uri)
    rid = run.info.run_id
    assert history(client, rid, "site2/answered") == {1: 1.0, 2: 0.0, 3: 1.0}
    pids = history(client, rid, "site2/worker_pid")
    assert pids[1] == killed and pids[3] != killed
    assert history(client, rid, "site2/worker_builds")[3] == 1.0  # the new worker built its own, once
    refused = [x for x in read_lines(state / "audit.jsonl") if x["refused"]]
    assert [(x["round"], x["message_type"]) for x in refused] == [(2, "train")], refused
    assert "the site worker died" in refused[0]["refused"]


@pytest.mark.timeout(900)  # the shared federation may start in this test's setup
def test_a_site_refuses_a_nearl_bundle_with_another_hash(refusals):
    procs, tmp = refusals.procs, refusals.tmp
    ours = [x for x in procs.text("site1").splitlines() if "app bundle sha256 " in x][0].rsplit(" ", 1)[1]
    assert "is not one this site accepts" in procs.text("server"), procs.text("server")
    log = procs.text("site1")
    assert "refused: app bundle sha256 " in log and "accept it with nearl-client --accept-fab" in log, log
    theirs = log.split("refused: app bundle sha256 ", 1)[1].split()[0]
    assert theirs != ours
    every = read_lines(tmp / "state-site1" / "audit.jsonl")
    assert {x["run_id"] for x in every} <= {refusals.nearl_run, refusals.foreign_run}, every
    lines = [x for x in every if x["run_id"] == refusals.nearl_run]  # the foreign app's run is the next test's
    assert lines and all("is not one this site accepts" in x["refused"] and x["bytes_sent"] == 0 for x in lines)


@pytest.mark.timeout(900)  # the shared federation may start in this test's setup
def test_a_site_refuses_a_foreign_flower_app_and_runs_none_of_it(refusals):
    procs, tmp = refusals.procs, refusals.tmp
    (reply,) = json.loads(refusals.foreign_out.read_text())
    assert reply["error"] and reply["error"].startswith("site1: not a NEARL app: publisher=someone-else "
                                                        "name=foreign-app"), reply
    assert not refusals.marker.exists(), "the foreign ClientApp ran at the site"
    log = procs.text("site1")
    assert "refused: not a NEARL app" in log and "Start `flwr-clientapp` process" not in log, log
    every = read_lines(tmp / "state-site1" / "audit.jsonl")
    assert {x["run_id"] for x in every} <= {refusals.nearl_run, refusals.foreign_run}, every
    (line,) = [x for x in every if x["run_id"] == refusals.foreign_run]  # the other NEARL version's: the test above
    assert line["refused"].startswith("not a NEARL app") and line["bytes_sent"] == 0
