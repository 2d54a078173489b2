"""The llamacpp backend on the embedded SmolLM2 GGUF: same prompts as HF, batch-invariant,
and within the stated tolerance of the HF backend on the dequantised weights.

Skipped where llama-cpp-python is not installed (``pip install 'distill-detect[llamacpp]'``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'distill-detect[llamacpp]')")

from distill_detect.data import load_questions  # noqa: E402

# Stated in distill_detect/backends/llamacpp.py: Q4_1 GGUF on llama.cpp vs the dequantised float32 HF model.
IDENTICAL_FIRST = 4  # greedy tokens identical for at least this many steps on most questions
LOGPROB_TOL = 0.3  # |Δ log p| on the prefix where the greedy tokens are identical
FORCED_TOL = 0.5  # |Δ log p| when llama.cpp teacher-forces the HF tokens (prompt prefill path)


@pytest.fixture(scope="module")
def lc():
    from distill_detect.backends.llamacpp import LlamaCppBackend

    # One thread: stable run time on a shared machine (two spinning threads stall under load).
    be = LlamaCppBackend("default", n_threads=1)
    yield be
    be.close()


@pytest.fixture(scope="module")
def hf(default_dir):
    from distill_detect.backends.hf import HFBackend

    return HFBackend(str(default_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def questions():
    return load_questions("bundled:gsm8k_test")[:4]


def test_prompt_and_fingerprint_match_the_hf_side(lc, hf, questions):
    from distill_detect.models import find_default_gguf
    from distill_detect.prompts import build_prompt

    for q in questions:
        ids, span = lc.build_prompt(q.text)
        ref = build_prompt(hf.tok, q.text)
        assert ids == ref.ids and span == ref.question_span
    fp = lc.fingerprint()
    assert fp["backend"] == "llamacpp" and fp["decoding"] == "greedy" and fp["dtype"] == "Q4_1"
    assert fp["versions"]["llama_cpp_python"] and fp["template"] == hf.fingerprint()["template"]
    assert fp["stop_ids"] == hf.fingerprint()["stop_ids"]
    from distill_detect.models import sha256_file

    assert fp["model"]["gguf_sha256"] == sha256_file(find_default_gguf())


def test_batch_does_not_change_results(lc, questions):
    singles = [lc.generate([q], max_new_tokens=10)[0] for q in questions]
    batch = lc.generate(questions, max_new_tokens=10)
    for s, b in zip(singles, batch):
        assert s.id == b.id and np.array_equal(s.output_ids, b.output_ids)
        np.testing.assert_allclose(s.output_logprobs, b.output_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(s.prompt_logprobs, b.prompt_logprobs, atol=1e-4, rtol=0)
        assert s.output_logprobs.dtype == np.float32 and (s.output_logprobs <= 0).all()
        assert (s.output_logprobs >= s.output_mean_logp - 1e-5).all() and (s.output_std_logp >= 0).all()


def test_agrees_with_hf_within_stated_tolerance(lc, hf, questions):
    T = 12
    a = lc.generate(questions, max_new_tokens=T)
    b = hf.generate(questions, max_new_tokens=T)
    long_enough = 0
    for x, y in zip(a, b):
        same = x.output_ids == y.output_ids
        k = len(same) if same.all() else int(np.argmin(same))
        long_enough += k >= IDENTICAL_FIRST
        if k:
            assert np.abs(x.output_logprobs[:k] - y.output_logprobs[:k]).max() <= LOGPROB_TOL
        # Teacher-forcing the HF tokens compares every position, wherever the greedy paths part.
        forced = lc.score([q for q in questions if q.id == y.id], [y.output_ids])[0]
        assert np.abs(forced - y.output_logprobs).max() <= FORCED_TOL
    assert long_enough >= len(questions) - 1


def test_stops_budget_and_prompt_scoring(lc, questions):
    first = lc.generate(questions[:1], max_new_tokens=8)[0]
    assert first.num_tokens == 8 and first.finish_reason == "length" and first.max_new_tokens == 8
    short = lc.generate(questions[:1], max_new_tokens=3)[0]
    assert np.array_equal(short.output_ids, first.output_ids[:3])
    target = int(first.output_ids[2])
    old = set(lc.stop_ids)
    try:
        lc.stop_ids = old | {target}
        t = lc.generate(questions[:1], max_new_tokens=8)[0]
    finally:
        lc.stop_ids = old
    cut = list(first.output_ids).index(target) + 1
    assert t.finish_reason == "stop" and t.num_tokens == cut and t.output_ids[-1] == target
    p = lc.score_prompts(questions[:1])[0]
    assert np.array_equal(p["prompt_ids"], first.prompt_ids)
    np.testing.assert_allclose(p["prompt_logprobs"], first.prompt_logprobs, atol=1e-4, rtol=0)


def test_sampling_is_deterministic_for_a_seed_and_batch_independent(lc, questions):
    """Answer k of a question is a function of (seed, question id, k): the same however it is batched or
    ordered, another seed draws other answers, and a top-p that keeps one token is the greedy answer."""
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=10)
    reqs = [(questions[0], 0), (questions[0], 1), (questions[1], 0), (questions[2], 3)]
    first = lc.sample(reqs, seed=3, **kw)
    assert lc.sample(reqs, seed=3, **kw) == first  # same seed, same answers (text, tokens, finish)
    singles = [lc.sample([r], seed=3, **kw)[0] for r in reversed(reqs)][::-1]
    assert singles == first  # one at a time, in the other order
    assert first[0].text != first[1].text or first[0].num_tokens != first[1].num_tokens  # k changes the stream
    other = lc.sample(reqs, seed=4, **kw)
    assert [s.text for s in other] != [s.text for s in first]
    assert all(0 < s.num_tokens <= 10 and s.finish_reason in ("stop", "length") and s.text for s in first)
    greedy = lc.generate(questions[:3], max_new_tokens=10)
    one_token = lc.sample([(q, 0) for q in questions[:3]], seed=3, temperature=1.0, top_p=1e-9, max_new_tokens=10)
    assert [s.text for s in one_token] == [t.output_text for t in greedy]
    assert [s.num_tokens for s in one_token] == [t.num_tokens for t in greedy]


def test_sampled_answers_stored_by_the_pipeline_do_not_depend_on_the_batch(tmp_path, questions):
    import distill_detect as dd
    from distill_detect.store import TraceStore

    runs = []
    for bs in (1, 4):
        dd.generate(questions[:2], tmp_path / f"b{bs}", model=dd.ModelSettings(backend="llamacpp", threads=1),
                    gen=dd.GenConfig(max_new_tokens=8, batch_size=bs, samples=2, seed=5), methods=["cdd"])  # fmt: skip
        with TraceStore(tmp_path / f"b{bs}") as st:
            runs.append({t.id: (t.output_text, t.samples.texts) for t in st.traces(sampling=st.get_meta("sampling"))})
    assert runs[0] == runs[1] and all(len(s) == 2 for _, s in runs[0].values())


def test_cli_runs_with_the_llamacpp_backend(tmp_path):
    from distill_detect import cli
    from distill_detect.pipeline import read_run

    out = tmp_path / "lc"
    rc = cli.main(
        [
            "run",
            "--backend",
            "llamacpp",
            "--members",
            "bundled:gsm8k_train_sample",
            "--nonmembers",
            "bundled:gsm8k_test",
            "--limit",
            "1",
            "--tpd-tokens",
            "3",
            "--bootstrap",
            "10",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    traces, fp, _ = read_run(out / "run")
    assert len(traces) == 2 and all(t.num_tokens <= 3 for t in traces)
    assert fp["backend"] == "llamacpp"


def test_gguf_tokenizer_matches_hf_and_feeds_dc_pdd(lc, hf, questions):
    from distill_detect.passes import build_token_freq_table

    texts = [q.text for q in questions] + [q.response or "" for q in load_questions("bundled:gsm8k_gpt3")[:4]]
    tok = lc.tok
    assert len(tok) == len(hf.tok)
    assert tok(texts)["input_ids"] == hf.tok(texts, add_special_tokens=False)["input_ids"]
    # The same table from either tokenizer: DC-PDD reads the same frequencies on both backends.
    np.testing.assert_array_equal(build_token_freq_table(tok, texts), build_token_freq_table(hf.tok, texts))
    assert tok.cache_key().startswith("gguf-")


def test_dc_pdd_scores_a_llamacpp_run(tmp_path, monkeypatch):
    from distill_detect import cli

    monkeypatch.setenv("DISTILL_DETECT_CACHE", str(tmp_path / "cache"))  # the frequency table is built here
    out = tmp_path / "lc"
    rc = cli.main(
        ["run", "--backend", "llamacpp", "--members", "bundled:gsm8k_train_sample", "--nonmembers", "bundled:gsm8k_test",
         "--limit", "2", "--max-new-tokens", "4", "--methods", "tpd,dc_pdd", "--bootstrap", "10", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["dc_pdd"]) for r in rows)
    assert list((tmp_path / "cache" / "token_freq").glob("gguf-*.npy"))


def test_one_llama_decode_per_step_for_the_whole_batch(lc, questions, monkeypatch):
    """Prefill: one call per prompt (< 512 tokens here); then each decoding step is ONE llama_decode holding one
    token of every unfinished row (each its own sequence, logits asked for every entry), finished rows dropped."""
    calls = []
    real = lc.lc.llama_decode

    def counting(ctx, batch):
        n = batch.n_tokens
        calls.append((n, sorted(batch.seq_id[i][0] for i in range(n)), sum(bool(batch.logits[i]) for i in range(n))))
        return real(ctx, batch)

    monkeypatch.setattr(lc.lc, "llama_decode", counting)
    T = 6
    old = set(lc.stop_ids)
    first = lc.generate(questions[:1], max_new_tokens=T)[0]
    lc.stop_ids = old | {int(first.output_ids[2])}  # question 0 now stops after 3 tokens: its row must leave the batch
    try:
        calls.clear()
        traces = lc.generate(questions, max_new_tokens=T)
    finally:
        lc.stop_ids = old
    B = len(questions)
    prefill, steps = calls[:B], calls[B:]
    assert [c[1] for c in prefill] == [[i] * c[0] for i, c in enumerate(prefill)]  # one sequence per prefill call
    for q, c in zip(questions, prefill):  # logits only at the question's tokens (prompt log-probs) and the last position
        ids, (a, b) = lc.build_prompt(q.text)
        assert c[0] == len(ids) and c[2] == (b - a) + 1
    stopped = [i for i, t in enumerate(traces) if t.finish_reason == "stop"]
    assert 0 in stopped and traces[0].num_tokens == 3
    assert len(steps) == T - 1  # one call per step after the first token, not one per row
    for s, (n, seqs, outs) in enumerate(steps, start=1):
        alive = [i for i, t in enumerate(traces) if t.num_tokens > s]
        assert seqs == alive and n == len(alive) == outs
