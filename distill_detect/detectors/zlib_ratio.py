"""Zlib ratio: question loss divided by the question's zlib-compressed length.

Carlini, Tramer, Wallace, Jagielski, Herbert-Voss, Lee, Roberts, Brown, Song, Erlingsson,
Oprea, Raffel, "Extracting Training Data from Large Language Models", USENIX Security
2021, arXiv:2012.07805 (membership metric "zlib").

    loss(q)  = mean NLL of the question tokens (see loss.py)
    zlib(q)  = len(zlib.compress(q.encode("utf-8")))       (bytes, default level)
    score(q) = loss(q) / zlib(q)

The compressed length stands in for how surprising the text is to a generic
compressor, so text that is merely repetitive or simple is not mistaken for memorised.
Lower = more likely a member (higher_is_member=False). (The file is not called zlib.py
so that it can never shadow the standard-library module.)
"""

from __future__ import annotations

import zlib

from distill_detect.detectors.checks import missing_message, need_array
from distill_detect.detectors.loss import mean_nll
from distill_detect.errors import DistillDetectError


def zlib_length(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (default compression level).

    >>> zlib_length("a" * 1000) < zlib_length("The quick brown fox jumps over the lazy dog.")
    True
    """
    return len(zlib.compress(text.encode("utf-8")))


def zlib_ratio(trace) -> float:
    lp = need_array(trace, "prompt_logprobs", "zlib")
    if trace.question is None:
        raise DistillDetectError(missing_message("zlib", "question", trace.id))
    return mean_nll(lp) / zlib_length(trace.question)
