"""vLLM request/response translation, without vLLM.

The stand-ins below mirror the fields of vLLM's own classes (vllm/outputs.py:
``RequestOutput(request_id, prompt, prompt_token_ids, prompt_logprobs, outputs,
finished)``, ``CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs,
finish_reason, stop_reason)``; vllm/logprobs.py: ``Logprob(logprob, rank,
decoded_token)``, positions as ``{token_id: Logprob}``, the first prompt position None,
and ``FlatLogprobs`` that indexes like a list of such dicts).

``TorchLLM`` plays ``vllm.LLM`` with the tiny HF model: greedy decoding by full
recomputation (no KV cache, an independent path), answering in vLLM's shapes. The
VLLMBackend on it must agree with the HF backend token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from distill_detect.backends.vllm import (
    VLLMBackend,
    continuation_logprobs,
    prompt_fields_from,
    sampling_kwargs,
    trace_from_output,
)
from distill_detect.errors import ConfigError, DistillDetectError
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


class TorchLLM:
    """``vllm.LLM.generate`` semantics on a transformers model, by full recomputation (no cache)."""

    def __init__(self, model, tok):
        self.model, self.tok, self.calls = model, tok, []

    def get_tokenizer(self):
        return self.tok

    def _logp(self, ids):
        import torch

        with torch.inference_mode():
            return torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)

    def generate(self, prompts, params, use_tqdm=True):
        assert params.temperature == 0.0 and params.n == 1
        self.calls.append(params)
        outs = []
        for k, p in enumerate(prompts):
            ids = list(p["prompt_token_ids"])
            logp = self._logp(ids)
            pl = None
            if params.prompt_logprobs is not None:
                pl = [None] + [{ids[j]: Logprob(float(logp[j - 1, ids[j]]), None, None)} for j in range(1, len(ids))]
            toks, lps, finish = [], [], "length"
            while len(toks) < params.max_tokens:
                row = logp[-1]
                nxt = int(row.argmax())
                toks.append(nxt)
                lps.append({nxt: Logprob(float(row[nxt]), 1, self.tok.decode([nxt]))})
                if nxt in (params.stop_token_ids or []):
                    finish = "stop"
                    break
                logp = self._logp(ids + toks)
            text = self.tok.decode(toks, skip_special_tokens=True)
            comp = CompletionOutput(0, text, toks, None, lps if params.logprobs is not None else None, finish)
            outs.append(RequestOutput(str(k), None, ids, pl, [comp]))
        return outs


@pytest.fixture(scope="module")
def pair(tiny_backend):
    vb = VLLMBackend(llm=TorchLLM(tiny_backend.model, tiny_backend.tok), sampling_params_cls=SamplingParams)
    return vb, tiny_backend


QS = [Question(id=f"v{i}", text=t) for i, t in enumerate(["What is 2+3?", "Name a planet.", "Say hello to the reader."])]


def test_vllm_backend_matches_hf(pair):
    vb, hf = pair
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
