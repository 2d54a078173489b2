"""wbc and ref_imbalance against brute-force twins written token by token from their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_detect.detectors import get
from distill_detect.detectors.base_calibrated import imbalance, wbc_score, window_share
from distill_detect.errors import DistillDetectError
from distill_detect.types import Trace

logp = st.floats(min_value=-12.0, max_value=0.0, allow_nan=False)


def window_share_loop(s, b, w):
    n = len(s)
    if n == 0:
        return 0.0
    w = min(w, n)
    wins = [(sum(s[i : i + w]), sum(b[i : i + w])) for i in range(n - w + 1)]
    return sum(1 for ss, bb in wins if -bb > -ss) / len(wins)  # base loss > student loss


def imbalance_loop(s, b, tau, eps=1e-3):
    if not s:
        return 0.0
    zone = [i for i in range(len(s)) if math.exp(s[i]) < tau] or list(range(len(s)))
    up = sum(s[i] - b[i] for i in zone if s[i] - b[i] > 0)
    down = sum(b[i] - s[i] for i in zone if s[i] - b[i] < 0)
    return math.log((up + eps) / (down + eps))


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(logp, logp), max_size=40), w=st.integers(1, 25))
def test_window_share_equals_the_loop(pairs, w):
    s, b = [p[0] for p in pairs], [p[1] for p in pairs]
    assert window_share(s, b, w) == pytest.approx(window_share_loop(s, b, w), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(logp, logp), max_size=40), tau=st.floats(0.05, 1.0))
def test_imbalance_equals_the_loop(pairs, tau):
    s, b = [p[0] for p in pairs], [p[1] for p in pairs]
    assert imbalance(s, b, tau=tau) == pytest.approx(imbalance_loop(s, b, tau), rel=1e-9, abs=1e-9)


def test_a_student_scored_against_itself_is_neutral():
    s = np.log([0.3, 0.9, 0.5, 0.99, 0.2])
    assert wbc_score(s, s) == 0.0  # the base never loses more than an identical student
    assert imbalance(s, s) == 0.0  # no rise, no fall: log(eps / eps)


def test_detectors_read_the_first_m_tokens_and_name_what_is_missing():
    s = np.log([0.5, 0.6, 0.99, 0.4])
    b = np.log([0.1, 0.7, 0.99, 0.9])
    t = Trace(id="q", output_logprobs=s, extra={"reference_output_logprobs": b})
    assert get("wbc")(t, max_tokens=2) == pytest.approx(wbc_score(s[:2], b[:2]))
    assert get("ref_imbalance")(t, max_tokens=3) == pytest.approx(imbalance(s[:3], b[:3], tau=0.9))
    assert get("wbc").higher_is_member and get("ref_imbalance").higher_is_member
    with pytest.raises(DistillDetectError, match="--reference-model"):
        get("wbc")(Trace(id="q", output_logprobs=s))
