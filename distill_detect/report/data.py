"""The numbers behind every figure of the report, computed once in Python.

Everything here is a pure function of scores, labels and traces; the HTML page and the
PNG figures only draw what these functions return, so the tests check the numbers here.

Orientation: ROC curves and verdicts need "higher = member" scores, which come from
``distill_detect.metrics.membership_score`` (the package's only sign flip). Histograms
and the per-question table show each method's raw score in its own sign (TPD as in the
paper: lower = member).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np

FPR_LEVELS = (0.01, 0.05)
"""The FPR levels offered for verdicts in the report."""

MIN_NONMEMBERS_FOR_TPR = 100
"""Below this many non-members, a TPR at a low FPR rests on a handful of false positives (or none)."""


def tpr_caveat(n_nonmembers, level: float, noun: str = "non-members") -> str | None:
    """The warning printed next to a TPR at ``level`` FPR computed from few non-members, or None.

    >>> tpr_caveat(8, 0.01)
    'from 8 non-members: under 100, a TPR at 1% FPR means little (0 false positives allowed)'
    >>> tpr_caveat(250, 0.01) is None
    True
    """
    if n_nonmembers is None:
        return None
    n = int(n_nonmembers)
    if n >= MIN_NONMEMBERS_FOR_TPR:
        return None
    k = int(math.floor(level * n + 1e-9))
    return (
        f"from {n} {noun}: under {MIN_NONMEMBERS_FOR_TPR}, a TPR at {100 * level:g}% FPR means little "
        f"({k} false positive{'' if k == 1 else 's'} allowed)"
    )


def finite_or_none(x):
    """JSON-safe copy of nested numbers: NaN/inf become None; numpy scalars become Python ones."""
    if isinstance(x, dict):
        return {str(k): finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    if isinstance(x, np.ndarray):
        return finite_or_none(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


# -- reading a results directory -----------------------------------------------------------------


def read_scores(path) -> tuple[list[dict], list[str]]:
    """(rows, methods) from ``scores.jsonl``; methods in first-seen column order."""
    rows, methods = [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            rows.append(r)
            for k in r:
                if k not in ("id", "label") and k not in methods:
                    methods.append(k)
    return rows, methods


def higher_is_member(method: str, metrics_doc: dict | None) -> bool | None:
    """The direction of a method's raw score: from metrics.json, else the registry, else None."""
    block = ((metrics_doc or {}).get("methods") or {}).get(method) or {}
    if "higher_is_member" in block:
        return bool(block["higher_is_member"])
    try:
        from distill_detect.detectors import get

        return bool(get(method).higher_is_member)
    except Exception:  # an unknown method from another version: no orientation
        return None


def oriented(raw, higher: bool) -> np.ndarray:
    """Raw scores -> higher = member, through ``metrics.membership_score``."""
    from distill_detect.metrics import membership_score

    return membership_score(SimpleNamespace(higher_is_member=higher), raw)


# -- figure data ----------------------------------------------------------------------------------


def roc_points(y_true, y_score) -> dict | None:
    """ROC curve of oriented scores (sklearn ``roc_curve``, every threshold kept).

    Returns ``{"fpr": [...], "tpr": [...]}`` from (0, 0) to (1, 1), or None when only one
    class is present.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true).astype(int)
    s = np.asarray(y_score, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        return None
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr]}


def histogram(values, groups: dict[str, np.ndarray], *, bins: int | None = None) -> dict:
    """Counts of ``values`` on shared bin edges, one count list per group (boolean masks).

    Edges span the finite values; a constant score gets one bin of width 1 around it.
    Non-finite values are counted in ``dropped`` instead.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    fv = v[finite]
    if bins is None:
        bins = int(np.clip(np.ceil(1.5 * np.sqrt(max(fv.size, 1))), 8, 40))
    if fv.size == 0:
        edges = np.array([0.0, 1.0])
    elif fv.min() == fv.max():
        edges = np.array([fv.min() - 0.5, fv.min() + 0.5])
    else:
        edges = np.linspace(fv.min(), fv.max(), bins + 1)
    out = {"edges": [float(e) for e in edges], "counts": {}, "dropped": int((~finite).sum())}
    for name, mask in groups.items():
        m = np.asarray(mask, dtype=bool) & finite
        counts, _ = np.histogram(v[m], bins=edges)
        out["counts"][name] = [int(c) for c in counts]
    return out


def verdict_threshold(nonmember_scores, level: float) -> float:
    """Threshold on oriented scores: flag "member" when score > threshold, so FPR <= level.

    With n non-members, at most k = floor(level * n) of them may lie above the threshold:
    it is the (k+1)-th largest non-member score (ties with it are not flagged). With
    k = 0 it is the largest non-member score, so no non-member is flagged.

    >>> verdict_threshold([0.1, 0.2, 0.3, 0.4], 0.25)  # one of four may pass
    0.3
    >>> verdict_threshold([0.1, 0.2, 0.3, 0.4], 0.01)
    0.4
    """
    s = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        return math.nan
    k = int(math.floor(level * s.size + 1e-9))
    return float(s[min(k, s.size - 1)])


def verdicts(y_true, y_score, levels: Sequence[float] = FPR_LEVELS) -> dict[str, dict]:
    """Per FPR level: threshold (oriented), flags for every question, and the FPR/TPR they give.

    ``y_true`` entries are 1, 0 or -1 (unknown); thresholds come from the non-members only.
    Returns {} when there are no non-members.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(y_score, dtype=np.float64)
    neg = s[y == 0]
    if neg.size == 0:
        return {}
    out = {}
    for level in levels:
        thr = verdict_threshold(neg, level)
        flag = s > thr
        pos = y == 1
        out[f"{level:g}"] = {
            "level": level,
            "threshold": thr,
            "flag": [int(f) for f in flag],
            "fpr": float(flag[y == 0].mean()),
            "tpr": float(flag[pos].mean()) if pos.any() else None,
        }
    return out


def token_probability_histogram(trace_probs: Sequence[np.ndarray], labels: Sequence[int], *, bins: int = 20) -> dict:
    """The paper's figure: distribution of generated-token probabilities, members vs non-members.

    ``trace_probs`` holds each question's first-M token probabilities. Bins are equal
    widths on [0, 1] (the last bin includes 1). Returns counts and fractions of tokens
    per class, and per class the mean share of tokens with p < 0.9 per question.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    lab = np.asarray(labels, dtype=int)
    out = {
        "edges": [float(e) for e in edges],
        "counts": {},
        "fractions": {},
        "tokens": {},
        "questions": {},
        "longest": max((len(p) for p in trace_probs), default=0),
    }
    for name, want in (("member", 1), ("nonmember", 0), ("unlabelled", -1)):
        sel = [np.asarray(p, dtype=np.float64) for p, lb in zip(trace_probs, lab) if lb == want]
        if not sel:
            continue
        allp = np.concatenate(sel) if sel else np.zeros(0)
        counts, _ = np.histogram(np.clip(allp, 0.0, 1.0), bins=edges)
        total = int(counts.sum())
        out["counts"][name] = [int(c) for c in counts]
        out["fractions"][name] = [float(c) / total if total else 0.0 for c in counts]
        out["tokens"][name] = total
        out["questions"][name] = len(sel)
    return out
