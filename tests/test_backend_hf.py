"""The HF backend on a tiny random Llama: determinism, batching, stops, contracts between paths."""

from __future__ import annotations

import numpy as np
import pytest

from distill_detect.data import load_questions
from distill_detect.types import Question


@pytest.fixture(scope="module")
def questions():
    # Different lengths on purpose: batching must cope with left padding.
    return load_questions("bundled:gsm8k_test")[:8]


def test_greedy_is_deterministic_and_logprobs_are_valid(tiny_backend, questions):
    a = tiny_backend.generate(questions[:3], max_new_tokens=12)
    b = tiny_backend.generate(questions[:3], max_new_tokens=12)
    for x, y in zip(a, b):
        assert np.array_equal(x.output_ids, y.output_ids)
        assert np.array_equal(x.output_logprobs, y.output_logprobs)
        assert x.output_logprobs.dtype == np.float32
        assert (x.output_logprobs <= 0).all() and np.isfinite(x.output_logprobs).all()
        assert x.num_tokens == 12 and x.finish_reason == "length" and x.max_new_tokens == 12
        # Entropy is non-negative and the std of log p is non-negative.
        assert (x.output_mean_logp <= 1e-6).all() and (x.output_std_logp >= 0).all()


def test_emitted_token_is_the_argmax(tiny_backend, questions):
    """Under greedy decoding, p_t is the top-1 probability: log p_t >= E_p[log p] always."""
    t = tiny_backend.generate(questions[:2], max_new_tokens=10)
    for x in t:
        assert (x.output_logprobs >= x.output_mean_logp - 1e-5).all()


def test_batch_size_does_not_change_results(tiny_backend, questions):
    singles = [tiny_backend.generate([q], max_new_tokens=16)[0] for q in questions]
    batch = tiny_backend.generate(questions, max_new_tokens=16)
    for s, b in zip(singles, batch):
        assert s.id == b.id
        assert np.array_equal(s.output_ids, b.output_ids)
        np.testing.assert_allclose(s.output_logprobs, b.output_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(s.prompt_logprobs, b.prompt_logprobs, atol=1e-4, rtol=0)
        assert np.array_equal(s.prompt_ids, b.prompt_ids)


def test_generate_agrees_with_teacher_forcing(tiny_backend, questions):
    gen = tiny_backend.generate(questions[:4], max_new_tokens=10)
    forced = tiny_backend.score(questions[:4], [t.output_ids for t in gen])
    for g, f in zip(gen, forced):
        np.testing.assert_allclose(g.output_logprobs, f, atol=1e-4, rtol=0)
    prompts = tiny_backend.score_prompts(questions[:4])
    for g, p in zip(gen, prompts):
        assert np.array_equal(g.prompt_ids, p["prompt_ids"])
        np.testing.assert_allclose(g.prompt_logprobs, p["prompt_logprobs"], atol=1e-4, rtol=0)


def test_question_span_decodes_to_the_question(tiny_backend, questions):
    q = questions[0]
    t = tiny_backend.generate([q], max_new_tokens=1)[0]
    assert tiny_backend.tok.decode(t.prompt_ids).strip() == q.text.strip()
    assert len(t.prompt_logprobs) == len(t.prompt_ids)


def test_stops_at_end_of_turn_and_keeps_it(tiny_backend, questions):
    """Make the 4th greedy token a stop token: generation must end there, with that token last."""
    first = tiny_backend.generate(questions[:1], max_new_tokens=8)[0]
    target = int(first.output_ids[3])
    assert target not in first.output_ids[:3].tolist()  # the tiny model's tokens vary, so this is a clean stop point
    old = set(tiny_backend.stop_ids)
    try:
        tiny_backend.stop_ids = old | {target}
        t = tiny_backend.generate(questions[:2], max_new_tokens=8)
    finally:
        tiny_backend.stop_ids = old
    assert t[0].finish_reason == "stop" and t[0].num_tokens == 4 and t[0].output_ids[-1] == target
    np.testing.assert_allclose(t[0].output_logprobs, first.output_logprobs[:4], atol=1e-4)
    # The other question kept decoding after the first left the batch, and is unaffected by it.
    alone = tiny_backend.generate(questions[1:2], max_new_tokens=8)[0]
    cut = list(alone.output_ids).index(target) + 1 if target in alone.output_ids else 8
    assert t[1].num_tokens == cut
    np.testing.assert_allclose(t[1].output_logprobs, alone.output_logprobs[:cut], atol=1e-4)


def test_max_new_tokens_respected_and_prefix_property(tiny_backend, questions):
    short = tiny_backend.generate(questions[:2], max_new_tokens=5)
    long = tiny_backend.generate(questions[:2], max_new_tokens=15)
    for s, lg in zip(short, long):
        assert s.num_tokens == 5 and lg.num_tokens == 15
        assert np.array_equal(s.output_ids, lg.output_ids[:5])


def test_fingerprint_names_what_changes_outputs(tiny_backend):
    fp = tiny_backend.fingerprint()
    assert fp["backend"] == "hf" and fp["decoding"] == "greedy" and fp["dtype"] == "float32"
    assert {"torch", "transformers"} <= set(fp["versions"]) and fp["template"] and fp["model"]["content_hash"]


def test_prompt_longer_than_context_is_refused(tiny_backend):
    from distill_detect.errors import InputError

    long_q = Question("long", "word " * 1500)
    with pytest.raises(InputError, match="context is 1024"):
        tiny_backend.generate([long_q], max_new_tokens=2)
