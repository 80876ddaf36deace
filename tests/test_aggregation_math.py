"""The aggregated values of each strategy, checked against numbers worked out by hand.

Every test goes through the project's real strategy (``make_strategy`` + ``aggregate_train``,
i.e. NEARL's reply screening in front of Flower's aggregation) and compares the result with a
literal written below, so a wrong rule (weighted instead of unweighted, per site instead of per
coordinate, the wrong trim count, the wrong Krum neighbourhood) fails.

Flower's definitions (flwr 1.42, ``flwr/serverapp/strategy``):

* FedMedian: ``np.median`` over sites, per coordinate, unweighted (even count: mean of the middle two).
* FedTrimmedAvg: ``trim_mean(stack, beta)`` drops ``int(beta * n)`` values at each end of every
  coordinate and takes the unweighted mean of the rest.
* Krum (= MultiKrum with ``num_nodes_to_select=1``): squared L2 distances between the flattened
  updates; a site's score is the sum of its distances to its ``max(1, n - f - 2)`` nearest other
  sites (f = ``num_malicious_nodes``); the lowest score wins and its update is the result.
  The project exposes Krum only (``krum-malicious``), not MultiKrum.
* FedAvg / FedProx (server side): example-weighted mean (``num-examples``).
"""

import numpy as np
import pytest

from server.strategy import make_strategy
from tests.fed_helpers import reply_from, train_reply_content

SCHEMA = {"a.weight": ((2, 2), "float32"), "b.bias": ((3,), "float32")}

# Five sites; each coordinate has its own order and outliers, so no single site is the median.
SITES = {
    #        a.weight            b.bias
    "s1": ([[1, 10], [4, 0]], [9, 0.5, 100]),
    "s2": ([[2, 20], [-3, -1]], [8, 1.5, -100]),
    "s3": ([[3, 60], [10, 4]], [3, 2.5, 7]),
    "s4": ([[7, 90], [0, 9]], [1, 3.5, 8]),
    "s5": ([[100, -50], [-1, -9]], [0, 4.5, 9]),
}
# very unequal example counts: the median, trimmed mean and Krum must ignore them
EXAMPLES = {"s1": 1, "s2": 1, "s3": 2, "s4": 4, "s5": 2}


pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)


def update(a, b) -> dict[str, np.ndarray]:
    return {"a.weight": np.asarray(a, np.float32), "b.bias": np.asarray(b, np.float32)}


def aggregate(name: str, sites: dict[str, tuple], examples: dict[str, int] = EXAMPLES,
              **options) -> dict[str, np.ndarray]:
    strategy = make_strategy(name, schema=SCHEMA, min_nodes=1, total_rounds=1, options=options)
    replies = [reply_from(i, train_reply_content(site, update(*values), n=examples[site]))
               for i, (site, values) in enumerate(sites.items(), start=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    out = {k: arrays[k].numpy() for k in SCHEMA}
    assert all(str(v.dtype) == "float32" for v in out.values())
    return out


def assert_result(got: dict[str, np.ndarray], a, b) -> None:
    np.testing.assert_allclose(got["a.weight"], np.asarray(a, np.float32), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["b.bias"], np.asarray(b, np.float32), rtol=1e-6, atol=1e-6)


def first(n: int) -> dict[str, tuple]:
    return dict(list(SITES.items())[:n])


# -- FedMedian ---------------------------------------------------------------------------------------
def test_fedmedian_odd_count_is_the_middle_value_of_each_coordinate():
    # a[0,0] {1,2,3,7,100} -> 3       a[0,1] {10,20,60,90,-50} -> 20
    # a[1,0] {4,-3,10,0,-1} -> 0      a[1,1] {0,-1,4,9,-9} -> 0
    # b[0] {9,8,3,1,0} -> 3   b[1] {.5,1.5,2.5,3.5,4.5} -> 2.5   b[2] {100,-100,7,8,9} -> 8
    assert_result(aggregate("fedmedian", SITES), [[3, 20], [0, 0]], [3, 2.5, 8])


def test_fedmedian_even_count_is_the_mean_of_the_two_middle_values():
    # sites s1..s4:
    # a[0,0] 1,2|3,7 -> 2.5    a[0,1] 10,20|60,90 -> 40    a[1,0] -3,0|4,10 -> 2    a[1,1] -1,0|4,9 -> 2
    # b[0] 1,3|8,9 -> 5.5      b[1] .5,1.5|2.5,3.5 -> 2    b[2] -100,7|8,100 -> 7.5
    assert_result(aggregate("fedmedian", first(4)), [[2.5, 40], [2, 2]], [5.5, 2, 7.5])


# -- FedTrimmedAvg -----------------------------------------------------------------------------------
def test_fedtrimmedavg_beta_02_of_five_sites_drops_the_lowest_and_highest_per_coordinate():
    # int(0.2 * 5) = 1 value cut at each end; unweighted mean of the middle three:
    # a[0,0] 1,[2,3,7],100 -> 4      a[0,1] -50,[10,20,60],90 -> 30
    # a[1,0] -3,[-1,0,4],10 -> 1     a[1,1] -9,[-1,0,4],9 -> 1
    # b[0] 0,[1,3,8],9 -> 4          b[1] .5,[1.5,2.5,3.5],4.5 -> 2.5    b[2] -100,[7,8,9],100 -> 8
    assert_result(aggregate("fedtrimmedavg", SITES, **{"trim-beta": 0.2}), [[4, 30], [1, 1]], [4, 2.5, 8])


def test_fedtrimmedavg_beta_04_of_five_sites_is_the_median():
    # int(0.4 * 5) = 2 cut at each end: only the middle value is left
    assert_result(aggregate("fedtrimmedavg", SITES, **{"trim-beta": 0.4}), [[3, 20], [0, 0]], [3, 2.5, 8])


def test_fedtrimmedavg_default_beta_with_four_sites_trims_nothing():
    # int(0.2 * 4) = 0: the plain *unweighted* mean of s1..s4 (the example counts play no part)
    # a[0,0] 13/4   a[0,1] 180/4   a[1,0] 11/4   a[1,1] 12/4   b[0] 21/4   b[1] 8/4   b[2] 15/4
    assert_result(aggregate("fedtrimmedavg", first(4)), [[3.25, 45], [2.75, 3]], [5.25, 2, 3.75])


# -- Krum ----------------------------------------------------------------------------------------------
# Site k sends p_k * U with one fixed direction U, so the squared distance between two sites is
# |U|^2 (p_i - p_j)^2 = 8 (p_i - p_j)^2 and the scores below are all multiplied by 8.
U_A, U_B = np.array([[1, -1], [2, 0]]), np.array([0, 1, -1])  # |U|^2 = 1+1+4+0 + 0+1+1 = 8
P = {"k1": 7, "k2": 0, "k3": 20, "k4": 3, "k5": 1}
# (p_i - p_j)^2 between the positions 0, 1, 3, 7, 20:
#        0    1    3    7    20
#   0    -    1    9   49   400
#   1    1    -    4   36   361
#   3    9    4    -   16   289
#   7   49   36   16    -   169
#  20  400  361  289  169    -


def krum(malicious: int) -> dict[str, np.ndarray]:
    sites = {s: ((p * U_A).tolist(), (p * U_B).tolist()) for s, p in P.items()}
    examples = {"k1": 5, "k2": 50, "k3": 500, "k4": 1, "k5": 2}
    return aggregate("krum", sites, examples, **{"krum-malicious": malicious})


def test_krum_with_one_malicious_site_selects_the_update_with_the_tightest_two_neighbours():
    # n=5, f=1: each site sums its n-f-2 = 2 nearest distances (x8):
    # p=0: 1+9=10   p=1: 1+4=5   p=3: 4+9=13   p=7: 16+36=52   p=20: 169+289=458  -> p=1 (site k5)
    assert_result(krum(1), (1 * U_A).tolist(), (1 * U_B).tolist())


def test_krum_without_malicious_sites_uses_three_neighbours_and_selects_another_update():
    # n=5, f=0: the 3 nearest distances (x8):
    # p=0: 1+9+49=59   p=1: 1+4+36=41   p=3: 4+9+16=29   p=7: 16+36+49=101   p=20: 169+289+361=819
    # -> p=3 (site k4), whose own update is returned unchanged (its example count does not matter)
    assert_result(krum(0), (3 * U_A).tolist(), (3 * U_B).tolist())


# -- FedAvg (reference) ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_are_the_example_weighted_mean(name):
    # weights 1,1,2,4,2 (sum 10):
    # a[0,0] 1+2+6+28+200 = 237 -> 23.7      a[0,1] 10+20+120+360-100 = 410 -> 41
    # a[1,0] 4-3+20+0-2 = 19 -> 1.9          a[1,1] 0-1+8+36-18 = 25 -> 2.5
    # b[0] 9+8+6+4+0 = 27 -> 2.7   b[1] .5+1.5+5+14+9 = 30 -> 3   b[2] 100-100+14+32+18 = 64 -> 6.4
    assert_result(aggregate(name, SITES), [[23.7, 41], [1.9, 2.5]], [2.7, 3, 6.4])
