"""Scores on the question's own solution, teacher-forced (beyond the paper; needs the solution text).

When the question file carries a solution (a ``response`` field: a teacher's answer, or the
benchmark's worked solution), the question can be scored without any generation: feed the solution
as the assistant turn, exactly as a distillation example is trained (``finetune.encode_example``),
and read the log-probability of each of its tokens. This is the classic membership signal on the
training text itself (Yeom et al. 2018, arXiv:1709.01604), calibrated by the base model as in the
reference attacks (Carlini et al. 2021, arXiv:2012.07805; Mireshghallah et al. 2022, arXiv:2203.03929).

    s_t = log p_student(a_t | q, a_<t),  b_t = log p_base(a_t | q, a_<t)   over the solution tokens a_1..a_S
    sol_loss(q)  = -(1/S) sum_t s_t              (lower = member)
    sol_ratio(q) =  (1/S) sum_t (s_t - b_t)      (higher = member: the student rose above its base on this text)

What it assumes, stated plainly: the signal is strongest when the solution is the very text the
student was distilled on (the teacher's answers that the distiller used). A teacher's answer sampled
again, or the benchmark's own solution when the distiller used a teacher's, shares less of the
wording, and the signal shrinks with the overlap. No generation is needed: a run with only these
methods decodes a single token per question.
"""

from __future__ import annotations

import numpy as np

from distill_detect.detectors.checks import need_array, same_length


def sol_loss(trace) -> float:
    s = need_array(trace, "extra:solution_logprobs", "sol_loss")
    return float(-np.mean(s))


def sol_ratio(trace) -> float:
    s = need_array(trace, "extra:solution_logprobs", "sol_ratio")
    b = need_array(trace, "extra:reference_solution_logprobs", "sol_ratio")
    same_length(s, b, method="sol_ratio", names=("solution_logprobs", "reference_solution_logprobs"), trace_id=trace.id)
    return float(np.mean(s - b))
