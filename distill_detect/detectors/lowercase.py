"""Lowercase ratio: loss on the lowercased question over loss on the question as written.

Carlini, Tramer, Wallace, Jagielski, Herbert-Voss, Lee, Roberts, Brown, Song, Erlingsson,
Oprea, Raffel, "Extracting Training Data from Large Language Models", USENIX Security
2021, arXiv:2012.07805 (membership metric "Lowercase").

    loss(q)       = mean NLL of the question tokens as written (Trace.prompt_logprobs)
    loss(lower q) = mean NLL of the tokens of q.lower() in the same chat prompt
                    (Trace.extra["lowercase_prompt_logprobs"], from passes.lowercase_pass)
    score(q)      = loss(lower q) / loss(q)

A memorised question has a low loss as written but not once its casing changes, so
the ratio is large. Higher = more likely a member (higher_is_member=True), the same
direction as the "ppl/lowercase_ppl" score of Shi et al.'s code after its sign flip.
The two token sequences differ in length; each loss is a mean over its own tokens.
A question whose loss is exactly 0 (every token certain) uses 1e-12 as denominator: a
huge, finite, member-like score rather than a division by zero.
"""

from __future__ import annotations

from distill_detect.detectors.checks import need_array
from distill_detect.detectors.loss import mean_nll


def lowercase_ratio(trace) -> float:
    orig = mean_nll(need_array(trace, "prompt_logprobs", "lowercase"))
    lower = mean_nll(need_array(trace, "extra:lowercase_prompt_logprobs", "lowercase"))
    return lower / max(orig, 1e-12)
