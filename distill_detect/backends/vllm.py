"""Greedy traces with vLLM's offline engine (``vllm.LLM``, V1 engine, vLLM 0.10-0.11), on one or many GPUs.

The prompt is built here with the model's chat template (``prompts.build_prompt``, the
same ids as the HF backend) and handed to vLLM as token ids, so both backends decode
from identical inputs. One request per question:

* ``SamplingParams(temperature=0, max_tokens=N, logprobs=0, prompt_logprobs=0 | None,
  stop_token_ids=<EOS and end-of-turn ids>)``. With ``logprobs=0`` vLLM returns, at
  every step, only the log-prob of the token it sampled (its docs: the sampled token's
  log-prob is always included, so up to ``logprobs + 1`` entries come back), and with
  ``prompt_logprobs=0`` the log-prob of each prompt token given the ones before it (the
  first prompt position has none: None in a list, an empty position in ``FlatLogprobs``).
* vLLM's log-probs are taken from the raw logits before temperature or penalties
  (``logprobs_mode='raw_logprobs'``, its default, requested explicitly where the
  installed version knows the option), i.e. the contract in ``types.py``.

The engine is built so that a trace does not depend on what else ran (``engine_kwargs``):

* the precision is resolved here by the rule every backend shares (``base.resolve_dtype``)
  and passed explicitly: vLLM's own 'auto' would run a float32 checkpoint in float16 where
  the HF backend runs bfloat16;
* prefix caching is off (on by default in V1): with it a request reuses the keys and values
  another request computed in another batch, so log-probs could change with request order;
* with prompt log-probs, ``max_num_batched_tokens`` is capped: vLLM computes float32 logits
  and log-softmax over the whole vocabulary for every prompt token of a step, memory its
  profiling run does not count (~7.5 GiB at 8192 tokens with a 152k vocabulary), so the
  default budget (8192, or 16384 on 70+ GiB GPUs) can run out of memory mid-run.

Stops: vLLM stops at the tokenizer's EOS and at the generation config's ``eos_token_id``
besides the ``stop_token_ids`` it is given; ``stop_ids`` (and the fingerprint) are that
same set (``base.stop_token_ids``), as in the HF backend. The stop token is kept as the
last token id (vLLM keeps it in ``token_ids`` and leaves it out of the text).

Devices: vLLM uses the GPUs in ``CUDA_VISIBLE_DEVICES`` (the first ``tensor_parallel_size``
of them) and has no device index, so ``--device cuda:1`` is refused with the fix
(``CUDA_VISIBLE_DEVICES=1``) rather than silently run on GPU 0. ``close()`` shuts the engine
down (its core process, the distributed state, the CUDA cache), so another can start.

Output translation (``trace_from_output``) works on vLLM's ``RequestOutput``:
``outputs[0].token_ids`` (int [T]), ``outputs[0].logprobs`` (T positions, each a
``{token_id: Logprob(logprob, rank, decoded_token)}``; ``FlatLogprobs`` behaves the same),
``prompt_logprobs`` (P positions, the first empty). Full-vocabulary statistics (entropy,
Min-K%++'s mean/std) are not taken from vLLM: it can return every entry of the vocabulary
(``logprobs=-1``), but as one Python object per entry, [T, V] per request, which makes
per-position statistics impractical; ``output_stats`` and ``prompt_stats`` are not among
this backend's capabilities.

``vllm`` is imported only when the backend is built (extra ``[vllm]``; Linux with a GPU).
The translation and the engine arguments are tested without vLLM on objects shaped like its
own (tests/test_vllm_translation.py); ``benchmarks/gpu_check.py`` compares it with the HF
backend on a GPU, and docs/gpu.md says what has been checked on a real engine.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence

import numpy as np

from distill_detect.backends.base import Backend, Sampled, require_stop_ids, resolve_dtype, sample_seed, stop_token_ids
from distill_detect.errors import ConfigError, DistillDetectError, require
from distill_detect.types import Question, Trace

PROMPT_LOGITS_BUDGET = 2 << 30
"""Bytes allowed for the float32 prompt logits of one engine step (see ``prompt_logprob_token_cap``)."""
_BYTES_PER_PROMPT_LOGIT = 8  # float32 logits and their float32 log-softmax, per token and vocabulary entry


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


def sample_kwargs(max_new_tokens: int, *, temperature: float, top_p: float, seed: int, stop_ids) -> dict:
    """Arguments of ``vllm.SamplingParams`` for one sampled answer (its own seed: ``base.sample_seed``).

    >>> sample_kwargs(64, temperature=0.7, top_p=1.0, seed=5, stop_ids={2})["seed"]
    5
    """
    return {
        "n": 1,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": int(seed),
        "max_tokens": int(max_new_tokens),
        "stop_token_ids": sorted(int(i) for i in stop_ids),
        "skip_special_tokens": True,
        "detokenize": True,
    }


def sampled_from_output(out, stop_ids) -> Sampled:
    """One ``Sampled`` answer from one vLLM ``RequestOutput`` (n=1)."""
    if not out.outputs:
        raise DistillDetectError("vLLM returned no completion for a sampled answer")
    comp = out.outputs[0]
    ids = [int(t) for t in comp.token_ids]
    finish = "stop" if (ids and ids[-1] in stop_ids) or comp.finish_reason == "stop" else (comp.finish_reason or "length")
    return Sampled(comp.text or "", len(ids), finish)


def _logprob_at(position, token_id: int, what: str) -> float:
    """log p of ``token_id`` at one position ({id: Logprob} or {id: float}; None or empty: none)."""
    if position is None or len(position) == 0:
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


def prompt_logprob_token_cap(vocab_size: int, budget: int = PROMPT_LOGITS_BUDGET) -> int:
    """``max_num_batched_tokens`` that keeps one step's prompt logits within ``budget`` bytes.

    vLLM turns every prompt token of a step whose request wants prompt log-probs into float32
    logits and their log-softmax over the vocabulary ([tokens, V] each), outside the memory its
    profiling run measured. A multiple of 256, at least 512.

    >>> prompt_logprob_token_cap(152064), prompt_logprob_token_cap(32000)
    (1536, 8192)
    """
    cap = int(budget) // (int(vocab_size) * _BYTES_PER_PROMPT_LOGIT)
    return max(512, cap // 256 * 256)


def engine_kwargs(
    location: str,
    *,
    dtype: str,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    seed: int = 0,
    enforce_eager: bool = False,
    trust_remote_code: bool = False,
    prompt_logprobs: bool = True,
    vocab_size: int | None = None,
    knows=lambda field: False,
) -> dict:
    """Arguments of ``vllm.LLM`` (``dtype`` already resolved; ``knows(field)``: the installed
    ``EngineArgs`` has that field).

    >>> kw = engine_kwargs("m", dtype="bfloat16", prompt_logprobs=True, vocab_size=152064)
    >>> kw["enable_prefix_caching"], kw["max_num_batched_tokens"], kw["max_num_seqs"], kw["dtype"]
    (False, 1536, 256, 'bfloat16')
    """
    if dtype in (None, "auto"):
        raise ValueError("engine_kwargs needs a resolved dtype (base.resolve_dtype), not 'auto'")
    kwargs = {
        "model": location,
        "dtype": dtype,
        "tensor_parallel_size": int(tensor_parallel_size),
        "gpu_memory_utilization": float(gpu_memory_utilization),
        "trust_remote_code": bool(trust_remote_code),
        "seed": int(seed),
        "enforce_eager": bool(enforce_eager),
        # Reused keys/values from other requests (other batches) would make log-probs depend on request order.
        "enable_prefix_caching": False,
    }
    if max_model_len:
        kwargs["max_model_len"] = int(max_model_len)
    if prompt_logprobs:
        cap = prompt_logprob_token_cap(vocab_size or 262144)  # unknown vocabulary: assume a large one
        kwargs["max_num_batched_tokens"] = cap
        kwargs["max_num_seqs"] = min(256, cap)  # vLLM requires max_num_seqs <= max_num_batched_tokens
    if knows("logprobs_mode"):
        kwargs["logprobs_mode"] = "raw_logprobs"
    return kwargs


def check_vllm_device(device) -> None:
    """vLLM has no device index: it runs on the GPUs in CUDA_VISIBLE_DEVICES. Refuse what it would ignore."""
    d = str(device or "auto")
    if d in ("auto", "cuda", "cuda:0"):
        return
    if d.startswith("cuda:"):
        index = d.partition(":")[2]
        raise ConfigError(
            f"--device {d}: vLLM runs on the GPUs listed in CUDA_VISIBLE_DEVICES, not on a device index; "
            f"run with CUDA_VISIBLE_DEVICES={index} and --device cuda"
        )
    raise ConfigError(f"--device {d!r}: the vllm backend runs on GPUs; use the hf backend on CPU")


def shutdown_engine_core(llm) -> list[str]:
    """Stop the engine's core (its own process in V1) and its workers; returns the steps taken.

    Each step is skipped where this vLLM version lacks it, and a failing step does not stop the others.
    """
    done = []
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    target = core if callable(getattr(core, "shutdown", None)) else engine
    if callable(getattr(target, "shutdown", None)):
        try:
            target.shutdown()
            done.append("engine_core.shutdown" if target is core else "llm_engine.shutdown")
        except Exception:  # pragma: no cover - already down, or a version whose shutdown fails
            pass
    return done


def release_gpu_memory() -> list[str]:
    """After the last reference to an engine is gone: collect it, tear down vLLM's distributed state
    and hand the CUDA cache back, so another engine (or model) can start in this process."""
    done = []
    gc.collect()
    done.append("gc.collect")
    try:
        from vllm.distributed import parallel_state
    except Exception:  # no vLLM, or a version without it
        parallel_state = None
    for name in ("destroy_model_parallel", "destroy_distributed_environment"):
        fn = getattr(parallel_state, name, None)
        if callable(fn):
            try:
                fn()
                done.append(name)
            except Exception:  # pragma: no cover - nothing to destroy
                pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                done.append("torch.cuda.empty_cache")
        except Exception:  # pragma: no cover
            pass
    return done


class VLLMBackend(Backend):
    name = "vllm"
    capabilities = frozenset({"output_logprobs", "prompt_logprobs", "score", "samples"})
    cli_options = {
        "tensor_parallel_size": "tensor_parallel_size",
        "gpu_memory_utilization": "gpu_memory_utilization",
        "max_model_len": "max_model_len",
    }

    def __init__(
        self,
        model: str | None = None, *, dtype: str = "auto", device: str = "auto", system_prompt: str | None = None,
        prompt_logprobs: bool = True, trust_remote_code: bool = False,  # the options every backend takes (base.py)
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        llm=None,
        sampling_params_cls=None,
        identity: dict | None = None,
    ):  # fmt: skip
        """``model``: 'default'/None, a local checkpoint directory or a hub id (as the HF backend).

        ``llm``/``sampling_params_cls``: objects standing in for ``vllm.LLM`` and
        ``vllm.SamplingParams`` (tests); normally built here from the other arguments.
        """
        check_vllm_device(device)
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be an integer >= 1, got {tensor_parallel_size!r}")
        if not 0.0 < float(gpu_memory_utilization) <= 1.0:
            raise ConfigError(
                f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization!r} (vLLM's default is 0.9)"
            )
        location = None
        if llm is None:
            vllm = require("vllm", "vllm", "The vllm backend")
            from distill_detect.models import checkpoint_config, resolve_model

            ref = resolve_model(model)
            cfg = checkpoint_config(ref.location)
            cfg = {**(cfg.get("text_config") or {}), **cfg}
            dtype = resolve_dtype(dtype, "cuda", cfg.get("torch_dtype") or cfg.get("dtype"))
            self.engine_kwargs = engine_kwargs(
                ref.location, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
                enforce_eager=enforce_eager, trust_remote_code=trust_remote_code, prompt_logprobs=prompt_logprobs,
                vocab_size=cfg.get("vocab_size"), knows=_engine_knows,
            )  # fmt: skip
            llm = vllm.LLM(**self.engine_kwargs)
            sampling_params_cls = vllm.SamplingParams
            identity, location = ref.identity, ref.location
            self._versions = {"vllm": vllm.__version__}
        else:
            dtype = resolve_dtype(dtype, "cuda")
            self.engine_kwargs = None
            self._versions = {"vllm": "injected"}
        self.llm = llm
        self._sp = sampling_params_cls
        self.setup_common(
            identity=identity or {"name": "injected"},
            location=location,
            system_prompt=system_prompt,
            prompt_logprobs=prompt_logprobs,
        )
        self.tok = llm.get_tokenizer()
        self.tensor_parallel_size = tensor_parallel_size
        from distill_detect.prompts import template_hash

        self.stop_ids = require_stop_ids(stop_token_ids(self.tok, _generation_eos(llm)))
        self._template = template_hash(self.tok, system_prompt)
        self.dtype = _engine_dtype(llm, dtype)
        self.context = _engine_context(llm)

    def fingerprint(self) -> dict:
        return self.base_fingerprint(
            dtype=self.dtype, device="cuda", versions=self._versions, template=self._template, stop_ids=self.stop_ids
        )

    def _run(self, token_lists: list[list[int]], params) -> list:
        if self.llm is None:
            raise DistillDetectError("this vllm backend was closed; build a new one")
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in token_lists], params, use_tqdm=False)
        if len(outs) != len(token_lists):
            raise DistillDetectError(f"vLLM returned {len(outs)} outputs for {len(token_lists)} prompts")
        return outs

    def generate(self, questions: Sequence[Question], *, max_new_tokens: int) -> list[Trace]:
        prompts = self.build_prompts(questions)
        params = self._sp(**sampling_kwargs(max_new_tokens, prompt_logprobs=self.want_prompt_logprobs, stop_ids=self.stop_ids))
        outs = self._run([p.ids for p in prompts], params)
        return [
            trace_from_output(
                q, p, o, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids, want_prompt=self.want_prompt_logprobs
            )
            for q, p, o in zip(questions, prompts, outs)
        ]

    def sample(self, requests, *, temperature: float, top_p: float, seed: int, max_new_tokens: int) -> list[Sampled]:
        """One request per (question, k), each with its own seed (``base.sample_seed``): vLLM's per-request
        generator makes an answer independent of its batch."""
        prompts = self.build_prompts([q for q, _ in requests])
        params = [
            self._sp(
                **sample_kwargs(
                    max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=sample_seed(seed, q.id, k) % (2**31),
                    stop_ids=self.stop_ids,
                )
            )  # fmt: skip
            for q, k in requests
        ]
        outs = self._run([p.ids for p in prompts], params)
        return [sampled_from_output(o, self.stop_ids) for o in outs]

    def _teacher_force_params(self):
        return self._sp(**{**sampling_kwargs(1, prompt_logprobs=True, stop_ids=()), "logprobs": None})

    def score_prompts(self, questions: Sequence[Question]) -> list[dict]:
        prompts = self.build_prompts(questions)
        outs = self._run([p.ids for p in prompts], self._teacher_force_params())
        return [prompt_fields_from(p, o.prompt_logprobs) for p, o in zip(prompts, outs)]

    def score(self, questions: Sequence[Question], continuations: Sequence[np.ndarray]) -> list[np.ndarray]:
        # A prompt + continuation past the engine's length would fail the whole batch inside vLLM
        # without naming a question: refuse it here, by id.
        prompts = self.build_prompts(questions, [len(c) for c in continuations])
        todo = [i for i, c in enumerate(continuations) if len(c)]
        seqs = [prompts[i].ids + [int(t) for t in continuations[i]] for i in todo]
        outs = self._run(seqs, self._teacher_force_params()) if todo else []
        res = [np.zeros(0, np.float32) for _ in continuations]
        for i, o in zip(todo, outs):
            res[i] = continuation_logprobs(o, len(prompts[i].ids), continuations[i])
        return res

    def close(self) -> None:
        """Shut the engine down for real: its core and workers, then (with the last reference gone)
        vLLM's distributed state and the CUDA cache. Dropping the reference alone leaves the GPU
        memory taken until the process ends. Safe to call twice."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        shutdown_engine_core(llm)
        del llm
        release_gpu_memory()


def _engine_knows(field: str) -> bool:
    try:
        import dataclasses

        from vllm.engine.arg_utils import EngineArgs

        return field in {f.name for f in dataclasses.fields(EngineArgs)}
    except Exception:  # pragma: no cover - depends on the vLLM version
        return False


def _model_config(llm):
    return getattr(getattr(llm, "llm_engine", None), "model_config", None)


def _generation_eos(llm):
    """The generation config's ``eos_token_id`` as the engine loaded it (vLLM stops at it too), or None."""
    try:
        return (_model_config(llm).try_get_generation_config() or {}).get("eos_token_id")
    except Exception:  # a version or stand-in without it
        return None


def _engine_dtype(llm, requested: str) -> str:
    try:
        return str(_model_config(llm).dtype).replace("torch.", "")
    except AttributeError:
        return requested


def _engine_context(llm) -> int | None:
    try:
        return int(_model_config(llm).max_model_len)
    except (AttributeError, TypeError, ValueError):
        return None
