"""Base-calibrated scores on the student's own greedy tokens (beyond the paper).

Both read, for the first M tokens y_1..y_T the student generated,

    s_t = log p_student(y_t | q, y_<t)     (Trace.output_logprobs)
    b_t = log p_base(y_t | q, y_<t)        (Trace.extra["reference_output_logprobs"]: the pre-distillation
                                            model teacher-forced on the student's tokens, --reference-model)

and ask how the student moved away from its base on those tokens. Distillation on a question
pushes the student's probabilities up on that question's answer; on an unseen question the
student still writes in the teacher's style, so a part of the move is shared by members and
non-members, and the scores below look for the part that is not.

* ``wbc``: Window-Based Comparison (Chen et al., arXiv:2601.02751; the window sizes 1, 5, 10, 20
  are those of the Fast-MIA implementation, github.com/Nikkei/fast-mia). For each window size w,
  the share of the length-w windows of consecutive tokens in which the base's summed loss exceeds
  the student's; the score is the mean share over the sizes. Counting windows instead of summing
  the whole sequence keeps one badly predicted token from deciding the score. Higher = member.
* ``ref_imbalance``: directional imbalance on the tokens the student is NOT sure of, after
  EZ-MIA (Song et al., arXiv:2601.12104), which reads a fine-tuned model against its reference on
  the tokens where the fine-tuned model errs. The student's own greedy tokens are never "errors",
  so its uncertain tokens (p_student < ``tau``) stand in for them: with d_t = s_t - b_t over those
  tokens, the score is log((sum d_t+ + eps) / (sum d_t- + eps)): how much more the student's
  probabilities rose than fell against the base where it still hesitates. A generation with no
  uncertain token is scored over all its tokens. Higher = member.

Hyperparameters are fixed in code (developed on the seed-42 GSM8K students only).
"""

from __future__ import annotations

import numpy as np

from distill_detect.detectors.checks import output_pair


def window_share(student_logprobs, base_logprobs, window: int) -> float:
    """Share of the windows of ``window`` consecutive tokens (fewer when the text is shorter) in which
    the base's summed loss exceeds the student's; 0.0 for an empty text.

    >>> window_share([-0.1, -0.1, -2.0], [-1.0, -0.5, -0.1], 1)  # base loses more on 2 of 3 tokens
    0.6666666666666666
    >>> window_share([-0.1, -0.1, -2.0], [-1.0, -0.5, -0.1], 3)  # one window: 2.2 (student) > 1.6 (base)
    0.0
    """
    s = np.asarray(student_logprobs, dtype=np.float64)
    b = np.asarray(base_logprobs, dtype=np.float64)
    if s.size == 0:
        return 0.0
    w = min(int(window), s.size)
    kernel = np.ones(w)
    # loss = -logp: base loss > student loss  <=>  sum(s) > sum(b) over the window
    return float(np.mean(np.convolve(s, kernel, mode="valid") > np.convolve(b, kernel, mode="valid")))


def wbc_score(student_logprobs, base_logprobs, windows=(1, 5, 10, 20)) -> float:
    """Mean ``window_share`` over the window sizes."""
    return float(np.mean([window_share(student_logprobs, base_logprobs, w) for w in windows]))


def imbalance(student_logprobs, base_logprobs, *, tau: float = 0.9, eps: float = 1e-3) -> float:
    """log((sum of the rises + eps) / (sum of the falls + eps)) of s_t - b_t over the tokens with p_student < tau
    (all tokens when there is none; 0.0 for an empty text).

    >>> round(imbalance(np.log([0.5, 0.99]), np.log([0.25, 0.99])), 4)  # one uncertain token, risen by log 2
    6.5427
    """
    s = np.asarray(student_logprobs, dtype=np.float64)
    b = np.asarray(base_logprobs, dtype=np.float64)
    if s.size == 0:
        return 0.0
    zone = np.exp(s) < tau
    if not zone.any():
        zone = np.ones_like(zone)
    d = s[zone] - b[zone]
    return float(np.log((d[d > 0].sum() + eps) / (-d[d < 0].sum() + eps)))


def wbc(trace, *, max_tokens: int = 300) -> float:
    return wbc_score(*output_pair(trace, "reference_output_logprobs", "wbc", max_tokens))


def ref_imbalance(trace, *, tau: float = 0.9, max_tokens: int = 300) -> float:
    if not (0.0 < float(tau) <= 1.0):
        from distill_detect.errors import ConfigError

        raise ConfigError(f"ref_imbalance tau must be in (0, 1], got {tau!r}")
    return imbalance(*output_pair(trace, "reference_output_logprobs", "ref_imbalance", max_tokens), tau=tau)
