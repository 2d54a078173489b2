"""Audit a benchmark: was it in the distillation data, how much of it, and which questions?

Inputs are per-question membership scores (HIGHER = MORE LIKELY A MEMBER, the package's
convention; see ``metrics.membership_score``) for

* B, the benchmark under audit (n questions, labels unknown), and
* R, a reference set (m questions) known NOT to be in the distillation data and drawn
  like the benchmark's unseen questions (written after the model's cutoff, a held-out
  split, or ``make_reference`` perturbations).

Model: each benchmark score comes from F0 (unseen) with probability 1 - pi and from F1
(seen) with probability pi; R is a sample of F0. Everything here is a statistic of the two
samples, so a second reference set or another FDR level costs no model calls.

Per question -- ``conformal_pvalues``: p_i = (1 + #{r in R : r >= s_i}) / (m + 1), the
conformal / empirical p-value of "question i is unseen" (Vovk, Gammerman & Shafer 2005,
*Algorithmic Learning in a Random World*; Bates, Candes, Lei, Romano & Sesia 2023,
"Testing for outliers with conformal p-values", Ann. Statist. 51(1)).

Which questions -- ``flag_fdr``: Benjamini-Hochberg (1995) at level q on those p-values.
Conformal p-values that share one reference set are dependent, but positively so (PRDS,
Bates et al. 2023, Theorem 2.4), and BH keeps its FDR guarantee under PRDS (Benjamini &
Yekutieli 2001).

Whole benchmark -- ``dataset_test``: one-sided Mann-Whitney U (Wilcoxon rank-sum) test of
"B is shifted toward seen", with the AUC-like effect size U / (n m) = P(B > R) + P(tie)/2.

How much -- ``estimate_contaminated_fraction``: Storey's (2002) estimator of 1 - pi0 with a
bootstrap interval that resamples B and R. It is a LOWER bound on the contaminated fraction
in expectation (see its docstring): it is exact only when the detector puts (almost) no
member below the reference median.

Several detectors -- ``audit_combined``: the scores are a cross-fitted combination learned without membership
labels (dataset inference, Maini et al. 2024, arXiv 2406.06443): on K seeded folds of both sets, a logistic
regression fitted to tell benchmark from reference on the other folds scores the held-out fold, and each
benchmark question is compared with its own fold's reference only. Every guarantee above is kept (see
``crossfit_combined_scores``, ``crossfit_qvalues``, ``crossfit_dataset_test``); the cost is resolution: p-values on
a grid of 1/(m/K + 1), BH within each fold at q/K, and a Bonferroni-joined dataset test.

Two limits that every user should know:

* Validity rests on R being exchangeable with B's unseen questions. A reference set that is
  easier/harder, shorter/longer, or of another style than the benchmark shifts the scores by
  itself: the tests then detect the distribution shift, not contamination. A reference that
  looks LESS member-like than B's unseen questions gives false positives.
* Resolution is set by m: the smallest p-value is 1/(m + 1), and BH at level q flags either
  nothing or at least n / ((m + 1) q) questions (the k-th smallest flagged p-value must be
  <= k q / n). To be able to flag a single question, m + 1 >= n / q (e.g. n = 200,
  q = 0.05: m >= 3999). ``AuditResult.min_flaggable`` reports this number.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np

from distill_detect.errors import ConfigError
from distill_detect.types import Question

__all__ = [
    "AuditResult",
    "Combination",
    "CrossFit",
    "DatasetTest",
    "FractionEstimate",
    "audit",
    "audit_combined",
    "conformal_pvalues",
    "crossfit_combined_scores",
    "crossfit_dataset_test",
    "crossfit_folds",
    "crossfit_fraction",
    "crossfit_pvalues",
    "crossfit_qvalues",
    "dataset_test",
    "estimate_contaminated_fraction",
    "fit_combination",
    "flag_fdr",
    "make_reference",
    "perturb_numbers",
    "storey_pi0",
]


# ----------------------------------------------------------------------------- helpers


def _scores(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty; need at least one score")
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf); drop or re-score those questions first")
    return a


def _level(value, name: str, hint: str) -> float:
    v = float(value)
    if not 0.0 < v < 1.0:
        raise ConfigError(f"{name} must be in (0, 1), got {value!r}; {hint}")
    return v


def _ref_counts(bench: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """K_i = #{r in ref : r >= bench_i} for every bench score (int64 [n])."""
    ref_sorted = np.sort(ref)
    return ref.size - np.searchsorted(ref_sorted, bench, side="left")


# ----------------------------------------------------------------------------- per question


def conformal_pvalues(bench_scores, ref_scores) -> np.ndarray:
    """Conformal p-value of "unseen" for each benchmark question (higher score = member).

    ``p_i = (1 + #{r in R : r >= s_i}) / (m + 1)``, with m = |R|.

    Validity: if question i is unseen and its score is exchangeable with the m reference
    scores (i.i.d. from the same distribution suffices), then P(p_i <= t) <= t for every t
    in [0, 1] (super-uniform). Without ties it is exactly uniform on {1, ..., m+1}/(m+1).
    Ties count AGAINST membership (``r >= s``, not ``r > s``), which only makes p larger,
    so validity holds with ties too (e.g. TPD = 0 for several questions). The "+1" is the
    benchmark question itself; without it P(p <= t) can exceed t. The guarantee is marginal
    over the draw of R; the p-values share R and are positively dependent (PRDS).

    >>> conformal_pvalues([5.0, 0.5, -1.0], [0.0, 1.0, 2.0, 0.5])
    array([0.2, 0.8, 1. ])
    """
    bench = _scores(bench_scores, "bench_scores")
    ref = _scores(ref_scores, "ref_scores")
    return (1.0 + _ref_counts(bench, ref)) / (ref.size + 1.0)


def bh_adjust(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values): question i is flagged at level q iff q_i <= q.

    A thin wrapper of ``scipy.stats.false_discovery_control(method="bh")``.
    """
    from scipy.stats import false_discovery_control

    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    if p.size == 0:
        return p.copy()
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("p-values must lie in [0, 1]")
    return np.asarray(false_discovery_control(p, method="bh"), dtype=np.float64)


def flag_fdr(pvalues, fdr: float = 0.05) -> np.ndarray:
    """Boolean mask of the questions flagged by Benjamini-Hochberg at false-discovery rate ``fdr``.

    BH (Benjamini & Hochberg 1995): sort p ascending, find the largest k with
    p_(k) <= k * fdr / n, flag the k smallest. Expected (false flags / flags) <= fdr * n0 / n
    for independent or PRDS p-values; conformal p-values sharing one reference set are PRDS
    (Bates et al. 2023), so the guarantee holds for ``conformal_pvalues``.

    >>> flag_fdr([0.001, 0.02, 0.03, 0.5], fdr=0.05).tolist()
    [True, True, True, False]
    """
    fdr = _level(fdr, "fdr", "for a 5% false-discovery rate use 0.05")
    return bh_adjust(pvalues) <= fdr


# ----------------------------------------------------------------------------- whole benchmark


@dataclass(frozen=True)
class DatasetTest:
    """One-sided two-sample test that benchmark scores are shifted toward "member"."""

    pvalue: float
    """P-value of H0: benchmark scores have the reference distribution (no contamination)."""
    auc: float
    """U / (n m) = P(B > R) + P(B = R)/2: 0.5 under H0, larger when the benchmark looks seen."""
    statistic: float
    """Mann-Whitney U of the benchmark sample (pairs (b, r) with b > r, ties counted 1/2)."""
    method: str
    """'asymptotic' (normal approximation with tie and continuity correction) or 'permutation'."""


def _u_statistic(x, y, axis=-1):
    """Mann-Whitney U of sample x against y along ``axis`` (vectorised for permutation_test)."""
    from scipy.stats import rankdata

    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    y = np.moveaxis(np.asarray(y, dtype=np.float64), axis, -1)
    n = x.shape[-1]
    ranks = rankdata(np.concatenate((x, y), axis=-1), axis=-1)
    return ranks[..., :n].sum(axis=-1) - n * (n + 1) / 2.0


def dataset_test(bench_scores, ref_scores, *, method: str = "auto", n_resamples: int = 9999, seed: int = 0) -> DatasetTest:
    """Is the benchmark as a whole shifted toward "seen"? One-sided Mann-Whitney U test.

    H0: the benchmark scores and the reference scores come from one distribution (no
    question was seen). Alternative: benchmark scores are stochastically larger (more
    member-like). Rank-based, so any monotone rescaling of the detector gives the same
    answer. ``method``: 'asymptotic' uses ``scipy.stats.mannwhitneyu`` (normal approximation
    with tie and continuity corrections, accurate for n, m >= 20); 'permutation' uses
    ``scipy.stats.permutation_test`` on U (exact when the number of splits is at most
    ``n_resamples``, else Monte Carlo with ``seed``); 'auto' picks 'permutation' when
    min(n, m) < 20.
    """
    bench = _scores(bench_scores, "bench_scores")
    ref = _scores(ref_scores, "ref_scores")
    if min(bench.size, ref.size) < 2:
        raise ValueError(f"the dataset test needs at least 2 benchmark and 2 reference scores, got {bench.size} and {ref.size}")
    if method == "auto":
        method = "permutation" if min(bench.size, ref.size) < 20 else "asymptotic"
    if method == "asymptotic":
        from scipy.stats import mannwhitneyu

        res = mannwhitneyu(bench, ref, alternative="greater", method="asymptotic")
        u, p = float(res.statistic), float(res.pvalue)
    elif method == "permutation":
        from scipy.stats import permutation_test

        kw = dict(permutation_type="independent", vectorized=True, n_resamples=int(n_resamples), alternative="greater")
        rng = np.random.default_rng(seed)
        try:
            res = permutation_test((bench, ref), _u_statistic, rng=rng, **kw)
        except TypeError:  # scipy < 1.15 calls it random_state
            res = permutation_test((bench, ref), _u_statistic, random_state=rng, **kw)
        u, p = float(res.statistic), float(res.pvalue)
    else:
        raise ConfigError(f"dataset test method must be 'auto', 'asymptotic' or 'permutation', got {method!r}")
    return DatasetTest(pvalue=p, auc=u / (bench.size * ref.size), statistic=u, method=method)


# ----------------------------------------------------------------------------- how much


def _null_mass_above(lambda_: float, n_ref: int | None) -> float:
    """P(p > lambda) for an unseen question: exactly, for conformal p-values without ties."""
    if n_ref is None:
        return 1.0 - lambda_
    # p = (1 + K)/(m + 1) with K uniform on {0..m}; p > lambda  <=>  K >= floor(lambda (m + 1)).
    return (n_ref + 1 - math.floor(lambda_ * (n_ref + 1))) / (n_ref + 1)


def storey_pi0(pvalues, *, lambda_: float = 0.5, n_ref: int | None = None) -> float:
    """Storey's (2002) estimate of the share of null (unseen) questions, clipped to [0, 1].

    ``pi0 = #{p_i > lambda} / (n * P0(p > lambda))``. For uniform nulls P0(p > lambda) =
    1 - lambda; for conformal p-values pass ``n_ref`` = m to use the exact null mass
    (m + 1 - floor(lambda (m + 1))) / (m + 1) instead (removes a discreteness bias for small m).

    >>> storey_pi0([0.01, 0.02, 0.03, 0.04, 0.7, 0.9], lambda_=0.5)
    0.6666666666666666
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    if p.size == 0:
        raise ValueError("no p-values")
    lam = _level(lambda_, "lambda_", "Storey's default is 0.5")
    pi0 = float(np.mean(p > lam)) / _null_mass_above(lam, n_ref)
    return min(1.0, max(0.0, pi0))


@dataclass(frozen=True)
class FractionEstimate:
    """Estimated share of benchmark questions that were seen, with a bootstrap interval."""

    estimate: float
    """1 - Storey's pi0, clipped to [0, 1]. A lower bound on the true share in expectation."""
    ci_low: float
    """Lower end of the percentile bootstrap interval."""
    ci_high: float
    """Upper end (an upper bound on the DETECTABLE share, not on the true share; see the estimator)."""
    confidence: float
    """Two-sided level of the interval, e.g. 0.95."""
    lambda_: float
    """Storey's tuning parameter: the reference quantile below which the detector is assumed to see no member."""
    n_boot: int
    """Bootstrap resamples (0: no interval, ci_low = ci_high = nan)."""


def estimate_contaminated_fraction(bench_scores, ref_scores, *, lambda_: float = 0.5, confidence: float = 0.95, n_boot: int = 2000,
                                   seed: int = 0) -> FractionEstimate:  # fmt: skip
    """Estimate the contaminated share pi of the benchmark, with a bootstrap confidence interval.

    Estimator: 1 - pi0, with pi0 from Storey (2002) on the conformal p-values at lambda = 0.5.
    In score terms it compares how many benchmark and reference questions fall below the
    reference median t: pi_hat = 1 - P_B(S <= t) / P_R(S <= t) (up to the +1 correction;
    the null mass P0(p > lambda) is taken exactly for m reference scores without ties; tied
    scores only make unseen p-values larger, which lowers the estimate further).

    Why this one: with no labels, B = pi F1 + (1 - pi) F0 and R ~ F0 do not identify pi
    unless one assumes something about F1, the members' score distribution. For every
    threshold t, P_B(S <= t) = pi P1(S <= t) + (1 - pi) P0(S <= t) >= (1 - pi) P0(S <= t), so

        pi >= 1 - P_B(S <= t) / P0(S <= t)        (equality iff no member scores <= t).

    Storey's estimator is this bound at t = the reference median; its expectation is
    pi * (1 - P1(S <= t) / P0(S <= t)) <= pi. So it is (i) unbiased for a detector that puts
    every member above the median of the unseen questions, (ii) biased toward 0 for a weak
    detector (members with unremarkable scores look unseen), never toward "more
    contaminated" -- the safe direction for an accusation. Example: unseen ~ N(0, 1), seen
    ~ N(1, 1): P1(S <= median) = Phi(-1) = 0.16, so a 30% contamination reads as
    0.3 * (1 - 2 * 0.16) = 20%. Reaching pi itself needs the detector's miss rate
    P1(S <= t), i.e. labelled members of a comparable model (the calibration benchmark's
    100% student estimates it); this is the identifiability limit of mixture-proportion
    estimation (Blanchard, Lee & Scott 2010, JMLR 11). The rank-based alternative
    2 * AUC(B vs R) - 1 = pi * (2 AUC(F1 vs F0) - 1) is also a lower bound, but a looser one
    for typical detectors, and a two-component parametric fit would replace the bound by a
    guess about F1's shape. lambda: larger lambda (t higher up F0) means less bias and more
    variance; 0.5 is Storey's default.

    Interval: percentile bootstrap, resampling B (n with replacement) and R (m with
    replacement) independently -- the p-values are functions of R, so R's sampling error is
    part of the estimate's error. Each replicate is clipped to [0, 1]. It covers the
    detectable share 1 - E[pi0_hat]; its lower end is therefore a (conservative) lower
    confidence bound for pi, and its upper end is NOT an upper bound on pi for a weak detector.
    """
    bench = _scores(bench_scores, "bench_scores")
    ref = _scores(ref_scores, "ref_scores")
    lam = _level(lambda_, "lambda_", "Storey's default is 0.5")
    conf = _level(confidence, "confidence", "for a 95% interval use 0.95")
    n, m = bench.size, ref.size
    cut = math.floor(lam * (m + 1))  # p > lambda  <=>  K >= cut
    null_mass = _null_mass_above(lam, m)

    def frac(b, r):
        return min(1.0, max(0.0, 1.0 - float(np.mean(_ref_counts(b, r) >= cut)) / null_mass))

    est = frac(bench, ref)
    n_boot = int(n_boot)
    if n_boot <= 0:
        return FractionEstimate(est, math.nan, math.nan, conf, lam, 0)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for k in range(n_boot):
        reps[k] = frac(bench[rng.integers(0, n, n)], ref[rng.integers(0, m, m)])
    a = (1.0 - conf) / 2.0
    lo, hi = np.quantile(reps, [a, 1.0 - a])
    return FractionEstimate(est, float(lo), float(hi), conf, lam, n_boot)


# ----------------------------------------------------------------------------- several detectors: cross-fitted combination

CROSSFIT_FOLDS = 2
"""K: folds of the cross-fitted combination (each fold's p-values are compared with about m/K reference scores)."""
CROSSFIT_C = 0.1
"""Inverse L2 strength of the combination's logistic regression on standardised features. Fixed in code, never tuned
per audit (tuning it on the audited sets would need its own held-out split): chosen once from {0.01, 0.1, 1, 10} on
the seed-42 development students (benchmarks/crossfit.py, benchmarks/results/beyond_crossfit.md), where 0.01-1 were
within 0.01 AUC of each other."""


def _features(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [questions, detectors] array, got shape {a.shape}")
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf); drop or re-score those questions first")
    return a


def crossfit_folds(n: int, m: int, folds: int = CROSSFIT_FOLDS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded fold labels (int64 [n], int64 [m]) for n benchmark and m reference questions.

    Each set is split on its own, into K folds whose sizes differ by at most one (a random
    permutation of 0, 1, ..., K-1, 0, 1, ...). The split depends on the seed and the sizes only,
    never on the scores: that is what lets a fold's data be treated as fresh for a score
    function fitted on the other folds.

    >>> crossfit_folds(5, 4, 2, seed=0)[0].tolist().count(0)
    3
    """
    k = int(folds)
    if k < 2:
        raise ConfigError(f"folds must be at least 2, got {folds!r}")
    if min(n, m) < 2 * k:
        raise ValueError(f"{k} folds need at least {2 * k} benchmark and {2 * k} reference questions, got {n} and {m}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    return rng.permutation(np.arange(n) % k), rng.permutation(np.arange(m) % k)


def fit_combination(bench_features, ref_features, *, C: float = CROSSFIT_C):
    """Fit the score function on benchmark (class 1) vs reference (class 0); returns a function of features.

    Model: standardise each feature (mean and sd of the training rows), then an L2-regularised
    logistic regression with inverse strength ``C`` and balanced class weights (so unequal n and m
    do not tilt the fit). The returned function gives the linear predictor (log-odds up to a
    constant): higher = more benchmark-like = more member-like when the features are oriented
    that way. This is the "learn a combination without membership labels" step of dataset
    inference (Maini, Jia, Papernot & Dziedzic 2024, "LLM Dataset Inference", arXiv 2406.06443),
    where suspect and held-out text play the roles of benchmark and reference.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xb, xr = _features(bench_features, "bench_features"), _features(ref_features, "ref_features")
    x = np.vstack([xb, xr])
    y = np.r_[np.ones(len(xb)), np.zeros(len(xr))]
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(C=float(C), class_weight="balanced", solver="newton-cholesky", max_iter=1000).fit(
        scaler.transform(x), y
    )

    def score(features) -> np.ndarray:
        return lr.decision_function(scaler.transform(_features(features, "features")))

    score.coef = lr.coef_[0] / scaler.scale_  # per raw feature unit: which detectors the fit leans on
    score.coef_standardised = lr.coef_[0].copy()
    return score


@dataclass(frozen=True, eq=False)
class CrossFit:
    """Out-of-fold combined scores: question i of fold k scored by the function fitted without fold k."""

    bench_scores: np.ndarray
    """float64 [n]: combined score of each benchmark question (higher = more benchmark-like = member)."""
    ref_scores: np.ndarray
    """float64 [m]: combined score of each reference question."""
    bench_fold: np.ndarray
    """int64 [n]: fold of each benchmark question."""
    ref_fold: np.ndarray
    """int64 [m]: fold of each reference question."""
    coef_standardised: np.ndarray
    """float64 [K, d]: each fold's logistic-regression weights on the standardised features."""
    folds: int
    C: float
    seed: int

    def fold(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(benchmark scores, reference scores) of fold k."""
        return self.bench_scores[self.bench_fold == k], self.ref_scores[self.ref_fold == k]


def crossfit_combined_scores(bench_features, ref_features, *, folds: int = CROSSFIT_FOLDS, seed: int = 0,
                             C: float = CROSSFIT_C) -> CrossFit:  # fmt: skip
    """Combine several detectors without membership labels, cross-fitted so the audit stays valid.

    ``bench_features`` [n, d] and ``ref_features`` [m, d]: d detectors' ORIENTED scores (higher =
    member) per question. Both sets are split into K seeded folds (``crossfit_folds``); for each
    fold k a small fixed model (``fit_combination``: standardise, logistic regression with C
    fixed in code) is fitted to tell benchmark (1) from reference (0) on the OTHER folds, and
    scores fold k's benchmark and reference questions. No member label is used: if part of the
    benchmark was seen, the fit leans on the detectors that tell the benchmark from the
    reference, i.e. on those that see the contamination (the idea of dataset inference, Maini
    et al. 2024, arXiv 2406.06443; the cross-fitting is that of double/debiased machine learning,
    Chernozhukov et al. 2018, Econometrics Journal 21(1)).

    Why the p-values stay valid: fold k's score function depends only on the other folds. If the
    questions are drawn independently and an unseen benchmark question is distributed like the
    reference (the audit's assumption), then, conditional on the other folds, that question and
    fold k's reference questions are i.i.d., and so are their combined scores: the conformal
    p-value against fold k's reference only (``crossfit_pvalues``) is super-uniform conditionally,
    hence marginally. Comparing fold k's benchmark with the whole reference would NOT be valid:
    the other folds' reference questions were fitted to score low.
    """
    xb, xr = _features(bench_features, "bench_features"), _features(ref_features, "ref_features")
    if xb.shape[1] != xr.shape[1]:
        raise ValueError(f"bench_features has {xb.shape[1]} detectors, ref_features {xr.shape[1]}")
    fb, fr = crossfit_folds(len(xb), len(xr), folds, seed)
    sb, sr = np.empty(len(xb)), np.empty(len(xr))
    coefs = []
    for k in range(int(folds)):
        f = fit_combination(xb[fb != k], xr[fr != k], C=C)
        sb[fb == k], sr[fr == k] = f(xb[fb == k]), f(xr[fr == k])
        coefs.append(f.coef_standardised)
    return CrossFit(sb, sr, fb, fr, np.array(coefs), int(folds), float(C), int(seed))


def crossfit_pvalues(cf: CrossFit) -> np.ndarray:
    """Conformal p-value of each benchmark question against ITS fold's reference scores only.

    p_i = (1 + #{r in R_k : r >= s_i}) / (m_k + 1) for i in fold k. Valid (super-uniform) for an
    unseen question by the argument in ``crossfit_combined_scores``. Cost: with m_k ~ m/K, the
    smallest p-value is 1/(m_k + 1), about K times coarser than a single detector's 1/(m + 1).
    """
    p = np.empty(cf.bench_scores.size)
    for k in range(cf.folds):
        b, r = cf.fold(k)
        p[cf.bench_fold == k] = conformal_pvalues(b, r)
    return p


def crossfit_qvalues(pvalues, bench_fold, folds: int) -> np.ndarray:
    """Adjusted p-values for BH run WITHIN each fold at level q/K; flag question i at q iff q_i <= q.

    q_i = min(1, K * BH-adjusted p_i among fold k's questions). Within a fold the p-values share
    one reference set and one score function fixed by the other folds, so conditionally they are
    PRDS (Bates et al. 2023, Thm 2.4) and BH at q/K keeps FDR_k <= (q/K) n0_k/n_k. Across folds
    the dependence is arbitrary (each fold's score function was fitted on the others), so the
    folds are joined by a union bound: with V_k false and R_k total flags in fold k,
    V/R = sum_k V_k/R <= sum_k V_k/R_k, hence FDR <= sum_k FDR_k <= q, under ANY dependence between
    folds. BH over all n p-values at once would need PRDS across folds, which is not established.
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    fold = np.asarray(bench_fold).reshape(-1)
    q = np.empty(p.size)
    for k in range(int(folds)):
        sel = fold == k
        if sel.any():
            q[sel] = np.minimum(1.0, int(folds) * bh_adjust(p[sel]))
    return q


def crossfit_dataset_test(cf: CrossFit, *, method: str = "auto", n_resamples: int = 9999, seed: int = 0
                          ) -> tuple[DatasetTest, list[DatasetTest]]:  # fmt: skip
    """The dataset test on cross-fitted scores: one Mann-Whitney test per fold, joined by Bonferroni.

    Fold k's test compares fold k's benchmark with fold k's reference, both scored by the function
    fitted on the other folds, so under H0 (no question seen; all questions i.i.d.) it is a valid
    test conditionally on the other folds. The K fold p-values are dependent in an unknown way
    (fold j's data fitted fold k's function and vice versa), so they are combined with
    Bonferroni, p = min(1, K * min_k p_k), valid under any dependence (for K = 2 it is at least
    as small as the other dependence-free merges: the doubled mean p_1 + p_2 and e * sqrt(p_1 p_2);
    Vovk & Wang 2020, "Combining p-values via averaging", Biometrika 107(4)). The effect size
    returned is the pooled within-fold AUC sum_k U_k / sum_k n_k m_k; ``statistic`` is sum_k U_k.
    Returns (combined test, per-fold tests).
    """
    parts = [dataset_test(*cf.fold(k), method=method, n_resamples=n_resamples, seed=seed + k) for k in range(cf.folds)]
    pairs = sum(cf.fold(k)[0].size * cf.fold(k)[1].size for k in range(cf.folds))
    u = float(sum(t.statistic for t in parts))
    kinds = sorted({t.method for t in parts})
    test = DatasetTest(
        pvalue=min(1.0, cf.folds * min(t.pvalue for t in parts)),
        auc=u / pairs,
        statistic=u,
        method=f"bonferroni over {cf.folds} folds ({'/'.join(kinds)})",
    )
    return test, parts


def crossfit_fraction(cf: CrossFit, *, lambda_: float = 0.5, confidence: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> FractionEstimate:  # fmt: skip
    """Storey's estimate (as in ``estimate_contaminated_fraction``) from the fold-wise p-values.

    pi0_hat = #{i : p_i > lambda} / sum_k n_k P0_k(p > lambda), with each fold's exact null mass for
    its m_k reference scores; 1 - pi0_hat is a lower bound on the contaminated share in
    expectation, by the same argument as the single-detector estimate. Interval: percentile
    bootstrap resampling each fold's benchmark and reference with the fitted score functions held
    fixed, so it leaves out the fit's own variability (narrower than the truth by that much).
    """
    parts = [cf.fold(k) for k in range(cf.folds)]
    return _fraction_in_folds(parts, lambda_=lambda_, confidence=confidence, n_boot=n_boot, seed=seed)


def _fraction_in_folds(parts, *, lambda_: float, confidence: float, n_boot: int, seed: int) -> FractionEstimate:
    """Storey's 1 - pi0 pooled over (bench, ref) pairs with per-pair null masses; one pair = the plain estimate."""
    lam = _level(lambda_, "lambda_", "Storey's default is 0.5")
    conf = _level(confidence, "confidence", "for a 95% interval use 0.95")
    parts = [(_scores(b, "bench_scores"), _scores(r, "ref_scores")) for b, r in parts]
    cuts = [math.floor(lam * (r.size + 1)) for _, r in parts]  # p > lambda  <=>  K >= cut
    null = sum(b.size * _null_mass_above(lam, r.size) for b, r in parts)

    def frac(pairs):
        above = sum(int((_ref_counts(b, r) >= c).sum()) for (b, r), c in zip(pairs, cuts))
        return min(1.0, max(0.0, 1.0 - above / null))

    est = frac(parts)
    n_boot = int(n_boot)
    if n_boot <= 0:
        return FractionEstimate(est, math.nan, math.nan, conf, lam, 0)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for j in range(n_boot):
        reps[j] = frac([(b[rng.integers(0, b.size, b.size)], r[rng.integers(0, r.size, r.size)]) for b, r in parts])
    a = (1.0 - conf) / 2.0
    lo, hi = np.quantile(reps, [a, 1.0 - a])
    return FractionEstimate(est, float(lo), float(hi), conf, lam, n_boot)


@dataclass(frozen=True, eq=False)
class Combination:
    """How an audit's scores were made when they combine several detectors (``audit_combined``)."""

    detectors: tuple[str, ...]
    """The combined detectors, in feature order."""
    crossfit: CrossFit
    """The out-of-fold scores, folds and fitted weights."""
    fold_tests: tuple[DatasetTest, ...]
    """The per-fold dataset tests that the Bonferroni test joins."""

    @property
    def folds(self) -> int:
        return self.crossfit.folds

    def describe(self) -> str:
        return f"cross-fitted combination of {', '.join(self.detectors)} ({self.folds} folds)"

    def to_dict(self) -> dict:
        cf = self.crossfit
        return {
            "detectors": list(self.detectors),
            "model": "logistic regression on standardised oriented scores, benchmark (1) vs reference (0), balanced classes",
            "C": cf.C,
            "folds": cf.folds,
            "seed": cf.seed,
            "fold_sizes": [[int((cf.bench_fold == k).sum()), int((cf.ref_fold == k).sum())] for k in range(cf.folds)],
            "weights_standardised": {d: [float(c) for c in cf.coef_standardised[:, j]] for j, d in enumerate(self.detectors)},
            "fold_tests": [{"pvalue": t.pvalue, "auc": t.auc, "method": t.method} for t in self.fold_tests],
            "validity": "each p-value compares a question with its own fold's reference, scored by a function fitted on the "
            "other folds; BH within each fold at fdr/K (union over folds: FDR <= fdr under any dependence); "
            "dataset test: Bonferroni over the K fold tests",
        }


# ----------------------------------------------------------------------------- the audit


def fmt_p(p: float) -> str:
    if p <= 0.0:
        return "< 1e-300"
    if p >= 0.001:
        return f"{p:.2g}"
    mant, exp = f"{p:.0e}".split("e")
    return f"{mant}e{int(exp)}"


def _pct(x: float) -> str:
    return f"{100.0 * x:.0f}"


@dataclass(frozen=True, eq=False)
class AuditResult:
    """Everything the audit concluded; arrays are aligned with ``ids`` (benchmark order)."""

    ids: tuple[str, ...]
    """Benchmark question ids."""
    scores: np.ndarray
    """float64 [n]: membership scores (higher = member)."""
    pvalues: np.ndarray
    """float64 [n]: conformal p-value of "unseen" per question."""
    qvalues: np.ndarray
    """float64 [n]: BH-adjusted p-values; flagged at level q iff qvalue <= q."""
    flagged: np.ndarray
    """bool [n]: flagged by BH at ``fdr``."""
    n_ref: int
    """Reference questions (m)."""
    fdr: float
    """Target false-discovery rate of the flags."""
    alpha: float
    """Level of the dataset test; the verdict says 'contaminated' iff dataset_p < alpha."""
    dataset: DatasetTest
    """The benchmark-level test."""
    fraction: FractionEstimate
    """The contaminated share (a lower bound for weak detectors)."""
    seed: int = 0
    """Seed of the bootstrap (and of a permutation test)."""
    combination: Combination | None = None
    """None for one detector; for several, how their cross-fitted combination was made (``audit_combined``)."""

    @property
    def n_bench(self) -> int:
        return len(self.ids)

    @property
    def n_flagged(self) -> int:
        return int(self.flagged.sum())

    @property
    def flagged_ids(self) -> list[str]:
        return [i for i, f in zip(self.ids, self.flagged) if f]

    @property
    def contaminated(self) -> bool:
        """The decision rule: the dataset test rejects at level ``alpha``."""
        return self.dataset.pvalue < self.alpha

    @property
    def min_flaggable(self) -> int:
        """BH flags either no question or at least this many (set by the reference size).

        Combined (BH within each of K folds at fdr/K, fold k: n_k questions against m_k reference
        scores): the fewest any fold can flag, ceil(n_k K / ((m_k + 1) fdr)), about K^2 times the
        single-detector number n / ((m + 1) fdr).
        """
        if self.combination is None:
            return max(1, math.ceil(self.n_bench / ((self.n_ref + 1) * self.fdr) - 1e-9))
        cf, k = self.combination.crossfit, self.combination.folds
        sizes = [(int((cf.bench_fold == j).sum()), int((cf.ref_fold == j).sum())) for j in range(k)]
        return max(1, min(math.ceil(n * k / ((m + 1) * self.fdr) - 1e-9) for n, m in sizes))

    @property
    def min_pvalue(self) -> float:
        """The smallest p-value possible: 1/(m+1), or 1/(m_k+1) for the largest reference fold."""
        if self.combination is None:
            return 1.0 / (self.n_ref + 1)
        return 1.0 / (int(np.bincount(self.combination.crossfit.ref_fold).max()) + 1)

    def verdict(self) -> str:
        """One plain line, e.g. 'contaminated: estimated 24% of questions (95% CI 15–33%); ...'."""
        head = "contaminated" if self.contaminated else "no evidence of contamination"
        f = self.fraction
        if f.n_boot:
            ci = f"{100 * f.confidence:g}% CI {_pct(f.ci_low)}–{_pct(f.ci_high)}%"
            est = f"estimated {_pct(f.estimate)}% of questions ({ci})"
        else:
            est = f"estimated {_pct(f.estimate)}% of questions"
        return (
            f"{head}: {est}; {self.n_flagged} of {self.n_bench} questions flagged at FDR {100 * self.fdr:g}%; "
            f"dataset test p = {fmt_p(self.dataset.pvalue)}"
            + (f"; scores: {self.combination.describe()}" if self.combination is not None else "")
        )

    def to_dict(self) -> dict:
        """JSON-ready summary with one row per question."""
        f, d = self.fraction, self.dataset
        return {
            "verdict": self.verdict(),
            "contaminated": self.contaminated,
            "n_bench": self.n_bench,
            "n_ref": self.n_ref,
            "fdr": self.fdr,
            "alpha": self.alpha,
            "n_flagged": self.n_flagged,
            "min_flaggable": self.min_flaggable,
            "min_pvalue": self.min_pvalue,
            "dataset_test": {"method": d.method, "pvalue": d.pvalue, "auc": d.auc, "u_statistic": d.statistic},
            "fraction": {
                "estimator": "storey",
                "estimate": f.estimate,
                "ci": [f.ci_low, f.ci_high] if f.n_boot else None,
                "confidence": f.confidence,
                "lambda": f.lambda_,
                "n_boot": f.n_boot,
                "is_lower_bound": True,
            },
            "seed": self.seed,
            **({"combination": self.combination.to_dict()} if self.combination is not None else {}),
            "questions": [
                {"id": i, "score": float(s), "pvalue": float(p), "qvalue": float(q), "flagged": bool(fl)}
                | ({"fold": int(self.combination.crossfit.bench_fold[j])} if self.combination is not None else {})
                for j, (i, s, p, q, fl) in enumerate(zip(self.ids, self.scores, self.pvalues, self.qvalues, self.flagged))
            ],
        }


def audit(
    bench_ids,
    bench_scores,
    ref_scores,
    *,
    fdr: float = 0.05,
    alpha: float = 0.05,
    confidence: float = 0.95,
    lambda_: float = 0.5,
    n_boot: int = 2000,
    test_method: str = "auto",
    seed: int = 0,
    method: str | None = None,
    higher_is_member: bool | None = None,
) -> AuditResult:
    """Audit a benchmark from the scores of its questions and of a reference set's.

    The scores' orientation must be stated: ``method`` (a detector's name: its raw scores,
    oriented by its known direction, e.g. ``method="tpd"`` for raw TPD, lower = member) or
    ``higher_is_member``. Scores of unknown orientation are refused: read the wrong way round,
    a contaminated benchmark reads as clean.

    >>> r = audit(["a", "b", "c"], [9.0, 0.2, -0.3], [0.0, 0.1, -0.5, 0.3, -0.1], higher_is_member=True, n_boot=0)
    >>> r.pvalues.tolist(), r.n_flagged
    ([0.16666666666666666, 0.3333333333333333, 0.8333333333333334], 0)
    """
    ids = tuple(str(i) for i in bench_ids)
    bench = _scores(bench_scores, "bench_scores")
    ref = _scores(ref_scores, "ref_scores")
    if (method is None) == (higher_is_member is None):
        from distill_detect.errors import ConfigError

        raise ConfigError(
            "audit(): state the scores' orientation with exactly one of method='tpd' (a detector's raw scores, "
            "oriented by its direction) or higher_is_member=True/False"
        )
    if method is not None:
        from distill_detect.detectors import get

        higher_is_member = get(method).higher_is_member
    if not higher_is_member:
        bench, ref = -bench, -ref
    if len(ids) != bench.size:
        raise ValueError(f"{len(ids)} ids but {bench.size} scores")
    if len(set(ids)) != len(ids):
        raise ValueError("benchmark ids are not unique")
    fdr = _level(fdr, "fdr", "for a 5% false-discovery rate use 0.05")
    alpha = _level(alpha, "alpha", "for a 5% test use 0.05")
    p = conformal_pvalues(bench, ref)
    q = bh_adjust(p)
    res = AuditResult(
        ids=ids,
        scores=bench.copy(),
        pvalues=p,
        qvalues=q,
        flagged=q <= fdr,
        n_ref=int(ref.size),
        fdr=fdr,
        alpha=alpha,
        dataset=dataset_test(bench, ref, method=test_method, seed=seed),
        fraction=estimate_contaminated_fraction(bench, ref, lambda_=lambda_, confidence=confidence, n_boot=n_boot, seed=seed),
        seed=int(seed),
    )
    for a in (res.scores, res.pvalues, res.qvalues, res.flagged):
        a.setflags(write=False)
    return res


def audit_combined(
    bench_ids,
    bench_features,
    ref_features,
    *,
    methods=None,
    higher_is_member=None,
    folds: int = CROSSFIT_FOLDS,
    C: float = CROSSFIT_C,
    fdr: float = 0.05,
    alpha: float = 0.05,
    confidence: float = 0.95,
    lambda_: float = 0.5,
    n_boot: int = 2000,
    test_method: str = "auto",
    seed: int = 0,
) -> AuditResult:
    """Audit with several detectors at once: a cross-fitted combination learned without labels.

    ``bench_features`` [n, d], ``ref_features`` [m, d]: d detectors' scores per question. Their
    orientation is stated as in ``audit``: ``methods`` (d detector names; raw scores oriented by
    each one's direction) or ``higher_is_member`` (one bool or d bools). The combined scores come
    from ``crossfit_combined_scores`` (K = ``folds`` seeded folds, logistic regression with
    ``C``); then p-values against each question's own reference fold, BH within each fold at
    fdr/K (``crossfit_qvalues``), the Bonferroni-joined fold tests (``crossfit_dataset_test``,
    the verdict) and Storey's fraction from the fold-wise p-values. Every guarantee of ``audit``
    holds, at a cost in resolution: p-values on a grid of 1/(m_k + 1), and BH flags none or at
    least about K^2 times as many questions as with one detector (``min_flaggable``). What it buys:
    the combination leans on whichever detectors separate this benchmark from the reference.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> r = audit_combined([str(i) for i in range(40)], rng.normal(1, 1, (40, 3)), rng.normal(0, 1, (60, 3)),
    ...                    higher_is_member=True, n_boot=0)
    >>> r.contaminated, r.combination.describe()
    (True, 'cross-fitted combination of f0, f1, f2 (2 folds)')
    """
    ids = tuple(str(i) for i in bench_ids)
    xb, xr = _features(bench_features, "bench_features"), _features(ref_features, "ref_features")
    d = xb.shape[1]
    if (methods is None) == (higher_is_member is None):
        raise ConfigError("audit_combined(): state the scores' orientation with exactly one of methods=[...] (detector "
                          "names, in feature order) or higher_is_member=True/False (or one per detector)")  # fmt: skip
    if methods is not None:
        from distill_detect.detectors import get

        names = tuple(methods)
        signs = [get(mth).higher_is_member for mth in names]
    else:
        signs = [bool(higher_is_member)] * d if np.ndim(higher_is_member) == 0 else [bool(h) for h in higher_is_member]
        names = tuple(f"f{j}" for j in range(d))
    if len(signs) != d or len(names) != d:
        raise ValueError(f"{d} detector column(s) but {len(signs)} orientation(s)")
    if len(set(names)) != d:
        raise ValueError(f"detectors repeated: {', '.join(names)}")
    orient = np.where(signs, 1.0, -1.0)
    if len(ids) != len(xb):
        raise ValueError(f"{len(ids)} ids but {len(xb)} benchmark rows")
    if len(set(ids)) != len(ids):
        raise ValueError("benchmark ids are not unique")
    fdr = _level(fdr, "fdr", "for a 5% false-discovery rate use 0.05")
    alpha = _level(alpha, "alpha", "for a 5% test use 0.05")
    cf = crossfit_combined_scores(xb * orient, xr * orient, folds=folds, seed=seed, C=C)
    p = crossfit_pvalues(cf)
    q = crossfit_qvalues(p, cf.bench_fold, cf.folds)
    test, parts = crossfit_dataset_test(cf, method=test_method, seed=seed)
    res = AuditResult(
        ids=ids,
        scores=cf.bench_scores.copy(),
        pvalues=p,
        qvalues=q,
        flagged=q <= fdr,
        n_ref=int(len(xr)),
        fdr=fdr,
        alpha=alpha,
        dataset=test,
        fraction=crossfit_fraction(cf, lambda_=lambda_, confidence=confidence, n_boot=n_boot, seed=seed),
        seed=int(seed),
        combination=Combination(names, cf, tuple(parts)),
    )
    for a in (res.scores, res.pvalues, res.qvalues, res.flagged, cf.bench_scores, cf.ref_scores, cf.bench_fold, cf.ref_fold):
        a.setflags(write=False)
    return res


# ----------------------------------------------------------------------------- reference by perturbation

_WORD_VALUES = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}
_VALUE_WORDS = {v: w for w, v in _WORD_VALUES.items()}

_TOKEN_RE = re.compile(
    r"(?P<time>(?<![\w.:])(?P<hour>\d{1,2}):(?P<minute>\d{2})(?![\d:]))"
    r"|(?P<num>(?<!\w)(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<dec>\d+))?)(?!\d)(?!(?:st|nd|rd|th)\b)"
    r"|(?P<word>\b(?:" + "|".join(_WORD_VALUES) + r")\b)",
    re.IGNORECASE,
)


def _new_digits(int_d: str, dec_d: str, rng: np.random.Generator) -> str | None:
    """A different digit string of the same shape, or None when the number is kept (0, 1, all zeros)."""
    digits = int_d + dec_d
    if not digits.strip("0"):
        return None
    value = float(int_d + ("." + dec_d if dec_d else ""))
    if value in (0.0, 1.0):
        return None  # "1 hour", "0 left": changing them changes the question's logic
    if not dec_d and len(int_d) == 4 and 1900 <= int(int_d) <= 2100:  # a year: move it a little
        offsets = np.r_[np.arange(-20, 0), np.arange(1, 21)]
        return str(int(int_d) + int(rng.choice(offsets)))
    lead = len(digits) - len(digits.lstrip("0"))  # e.g. 0.25 -> "025": keep the leading zero
    trail = len(digits) - len(digits.rstrip("0"))  # keep round numbers round: 80,000 -> 30,000
    core = digits[lead : len(digits) - trail]
    if len(core) == 1:
        choices = [d for d in "23456789" if d != core]
        new = str(rng.choice(choices))
    else:
        new = core
        while new == core:
            mid = "".join(str(d) for d in rng.integers(0, 10, len(core) - 2))
            new = str(rng.integers(1, 10)) + mid + str(rng.integers(1, 10))
    return "0" * lead + new + "0" * trail


def _group(int_d: str) -> str:
    return f"{int(int_d):,}"


def _case_like(word: str, template: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[0].isupper():
        return word.capitalize()
    return word


def perturb_numbers(text: str, rng: np.random.Generator, *, words: bool = True) -> tuple[str, dict[str, str]]:
    """Change every number in ``text`` consistently; return (new text, {old token: new token}).

    Numbers: digit runs with optional thousands commas and decimals (``16``, ``$80,000``,
    ``2.5``, ``150%``), the words two..nine, and clock times (``7:30``). Rules: the same
    number gets the same new number everywhere in the text (``3`` and ``three`` are one
    number); different numbers get different new numbers when possible; the shape is
    kept (digit count, thousands commas, decimal places, leading zeros, trailing zeros,
    so round numbers stay round and integers stay integers); single digits map within
    2..9 (so a spelled-out number stays spelled out); years 1900-2100 move by 1-20; clock
    times keep their minutes and all move by one common number of hours (1-4, staying
    within 1-12, or 0-23 for a 24-hour clock). Kept unchanged: 0 and 1 (they carry
    logic: "1 hour", "none left"), ordinals (``4th``), digits inside words (``A4``),
    other number words (one, ten, half, twice, dozen), and with ``words=False`` the words
    two..nine too. Everything that is not a number is kept character for character.

    Consistency is by value, so a spelled-out count that is tied to other words can go out
    of step ("the first, second and third month ... over the three months" becomes "... over
    the six months"); ``words=False`` avoids most of these at the cost of fewer changes.
    """
    value_map: dict[tuple[str, str], str | None] = {}
    used: set[str] = set()
    # Clock times: every hour moves by one common offset, so their order and gaps survive.
    hours = [int(m.group("hour")) for m in _TOKEN_RE.finditer(text) if m.group("time")]
    lo, hi = (1, 12) if all(h <= 12 for h in hours) else (0, 23)
    offsets = [d for d in (-4, -3, -2, -1, 1, 2, 3, 4) if hours and all(lo <= h + d <= hi for h in hours)]
    shift = int(rng.choice(offsets)) if offsets else None

    def map_value(int_d: str, dec_d: str) -> str | None:
        key = (int_d, dec_d)
        if key not in value_map:
            new = _new_digits(int_d, dec_d, rng)
            for _ in range(50):  # prefer a one-to-one map; give up after 50 tries (few values left)
                if new is None or new not in used:
                    break
                new = _new_digits(int_d, dec_d, rng)
            if new is not None:
                used.add(new)
            value_map[key] = new
        return value_map[key]

    changes: dict[str, str] = {}

    def repl(m: re.Match) -> str:
        old = m.group(0)
        if m.group("time"):
            if shift is None:
                return old
            new = f"{int(m.group('hour')) + shift:0{len(m.group('hour'))}d}:{m.group('minute')}"
        elif m.group("num"):
            int_d, dec_d = m.group("int").replace(",", ""), m.group("dec") or ""
            digits = map_value(int_d, dec_d)
            if digits is None:
                return old
            new_int, new_dec = digits[: len(int_d)], digits[len(int_d) :]
            new = (_group(new_int) if "," in m.group("int") else new_int) + ("." + new_dec if dec_d else "")
        else:
            if not words:
                return old
            digits = map_value(str(_WORD_VALUES[old.lower()]), "")
            new = _case_like(_VALUE_WORDS[int(digits)], old)
        changes[old] = new
        return new

    return _TOKEN_RE.sub(repl, text), changes


def _question_rng(seed: int, qid: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(qid.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed), h])


def make_reference(questions, seed: int = 0, *, words: bool = True) -> tuple[list[Question], list[str]]:
    """Build an unseen reference set from the benchmark itself by changing its numbers.

    Each question's numbers are changed consistently (``perturb_numbers``); the result gets
    id ``<id>-perturbed``, label 0 and no response. Returns (reference questions, ids of
    the questions dropped because they contain no number that can be changed); a
    ``UserWarning`` gives the count of dropped questions. The same (question id, seed)
    always gives the same perturbation, independent of the other questions. ``words``: also
    change the spelled-out numbers two..nine (see ``perturb_numbers``).

    Limits -- read these before trusting an audit built on it:

    * The reference is only "unseen" verbatim. A model that generalises from the original
      (or that saw a paraphrase) can stay confident on the perturbed question; then the
      reference looks member-like and the audit loses power (conservative).
    * Perturbed questions are not exchangeable with the originals: new numbers can be
      odd (non-integer or negative answers, implausible prices), which can make any model
      less confident on them. That makes the benchmark look MORE member-like than its
      reference even when nothing was seen: false positives. Check the 0%-contamination
      false-positive rate of this reference on a comparable model before relying on it.
    * The answer no longer matches (responses are dropped); only questions with numbers
      are kept, which changes the benchmark's composition (report the dropped count).
    * Each reference question is paired with a benchmark question, so R is not
      independent of B; the tests treat it as an independent sample.
    """
    out: list[Question] = []
    dropped: list[str] = []
    for q in questions:
        new_text, changes = perturb_numbers(q.text, _question_rng(seed, q.id), words=words)
        if not changes:
            dropped.append(q.id)
            continue
        out.append(Question(id=f"{q.id}-perturbed", text=new_text, label=0, response=None))
    if dropped:
        warnings.warn(
            f"make_reference: dropped {len(dropped)} of {len(out) + len(dropped)} question(s) with no number to change",
            UserWarning,
            stacklevel=2,
        )
    return out, dropped
