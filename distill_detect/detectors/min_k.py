"""Min-K% Prob and Min-K%++ on the question tokens.

Min-K%: Shi, Ajith, Xia, Huang, Liu, Blevins, Chen, Zettlemoyer, "Detecting Pretraining
Data from Large Language Models", ICLR 2024, arXiv:2310.16789.

    s_i      = log p(x_i | x_<i)                         for the P question tokens
    MinK(q)  = mean of the m smallest s_i,  m = max(1, floor(k * P))

Min-K%++: Jingyang Zhang, Jingwei Sun, Eric Yeh, Yiran Chen, Hai Li, "Min-K%++: Improved Baseline
for Detecting Pre-Training Data from Large Language Models", ICLR 2025, arXiv:2404.02936.

    mu_i     = E_{z ~ p(.|x_<i)} [log p(z | x_<i)]       (Trace.prompt_mean_logp)
    sigma_i  = sqrt(Var_{z ~ p(.|x_<i)} [log p(z | x_<i)]) (Trace.prompt_std_logp)
    z_i      = (s_i - mu_i) / sigma_i
    MinK++(q)= mean of the m smallest z_i,  m = max(1, floor(k * P))

Both with k = 0.2 by default (the papers' choice for their main tables). floor(k * P)
follows both papers' code (``int(len * k)``); the "at least one token" floor is ours, so
that questions shorter than 1/k tokens get a score instead of NaN.

Where sigma_i < 1e-6 the next-token distribution is (numerically) a point mass or flat,
and z_i is set to 0: the token is neither more nor less likely than the model expects.
Higher = more likely a member for both (higher_is_member=True).
"""

from __future__ import annotations

import numpy as np

from distill_detect.detectors.checks import check_k, lowest_k_mean, need_array, same_length

SIGMA_FLOOR = 1e-6


def standardized_logprobs(logprobs, mean_logp, std_logp) -> np.ndarray:
    """z_i = (log p_i - mu_i) / sigma_i, with z_i = 0 where sigma_i < 1e-6.

    >>> standardized_logprobs([-1.0, -3.0, 0.0], [-2.0, -2.0, 0.0], [0.5, 2.0, 0.0]).tolist()
    [2.0, -0.5, 0.0]
    """
    s = np.asarray(logprobs, dtype=np.float64)
    mu = np.asarray(mean_logp, dtype=np.float64)
    sd = np.asarray(std_logp, dtype=np.float64)
    ok = sd >= SIGMA_FLOOR
    return np.where(ok, (s - mu) / np.where(ok, sd, 1.0), 0.0)


def min_k(trace, *, k: float = 0.2) -> float:
    kf = check_k(k, "min_k")
    return lowest_k_mean(need_array(trace, "prompt_logprobs", "min_k"), kf)


def min_k_pp(trace, *, k: float = 0.2) -> float:
    kf = check_k(k, "min_k_pp")
    s = need_array(trace, "prompt_logprobs", "min_k_pp")
    mu = need_array(trace, "prompt_stats", "min_k_pp", "prompt_mean_logp")
    sd = need_array(trace, "prompt_stats", "min_k_pp", "prompt_std_logp")
    same_length(s, mu, method="min_k_pp", names=("prompt_logprobs", "prompt_mean_logp"), trace_id=trace.id)
    same_length(s, sd, method="min_k_pp", names=("prompt_logprobs", "prompt_std_logp"), trace_id=trace.id)
    return lowest_k_mean(standardized_logprobs(s, mu, sd), kf)
