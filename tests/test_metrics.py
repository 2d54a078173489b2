"""Metrics: brute-force references, invariances, the two TPR readings, degenerate input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_detect.detectors import get
from distill_detect.metrics import (
    OneClassWarning,
    bootstrap_auc_ci,
    membership_score,
    roc_auc,
    summarize,
    tpr_at_fpr,
)

# No per-example deadline: the first call may import sklearn; fixed example count keeps files fast.
RELAXED = settings(deadline=None, max_examples=60)

# -- brute-force references --------------------------------------------------------------------------


def pair_auc(y, s) -> float:
    """O(n^2) AUC: the fraction of (member, non-member) pairs ranked right, ties count one half."""
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def sweep(y, s):
    """(fpr, tpr) at every threshold 'score >= t', t from +inf down through each distinct score."""
    y, s = np.asarray(y), np.asarray(s, dtype=float)
    P, N = (y == 1).sum(), (y == 0).sum()
    pts = [(0.0, 0.0)]
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        pts.append((float((pred & (y == 0)).sum() / N), float((pred & (y == 1)).sum() / P)))
    return pts


def strict_tpr(y, s, fpr) -> float:
    """Largest TPR over thresholds whose FPR is at most ``fpr``."""
    return max(t for f, t in sweep(y, s) if f <= fpr)


def paper_tpr_no_ties(y, s, fpr) -> float:
    """TPR at the first threshold (from the top) whose FPR reaches ``fpr``.

    Without tied scores, sklearn's drop_intermediate only removes points in the middle of a
    straight horizontal or vertical run, and the run's kept end has the same TPR (horizontal)
    or is reached later (vertical corners are kept), so this equals the paper's reading.
    """
    return next(t for f, t in sweep(y, s) if f >= fpr - 1e-12)


# Hypothesis: labelled integer scores (ties allowed) with both classes present.
def labelled(min_size=2, max_size=40, unique=False):
    scores = st.lists(st.integers(-50, 50), min_size=min_size, max_size=max_size, unique=unique)
    return scores.flatmap(
        lambda s: st.tuples(
            st.lists(st.integers(0, 1), min_size=len(s), max_size=len(s)).filter(lambda y: 0 < sum(y) < len(y)),
            st.just(s),
        )
    )


# -- AUC ----------------------------------------------------------------------------------------------


def test_auc_hand():
    # pairs (member, non-member): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, .) ok twice -> 3/4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [1.0, 1.0]) == 0.5  # a tie counts one half
    assert roc_auc([0, 0, 1], [0.0, 1.0, 2.0]) == 1.0


@RELAXED
@given(labelled())
def test_auc_matches_pair_counting(ys):
    y, s = ys
    assert roc_auc(y, s) == pytest.approx(pair_auc(y, s), abs=1e-12)


@RELAXED
@given(labelled())
def test_auc_of_negated_scores(ys):
    y, s = ys
    assert roc_auc(y, -np.asarray(s)) == pytest.approx(1.0 - roc_auc(y, s), abs=1e-12)


MONOTONE = [
    lambda x: 3.0 * x + 1.0,
    lambda x: np.asarray(x, dtype=float) ** 3,
    lambda x: np.exp(np.asarray(x, dtype=float) / 10.0),
    lambda x: np.arctan(np.asarray(x, dtype=float)),
]


@RELAXED
@given(labelled(), st.sampled_from(range(len(MONOTONE))))
def test_metrics_invariant_to_monotone_transforms(ys, which):
    y, s = ys
    s = np.asarray(s, dtype=float)
    g = MONOTONE[which](s)
    assert roc_auc(y, g) == pytest.approx(roc_auc(y, s), abs=1e-12)
    for reading in ("strict", "paper"):
        for f in (0.01, 0.1, 0.3):
            assert tpr_at_fpr(y, g, fpr=f, reading=reading) == tpr_at_fpr(y, s, fpr=f, reading=reading)


# -- TPR at a fixed FPR: both readings ------------------------------------------------------------------


def test_tpr_readings_hand():
    # descending: 0.95 P, 0.9 N, 0.6 P, 0.5 P, 0.4 P, 0.3 N, ...
    # ROC points: (0,0) (0,.25) (.25,.25) (.25,.5) (.25,.75) (.25,1) (.5,1) ...
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.9, 0.4, 0.5, 0.6, 0.95]
    assert tpr_at_fpr(y, s, fpr=0.01, reading="strict") == 0.25
    assert tpr_at_fpr(y, s, fpr=0.25, reading="strict") == 1.0
    # the paper's reading stops at the first point with FPR >= target: (.25, .25)
    assert tpr_at_fpr(y, s, fpr=0.01, reading="paper") == 0.25
    assert tpr_at_fpr(y, s, fpr=0.25, reading="paper") == 0.25


def test_paper_reading_can_sit_above_the_target_fpr():
    # 50 non-members: one false positive is already 2% FPR. One non-member ties with 10 members
    # at 0.9, above 30 members: no threshold can take those 10 without 2% FPR.
    y = np.r_[np.zeros(50), np.ones(50)]
    s = np.r_[np.linspace(0, 0.5, 49), [0.9], np.full(10, 0.9), np.linspace(0.6, 0.8, 10), np.linspace(0.95, 1.0, 30)]
    assert tpr_at_fpr(y, s, fpr=0.01, reading="strict") == pytest.approx(30 / 50)  # at FPR 0
    assert tpr_at_fpr(y, s, fpr=0.01, reading="paper") == pytest.approx(40 / 50)  # at FPR 2%


@RELAXED
@given(labelled(), st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5, 1.0]))
def test_strict_reading_matches_threshold_sweep(ys, f):
    y, s = ys
    assert tpr_at_fpr(y, s, fpr=f, reading="strict") == pytest.approx(strict_tpr(y, s, f), abs=1e-12)


@RELAXED
@given(labelled(unique=True), st.sampled_from([0.01, 0.05, 0.2, 0.5, 1.0]))
def test_paper_reading_matches_threshold_sweep_without_ties(ys, f):
    y, s = ys
    assert tpr_at_fpr(y, s, fpr=f, reading="paper") == pytest.approx(paper_tpr_no_ties(y, s, f), abs=1e-12)


@RELAXED
@given(labelled(), st.sampled_from([0.01, 0.05, 0.2, 0.5]))
def test_paper_reading_bounds_with_ties(ys, f):
    """With ties too: at least every TPR reached below the target FPR, at most the best TPR at the
    first FPR that reaches it (sklearn may thin points, but never changes a kept point)."""
    y, s = ys
    pts = sweep(y, s)
    paper = tpr_at_fpr(y, s, fpr=f, reading="paper")
    assert paper >= max(t for x, t in pts if x < f) - 1e-12
    first_f = min(x for x, _ in pts if x >= f)
    assert paper <= max(t for x, t in pts if x <= first_f + 1e-12) + 1e-12
    assert (first_f, paper) in [(x, t) for x, t in pts] or paper in [t for _, t in pts]


def test_tpr_bad_reading():
    with pytest.raises(ValueError, match="reading"):
        tpr_at_fpr([0, 1], [0.0, 1.0], reading="loose")


# -- degenerate input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("y", [[1, 1, 1], [0, 0, 0]])
def test_one_class_gives_nan_and_warning(y):
    s = [0.1, 0.2, 0.3]
    with pytest.warns(OneClassWarning):
        assert math.isnan(roc_auc(y, s))
    for reading in ("strict", "paper"):
        with pytest.warns(OneClassWarning):
            assert math.isnan(tpr_at_fpr(y, s, reading=reading))
    with pytest.warns(OneClassWarning):
        lo, hi = bootstrap_auc_ci(y, s, n_resamples=10)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.warns(OneClassWarning) as rec:
        out = summarize(y, s, n_resamples=10)
    assert len([w for w in rec if issubclass(w.category, OneClassWarning)]) == 1  # once per method
    assert math.isnan(out["auc"]) and math.isnan(out["tpr_at_1pct_fpr"])


@pytest.mark.parametrize(
    "y,s,match",
    [
        ([0, 1], [0.1], "entries"),
        ([0, 2], [0.1, 0.2], "only 0"),
        ([0, 1], [0.1, float("nan")], "non-finite"),
        ([0, 1], [0.1, float("inf")], "non-finite"),
    ],
)
def test_bad_input_raises(y, s, match):
    with pytest.raises(ValueError, match=match):
        roc_auc(y, s)


# -- orientation and the summary block ------------------------------------------------------------------


def test_membership_score_applies_direction_once():
    raw = [0.1, 0.5]
    assert membership_score(get("tpd"), raw).tolist() == [-0.1, -0.5]
    assert membership_score(get("min_k"), raw).tolist() == [0.1, 0.5]


def test_tpd_scores_oriented_for_auc():
    # members have lower TPD: after orientation they must get AUC 1
    y = [1, 1, 0, 0]
    raw_tpd = [0.05, 0.1, 0.6, 0.9]
    assert roc_auc(y, membership_score(get("tpd"), raw_tpd)) == 1.0


def test_bootstrap_ci_brackets_and_is_reproducible():
    rng = np.random.default_rng(7)
    y = np.r_[np.ones(30), np.zeros(30)]
    s = np.r_[rng.normal(1, 1, 30), rng.normal(0, 1, 30)]
    lo, hi = bootstrap_auc_ci(y, s, n_resamples=100, seed=3)
    assert 0.0 <= lo < roc_auc(y, s) < hi <= 1.0
    assert (lo, hi) == bootstrap_auc_ci(y, s, n_resamples=100, seed=3)
    assert (lo, hi) != bootstrap_auc_ci(y, s, n_resamples=100, seed=4)
    # a perfectly separated split: every resample has AUC 1
    assert bootstrap_auc_ci([1, 1, 0, 0], [3.0, 2.0, 1.0, 0.0], n_resamples=20) == (1.0, 1.0)


def test_summarize_keys_and_counts():
    y = [1, 1, 1, 0, 0]
    s = [0.9, 0.8, 0.3, 0.4, 0.1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two classes: no warning at all
        out = summarize(y, s, n_resamples=50)
    assert out["n_members"] == 3 and out["n_nonmembers"] == 2
    assert out["auc"] == pytest.approx(pair_auc(y, s))
    assert set(out) >= {"auc", "auc_ci", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_strict", "tpr_at_5pct_fpr"}
    assert len(out["auc_ci"]) == 2


def test_vectorised_bootstrap_equals_a_loop_over_sklearn():
    """The rank-based, all-at-once bootstrap gives exactly the AUCs sklearn gives per resample."""
    from sklearn.metrics import roc_auc_score

    from distill_detect.metrics import bootstrap_auc_ci

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(30), np.zeros(40)].astype(int)
    s = np.round(np.r_[rng.normal(0.8, 1, 30), rng.normal(0, 1, 40)], 1)  # rounding makes ties
    lo, hi = bootstrap_auc_ci(y, s, n_resamples=200, seed=11)
    draw = np.random.default_rng(11)
    P = draw.choice(s[y == 1], (200, 30))
    N = draw.choice(s[y == 0], (200, 40))
    labels = np.r_[np.ones(30), np.zeros(40)]
    aucs = [roc_auc_score(labels, np.r_[p, n]) for p, n in zip(P, N)]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(aucs, [0.025, 0.975])), abs=1e-12)


def test_delong_matches_its_definition_and_sklearn():
    """AUCs equal sklearn's; the variance equals the brute-force DeLong formula written with loops."""
    import math

    from sklearn.metrics import roc_auc_score

    from distill_detect.metrics import delong_test

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(17), np.zeros(23)].astype(int)
    a = rng.normal(size=40) + 0.8 * y
    b = np.round(a + rng.normal(scale=0.7, size=40), 1)  # ties too
    r = delong_test(y, a, b)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a)) and r["auc_b"] == pytest.approx(roc_auc_score(y, b))

    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    v10 = [[sum(psi(s[i], s[j]) for j in neg) / len(neg) for i in pos] for s in (a, b)]
    v01 = [[sum(psi(s[i], s[j]) for i in pos) / len(pos) for j in neg] for s in (a, b)]

    def cov(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((x - mu) * (z - mv) for x, z in zip(u, v)) / (len(u) - 1)

    var = sum(
        sign * (cov(v10[k], v10[j]) / len(pos) + cov(v01[k], v01[j]) / len(neg))
        for k, j, sign in ((0, 0, 1), (1, 1, 1), (0, 1, -2))
    )
    assert r["se"] == pytest.approx(math.sqrt(var), rel=1e-9)
    assert 0 < r["pvalue"] < 1
    same = delong_test(y, a, a)
    assert same["diff"] == 0 and same["pvalue"] == 1.0
