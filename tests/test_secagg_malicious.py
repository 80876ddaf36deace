"""Secure aggregation against a malicious coordinator (Bonawitz et al. 2017, active adversary), in process.

Each attack runs as a coordinator that rewrites messages in flight (tests/secagg_fakes.py's
``tamper``) or plays its own Sybil sites.  For each: every honest site refuses with the
reason on its audit trail, the round aborts, and nothing the coordinator received
rebuilds a site's mask seed, mask key or update (tests/secagg_spy.py).  The positive
controls run the same attacks on sites without a roster and rebuild every update, so the
yardstick measures what it claims.
"""

from __future__ import annotations

import pytest
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes, public_key_to_bytes

from nearl_protocol import keys
from nearl_protocol import secagg as sa
from nearl_protocol.roster import load_roster
from server.secagg import SecAggSettings
from tests.secagg_fakes import InProcessGrid, Site, make_sites, run_round, sent_update, stage_of, with_roster
from tests.secagg_spy import loot, participants, rebuild_update, rebuilt, rewritten, signatures

SETTINGS, T = SecAggSettings(threshold=0.6, clip=0.1), 3  # 5 sites: threshold 3

pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)


def refused_by_all(sites: list[Site], reason: str) -> None:
    for site in sites:
        assert any(reason in r for r in site.refusals()), (site.name, site.refusals())


def aborted(report, stage: str) -> None:
    assert not report.aggregated and report.not_applied.startswith(f"secure aggregation aborted at stage {stage}:"), \
        report.not_applied


def nothing_rebuilt(grid: InProcessGrid, sites: list[Site], **spy) -> None:
    got = loot(grid, **spy)
    for site in sites:
        assert rebuilt(grid, got, site.node, T) == {}, site.name


def signed(tmp_path, n: int = 5, **kw) -> list[Site]:
    sites = make_sites(tmp_path, n)
    with_roster(tmp_path, sites, **kw)
    return sites


# -- 1. swapped keys: the coordinator shows every site its own keys for all peers -----------------------------
class KeySwap:
    """Every site sees coordinator-made keys for its peers; share pairs are re-encrypted in transit (full MITM)."""

    def __init__(self):
        self.fake: dict[int, tuple[bytes, bytes, bytes, bytes]] = {}  # participant -> sk1, pk1, sk2, pk2
        self.grid: InProcessGrid | None = None

    def keys_of(self, j: int) -> tuple[bytes, bytes, bytes, bytes]:
        if j not in self.fake:
            (s1, p1), (s2, p2) = generate_key_pairs(), generate_key_pairs()
            self.fake[j] = (private_key_to_bytes(s1), public_key_to_bytes(p1), private_key_to_bytes(s2),
                            public_key_to_bytes(p2))
        return self.fake[j]

    def real_pk2(self, j: int) -> bytes:
        """Participant j's own share-encryption key, from its setup reply."""
        index = participants(self.grid)
        for r in self.grid.received:
            rec = None if r.has_error() else r.content.config_records.get(keys.SECAGG)
            if rec is not None and keys.SECAGG_PK2 in rec and index.get(r.metadata.src_node_id) == j:
                return rec[keys.SECAGG_PK2]
        raise AssertionError(f"no setup reply of participant {j}")

    def key_of(self, src: int, dst: int) -> bytes:
        """The Fernet key of what ``src`` encrypted for ``dst``: the coordinator holds the fake private half."""
        return sa.share_key(self.keys_of(dst)[2], self.real_pk2(src))

    def __call__(self, grid: InProcessGrid, m):
        self.grid, me = grid, participants(grid).get(m.metadata.dst_node_id)
        stage = stage_of(m)
        if stage == sa.SHARE_KEYS:
            rec = m.content[keys.SECAGG]
            who = rec[keys.SECAGG_PARTICIPANTS]
            pk1 = [p if j == me else self.keys_of(j)[1] for j, p in zip(who, rec[keys.SECAGG_PK1])]
            pk2 = [p if j == me else self.keys_of(j)[3] for j, p in zip(who, rec[keys.SECAGG_PK2])]
            return rewritten(m, **{keys.SECAGG_PK1: pk1, keys.SECAGG_PK2: pk2})
        if stage == sa.COLLECT:
            rec = m.content[keys.SECAGG]
            texts = [encrypt(sa.share_key(self.keys_of(src)[2], self.real_pk2(me)),
                             decrypt(self.key_of(src, me), text))
                     for src, text in zip(rec[keys.SECAGG_PARTICIPANTS], rec[keys.SECAGG_CIPHERTEXTS])]
            return rewritten(m, **{keys.SECAGG_CIPHERTEXTS: texts})
        return m


def test_without_a_roster_swapped_keys_give_the_coordinator_every_update(tmp_path):
    sites, swap = make_sites(tmp_path, 5), KeySwap()
    _, _, grid, strategy = run_round(sites, secure=SETTINGS, grid=InProcessGrid(sites, tamper=swap))
    got, params = loot(grid, key_of=swap.key_of), strategy.secure.current.params
    for site in sites:
        secrets = rebuilt(grid, got, site.node, T)
        assert set(secrets) == {"seed", "sk1"}, site.name
        update = rebuild_update(grid, got, site.node, secrets["seed"], secrets["sk1"])
        assert (update == sa.encode(sent_update(site), site.examples, params)).all(), site.name


def test_swapped_keys_are_refused_by_every_site_with_a_roster(tmp_path):
    sites, swap = signed(tmp_path), KeySwap()
    _, report, grid, _ = run_round(sites, secure=SETTINGS, grid=InProcessGrid(sites, tamper=swap))
    refused_by_all(sites, "its key advertisement's signature does not verify with")
    assert "share-keys: participant 2 (site2): its key advertisement's signature does not verify with site2's " \
           "roster key; refusing" in sites[0].refusals()
    aborted(report, "share-keys")
    nothing_rebuilt(grid, sites, key_of=swap.key_of)
    assert not loot(grid).masked


# -- 2. Sybils: the coordinator pads the round with sites it plays itself -------------------------------------
def sybils(tmp_path, honest: list[Site], names: list[str], *, roster: bool = True) -> list[Site]:
    """Sites run by the coordinator: the product's code under its own keys (a roster of its own to sign with)."""
    fakes = [Site(node=200 + i, name=name, delta=honest[0].delta, examples=100, state_dir=tmp_path / f"sybil-{name}")
             for i, name in enumerate(names)]
    if roster:
        honest_pubs = tuple(tmp_path / "keys" / f"{s.name}.pub" for s in honest)
        with_roster(tmp_path / "sybil", fakes, also=honest_pubs, ca=tmp_path / "certs" / "ca.crt", min_sites=2)
    return fakes


def test_without_a_roster_sybils_give_the_coordinator_a_sites_update(tmp_path):
    honest = make_sites(tmp_path, 1)
    fakes = sybils(tmp_path, honest, ["ghost2", "ghost3", "ghost4", "ghost5"], roster=False)
    _, _, grid, strategy = run_round(honest + fakes, secure=SETTINGS)
    got = loot(grid, owned={s.node for s in fakes})
    secrets = rebuilt(grid, got, honest[0].node, T)
    assert set(secrets) == {"seed", "sk1"}
    update = rebuild_update(grid, got, honest[0].node, secrets["seed"], secrets["sk1"])
    assert (update == sa.encode(sent_update(honest[0]), honest[0].examples, strategy.secure.current.params)).all()


def _relabel(**fields):
    """A coordinator that rewrites participant 4's advertisement in the share-keys list the honest sites see."""
    def tamper(grid: InProcessGrid, m):
        if stage_of(m) != sa.SHARE_KEYS or m.metadata.dst_node_id >= 200:
            return m
        rec = m.content[keys.SECAGG]
        lists = {k: list(rec[k]) for k in (keys.SECAGG_NAMES, keys.SECAGG_KEY_IDS, keys.SECAGG_SIGNATURES)}
        at = list(rec[keys.SECAGG_PARTICIPANTS]).index(4)
        for k, value in fields.items():
            lists[k][at] = value(grid, rec) if callable(value) else value
        return rewritten(m, **lists)
    return tamper


def _key_id(name: str):
    return lambda grid, rec: load_roster(next(iter(grid.sites.values())).roster).members[name].sha256


SYBIL_CASES = {
    "names-not-on-the-roster": (["ghost4", "ghost5"], None,
                                "share-keys: participant 4 (ghost4) signs with key sha256:"),
    "a-roster-name-with-another-key": (["site4", "ghost5"], None,
                                       "share-keys: participant 4 (site4) signs with key sha256:"),
    "another-sites-roster-key": (["ghost4", "ghost5"], _relabel(**{keys.SECAGG_KEY_IDS: _key_id("site4")}),
                                 "share-keys: participant 4 (ghost4) signs with the roster key of site site4"),
    "a-key-claimed-twice": (["ghost4", "ghost5"], _relabel(**{keys.SECAGG_NAMES: "site2",
                                                              keys.SECAGG_KEY_IDS: _key_id("site2")}),
                            "share-keys: the roster key of site site2 is claimed by participants 2 and 4"),
    "a-forged-signature": (["ghost4", "ghost5"], _relabel(**{keys.SECAGG_NAMES: "site4",
                                                             keys.SECAGG_KEY_IDS: _key_id("site4")}),
                           "share-keys: participant 4 (site4): its key advertisement's signature does not verify "
                           "with site4's roster key"),
}


@pytest.mark.parametrize("case", SYBIL_CASES)
def test_sybil_sites_are_refused_by_every_honest_site(tmp_path, case):
    names, tamper, reason = SYBIL_CASES[case]
    members = make_sites(tmp_path, 5)  # the consortium: site1..site5 on the roster; 4 and 5 are not in this round
    with_roster(tmp_path, members)
    honest, fakes = members[:3], sybils(tmp_path, members[:3], names)
    grid = InProcessGrid(honest + fakes, tamper=tamper)
    _, report, grid, _ = run_round(honest + fakes, secure=SETTINGS, grid=grid)
    refused_by_all(honest, reason)
    aborted(report, "share-keys")
    nothing_rebuilt(grid, honest, owned={s.node for s in fakes})
    got = loot(grid, owned={s.node for s in fakes})
    assert not {got.index[s.node] for s in honest} & set(got.masked)  # no honest site trained or sent anything


# -- 3. different survivor sets for different sites -------------------------------------------------------
def split_views(view_of: dict[int, tuple[list[int], list[int]]], forward: str):
    """Tell participant p the survivor set view_of[p] at consistency; at unmask show it the signatures collected
    from its survivors: ``all`` of them, or only those over its own set (``matching``)."""
    def tamper(grid: InProcessGrid, m):
        me, stage = participants(grid).get(m.metadata.dst_node_id), stage_of(m)
        if stage == sa.CONSISTENCY:
            active, dead = view_of[me]
            return rewritten(m, **{keys.SECAGG_ACTIVE: active, keys.SECAGG_DEAD: dead})
        if stage == sa.UNMASK:
            sigs, (active, dead) = signatures(grid), view_of[me]
            chosen = sorted(p for p in sigs if p in active and (forward == "all" or view_of[p] == view_of[me]))
            return rewritten(m, **{keys.SECAGG_ACTIVE: active, keys.SECAGG_DEAD: dead, keys.SECAGG_SIGNERS: chosen,
                                   keys.SECAGG_SIGNATURES: [sigs[p] for p in chosen]})
        return m
    return tamper


ALIVE, FIVE_DEAD = ([1, 2, 3, 4, 5], []), ([1, 2, 3, 4], [5])  # the seed share of 5 from some, its key from others
VIEWS = {1: ALIVE, 2: ALIVE, 5: ALIVE, 3: FIVE_DEAD, 4: FIVE_DEAD}


def test_survivor_sets_that_differ_between_sites_reveal_nothing(tmp_path):
    sites = signed(tmp_path)
    _, report, grid, _ = run_round(sites, secure=SETTINGS, grid=InProcessGrid(sites, tamper=split_views(VIEWS, "all")))
    refused_by_all(sites, "signature over the survivor set does not verify: the coordinator showed sites "
                          "different survivor sets or altered a signature; refusing")
    assert "unmask: participant 3's (site3) signature over the survivor set does not verify: the coordinator " \
           "showed sites different survivor sets or altered a signature; refusing" in sites[0].refusals()
    aborted(report, "unmask")
    nothing_rebuilt(grid, sites)


def test_a_survivor_set_signed_by_fewer_than_t_sites_gets_no_key_share(tmp_path):
    """Sites 1, 2, 5 (t = 3) signed "all alive" and reveal seed shares, as in an honest round of five; sites 3
    and 4 were told "5 dropped", hold only their own two signatures and refuse: site5's mask key stays hidden."""
    sites = signed(tmp_path)
    _, _, grid, _ = run_round(sites, secure=SETTINGS, grid=InProcessGrid(sites, tamper=split_views(VIEWS, "matching")))
    for site in sites[2:4]:
        assert site.refusals() == ["unmask: 2 roster members signed this survivor set, the threshold is 3; refusing"]
    got = loot(grid)
    assert all("sk1" not in rebuilt(grid, got, s.node, T) for s in sites)  # no mask key: no single update


# -- 4. both shares of one peer ------------------------------------------------------------------------
def ask_both(grid: InProcessGrid, m):
    """The coordinator asks for participant 3's seed share (active) and its key share (dead) at once."""
    if stage_of(m) != sa.UNMASK:
        return m
    return rewritten(m, **{keys.SECAGG_DEAD: [3]})


def ask_key_of_an_active_site(grid: InProcessGrid, m):
    """The coordinator holds signatures over "all five alive" and asks for participant 3's key share."""
    if stage_of(m) != sa.UNMASK:
        return m
    return rewritten(m, **{keys.SECAGG_ACTIVE: [1, 2, 4, 5], keys.SECAGG_DEAD: [3]})


@pytest.mark.parametrize("tamper, reason, reason_of_3", [
    (ask_both, "unmask: a participant is listed twice or as both active and dropped; refusing", None),
    (ask_key_of_an_active_site, "unmask: the survivor set asked about (active [1, 2, 4, 5], dropped [3]) differs "
                                "from the one this site signed (active [1, 2, 3, 4, 5], dropped []); refusing",
     "unmask: the active and dropped lists do not match this site's mask partners"),
], ids=["in-one-request", "against-the-signed-set"])
def test_a_request_for_both_shares_of_one_peer_gets_nothing(tmp_path, tamper, reason, reason_of_3):
    sites = signed(tmp_path)
    _, report, grid, _ = run_round(sites, secure=SETTINGS, grid=InProcessGrid(sites, tamper=tamper))
    refused_by_all([s for s in sites if s is not sites[2]], reason)
    refused_by_all(sites[2:3], reason_of_3 or reason)  # participant 3 itself, told it dropped
    aborted(report, "unmask")
    nothing_rebuilt(grid, sites)


def skip_consistency(grid: InProcessGrid, m):
    """The coordinator asks for shares at once, without collecting the survivors' signatures."""
    if stage_of(m) != sa.CONSISTENCY:
        return m
    return rewritten(m, **{keys.SECAGG_STAGE: sa.UNMASK, keys.SECAGG_SIGNERS: [], keys.SECAGG_SIGNATURES: []})


def test_an_unmask_request_that_skips_the_consistency_stage_gets_nothing(tmp_path):
    sites = signed(tmp_path)
    _, report, grid, _ = run_round(sites, secure=SETTINGS, grid=InProcessGrid(sites, tamper=skip_consistency))
    refused_by_all(sites, "secure aggregation round 1: this site is past stage 'collect', the message needs stage "
                          "'consistency' done last; refusing")
    aborted(report, "consistency")
    nothing_rebuilt(grid, sites)


def test_a_second_unmask_request_after_an_honest_one_gets_nothing(tmp_path):
    sites = signed(tmp_path)
    _, report, grid, _ = run_round(sites, secure=SETTINGS)
    assert report.aggregated
    first = [m for m in grid.sent if stage_of(m) == sa.UNMASK]
    again = [rewritten(m, **{keys.SECAGG_ACTIVE: [1, 2, 4, 5], keys.SECAGG_DEAD: [3]}) for m in first]
    replies = grid.send_and_receive(again)
    assert all(r.has_error() and "past stage 'unmask'" in r.error.reason for r in replies)
    got = loot(grid)
    assert all("sk1" not in rebuilt(grid, got, s.node, T) for s in sites)


# -- 5. a round below the sites' minimum ---------------------------------------------------------------
def test_a_two_site_round_is_refused_at_setup(tmp_path):
    sites = signed(tmp_path, 2)  # default minimum: 3 roster members
    _, report, grid, _ = run_round(sites, secure=SETTINGS)
    refused_by_all(sites, "a secure round of 2 sites is below this site's minimum of 3 roster members "
                          "(nearl-client --min-secure-sites); refusing")
    aborted(report, "setup")
    nothing_rebuilt(grid, sites)


def test_a_round_shrunk_below_the_minimum_after_setup_is_refused(tmp_path):
    sites = signed(tmp_path, 3)  # threshold 2 of 3, minimum 3
    _, report, grid, _ = run_round(sites, secure=SETTINGS, drop={sa.SETUP: {sites[2].node}})
    refused_by_all(sites[:2], "share-keys: 2 roster members in this secure round, below this site's minimum of 3 "
                              "(nearl-client --min-secure-sites); refusing")
    aborted(report, "share-keys")
    nothing_rebuilt(grid, sites)


def test_a_sum_over_fewer_sites_than_the_minimum_is_refused_before_any_share(tmp_path):
    sites = signed(tmp_path, 5, min_sites=4)
    _, report, grid, _ = run_round(sites, secure=SETTINGS, drop={sa.COLLECT: {s.node for s in sites[3:]}})
    refused_by_all(sites[:3], "consistency: the sum would cover 3 sites' updates, below this site's minimum of 4 "
                              "(nearl-client --min-secure-sites); refusing")
    aborted(report, "consistency")
    nothing_rebuilt(grid, sites)
