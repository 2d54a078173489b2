"""Regression tests for what a new user hit in their first hour (issue 'A new user's first hour').

Each test failed on the main branch before the fix: a verdict that depended on what a reused
store already held, a finished run that accepted another model, a Python audit that took scores
of unknown orientation, conflicts refused only after generating, and errors that named internal
Python instead of the command-line remedy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from stand_ins import run_cli

from distill_detect.cli import main


def _main(argv):
    return run_cli(argv, show_warnings=True)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _bench(n=22):
    return [{"id": f"b{i}", "question": f"Tom has {i + 2} apples and buys {i + 5} more. How many now?"} for i in range(n)]


def _ref(n=24):
    return [{"id": f"r{i}", "question": f"Sara runs {i + 3} km a day for {i + 4} days. How far?"} for i in range(n)]


def _tpd(logprobs, m=300):
    from distill_detect.detectors.tpd import tpd_score as tpd_deviation

    return tpd_deviation(np.asarray(logprobs, dtype=np.float32)[:m])


def _stored(run):
    from distill_detect.store import TraceStore

    with TraceStore(run) as st:
        return {t.id: t for t in st.traces()}


# -- 1. one common token budget -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory, tiny_dir):
    """A store whose benchmark traces were decoded at 8 tokens and whose reference traces at 4."""
    d = tmp_path_factory.mktemp("mixed")
    bench, ref = _write(d / "bench.jsonl", _bench()), _write(d / "ref.jsonl", _ref())
    run = d / "run"
    for path, cap in ((bench, 8), (ref, 4)):
        rc, _, err = _main(["generate", "--model", str(tiny_dir), "--questions", str(path), "--out", str(run),
                            "--max-new-tokens", str(cap), "--no-prompt-logprobs"])  # fmt: skip
        assert rc == 0, err
    stored = _stored(run)
    assert {t.num_tokens for i, t in stored.items() if i.startswith("b")} == {8}  # the random model never ends its turn
    assert {t.num_tokens for i, t in stored.items() if i.startswith("r")} == {4}
    return {"dir": d, "bench": bench, "ref": ref, "run": run, "stored": stored}


def test_audit_over_a_reused_store_reads_every_trace_at_one_budget(mixed_store, tmp_path):
    s = mixed_store
    out = tmp_path / "a"
    rc, _, err = _main(["audit", "--run", str(s["run"]), "--questions", str(s["bench"]), "--reference", str(s["ref"]),
                        "--out", str(out), "--max-new-tokens", "4", "--no-report"])  # fmt: skip
    assert rc == 0, err
    doc = json.loads((out / "audit.json").read_text())
    assert doc["max_new_tokens"] == 4
    for row in doc["questions"]:  # every benchmark score reads the first 4 tokens, like the reference's
        assert row["raw_score"] == pytest.approx(_tpd(s["stored"][row["id"]].output_logprobs[:4]), abs=1e-9)


def test_audit_refuses_traces_cut_by_an_older_lower_cap_naming_them(mixed_store, tmp_path):
    s = mixed_store
    rc, out, err = _main(["audit", "--run", str(s["run"]), "--questions", str(s["bench"]), "--reference", str(s["ref"]),
                          "--out", str(tmp_path / "a"), "--max-new-tokens", "8", "--no-report"])  # fmt: skip
    assert rc == 2, out + err
    line = err.strip().splitlines()[-1]
    assert "cut at 4 tokens" in line and "r0" in line and "--max-new-tokens 4" in line
    assert not (tmp_path / "a" / "audit.json").exists()


def test_score_reads_traces_of_different_caps_at_their_common_budget_and_says_so(mixed_store, tmp_path):
    s = mixed_store
    rc, _, err = _main(["score", "--run", str(s["run"]), "--out", str(tmp_path / "s"), "--no-report"])
    assert rc == 0, err
    assert "common budget of 4 tokens" in err
    rows = [json.loads(x) for x in (tmp_path / "s" / "scores.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["tpd"] == pytest.approx(_tpd(s["stored"][r["id"]].output_logprobs[:4]), abs=1e-9)
    rc, _, err = _main(["score", "--run", str(s["run"]), "--out", str(tmp_path / "s8"), "--max-new-tokens", "8"])
    assert rc == 2 and "cut at 4 tokens" in err


def test_run_over_a_reused_out_reads_the_requested_budget(tmp_path, tiny_dir):
    m, n = _write(tmp_path / "m.jsonl", _bench(6)), _write(tmp_path / "n.jsonl", _ref(6))
    base = ["run", "--model", str(tiny_dir), "--members", str(m), "--nonmembers", str(n), "--out", str(tmp_path / "o"),
            "--no-report", "--no-prompt-logprobs", "--bootstrap", "0"]  # fmt: skip
    assert _main(base + ["--max-new-tokens", "8"])[0] == 0
    rc, _, err = _main(base + ["--max-new-tokens", "3"])
    assert rc == 0, err
    stored = _stored(tmp_path / "o" / "run")
    rows = [json.loads(x) for x in (tmp_path / "o" / "scores.jsonl").read_text().splitlines()]
    for r in rows:  # the stored traces hold 8 tokens; the scores read 3
        assert stored[r["id"]].num_tokens == 8
        assert r["tpd"] == pytest.approx(_tpd(stored[r["id"]].output_logprobs[:3]), abs=1e-9)


def test_trace_at_budget_cuts_output_aligned_arrays_only():
    from distill_detect.types import Trace

    t = Trace(id="a", output_logprobs=[-0.1, -0.2, -0.3], output_ids=[5, 6, 7], prompt_logprobs=[-1.0, -2.0],
              finish_reason="stop", max_new_tokens=10,
              extra={"reference_output_logprobs": np.array([-1.0, -2.0, -3.0]), "lowercase_prompt_logprobs": np.array([-4.0])})  # fmt: skip
    c = t.at_budget(2)
    assert c.output_ids.tolist() == [5, 6] and c.output_logprobs.tolist() == pytest.approx([-0.1, -0.2])
    assert c.extra["reference_output_logprobs"].tolist() == [-1.0, -2.0]
    assert c.extra["lowercase_prompt_logprobs"].tolist() == [-4.0] and c.prompt_logprobs.tolist() == [-1.0, -2.0]
    assert (c.finish_reason, c.max_new_tokens) == ("length", 2)
    assert t.at_budget(3) is t and t.at_budget(50) is t


# -- 2. a finished run and another model -----------------------------------------------------------


def test_a_finished_run_refuses_another_model_before_saying_already_stored(tmp_path, tiny_dir, qwen2_dir):
    q = _write(tmp_path / "q.jsonl", _bench(3))
    run = str(tmp_path / "run")
    assert _main(["generate", "--model", str(tiny_dir), "--questions", str(q), "--out", run, "--max-new-tokens", "3"])[0] == 0
    rc, out, err = _main(["generate", "--model", str(qwen2_dir), "--questions", str(q), "--out", run, "--max-new-tokens", "3"])
    assert rc == 2, out + err
    assert "different settings" in err and "model" in err and "already stored" not in err


# -- 3. the Python audit and score orientation -------------------------------------------------------


def test_python_audit_refuses_scores_of_unknown_orientation_and_orients_raw_tpd():
    from distill_detect.audit import audit
    from distill_detect.errors import ConfigError

    rng = np.random.default_rng(0)
    ref_tpd = rng.uniform(0.4, 0.6, 40)
    bench_tpd = np.r_[rng.uniform(0.0, 0.1, 10), rng.uniform(0.4, 0.6, 10)]  # half of it very certain: members
    ids = [f"q{i}" for i in range(20)]
    with pytest.raises(ConfigError, match="orientation"):
        audit(ids, bench_tpd, ref_tpd, n_boot=0)
    res = audit(ids, bench_tpd, ref_tpd, method="tpd", n_boot=0)
    assert res.contaminated and res.dataset.pvalue < 1e-3
    same = audit(ids, -bench_tpd, -ref_tpd, higher_is_member=True, n_boot=0)
    assert same.pvalues.tolist() == res.pvalues.tolist()


# -- 4, 5. refused before any model time; missing prompt data filled in ------------------------------


def test_run_refuses_a_method_its_settings_cannot_feed_before_generating(tmp_path, tiny_dir):
    m, n = _write(tmp_path / "m.jsonl", _bench(3)), _write(tmp_path / "n.jsonl", _ref(3))
    rc, out, err = _main(["run", "--model", str(tiny_dir), "--members", str(m), "--nonmembers", str(n),
                          "--out", str(tmp_path / "o"), "--no-prompt-logprobs", "--methods", "loss", "--max-new-tokens", "2"])  # fmt: skip
    assert rc == 2, out + err
    assert "--no-prompt-logprobs" in err and "loss" in err
    assert not (tmp_path / "o" / "run").exists()


def test_prompt_logprobs_are_filled_into_a_run_made_without_them(tmp_path, tiny_dir):
    q = _write(tmp_path / "q.jsonl", _bench(4))
    base = ["generate", "--model", str(tiny_dir), "--questions", str(q), "--max-new-tokens", "3"]
    assert _main(base + ["--out", str(tmp_path / "a"), "--no-prompt-logprobs"])[0] == 0
    assert all(t.prompt_logprobs is None for t in _stored(tmp_path / "a").values())
    rc, _, err = _main(base + ["--out", str(tmp_path / "a")])
    assert rc == 0, err
    assert "prompt log-probabilities" in err
    assert _main(base + ["--out", str(tmp_path / "b")])[0] == 0
    a, b = _stored(tmp_path / "a"), _stored(tmp_path / "b")
    for i in b:
        assert a[i].prompt_ids.tolist() == b[i].prompt_ids.tolist()
        np.testing.assert_allclose(a[i].prompt_logprobs, b[i].prompt_logprobs, atol=1e-4)
        np.testing.assert_allclose(a[i].prompt_std_logp, b[i].prompt_std_logp, atol=1e-4)
        assert a[i].output_ids.tolist() == b[i].output_ids.tolist()


# -- 8, 9, 10. messages that say what to do -----------------------------------------------------------


def test_a_jsonl_file_holding_a_json_array_says_to_name_it_json(tmp_path):
    from distill_detect.data import load_questions
    from distill_detect.errors import InputError

    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps([{"question": "a?"}, {"question": "b?"}]), encoding="utf-8")
    with pytest.raises(InputError, match=r"JSON array.*\.json"):
        load_questions(p)
    p.write_text('[\n  {"question": "a?"},\n  {"question": "b?"}\n]\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"JSON array.*\.json"):
        load_questions(p)


def test_make_reference_on_a_small_benchmark_gives_the_right_advice(tmp_path):
    q = _write(tmp_path / "q.jsonl", _bench(10))
    rc, out, err = _main(["audit", "--questions", str(q), "--make-reference", "--out", str(tmp_path / "o")])
    assert rc == 2, out + err
    assert "add known-unseen questions" not in err
    assert "--reference" in err and "10" in err


@pytest.mark.parametrize(
    "need",
    [
        "prompt_logprobs",
        "prompt_stats",
        "extra:lowercase_prompt_logprobs",
        "extra:reference_output_logprobs",
        "extra:dcpdd_token_freq",
    ],
)
def test_missing_data_messages_name_the_command_line_remedy_not_internal_python(need):
    from distill_detect.detectors.checks import source_of

    msg = source_of(need)
    for internal in ("distill_detect.", "GenConfig", "Backend.", "_pass"):
        assert internal not in msg, msg
    assert "--" in msg  # a flag or a command the user can run


def test_unknown_flag_gets_a_did_you_mean(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--memebrs", "a.jsonl"])
    assert e.value.code == 2
    assert "did you mean --members" in capsys.readouterr().err.lower()


def test_audit_and_score_share_the_method_spelling(tmp_path, mixed_store):
    s = mixed_store
    for flags in (["--methods", "tpd", "--tpd-tokens", "3"], ["--method", "tpd", "--param", "tpd.max_tokens=3"]):
        out = tmp_path / "-".join(flags).replace("=", "_").replace(".", "_")
        rc, _, err = _main(["audit", "--run", str(s["run"]), "--questions", str(s["bench"]), "--reference", str(s["ref"]),
                            "--out", str(out), "--max-new-tokens", "4", "--no-report", *flags])  # fmt: skip
        assert rc == 0, err
        assert json.loads((out / "audit.json").read_text())["params"]["max_tokens"] == 3
    rc, _, err = _main(["export", "--run", str(s["run"]), "--out", str(tmp_path / "t.jsonl")])
    assert rc == 0, err


def test_tpr_from_few_nonmembers_is_flagged_where_it_is_printed():
    from distill_detect.scoring import format_table

    block = {"auc": 0.7, "auc_ci": [0.5, 0.9], "tpr_at_1pct_fpr": 0.2, "tpr_at_1pct_fpr_strict": 0.1,
             "tpr_at_5pct_fpr": 0.3, "tpr_at_5pct_fpr_strict": 0.3, "n_members": 8, "n_nonmembers": 8}  # fmt: skip
    text = format_table({"tpd": block})
    assert "8 non-members" in text and "100" in text
