"""Loss (perplexity) of the question tokens.

Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine Learning: Analyzing the
Connection to Overfitting", CSF 2018, arXiv:1709.01604 (the loss attack); applied to
language models as perplexity by Carlini et al. 2021 (arXiv:2012.07805).

    x_1..x_P = the question's tokens inside the chat prompt (Trace.prompt_ids)
    loss(q)  = -(1/P) * sum_i log p(x_i | prompt before x_i)        (mean NLL, nats)

Perplexity is exp(loss), a monotone transform, so both rank questions identically.
Lower loss = more likely a member (higher_is_member=False).
"""

from __future__ import annotations

import numpy as np

from distill_detect.detectors.checks import need_array


def mean_nll(logprobs) -> float:
    """Mean negative log-likelihood of a sequence from its token log-probabilities.

    >>> mean_nll([-1.0, -2.0, -3.0])
    2.0
    """
    return float(-np.mean(np.asarray(logprobs, dtype=np.float64)))


def loss(trace) -> float:
    return mean_nll(need_array(trace, "prompt_logprobs", "loss"))
