"""TPD calibrated by the pre-distillation model (ours; beyond the paper).

TPD (Zhang, Choi, Li, Wei 2025, arXiv:2510.04850; see tpd.py) reads how certain the
student is of its own greedy tokens. Part of that certainty has nothing to do with
distillation: some questions are easy, and the base model the student was fine-tuned
from already answers them with near-certain tokens. TPD then flags them as "seen". We
subtract the base model's deviation on the very same tokens, in the spirit of the
reference-model calibration of Carlini et al. 2021 (arXiv:2012.07805):

    y_1..y_T  = the student's greedy tokens;  p_t = student's p(y_t | q, y_<t)  (Trace.output_logprobs)
    r_t       = reference model's p(y_t | q, y_<t), teacher-forced on the same tokens
                (Trace.extra["reference_output_logprobs"], from passes.reference_pass)
    D(x)      = mean_{t < M, x_t < tau} (tau - x_t) ** alpha   (0 when no token is kept)  -- TPD's formula
    TPD_ref(q)= D(p) - D(r)

Hyperparameters are TPD's, fixed before any evaluation: tau = 1.0, alpha = 0.6, M = 300.
Distillation makes the student more certain than its base on the member's answer, so
D(p) drops below D(r): lower = more likely a member (higher_is_member=False), as TPD.
An easy question has both D(p) and D(r) small and lands near 0 instead of looking like
a member. A student scored against itself gives exactly 0.
"""

from __future__ import annotations

from distill_detect.detectors.checks import need_array, same_length
from distill_detect.detectors.tpd import tpd_deviation


def tpd_ref(trace, *, tau: float = 1.0, alpha: float = 0.6, max_tokens: int = 300) -> float:
    p = need_array(trace, "output_logprobs", "tpd_ref", allow_empty=True)
    r = need_array(trace, "extra:reference_output_logprobs", "tpd_ref", allow_empty=True)
    same_length(p, r, method="tpd_ref", names=("output_logprobs", "reference_output_logprobs"), trace_id=trace.id)
    params = {"tau": tau, "alpha": alpha, "max_tokens": max_tokens}
    return tpd_deviation(p, **params) - tpd_deviation(r, **params)
