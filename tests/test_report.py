"""The report's numbers, its escaping, the ablation sweep and the ``report`` subcommand (no model, no browser)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_detect.ablation import ALPHAS, MAX_TOKENS, TAUS, tpd_ablation, write_ablations
from distill_detect.detectors.tpd import tpd_score
from distill_detect.metrics import bootstrap_auc_ci, roc_auc, tpr_at_fpr
from distill_detect.report import data as D
from distill_detect.report.build import collect, embed_json, render_html, write_report
from distill_detect.types import Trace

HOSTILE = [
    "<script>document.title='pwned'</script>",
    '"><img src=x onerror="document.title=\'pwned\'">',
    "</textarea><b>bold</b> & </script >",
]


class FakeTokenizer:
    """Decodes id i to the text 'w{i} ' (and one hostile piece), as a tokenizer's decode would."""

    def decode(self, ids, **kw):
        (i,) = ids
        return "</script>" if i == 7 else f"w{i} "


def make_traces(n_mem=6, n_non=5, *, seed=0, unlabelled=0, length=40) -> list[Trace]:
    """Members get confident tokens, non-members less so; token ids cycle through 0..9."""
    rng = np.random.default_rng(seed)
    out = []
    labels = [1] * n_mem + [0] * n_non + [None] * unlabelled
    for i, lab in enumerate(labels):
        spread = 0.05 if lab == 1 else 0.3
        p = np.clip(1 - np.abs(rng.normal(0, spread, size=length)), 1e-4, 1.0)
        p[0] = 1.0  # one token exactly at p = 1: never enters TPD with tau = 1
        text = HOSTILE[i % len(HOSTILE)] if i < len(HOSTILE) else f"question {i}: what is {i} + {i}?"
        out.append(
            Trace(
                id=f"q{i}",
                output_logprobs=np.log(p),
                output_ids=np.arange(length) % 10,
                question=text,
                label=lab,
                finish_reason="length",
                max_new_tokens=length,
            )
        )
    return out


def write_results(tmp_path, traces, methods=("tpd", "out_ppl", "out_max_prob"), params=None):
    """A results directory as 'score --traces' writes it: traces file, scores.jsonl, metrics.json."""
    from distill_detect.pipeline import score_and_write
    from distill_detect.scoring import resolve_methods
    from distill_detect.traceio import write_traces_jsonl

    tfile = tmp_path / "traces.jsonl"
    write_traces_jsonl(tfile, traces)
    resolved = resolve_methods(list(methods), params or {})
    out = tmp_path / "results"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score_and_write(traces, resolved, out, {"source": {"traces": str(tfile)}, "methods": resolved}, n_resamples=50)
    return out


@pytest.fixture()
def results(tmp_path):
    traces = make_traces()
    return write_results(tmp_path, traces, params={"tpd": {"max_tokens": 30}}), traces


# -- figure data --------------------------------------------------------------------------------------


def test_histogram_counts_sum_to_questions_per_class(results):
    out, traces = results
    doc = collect(out, tokenizer=FakeTokenizer())
    assert {m["name"] for m in doc["methods"]} == {"tpd", "out_ppl", "out_max_prob"}
    for m in doc["methods"]:
        h = m["hist"]
        assert sum(h["counts"]["member"]) == 6
        assert sum(h["counts"]["nonmember"]) == 5
        assert len(h["edges"]) == len(h["counts"]["member"]) + 1
        assert h["edges"] == sorted(h["edges"])


def test_histogram_constant_and_nonfinite_values():
    h = D.histogram([2.0, 2.0, np.nan], {"a": np.array([True, True, True])})
    assert h["edges"] == [1.5, 2.5] and h["counts"]["a"] == [2] and h["dropped"] == 1


def test_roc_endpoints_and_area_match_metrics(results):
    out, traces = results
    doc = collect(out, tokenizer=FakeTokenizer())
    metrics = json.loads((out / "metrics.json").read_text())["methods"]
    for m in doc["methods"]:
        f, t = m["roc"]["fpr"], m["roc"]["tpr"]
        assert (f[0], t[0]) == (0.0, 0.0) and (f[-1], t[-1]) == (1.0, 1.0)
        assert all(np.diff(f) >= 0) and all(np.diff(t) >= 0)
        assert np.trapezoid(t, f) == pytest.approx(metrics[m["name"]]["auc"], abs=1e-6)


def test_roc_of_tpd_is_oriented_lower_is_member():
    # Members have the lowest TPD: perfectly separated after orientation.
    raw = np.array([0.1, 0.2, 0.8, 0.9])
    pts = D.roc_points([1, 1, 0, 0], D.oriented(raw, higher=False))
    assert np.trapezoid(pts["tpr"], pts["fpr"]) == 1.0
    assert D.roc_points([1, 1], [0.1, 0.2]) is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=40),
    st.lists(st.integers(0, 6), min_size=0, max_size=40),
    st.sampled_from([0.01, 0.05, 0.1, 0.25, 0.5]),
)
def test_verdict_threshold_keeps_fpr_at_or_below_level(neg, pos, level):
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))].astype(int)
    s = np.r_[neg, pos].astype(float)  # small integers: many ties
    v = D.verdicts(y, s, levels=(level,))[f"{level:g}"]
    flags = np.array(v["flag"], dtype=bool)
    assert flags[y == 0].mean() <= level + 1e-12
    assert v["fpr"] == flags[y == 0].mean()
    # Tightness: lowering the threshold to the next distinct non-member score would break the level.
    below = np.sort(np.unique(np.array(neg, dtype=float)))
    below = below[below < v["threshold"]]
    if below.size:
        assert (np.array(neg) > below[-1]).mean() > level


def test_verdicts_in_report_use_raw_sign_and_nonmembers_only(results):
    out, traces = results
    doc = collect(out, tokenizer=FakeTokenizer())
    tpd = next(m for m in doc["methods"] if m["name"] == "tpd")
    scores = np.array([q["scores"]["tpd"] for q in doc["questions"]])
    labels = np.array([q["label"] for q in doc["questions"]])
    for v in tpd["verdicts"].values():
        flags = np.array(v["flag"], dtype=bool)
        # TPD: lower = member, so the flag is "raw score below the raw threshold".
        assert (flags == (scores < v["threshold_raw"])).all()
        assert flags[labels == 0].mean() <= v["level"]


def test_token_rows_first_m_tokens_and_tpd_membership(results):
    out, traces = results
    doc = collect(out, tokenizer=FakeTokenizer())
    tok = doc["tokens"]
    assert tok["M"] == 30 and tok["tau"] == 1.0
    assert tok["vocab"]["3"] == "w3 " and tok["vocab"]["7"] == "</script>"
    for t, row in zip(traces, tok["rows"]):
        p = np.exp(t.output_logprobs.astype(np.float64)[:30])
        assert row["ids"] == list(range(10)) * 3
        assert np.allclose(row["p"], p, rtol=1e-5)
        assert row["in"] == "".join("1" if x < 1.0 else "0" for x in p)
        assert row["in"][0] == "0" and row["more"] == 10
        # The report's "entered TPD" tokens give back the TPD score itself.
        kept = p[[c == "1" for c in row["in"]]]
        assert np.mean((1 - kept) ** 0.6) == pytest.approx(tpd_score(t.output_logprobs, max_tokens=30))
    th = doc["token_hist"]
    assert th["tokens"] == {"member": 6 * 30, "nonmember": 5 * 30}
    assert sum(th["counts"]["member"]) == 180
    assert sum(th["fractions"]["nonmember"]) == pytest.approx(1.0)


def test_no_tokenizer_falls_back_to_ids(results):
    out, _ = results
    doc = collect(out)  # the traces file names no model
    assert doc["tokens"]["available"] and doc["tokens"]["vocab"] is None
    assert "tokenizer" in doc["meta"]["tokenizer"]


def test_unlabelled_results_have_no_roc_and_no_verdicts(tmp_path):
    traces = make_traces(0, 0, unlabelled=4)
    out = write_results(tmp_path, traces)
    assert not (out / "metrics.json").exists()
    doc = collect(out, traces=traces, tokenizer=FakeTokenizer())
    assert doc["has_labels"] is False
    for m in doc["methods"]:
        assert m["roc"] is None and m["verdicts"] == {} and sum(m["hist"]["counts"]["unlabelled"]) == 4
    assert doc["token_hist"]["tokens"] == {"unlabelled": 160}
    assert write_report(out, traces=traces, figures=False).exists()


def test_unlabelled_questions_get_verdicts_from_labelled_nonmembers(tmp_path):
    traces = make_traces(3, 20, unlabelled=3)
    out = write_results(tmp_path, traces)
    doc = collect(out, tokenizer=FakeTokenizer())
    v = next(m for m in doc["methods"] if m["name"] == "tpd")["verdicts"]["0.05"]
    assert len(v["flag"]) == 26
    assert sum(v["flag"][3:23]) <= 1  # at most 5% of 20 non-members


def test_missing_traces_warn_and_still_report(results, tmp_path):
    out, _ = results
    (tmp_path / "traces.jsonl").unlink()
    with pytest.warns(UserWarning, match="could not read the traces"):
        doc = collect(out)
    assert doc["tokens"]["available"] is False and doc["token_hist"] is None
    assert all(q["text"] is None for q in doc["questions"])


def test_missing_scores_is_a_user_error(tmp_path):
    from distill_detect.errors import DistillDetectError

    with pytest.raises(DistillDetectError, match="no scores.jsonl"):
        collect(tmp_path)


def test_unknown_method_columns_are_kept(results):
    out, _ = results
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["someone_elses_method"] = float(i)
    (out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = collect(out, tokenizer=FakeTokenizer())
    m = next(m for m in doc["methods"] if m["name"] == "someone_elses_method")
    assert m["higher_is_member"] is None and m["roc"] is None and sum(m["hist"]["counts"]["member"]) == 6


# -- what the header and the cards say ------------------------------------------------------------------


FP = {
    "backend": "hf",
    "model": {"name": "student", "content_hash": "0123456789abcdef01234567"},
    "dtype": "float32",
    "device": "cpu",
}


def _finetuned_checkpoint(tmp_path):
    """A directory as 'distill-detect finetune' leaves it (config.json and the finetune marker; no weights needed)."""
    ck = tmp_path / "student"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    base = {"spec": "default", "location": "/x/default", "identity": {"name": "SmolLM2-135M-Instruct", "gguf_sha256": "ab"}}
    (ck / "distill_detect_finetune.json").write_text(json.dumps({"format": 1, "base_model": base, "config": {"lora": False}}))
    return ck


def _rewrite_config(out, **extra):
    doc = json.loads((out / "metrics.json").read_text())
    doc["config"].update(extra)
    (out / "metrics.json").write_text(json.dumps(doc))


def test_model_line_names_the_model_not_its_directory(results, tmp_path):
    out, _ = results
    ck = _finetuned_checkpoint(tmp_path)
    src = json.loads((out / "metrics.json").read_text())["config"]["source"]
    _rewrite_config(out, source={**src, "fingerprint": FP}, model_location=str(ck))
    meta = collect(out, tokenizer=FakeTokenizer())["meta"]
    assert meta["model"] == f"SmolLM2-135M-Instruct fine-tune at {ck} (hf, float32, cpu)"
    # A plain checkpoint directory: its architecture and where it is.
    (ck / "distill_detect_finetune.json").unlink()
    assert collect(out, tokenizer=FakeTokenizer())["meta"]["model"] == f"llama checkpoint at {ck} (hf, float32, cpu)"
    # Gone from disk: the fingerprint still identifies it, never as a bare 'student'.
    _rewrite_config(out, model_location=str(tmp_path / "moved"))
    line = collect(out, tokenizer=FakeTokenizer())["meta"]["model"]
    assert line == f"checkpoint directory 'student' (content hash 0123456789ab), was at {tmp_path / 'moved'} (hf, float32, cpu)"
    hub = {**FP, "model": {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "9f3e1c2ab"}, "device": "cuda"}
    _rewrite_config(out, source={**src, "fingerprint": hub}, model_location="HuggingFaceTB/SmolLM2-135M-Instruct")
    line = collect(out, tokenizer=FakeTokenizer())["meta"]["model"]
    assert line == "HuggingFaceTB/SmolLM2-135M-Instruct from the Hugging Face hub at revision 9f3e1c2 (hf, float32, cuda)"


def test_model_location_comes_from_the_run_store(tmp_path):
    """An audit directory has no model_location: the run's store says where the model was loaded from."""
    from distill_detect.store import TraceStore

    ck = _finetuned_checkpoint(tmp_path)
    run = tmp_path / "run"
    with TraceStore(run, create=True) as st:
        st.set_meta("model", {"backend": "hf", "location": str(ck)})
    out = write_audit_results(tmp_path, source={"run": str(run), "fingerprint": FP})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the store holds no traces
        meta = collect(out)["meta"]
    assert meta["model"] == f"SmolLM2-135M-Instruct fine-tune at {ck} (hf, float32, cpu)"


def run_audit(*args, **kw):
    """``distill_detect.audit.audit`` on membership scores (higher = member), stated where the API asks for it."""
    import inspect

    from distill_detect.audit import audit

    if "higher_is_member" in inspect.signature(audit).parameters:
        kw["higher_is_member"] = True
    return audit(*args, **kw)


def write_audit_results(tmp_path, n_bench=12, n_ref=8, *, source=None):
    """An audit directory as 'distill-detect audit' writes it: scores.jsonl (no metrics.json) and audit.json."""
    from distill_detect.scoring import write_outputs
    from distill_detect.traceio import write_traces_jsonl

    ts = make_traces(0, n_ref, unlabelled=n_bench, seed=5)
    ref, bench = ts[:n_ref], ts[n_ref:]
    ref = [Trace(**{**t.__dict__, "id": "ref:" + t.id}) for t in ref]
    traces = bench + ref
    tfile = tmp_path / "audit_traces.jsonl"
    write_traces_jsonl(tfile, traces)
    raw = np.array([tpd_score(t.output_logprobs, max_tokens=30) for t in traces])
    res = run_audit([t.id for t in bench], -raw[:n_bench], -raw[n_bench:], fdr=0.1, alpha=0.05, n_boot=50)
    doc = res.to_dict()
    for row, r in zip(doc["questions"], raw[:n_bench]):
        row["raw_score"] = float(r)
    source = source or {"traces": str(tfile), "fingerprint": FP}
    doc.update(
        {
            "method": "tpd",
            "params": {"tau": 1.0, "alpha": 0.6, "max_tokens": 30},
            "higher_is_member": False,
            "benchmark": {"source": "bench.jsonl", "n": n_bench},
            "reference": {"source": "ref.jsonl", "kind": "file", "n": n_ref},
            "model": "student",
            "source": source,
            "created": "2025-01-01T00:00:00Z",
        }
    )
    out = tmp_path / "audit"
    out.mkdir()
    (out / "audit.json").write_text(json.dumps(D.finite_or_none(doc)))
    write_outputs(out, traces, {"tpd": raw}, None, {"source": source, "methods": {"tpd": doc["params"]}})
    return out


def _card_text(doc) -> str:
    return " | ".join(f"{c['k']} {c['v']} {c.get('s') or ''} {c.get('warn') or ''}" for c in doc["cards"])


def test_audit_cards_speak_of_benchmark_and_reference_questions(tmp_path):
    out = write_audit_results(tmp_path)
    doc = collect(out, tokenizer=FakeTokenizer())
    assert doc["kind"] == "audit"
    cards = {c["k"]: c for c in doc["cards"]}
    assert cards["benchmark questions"]["v"] == "12" and cards["reference questions"]["v"] == "8"
    text = _card_text(doc)
    assert "member" not in text and "distillation data" not in text and "never trained on" not in text
    # Charts and the table name the groups as what they are in an audit.
    assert doc["group_names"] == {"member": "members", "nonmember": "reference questions", "unlabelled": "benchmark questions"}
    assert doc["label_names"] == {"0": "reference", "none": "benchmark"}


def test_labelled_cards_keep_members_and_nonmembers(results):
    out, _ = results
    doc = collect(out, tokenizer=FakeTokenizer())
    assert doc["kind"] == "labelled"
    cards = {c["k"]: c for c in doc["cards"]}
    assert cards["members"]["v"] == "6" and cards["non-members"]["v"] == "5"
    assert doc["group_names"]["nonmember"] == "non-members"


def test_tpr_from_few_nonmembers_carries_a_warning(results, tmp_path):
    out, _ = results  # 5 non-members
    doc = collect(out, tokenizer=FakeTokenizer())
    cards = {c["k"]: c for c in doc["cards"]}
    for k, level in (("tpd TPR@1%FPR", "1%"), ("tpd TPR@5%FPR", "5%")):
        assert cards[k]["warn"] == f"from 5 non-members: under 100, a TPR at {level} FPR means little (0 false positives allowed)"
    for m in doc["methods"]:
        assert set(m["tpr_caveat"]) == {"0.01", "0.05"} and "from 5 non-members" in m["tpr_caveat"]["0.01"]
        for v in m["verdicts"].values():
            assert v["caveat"].startswith("from 5 non-members")
    # 100 non-members or more: no warning.
    many = write_results(tmp_path / "many", make_traces(4, 100, length=12), methods=("tpd",))
    doc = collect(many, tokenizer=FakeTokenizer())
    assert all(not c.get("warn") for c in doc["cards"])
    assert doc["methods"][0]["tpr_caveat"] == {"0.01": None, "0.05": None}


def test_tpr_caveat_wording():
    assert D.tpr_caveat(8, 0.01) == "from 8 non-members: under 100, a TPR at 1% FPR means little (0 false positives allowed)"
    assert D.tpr_caveat(40, 0.05) == "from 40 non-members: under 100, a TPR at 5% FPR means little (2 false positives allowed)"
    assert D.tpr_caveat(100, 0.01) is None and D.tpr_caveat(None, 0.01) is None


# -- escaping -------------------------------------------------------------------------------------------


def _data_block(html: str) -> str:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert m
    return m.group(1)


def test_embed_json_cannot_close_the_script_block():
    doc = {"q": HOSTILE, "k<>&": "</SCRIPT><!-- \u2028 \u2029"}
    s = embed_json(doc)
    assert not re.search(r"[<>&\u2028\u2029]", s)
    assert json.loads(s) == doc


def test_report_html_keeps_hostile_text_inside_the_json(results):
    out, traces = results
    html = write_report(out, tokenizer=FakeTokenizer(), figures=False).read_text(encoding="utf-8")
    assert html.count("<script") == 2 and html.count("</script>") == 2
    block = _data_block(html)
    parsed = json.loads(block)
    assert [q["text"] for q in parsed["questions"][:3]] == HOSTILE
    for bad in HOSTILE + ["<img", "</textarea>"]:
        assert bad not in html
    # Only the page's own script may run: the CSP names its sha256.
    import base64
    import hashlib

    js = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(js.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in html
    assert "default-src 'none'" in html


def test_script_never_parses_data_as_html():
    from pathlib import Path

    import distill_detect.report as R

    js = (Path(R.__file__).parent / "report.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js
    html = render_html({"meta": {}, "methods": [], "questions": []})
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html


# -- figures and the page --------------------------------------------------------------------------------


def test_write_report_with_figures_and_ablations(results):
    pytest.importorskip("matplotlib")
    out, traces = results
    write_ablations(out, tpd_ablation(traces, max_tokens=(5, 30, 100), taus=(0.9, 1.0), alphas=(0.6, 1.0), n_resamples=20))
    path = write_report(out, tokenizer=FakeTokenizer())
    assert path == out / "report.html"
    names = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert names == ["roc.png", "score_histograms.png", "token_probabilities.png", "tpd_ablations.png"]
    for p in (out / "figures").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    doc = json.loads(_data_block(path.read_text(encoding="utf-8")))
    assert [p["value"] for p in doc["ablations"]["sweeps"]["max_tokens"]] == [5, 30, 100]


# -- ablation ---------------------------------------------------------------------------------------------


def test_ablation_shapes_and_a_point_equal_to_the_direct_metric():
    traces = make_traces(8, 7, seed=3, length=60)
    res = tpd_ablation(traces, n_resamples=30)
    assert res["defaults"] == {"tau": 1.0, "alpha": 0.6, "max_tokens": 300}
    assert (res["n_members"], res["n_nonmembers"], res["longest_trace"]) == (8, 7, 60)
    assert [p["value"] for p in res["sweeps"]["max_tokens"]] == list(MAX_TOKENS)
    assert [p["value"] for p in res["sweeps"]["tau"]] == list(TAUS)
    assert [p["value"] for p in res["sweeps"]["alpha"]] == list(ALPHAS)
    keys = {"value", "auc", "auc_ci", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_strict", "tpr_at_5pct_fpr"}
    for pts in res["sweeps"].values():
        for p in pts:
            assert keys <= set(p)
    # M = 50, the others at their defaults, computed directly:
    y = np.array([t.label for t in traces])
    s = -np.array([tpd_score(t.output_logprobs, tau=1.0, alpha=0.6, max_tokens=50) for t in traces])
    pt = next(p for p in res["sweeps"]["max_tokens"] if p["value"] == 50)
    assert pt["auc"] == roc_auc(y, s)
    assert pt["tpr_at_1pct_fpr"] == tpr_at_fpr(y, s, fpr=0.01, reading="paper")
    assert pt["tpr_at_1pct_fpr_strict"] == tpr_at_fpr(y, s, fpr=0.01, reading="strict")
    assert pt["tpr_at_5pct_fpr"] == tpr_at_fpr(y, s, fpr=0.05)
    assert pt["auc_ci"] == pytest.approx(list(bootstrap_auc_ci(y, s, n_resamples=30)))
    # Budgets past the longest trace read the same tokens: same numbers, and flagged.
    big = [p for p in res["sweeps"]["max_tokens"] if p["value"] >= 60]
    assert all(p["beyond_longest"] for p in big) and len({p["auc"] for p in big}) == 1
    # The three sweeps meet at the defaults.
    at_default = [next(p for p in res["sweeps"][k] if p["value"] == res["defaults"][k]) for k in ("max_tokens", "tau", "alpha")]
    assert len({p["auc"] for p in at_default}) == 1


def test_ablation_hand_checked_point():
    # Members: one token at p = 0.9 -> TPD = 0.1 ** alpha; non-members p = 0.4 -> 0.6 ** alpha.
    ts = [
        Trace(id=str(i), output_logprobs=np.log([p]), label=lab)
        for i, (p, lab) in enumerate([(0.9, 1), (0.9, 1), (0.4, 0), (0.4, 0)])
    ]
    res = tpd_ablation(ts, taus=(0.3, 1.0), max_tokens=(1,), alphas=(1.0,), n_resamples=0)
    tau = {p["value"]: p for p in res["sweeps"]["tau"]}
    assert tau[1.0]["auc"] == 1.0 and tau[1.0]["tpr_at_5pct_fpr"] == 1.0
    # tau = 0.3 keeps no token anywhere: every TPD is 0, all tie.
    assert tau[0.3]["auc"] == 0.5 and "auc_ci" not in tau[0.3]


def test_write_ablations_one_class_gives_null_not_nan(tmp_path):
    ts = make_traces(4, 0)
    with pytest.warns(UserWarning):
        res = tpd_ablation(ts, max_tokens=(10,), taus=(1.0,), alphas=(0.6,), n_resamples=5)
    path = write_ablations(tmp_path, res)
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["sweeps"]["tau"][0]["auc"] is None


def test_ablation_rejects_bad_grid_values():
    from distill_detect.errors import ConfigError

    with pytest.raises(ConfigError, match="tau"):
        tpd_ablation(make_traces(2, 2), taus=(1.5,))


# -- CLI --------------------------------------------------------------------------------------------------


def test_report_subcommand(results, monkeypatch, capsys):
    from distill_detect import cli

    out, _ = results
    assert "distill_detect.report" in cli.EXTRA_COMMANDS  # the real CLI has the subcommand
    assert cli.main(["report", str(out), "--ablations", "--no-figures"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out / "report.html")
    ab = json.loads((out / "ablations.json").read_text())
    assert set(ab["sweeps"]) == {"max_tokens", "tau", "alpha"}
    assert cli.main(["report", str(out / "nope")]) == 2
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    assert "distill-detect report results/demo" in capsys.readouterr().out


def test_importing_the_report_is_light():
    code = (
        "import sys, distill_detect.report, distill_detect.ablation, distill_detect.report.build;"
        "heavy = [m for m in ('matplotlib', 'sklearn', 'torch', 'transformers', 'scipy') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""
