"""Fine-tuned Score Deviation (FSD), adapted to distillation (beyond the paper).

Zhang et al., "Fine-tuning can Help Detect Pretraining Data from Large Language Models",
ICLR 2025 (arXiv:2410.10880): fine-tune the audited model a little on text known to be
unseen, then score every candidate with both models. Unseen text resembles what the model
was just tuned on, so its score improves a lot; text the model was trained on was already
fitted and moves little. The deviation (score before minus score after) separates the two.

Here the audited model is a distilled student, the "unseen text" is a set of questions known
not to be in its distillation data with the student's own greedy answers (``distill_detect.fsd``
builds that FSD model), and the score is read on the tokens the student itself generated for
each benchmark question, as TPD is:

    s_t = log p_student(y_t | q, y_<t)     (Trace.output_logprobs)
    f_t = log p_fsd(y_t | q, y_<t)         (Trace.extra["fsd_output_logprobs"]: the FSD model
                                            teacher-forced on the student's tokens)

over the first M tokens y_1..y_M. ``fsd`` is how far the tuning moved those tokens:

    FSD = mean_t |f_t - s_t|

so a question the tuning barely moved (a member, already fitted) scores low; LOWER = member.
The paper's signed deviation, mean_t (f_t - s_t) (``logprob_gain``), assumes the tuned copy
gains on unseen text; on the development student the tuned copy LOST log-probability on the
benchmark's greedy tokens, and lost more on non-members (AUC 0.596 read that way round, 0.404
the paper's way), so the magnitude of the move is what is kept. ``fsd_tpd`` is the signed
deviation read through TPD (TPD under the student minus TPD under the FSD model; lower = member),
the alternative fixed before the development run.

The statistic and direction were chosen on the seed-42 GSM8K student only, among the signed gain
(either way), its absolute value, the mean and the root-mean-square of the absolute per-token
change (``benchmarks/fsd.py``, ``benchmarks/results/beyond_fsd.md``).
"""

from __future__ import annotations

import numpy as np

from distill_detect.detectors.checks import output_pair
from distill_detect.detectors.tpd import tpd_deviation


def logprob_gain(student_logprobs, fsd_logprobs) -> float:
    """Mean over the tokens of (log p under the FSD model - log p under the student); 0.0 for an empty text.

    >>> round(logprob_gain(np.log([0.5, 0.9]), np.log([1.0, 0.9])), 6)  # log 2 on one of two tokens
    0.346574
    """
    s = np.asarray(student_logprobs, dtype=np.float64)
    f = np.asarray(fsd_logprobs, dtype=np.float64)
    if s.size == 0:
        return 0.0
    return float(np.mean(f - s))


def mean_abs_shift(student_logprobs, fsd_logprobs) -> float:
    """Mean over the tokens of |log p under the FSD model - log p under the student|; 0.0 for an empty text.

    >>> round(mean_abs_shift(np.log([0.5, 0.9]), np.log([1.0, 0.45])), 6)  # up log 2 on one, down log 2 on the other
    0.693147
    """
    s = np.asarray(student_logprobs, dtype=np.float64)
    f = np.asarray(fsd_logprobs, dtype=np.float64)
    if s.size == 0:
        return 0.0
    return float(np.mean(np.abs(f - s)))


def tpd_gain(student_logprobs, fsd_logprobs, *, tau: float = 1.0, alpha: float = 0.6) -> float:
    """TPD under the student minus TPD under the FSD model on the same tokens (how much more certain tuning made it).

    >>> tpd_gain(np.log([0.5, 1.0]), np.log([1.0, 1.0]), alpha=1.0)  # TPD 0.5 -> 0
    0.5
    """
    s = np.asarray(student_logprobs, dtype=np.float64)
    f = np.asarray(fsd_logprobs, dtype=np.float64)
    n = max(int(s.size), 1)
    return tpd_deviation(s, tau=tau, alpha=alpha, max_tokens=n) - tpd_deviation(f, tau=tau, alpha=alpha, max_tokens=n)


def fsd(trace, *, max_tokens: int = 300) -> float:
    return mean_abs_shift(*output_pair(trace, "fsd_output_logprobs", "fsd", max_tokens))


def fsd_tpd(trace, *, tau: float = 1.0, alpha: float = 0.6, max_tokens: int = 300) -> float:
    from distill_detect.detectors.tpd import check_tpd_params

    check_tpd_params(tau=tau, alpha=alpha, max_tokens=max_tokens)
    return tpd_gain(*output_pair(trace, "fsd_output_logprobs", "fsd_tpd", max_tokens), tau=tau, alpha=alpha)
