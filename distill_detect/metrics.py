"""Membership metrics over per-question scores, in sklearn's names and conventions.

Convention: every function here takes ``y_true`` (1 = member, 0 = non-member) and
``y_score`` where HIGHER = MORE LIKELY A MEMBER. ``membership_score`` is the single
place where a detector's raw direction is turned into that convention; TPD, whose
low values mean "member", is negated there and nowhere else.

TPR at a fixed FPR has two readings (PAPER.md):

* ``tpr_at_fpr(..., reading="paper")``: the authors' code calls ``roc_curve`` with its
  defaults (``drop_intermediate=True``) and takes the TPR at the first returned point
  whose FPR is >= the target. With 200 non-members that point can sit above 1% FPR.
* ``tpr_at_fpr(..., reading="strict")``: the largest TPR among all ROC points whose FPR
  is <= the target (a threshold that really keeps the FPR at or below it).

Degenerate input (one class only) gives NaN with a ``UndefinedMetricWarning``-style
warning, as sklearn does, instead of an exception.
"""

from __future__ import annotations

import math
import warnings

import numpy as np


class OneClassWarning(UserWarning):
    """Only members or only non-members: ROC metrics are undefined (NaN)."""


def membership_score(detector, raw) -> np.ndarray:
    """Orient a detector's raw scores so that higher = member (the only sign flip in the package)."""
    raw = np.asarray(raw, dtype=np.float64)
    return raw if detector.higher_is_member else -raw


def _check(y_true, y_score) -> tuple[np.ndarray, np.ndarray, bool]:
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    y_score = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true has {y_true.size} entries but y_score has {y_score.size}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must contain only 0 (non-member) and 1 (member)")
    if not np.isfinite(y_score).all():
        raise ValueError(f"y_score has {int((~np.isfinite(y_score)).sum())} non-finite values")
    ok = 0 < y_true.sum() < y_true.size
    if not ok:
        warnings.warn(
            "only one class present in y_true (need members and non-members); ROC metrics are NaN",
            OneClassWarning,
            stacklevel=3,
        )
    return y_true, y_score, ok


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve; NaN with a warning when only one class is present.

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    from sklearn.metrics import roc_auc_score

    y_true, y_score, ok = _check(y_true, y_score)
    return float(roc_auc_score(y_true, y_score)) if ok else math.nan


def tpr_at_fpr(y_true, y_score, *, fpr: float = 0.01, reading: str = "strict") -> float:
    """True-positive rate at a target false-positive rate (see the module docstring for the readings).

    >>> y, s = [0, 0, 0, 0, 1, 1, 1, 1], [0.1, 0.2, 0.3, 0.9, 0.4, 0.5, 0.6, 0.95]
    >>> tpr_at_fpr(y, s, fpr=0.25, reading="strict"), tpr_at_fpr(y, s, fpr=0.01, reading="paper")
    (1.0, 0.25)
    """
    from sklearn.metrics import roc_curve

    if reading not in ("strict", "paper"):
        raise ValueError(f"reading must be 'strict' or 'paper', got {reading!r}")
    y_true, y_score, ok = _check(y_true, y_score)
    if not ok:
        return math.nan
    if reading == "paper":
        f, t, _ = roc_curve(y_true, y_score)  # sklearn defaults, as the authors' code
        idx = np.flatnonzero(f >= fpr)
        return float(t[idx[0]])
    f, t, _ = roc_curve(y_true, y_score, drop_intermediate=False)
    return float(t[f <= fpr].max())


def bootstrap_auc_ci(y_true, y_score, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval for the AUC, resampling members and non-members separately.

    Stratified resampling keeps both classes in every resample, so no resample is
    degenerate. Returns (low, high); (nan, nan) when only one class is present or
    ``n_resamples`` is 0 (no interval asked for).
    """
    from scipy.stats import rankdata

    y_true, y_score, ok = _check(y_true, y_score)
    if not ok or n_resamples < 1:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    pos, neg = y_score[y_true == 1], y_score[y_true == 0]
    n1, n0 = len(pos), len(neg)
    # All resamples at once: the AUC is the Mann-Whitney statistic, U / (n1 n0), with U from the
    # members' mid-ranks (mid-ranks count ties as 1/2, as roc_auc_score does).
    aucs = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // (n1 + n0))  # bound memory for large sets
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        s = np.concatenate([rng.choice(pos, (b, n1)), rng.choice(neg, (b, n0))], axis=1)
        ranks = rankdata(s, axis=1)
        u = ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2
        aucs[start : start + b] = u / (n1 * n0)
    a = (1 - confidence) / 2
    lo, hi = np.quantile(aucs, [a, 1 - a])
    return (float(lo), float(hi))


def summarize(y_true, y_score, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """The metrics block written to metrics.json for one method (y_score: higher = member)."""
    y = np.asarray(y_true).astype(int)
    with warnings.catch_warnings():
        # Warn once per method (below), not once per metric.
        warnings.simplefilter("ignore", OneClassWarning)
        out = {
            "auc": roc_auc(y, y_score),
            "auc_ci": list(bootstrap_auc_ci(y, y_score, n_resamples=n_resamples, seed=seed)),
            "tpr_at_1pct_fpr": tpr_at_fpr(y, y_score, fpr=0.01, reading="paper"),
            "tpr_at_1pct_fpr_strict": tpr_at_fpr(y, y_score, fpr=0.01, reading="strict"),
            "tpr_at_5pct_fpr": tpr_at_fpr(y, y_score, fpr=0.05, reading="paper"),
            "tpr_at_5pct_fpr_strict": tpr_at_fpr(y, y_score, fpr=0.05, reading="strict"),
            "n_members": int((y == 1).sum()),
            "n_nonmembers": int((y == 0).sum()),
        }
    if out["n_members"] == 0 or out["n_nonmembers"] == 0:
        warnings.warn(
            f"{out['n_members']} members and {out['n_nonmembers']} non-members: AUC and TPR are NaN",
            OneClassWarning,
            stacklevel=2,
        )
    return out


def _placements(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: for each member, the share of non-members it outscores (ties 1/2),
    and for each non-member, the share of members that outscore it."""
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


def fmt_delong(vs: dict | None, p_format: str = ".3g") -> str:
    """A ``delong_test`` result as a table cell: "+0.034, p = 0.489", with " (better)" when the first score is
    higher at p < 0.05, "—" for none."""
    if vs is None:
        return "—"
    return f"{vs['diff']:+.3f}, p = {vs['pvalue']:{p_format}}" + (" (better)" if vs["diff"] > 0 and vs["pvalue"] < 0.05 else "")


def delong_test(y_true, score_a, score_b) -> dict:
    """DeLong's test that two scores of the SAME questions have equal AUC (DeLong, DeLong and
    Clarke-Pearson, Biometrics 1988). Scores are membership scores (higher = member).

    Returns ``{"auc_a", "auc_b", "diff", "se", "z", "pvalue"}`` with a two-sided p-value from the
    normal approximation; the pairing (both scores read the same questions) is what makes the
    test far more sensitive than comparing two intervals.

    >>> r = delong_test([1, 1, 1, 0, 0, 0], [3, 2, 1, 0, -1, -2], [3, -2, 1, 0, -1, 2])
    >>> round(r["auc_a"], 3), round(r["auc_b"], 3)
    (1.0, 0.556)
    """
    y = np.asarray(y_true).astype(int).reshape(-1)
    a = np.asarray(score_a, dtype=np.float64).reshape(-1)
    b = np.asarray(score_b, dtype=np.float64).reshape(-1)
    m, n = int((y == 1).sum()), int((y == 0).sum())
    if m < 2 or n < 2:
        return {"auc_a": math.nan, "auc_b": math.nan, "diff": math.nan, "se": math.nan, "z": math.nan, "pvalue": math.nan}
    comps = [_placements(s[y == 1], s[y == 0]) for s in (a, b)]
    v10 = np.stack([c[0] for c in comps])  # [2, m]
    v01 = np.stack([c[1] for c in comps])  # [2, n]
    aucs = v10.mean(axis=1)
    cov = np.cov(v10) / m + np.cov(v01) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    if var <= 0:
        z, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        from scipy.stats import norm

        z = diff / math.sqrt(var)
        p = float(2 * norm.sf(abs(z)))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "se": math.sqrt(max(var, 0.0)),
        "z": float(z),
        "pvalue": p,
    }
