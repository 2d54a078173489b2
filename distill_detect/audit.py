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
    "DatasetTest",
    "FractionEstimate",
    "audit",
    "conformal_pvalues",
    "dataset_test",
    "estimate_contaminated_fraction",
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
        """BH flags either no question or at least this many (set by the reference size)."""
        return max(1, math.ceil(self.n_bench / ((self.n_ref + 1) * self.fdr) - 1e-9))

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
            "min_pvalue": 1.0 / (self.n_ref + 1),
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
            "questions": [
                {"id": i, "score": float(s), "pvalue": float(p), "qvalue": float(q), "flagged": bool(fl)}
                for i, s, p, q, fl in zip(self.ids, self.scores, self.pvalues, self.qvalues, self.flagged)
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
