"""Detector registry: name -> Detector. Every detector is a pure function of a Trace.

Raw scores keep their natural sign; ``Detector.higher_is_member`` says which way they
point and ``distill_detect.metrics.membership_score`` applies it. Methods by family:

* TPD and ours: ``tpd`` (paper), ``tpd_ref`` (TPD minus the base model's deviation on the same tokens),
  ``wbc`` and ``ref_imbalance`` (the student against its base on its own tokens; ``base_calibrated.py``),
  ``fsd`` and ``fsd_tpd`` (how much the student's tokens gain under the student briefly tuned on unseen questions; ``fsd.py``).
* Question-only input likelihood: ``loss``, ``zlib``, ``lowercase``, ``min_k``, ``min_k_pp``, ``dc_pdd``, ``reference``.
* Generated-token statistics: ``out_ppl``, ``out_min_k``, ``out_entropy``, ``out_max_prob``
  (first 1000 tokens by default; ``max_tokens`` is their ``budget_param``, as TPD's).

``check_needs`` tells, before any scoring, which traces lack what a method reads and
what would produce it.
"""

from __future__ import annotations

import difflib

from distill_detect.detectors.base import Detector, add_unique
from distill_detect.detectors.base_calibrated import ref_imbalance, wbc
from distill_detect.detectors.checks import missing_message, missing_needs
from distill_detect.detectors.dc_pdd import dc_pdd
from distill_detect.detectors.fsd import fsd, fsd_tpd
from distill_detect.detectors.loss import loss
from distill_detect.detectors.lowercase import lowercase_ratio
from distill_detect.detectors.min_k import min_k, min_k_pp
from distill_detect.detectors.output import out_entropy, out_max_prob, out_min_k, out_ppl
from distill_detect.detectors.reference import reference
from distill_detect.detectors.solution import sol_loss, sol_ratio
from distill_detect.detectors.tpd import tpd
from distill_detect.detectors.tpd_ref import tpd_ref
from distill_detect.detectors.zlib_ratio import zlib_ratio
from distill_detect.errors import ConfigError, DistillDetectError
from distill_detect.types import Trace

REGISTRY: dict[str, Detector] = {}


def register(det: Detector) -> Detector:
    return add_unique(REGISTRY, det, "detector")


register(
    Detector(
        name="tpd",
        fn=tpd,
        higher_is_member=False,
        needs=frozenset({"output_logprobs"}),
        defaults={"tau": 1.0, "alpha": 0.6, "max_tokens": 300},
        summary="Token Probability Deviation on the first M greedy tokens (Zhang et al. 2025); lower = member",
        budget_param="max_tokens",
    )
)

_TPD = {"tau": 1.0, "alpha": 0.6, "max_tokens": 300}
_PROMPT = frozenset({"prompt_logprobs"})
_OUT = frozenset({"output_logprobs"})

for _det in (
    Detector(
        name="tpd_ref",
        fn=tpd_ref,
        higher_is_member=False,
        needs=_OUT | {"extra:reference_output_logprobs"},
        defaults=dict(_TPD),
        summary="TPD minus the pre-distillation model's deviation on the same tokens (ours); lower = member",
        budget_param="max_tokens",
    ),
    Detector(
        name="wbc",
        fn=wbc,
        higher_is_member=True,
        needs=_OUT | {"extra:reference_output_logprobs"},
        defaults={"max_tokens": 300},
        summary="share of token windows where the base's loss exceeds the student's (Window-Based Comparison); higher = member",
        budget_param="max_tokens",
    ),
    Detector(
        name="ref_imbalance",
        fn=ref_imbalance,
        higher_is_member=True,
        needs=_OUT | {"extra:reference_output_logprobs"},
        defaults={"tau": 0.9, "max_tokens": 300},
        summary="log ratio of the student's rises to falls against its base on its uncertain tokens (after EZ-MIA); higher = member",
        budget_param="max_tokens",
    ),
    Detector(
        name="fsd",
        fn=fsd,
        higher_is_member=False,
        needs=_OUT | {"extra:fsd_output_logprobs"},
        defaults={"max_tokens": 300},
        summary="mean absolute log-prob change of the student's tokens after tuning the student on unseen questions (FSD, Zhang et al. 2025); lower = member",
        budget_param="max_tokens",
    ),
    Detector(
        name="fsd_tpd",
        fn=fsd_tpd,
        higher_is_member=False,
        needs=_OUT | {"extra:fsd_output_logprobs"},
        defaults=dict(_TPD),
        summary="TPD drop of the student's tokens after tuning the student on unseen questions (FSD read through TPD); lower = member",
        budget_param="max_tokens",
    ),
    Detector(
        name="sol_loss",
        fn=sol_loss,
        higher_is_member=False,
        needs=frozenset({"extra:solution_logprobs"}),
        summary="mean NLL of the question file's solution, teacher-forced as the assistant turn (needs a response field); lower = member",
    ),
    Detector(
        name="sol_ratio",
        fn=sol_ratio,
        higher_is_member=True,
        needs=frozenset({"extra:solution_logprobs", "extra:reference_solution_logprobs"}),
        summary="mean log-prob gain over the base model on the question file's solution (needs a response field); higher = member",
    ),
    Detector(
        name="loss",
        fn=loss,
        higher_is_member=False,
        needs=_PROMPT,
        summary="Mean NLL of the question tokens (Yeom et al. 2018; perplexity); lower = member",
    ),
    Detector(
        name="zlib",
        fn=zlib_ratio,
        higher_is_member=False,
        needs=_PROMPT | {"question"},
        summary="Question loss / zlib-compressed length of the question (Carlini et al. 2021); lower = member",
    ),
    Detector(
        name="lowercase",
        fn=lowercase_ratio,
        higher_is_member=True,
        needs=_PROMPT | {"extra:lowercase_prompt_logprobs"},
        summary="Loss of the lowercased question / loss of the question (Carlini et al. 2021); higher = member",
    ),
    Detector(
        name="min_k",
        fn=min_k,
        higher_is_member=True,
        needs=_PROMPT,
        defaults={"k": 0.2},
        summary="Min-K% Prob: mean of the lowest k of question-token log-probs (Shi et al. 2024); higher = member",
    ),
    Detector(
        name="min_k_pp",
        fn=min_k_pp,
        higher_is_member=True,
        needs=_PROMPT | {"prompt_stats"},
        defaults={"k": 0.2},
        summary="Min-K%++: lowest k of standardised question-token log-probs (Zhang et al. 2024); higher = member",
    ),
    Detector(
        name="dc_pdd",
        fn=dc_pdd,
        higher_is_member=True,
        needs=_PROMPT | {"extra:dcpdd_token_freq"},
        defaults={"a": 0.01},
        summary="DC-PDD: question-token probs calibrated by corpus token frequency (Zhang et al. 2024); higher = member",
    ),
    Detector(
        name="reference",
        fn=reference,
        higher_is_member=False,
        needs=_PROMPT | {"extra:reference_prompt_logprobs"},
        summary="Question loss minus the pre-distillation model's loss (Carlini et al. 2021); lower = member",
    ),
    Detector(
        name="out_ppl",
        fn=out_ppl,
        higher_is_member=False,
        needs=_OUT,
        defaults={"max_tokens": 1000},
        summary="Mean NLL (log-perplexity) of the first max_tokens generated tokens; lower = member",
        budget_param="max_tokens",
    ),
    Detector(
        name="out_min_k",
        fn=out_min_k,
        higher_is_member=True,
        needs=_OUT,
        defaults={"k": 0.2, "max_tokens": 1000},
        summary="Min-K% on the first max_tokens generated tokens (Shi et al. 2024); higher = member",
        budget_param="max_tokens",
    ),
    Detector(
        name="out_entropy",
        fn=out_entropy,
        higher_is_member=False,
        needs=frozenset({"output_stats"}),
        defaults={"max_tokens": 1000},
        summary="Mean next-token entropy over the first max_tokens generated tokens; lower = member",
        budget_param="max_tokens",
    ),
    Detector(
        name="out_max_prob",
        fn=out_max_prob,
        higher_is_member=True,
        needs=_OUT,
        defaults={"max_tokens": 1000},
        summary="Mean top-1 probability of the first max_tokens greedy tokens; higher = member",
        budget_param="max_tokens",
    ),
):
    register(_det)
del _det


def without_samples(names=None) -> list[str]:
    """The detectors (of ``names``, default all) that a greedy run can score: no sampled answers, and no FSD
    model (a second fine-tune the user builds from a reference set, ``distill_detect.fsd``)."""
    return [m for m in (names or REGISTRY) if not REGISTRY[m].needs & {"output_samples", "extra:fsd_output_logprobs"}]


def get(name: str) -> Detector:
    """Look a detector up by name; an unknown name gets a did-you-mean error."""
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(REGISTRY))}") from None


def parse_methods(spec: str | list[str]) -> list[str]:
    """'tpd,loss' or ['tpd', 'loss'] -> validated list of names, order kept, no duplicates."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for n in (x.strip() for x in names):
        if n and n not in out:
            get(n)
            out.append(n)
    if not out:
        raise ConfigError("no method given; use e.g. --methods tpd")
    return out


def check_needs(detector: Detector | str, traces) -> None:
    """Raise ``DistillDetectError`` if any trace lacks something ``detector`` reads.

    ``traces`` is one ``Trace`` or an iterable of them. The message names the method,
    the missing field, what produces it, and how many traces lack it (first id shown),
    so a run can stop before scoring instead of failing half-way.
    """
    det = get(detector) if isinstance(detector, str) else detector
    seq = [traces] if isinstance(traces, Trace) else list(traces)
    first: dict[str, str] = {}
    count: dict[str, int] = {}
    for t in seq:
        for need in missing_needs(det.needs, t):
            first.setdefault(need, t.id)
            count[need] = count.get(need, 0) + 1
    if first:
        parts = []
        for need, tid in first.items():
            msg = missing_message(det.name, need, tid)
            if count[need] > 1:
                msg += f" ({count[need]} of {len(seq)} traces lack it)"
            parts.append(msg)
        raise DistillDetectError("; ".join(parts))


# -- text only: for models that return no log-probabilities (detectors/text_only.py, docs/black-box.md) -----
from distill_detect.detectors.text_only import answer_agree, answer_correct, cdd, sol_edit, sol_ngram  # noqa: E402

_TEXT = frozenset({"output_text"})
_SAMPLED = frozenset({"output_samples", "output_text"})
TEXT_ONLY: tuple[str, ...] = ("cdd", "answer_agree", "answer_correct", "sol_ngram", "sol_edit")
"""The methods that read no log-probabilities (what a server with them off can still run)."""

for _det in (
    Detector(
        name="cdd",
        fn=cdd,
        higher_is_member=True,
        needs=_SAMPLED,
        defaults={"alpha": 0.05},
        summary="CDD peakedness: share of sampled answers within alpha*length word edits of the greedy one (Dong et al. 2024); higher = member",
    ),
    Detector(
        name="answer_agree",
        fn=answer_agree,
        higher_is_member=True,
        needs=_SAMPLED,
        summary="share of sampled answers reaching the greedy answer's final answer; higher = member",
    ),
    Detector(
        name="answer_correct",
        fn=answer_correct,
        higher_is_member=True,
        needs=_TEXT | {"solution"},
        summary="1 when the greedy final answer equals the benchmark's answer, else 0; higher = member",
    ),
    Detector(
        name="sol_ngram",
        fn=sol_ngram,
        higher_is_member=True,
        needs=_TEXT | {"solution"},
        defaults={"n": 3},
        summary="share of the benchmark solution's word n-grams repeated by the greedy answer (ROUGE-N recall); higher = member",
    ),
    Detector(
        name="sol_edit",
        fn=sol_edit,
        higher_is_member=True,
        needs=_TEXT | {"solution"},
        summary="normalised character edit similarity of the greedy answer and the benchmark solution; higher = member",
    ),
):
    register(_det)
del _det
