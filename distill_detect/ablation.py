"""TPD ablations from stored traces: sweep one hyperparameter at a time around the defaults.

The paper sweeps the token budget M (AUC rises then falls, best near 300), tau and
alpha. Traces already hold every generated token's probability, so a sweep is pure
arithmetic: no model is loaded and nothing is generated. Each point is scored with
``distill_detect.detectors.tpd.tpd_deviation`` and evaluated with ``distill_detect.metrics``
(orientation through ``membership_score``, as everywhere else).

Result layout (also the content of ``DIR/ablations.json``)::

    {"method": "tpd", "defaults": {"tau": 1.0, "alpha": 0.6, "max_tokens": 300},
     "n_members": 200, "n_nonmembers": 200, "longest_trace": 1000,
     "sweeps": {"max_tokens": [{"value": 25, "auc": ..., "auc_ci": [lo, hi],
                                "tpr_at_1pct_fpr": ..., "tpr_at_1pct_fpr_strict": ...,
                                "tpr_at_5pct_fpr": ..., "beyond_longest": false}, ...],
                "tau": [...], "alpha": [...]}}

``tpr_at_1pct_fpr`` is the paper's reading (first ROC point with FPR >= 1%);
``tpr_at_1pct_fpr_strict`` the largest TPR with FPR <= 1%. ``beyond_longest`` marks
budgets M larger than the longest stored trace: they read the same tokens as the
longest trace does, so their numbers repeat.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distill_detect.types import Trace

DEFAULTS = {"tau": 1.0, "alpha": 0.6, "max_tokens": 300}
MAX_TOKENS = (25, 50, 100, 200, 300, 500, 1000)
TAUS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
ALPHAS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0)


def _auc_ci(y: np.ndarray, s: np.ndarray, n_resamples: int, seed: int) -> list[float]:
    from distill_detect.metrics import bootstrap_auc_ci

    if not (0 < int(np.sum(y == 1)) < len(y)):
        return [math.nan, math.nan]
    return list(bootstrap_auc_ci(y, s, n_resamples=n_resamples, seed=seed))


def _point(logprobs: list[np.ndarray], y: np.ndarray, params: dict, n_resamples: int, seed: int) -> dict:
    from distill_detect.detectors import get
    from distill_detect.detectors.tpd import tpd_deviation
    from distill_detect.metrics import membership_score, roc_auc, tpr_at_fpr

    raw = np.array([tpd_deviation(lp, **params) for lp in logprobs], dtype=np.float64)
    s = membership_score(get("tpd"), raw)
    out = {
        "auc": roc_auc(y, s),
        "tpr_at_1pct_fpr": tpr_at_fpr(y, s, fpr=0.01, reading="paper"),
        "tpr_at_1pct_fpr_strict": tpr_at_fpr(y, s, fpr=0.01, reading="strict"),
        "tpr_at_5pct_fpr": tpr_at_fpr(y, s, fpr=0.05, reading="paper"),
        "tpr_at_5pct_fpr_strict": tpr_at_fpr(y, s, fpr=0.05, reading="strict"),
    }
    if n_resamples > 0:
        out["auc_ci"] = _auc_ci(y, s, n_resamples, seed)
    return out


def tpd_ablation(
    traces: Sequence[Trace],
    labels: Sequence[int | None] | None = None,
    *,
    max_tokens: Sequence[int] = MAX_TOKENS,
    taus: Sequence[float] = TAUS,
    alphas: Sequence[float] = ALPHAS,
    defaults: dict | None = None,
    n_resamples: int = 200,
    seed: int = 0,
) -> dict:
    """TPD's AUC and TPR@FPR as each of M, tau and alpha varies, the other two at their defaults.

    ``labels`` (1 member, 0 non-member, None unknown) defaults to the traces' own labels;
    unlabelled traces are left out. ``n_resamples`` = 0 skips the bootstrap interval.
    With one class only every number is NaN (with a warning), as in ``distill_detect.metrics``.

    >>> import numpy as np
    >>> from distill_detect.types import Trace
    >>> ts = [Trace(id=str(i), output_logprobs=np.log([0.99, p])) for i, p in enumerate([0.98, 0.97, 0.6, 0.5])]
    >>> r = tpd_ablation(ts, [1, 1, 0, 0], max_tokens=(1, 2), taus=(1.0,), alphas=(0.6,), n_resamples=0)
    >>> [pt["auc"] for pt in r["sweeps"]["max_tokens"]]  # M=1: all tie; M=2: separated
    [0.5, 1.0]
    """
    from distill_detect.detectors.tpd import check_tpd_params

    base = {**DEFAULTS, **(defaults or {})}
    check_tpd_params(**base)
    if labels is None:
        labels = [t.label for t in traces]
    if len(labels) != len(traces):
        raise ValueError(f"{len(traces)} traces but {len(labels)} labels")
    keep = [i for i, lab in enumerate(labels) if lab is not None]
    y = np.array([int(labels[i]) for i in keep], dtype=int)
    lps = [np.asarray(traces[i].output_logprobs, dtype=np.float64) for i in keep]
    longest = max((len(lp) for lp in lps), default=0)
    grid = {"max_tokens": [int(m) for m in max_tokens], "tau": [float(t) for t in taus], "alpha": [float(a) for a in alphas]}
    for name, values in grid.items():
        for v in values:
            check_tpd_params(**{**base, name: v})
    sweeps: dict[str, list[dict]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, values in grid.items():
            pts = []
            for v in values:
                pt = {"value": v, **_point(lps, y, {**base, name: v}, n_resamples, seed)}
                if name == "max_tokens":
                    pt["beyond_longest"] = bool(v > longest)
                pts.append(pt)
            sweeps[name] = pts
    if caught:  # one warning for the whole sweep, not one per point
        warnings.warn(str(caught[0].message), caught[0].category, stacklevel=2)
    return {
        "method": "tpd",
        "defaults": base,
        "n_members": int((y == 1).sum()),
        "n_nonmembers": int((y == 0).sum()),
        "longest_trace": int(longest),
        "sweeps": sweeps,
    }


def _clean(x):
    """JSON-safe copy: NaN and infinities become null (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_ablations(out_dir, result: dict) -> Path:
    """Write ``result`` (from ``tpd_ablation``) to ``out_dir/ablations.json``; returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "ablations.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(result), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
