"""Reference-model calibration of the question loss.

Carlini, Tramer, Wallace, Jagielski, Herbert-Voss, Lee, Roberts, Brown, Song, Erlingsson,
Oprea, Raffel, "Extracting Training Data from Large Language Models", USENIX Security
2021, arXiv:2012.07805 (membership metrics "Small"/"Medium": compare with another model).
Here the natural reference is the student's own base model before distillation.

    loss_S(q) = mean NLL of the question tokens under the student    (Trace.prompt_logprobs)
    loss_R(q) = the same under the reference model, same tokens      (Trace.extra["reference_prompt_logprobs"],
                                                                     from passes.reference_pass)
    score(q)  = loss_S(q) - loss_R(q)

Taking the difference (as MIMIR's reference attack does) rather than Carlini et al.'s
ratio of log-perplexities keeps the score defined when loss_R is near 0. Questions that
are easy for any model have low loss_S and low loss_R, and cancel out; fine-tuning on a
question lowers loss_S only. Lower = more likely a member (higher_is_member=False).
"""

from __future__ import annotations

from distill_detect.detectors.checks import need_array, same_length
from distill_detect.detectors.loss import mean_nll


def reference(trace) -> float:
    s = need_array(trace, "prompt_logprobs", "reference")
    r = need_array(trace, "extra:reference_prompt_logprobs", "reference")
    same_length(s, r, method="reference", names=("prompt_logprobs", "reference_prompt_logprobs"), trace_id=trace.id)
    return mean_nll(s) - mean_nll(r)
