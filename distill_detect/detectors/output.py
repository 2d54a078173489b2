"""Baselines on the generated answer's tokens (output-side likelihood statistics).

The paper (Zhang, Choi, Li, Wei 2025, arXiv:2510.04850) compares TPD with perplexity
and Min-K% computed on the student's own greedy generation, over its first 1000
tokens; we add mean entropy and mean max-probability, two standard confidence scores
(see e.g. Fadeeva et al., "LM-Polygraph", EMNLP 2023 demo, arXiv:2311.07383).
Every method reads only the first ``max_tokens`` generated tokens (default 1000; pass
``max_tokens=300`` to compare with TPD at its own budget).

With l_t = log p_t(y_t), the log-probability of the t-th emitted token, T' = min(T, max_tokens):

    out_ppl(q)      = -(1/T') * sum_{t<T'} l_t                      (mean NLL = log-perplexity; lower = member)
    out_min_k(q)    = mean of the m smallest l_t, m = max(1, floor(k T'))   (Shi et al. 2024, arXiv:2310.16789;
                                                                     k = 0.2; higher = member)
    out_entropy(q)  = (1/T') * sum_{t<T'} H_t,  H_t = -E_{v~p_t}[log p_t(v)] = -output_mean_logp[t]
                                                                    (lower = member)
    out_max_prob(q) = (1/T') * sum_{t<T'} exp(l_t)                   (under greedy decoding the emitted token
                                                                     is the argmax, so exp(l_t) = max_v p_t(v);
                                                                     higher = member)

A distilled model answers a question it was trained on with confident, low-entropy
tokens; these scores read that confidence directly, where TPD reads it through its
thresholded deviation.
"""

from __future__ import annotations

import numpy as np

from distill_detect.detectors.checks import check_k, check_max_tokens, lowest_k_mean, need_array
from distill_detect.detectors.loss import mean_nll


def _first(trace, method: str, max_tokens, need: str = "output_logprobs", attr: str | None = None) -> np.ndarray:
    m = check_max_tokens(max_tokens, method, 1000)
    return need_array(trace, need, method, attr)[:m]


def out_ppl(trace, *, max_tokens: int = 1000) -> float:
    return mean_nll(_first(trace, "out_ppl", max_tokens))


def out_min_k(trace, *, k: float = 0.2, max_tokens: int = 1000) -> float:
    kf = check_k(k, "out_min_k")
    return lowest_k_mean(_first(trace, "out_min_k", max_tokens), kf)


def out_entropy(trace, *, max_tokens: int = 1000) -> float:
    return float(-np.mean(_first(trace, "out_entropy", max_tokens, "output_stats", "output_mean_logp")))


def out_max_prob(trace, *, max_tokens: int = 1000) -> float:
    return float(np.mean(np.exp(_first(trace, "out_max_prob", max_tokens))))
