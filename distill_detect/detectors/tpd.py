"""Token Probability Deviation (TPD).

Zhang, Choi, Li, Wei, "Detecting Distillation Data from Reasoning Models",
arXiv:2510.04850 (v3, 2026; called TBD in v1/v2). Authors' code:
github.com/JaydencoolCC/TBD.

    p_t   = probability of the t-th greedily generated token (softmax of raw logits)
    K     = { t < M : p_t < tau }                 (first M tokens only)
    TPD   = mean_{t in K} (tau - p_t) ** alpha    (0 when K is empty)

Defaults tau = 1.0, alpha = 0.6, M = 300. The mean is over the kept tokens, not over M.
Lower TPD = the model was more certain = more likely a member.
"""

from __future__ import annotations

import numpy as np

from distill_detect.detectors.checks import need_array
from distill_detect.errors import ConfigError


def _real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_tpd_params(*, tau: float, alpha: float, max_tokens: int) -> None:
    """Raise ConfigError naming the parameter when a value is outside TPD's domain (or not a number at all)."""
    if not (_real(tau) and 0.0 < float(tau) <= 1.0):
        raise ConfigError(f"TPD tau must be in (0, 1], got {tau!r} (the paper uses 1.0)")
    if not (_real(alpha) and float(alpha) > 0.0 and np.isfinite(float(alpha))):
        raise ConfigError(f"TPD alpha must be a positive number, got {alpha!r} (the paper uses 0.6)")
    if not (_real(max_tokens) and np.isfinite(float(max_tokens)) and int(max_tokens) == max_tokens and max_tokens >= 1):
        raise ConfigError(f"TPD max_tokens (M) must be an integer >= 1, got {max_tokens!r} (the paper uses 300)")


def tpd_deviation(logprobs, *, tau: float = 1.0, alpha: float = 0.6, max_tokens: int = 300) -> float:
    """TPD of one generation from its emitted-token log-probabilities: a deviation from certainty,
    so LOWER = more likely a member (a student is near-certain on what it was distilled on).

    >>> import numpy as np
    >>> round(tpd_deviation(np.log([1.0, 0.5, 0.75]), tau=1.0, alpha=1.0), 6)  # mean(0.5, 0.25)
    0.375
    >>> tpd_deviation(np.log([1.0, 1.0]))  # nothing below tau: defined as 0
    0.0
    """
    check_tpd_params(tau=tau, alpha=alpha, max_tokens=max_tokens)
    # float64 for the arithmetic: exp of float32 log-probs near 0 keeps its precision here.
    p = np.exp(np.asarray(logprobs, dtype=np.float64)[: int(max_tokens)])
    kept = p[p < tau]
    if kept.size == 0:
        return 0.0
    return float(np.mean((tau - kept) ** alpha))


def tpd(trace, *, tau: float = 1.0, alpha: float = 0.6, max_tokens: int = 300) -> float:
    lp = need_array(trace, "output_logprobs", "tpd", allow_empty=True)
    return tpd_deviation(lp, tau=tau, alpha=alpha, max_tokens=max_tokens)


tpd_score = tpd_deviation  # the older name (its sign reads like sklearn's higher-is-better *_score, which it is not)
