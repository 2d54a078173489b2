"""What a detector may read from a trace, where each field comes from, and shared parameter checks.

A detector names what it reads in ``Detector.needs`` with the words below. When a trace
lacks one, the detector raises ``DistillDetectError`` with a message that names the
missing field and the step that produces it; it never returns NaN.

Need words:

* ``output_logprobs``: log p of each generated token (every backend's ``generate``).
* ``output_stats``: ``output_mean_logp`` and ``output_std_logp`` (full-vocabulary statistics per step).
* ``prompt_logprobs``: ``prompt_logprobs`` of the question tokens (teacher-forced).
* ``prompt_stats``: ``prompt_mean_logp`` and ``prompt_std_logp``.
* ``question``: the question text.
* ``output_text``: the greedy answer's text; ``output_samples``: answers sampled at a temperature
  (``Trace.samples``) and the greedy text; ``solution``: the benchmark's own solution or answer.
* ``extra:<key>``: an array that a later model pass puts in ``Trace.extra`` (``distill_detect.passes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distill_detect.errors import ConfigError, DistillDetectError

_API = "API backends (OpenAI-compatible chat endpoints) return at most the top-20 log-probabilities of generated tokens"


@dataclass(frozen=True)
class Need:
    """What one need word stands for: the trace fields, the backend capabilities, and where it comes from."""

    fields: tuple[str, ...]
    """``Trace`` attributes (empty for ``extra:<key>``: the key itself)."""
    capabilities: tuple[str, ...]
    """What the audited model's backend must provide (``backends.capabilities``)."""
    with_prompt_logprobs: bool
    """Recorded only when generating with prompt log-probabilities (refused with --no-prompt-logprobs)."""
    source: str
    """What produces it, in the user's terms (error messages)."""


_SOURCES = {
    "output_logprobs": "generated-token log-probabilities, recorded by every backend's generation ('distill-detect generate')",
    "output_stats": (
        "per-step mean and standard deviation of log p over the whole vocabulary, recorded during generation by "
        f"backends that see full logits (--backend hf or llamacpp); {_API} and cannot provide them"
    ),
    "prompt_logprobs": (
        "the question tokens' log-probabilities, recorded by 'distill-detect generate' unless --no-prompt-logprobs was given "
        "(run the same generate command without it to fill them in); --backend openai gives them only from a server that "
        f"echoes prompt log-probabilities; {_API}"
    ),
    "prompt_stats": (
        "per-position mean and standard deviation of log p over the vocabulary at the question tokens, recorded with the "
        "prompt log-probabilities by --backend hf or llamacpp (run 'generate' without --no-prompt-logprobs); "
        f"{_API} and cannot provide them"
    ),
    "question": "the question text, which the store keeps with every trace (add a 'question' field to a traces file)",
    "extra:lowercase_prompt_logprobs": (
        "log-probabilities of the lowercased question, from a second teacher-forced pass of the same model that "
        "'distill-detect run' or 'score --run RUN --methods lowercase' runs by itself (a traces file cannot get it)"
    ),
    "extra:reference_prompt_logprobs": (
        "the pre-distillation base model's log-probabilities of the question tokens: give --reference-model BASE to "
        "'distill-detect run' or 'score --run RUN' (the base must share the student's tokenizer)"
    ),
    "extra:reference_output_logprobs": (
        "the pre-distillation base model's log-probabilities of the student's generated tokens: give --reference-model "
        "BASE to 'distill-detect run' or 'score --run RUN' (the base must share the student's tokenizer)"
    ),
    "extra:fsd_output_logprobs": (
        "the FSD model's log-probabilities of the student's generated tokens (the student briefly fine-tuned on questions "
        "known to be unseen, built by distill_detect.fsd.build_fsd_model): give --fsd-model DIR to 'distill-detect run' or "
        "'score --run RUN' (the FSD model must share the student's tokenizer)"
    ),
    "extra:solution_logprobs": (
        "the log-probabilities of the question file's solution (a 'response' or 'answer' field) teacher-forced through "
        "the audited model, computed by 'distill-detect run' or 'score --run RUN --methods sol_loss' (no generation needed)"
    ),
    "extra:reference_solution_logprobs": (
        "the same solution's log-probabilities under the pre-distillation base model: give --reference-model BASE to "
        "'distill-detect run' or 'score --run RUN' (the base must share the student's tokenizer)"
    ),
    "extra:dcpdd_token_freq": (
        "corpus frequencies of the question tokens, looked up by 'distill-detect run' or 'score --run RUN --methods dc_pdd' "
        "from the question token ids (recorded unless --no-prompt-logprobs was given)"
    ),
    "output_text": (
        "the greedy answer's text, recorded by every backend's generation (with log-probabilities off too: "
        "--no-logprobs); a traces file gives it as 'output_text'"
    ),
    "output_samples": (
        "answers sampled at a temperature, generated with --samples N (e.g. --samples 8 --temperature 1.0) by "
        "'distill-detect generate', 'run' or 'audit' and stored in the run ('score --run RUN' reads them; a traces "
        "file cannot hold them)"
    ),
    "solution": (
        "the benchmark's own solution or final answer, read from the question file's 'response' field (a worked "
        "solution) or 'answer' field (e.g. bundled:gsm8k_test, bundled:math_test) when the questions are generated"
    ),
}

NEEDS: dict[str, Need] = {
    "output_logprobs": Need(("output_logprobs",), ("output_logprobs",), False, _SOURCES["output_logprobs"]),
    "output_stats": Need(("output_mean_logp", "output_std_logp"), ("output_stats",), False, _SOURCES["output_stats"]),
    "prompt_logprobs": Need(("prompt_logprobs",), ("prompt_logprobs",), True, _SOURCES["prompt_logprobs"]),
    "prompt_stats": Need(("prompt_mean_logp", "prompt_std_logp"), ("prompt_stats",), True, _SOURCES["prompt_stats"]),
    "question": Need(("question",), (), False, _SOURCES["question"]),
    "extra:lowercase_prompt_logprobs": Need((), ("prompt_logprobs",), False, _SOURCES["extra:lowercase_prompt_logprobs"]),
    "extra:reference_prompt_logprobs": Need((), (), False, _SOURCES["extra:reference_prompt_logprobs"]),
    "extra:reference_output_logprobs": Need((), ("output_ids",), False, _SOURCES["extra:reference_output_logprobs"]),
    "extra:fsd_output_logprobs": Need((), ("output_ids",), False, _SOURCES["extra:fsd_output_logprobs"]),
    "extra:solution_logprobs": Need((), ("score",), False, _SOURCES["extra:solution_logprobs"]),
    "extra:reference_solution_logprobs": Need((), (), False, _SOURCES["extra:reference_solution_logprobs"]),
    "extra:dcpdd_token_freq": Need((), ("prompt_logprobs",), True, _SOURCES["extra:dcpdd_token_freq"]),
    "output_text": Need(("output_text",), (), False, _SOURCES["output_text"]),
    "output_samples": Need(("samples", "output_text"), ("samples",), False, _SOURCES["output_samples"]),
    "solution": Need(("solution",), (), False, _SOURCES["solution"]),
}
"""Every need word a detector may name, declared once; the tables below and the backends' capability
check (``backends.capabilities.NEED_CAPABILITY``) derive from it."""

NEED_FIELDS: dict[str, tuple[str, ...]] = {k: n.fields for k, n in NEEDS.items() if n.fields}
"""Need word -> the ``Trace`` attributes it stands for."""

NEED_SOURCES: dict[str, str] = {k: n.source for k, n in NEEDS.items()}
"""Need word -> what produces it (used in error messages)."""


def source_of(need: str) -> str:
    if need in NEED_SOURCES:
        return NEED_SOURCES[need]
    if need.startswith("extra:"):
        return f"an array stored as Trace.extra[{need[6:]!r}] by an extra model pass that 'distill-detect run' or 'score --run RUN' runs"
    return f"the trace field {need!r}"


def missing_needs(needs, trace) -> list[str]:
    """The need words in ``needs`` that ``trace`` does not satisfy, sorted."""
    out = []
    for need in sorted(needs):
        if need.startswith("extra:"):
            extra = trace.extra or {}
            ok = extra.get(need[6:]) is not None
        else:
            try:
                attrs = NEED_FIELDS[need]
            except KeyError:
                raise ValueError(f"unknown need {need!r}; known: {', '.join(sorted(NEED_FIELDS))}, extra:<key>") from None
            ok = all(getattr(trace, a, None) is not None for a in attrs)
        if not ok:
            out.append(need)
    return out


def missing_message(method: str, need: str, trace_id) -> str:
    what = need[6:] if need.startswith("extra:") else "/".join(NEED_FIELDS.get(need, (need,)))
    where = f"Trace.extra[{what!r}]" if need.startswith("extra:") else what
    return f"method {method!r} needs {where}, which trace {trace_id!r} lacks: it is {source_of(need)}"


def need_array(trace, need: str, method: str, attr: str | None = None, *, allow_empty: bool = False) -> np.ndarray:
    """Return one array a detector reads, as float64, or raise a message naming it and its source.

    ``need`` is the need word; ``attr`` the attribute within it (default: the need's first field
    or, for ``extra:<key>``, that key). An empty array raises unless ``allow_empty``.
    """
    if need.startswith("extra:"):
        key = attr or need[6:]
        value = (trace.extra or {}).get(key)
        label = f"Trace.extra[{key!r}]"
    else:
        key = attr or NEED_FIELDS[need][0]
        value = getattr(trace, key, None)
        label = key
    if value is None:
        raise DistillDetectError(missing_message(method, need, trace.id))
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 0 and not allow_empty:
        hint = (
            "the chat template may have rewritten the question so its tokens could not be located"
            if "prompt" in key
            else "nothing was generated"
        )
        raise DistillDetectError(f"method {method!r}: {label} of trace {trace.id!r} is empty ({hint}); it has no score")
    return arr


def output_pair(trace, extra: str, method: str, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The student's log-probs of its first ``max_tokens`` generated tokens and a second model's of the same
    tokens (``Trace.extra[extra]``), checked to be aligned: what the base-calibrated and FSD detectors read."""
    m = check_max_tokens(max_tokens, method, 300)
    s = need_array(trace, "output_logprobs", method, allow_empty=True)
    other = need_array(trace, f"extra:{extra}", method, allow_empty=True)
    same_length(s, other, method=method, names=("output_logprobs", extra), trace_id=trace.id)
    return s[:m], other[:m]


def same_length(a: np.ndarray, b: np.ndarray, *, method: str, names: tuple[str, str], trace_id) -> None:
    """Raise when two arrays that must be aligned token by token have different lengths."""
    if a.shape != b.shape:
        raise DistillDetectError(
            f"method {method!r}: trace {trace_id!r} has {a.size} {names[0]} but {b.size} {names[1]}; they must be "
            "aligned token by token (was the extra pass run with a different tokenizer or on older traces?)"
        )


def check_k(k, method: str) -> float:
    """k is the fraction of tokens Min-K% keeps: a number in (0, 1]."""
    try:
        kf = float(k)
    except (TypeError, ValueError):
        raise ConfigError(f"{method} k must be a fraction in (0, 1], got {k!r} (the paper uses 0.2)") from None
    if not (0.0 < kf <= 1.0) or isinstance(k, bool):
        raise ConfigError(f"{method} k must be a fraction in (0, 1], got {k!r} (the paper uses 0.2)")
    return kf


def check_max_tokens(max_tokens, method: str, default: int) -> int:
    """The number of generated tokens read: an integer >= 1."""
    ok = not isinstance(max_tokens, bool)
    try:
        ok = ok and int(max_tokens) == max_tokens and int(max_tokens) >= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ConfigError(f"{method} max_tokens must be an integer >= 1, got {max_tokens!r} (default {default})")
    return int(max_tokens)


def lowest_k_mean(values: np.ndarray, k: float) -> float:
    """Mean of the ``max(1, floor(k * n))`` smallest of ``n`` values.

    Floor, as in the published code of Min-K% (Shi et al.) and Min-K%++ (Zhang et al.),
    which take ``int(n * k)``; with at least one token, so short sequences still score
    (their code gives NaN when ``k * n < 1``).

    >>> lowest_k_mean(np.array([-3.0, -1.0, -2.0, -0.5, -0.1]), 0.4)  # floor(2.0) = 2: mean(-3, -2)
    -2.5
    >>> lowest_k_mean(np.array([-3.0, -1.0]), 0.2)  # floor(0.4) = 0 -> at least 1 token
    -3.0
    """
    n = int(values.size)
    if n == 0:
        raise ValueError("lowest_k_mean of an empty array")
    m = max(1, math.floor(k * n + 1e-9))  # tolerance: 0.29 * 100 is 28.999999999999996 in binary
    return float(np.mean(np.partition(values, m - 1)[:m]))
