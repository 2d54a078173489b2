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
from dataclasses import dataclass, field

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
    """Decoding settings. Greedy only: TPD is defined on greedy decoding (PAPER.md)."""

    max_new_tokens: int = 1000
    """Cap on generated tokens per question (the paper's code uses 1000)."""
    batch_size: int = 8
    """Questions decoded together. Changes speed, not results (within 1e-4 in float32)."""
    system_prompt: str | None = None
    """System turn; None keeps the chat template's own default."""
    prompt_logprobs: bool = True
    """Also record log-probabilities of the prompt tokens (for the input-likelihood baselines)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}; "
                "TPD reads the first 300 tokens by default, so 300 or more is typical"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}; try 1 or 8")

    def fingerprint(self) -> dict:
        """The settings that change what is generated (the cap is tracked per trace instead)."""
        return {"decoding": "greedy", "system_prompt": self.system_prompt}


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).reshape(-1)


@dataclass(frozen=True, eq=False)
class Trace:
    """What a model did with one question. Flat float32/int32 arrays, one entry per token."""

    id: str
    """The question's id."""
    output_logprobs: np.ndarray
    """float32 [T]: log p(emitted token) at each generated step, in generation order (all <= 0)."""
    output_ids: np.ndarray | None = None
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
    output_mean_logp: np.ndarray | None = None
    """float32 [T]: E_{v~p_t}[log p_t(v)] over the vocabulary (= minus the entropy), for Min-K%++ and entropy."""
    output_std_logp: np.ndarray | None = None
    """float32 [T]: standard deviation of log p_t(v) under p_t, for Min-K%++."""
    prompt_ids: np.ndarray | None = None
    """int32 [P]: token ids of the question inside the prompt (the span the input-likelihood baselines score)."""
    prompt_logprobs: np.ndarray | None = None
    """float32 [P]: log p of each question token given the prompt before it (teacher-forced)."""
    prompt_mean_logp: np.ndarray | None = None
    """float32 [P]: E_{v~p}[log p(v)] at each question-token position."""
    prompt_std_logp: np.ndarray | None = None
    """float32 [P]: std of log p(v) at each question-token position."""
    extra: dict = field(default_factory=dict)
    """Per-trace arrays computed later by other passes (e.g. ``reference_output_logprobs``)."""

    def __post_init__(self) -> None:
        for name in (
            "output_logprobs",
            "output_mean_logp",
            "output_std_logp",
            "prompt_logprobs",
            "prompt_mean_logp",
            "prompt_std_logp",
        ):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _f32(value))
        if self.prompt_ids is not None:
            object.__setattr__(self, "prompt_ids", np.asarray(self.prompt_ids, dtype=np.int32).reshape(-1))
        if self.output_ids is not None:
            object.__setattr__(self, "output_ids", np.asarray(self.output_ids, dtype=np.int32).reshape(-1))
            if len(self.output_ids) != len(self.output_logprobs):
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
