"""The records that flow through distill-detect.

``Question`` goes in, ``Trace`` comes out of a backend and into the store, and every
detector is a pure function of one ``Trace``. ``GenConfig`` holds the decoding
settings; with the model and prompt fingerprint it determines a trace exactly.

Array contract shared by all backends: ``output_logprobs[t]`` is the log-softmax of
the raw (untempered) logits at step t, evaluated at ``output_ids[t]``, in float32.
Under greedy decoding ``exp(output_logprobs[t])`` is the top-1 probability p_t that
TPD reads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, replace

import numpy as np

from distill_detect.errors import ConfigError


def text_id(text: str) -> str:
    """Stable id for a question without one: the first 16 hex digits of sha256(text)."""
    return "q-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Question:
    """One question to audit."""

    id: str
    """Unique within a run; from the input's ``id`` field, else ``text_id(text)``."""
    text: str
    """The question exactly as given to the model as the user turn."""
    label: int | None = None
    """1 = member (was in the distillation data), 0 = non-member, None = unknown."""
    response: str | None = None
    """A reference answer or teacher trace, when the input has one (used by ``finetune``)."""


@dataclass(frozen=True)
class GenConfig:
    """Decoding settings, read by every backend and by the run's fingerprint.

    Greedy only: TPD is defined on greedy decoding (PAPER.md). ``system_prompt`` and the
    decoding mode change what is generated and so enter the fingerprint; the cap is tracked
    per trace instead; ``batch_size`` changes speed only; ``prompt_logprobs`` adds arrays
    that can be filled in later without regenerating.
    """

    max_new_tokens: int = 1000
    """Cap on generated tokens per question (the paper's code uses 1000)."""
    batch_size: int = 8
    """Questions decoded together. Changes speed, not results (within 1e-4 in float32)."""
    system_prompt: str | None = None
    """System turn; None keeps the chat template's own default."""
    prompt_logprobs: bool = True
    """Also record log-probabilities of the prompt tokens (for the input-likelihood baselines)."""

    def __post_init__(self) -> None:
        for name, hint in (("max_new_tokens", "TPD reads the first 300 tokens by default, so 300 or more is typical"),
                           ("batch_size", "try 1 or 8")):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}; {hint}")

    def fingerprint(self) -> dict:
        """The settings that change what is generated (the cap is tracked per trace instead)."""
        return {"decoding": "greedy", "system_prompt": self.system_prompt}


@dataclass(frozen=True, eq=False)
class Trace:
    """What a model did with one question. Flat float32/int32 arrays, one entry per token."""

    id: str
    """The question's id."""
    output_logprobs: np.ndarray = field(metadata={"dtype": "float32", "aligned": "output"})
    """float32 [T]: log p(emitted token) at each generated step, in generation order (all <= 0)."""
    output_ids: np.ndarray | None = field(
        default=None, metadata={"dtype": "int32", "aligned": "output", "json": "output_token_ids"}
    )
    """int32 [T]: the emitted token ids (None when imported from logs without ids)."""
    output_text: str | None = None
    """The decoded generation (special tokens removed)."""
    question: str | None = None
    """The question text."""
    label: int | None = None
    """1 member, 0 non-member, None unknown."""
    finish_reason: str | None = None
    """'stop' (end-of-turn or EOS emitted, included as the last token) or 'length' (cap reached)."""
    max_new_tokens: int | None = None
    """The cap this trace was generated under; a trace that ended by 'length' is complete only up to it."""
    output_mean_logp: np.ndarray | None = field(default=None, metadata={"dtype": "float32", "aligned": "output"})
    """float32 [T]: E_{v~p_t}[log p_t(v)] over the vocabulary (= minus the entropy), for Min-K%++ and entropy."""
    output_std_logp: np.ndarray | None = field(default=None, metadata={"dtype": "float32", "aligned": "output"})
    """float32 [T]: standard deviation of log p_t(v) under p_t, for Min-K%++."""
    prompt_ids: np.ndarray | None = field(default=None, metadata={"dtype": "int32", "aligned": "prompt"})
    """int32 [P]: token ids of the question inside the prompt (the span the input-likelihood baselines score)."""
    prompt_logprobs: np.ndarray | None = field(default=None, metadata={"dtype": "float32", "aligned": "prompt"})
    """float32 [P]: log p of each question token given the prompt before it (teacher-forced)."""
    prompt_mean_logp: np.ndarray | None = field(default=None, metadata={"dtype": "float32", "aligned": "prompt"})
    """float32 [P]: E_{v~p}[log p(v)] at each question-token position."""
    prompt_std_logp: np.ndarray | None = field(default=None, metadata={"dtype": "float32", "aligned": "prompt"})
    """float32 [P]: std of log p(v) at each question-token position."""
    extra: dict = field(default_factory=dict)
    """Per-trace arrays computed later by other passes (e.g. ``reference_output_logprobs``)."""

    def __post_init__(self) -> None:
        for name, dtype in TRACE_ARRAYS.items():
            value = getattr(self, name)
            if value is not None or name == "output_logprobs":
                object.__setattr__(self, name, np.asarray(value, dtype=dtype).reshape(-1))
        if self.output_ids is not None and len(self.output_ids) != len(self.output_logprobs):
            raise ValueError(
                f"trace {self.id}: {len(self.output_ids)} output_ids but {len(self.output_logprobs)} output_logprobs"
            )

    @property
    def num_tokens(self) -> int:
        return int(len(self.output_logprobs))

    @property
    def output_probs(self) -> np.ndarray:
        """float32 [T]: p_t = exp(logprob), the quantity TPD thresholds."""
        return np.exp(self.output_logprobs)

    def at_budget(self, budget: int) -> Trace:
        """This trace as a decoding capped at ``budget`` tokens would have left it.

        Greedy decoding makes the shorter trace a prefix of the longer one, so cutting every
        array aligned with the generated tokens (and such arrays in ``extra``) gives exactly
        what a run at the lower cap stores. A trace no longer than ``budget`` is returned as is.
        ``output_text`` keeps the whole generation's text.
        """
        if self.num_tokens <= budget:
            return self
        cut = {k: getattr(self, k)[:budget] for k in OUTPUT_ARRAYS if getattr(self, k) is not None}
        extra = {k: (np.asarray(v)[:budget] if k in OUTPUT_EXTRAS else v) for k, v in self.extra.items()}
        return replace(self, **cut, extra=extra, finish_reason="length", max_new_tokens=int(budget))


TRACE_ARRAYS: dict[str, np.dtype] = {f.name: np.dtype(f.metadata["dtype"]) for f in fields(Trace) if "dtype" in f.metadata}
"""The per-token arrays of a trace and their dtypes: the one declaration of the trace schema
(the store's columns, the JSONL interchange and ``merge`` derive from it)."""

JSON_NAMES: dict[str, str] = {f.name: f.metadata.get("json", f.name) for f in fields(Trace) if "dtype" in f.metadata}
"""Trace array -> its key in the traces JSONL interchange format (``traceio``)."""

OUTPUT_ARRAYS: tuple[str, ...] = tuple(f.name for f in fields(Trace) if f.metadata.get("aligned") == "output")
"""Arrays with one entry per generated token."""

OUTPUT_EXTRAS: frozenset[str] = frozenset({"reference_output_logprobs"})
"""``Trace.extra`` keys with one entry per generated token (cut with the trace by ``at_budget``)."""
