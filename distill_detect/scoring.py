"""Scores and metrics from traces: cheap, always recomputed, never needs a model.

``score_traces`` applies detectors (pure functions) to traces; ``evaluate`` turns raw
scores into the metrics block (orienting each method once, via
``metrics.membership_score``); ``write_outputs`` writes the output contract:

* ``DIR/scores.jsonl``: one line per question: ``id``, ``label`` (if known), one key per
  method with its raw score in the method's own sign (TPD as in the paper: lower = member).
* ``DIR/metrics.json`` (when labels exist): ``{"methods": {name: {auc, auc_ci,
  tpr_at_1pct_fpr, tpr_at_1pct_fpr_strict, tpr_at_5pct_fpr, tpr_at_5pct_fpr_strict, n_members, n_nonmembers,
  higher_is_member, params}}, "config": {...}}``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distill_detect import __version__
from distill_detect.data import write_jsonl
from distill_detect.detectors import get
from distill_detect.errors import DistillDetectError
from distill_detect.types import Trace


class EmptyTraceWarning(UserWarning):
    """Some traces with log-probabilities have zero generated tokens (their TPD is 0 by definition)."""


def resolve_methods(methods: Sequence[str], params: dict[str, dict] | None = None) -> dict[str, dict]:
    """{name: full params} with each detector's defaults filled in and validated by name."""
    params = params or {}
    out = {}
    for name in methods:
        det = get(name)
        unknown = set(params.get(name, {})) - set(det.defaults)
        if unknown:
            from distill_detect.errors import ConfigError

            raise ConfigError(
                f"method {name!r} has no parameter {sorted(unknown)[0]!r}; its parameters are {sorted(det.defaults) or 'none'}"
            )
        out[name] = {**det.defaults, **params.get(name, {})}
    return out


def generation_budget(methods: dict[str, dict], max_new_tokens: int) -> int:
    """How many tokens must be generated for these methods: the largest budget any of them reads.

    A method that reads generated tokens without a budget parameter needs all of them;
    methods that read no generated tokens need none (one token is still decoded).
    """
    need = 1
    for name, params in methods.items():
        det = get(name)
        reads_output = any(n.startswith("output") or n == "extra:reference_output_logprobs" for n in det.needs)
        if not reads_output:
            continue
        b = det.token_budget(params)
        need = max(need, max_new_tokens if b is None else min(b, max_new_tokens))
    return need


def score_traces(traces: Sequence[Trace], methods: dict[str, dict]) -> dict[str, np.ndarray]:
    """Raw scores {method: float64 [n]} in each method's own sign.

    Warns (``EmptyTraceWarning``) when traces with log-probabilities have no generated token; a
    text-only trace (``--no-logprobs``: no log-probabilities, often no token count) is not counted.
    """
    with_lp = [t for t in traces if t.has_logprobs]
    empty = sum(1 for t in with_lp if t.num_tokens == 0)
    if empty:
        warnings.warn(
            f"{empty} of {len(with_lp)} traces have no generated tokens; their TPD is 0 by the paper's definition",
            EmptyTraceWarning,
            stacklevel=2,
        )
    out = {}
    for name, params in methods.items():
        det = get(name)
        vals = np.empty(len(traces))
        for i, t in enumerate(traces):
            vals[i] = det(t, **params)
        out[name] = vals
    return out


def evaluate(
    labels: Sequence[int | None], raw: dict[str, np.ndarray], methods: dict[str, dict], *, n_resamples: int = 1000, seed: int = 0
) -> dict:
    """Metrics per method over the labelled traces (unlabelled ones are left out)."""
    from distill_detect.metrics import membership_score, summarize

    lab = np.array([-1 if x is None else int(x) for x in labels])
    known = lab >= 0
    res = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, params in methods.items():
            det = get(name)
            s = membership_score(det, raw[name][known])
            finite = np.isfinite(s)
            if not finite.all():
                raise DistillDetectError(f"method {name!r} produced {int((~finite).sum())} non-finite scores")
            block = summarize(lab[known], s, n_resamples=n_resamples, seed=seed)
            block["higher_is_member"] = det.higher_is_member
            block["params"] = params
            res[name] = block
    if caught:
        warnings.warn(str(caught[0].message), caught[0].category, stacklevel=2)
    return res


def write_outputs(out_dir, traces: Sequence[Trace], raw: dict[str, np.ndarray], metrics: dict | None, config: dict) -> dict:
    """Write scores.jsonl and (with labels) metrics.json; returns the metrics document."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistillDetectError(f"cannot create output directory {out_dir}: {exc.strerror}") from None
    rows = []
    for i, t in enumerate(traces):
        r = {"id": t.id}
        if t.label is not None:
            r["label"] = int(t.label)
        for name in raw:
            r[name] = float(raw[name][i])
        rows.append(r)
    doc = {
        "methods": metrics or {},
        "config": {**config, "package_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    try:
        write_jsonl(out_dir / "scores.jsonl", rows)
        if metrics is not None:
            tmp = out_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n")
            tmp.replace(out_dir / "metrics.json")
    except OSError as exc:
        raise DistillDetectError(f"cannot write outputs to {out_dir}: {exc.strerror or exc}") from None
    return doc


def _fmt(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "nan"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def format_table(metrics: dict) -> str:
    """A fixed-width table of the metrics, one row per method, best AUC first."""
    head = (
        f"{'method':<12} {'AUC':>6} {'95% CI':>13} {'TPR@1%FPR':>10} {'(strict)':>9} {'TPR@5%FPR':>10} {'(strict)':>9} "
        f"{'members':>8} {'non-mem':>8}"
    )
    lines = [head, "-" * len(head)]
    order = sorted(metrics, key=lambda k: -np.nan_to_num(metrics[k]["auc"], nan=-1))
    for name in order:
        m = metrics[name]
        lo, hi = m["auc_ci"]
        ci = "nan" if np.isnan(lo) else f"[{lo:.3f},{hi:.3f}]"
        lines.append(
            f"{name:<12} {_fmt(m['auc']):>6} {ci:>13} {_fmt(m['tpr_at_1pct_fpr'], True):>10} "
            f"{_fmt(m['tpr_at_1pct_fpr_strict'], True):>9} {_fmt(m['tpr_at_5pct_fpr'], True):>10} "
            f"{_fmt(m.get('tpr_at_5pct_fpr_strict', float('nan')), True):>9} {m['n_members']:>8} {m['n_nonmembers']:>8}"
        )
    lines.append("TPR@x%FPR: the paper's reading (first ROC point with FPR >= x%); (strict): the largest TPR with FPR <= x%.")
    few = min((m["n_nonmembers"] for m in metrics.values()), default=100)
    if few < 100:
        lines.append(
            f"warning: TPR at 1% FPR from {few} non-members: under 100, its FPR threshold is set by one or two questions "
            "and the number means little (read the AUC and its interval)"
        )
    return "\n".join(lines)
