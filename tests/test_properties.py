"""Property-based tests (hypothesis) for the loaders, the trace store and interchange format, TPD and the metrics.

Complements tests/test_detectors.py (TPD bounds, budget, zero when certain) and tests/test_metrics.py
(AUC against pair counting, negation, monotone transforms, TPR readings against a threshold sweep):
here the loaders are fuzzed (any bytes either load or give a one-line InputError), every format
round-trips arbitrary questions, stored arrays come back bit for bit, TPD matches a plain loop of the
paper's formula and its parameter check accepts exactly the documented domain, and the metrics do not
depend on the order of the questions.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distill_detect.data import load_questions
from distill_detect.detectors.tpd import check_tpd_params, tpd_deviation
from distill_detect.errors import ConfigError, InputError
from distill_detect.metrics import bootstrap_auc_ci, roc_auc, summarize, tpr_at_fpr
from distill_detect.store import TraceStore
from distill_detect.traceio import read_traces_jsonl, write_traces_jsonl
from distill_detect.types import Question, Trace

FAST = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def _dir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _one_line_input_error(exc: InputError, path: Path) -> None:
    msg = str(exc)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(str(path)), msg


# -- loaders -----------------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40).filter(
    lambda s: s.strip()
)
QUESTIONS = st.lists(st.tuples(TEXT, TEXT, st.sampled_from([0, 1, None])), min_size=1, max_size=8, unique_by=lambda r: r[0])


def _write(path: Path, rows: list[dict]) -> None:
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("question", pa.string()), ("label", pa.int64())])),
            path,
        )
        return
    if ".csv" in name or ".tsv" in name:
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t" if ".tsv" in name else ",")  # "\r\n": fields holding \r or \n get quoted
        w.writerow(["id", "question", "label"])
        w.writerows([[r["id"], r["question"], "" if r["label"] is None else r["label"]] for r in rows])
        text = buf.getvalue()
    elif name.endswith((".json", ".json.gz")):
        text = json.dumps(rows, ensure_ascii=False)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)


@FAST
@given(QUESTIONS, st.sampled_from(["q.jsonl", "q.jsonl.gz", "q.json", "q.csv", "q.tsv.gz", "q.parquet"]))
def test_every_format_round_trips_any_questions(rows, fname):
    recs = [{"id": i, "question": t, "label": lab} for i, t, lab in rows]
    with _dir() as d:
        _write(d / fname, recs)
        got = load_questions(d / fname)
    assert got == [Question(id=i, text=t, label=lab) for i, t, lab in rows]


@pytest.mark.filterwarnings("ignore:.*exact duplicate:UserWarning")  # duplicates are allowed input
@FAST
@given(st.binary(max_size=400), st.sampled_from(["q.jsonl", "q.csv", "q.json", "q.tsv"]))
def test_any_bytes_load_or_give_a_one_line_input_error(data, fname):
    with _dir() as d:
        p = d / fname
        p.write_bytes(data)
        try:
            qs = load_questions(p)
        except InputError as exc:
            _one_line_input_error(exc, p)
            return
    assert qs and len({q.id for q in qs}) == len(qs) and all(q.text.strip() and q.label in (0, 1, None) for q in qs)


JSON_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)
RECORD = st.dictionaries(st.sampled_from(["id", "question", "label", "response", "note", "a\nb"]), JSON_VALUE, max_size=5)


@pytest.mark.filterwarnings("ignore:.*exact duplicate:UserWarning")  # duplicates are allowed input
@FAST
@given(st.lists(RECORD, min_size=1, max_size=6))
def test_any_json_records_load_or_give_a_one_line_input_error(recs):
    with _dir() as d:
        p = d / "q.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        try:
            qs = load_questions(p)
        except InputError as exc:
            _one_line_input_error(exc, p)
            return
    assert all(isinstance(q.text, str) and q.text.strip() and q.label in (0, 1, None) for q in qs)


TRACE_RECORD = st.dictionaries(
    st.sampled_from(["id", "output_logprobs", "output_token_ids", "label", "max_new_tokens", "extra", "question"]),
    st.one_of(
        JSON_VALUE,
        st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4),
        st.dictionaries(st.text(max_size=3), st.lists(st.floats(), max_size=2), max_size=2),
    ),
    max_size=6,
)


@FAST
@given(st.lists(TRACE_RECORD, min_size=1, max_size=5))
def test_any_trace_records_load_or_give_a_one_line_input_error(recs):
    with _dir() as d:
        p = d / "t.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        try:
            traces = read_traces_jsonl(p)
        except InputError as exc:
            _one_line_input_error(exc, p)
            return
    for t in traces:
        assert np.all(np.isfinite(t.output_logprobs)) and np.all(t.output_logprobs <= 0)


# -- the store and the interchange format ----------------------------------------------------------------------------

LOGPROBS32 = st.lists(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False, width=32), max_size=30)
IDS = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@FAST
@given(st.lists(st.tuples(IDS, LOGPROBS32), min_size=1, max_size=5, unique_by=lambda r: r[0]))
def test_store_keeps_ids_and_arrays_bit_for_bit(rows):
    traces = [
        Trace(
            id=i,
            output_ids=np.arange(len(lp)),
            output_logprobs=np.asarray(lp, np.float32),
            finish_reason="length",
            max_new_tokens=30,
        )
        for i, lp in rows
    ]
    with _dir() as d:
        st_ = TraceStore(d / "run", create=True)
        with st_.writer({"x": 1}):
            st_.add_questions([Question(id=i, text=f"text {k}") for k, (i, _) in enumerate(rows)])
            st_.put_traces(traces)
        back = list(st_.traces())
        assert st_.integrity_check() == []
        st_.close()
    assert [t.id for t in back] == [i for i, _ in rows]
    for a, b in zip(back, traces):
        assert a.output_logprobs.tobytes() == b.output_logprobs.tobytes()  # bit for bit, -0.0 and subnormals too
        assert np.array_equal(a.output_ids, b.output_ids)


@FAST
@given(
    st.lists(
        st.tuples(IDS.filter(lambda s: "\x00" not in s), LOGPROBS32, st.sampled_from([0, 1, None])),
        min_size=1,
        max_size=5,
        unique_by=lambda r: r[0],
    )
)
def test_export_then_import_keeps_every_value(rows):
    traces = [Trace(id=i, label=lab, output_logprobs=np.asarray(lp, np.float32)) for i, lp, lab in rows]
    with _dir() as d:
        write_traces_jsonl(d / "t.jsonl", traces)
        back = read_traces_jsonl(d / "t.jsonl")
    assert [(t.id, t.label) for t in back] == [(i, lab) for i, _, lab in rows]
    for a, b in zip(back, traces):
        np.testing.assert_array_equal(a.output_logprobs.astype(np.float32), b.output_logprobs)


# -- TPD ------------------------------------------------------------------------------------------------------------

LOGPROBS = st.lists(st.floats(min_value=-30.0, max_value=0.0), max_size=60)
TAU = st.floats(min_value=1e-3, max_value=1.0)
ALPHA = st.floats(min_value=0.05, max_value=4.0)


def tpd_loop(logprobs, tau, alpha, m):
    """The paper's definition, one token at a time."""
    total, kept = 0.0, 0
    for t, lp in enumerate(logprobs):
        if t >= m:
            break
        p = math.exp(lp)
        if p < tau:
            total += (tau - p) ** alpha
            kept += 1
    return total / kept if kept else 0.0


@FAST
@given(LOGPROBS, TAU, ALPHA, st.integers(1, 80))
def test_tpd_equals_the_formula_token_by_token(lp, tau, alpha, m):
    assert tpd_deviation(lp, tau=tau, alpha=alpha, max_tokens=m) == pytest.approx(
        tpd_loop(lp, tau, alpha, m), rel=1e-9, abs=1e-12
    )


@FAST
@given(LOGPROBS, ALPHA, st.integers(0, 20), st.randoms(use_true_random=False))
def test_tpd_ignores_order_and_certain_tokens(lp, alpha, extra, rnd):
    """With tau = 1, tokens of probability 1 are never kept; within the budget the order does not matter."""
    m = len(lp) + extra
    base = tpd_deviation(lp, alpha=alpha, max_tokens=max(m, 1))
    shuffled = list(lp)
    rnd.shuffle(shuffled)
    assert tpd_deviation(shuffled, alpha=alpha, max_tokens=max(m, 1)) == pytest.approx(base, rel=1e-12, abs=1e-15)
    assert tpd_deviation(list(lp) + [0.0] * extra, alpha=alpha, max_tokens=max(m, 1)) == base


@FAST
@given(LOGPROBS, TAU, ALPHA)
def test_tpd_of_float32_logprobs_matches_float64(lp, tau, alpha):
    """The store keeps float32: TPD from float32 log-probs is within float32 rounding of the float64 value."""
    a = tpd_deviation(np.asarray(lp, np.float64), tau=tau, alpha=alpha)
    b = tpd_deviation(np.asarray(lp, np.float32), tau=tau, alpha=alpha)
    # Tokens within float32 rounding of tau may flip in or out of the kept set: only compare away from that edge.
    p = np.exp(np.asarray(lp, np.float64))
    assume(not np.any(np.abs(p - tau) < 1e-5))
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)


ANY_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 500), st.booleans(), st.text(max_size=3), st.none()
)


@FAST
@given(ANY_NUMBER, ANY_NUMBER, ANY_NUMBER)
def test_tpd_parameter_check_accepts_exactly_the_documented_domain(tau, alpha, m):
    """tau in (0, 1], alpha > 0 and finite, M an integer >= 1; anything else is a ConfigError naming the parameter."""

    def real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    ok = (
        real(tau)
        and 0 < tau <= 1
        and real(alpha)
        and math.isfinite(alpha)
        and alpha > 0
        and real(m)
        and math.isfinite(m)
        and m == int(m)
        and m >= 1
    )
    if ok:
        check_tpd_params(tau=tau, alpha=alpha, max_tokens=m)
    else:
        with pytest.raises(ConfigError, match="TPD (tau|alpha|max_tokens)"):
            check_tpd_params(tau=tau, alpha=alpha, max_tokens=m)


# -- metrics -------------------------------------------------------------------------------------------------------


def _labelled(min_size=2, max_size=30):
    scores = st.lists(st.integers(-20, 20), min_size=min_size, max_size=max_size)
    return scores.flatmap(
        lambda s: st.tuples(
            st.lists(st.integers(0, 1), min_size=len(s), max_size=len(s)).filter(lambda y: 0 < sum(y) < len(y)), st.just(s)
        )
    )


@FAST
@given(_labelled(), st.randoms(use_true_random=False))
def test_metrics_do_not_depend_on_question_order(ys, rnd):
    y, s = ys
    order = list(range(len(y)))
    rnd.shuffle(order)
    y2, s2 = [y[i] for i in order], [s[i] for i in order]
    assert roc_auc(y2, s2) == pytest.approx(roc_auc(y, s), abs=1e-12)
    for reading in ("strict", "paper"):
        assert tpr_at_fpr(y2, s2, fpr=0.05, reading=reading) == tpr_at_fpr(y, s, fpr=0.05, reading=reading)


@FAST
@given(_labelled())
def test_metric_ranges_and_label_flip(ys):
    y, s = ys
    auc = roc_auc(y, s)
    assert 0.0 <= auc <= 1.0
    assert roc_auc([1 - v for v in y], s) == pytest.approx(1.0 - auc, abs=1e-12)
    lo1 = tpr_at_fpr(y, s, fpr=0.01)
    lo5 = tpr_at_fpr(y, s, fpr=0.05)
    assert 0.0 <= lo1 <= lo5 <= 1.0


@settings(deadline=None, max_examples=15)
@given(_labelled(min_size=4))
def test_summary_counts_and_interval(ys):
    y, s = ys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = summarize(y, s, n_resamples=50, seed=0)
        lo, hi = bootstrap_auc_ci(y, s, n_resamples=50, seed=0)
    assert block["n_members"] == sum(y) and block["n_nonmembers"] == len(y) - sum(y)
    assert 0.0 <= lo <= hi <= 1.0
    assert list(block["auc_ci"]) == [lo, hi]
