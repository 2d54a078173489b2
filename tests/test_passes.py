"""Extra model passes on the tiny random Llama: agreement with direct scoring, tokenizer checks, the frequency table."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from distill_detect import passes
from distill_detect.backends.base import Backend
from distill_detect.detectors import REGISTRY, get
from distill_detect.errors import ConfigError, DistillDetectError, InputError
from distill_detect.fsd import logprobs_under as fsd_logprobs_under
from distill_detect.types import Question, Samples

QUESTIONS = [
    Question(id="a", text="What is Two plus Two? Answer Briefly."),
    Question(id="b", text="Natalia sold clips to 48 of her friends in April."),
    Question(id="c", text="a question already in lowercase"),
]


@pytest.fixture(scope="module")
def traces(tiny_backend):
    return tiny_backend.generate(QUESTIONS, max_new_tokens=12)


@pytest.fixture(scope="module")
def lower(tiny_backend, traces):
    return passes.lowercase_pass(tiny_backend, traces, batch_size=3)


@pytest.fixture(scope="module")
def ref(tiny_backend, traces):
    return passes.reference_pass(tiny_backend, traces, batch_size=2)


# -- which passes a run needs ------------------------------------------------------------------------


def test_required_passes():
    assert passes.required_passes(["tpd", "loss", "min_k", "out_ppl"]) == set()
    assert passes.required_passes(["lowercase"]) == {"lowercase"}
    assert passes.required_passes(["reference"]) == {"reference"}
    assert passes.required_passes(["tpd_ref"]) == {"reference"}
    assert passes.required_passes(["dc_pdd", "tpd"]) == {"dcpdd_freq"}
    assert passes.required_passes(sorted(REGISTRY)) == set(passes.PASS_EXTRAS)
    assert passes.required_extras(["tpd_ref"]) == {"reference_output_logprobs"}
    with pytest.raises(ConfigError, match="did you mean|Did you mean"):
        passes.required_passes(["min-k"])


def test_every_extra_need_has_a_pass():
    for det in REGISTRY.values():
        for need in det.needs:
            if need.startswith("extra:"):
                assert need[6:] in passes.EXTRA_PASS, (det.name, need)


def test_pending(traces, ref):
    done = [replace(t, extra=ref[t.id]) for t in traces[:2]] + [traces[2]]
    assert [t.id for t in passes.pending(done, "reference")] == ["c"]
    assert [t.id for t in passes.pending(done, "lowercase")] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="unknown pass"):
        passes.pending(done, "upper")


# -- lowercase ------------------------------------------------------------------------------------------


def test_lowercase_pass_matches_direct_scoring(tiny_backend, traces, lower):
    assert set(lower) == {"a", "b", "c"}
    for t in traces:
        got = lower[t.id]["lowercase_prompt_logprobs"]
        assert got.dtype == np.float32
        direct = tiny_backend.score_prompts([Question(id=t.id, text=t.question.lower())])[0]["prompt_logprobs"]
        np.testing.assert_allclose(got, direct, atol=1e-4)
    # "c" is already lowercase: the pass reproduces the generation's own prompt log-probs
    np.testing.assert_allclose(lower["c"]["lowercase_prompt_logprobs"], traces[2].prompt_logprobs, atol=1e-4)
    # "a" changes case: different tokens, different values
    assert not np.allclose(lower["a"]["lowercase_prompt_logprobs"][:3], traces[0].prompt_logprobs[:3])


def test_lowercase_pass_batch_independent(tiny_backend, traces, lower):
    one = passes.lowercase_pass(tiny_backend, traces, batch_size=1)
    for qid in lower:
        np.testing.assert_allclose(one[qid]["lowercase_prompt_logprobs"], lower[qid]["lowercase_prompt_logprobs"], atol=1e-4)


def test_lowercase_detector_on_real_traces(traces, lower):
    t = replace(traces[2], extra=lower["c"])
    assert get("lowercase")(t) == pytest.approx(1.0, abs=1e-4)
    for tr in traces:
        v = get("lowercase")(replace(tr, extra=lower[tr.id]))
        assert math.isfinite(v) and v > 0


def test_lowercase_needs_question_text(tiny_backend, traces):
    with pytest.raises(DistillDetectError, match="question text"):
        passes.lowercase_pass(tiny_backend, [replace(traces[0], question=None)])
    with pytest.raises(ConfigError, match="batch_size"):
        passes.lowercase_pass(tiny_backend, traces, batch_size=0)


# -- reference ------------------------------------------------------------------------------------------


def test_reference_pass_with_student_as_reference(traces, ref):
    for t in traces:
        r = ref[t.id]
        assert r["reference_output_logprobs"].dtype == np.float32
        np.testing.assert_allclose(r["reference_output_logprobs"], t.output_logprobs, atol=1e-4)
        np.testing.assert_allclose(r["reference_prompt_logprobs"], t.prompt_logprobs, atol=1e-4)
        full = replace(t, extra=r)
        assert get("tpd_ref")(full) == pytest.approx(0.0, abs=1e-3)
        assert get("reference")(full) == pytest.approx(0.0, abs=1e-4)
        assert abs(get("tpd")(full)) > 1e-2  # not trivially 0: the random model is far from certain


def test_reference_pass_parts(tiny_backend, traces):
    only_prompt = passes.reference_pass(tiny_backend, traces[:1], prompt=True, output=False)
    assert set(only_prompt["a"]) == {"reference_prompt_logprobs"}
    only_out = passes.reference_pass(tiny_backend, traces[:1], prompt=False, output=True)
    assert set(only_out["a"]) == {"reference_output_logprobs"}
    with pytest.raises(ConfigError, match="nothing to do"):
        passes.reference_pass(tiny_backend, traces, prompt=False, output=False)


class FakeRef(Backend):
    """A reference whose tokenizer splits questions differently (or has a tiny vocabulary)."""

    name = "fake"

    def __init__(self, shift=0, vocab=None):
        self.shift = shift
        if vocab is not None:
            self.tok = type("Tok", (), {"__len__": lambda s: vocab, "decode": lambda s, ids, **k: "x"})()

    def fingerprint(self):
        return {"backend": "fake"}

    def generate(self, questions, *, max_new_tokens):
        raise NotImplementedError

    def score_prompts(self, questions):
        out = []
        for q in questions:
            ids = np.array([ord(c) + self.shift for c in q.text[:5]], dtype=np.int32)
            out.append({"prompt_ids": ids, "prompt_logprobs": np.full(ids.size, -1.0, np.float32)})
        return out

    def score(self, questions, continuations):
        return [np.full(len(c), -1.0, np.float32) for c in continuations]


def test_reference_pass_refuses_other_tokenizer(traces):
    with pytest.raises(ConfigError, match="tokenizer differs"):
        passes.reference_pass(FakeRef(), traces)


def test_reference_pass_checks_vocabulary(traces):
    no_ids = [replace(t, prompt_ids=None, prompt_logprobs=None) for t in traces]
    with pytest.raises(ConfigError, match="vocabulary"):
        passes.reference_pass(FakeRef(vocab=10), no_ids, prompt=False)


def test_reference_pass_checks_decoding(traces):
    no_ids = [replace(t, prompt_ids=None, prompt_logprobs=None) for t in traces]
    with pytest.raises(ConfigError, match="decode"):
        passes.reference_pass(FakeRef(vocab=10**6), no_ids, prompt=False)


def test_reference_pass_warns_when_it_cannot_check(traces):
    no_ids = [replace(t, prompt_ids=None, prompt_logprobs=None) for t in traces]
    with pytest.warns(UserWarning, match="could not verify"):
        out = passes.reference_pass(FakeRef(), no_ids, prompt=False)
    assert out["a"]["reference_output_logprobs"].size == traces[0].num_tokens


def test_reference_pass_needs_output_ids(tiny_backend, traces):
    with pytest.raises(DistillDetectError, match="token ids"):
        passes.reference_pass(tiny_backend, [replace(traces[0], output_ids=None)])


class NoPrompt(FakeRef):
    score_prompts = Backend.score_prompts


def test_backend_without_prompt_scoring_gives_config_error(traces):
    with pytest.raises(ConfigError, match="prompt log-probabilities"):
        passes.lowercase_pass(NoPrompt(), traces)
    with pytest.raises(ConfigError, match="prompt log-probabilities"):
        passes.reference_pass(NoPrompt(), traces)


# -- DC-PDD frequency table -----------------------------------------------------------------------------


TEXTS = ["hello hello world", "What is two plus two?", "hello again"]


@pytest.fixture(scope="module")
def table(tiny_backend):
    return passes.build_token_freq_table(tiny_backend.tok, TEXTS, batch_size=2)


def test_freq_table_counts_by_hand(tiny_backend, table):
    tok = tiny_backend.tok
    counts = Counter(i for t in TEXTS for i in tok(t, add_special_tokens=False)["input_ids"])
    n, v = sum(counts.values()), len(tok)
    assert table.shape == (v,) and table.dtype == np.float64
    assert table.sum() == pytest.approx(1.0)
    hello = tok("hello", add_special_tokens=False)["input_ids"][0]
    assert counts[hello] >= 2
    for i, c in counts.items():
        assert table[i] == pytest.approx((c + 1) / (n + v))
    unseen = next(i for i in range(v) if i not in counts)
    assert table[unseen] == pytest.approx(1 / (n + v))


def test_freq_table_save_load_roundtrip(tmp_path, table):
    p = passes.save_token_freq_table(tmp_path / "sub" / "freq.npy", table)
    back = passes.load_token_freq_table(p, vocab_size=table.size)
    np.testing.assert_array_equal(back, table)
    with pytest.raises(InputError, match="vocabulary"):
        passes.load_token_freq_table(p, vocab_size=table.size + 1)
    with pytest.raises(InputError, match="not found"):
        passes.load_token_freq_table(tmp_path / "missing.npy")


def test_freq_table_refuses_pickle_and_bad_values(tmp_path):
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="not a plain numeric"):
        passes.load_token_freq_table(obj)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([0.5, 0.5, 0.0]))
    with pytest.raises(InputError, match="> 0"):
        passes.load_token_freq_table(bad)
    with pytest.raises(InputError, match="1-D"):
        passes.save_token_freq_table(tmp_path / "x.npy", np.ones((2, 2)) / 4)


def test_dcpdd_freq_pass_aligned_with_prompt_ids(traces, table):
    out = passes.dcpdd_freq_pass(traces, table)
    for t in traces:
        f = out[t.id]["dcpdd_token_freq"]
        assert f.shape == t.prompt_ids.shape
        np.testing.assert_allclose(f, table[t.prompt_ids].astype(np.float32))
        v = get("dc_pdd")(replace(t, extra=out[t.id]))
        assert 0.0 < v <= 0.01


def test_dcpdd_freq_pass_errors(traces, table):
    with pytest.raises(ConfigError, match="frequency table covers"):
        passes.dcpdd_freq_pass(traces, np.full(10, 0.1))
    with pytest.raises(DistillDetectError, match="token ids"):
        passes.dcpdd_freq_pass([replace(traces[0], prompt_ids=None)], table)


def test_bundled_corpus_texts():
    qs = passes.bundled_corpus_texts(["gsm8k_train_sample"], responses=False)
    assert len(qs) == 1000 and all(isinstance(x, str) and x for x in qs)
    with_resp = passes.bundled_corpus_texts(["gsm8k_gpt3"])
    assert len(with_resp) == 2 * 742
    with pytest.raises(ConfigError, match="empty"):
        passes.bundled_corpus_texts(["gsm8k_gpt3"], exclude=["gsm8k_gpt3"])


# -- everything together ----------------------------------------------------------------------------------


def test_solution_pass_scores_the_training_encoding(tiny_backend, traces):
    """The solution pass reads exactly the completion tokens a fine-tune trains on, teacher-forced."""
    from distill_detect.finetune import encode_example

    t = replace(traces[0], solution="Two apples and three more make five.\n#### 5")
    got = passes.solution_pass(tiny_backend, [t])[t.id]["solution_logprobs"]
    ex = encode_example(tiny_backend.tok, t.question, t.solution)
    comp = [i for i, m in zip(ex["input_ids"], ex["completion_mask"]) if m]
    want = tiny_backend.score([Question(id=t.id, text=t.question)], [np.asarray(comp)])[0]
    assert len(got) == len(comp) and np.allclose(got, want)
    with pytest.raises(ConfigError, match="no solution"):
        passes.solution_pass(tiny_backend, [replace(t, solution=None)])


def test_every_method_scores_real_traces(tiny_backend, traces, lower, ref, table):
    freq = passes.dcpdd_freq_pass(traces, table)
    traces = [replace(t, solution="#### 4") for t in traces]
    sol = passes.solution_pass(tiny_backend, traces)
    ref_sol = passes.reference_solution_pass(tiny_backend, traces)
    fsd = fsd_logprobs_under(tiny_backend, traces)  # the FSD model's arrays (here the same model: a zero deviation)
    for t in traces:
        # The text-only methods also read sampled answers and the benchmark's solution (tests/test_sampling.py makes real ones).
        samples = Samples((t.output_text, "4"), temperature=1.0, top_p=1.0, seed=0, max_new_tokens=8)
        extra = {**lower[t.id], **ref[t.id], **freq[t.id], **sol[t.id], **ref_sol[t.id], **fsd[t.id]}
        full = replace(t, extra=extra, samples=samples)
        for name, det in REGISTRY.items():
            v = det(full)
            assert isinstance(v, float) and math.isfinite(v), name


def test_passes_doctests():
    import doctest

    res = doctest.testmod(passes)
    assert res.attempted >= 2 and res.failed == 0
