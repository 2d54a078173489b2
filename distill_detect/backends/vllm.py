"""Greedy traces with vLLM's offline engine (``vllm.LLM``), on one or many GPUs.

The prompt is built here with the model's chat template (``prompts.build_prompt``, the
same ids as the HF backend) and handed to vLLM as token ids, so both backends decode
from identical inputs. One request per question:

* ``SamplingParams(temperature=0, max_tokens=N, logprobs=0, prompt_logprobs=0 | None,
  stop_token_ids=<EOS and end-of-turn ids>)``. With ``logprobs=0`` vLLM returns, at
  every step, only the log-prob of the token it sampled (its docs: the sampled token's
  log-prob is always included, so up to ``logprobs + 1`` entries come back), and with
  ``prompt_logprobs=0`` the log-prob of each prompt token given the ones before it (the
  first prompt position has none).
* vLLM's log-probs are taken from the raw logits before temperature or penalties
  (``logprobs_mode='raw_logprobs'``, its default, requested explicitly where the
  installed version knows the option), i.e. the contract in ``types.py``.

Output translation (``trace_from_output``) works on vLLM's ``RequestOutput``:
``outputs[0].token_ids`` (int [T]), ``outputs[0].logprobs`` (T positions, each a
``{token_id: Logprob(logprob, rank, decoded_token)}``; ``FlatLogprobs`` behaves the same),
``prompt_logprobs`` (P positions, the first None). The stop token is kept as the last
token, as in the HF backend. vLLM returns top-k log-probs only, so full-vocabulary
statistics (entropy, Min-K%++'s mean/std) are not available: ``output_stats`` and
``prompt_stats`` are not among this backend's capabilities.

``vllm`` is imported only when the backend is built (extra ``[vllm]``; Linux with a GPU).
The translation is tested without vLLM on objects shaped like its outputs
(tests/test_vllm_translation.py); ``benchmarks/gpu_check.py`` compares it with the HF
backend on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distill_detect.backends.base import Backend
from distill_detect.errors import ConfigError, DistillDetectError, InputError, require
from distill_detect.types import Question, Trace


def sampling_kwargs(max_new_tokens: int, *, prompt_logprobs: bool, stop_ids) -> dict:
    """Arguments of ``vllm.SamplingParams`` for one greedy trace.

    >>> sampling_kwargs(300, prompt_logprobs=False, stop_ids={2, 0})["stop_token_ids"]
    [0, 2]
    """
    return {
        "n": 1,
        "temperature": 0.0,
        "max_tokens": int(max_new_tokens),
        "logprobs": 0,
        "prompt_logprobs": 0 if prompt_logprobs else None,
        "stop_token_ids": sorted(int(i) for i in stop_ids),
        "skip_special_tokens": True,
        "detokenize": True,
    }


def _logprob_at(position, token_id: int, what: str) -> float:
    """log p of ``token_id`` at one position ({id: Logprob} or {id: float})."""
    if position is None:
        raise DistillDetectError(f"vLLM returned no log-probabilities for {what}")
    try:
        entry = position[int(token_id)]
    except KeyError:
        raise DistillDetectError(f"vLLM's log-probabilities for {what} do not include the token {int(token_id)}") from None
    return float(getattr(entry, "logprob", entry))


def prompt_fields_from(prompt, prompt_logprobs) -> dict:
    """Question-token fields from vLLM's ``prompt_logprobs`` (position j: log p(ids[j] | ids[:j]))."""
    s, e = prompt.question_span
    if e <= s:
        return {"prompt_ids": np.zeros(0, np.int32), "prompt_logprobs": np.zeros(0, np.float32)}
    if prompt_logprobs is None or len(prompt_logprobs) != len(prompt.ids):
        n = None if prompt_logprobs is None else len(prompt_logprobs)
        raise DistillDetectError(f"vLLM returned {n} prompt log-prob positions for a prompt of {len(prompt.ids)} tokens")
    lps = [_logprob_at(prompt_logprobs[j], prompt.ids[j], f"prompt token {j}") for j in range(s, e)]
    return {"prompt_ids": np.asarray(prompt.ids[s:e], np.int32), "prompt_logprobs": np.asarray(lps, np.float32)}


def trace_from_output(q: Question, prompt, out, *, max_new_tokens: int, stop_ids, want_prompt: bool) -> Trace:
    """One ``Trace`` from one vLLM ``RequestOutput`` (greedy, n=1)."""
    if not out.outputs:
        raise DistillDetectError(f"vLLM returned no completion for question {q.id!r}")
    comp = out.outputs[0]
    ids = [int(t) for t in comp.token_ids]
    if comp.logprobs is None or len(comp.logprobs) != len(ids):
        n = None if comp.logprobs is None else len(comp.logprobs)
        raise DistillDetectError(
            f"question {q.id!r}: vLLM returned {n} log-prob positions for {len(ids)} tokens (SamplingParams.logprobs unset?)"
        )
    lps = [_logprob_at(comp.logprobs[t], tok, f"generated token {t} of question {q.id!r}") for t, tok in enumerate(ids)]
    if ids and ids[-1] in stop_ids:
        finish = "stop"
    elif comp.finish_reason == "length":
        finish = "length"
    else:
        finish = comp.finish_reason or "length"
    extra = prompt_fields_from(prompt, out.prompt_logprobs) if want_prompt else {}
    return Trace(
        id=q.id,
        question=q.text,
        label=q.label,
        output_ids=np.asarray(ids, np.int32),
        output_logprobs=np.asarray(lps, np.float32),
        output_text=comp.text,
        finish_reason=finish,
        max_new_tokens=max_new_tokens,
        **extra,
    )


def continuation_logprobs(out, n_prompt: int, continuation) -> np.ndarray:
    """log p of each continuation token from a prompt_logprobs request over prompt + continuation."""
    cont = [int(t) for t in continuation]
    pl = out.prompt_logprobs
    if pl is None or len(pl) != n_prompt + len(cont):
        raise DistillDetectError(
            f"vLLM returned {None if pl is None else len(pl)} prompt positions for {n_prompt + len(cont)} tokens"
        )
    return np.asarray([_logprob_at(pl[n_prompt + t], tok, f"continuation token {t}") for t, tok in enumerate(cont)], np.float32)


class VLLMBackend(Backend):
    name = "vllm"
    capabilities = frozenset({"output_logprobs", "prompt_logprobs", "score"})

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        system_prompt: str | None = None,
        prompt_logprobs: bool = True,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        llm=None,
        sampling_params_cls=None,
        identity: dict | None = None,
    ):
        """``model``: 'default'/None, a local checkpoint directory or a hub id (as the HF backend).

        ``llm``/``sampling_params_cls``: objects standing in for ``vllm.LLM`` and
        ``vllm.SamplingParams`` (tests); normally built here from the other arguments.
        """
        if device not in ("auto", "cuda") and not str(device).startswith("cuda"):
            raise ConfigError(f"--device {device!r}: the vllm backend runs on GPUs; use the hf backend on CPU")
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be an integer >= 1, got {tensor_parallel_size!r}")
        if not 0.0 < float(gpu_memory_utilization) <= 1.0:
            raise ConfigError(
                f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization!r} (vLLM's default is 0.9)"
            )
        self.location = None
        if llm is None:
            vllm = require("vllm", "vllm", "The vllm backend")
            from distill_detect.models import resolve_model

            ref = resolve_model(model)
            kwargs = {
                "model": ref.location,
                "dtype": "auto" if dtype in (None, "auto") else dtype,
                "tensor_parallel_size": tensor_parallel_size,
                "gpu_memory_utilization": float(gpu_memory_utilization),
                "trust_remote_code": trust_remote_code,
                "seed": seed,
                "enforce_eager": enforce_eager,
            }
            if max_model_len:
                kwargs["max_model_len"] = int(max_model_len)
            if _engine_knows("logprobs_mode"):
                kwargs["logprobs_mode"] = "raw_logprobs"
            llm = vllm.LLM(**kwargs)
            sampling_params_cls = vllm.SamplingParams
            identity = ref.identity
            self.location = ref.location
            self._versions = {"vllm": vllm.__version__}
        else:
            self._versions = {"vllm": "injected"}
        self.llm = llm
        self._sp = sampling_params_cls
        self.identity = dict(identity or {"name": "injected"})
        self.tok = llm.get_tokenizer()
        self.system_prompt = system_prompt
        self.want_prompt_logprobs = prompt_logprobs
        self.tensor_parallel_size = tensor_parallel_size
        from distill_detect.backends.openai import _stop_ids
        from distill_detect.prompts import template_hash

        self.stop_ids = _stop_ids(self.tok)
        if not self.stop_ids:
            raise DistillDetectError("the tokenizer defines no EOS or end-of-turn token; cannot tell when a turn ends")
        self._template = template_hash(self.tok, system_prompt)
        self.dtype = _engine_dtype(llm, dtype)
        self.context = _engine_context(llm)

    def fingerprint(self) -> dict:
        return {
            "backend": self.name,
            "model": dict(self.identity),
            "dtype": self.dtype,
            "device": "cuda",
            "versions": dict(self._versions),
            "template": self._template,
            "system_prompt": self.system_prompt,
            "decoding": "greedy",
            "stop_ids": sorted(self.stop_ids),
        }

    def _prompts(self, questions: Sequence[Question]):
        from distill_detect.prompts import build_prompt

        prompts = [build_prompt(self.tok, q.text, self.system_prompt) for q in questions]
        for q, p in zip(questions, prompts):
            if self.context and len(p.ids) >= self.context:
                raise InputError(q.id, f"prompt is {len(p.ids)} tokens, the engine's context is {self.context}", field="question")
        return prompts

    def _run(self, token_lists: list[list[int]], params) -> list:
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in token_lists], params, use_tqdm=False)
        if len(outs) != len(token_lists):
            raise DistillDetectError(f"vLLM returned {len(outs)} outputs for {len(token_lists)} prompts")
        return outs

    def generate(self, questions: Sequence[Question], *, max_new_tokens: int) -> list[Trace]:
        prompts = self._prompts(questions)
        params = self._sp(**sampling_kwargs(max_new_tokens, prompt_logprobs=self.want_prompt_logprobs, stop_ids=self.stop_ids))
        outs = self._run([p.ids for p in prompts], params)
        return [
            trace_from_output(
                q, p, o, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids, want_prompt=self.want_prompt_logprobs
            )
            for q, p, o in zip(questions, prompts, outs)
        ]

    def score_prompts(self, questions: Sequence[Question]) -> list[dict]:
        prompts = self._prompts(questions)
        params = self._sp(**{**sampling_kwargs(1, prompt_logprobs=True, stop_ids=()), "logprobs": None})
        outs = self._run([p.ids for p in prompts], params)
        return [prompt_fields_from(p, o.prompt_logprobs) for p, o in zip(prompts, outs)]

    def score(self, questions: Sequence[Question], continuations: Sequence[np.ndarray]) -> list[np.ndarray]:
        prompts = self._prompts(questions)
        params = self._sp(**{**sampling_kwargs(1, prompt_logprobs=True, stop_ids=()), "logprobs": None})
        todo = [i for i, c in enumerate(continuations) if len(c)]
        outs = self._run([prompts[i].ids + [int(t) for t in continuations[i]] for i in todo], params) if todo else []
        res = [np.zeros(0, np.float32) for _ in continuations]
        for i, o in zip(todo, outs):
            res[i] = continuation_logprobs(o, len(prompts[i].ids), continuations[i])
        return res

    def close(self) -> None:
        self.llm = None


def _engine_knows(field: str) -> bool:
    try:
        import dataclasses

        from vllm.engine.arg_utils import EngineArgs

        return field in {f.name for f in dataclasses.fields(EngineArgs)}
    except Exception:  # pragma: no cover - depends on the vLLM version
        return False


def _engine_dtype(llm, requested: str) -> str:
    try:
        return str(llm.llm_engine.model_config.dtype).replace("torch.", "")
    except AttributeError:
        return requested


def _engine_context(llm) -> int | None:
    try:
        return int(llm.llm_engine.model_config.max_model_len)
    except (AttributeError, TypeError, ValueError):
        return None
