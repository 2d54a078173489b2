"""The backend interface: the one place where a model is run.

A backend does two things, both greedy and deterministic:

* ``generate(questions, max_new_tokens)``: decode each question's prompt greedily and
  return one ``Trace`` per question, with ``output_logprobs[t]`` = float32 log-softmax
  of the raw logits at step t evaluated at ``output_ids[t]``. Decoding stops after an
  end-of-turn/EOS token (kept as the last token, finish_reason 'stop') or after
  ``max_new_tokens`` tokens (finish_reason 'length').
* ``score(questions, continuations)``: teacher-force given token ids after each prompt
  and return their log-probabilities (same contract), e.g. to score a student's
  generation under the pre-distillation model.

``fingerprint()`` returns everything about the backend that changes its outputs; the
store refuses to mix traces from different fingerprints in one run.

``capabilities`` says which trace fields the backend can fill, so the CLI can refuse a
method with a reason before any model time is spent (an API without prompt log-probs
cannot run the input-likelihood baselines).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from distill_detect.errors import InputError
from distill_detect.types import Question, Trace

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
"""End-of-turn tokens of common chat templates; decoding stops at any of them that the vocabulary has."""


class Backend(ABC):
    name: str = "base"
    capabilities: frozenset = frozenset()
    """Subset of {'output_logprobs', 'output_stats', 'prompt_logprobs', 'prompt_stats', 'score'}."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """Model identity, dtype, backend name and library versions, template hash, decoding settings."""

    @abstractmethod
    def generate(self, questions: Sequence[Question], *, max_new_tokens: int) -> list[Trace]:
        """Greedy traces for one batch of questions, in the same order."""

    def score_prompts(self, questions: Sequence[Question]) -> list[dict]:
        """Teacher-forced fields of each question's own tokens inside its prompt:
        ``prompt_ids`` (int32 [P]), ``prompt_logprobs``, ``prompt_mean_logp``, ``prompt_std_logp`` (float32 [P])."""
        raise NotImplementedError(f"the {self.name} backend cannot score prompt tokens")

    def score(self, questions: Sequence[Question], continuations: Sequence[np.ndarray]) -> list[np.ndarray]:
        """float32 log p(continuation[t] | prompt, continuation[:t]) for each question."""
        raise NotImplementedError(f"the {self.name} backend cannot teacher-force a continuation")

    context: int | None = None
    """The model's context length in tokens, when known (prompts that fill it are refused)."""

    def _check_length(self, q: Question, n: int) -> None:
        """Policy for over-long questions: refuse with the question's id rather than truncate silently."""
        if self.context and n >= self.context:
            raise InputError(
                q.id,
                f"prompt is {n} tokens, the model's context is {self.context}; shorten or drop this question",
                field="question",
            )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release model memory (optional)."""
