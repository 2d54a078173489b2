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
    answer: str | None = None
    """The benchmark's reference final answer (the input's ``answer`` field), when it has one; the
    text-only methods compare with it (``response``, a worked solution, is preferred when both exist)."""

    @property
    def solution(self) -> str | None:
        """The benchmark's own solution or final answer for the text-only methods: ``response``, else ``answer``."""
        return self.response if self.response and self.response.strip() else (self.answer or None)


@dataclass(frozen=True)
class GenConfig:
    """Decoding settings, read by every backend and by the run's fingerprint.

    Greedy decoding makes the traces every log-probability method reads (TPD is defined on
    greedy decoding, PAPER.md). ``system_prompt`` and the decoding mode change what is
    generated and so enter the fingerprint; the cap is tracked per trace instead;
    ``batch_size`` changes speed only; ``prompt_logprobs`` adds arrays that can be filled in
    later without regenerating.

    ``samples`` > 0 adds N answers per question sampled at ``temperature``/``top_p`` with
    ``seed``, for the text-only methods (docs/black-box.md). They are stored beside the greedy
    traces, keyed by ``sampling()``, so they never change a greedy trace and another setting is
    stored separately. ``logprobs=False`` records only the text (servers that return no
    log-probabilities); then only the text-only methods can run.
    """

    max_new_tokens: int = 1000
    """Cap on generated tokens per question (the paper's code uses 1000); sampled answers use the same cap."""
    batch_size: int = 8
    """Questions decoded together (sampled answers: rows decoded together). Changes speed, not results (within 1e-4 in float32)."""
    system_prompt: str | None = None
    """System turn; None keeps the chat template's own default."""
    prompt_logprobs: bool = True
    """Also record log-probabilities of the prompt tokens (for the input-likelihood baselines)."""
    samples: int = 0
    """Answers sampled per question besides the greedy one (0: greedy only). The text-only methods read them."""
    temperature: float = 1.0
    """Sampling temperature of those answers (> 0; the greedy answer is unaffected)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p (1.0: all)."""
    seed: int = 0
    """Seed of the sampled answers: answer k of a question is a function of (seed, question id, k)."""
    logprobs: bool = True
    """Record the generated tokens' log-probabilities (False: text only, --backend openai; only text-only methods)."""

    def __post_init__(self) -> None:
        for name, hint in (("max_new_tokens", "TPD reads the first 300 tokens by default, so 300 or more is typical"),
                           ("batch_size", "try 1 or 8")):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}; {hint}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise ConfigError(f"--samples must be an integer >= 0, got {self.samples!r}; e.g. --samples 8 (0: greedy only)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--sample-seed must be an integer >= 0, got {self.seed!r}")
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < float(t) <= 10):
            raise ConfigError(f"--temperature must be in (0, 10], got {t!r}; e.g. --temperature 1.0 (greedy needs no flag)")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < float(p) <= 1):
            raise ConfigError(f"--top-p must be in (0, 1], got {p!r}; e.g. --top-p 0.95 (1.0: no cut)")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))

    def fingerprint(self) -> dict:
        """The settings that change the greedy traces (the cap is tracked per trace instead; sampling is keyed apart)."""
        return {"decoding": "greedy", "system_prompt": self.system_prompt}

    def sampling(self) -> dict | None:
        """What identifies the sampled answers (beside the run's fingerprint): None when none are asked for.

        N is not part of it: answer k is the same whatever N, so N = 4 reads the first 4 of N = 16.
        """
        if not self.samples:
            return None
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True)
class Samples:
    """The answers sampled for one question, with the settings that made them (``GenConfig.sampling``)."""

    texts: tuple[str, ...]
    """Answer k at index k (special tokens removed)."""
    temperature: float
    top_p: float
    seed: int
    max_new_tokens: int
    num_tokens: tuple[int, ...] = ()
    """Generated tokens of each answer (what sampling cost)."""

    @property
    def n(self) -> int:
        return len(self.texts)

    def first(self, n: int) -> Samples:
        """The first ``n`` answers (answer k does not depend on how many were drawn)."""
        return replace(self, texts=self.texts[:n], num_tokens=self.num_tokens[:n])

    def settings(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True, eq=False)
class Trace:
    """What a model did with one question. Flat float32/int32 arrays, one entry per token."""

    id: str
    """The question's id."""
    output_logprobs: np.ndarray | None = field(metadata={"dtype": "float32", "aligned": "output"})
    """float32 [T]: log p(emitted token) at each generated step, in generation order (all <= 0).
    None only for a text-only trace (``GenConfig.logprobs=False``: a server that returns none)."""
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
    samples: Samples | None = None
    """Answers sampled at a temperature for the text-only methods (None: none were drawn). A field of
    its own, not ``extra``: ``extra`` holds number arrays aligned with tokens, cut by ``at_budget``."""
    solution: str | None = None
    """The benchmark's own solution or final answer for this question (from the question file)."""
    text_tokens: int | None = None
    """A text-only trace's generated-token count as the server reported it (no ids or log-probs to count)."""

    def __post_init__(self) -> None:
        for name, dtype in TRACE_ARRAYS.items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value, dtype=dtype).reshape(-1))
        if self.output_logprobs is None and self.output_text is None:
            raise ValueError(f"trace {self.id}: output_logprobs is None and there is no output_text (a text-only trace has text)")
        if self.output_ids is not None and self.output_logprobs is not None and len(self.output_ids) != len(self.output_logprobs):
            raise ValueError(
                f"trace {self.id}: {len(self.output_ids)} output_ids but {len(self.output_logprobs)} output_logprobs"
            )

    @property
    def num_tokens(self) -> int:
        """Generated tokens with log-probabilities (a text-only trace: its token ids if known, else the
        server's count ``text_tokens``, else 0)."""
        if self.output_logprobs is not None:
            return int(len(self.output_logprobs))
        if self.output_ids is not None:
            return int(len(self.output_ids))
        return int(self.text_tokens or 0)

    @property
    def has_logprobs(self) -> bool:
        return self.output_logprobs is not None

    @property
    def output_probs(self) -> np.ndarray:
        """float32 [T]: p_t = exp(logprob), the quantity TPD thresholds."""
        if self.output_logprobs is None:
            raise ValueError(f"trace {self.id} is text only (generated without log-probabilities)")
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
