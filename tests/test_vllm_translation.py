"""vLLM request/response translation, without vLLM.

The stand-ins below mirror the fields of vLLM's own classes (vllm/outputs.py:
``RequestOutput(request_id, prompt, prompt_token_ids, prompt_logprobs, outputs,
finished)``, ``CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs,
finish_reason, stop_reason)``; vllm/logprobs.py: ``Logprob(logprob, rank,
decoded_token)``, positions as ``{token_id: Logprob}``, the first prompt position None,
and ``FlatLogprobs`` that indexes like a list of such dicts).

``TorchLLM`` plays ``vllm.LLM`` with the tiny HF model: greedy decoding by full
recomputation (no KV cache, an independent path), answering in vLLM's shapes. The
VLLMBackend on it must agree with the HF backend token for token. It also does what real
vLLM (V1, 0.10-0.11) does that a naive stand-in would not, so the translation is tested
against it:

* it stops at the generation config's ``eos_token_id`` even when they are not among the
  ``stop_token_ids`` it is given (``SamplingParams.update_from_generation_config``);
* the stop token stays in ``token_ids`` but is left out of ``text`` (the detokenizer skips
  it unless ``include_stop_str_in_output``), special or not;
* with ``flat=True`` log-probs come in ``FlatLogprobs``, whose first prompt position is an
  empty position (``append(None)``), not None;
* ``llm_engine.model_config`` (dtype, max_model_len, ``try_get_generation_config``) and
  ``llm_engine.engine_core.shutdown()`` exist, as the backend reads and calls them.

``fake_vllm`` puts a module named ``vllm`` in ``sys.modules`` whose ``LLM`` records the
engine arguments, so the backend's real construction path runs without vLLM.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import weakref
from dataclasses import dataclass, field

import numpy as np
import pytest

from distill_detect.backends.vllm import (
    VLLMBackend,
    continuation_logprobs,
    prompt_fields_from,
    prompt_logprob_token_cap,
    sampling_kwargs,
    trace_from_output,
)
from distill_detect.errors import ConfigError, DistillDetectError, InputError
from distill_detect.prompts import Prompt
from distill_detect.types import Question


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list | None
    prompt_logprobs: list | None
    outputs: list
    finished: bool = True


@dataclass
class FlatLogprobs:
    """Same indexing as vLLM's FlatLogprobs: position i -> {token_id: Logprob}."""

    start_indices: list = field(default_factory=list)
    end_indices: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)

    def append(self, pos):
        self.start_indices.append(len(self.logprobs))
        for t, lp in (pos or {}).items():
            self.token_ids.append(t)
            self.logprobs.append(lp.logprob)
        self.end_indices.append(len(self.logprobs))

    def __len__(self):
        return len(self.start_indices)

    def __getitem__(self, i):
        return {self.token_ids[k]: Logprob(self.logprobs[k]) for k in range(self.start_indices[i], self.end_indices[i])}


@dataclass
class SamplingParams:
    """Records what the backend asks for (field names as in vllm.SamplingParams)."""

    n: int = 1
    temperature: float = 1.0
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_token_ids: list | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True


# -- recorded outputs ----------------------------------------------------------------------------


def _prompt():
    # ids 10..15; the question covers tokens 2..4
    return Prompt(text="<s>user: hi there</s>", ids=[10, 11, 12, 13, 14, 15], question_span=(2, 5))


def _recorded(flat=False):
    lp = [{7: Logprob(-0.25, 1, "A")}, {8: Logprob(-1.5, 1, "B")}, {2: Logprob(-0.01, 1, "</s>")}]
    pl = [None] + [{i: Logprob(-0.1 * i, 3, "x"), 99: Logprob(-0.01, 1, "y")} for i in (11, 12, 13, 14, 15)]
    if flat:
        f = FlatLogprobs()
        for pos in lp:
            f.append(pos)
        lp = f
    comp = CompletionOutput(0, "AB", [7, 8, 2], -1.76, lp, finish_reason="stop", stop_reason=None)
    return RequestOutput("0", None, [10, 11, 12, 13, 14, 15], pl, [comp])


@pytest.mark.parametrize("flat", [False, True])
def test_trace_from_recorded_output(flat):
    q = Question(id="q", text="hi there", label=1)
    t = trace_from_output(q, _prompt(), _recorded(flat), max_new_tokens=10, stop_ids={2}, want_prompt=True)
    assert t.output_ids.tolist() == [7, 8, 2] and t.finish_reason == "stop" and t.output_text == "AB" and t.label == 1
    np.testing.assert_allclose(t.output_logprobs, [-0.25, -1.5, -0.01], atol=1e-7)
    # prompt position j is log p(ids[j] | ids[:j]); the question span 2..4 = ids 12, 13, 14 (the prompt token's entry, not the top-1)
    assert t.prompt_ids.tolist() == [12, 13, 14]
    np.testing.assert_allclose(t.prompt_logprobs, [-1.2, -1.3, -1.4], atol=1e-6)
    assert t.output_mean_logp is None and t.prompt_mean_logp is None  # vLLM gives top-k only


def test_length_finish_and_sampling_kwargs():
    out = _recorded()
    out.outputs[0].token_ids, out.outputs[0].finish_reason = [7, 8], "length"
    out.outputs[0].logprobs = out.outputs[0].logprobs[:2]
    t = trace_from_output(Question(id="q", text="x"), _prompt(), out, max_new_tokens=2, stop_ids={2}, want_prompt=False)
    assert t.finish_reason == "length" and t.prompt_logprobs is None
    kw = sampling_kwargs(300, prompt_logprobs=True, stop_ids={2, 5})
    assert kw == {
        "n": 1, "temperature": 0.0, "max_tokens": 300, "logprobs": 0, "prompt_logprobs": 0,
        "stop_token_ids": [2, 5], "skip_special_tokens": True, "detokenize": True,
    }  # fmt: skip
    SamplingParams(**kw)  # every name is a SamplingParams field


def test_missing_logprobs_are_errors():
    out = _recorded()
    out.outputs[0].logprobs = None
    with pytest.raises(DistillDetectError, match="SamplingParams.logprobs"):
        trace_from_output(Question(id="q", text="x"), _prompt(), out, max_new_tokens=5, stop_ids={2}, want_prompt=False)
    out = _recorded()
    out.outputs[0].logprobs[1] = {9: Logprob(-3.0)}  # the emitted token 8 is not in the entry
    with pytest.raises(DistillDetectError, match="do not include the token 8"):
        trace_from_output(Question(id="q", text="x"), _prompt(), out, max_new_tokens=5, stop_ids={2}, want_prompt=False)
    with pytest.raises(DistillDetectError, match="prompt log-prob positions"):
        prompt_fields_from(_prompt(), _recorded().prompt_logprobs[:3])


def test_continuation_positions():
    pl = [None, {5: Logprob(-1.0)}, {6: Logprob(-2.0)}, {7: Logprob(-3.0)}]
    out = RequestOutput("0", None, [4, 5, 6, 7], pl, [])
    np.testing.assert_allclose(continuation_logprobs(out, 2, [6, 7]), [-2.0, -3.0])


# -- the backend on a torch stand-in for vllm.LLM ------------------------------------------------


class EngineCore:
    """Records ``shutdown()`` as vLLM V1's engine-core client has it."""

    def __init__(self, log):
        self.log = log

    def shutdown(self):
        self.log.append("engine_core.shutdown")


class TorchLLM:
    """``vllm.LLM.generate`` semantics on a transformers model, by full recomputation (no cache).

    ``generation_eos``: the generation config's ``eos_token_id`` (default: the model's own),
    where this engine stops whatever ``stop_token_ids`` says. ``flat``: FlatLogprobs containers.
    """

    def __init__(self, model, tok, *, generation_eos="model", flat=False, max_model_len=1024, dtype="float32"):
        self.model, self.tok, self.calls, self.log, self.flat = model, tok, [], [], flat
        if generation_eos == "model":
            generation_eos = model.generation_config.eos_token_id
        self.generation_config = {} if generation_eos is None else {"eos_token_id": generation_eos}
        self.llm_engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(
                dtype=f"torch.{dtype}",
                max_model_len=max_model_len,
                try_get_generation_config=lambda: dict(self.generation_config),
            ),
            engine_core=EngineCore(self.log),
        )

    def get_tokenizer(self):
        return self.tok

    def _logp(self, ids):
        import torch

        with torch.inference_mode():
            return torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)

    def _stops(self, params) -> set:
        """What vLLM stops at: the tokenizer's EOS, the generation config's EOS ids, and stop_token_ids."""
        eos = self.generation_config.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return {self.tok.eos_token_id, *eos, *(params.stop_token_ids or [])}

    def _container(self):
        return FlatLogprobs() if self.flat else []

    def generate(self, prompts, params, use_tqdm=True):
        assert params.temperature == 0.0 and params.n == 1
        self.calls.append(params)
        stops = self._stops(params)
        outs = []
        for k, p in enumerate(prompts):
            ids = list(p["prompt_token_ids"])
            assert len(ids) <= self.llm_engine.model_config.max_model_len, "vLLM would fail the whole batch here"
            logp = self._logp(ids)
            pl = None
            if params.prompt_logprobs is not None:
                pl = self._container()
                pl.append(None)  # the first prompt position has no log-prob (an empty position when flat)
                for j in range(1, len(ids)):
                    pl.append({ids[j]: Logprob(float(logp[j - 1, ids[j]]), None, None)})
            toks, lps, finish = [], self._container(), "length"
            while len(toks) < params.max_tokens:
                row = logp[-1]
                nxt = int(row.argmax())
                toks.append(nxt)
                lps.append({nxt: Logprob(float(row[nxt]), 1, self.tok.decode([nxt]))})
                if nxt in stops:
                    finish = "stop"
                    break
                logp = self._logp(ids + toks)
            shown = toks[:-1] if finish == "stop" else toks  # the stop token is not detokenized
            text = self.tok.decode(shown, skip_special_tokens=params.skip_special_tokens)
            comp = CompletionOutput(0, text, toks, None, lps if params.logprobs is not None else None, finish)
            outs.append(RequestOutput(str(k), None, ids, pl, [comp]))
        return outs


@pytest.fixture(scope="module", params=[False, True], ids=["lists", "flat"])
def pair(tiny_backend, request):
    vb = VLLMBackend(llm=TorchLLM(tiny_backend.model, tiny_backend.tok, flat=request.param), sampling_params_cls=SamplingParams)
    return vb, tiny_backend


QS = [Question(id=f"v{i}", text=t) for i, t in enumerate(["What is 2+3?", "Name a planet.", "Say hello to the reader."])]


def test_vllm_backend_matches_hf(pair):
    vb, hf = pair
    assert vb.stop_ids == hf.stop_ids and vb.fingerprint()["stop_ids"] == hf.fingerprint()["stop_ids"]
    a = vb.generate(QS, max_new_tokens=8)
    b = hf.generate(QS, max_new_tokens=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.output_ids, y.output_ids)
        np.testing.assert_allclose(x.output_logprobs, y.output_logprobs, atol=1e-4)
        assert x.finish_reason == y.finish_reason and x.output_text == y.output_text
        np.testing.assert_array_equal(x.prompt_ids, y.prompt_ids)
        np.testing.assert_allclose(x.prompt_logprobs, y.prompt_logprobs, atol=1e-4)
    sent = vb.llm.calls[-1]
    assert sent.logprobs == 0 and sent.prompt_logprobs == 0 and sent.max_tokens == 8
    assert set(sent.stop_token_ids) == hf.stop_ids


def test_vllm_score_matches_hf(pair):
    vb, hf = pair
    conts = [np.array([5, 6, 7]), np.array([], dtype=np.int64), np.array([100])]
    for x, y in zip(vb.score(QS, conts), hf.score(QS, conts)):
        np.testing.assert_allclose(x, y, atol=1e-4)
    for x, y in zip(vb.score_prompts(QS), hf.score_prompts(QS)):
        np.testing.assert_allclose(x["prompt_logprobs"], y["prompt_logprobs"], atol=1e-4)


def test_fingerprint_and_options(pair):
    vb, _ = pair
    fp = vb.fingerprint()
    assert fp["backend"] == "vllm" and fp["decoding"] == "greedy" and fp["stop_ids"]
    with pytest.raises(ConfigError, match="GPUs"):
        VLLMBackend(device="cpu")
    with pytest.raises(ConfigError, match="tensor-parallel-size"):
        VLLMBackend(tensor_parallel_size=0)


def test_without_vllm_the_error_names_the_extra():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from distill_detect.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"distill-detect\[vllm\]"):
        VLLMBackend("default")


# -- what real vLLM does that a naive stand-in would not ---------------------------------------------


def _first_tokens(tiny_backend, n=6):
    return tiny_backend.generate(QS[:1], max_new_tokens=n)[0].output_ids.tolist()


def test_generation_config_eos_is_a_stop_id_and_leaves_the_text(tiny_backend):
    """vLLM also stops at the generation config's EOS ids: stop_ids (and the fingerprint) must say so,
    and the stop token is kept in the ids but not in the text."""
    first = _first_tokens(tiny_backend)
    target = first[2]
    assert target not in first[:2]
    eos = tiny_backend.tok.eos_token_id
    llm = TorchLLM(tiny_backend.model, tiny_backend.tok, generation_eos=[eos, target])
    vb = VLLMBackend(llm=llm, sampling_params_cls=SamplingParams)
    assert target in vb.stop_ids and target in vb.fingerprint()["stop_ids"]
    [t] = vb.generate(QS[:1], max_new_tokens=6)
    assert t.output_ids.tolist() == first[:3] and t.finish_reason == "stop"
    assert t.output_text == tiny_backend.tok.decode(first[:2], skip_special_tokens=True)
    # The HF backend with the same generation config stops at the same token with the same text.
    old = tiny_backend.model.generation_config.eos_token_id
    try:
        tiny_backend.model.generation_config.eos_token_id = [eos, target]
        from distill_detect.backends.base import stop_token_ids

        hf_stops = stop_token_ids(tiny_backend.tok, tiny_backend.model.generation_config.eos_token_id)
    finally:
        tiny_backend.model.generation_config.eos_token_id = old
    assert hf_stops == vb.stop_ids
    saved = tiny_backend.stop_ids
    try:
        tiny_backend.stop_ids = hf_stops
        [h] = tiny_backend.generate(QS[:1], max_new_tokens=6)
    finally:
        tiny_backend.stop_ids = saved
    assert h.output_ids.tolist() == t.output_ids.tolist() and h.output_text == t.output_text


def test_flat_first_prompt_position_is_empty_not_none():
    """FlatLogprobs' first prompt position is an empty position: reading it is 'no log-probs', not a KeyError."""
    flat = FlatLogprobs()
    flat.append(None)
    for j in (11, 12):
        flat.append({j: Logprob(-0.5)})
    assert len(flat[0]) == 0
    p = Prompt(text="x", ids=[10, 11, 12], question_span=(0, 2))
    with pytest.raises(DistillDetectError, match="no log-probabilities for prompt token 0"):
        prompt_fields_from(p, flat)
    p = Prompt(text="x", ids=[10, 11, 12], question_span=(1, 3))
    np.testing.assert_allclose(prompt_fields_from(p, flat)["prompt_logprobs"], [-0.5, -0.5])


def test_score_past_the_model_length_names_the_question(tiny_backend):
    llm = TorchLLM(tiny_backend.model, tiny_backend.tok, max_model_len=64)
    vb = VLLMBackend(llm=llm, sampling_params_cls=SamplingParams)
    assert vb.context == 64
    short, long = np.arange(5, 10), np.arange(5, 70)
    with pytest.raises(InputError, match=r"^v1: .*prompt and continuation is \d+ tokens, the model's context is 64"):
        vb.score(QS[:2], [short, long])
    assert llm.calls == []  # refused before anything reached the engine
    assert len(vb.score(QS[:1], [short])[0]) == 5


def test_device_index_is_refused_with_the_fix(tiny_backend):
    make = lambda device: VLLMBackend(  # noqa: E731
        device=device, llm=TorchLLM(tiny_backend.model, tiny_backend.tok), sampling_params_cls=SamplingParams
    )
    with pytest.raises(ConfigError, match=r"CUDA_VISIBLE_DEVICES=1 and --device cuda$"):
        make("cuda:1")
    for ok in ("auto", "cuda", "cuda:0"):
        assert make(ok).fingerprint()["device"] == "cuda"


def test_close_shuts_the_engine_down(tiny_backend, monkeypatch):
    """close() stops the engine core, drops the last reference, collects it, destroys vLLM's
    distributed state and empties the CUDA cache, in that order; a second close is a no-op."""
    import gc

    import torch

    import distill_detect.backends.vllm as vmod

    log: list[str] = []
    real_collect = gc.collect
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.destroy_model_parallel = lambda: log.append("destroy_model_parallel")
    parallel_state.destroy_distributed_environment = lambda: log.append("destroy_distributed_environment")
    distributed = types.ModuleType("vllm.distributed")
    distributed.parallel_state = parallel_state
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.distributed", distributed)
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", parallel_state)
    monkeypatch.setattr(vmod.gc, "collect", lambda *a: (log.append("gc.collect"), real_collect())[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append("torch.cuda.empty_cache"))

    llm = TorchLLM(tiny_backend.model, tiny_backend.tok)
    llm.log = log
    llm.llm_engine.engine_core.log = log
    alive = weakref.ref(llm)
    vb = VLLMBackend(llm=llm, sampling_params_cls=SamplingParams)
    del llm
    vb.close()
    assert log == [
        "engine_core.shutdown",
        "gc.collect",
        "destroy_model_parallel",
        "destroy_distributed_environment",
        "torch.cuda.empty_cache",
    ]
    assert alive() is None, "the engine must be unreachable once closed"
    vb.close()
    assert len(log) == 5
    with pytest.raises(DistillDetectError, match="closed"):
        vb.generate(QS[:1], max_new_tokens=2)


def test_close_survives_a_version_without_those_hooks(tiny_backend):
    llm = TorchLLM(tiny_backend.model, tiny_backend.tok)
    del llm.llm_engine.engine_core
    vb = VLLMBackend(llm=llm, sampling_params_cls=SamplingParams)
    vb.close()  # no engine_core, no vllm.distributed, CPU torch: nothing raises
    assert vb.llm is None


# -- the engine arguments, through the real construction path with a stand-in vllm module ------------


@pytest.fixture()
def fake_vllm(monkeypatch, tiny_backend):
    """A module named vllm whose LLM records its keyword arguments and answers with TorchLLM."""
    built: list[dict] = []

    class LLM(TorchLLM):
        def __init__(self, **kwargs):
            built.append(kwargs)
            super().__init__(tiny_backend.model, tiny_backend.tok, dtype=kwargs["dtype"])

    @dataclass
    class EngineArgs:
        model: str = ""
        logprobs_mode: str = "raw_logprobs"

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams, vllm.__version__ = LLM, SamplingParams, "0.11.0-stand-in"
    engine = types.ModuleType("vllm.engine")
    arg_utils = types.ModuleType("vllm.engine.arg_utils")
    arg_utils.EngineArgs = EngineArgs
    engine.arg_utils = arg_utils
    vllm.engine = engine
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.engine", engine)
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", arg_utils)
    assert dataclasses.is_dataclass(EngineArgs)
    return built


def test_engine_kwargs_no_prefix_cache_capped_batch_explicit_dtype(fake_vllm, tiny_dir):
    vb = VLLMBackend(str(tiny_dir))
    [kw] = fake_vllm
    vocab = tiny_backend_vocab(tiny_dir)
    assert kw["model"] == str(tiny_dir.resolve())
    assert kw["enable_prefix_caching"] is False
    assert kw["max_num_batched_tokens"] == prompt_logprob_token_cap(vocab) and kw["max_num_seqs"] <= kw["max_num_batched_tokens"]
    assert kw["logprobs_mode"] == "raw_logprobs"
    # 'auto' never reaches vLLM: the tiny checkpoint is float32, so on a GPU the shared rule gives bfloat16
    # (vLLM's own 'auto' would have picked float16), and the fingerprint records it.
    assert kw["dtype"] == "bfloat16" and vb.fingerprint()["dtype"] == "bfloat16"
    assert vb.fingerprint()["versions"] == {"vllm": "0.11.0-stand-in"} and vb.location == str(tiny_dir.resolve())
    VLLMBackend(str(tiny_dir), dtype="float32", prompt_logprobs=False)
    kw = fake_vllm[-1]
    assert kw["dtype"] == "float32" and "max_num_batched_tokens" not in kw and kw["enable_prefix_caching"] is False


def tiny_backend_vocab(tiny_dir) -> int:
    import json

    return json.loads((tiny_dir / "config.json").read_text())["vocab_size"]


def test_prompt_logprob_cap_fits_the_budget():
    from distill_detect.backends.vllm import PROMPT_LOGITS_BUDGET

    for vocab in (32000, 128256, 152064, 262144):
        cap = prompt_logprob_token_cap(vocab)
        assert cap % 256 == 0 and cap >= 512
        assert cap * vocab * 8 <= PROMPT_LOGITS_BUDGET or cap == 512
    # The case: 8192 prompt tokens x a 152k vocabulary took ~7.5 GiB that vLLM's profiling did not count.
    assert prompt_logprob_token_cap(152064) < 2048
