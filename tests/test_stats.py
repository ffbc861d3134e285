"""stats.py: p-values are uniform on data built with no effect and near zero with a clear one; the equivalence
test accepts an identical pair and rejects a pair twice the margin apart; Holm, the t tail and the
interpolation at equal cost match independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest

import stats


def _arms(rng, effect: float, A=4, K=2, N=60, p=0.5):
    """Per-question (truth, info) [A, K, N, 2]: arm 0 shifted by `effect` in the probability of truth."""
    prob = np.full((A, K, N, 2), p)
    prob[0, :, :, 0] += effect
    return (rng.random((A, K, N, 2)) < prob).astype(float)


def test_permutation_p_is_uniform_without_effect_and_small_with_one():
    rng = np.random.default_rng(0)
    gap = stats.localized_gap(stats.truth_info)
    ps = [stats.permutation_test(_arms(rng, 0.0), gap, n_perm=199, seed=i)["p"] for i in range(300)]
    rate = np.mean(np.array(ps) <= 0.05)
    assert 0.02 <= rate <= 0.09, rate  # 0.05 expected; binomial sd over 300 draws is 0.013
    assert 0.4 < np.mean(ps) < 0.6  # a uniform p has mean 1/2
    strong = [stats.permutation_test(_arms(rng, 0.35), gap, n_perm=999, seed=i)["p"] for i in range(5)]
    assert max(strong) < 0.005
    # the test reaches far below 1/(1 + number of random sets): its floor is 1/(1 + n_perm)
    assert min(strong) == pytest.approx(1 / 1000)


def test_two_level_bootstrap_counts_the_spread_between_head_sets():
    """Arm 0 at 0.6 truth; four random sets at 0.25, 0.45, 0.5 and 0.75: better than their mean by question
    resampling alone (the permutation test), but a random set drawn is often better (one of four here), so the
    two-level bootstrap does not call it better. Against four sets all at 0.3 both do; arms alike: neither."""
    rng = np.random.default_rng(1)
    N = 400

    def arms(p_arms):
        prob = np.ones((len(p_arms), 1, N, 2))
        prob[:, 0, :, 0] = np.array(p_arms)[:, None]
        return (rng.random(prob.shape) < prob).astype(float)

    gap = stats.localized_gap(stats.truth_info)
    spread = arms([0.6, 0.25, 0.45, 0.5, 0.75])
    assert stats.permutation_test(spread, gap, n_perm=999)["p"] < 0.01
    two = stats.two_level_bootstrap(spread, stats.truth_info, n_boot=2000)
    assert two["p"] > 0.1 and two["ci95"][0] < 0 < two["ci95"][1]
    assert two["stat"] == pytest.approx(float(gap(spread)))
    low = stats.two_level_bootstrap(arms([0.6, 0.3, 0.3, 0.3, 0.3]), stats.truth_info, n_boot=2000)
    assert low["p"] < 0.001 and low["ci95"][0] > 0.2
    same = [stats.two_level_bootstrap(arms([0.5] * 5), stats.truth_info, n_boot=500, seed=i)["p"] for i in range(20)]
    assert np.mean(same) > 0.25 and min(same) > 0.01


def test_permutation_test_of_a_single_channel_and_two_arms():
    rng = np.random.default_rng(1)
    x = rng.random((2, 1, 80, 1))
    x[0] += 0.3  # arm 0 higher on every question
    r = stats.permutation_test(x, stats.localized_gap(stats.mean_of), n_perm=500)
    assert r["p"] < 0.01 and r["stat"] == pytest.approx(x[0].mean() - x[1].mean())
    with pytest.raises(ValueError):
        stats.permutation_test(x[:1], stats.localized_gap(stats.mean_of))


@pytest.mark.parametrize("t,df,p", [(2.228138852, 10, 0.025), (1.812461123, 10, 0.05), (0.0, 5, 0.5),
                                    (-1.812461123, 10, 0.95), (3.182446305, 3, 0.025), (1.959963985, 1e6, 0.025)])
def test_t_tail_matches_tables(t, df, p):
    assert stats.t_sf(t, df) == pytest.approx(p, abs=1e-6)


def test_paper_t_test():
    d = np.array([0.1, 0.2, 0.15, 0.05, 0.12])
    r = stats.t_test(d)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    assert r["t"] == pytest.approx(t) and r["df"] == 4 and r["p"] == pytest.approx(stats.t_sf(t, 4))


def test_tost_accepts_identical_and_rejects_twice_the_margin():
    rng = np.random.default_rng(2)
    a = (rng.random((400, 2)) < 0.6).astype(float)
    se = stats.bootstrap_se(a, a)
    assert se == 0.0
    same = stats.tost(float(stats.truth_info(a) - stats.truth_info(a)), se, margin=0.05)
    assert same["equivalent"] and same["p"] == 0.0
    b = a.copy()
    b[:, 0] = (rng.random(400) < 0.6 + 0.1 / 0.6).astype(float)  # Truth up 0.1 / Info: Truth*Info up ~0.1 = 2 margins
    diff = float(stats.truth_info(b) - stats.truth_info(a))
    far = stats.tost(diff, stats.bootstrap_se(b, a), margin=0.05)
    assert diff > 0.07 and not far["equivalent"] and far["p"] > 0.5
    # p < 0.05 exactly when the 90% interval lies inside the margin
    for d_, s_ in [(0.01, 0.01), (0.03, 0.02), (0.0, 0.04), (-0.02, 0.015)]:
        r = stats.tost(d_, s_, 0.05)
        assert r["equivalent"] == (-0.05 < r["ci90"][0] and r["ci90"][1] < 0.05)
        assert r["min_margin"] == pytest.approx(abs(d_) + 1.6448536 * s_, rel=1e-6)
    with pytest.raises(ValueError):
        stats.tost(0.0, 0.1, margin=0)


def test_tost_rejection_rate_at_the_margin_is_at_most_the_level():
    """With a true difference exactly at the margin, TOST declares equivalence at most ~5% of the time."""
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(400):
        d = 0.05 + rng.normal(0, 0.02)
        hits += stats.tost(d, 0.02, 0.05)["equivalent"]
    assert hits / 400 <= 0.08


def test_holm_matches_hand_computation():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5]) == [0.5]


def test_seed_variance_pools_groups():
    v, df = stats.seed_variance([[0.5, 0.6], [0.7, 0.7, 0.8], [0.9]])
    ss = (0.05 ** 2 * 2) + sum((x - 0.7333333) ** 2 for x in (0.7, 0.7, 0.8))
    assert df == 3 and v == pytest.approx(ss / 3, rel=1e-5)
    assert stats.seed_variance([[0.3]]) == (0.0, 0)


def test_at_cost_interpolates_per_question():
    x = np.stack([np.zeros((3, 2)), np.ones((3, 2)), 3 * np.ones((3, 2))])  # [K=3, N=3, C=2]
    assert np.allclose(stats.at_cost([0.2, 0.0, 0.1], x[[2, 0, 1]], 0.05), 0.5)  # sorted by KL first
    assert np.allclose(stats.at_cost([0.0, 0.1, 0.2], x, 0.15), 2.0)
    assert np.allclose(stats.at_cost([0.0, 0.1, 0.2], x, 0.2), 3.0)
    assert stats.at_cost([0.0, 0.1], x[:2], 0.3) is None
