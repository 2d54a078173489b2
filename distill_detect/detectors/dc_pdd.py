"""DC-PDD: token probabilities calibrated by corpus token frequencies.

Weichao Zhang, Ruqing Zhang, Jiafeng Guo, Maarten de Rijke, Yixing Fan, Xueqi Cheng,
"Pretraining Data Detection for Large Language Models: A Divergence-based Calibration
Method", EMNLP 2024, arXiv:2409.14781. Authors' code: github.com/zhang-wei-chao/DC-PDD.

    x_1..x_P = the question's tokens (Trace.prompt_ids), p_i = p(x_i | x_<i) (exp of prompt_logprobs)
    f(v)     = (count(v) + 1) / (N + |V|)   token frequency in a reference corpus, Laplace-smoothed
               (passes.build_token_freq_table; the per-token values arrive aligned with prompt_ids
               as Trace.extra["dcpdd_token_freq"], from passes.dcpdd_freq_pass)
    FOS      = positions i where x_i occurs for the first time in the question
    alpha_i  = min( -p_i * log f(x_i), a )          for i in FOS
    beta(q)  = mean_{i in FOS} alpha_i

a = 0.01 (the authors' default). A token the model finds likely although it is rare
in general text raises beta. Higher = more likely a member (higher_is_member=True); the
authors' code reports -beta under its own lower-is-member convention.

The frequency table is built offline from local text (by default the bundled question
sets, tokenised with the audited model's tokenizer) and is never downloaded.
"""

from __future__ import annotations

import numpy as np

from distill_detect.detectors.checks import need_array, same_length
from distill_detect.errors import ConfigError, DistillDetectError


def first_occurrences(ids) -> np.ndarray:
    """Indices where each token id appears for the first time, in order.

    >>> first_occurrences([5, 7, 5, 9, 7]).tolist()
    [0, 1, 3]
    """
    _, idx = np.unique(np.asarray(ids).reshape(-1), return_index=True)
    return np.sort(idx)


def dc_pdd_score(logprobs, ids, freqs, *, a: float = 0.01) -> float:
    """beta for one question from its token log-probs, token ids and corpus frequencies.

    >>> import numpy as np
    >>> # tokens 1, 2, 1: only the first two count; alpha = (min(0.5 * ln 10, 1), 0.1 * ln 100) = (1, 0.4605)
    >>> round(dc_pdd_score(np.log([0.5, 0.1, 0.9]), [1, 2, 1], [0.1, 0.01, 0.1], a=1.0), 6)
    0.730259
    """
    if isinstance(a, bool) or not (float(a) > 0.0 and np.isfinite(float(a))):
        raise ConfigError(f"dc_pdd a must be a positive number, got {a!r} (the paper uses 0.01)")
    lp = np.asarray(logprobs, dtype=np.float64)
    f = np.asarray(freqs, dtype=np.float64)
    keep = first_occurrences(ids)
    p, f = np.exp(lp[keep]), f[keep]
    if not (np.all(f > 0) and np.all(f <= 1)):
        raise DistillDetectError(
            "dc_pdd token frequencies must lie in (0, 1]; build the table with passes.build_token_freq_table "
            "(Laplace smoothing keeps every frequency above 0)"
        )
    alpha = np.minimum(-p * np.log(f), float(a))
    return float(np.mean(alpha))


def dc_pdd(trace, *, a: float = 0.01) -> float:
    lp = need_array(trace, "prompt_logprobs", "dc_pdd")
    if trace.prompt_ids is None:
        raise DistillDetectError(
            f"method 'dc_pdd' needs prompt_ids (the question's token ids), which trace {trace.id!r} lacks: they are "
            "recorded with the prompt log-probabilities (GenConfig.prompt_logprobs or Backend.score_prompts)"
        )
    freqs = need_array(trace, "extra:dcpdd_token_freq", "dc_pdd")
    ids = np.asarray(trace.prompt_ids)
    same_length(lp, ids, method="dc_pdd", names=("prompt_logprobs", "prompt_ids"), trace_id=trace.id)
    same_length(lp, freqs, method="dc_pdd", names=("prompt_logprobs", "dcpdd_token_freq entries"), trace_id=trace.id)
    return dc_pdd_score(lp, ids, freqs, a=a)
