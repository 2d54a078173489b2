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
* ``sample(requests, temperature, top_p, seed, max_new_tokens)``: answers sampled at a
  temperature for the text-only methods, one per (question, k) request. Answer k of a
  question is a function of (seed, question id, k) alone (``sample_rng``), whatever the batch,
  so a run resumes and N = 4 is the first four of N = 16. Greedy ``generate`` is untouched.

``fingerprint()`` returns everything about the backend that changes its outputs; the
store refuses to mix traces from different fingerprints in one run.

``capabilities`` says which trace fields the backend can fill, so the CLI can refuse a
method with a reason before any model time is spent (an API without prompt log-probs
cannot run the input-likelihood baselines).

What the backends share lives here, once: the precision rule (``resolve_dtype``), the
device check (``resolve_device``), the tokens a turn stops at (``stop_token_ids``), CPU
threads (``cpu_threads``), prompt building with the length policy (``Backend.build_prompts``)
and the fingerprint's common fields (``Backend.base_fingerprint``). A backend's own CLI
options are declared next to its constructor (``Backend.cli_options``).
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from distill_detect.errors import ConfigError, DistillDetectError, InputError
from distill_detect.types import Question, Trace

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
"""End-of-turn tokens of common chat templates; decoding stops at any of them that the vocabulary has."""

DTYPES = ("float32", "bfloat16", "float16")
"""The precisions a backend can be asked for (``--dtype``), besides 'auto'."""


def resolve_dtype(requested: str | None, device_type: str, config_torch_dtype=None) -> str:
    """The one precision rule of every backend: what ``--dtype`` means on ``device_type``.

    An explicit float32/bfloat16/float16 is taken as given. 'auto' (or None) is float32 on
    the CPU; on a GPU it is the checkpoint's own half precision (``torch_dtype`` in its
    config.json) when that is bfloat16 or float16, else bfloat16 (a float32 or unknown
    checkpoint: vLLM's own 'auto' would pick float16 here, whose range overflows on some
    models). Backends pass the result explicitly (vLLM never sees 'auto') and record it in
    the fingerprint, so 'auto' cannot mean two precisions in two backends.

    >>> resolve_dtype("auto", "cpu", "bfloat16"), resolve_dtype("auto", "cuda", "float32")
    ('float32', 'bfloat16')
    >>> resolve_dtype(None, "cuda", "torch.float16"), resolve_dtype("float32", "cuda", "bfloat16")
    ('float16', 'float32')
    """
    if requested not in (None, "auto"):
        if requested not in DTYPES:
            raise ConfigError(f"--dtype {requested!r}: choose auto, {', '.join(DTYPES)}")
        return requested
    if device_type == "cpu":
        return "float32"
    own = str(config_torch_dtype or "").replace("torch.", "")
    return own if own in ("bfloat16", "float16") else "bfloat16"


def resolve_device(requested: str | None, torch=None) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; a CUDA device that cannot work is a ConfigError.

    ``torch`` is the imported module (None: import it). The message says what is missing and
    the fix, instead of torch's 'Torch not compiled with CUDA enabled' traceback.
    """
    if torch is None:
        import torch
    device = str(requested or "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return device
    if not torch.cuda.is_available():
        if getattr(torch.version, "cuda", None) is None:
            raise ConfigError(
                f"--device {device}: this torch build has no CUDA (torch {torch.__version__}); use --device cpu, "
                "or install a CUDA build of torch"
            )
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
        raise ConfigError(f"--device {device}: torch {torch.__version__} sees no GPU{where}; use --device cpu")
    index = device.partition(":")[2]
    if index:
        n = torch.cuda.device_count()
        if not index.isdigit() or int(index) >= n:
            raise ConfigError(f"--device {device}: torch sees {n} GPU(s) (cuda:0 .. cuda:{n - 1})")
    return device


def stop_token_ids(tok, generation_eos=None) -> set[int]:
    """Token ids a turn ends at: the tokenizer's EOS, the generation config's EOS ids, and the
    end-of-turn tokens of ``END_OF_TURN`` that the vocabulary has.

    The same set for every backend that has a transformers tokenizer; it is what vLLM itself
    stops at (the tokenizer's EOS and the generation config's ``eos_token_id``, besides the
    ``stop_token_ids`` it is given), so the fingerprint's ``stop_ids`` are the real ones.
    ``generation_eos``: an int, a list of ints or None (``generation_config.eos_token_id``).
    """
    ids: set[int] = set()
    for src in (getattr(tok, "eos_token_id", None), generation_eos):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids


def require_stop_ids(ids: set[int], what: str = "the tokenizer") -> set[int]:
    """``ids``, or the error saying that a turn's end cannot be recognised."""
    if not ids:
        raise DistillDetectError(f"{what} defines no EOS or end-of-turn token; cannot tell when a turn ends")
    return ids


def cpu_threads(n_threads: int | None) -> int:
    """CPU threads to use: ``n_threads``, else every core this process may run on."""
    if n_threads is not None:
        if int(n_threads) < 1:
            raise ConfigError(f"--threads {n_threads}: give a positive number of CPU threads")
        return int(n_threads)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class Sampled(NamedTuple):
    """One sampled answer: its text (special tokens removed), generated tokens, and why it ended."""

    text: str
    num_tokens: int
    finish_reason: str


def sample_seed(seed: int, qid: str, k: int) -> int:
    """A 63-bit seed for answer ``k`` of question ``qid`` under ``seed`` (stable across runs and machines).

    >>> sample_seed(0, "q1", 0) == sample_seed(0, "q1", 0) != sample_seed(0, "q1", 1)
    True
    """
    h = hashlib.sha256(f"{int(seed)}\x00{qid}\x00{int(k)}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def sample_rng(seed: int, qid: str, k: int) -> np.random.Generator:
    """The random stream of answer ``k`` of question ``qid``: one uniform number per generated token."""
    return np.random.default_rng(sample_seed(seed, qid, k))


def sample_from_logits(logits: np.ndarray, u: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Tokens drawn from rows of ``logits`` [n, V] by inverse CDF with uniforms ``u`` [n] (numpy).

    softmax(logits / temperature), cut to the smallest set of most likely tokens whose mass
    reaches ``top_p`` (ties broken by token id), renormalised; the token is the first whose
    cumulative mass exceeds u. ``hf`` does the same in torch (``HFBackend._sample_step``).
    """
    x = np.asarray(logits, np.float64) / float(temperature)
    x = x - x.max(axis=1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")
    ps = np.take_along_axis(p, order, axis=1)
    if top_p < 1.0:
        before = np.cumsum(ps, axis=1) - ps
        ps = np.where(before < top_p, ps, 0.0)
    cdf = np.cumsum(ps, axis=1)
    target = np.asarray(u, np.float64)[:, None] * cdf[:, -1:]
    idx = np.minimum((cdf <= target).sum(axis=1), ps.shape[1] - 1)
    return order[np.arange(len(idx)), idx]


class Backend(ABC):
    name: str = "base"
    capabilities: frozenset = frozenset()
    """Subset of {'output_logprobs', 'output_stats', 'prompt_logprobs', 'prompt_stats', 'score', 'samples'}."""
    cli_options: dict = {}
    """This backend's own CLI options: {argparse dest: constructor keyword} (the common ones,
    model/dtype/device/system prompt/prompt log-probs/remote code, are passed to every backend)."""

    system_prompt: str | None = None
    want_prompt_logprobs: bool = False
    tok = None

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

    def sample(self, requests: Sequence[tuple[Question, int]], *, temperature: float, top_p: float, seed: int,
               max_new_tokens: int) -> list[Sampled]:  # fmt: skip
        """One answer sampled at ``temperature``/``top_p`` per (question, k) request, in order.

        Answer k of a question depends on (seed, question id, k) only, not on the batch it is in.
        """
        raise NotImplementedError(f"the {self.name} backend cannot sample answers")

    context: int | None = None
    """The model's context length in tokens, when known (prompts that fill it are refused)."""

    def setup_common(self, *, identity: dict, location: str | None, system_prompt: str | None, prompt_logprobs: bool) -> None:
        """The attributes every backend sets from the common constructor arguments."""
        self.identity = dict(identity)
        self.location = location
        self.system_prompt = system_prompt
        self.want_prompt_logprobs = bool(prompt_logprobs)

    def base_fingerprint(self, *, dtype: str, device: str, versions: dict, template, stop_ids) -> dict:
        """The fields every local backend's fingerprint has, in one place."""
        return {
            "backend": self.name,
            "model": dict(self.identity),
            "dtype": dtype,
            "device": device,
            "versions": dict(versions),
            "template": template,
            "system_prompt": self.system_prompt,
            "decoding": "greedy",
            "stop_ids": sorted(int(i) for i in stop_ids),
        }

    def build_prompts(self, questions: Sequence[Question], extra: Sequence[int] | None = None) -> list:
        """``prompts.build_prompt`` for each question with this backend's tokenizer and system turn,
        refusing (``_check_length``) a prompt, plus ``extra[i]`` tokens to be scored after it, that
        does not fit the context."""
        from distill_detect.prompts import build_prompt

        prompts = [build_prompt(self.tok, q.text, self.system_prompt) for q in questions]
        for i, (q, p) in enumerate(zip(questions, prompts)):
            more = int(extra[i]) if extra is not None else 0
            self._check_length(q, len(p.ids) + more, what="prompt and continuation" if more else "prompt")
        return prompts

    def _check_length(self, q: Question, n: int, what: str = "prompt") -> None:
        """Policy for over-long questions: refuse with the question's id rather than truncate silently
        (or, in a batched engine, fail the whole batch with an error that names no question)."""
        if self.context and n >= self.context:
            raise InputError(
                q.id,
                f"{what} is {n} tokens, the model's context is {self.context}; shorten or drop this question",
                field="question",
            )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release model memory (optional)."""
