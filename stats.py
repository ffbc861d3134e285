"""stats.py: the tests behind "better than" and "as good as", with the test question as the unit of resampling.

  better than   `permutation_test`: per question, the labels of the localized edit and the random edits are
                permuted (all conditions of a question together), the statistic recomputed; one-sided p-value.
                Pools random sets and alphas (taus) in one statistic: better than *these* random sets.
                `two_level_bootstrap`: random sets, then questions, resampled: better than a random set
                *drawn*, the spread between head sets included. The paper's kind of test beside them:
                `t_test` of the (localized - random) differences over (set, alpha) pairs.
  as good as    `tost`: two one-sided tests against +-margin on a paired-bootstrap standard error (questions),
                plus the training-seed variance (`seed_variance`) where the edits are single training runs.
  many tests    `holm`: Holm's step-down adjusted p-values (family-wise error rate).
  matched cost  `at_cost`: per-question values interpolated along an alpha (tau) curve to a given KL.

Values are arrays over questions; Truth*Info is the product of the mean Truth and the mean Info
(`truth_info`), as the paper computes it, so tests of it resample (truth, info) pairs of questions jointly.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable

import numpy as np

MARGIN = 0.05  # the default equivalence margin, in Truth*Info
N01 = NormalDist()  # the standard normal (stdlib)


def truth_info(x: np.ndarray) -> np.ndarray:
    """Truth*Info of per-question (truth, info) values: x [..., N, 2] -> [...] = mean(truth) * mean(info)."""
    m = x.mean(-2)  # [..., 2]
    return m[..., 0] * m[..., 1]


def mean_of(x: np.ndarray) -> np.ndarray:
    """The mean of a single per-question channel: x [..., N, 1] -> [...]."""
    return x[..., 0].mean(-1)


def localized_gap(stat: Callable = truth_info) -> Callable:
    """The statistic of "better than": arms [A, K, N, C] (arm 0 the localized edit, 1.. the random ones; K
    conditions: alphas or taus) -> mean over K of stat(arm 0) - mean over random arms of stat(arm j)."""
    def gap(x: np.ndarray) -> np.ndarray:  # x: [..., A, K, N, C]
        s = stat(x)  # [..., A, K]
        return (s[..., 0, :] - s[..., 1:, :].mean(-2)).mean(-1)
    return gap


def permutation_test(x: np.ndarray, stat: Callable, n_perm: int = 10_000, seed: int = 0, chunk: int = 500
                     ) -> dict:
    """One-sided paired permutation test that arm 0 beats the other arms. x: [A, K, N, C] per-question values of
    A arms (edits) under K conditions, N questions, C channels. Null: per question, the A arms' values are
    exchangeable (the localized set is one more random set). Each permutation shuffles the arm labels of every
    question independently (the same shuffle for all K conditions of a question), and p = (1 + #{stat* >=
    stat}) / (1 + n_perm). Returns the observed statistic, p and the permutation distribution's mean and sd."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"permutation_test: expected [arms >= 2, conditions, questions, channels], got {x.shape}")
    A, K, N, C = x.shape
    obs = float(stat(x))
    rng = np.random.default_rng(seed)
    null = []
    xq = np.moveaxis(x, 2, 0)  # [N, A, K, C]
    for start in range(0, n_perm, chunk):
        P = min(chunk, n_perm - start)
        perm = rng.random((P, N, A)).argsort(-1)  # [P, N, A]: a permutation of the arms per question
        xp = xq[np.arange(N)[None, :, None], perm]  # [P, N, A, K, C]
        null.append(stat(np.moveaxis(xp, 1, 3)))  # [P, A, K, N, C] -> [P]
    null = np.concatenate(null)
    p = (1 + int((null >= obs - 1e-12).sum())) / (1 + n_perm)
    return {"stat": obs, "p": p, "n_perm": n_perm, "null_mean": float(null.mean()), "null_sd": float(null.std())}


def two_level_bootstrap(x: np.ndarray, stat: Callable, n_boot: int = 10_000, seed: int = 0, chunk: int = 200
                        ) -> dict:
    """One-sided test that arm 0 beats a *random draw* of the other arms, not only these: each replicate
    resamples the other arms (the random head sets, with replacement) and then the test questions (with
    replacement, the same for every arm), so the spread between head sets enters the p-value as the spread
    between questions does. x: [A, K, N, C] as in `permutation_test`; the statistic is its gap (arm 0 minus the
    mean of the drawn arms, mean over K). p = (1 + #{gap* <= 0}) / (1 + n_boot) (percentile bootstrap), and the
    95% percentile interval of the gap. With few other arms the set-level spread is under-estimated (by a
    factor (A - 2) / (A - 1) in variance), so p is, if anything, too small."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"two_level_bootstrap: expected [arms >= 2, conditions, questions, channels], got {x.shape}")
    A, K, N, C = x.shape
    s_obs = stat(x)  # [A, K]
    obs = float((s_obs[0] - s_obs[1:].mean(0)).mean())
    rng = np.random.default_rng(seed)
    gaps = []
    for start in range(0, n_boot, chunk):
        P = min(chunk, n_boot - start)
        q = rng.integers(0, N, size=(P, N))  # [P, N] questions, shared by every arm of a replicate
        arms = rng.integers(1, A, size=(P, A - 1))  # [P, A-1] the other arms, drawn with replacement
        s = stat(x[:, :, q].transpose(2, 0, 1, 3, 4))  # [A, K, P, N, C] -> [P, A, K, N, C] -> [P, A, K]
        other = np.take_along_axis(s, arms[:, :, None], axis=1).mean(1)  # [P, K]
        gaps.append((s[:, 0] - other).mean(-1))  # [P]
    gaps = np.concatenate(gaps)
    p = (1 + int((gaps <= 0).sum())) / (1 + n_boot)
    return {"stat": obs, "p": p, "n_boot": n_boot, "ci95": [float(np.quantile(gaps, 0.025)),
                                                             float(np.quantile(gaps, 0.975))], "n_other": A - 1}


def t_sf(t: float, df: float) -> float:
    """P(T >= t) for Student's t with df degrees of freedom (regularized incomplete beta)."""
    if not math.isfinite(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1 - tail


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz's method)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1 + num / (c if abs(c) > 1e-300 else 1e-300)
        f *= c * d
        if abs(c * d - 1) < 1e-14:
            break
    return front * (f - 1)


def t_test(d) -> dict:
    """The paper's kind of test: a one-sample t-test that the mean of the differences d (localized minus
    random, one per (random set, alpha) pair) is above zero. It treats every pair as independent although they
    share the test questions and the localized edit, so its p-value is smaller than the data support."""
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n < 2:
        return {"t": float("nan"), "df": n - 1, "p": float("nan"), "n": n}
    sd = d.std(ddof=1)
    t = float(d.mean() / (sd / math.sqrt(n))) if sd > 0 else (math.inf if d.mean() > 0 else -math.inf)
    return {"t": t, "df": n - 1, "p": t_sf(t, n - 1), "n": n, "mean": float(d.mean())}


def bootstrap_se(a: np.ndarray, b: np.ndarray | None, stat: Callable = truth_info, n_boot: int = 2000,
                 seed: int = 0) -> float:
    """The paired-bootstrap standard error of stat(a) - stat(b), resampling questions jointly. a, b: [N, C]."""
    a = np.asarray(a, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, a.shape[0], size=(n_boot, a.shape[0]))  # [n_boot, N]
    d = stat(a[idx]) - (stat(np.asarray(b, dtype=np.float64)[idx]) if b is not None else 0.0)  # [n_boot]
    return float(np.std(d, ddof=1))


def se_with_seeds(a: np.ndarray, b: np.ndarray | None, stat: Callable, seed_var: float, k_a: int,
                  k_b: int | None = None) -> tuple[float, float]:
    """The standard error of stat(a) - stat(b) (or of stat(a) alone, b None) for edits averaged over k_a and k_b
    training seeds: the paired bootstrap over questions plus the training-seed variance of each mean
    (seed_var / k). Returns (standard error, its question part)."""
    se_q = bootstrap_se(a, b, stat)
    return float(np.sqrt(se_q ** 2 + seed_var * (1 / k_a + (1 / k_b if b is not None else 0.0)))), se_q


def tost(diff: float, se: float, margin: float = MARGIN, level: float = 0.05) -> dict:
    """Two one-sided tests of |true difference| < margin on an estimate `diff` with standard error `se` (normal
    approximation). p = max of the two one-sided p-values; equivalent when p < level, which is the same as the
    (1 - 2 level) interval lying inside (-margin, margin). Also the smallest margin this data could show."""
    if not margin > 0:
        raise ValueError(f"tost: margin {margin} must be > 0")
    if se <= 0:
        p = 0.0 if abs(diff) < margin else 1.0
    else:
        p = max(1 - N01.cdf((diff + margin) / se), 1 - N01.cdf((margin - diff) / se))
    z = N01.inv_cdf(1 - level)  # 1.645 at level 0.05: the (1 - 2 level) interval
    return {"diff": diff, "se": se, "margin": margin, "p": p, "equivalent": p < level,
            "ci90": [diff - z * se, diff + z * se], "min_margin": abs(diff) + z * se}


def holm(p) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate across the tests)."""
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p)
    adj = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (p.size - rank) * p[i]))
        adj[i] = running
    return adj.tolist()


def seed_variance(groups) -> tuple[float, int]:
    """The pooled variance of a statistic across training seeds: groups, each the values of one configuration
    trained with several seeds (same test questions). Returns (variance, degrees of freedom); (0, 0) without a
    group of two."""
    ss, df = 0.0, 0
    for g in groups:
        g = np.asarray(g, dtype=np.float64)
        if g.size >= 2:
            ss += float(((g - g.mean()) ** 2).sum())
            df += g.size - 1
    return (ss / df, df) if df else (0.0, 0)


def at_cost(kl, x: np.ndarray, target: float) -> np.ndarray | None:
    """Per-question values of an edit's curve (alphas or taus sorted by KL), linearly interpolated to the
    off-target cost `target`. kl: [K] the curve's KL; x: [K, N, C]. None when target is outside the curve."""
    kl = np.asarray(kl, dtype=np.float64)
    order = np.argsort(kl)
    kl, x = kl[order], np.asarray(x, dtype=np.float64)[order]
    if kl.size == 0 or target < kl[0] - 1e-12 or target > kl[-1] + 1e-12:
        return None
    j = int(np.clip(np.searchsorted(kl, target), 1, max(kl.size - 1, 1)))
    if kl.size == 1:
        return x[0]
    w = 0.0 if kl[j] == kl[j - 1] else (target - kl[j - 1]) / (kl[j] - kl[j - 1])
    return (1 - w) * x[j - 1] + w * x[j]
