"""The limit of the roster: a malicious coordinator that colludes with c sites, in process.

A colluding site holds a share of every peer's seed and of its mask key, and signs any
survivor set it is asked to.  To rebuild honest site j's update the coordinator needs t
shares of j's seed (from sites told "j is summed") and t of j's mask key (from sites told
"j dropped"), each group vouched for by t signatures; an honest site signs one set.  With
c colluders that works when (t - c) + (t - c) <= n - c, i.e. 2t <= n + c.  The default
threshold (0.6: 3 of 5) is thus broken by ONE colluding site in a five-site round; 4 of 5
(``secagg-threshold 0.8``) holds against two.  docs/security.md states this limit.
"""

from __future__ import annotations

import pytest

from nearl_protocol import keys
from nearl_protocol import secagg as sa
from nearl_protocol import signing
from nearl_protocol.roster import load_private_key, load_roster
from server.secagg import SecAggSettings
from tests.secagg_fakes import InProcessGrid, make_sites, run_round, sent_update, stage_of, with_roster
from tests.secagg_spy import loot, participants, rebuild_update, rebuilt, rewritten, signatures

pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)

TARGET, COLLUDER = 1, 5  # participant numbers: the coordinator wants site1's update; site5 helps it


def colluding(views: dict[int, tuple[list[int], list[int]]], colluder_key, roster):
    """Tell each site its survivor set; at unmask show it the signatures over that set, the colluder's made to
    order with its own key (the colluder signs whatever it is asked)."""
    def tamper(grid: InProcessGrid, m):
        me, stage = participants(grid).get(m.metadata.dst_node_id), stage_of(m)
        if stage not in (sa.CONSISTENCY, sa.UNMASK):
            return m
        active, dead = views[me]
        if stage == sa.CONSISTENCY:
            return rewritten(m, **{keys.SECAGG_ACTIVE: active, keys.SECAGG_DEAD: dead})
        sigs = {p: s for p, s in signatures(grid).items() if views[p] == views[me]}
        run = int(m.metadata.run_id)
        sigs[COLLUDER] = signing.sign(colluder_key, signing.survivors_bytes(
            federation=roster.ca_sha256, run_id=run, server_round=int(m.content[keys.SECAGG][keys.SERVER_ROUND]),
            signer=COLLUDER, active=active, dead=dead))
        chosen = sorted(p for p in sigs if p in active)
        return rewritten(m, **{keys.SECAGG_ACTIVE: active, keys.SECAGG_DEAD: dead, keys.SECAGG_SIGNERS: chosen,
                               keys.SECAGG_SIGNATURES: [sigs[p] for p in chosen]})
    return tamper


ALIVE, ONE_DEAD = ([1, 2, 3, 4, 5], []), ([2, 3, 4, 5], [1])


@pytest.mark.parametrize("threshold, views, rebuilds", [
    (0.6, {1: ALIVE, 2: ALIVE, 5: ALIVE, 3: ONE_DEAD, 4: ONE_DEAD}, True),  # t = 3 = (n + c + 1) / 2: broken
    (0.8, {1: ALIVE, 2: ALIVE, 5: ALIVE, 3: ONE_DEAD, 4: ONE_DEAD}, False),  # t = 4: each group is short
    (0.8, {1: ALIVE, 2: ALIVE, 3: ALIVE, 5: ALIVE, 4: ONE_DEAD}, False),
], ids=["t3-of-5-one-colluder-rebuilds", "t4-of-5-split-2-2", "t4-of-5-split-3-1"])
def test_a_colluding_site_and_the_threshold(tmp_path, threshold, views, rebuilds):
    sites = make_sites(tmp_path, 5)
    roster = load_roster(with_roster(tmp_path, sites))
    colluder = sites[COLLUDER - 1]
    tamper = colluding(views, load_private_key(colluder.auth_key), roster)
    _, _, grid, strategy = run_round(sites, secure=SecAggSettings(threshold=threshold, clip=0.1),
                                     grid=InProcessGrid(sites, tamper=tamper))
    t, target = strategy.secure.current.params.threshold, sites[TARGET - 1]
    got = loot(grid, owned={colluder.node})
    secrets = rebuilt(grid, got, target.node, t)
    if not rebuilds:
        assert "sk1" not in secrets or "seed" not in secrets
        assert any(f"signed this survivor set, the threshold is {t}" in r for s in sites for r in s.refusals())
        return
    assert set(secrets) == {"seed", "sk1"} and not any(s.refusals() for s in sites)
    update = rebuild_update(grid, got, target.node, secrets["seed"], secrets["sk1"])
    assert (update == sa.encode(sent_update(target), target.examples, strategy.secure.current.params)).all()
