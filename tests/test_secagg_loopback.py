"""Secure aggregation for real on loopback: nearl-server and three nearl-client sites, one killed mid-round.

site3 is SIGKILLed (its whole SuperNode process group) right after it answered key setup
and key sharing, before its masked update is sent.  With threshold 2 of 3 the round must
be recovered: the two survivors' masked updates are summed, site3's pairwise masks are
removed with the survivors' shares of its mask key, and the round's aggregate is applied.
Round 2 then waits for a third site, so the coordinator is stopped there (a known point).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from nearl_core.demo_data import generate_demo_data
from nearl_protocol import keys
from nearl_protocol import processes as flower
from server.checkpoint import complete_rounds, load_latest
from tests.fed_helpers import Procs, dump, nearl_client, nearl_server, wait_for

pytestmark = [pytest.mark.slow]


def secagg_lines(audit: Path) -> list[dict]:
    if not audit.is_file():
        return []
    lines = [json.loads(x) for x in audit.read_text().splitlines() if x.strip()]
    return [x for x in lines if x["message_type"] == keys.SECAGG_MESSAGE_TYPE]


def test_a_site_killed_mid_round_is_recovered_by_secure_aggregation(tmp_path):
    procs = Procs(tmp_path / "logs")
    sites = generate_demo_data(tmp_path / "data", 3, train_per_site=16, val_per_site=6, test_per_site=6)
    try:
        port = flower.free_port()
        nearl_server(procs, port, tmp_path, "--insecure", "--rounds", "2", "--min-sites", "3",
                     "--round-timeout", "240", "--wait-timeout", "600", "--secure-aggregation",
                     "--secagg-threshold", "0.6", "--secagg-timeout", "240", "--checkpoint-dir", str(tmp_path / "ck"),
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
        wait_for(procs, "server", "submitted", 300)
        for i, site in enumerate(sites, 1):
            nearl_client(procs, f"site{i}", site, port, tmp_path, "--insecure", "--state-dir",
                         str(tmp_path / f"state-site{i}"))
        deadline = time.monotonic() + 900
        while len(secagg_lines(tmp_path / "state-site3" / "audit.jsonl")) < 2:  # setup and share-keys answered
            assert time.monotonic() < deadline, dump(procs)
            time.sleep(0.2)
        time.sleep(3)  # its share-keys reply is pushed; it dies before (or while) training
        procs.kill("site3")
        wait_for(procs, "server", "round 1/2  sites 2/3", 900)
        out = procs.text("server")
        assert "not applied" not in out and "aborted" not in out and "missing: site3" in out, out
        assert complete_rounds(tmp_path / "ck") == [1]
        from tests.fed_helpers import initial_adapters

        start, after = initial_adapters(), load_latest(tmp_path / "ck").arrays
        assert any(not np.array_equal(start[k], after[k]) for k in start)
        survivors = [secagg_lines(tmp_path / f"state-site{i}" / "audit.jsonl") for i in (1, 2)]
        assert all(len(lines) == 3 and not any(x["refused"] for x in lines) for lines in survivors), survivors
        procs.kill("server", signal.SIGTERM)
    finally:
        procs.stop_all()
