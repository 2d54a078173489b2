"""FSD (fine-tuned score deviation): the scores against brute-force twins, and the pass end to end on the tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import distill_detect as dd
from distill_detect import fsd as fsd_mod
from distill_detect.detectors import get
from distill_detect.detectors.fsd import logprob_gain, mean_abs_shift, tpd_gain
from distill_detect.errors import ConfigError, DistillDetectError
from distill_detect.store import TraceStore
from distill_detect.types import Question, Trace

logp = st.floats(min_value=-12.0, max_value=0.0, allow_nan=False)


def gain_loop(s, f):
    if not s:
        return 0.0
    return sum(fi - si for si, fi in zip(s, f)) / len(s)


def tpd_loop(lps, tau, alpha):
    kept = [math.exp(x) for x in lps if math.exp(x) < tau]
    return sum((tau - p) ** alpha for p in kept) / len(kept) if kept else 0.0


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(logp, logp), max_size=40))
def test_logprob_gain_equals_the_loop(pairs):
    s, f = [p[0] for p in pairs], [p[1] for p in pairs]
    assert logprob_gain(s, f) == pytest.approx(gain_loop(s, f), rel=1e-9, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(logp, logp), max_size=40))
def test_mean_abs_shift_equals_the_loop(pairs):
    s, f = [p[0] for p in pairs], [p[1] for p in pairs]
    want = sum(abs(fi - si) for si, fi in zip(s, f)) / len(s) if s else 0.0
    assert mean_abs_shift(s, f) == pytest.approx(want, rel=1e-9, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(logp, logp), max_size=40), tau=st.floats(0.05, 1.0), alpha=st.floats(0.1, 2.0))
def test_tpd_gain_equals_the_loop(pairs, tau, alpha):
    s, f = [p[0] for p in pairs], [p[1] for p in pairs]
    want = tpd_loop(s, tau, alpha) - tpd_loop(f, tau, alpha)
    assert tpd_gain(s, f, tau=tau, alpha=alpha) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_direction_and_budget():
    s = np.log([0.5, 0.6, 0.9, 0.4]).astype(np.float32)
    risen = np.log([0.9, 0.9, 0.95, 0.4]).astype(np.float32)  # a non-member: tuning on unseen questions raised it
    t_non = Trace(id="a", question="q", output_logprobs=s, extra={"fsd_output_logprobs": risen})
    t_mem = Trace(id="b", question="q", output_logprobs=s, extra={"fsd_output_logprobs": s})  # already fitted: unmoved
    det = get("fsd")
    assert det.higher_is_member is False and det(t_non) > det(t_mem) == 0.0
    assert get("fsd_tpd")(t_non) > get("fsd_tpd")(t_mem) == 0.0
    fell = (2 * s - risen).astype(np.float32)  # the same moves downwards: as far from the student, as non-member-like
    assert det(Trace(id="e", question="q", output_logprobs=s, extra={"fsd_output_logprobs": fell})) == pytest.approx(
        det(t_non), abs=1e-6
    )
    assert det(t_non, max_tokens=1) == pytest.approx(math.log(0.9 / 0.5))  # first M tokens only
    with pytest.raises(DistillDetectError, match="fsd-model"):
        det(Trace(id="c", question="q", output_logprobs=s))
    with pytest.raises(DistillDetectError, match="aligned"):
        det(Trace(id="d", question="q", output_logprobs=s, extra={"fsd_output_logprobs": s[:2]}))


# -- end to end on the tiny random model ---------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("fsd")
    m = _write(
        d / "m.jsonl", [{"id": f"m{i}", "question": f"Ann has {i + 3} pens and loses {i + 1}. How many left?"} for i in range(5)]
    )
    n = _write(
        d / "n.jsonl", [{"id": f"n{i}", "question": f"A car drives {i + 40} km in {i + 2} hours. Speed?"} for i in range(5)]
    )
    unseen = d / "unseen"
    dd.generate([Question(id=f"u{i}", text=f"Bob reads {i + 5} pages a day for {i + 2} days. How many?") for i in range(6)],
                unseen, model=str(tiny_dir), gen=dd.GenConfig(max_new_tokens=6))  # fmt: skip
    with TraceStore(unseen) as store:
        examples = fsd_mod.tuning_examples(store.traces())
    fsd_dir = fsd_mod.build_fsd_model(str(tiny_dir), examples, d / "fsd_model", progress=False, epochs=1, max_steps=2,
                                      learning_rate=5e-3, per_device_batch_size=3, max_seq_len=64)  # fmt: skip
    return d, m, n, fsd_dir


def test_build_uses_the_students_own_answers_and_the_fixed_settings(setup):
    d, _, _, fsd_dir = setup
    meta = json.loads((fsd_dir / "distill_detect_finetune.json").read_text())
    assert meta["run"]["n_examples"] == 6 and meta["run"]["config"]["learning_rate"] == 5e-3
    assert fsd_mod.FSD_TRAINING == {"epochs": 3, "learning_rate": 1e-4, "per_device_batch_size": 8, "seed": 42}


def test_run_stores_the_pass_and_scores_it_exactly(setup, tiny_dir):
    from distill_detect.backends.hf import HFBackend

    d, m, n, fsd_dir = setup
    res = dd.run(m, n, out=d / "run", model=str(tiny_dir), methods="tpd,fsd,fsd_tpd", gen=dd.GenConfig(max_new_tokens=6),
                 fsd_model=str(fsd_dir), bootstrap=50, report=False)  # fmt: skip
    assert set(res.metrics) == {"tpd", "fsd", "fsd_tpd"} and len(res.raw["fsd"]) == 10
    with TraceStore(d / "run" / "run") as store:
        traces = {t.id: t for t in store.traces()}
        assert store.get_meta("fsd_model")["content_hash"]
    fsd_backend = HFBackend(str(fsd_dir), dtype="float32", device="cpu")
    for tid, raw in zip(res.ids, res.raw["fsd"]):
        t = traces[tid]
        direct = fsd_backend.score([Question(id=tid, text=t.question)], [np.asarray(t.output_ids)])[0]
        np.testing.assert_allclose(t.extra["fsd_output_logprobs"], direct, rtol=1e-5, atol=1e-5)
        moved = np.abs(direct.astype(np.float64) - t.output_logprobs.astype(np.float64))
        assert raw == pytest.approx(float(np.mean(moved)), abs=1e-5)
    assert np.any(np.abs(res.raw["fsd"]) > 1e-4)  # the tuned model differs from the student
    # Stored: scoring again needs no FSD model and computes nothing.
    again = dd.score(d / "run" / "run", methods="fsd")
    np.testing.assert_allclose(again.raw["fsd"], res.raw["fsd"], rtol=0, atol=0)
    assert fsd_mod.fsd_pass(d / "run" / "run", str(fsd_dir)) == 0


def test_pass_resumes_after_an_interruption_and_recomputes_for_another_model(setup, tiny_dir, monkeypatch):
    d, m, _, fsd_dir = setup
    run = d / "resume"
    dd.generate(m, run, model=str(tiny_dir), gen=dd.GenConfig(max_new_tokens=6))
    real, calls = fsd_mod.logprobs_under, []

    def dies_on_the_second_chunk(backend, traces, batch_size=8):
        calls.append(len(traces))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(backend, traces, batch_size)

    monkeypatch.setattr(fsd_mod, "logprobs_under", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        fsd_mod.fsd_pass(run, str(fsd_dir), chunk=2)
    monkeypatch.setattr(fsd_mod, "logprobs_under", real)
    with pytest.raises(ConfigError, match="--fsd-model"):  # half done: scoring without the model refuses
        dd.score(run, methods="fsd")
    assert fsd_mod.fsd_pass(run, str(fsd_dir), chunk=2) == 3  # 5 traces, 2 kept from before the interruption
    first = dd.score(run, methods="fsd").raw["fsd"]
    assert fsd_mod.fsd_pass(run, str(tiny_dir)) == 5  # another FSD model (here the student itself): all recomputed
    assert np.allclose(dd.score(run, methods="fsd").raw["fsd"], 0.0, atol=1e-5) and not np.allclose(first, 0.0, atol=1e-4)


def test_cli_flag_reaches_the_pass(setup, tiny_dir):
    from distill_detect.cli import main

    d, m, _, fsd_dir = setup
    run = d / "cli_run"
    dd.generate(m, run, model=str(tiny_dir), gen=dd.GenConfig(max_new_tokens=6))
    argv = ["score", "--run", str(run), "--out", str(d / "cli_out"), "--methods", "fsd", "--fsd-model", str(fsd_dir),
            "--bootstrap", "50", "--no-report"]  # fmt: skip
    assert main(argv) == 0
    with TraceStore(run) as store:
        assert all(t.extra.get("fsd_output_logprobs") is not None for t in store.traces())
