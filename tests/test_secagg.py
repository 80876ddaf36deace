"""Secure aggregation, in process: exactness, what the server sees, the mask generator, refusals, egress.

The sites answer through the product's own handlers (tests/secagg_fakes.py); only their
training is replaced by a known update.
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from client.egress import EgressError, check_masked_reply, check_secagg_reply
from client.secagg import stage_reply
from nearl_core.errors import ConfigError
from nearl_protocol import keys
from nearl_protocol import secagg as sa
from nearl_protocol.arrays import decode_array
from server.secagg import SecAggSettings
from server.settings import FederationSettings
from server.strategy import make_strategy
from tests.secagg_fakes import LAYOUT, SCHEMA, flat_of, initial_record, make_sites, plain_mean, run_round, sent_update

SECURE = SecAggSettings(threshold=0.6, clip=0.1)


pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)


def tolerance(strategy, expected: np.ndarray) -> np.ndarray:
    """The stated bound (quantization) plus the float32 rounding of the stored global adapters."""
    rnd = strategy.secure.current
    weight = int(rnd.total[-2])
    return rnd.params.error_bound(weight, len(rnd.sharing)) + np.spacing(np.abs(expected).astype(np.float32))


def test_masked_aggregate_equals_the_plain_weighted_average_within_the_stated_bound(tmp_path):
    sites = make_sites(tmp_path, 5)
    arrays, report, _, strategy = run_round(sites, secure=SECURE)
    expected = plain_mean(sites)
    assert report.aggregated and not report.not_applied
    assert np.all(np.abs(flat_of(arrays) - expected) <= tolerance(strategy, expected))
    plain, _, _, _ = run_round(make_sites(tmp_path / "plain", 5), secure=None)  # the product's plain path
    assert np.all(np.abs(flat_of(arrays) - flat_of(plain)) <= tolerance(strategy, expected) + 1e-9)
    assert report.train_metrics["train_examples"] == sum(s.examples for s in sites)
    assert report.train_metrics["secagg_error_bound"] < 1e-6
    assert sorted(report.answered) == [s.name for s in sites]


def test_the_unmasked_integer_sum_is_bit_exact(tmp_path):
    sites = make_sites(tmp_path, 4, seed=3)
    _, _, _, strategy = run_round(sites, secure=SECURE)
    params = strategy.secure.current.params
    expected = np.zeros(LAYOUT.size + sa.EXTRA_SLOTS, np.uint32)
    for s in sites:
        expected = sa.add(expected, sa.encode(sent_update(s), s.examples, params))
    assert np.array_equal(strategy.secure.current.total, expected)


def test_a_coordinate_beyond_the_clip_range_is_clipped_and_counted(tmp_path):
    sites = make_sites(tmp_path, 3)
    sites[0].delta[:2] = [0.5, -0.5]
    _, report, _, strategy = run_round(sites, secure=SecAggSettings(threshold=0.6, clip=0.1))
    assert report.train_metrics["secagg_clipped"] == 2.0


def test_the_server_never_receives_an_update_and_gets_seed_or_key_shares_never_both(tmp_path):
    sites = make_sites(tmp_path, 5, seed=7)
    _, report, grid, strategy = run_round(sites, secure=SECURE, drop={"collect": {sites[1].node}})
    assert report.aggregated and report.train_metrics["secagg_dropped"] == 1
    params = strategy.secure.current.params
    secrets = [sent_update(s).astype(np.float32).tobytes()[:64] for s in sites]
    secrets += [sa.encode(sent_update(s), s.examples, params).tobytes()[:64] for s in sites]
    for reply in grid.received:
        blobs = [bytes(a.data) for rec in reply.content.array_records.values() for a in rec.values()]
        blobs += [v for rec in reply.content.config_records.values() for val in rec.values()
                  for v in (val if isinstance(val, list) else [val]) if isinstance(v, bytes)]
        assert not any(secret in blob for secret in secrets for blob in blobs)
        assert keys.NUM_EXAMPLES not in reply.content.metric_records.get(keys.METRICS, {})
        for rec in reply.content.array_records.values():
            values = decode_array(rec[keys.MASKED])
            for s in sites:  # a masked vector agrees with the plain quantized one nowhere but by chance
                assert np.mean(values == sa.encode(sent_update(s), s.examples, params)) < 0.05
    revealed: dict[int, set[str]] = {}
    for reply in grid.received:
        rec = reply.content.config_records.get(keys.SECAGG)
        if rec is not None and keys.SECAGG_SHARES in rec:
            for j, share in zip(rec[keys.SECAGG_PARTICIPANTS], rec[keys.SECAGG_SHARES]):
                revealed.setdefault(j, set()).add(share)
    node_of = {i: n for n, i in strategy.secure.current.index.items()}
    kinds = {}
    for j, shares in revealed.items():
        secret = combine_shares(sorted(shares)[: params.threshold])
        state = grid.secrets[node_of[j]] if node_of[j] in grid.secrets else None
        if state is None:  # the dropped site: its state is the one it had after sharing keys
            state = dict(next(s for s in sites if s.node == node_of[j]).context.state.config_records["nearl-secagg"])
        kinds[j] = {"seed" if secret == state.get("seed") else "key" if secret == state.get("sk1") else "?"}
        assert len({combine_shares(sorted(shares)[k: k + params.threshold]) for k in range(2)}) == 1
    dropped = strategy.secure.current.index[sites[1].node]
    assert kinds.pop(dropped) == {"key"}
    assert all(k == {"seed"} for k in kinds.values())


def test_a_site_answers_unmask_once_so_a_curious_server_cannot_get_both_shares(tmp_path):
    sites = make_sites(tmp_path, 3)
    _, _, grid, _ = run_round(sites, secure=SECURE)
    first = next(m for m in grid.sent if m.metadata.message_type == keys.SECAGG_MESSAGE_TYPE
                 and m.content[keys.SECAGG][keys.SECAGG_STAGE] == sa.UNMASK and m.metadata.dst_node_id == sites[0].node)
    rec = first.content[keys.SECAGG]
    again = ConfigRecord({**rec, keys.SECAGG_ACTIVE: [1, 2], keys.SECAGG_DEAD: [3]})  # now "3 dropped": its key
    first.content = RecordDict({keys.SECAGG: again})
    reply = stage_reply(first, sites[0].context, lambda *a, **k: None, binding=sites[0].binding)
    assert reply.has_error() and "past stage 'unmask'" in reply.error.reason


def test_masks_come_from_aes_ctr_on_the_full_secret_not_mersenne_twister():
    a = bytes(range(32))
    b = a[4:8] + a[:4] + a[8:]  # the same 32-bit XOR fold as a
    assert np.array_equal(pseudo_rand_gen(a, 2**32, [(8,)])[0], pseudo_rand_gen(b, 2**32, [(8,)])[0])  # Flower's
    assert not np.array_equal(sa.mask(a, 8, "x"), sa.mask(b, 8, "x"))
    assert not np.array_equal(sa.mask(a, 8, "x"), sa.mask(a, 8, "y"))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"nearl-secagg/x").derive(a)
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    reference = np.frombuffer(enc.update(bytes(4000)) + enc.finalize(), "<u4")
    assert np.array_equal(sa.mask(a, 1000, "x"), reference)
    mt = np.random.RandomState(int.from_bytes(a[:4], "little")).randint(0, 2**32 - 1, 1000, dtype=np.int64)
    assert np.mean(sa.mask(a, 1000, "x") == mt) < 0.01
    big = sa.mask(a, 200_000, "x").astype(np.float64)
    assert abs(big.mean() / 2**32 - 0.5) < 0.01 and big.max() > 2**31 > big.min()


def test_the_masked_reply_is_uint32_and_the_same_size_as_float32(tmp_path):
    sites = make_sites(tmp_path, 3)
    _, _, grid, _ = run_round(sites, secure=SECURE)
    masked = [decode_array(r.content[keys.ARRAYS][keys.MASKED]) for r in grid.received if r.content.array_records]
    assert len(masked) == 3
    assert all(m.dtype == np.uint32 and m.nbytes == 4 * LAYOUT.size + 4 * sa.EXTRA_SLOTS for m in masked)


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_strategies_are_refused_at_start_up(strategy):
    with pytest.raises(ConfigError, match=f"secure-aggregation: .*strategy {strategy} needs each site's update"):
        FederationSettings.from_run_config({"secure-aggregation": True, "strategy": strategy})
    with pytest.raises(ValueError, match="needs each site's update"):
        make_strategy(strategy, schema=SCHEMA, min_nodes=2, secure=SECURE)


def test_server_side_dp_and_a_half_threshold_are_refused():
    with pytest.raises(ConfigError, match="server-side DP clips each site's update"):
        FederationSettings.from_run_config({"secure-aggregation": True, "server-dp-noise": 1.0, "server-dp-clip": 1.0})
    with pytest.raises(ConfigError, match="secagg-threshold must be in"):
        FederationSettings.from_run_config({"secure-aggregation": True, "secagg-threshold": 0.5})
    assert FederationSettings.from_run_config({"secure-aggregation": True, "strategy": "fedyogi"}).secagg_settings()
    assert sa.threshold_for(4, 0.3) == 3 and sa.threshold_for(5, 0.6) == 3 and sa.threshold_for(3, 1.0) == 3


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedyogi"])
def test_other_linear_strategies_apply_to_the_unmasked_aggregate(tmp_path, strategy):
    secure, _, _, _ = run_round(make_sites(tmp_path, 3), strategy=strategy, secure=SECURE)
    plain, _, _, _ = run_round(make_sites(tmp_path / "p", 3), strategy=strategy, secure=None)
    assert np.allclose(flat_of(secure), flat_of(plain), atol=1e-6)
    assert not np.allclose(flat_of(secure), flat_of(initial_record()))


def test_a_site_that_declines_sends_weight_zero_and_the_round_goes_on(tmp_path):
    sites = make_sites(tmp_path, 4)
    sites[2].declines = True
    arrays, report, _, strategy = run_round(sites, secure=SECURE)
    kept = [s for i, s in enumerate(sites) if i != 2]
    expected = plain_mean(kept)
    assert np.all(np.abs(flat_of(arrays) - expected) <= tolerance(strategy, expected))
    assert list(report.declined) == ["site3"] and "site3" not in report.answered


def test_egress_refuses_a_masked_reply_with_clear_counts_or_other_arrays():
    good = RecordDict({keys.ARRAYS: ArrayRecord({keys.MASKED: Array(np.zeros(7, np.uint32))}),
                       keys.METRICS: MetricRecord({"train-loss": 0.1}), keys.SITE: ConfigRecord({"name": "s1"})})
    check_masked_reply(good, 7)
    with pytest.raises(EgressError, match="expected uint32\\[8\\]"):
        check_masked_reply(good, 8)
    counted = RecordDict({**dict(good.items()), keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3})})
    with pytest.raises(EgressError, match="must travel masked"):
        check_masked_reply(counted, 7)
    floats = RecordDict({**dict(good.items()), keys.ARRAYS: ArrayRecord({keys.MASKED: Array(np.zeros(7, np.float32))})})
    with pytest.raises(EgressError, match="expected uint32"):
        check_masked_reply(floats, 7)
    advert = {keys.SECAGG_PK1: b"a", keys.SECAGG_PK2: b"b", keys.SECAGG_NAME: "s1", keys.SECAGG_KEY_ID: "",
              keys.SECAGG_SIGNATURE: b""}
    setup = RecordDict({keys.SECAGG: ConfigRecord(advert), keys.SITE: ConfigRecord({"name": "s1"})})
    check_secagg_reply(setup, sa.SETUP)
    leaky = RecordDict({keys.SECAGG: ConfigRecord({**advert, "seed": b"s"}), keys.SITE: ConfigRecord({"name": "s1"})})
    with pytest.raises(EgressError, match="differ from the agreed"):
        check_secagg_reply(leaky, sa.SETUP)


def test_a_site_that_dies_after_key_sharing_is_reported_missing_by_name(tmp_path):
    sites = make_sites(tmp_path, 3)
    _, report, _, _ = run_round(sites, secure=SECURE, drop={"collect": {sites[2].node}})
    assert report.aggregated and report.missing == ["site3"] and report.answered == ["site1", "site2"]
