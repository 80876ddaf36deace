"""A flood on loopback while a real 2-site warm federation trains (bench/flood.py, the same code).

nearl-server (demo config, its default limits) and two warm nearl-client sites on
127.0.0.1 run 2 rounds twice on the same data: quiet, then while other loopback addresses
send 400 MB bodies (declared and chunked), thousands of small unauthenticated requests
and slow senders, from the sites' start to the last round (bounded: every attack has a
deadline and every connection a timeout). The flooded run must give bit for bit the quiet
run's final adapters with both sites in every round, keep the SuperLink's peak resident
memory within ``MEMORY_BOUND`` times the quiet run's and its median round time within
``ROUND_FACTOR`` times; every big body is refused, the rate, connection and slow-sender
limits all refuse something, no slow connection outlives the client timeout by much, and
the proxy's log stays a few lines. docs/security.md has the figures of bench/flood.py.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

from nearl_core.demo_data import generate_demo_data
from server.proxy import Limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import flood  # noqa: E402

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(2400)
def test_a_federation_under_a_flood_ends_as_the_quiet_one(tmp_path):
    data = generate_demo_data(tmp_path / "data", 2, train_per_site=16, val_per_site=6, test_per_site=6)
    quiet = flood.federation(tmp_path / "quiet", data, 2, None)
    flooded = flood.federation(tmp_path / "flooded", data, 2, flood.FloodPlan(seconds=900))
    for run in (quiet, flooded):
        assert run["code"] == 0, run["log"][-4000:]
        assert [(r, answered, sampled) for r, answered, sampled, _ in run["rounds"]] == [(1, 2, 2), (2, 2, 2)]
    assert flood.same_adapters(quiet["adapters"], flooded["adapters"])

    assert flooded["superlink_peak_mib"] <= flood.MEMORY_BOUND * quiet["superlink_peak_mib"], (quiet, flooded)
    seconds = {name: statistics.median(s for *_, s in run["rounds"]) for name, run in
               (("quiet", quiet), ("flooded", flooded))}
    assert seconds["flooded"] <= flood.ROUND_FACTOR * seconds["quiet"], seconds

    big, small, slow = (flooded["tallies"][k].counts for k in ("big bodies", "small requests", "slow senders"))
    assert big["413"] >= 4 and not [k for k in big if k.startswith("forwarded")], big
    assert small["429 rate"] > 0 and small["403"] > 0, small
    assert slow["408"] > 0 and slow["429 connections"] > 0 and "still open at the deadline" not in slow, slow
    assert max(flooded["tallies"]["slow senders"].held_seconds) < Limits().client_timeout + 15
    refused = sum(big.values()) + small["429 rate"] + small["403"] + slow["408"] + slow["429 connections"]
    assert flooded["refusal_lines"] < refused / 20, (flooded["refusal_lines"], refused)
