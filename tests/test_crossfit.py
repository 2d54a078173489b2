"""Tests for the audit's cross-fitted detector combination (``distill_detect.audit.audit_combined``):
brute-force twins of every statistic, the out-of-fold property, and calibration under simulation
(null size of the dataset test, FDR of the flags), with a check that the in-sample shortcut the
cross-fitting avoids WOULD fail the same size test (so the size test can fail)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distill_detect.audit import (
    CROSSFIT_C,
    _fraction_in_folds,
    audit_combined,
    bh_adjust,
    crossfit_combined_scores,
    crossfit_dataset_test,
    crossfit_folds,
    crossfit_pvalues,
    crossfit_qvalues,
    dataset_test,
    estimate_contaminated_fraction,
    fit_combination,
)
from distill_detect.errors import ConfigError


def _null_features(rng, n, d=4):
    """Correlated features with one heavy-tailed column: what detector scores look like, no membership signal."""
    z = rng.normal(size=(n, d))
    z[:, 1] = 0.7 * z[:, 0] + 0.3 * z[:, 1]
    z[:, 2] = rng.standard_t(3, size=n)
    return z


# ----------------------------------------------------------------------------- folds and out-of-fold scores


def test_folds_balanced_seeded_and_score_free():
    fb, fr = crossfit_folds(11, 7, 3, seed=4)
    assert sorted(np.bincount(fb).tolist()) == [3, 4, 4] and sorted(np.bincount(fr).tolist()) == [2, 2, 3]
    fb2, fr2 = crossfit_folds(11, 7, 3, seed=4)
    assert (fb == fb2).all() and (fr == fr2).all()
    assert not all((crossfit_folds(11, 7, 3, seed=s)[0] == fb).all() for s in range(5, 10))
    with pytest.raises(ConfigError):
        crossfit_folds(10, 10, 1)
    with pytest.raises(ValueError, match="at least 4"):
        crossfit_folds(3, 10, 2)


def test_scores_are_out_of_fold():
    """A fold-k score depends on its own features and the OTHER folds only: changing one fold-k question
    moves no other fold-k score (benchmark or reference), and changes the other folds' scores."""
    rng = np.random.default_rng(1)
    xb, xr = _null_features(rng, 30), _null_features(rng, 40)
    cf = crossfit_combined_scores(xb, xr, folds=3, seed=2)
    i = int(np.flatnonzero(cf.bench_fold == 1)[0])
    xb2 = xb.copy()
    xb2[i] += 5.0
    cf2 = crossfit_combined_scores(xb2, xr, folds=3, seed=2)
    same_b = (cf.bench_fold == 1) & (np.arange(30) != i)
    np.testing.assert_allclose(cf2.bench_scores[same_b], cf.bench_scores[same_b])
    np.testing.assert_allclose(cf2.ref_scores[cf.ref_fold == 1], cf.ref_scores[cf.ref_fold == 1])
    assert not np.allclose(cf2.bench_scores[cf.bench_fold == 0], cf.bench_scores[cf.bench_fold == 0])


def test_fit_matches_hand_standardised_logistic_regression():
    """Brute-force twin of fit_combination: numpy standardisation, then the penalised, class-balanced log-loss
    0.5 |w|^2 + C sum_i s_i log(1 + exp(-y_i (x_i w + b))) minimised by scipy directly."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(3)
    xb, xr = rng.normal(0.5, 1, (25, 3)), rng.normal(0, 2, (35, 3))
    x = np.vstack([xb, xr])
    z = (x - x.mean(0)) / x.std(0)
    y = np.r_[np.ones(25), -np.ones(35)]
    s = np.r_[np.full(25, 60 / (2 * 25)), np.full(35, 60 / (2 * 35))]  # "balanced" class weights

    def loss(theta):
        w, b = theta[:3], theta[3]
        return 0.5 * w @ w + CROSSFIT_C * np.sum(s * np.logaddexp(0.0, -y * (z @ w + b)))

    theta = minimize(loss, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    new = rng.normal(size=(5, 3))
    f = fit_combination(xb, xr)
    np.testing.assert_allclose(f(new * 1.0), ((new - x.mean(0)) / x.std(0)) @ theta[:3] + theta[3], atol=1e-5)
    np.testing.assert_allclose(f.coef_standardised, theta[:3], atol=1e-5)


def test_signal_in_one_detector_is_found_without_labels():
    """Members shifted on detector 2 only: the fit leans on it, and the out-of-fold AUC is near that detector's."""
    rng = np.random.default_rng(5)
    ref = _null_features(rng, 200)
    bench = _null_features(rng, 200)
    bench[:, 3] += 1.5
    cf = crossfit_combined_scores(bench, ref, seed=0)
    assert np.all(np.abs(cf.coef_standardised[:, 3]) > 3 * np.abs(cf.coef_standardised[:, :3]).max(axis=1))
    test, _ = crossfit_dataset_test(cf)
    assert test.pvalue < 1e-10 and test.auc > 0.8


# ----------------------------------------------------------------------------- brute-force twins of the statistics


def test_pvalues_qvalues_and_test_match_brute_force():
    rng = np.random.default_rng(7)
    bench, ref = _null_features(rng, 41), _null_features(rng, 57)
    bench[:12, 0] += 2.0
    cf = crossfit_combined_scores(bench, ref, folds=3, seed=1)
    p = crossfit_pvalues(cf)
    for i in range(41):
        k = cf.bench_fold[i]
        r = cf.ref_scores[cf.ref_fold == k]
        assert p[i] == pytest.approx((1 + sum(x >= cf.bench_scores[i] for x in r)) / (len(r) + 1))
    # BH within each fold at q/K, by the step-up rule itself.
    fdr, K = 0.2, 3
    q = crossfit_qvalues(p, cf.bench_fold, K)
    for k in range(K):
        idx = np.flatnonzero(cf.bench_fold == k)
        ps = np.sort(p[idx])
        ok = [j for j in range(1, len(ps) + 1) if ps[j - 1] <= j * (fdr / K) / len(ps)]
        want = p[idx] <= ps[max(ok) - 1] if ok else np.zeros(len(idx), bool)
        assert ((q[idx] <= fdr) == want).all()
        np.testing.assert_allclose(q[idx], np.minimum(1, K * bh_adjust(p[idx])))
    # Dataset test: Bonferroni over the fold tests; effect size = pooled pair counting.
    test, parts = crossfit_dataset_test(cf)
    for k, t in enumerate(parts):
        assert t.pvalue == pytest.approx(dataset_test(*cf.fold(k), seed=k).pvalue)  # seed + k per fold
    assert test.pvalue == pytest.approx(min(1.0, K * min(t.pvalue for t in parts)))
    pairs = wins = 0.0
    for k in range(K):
        b, r = cf.fold(k)
        wins += sum((x > y) + 0.5 * (x == y) for x in b for y in r)
        pairs += len(b) * len(r)
    assert test.auc == pytest.approx(wins / pairs)
    assert "bonferroni over 3 folds" in test.method


def test_fraction_in_one_fold_is_the_plain_estimate():
    rng = np.random.default_rng(11)
    b, r = rng.normal(0.8, 1, 50), rng.normal(0, 1, 70)
    one = _fraction_in_folds([(b, r)], lambda_=0.5, confidence=0.9, n_boot=300, seed=3)
    plain = estimate_contaminated_fraction(b, r, lambda_=0.5, confidence=0.9, n_boot=300, seed=3)
    np.testing.assert_allclose([one.estimate, one.ci_low, one.ci_high], [plain.estimate, plain.ci_low, plain.ci_high], atol=1e-12)
    # Two folds: the pooled Storey count with each fold's exact null mass, by hand.
    b2, r2 = rng.normal(0.8, 1, 30), rng.normal(0, 1, 21)
    two = _fraction_in_folds([(b, r), (b2, r2)], lambda_=0.5, confidence=0.9, n_boot=0, seed=0)
    above = sum(((1 + (rr >= x).sum()) / (len(rr) + 1) > 0.5) for bb, rr in ((b, r), (b2, r2)) for x in bb)
    mass = lambda m: (m + 1 - math.floor(0.5 * (m + 1))) / (m + 1)  # noqa: E731
    assert two.estimate == pytest.approx(max(0.0, 1 - above / (50 * mass(70) + 30 * mass(21))))


# ----------------------------------------------------------------------------- calibration under simulation


def _size(draws, n, m, d, rng, in_sample=False):
    rej = 0
    for _ in range(draws):
        xb, xr = _null_features(rng, n, d), _null_features(rng, m, d)
        if in_sample:  # the shortcut cross-fitting avoids: fit on everything, score the same questions
            f = fit_combination(xb, xr, C=10.0)
            p = dataset_test(f(xb), f(xr), method="asymptotic").pvalue
        else:
            p = crossfit_dataset_test(crossfit_combined_scores(xb, xr, seed=int(rng.integers(1 << 30))))[0].pvalue
        rej += p < 0.05
    return rej / draws


def test_null_size_of_the_dataset_test():
    """Clean benchmark (same distribution as the reference), 400 draws: rejection rate <= 5% within sampling error.
    (Bonferroni over two folds is conservative: the rate sits near 2.5-5%.)"""
    rng = np.random.default_rng(2024)
    rate = _size(400, 60, 80, 4, rng)
    assert rate <= 0.05 + 2.33 * math.sqrt(0.05 * 0.95 / 400), rate


def test_in_sample_fit_would_fail_the_size_test():
    """The size test has teeth: fitting and scoring the same questions (no cross-fitting) rejects far too often."""
    rng = np.random.default_rng(2025)
    rate = _size(150, 30, 30, 12, rng, in_sample=True)
    assert rate > 0.2, rate


def test_flags_keep_the_fdr_and_fraction_is_a_lower_bound():
    """30% of the benchmark seen (shift on one detector); 150 draws: mean false-discovery proportion <= q pi0."""
    rng = np.random.default_rng(99)
    fdr, draws, fdps, fracs, n_flags = 0.1, 150, [], [], 0
    for _ in range(draws):
        n, m = 100, 300
        xb, xr = _null_features(rng, n), _null_features(rng, m)
        seen = np.zeros(n, bool)
        seen[:30] = True
        xb[seen, 3] += 4.0
        r = audit_combined([str(i) for i in range(n)], xb, xr, higher_is_member=True, fdr=fdr, n_boot=0,
                           seed=int(rng.integers(1 << 30)))  # fmt: skip
        v, total = int((r.flagged & ~seen).sum()), r.n_flagged
        n_flags += total
        fdps.append(v / max(total, 1))
        fracs.append(r.fraction.estimate)
    assert n_flags > draws * 15  # the flags have power here, so the FDR check is not vacuous
    assert np.mean(fdps) <= fdr * 0.7 + 3 * np.std(fdps) / math.sqrt(draws), np.mean(fdps)
    assert np.mean(fracs) <= 0.30 + 0.02


# ----------------------------------------------------------------------------- the audit result


def test_audit_combined_orientation_verdict_and_dict():
    rng = np.random.default_rng(0)
    n, m = 80, 120
    raw_b, raw_r = rng.normal(size=(n, 2)), rng.normal(size=(m, 2))
    raw_b[:40, 0] -= 2.0  # tpd: LOWER = member
    ids = [f"q{i}" for i in range(n)]
    r = audit_combined(ids, raw_b, raw_r, methods=["tpd", "out_max_prob"], n_boot=50)
    assert r.contaminated and r.dataset.pvalue < 1e-4
    assert r.verdict().endswith("; scores: cross-fitted combination of tpd, out_max_prob (2 folds)")
    assert r.min_pvalue == pytest.approx(1 / 61)
    assert r.min_flaggable == math.ceil(40 * 2 / (61 * 0.05))
    doc = r.to_dict()
    c = doc["combination"]
    assert c["detectors"] == ["tpd", "out_max_prob"] and c["folds"] == 2 and c["fold_sizes"] == [[40, 60], [40, 60]]
    assert c["weights_standardised"]["tpd"][0] > 0  # oriented before fitting: more member-like = larger score
    assert {q["fold"] for q in doc["questions"]} == {0, 1} and doc["min_pvalue"] == pytest.approx(1 / 61)
    # Unlike one detector's audit, the fit learns each sign: a detector read the wrong way round gets the
    # opposite weight and the same scores (the L2 penalty on standardised features is sign-symmetric).
    flipped = audit_combined(ids, raw_b, raw_r, higher_is_member=[True, True], n_boot=50)
    np.testing.assert_allclose(flipped.scores, r.scores, atol=1e-8)
    assert flipped.to_dict()["combination"]["weights_standardised"]["f0"][0] == pytest.approx(
        -c["weights_standardised"]["tpd"][0]
    )
    with pytest.raises(ConfigError, match="orientation"):
        audit_combined(ids, raw_b, raw_r, n_boot=0)
    with pytest.raises(ValueError, match="orientation"):
        audit_combined(ids, raw_b, raw_r, higher_is_member=[True], n_boot=0)
    with pytest.raises(ValueError, match="non-finite"):
        audit_combined(ids, np.where(np.arange(n)[:, None] == 5, np.nan, raw_b), raw_r, higher_is_member=True, n_boot=0)
