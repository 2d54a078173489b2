"""``distill-detect audit`` end to end on the tiny random Llama: the verdict line, the files it
writes, reruns that cost no generation (another FDR, another reference, ``--from``),
``--make-reference``, and user errors as one line with exit status 2."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from stand_ins import run_cli

MAX_NEW = 12
TPD_M = 4  # TPD alone decodes only its budget: traces stop at M tokens, not at --max-new-tokens
VERDICT = re.compile(
    r"^(contaminated|no evidence of contamination): estimated \d+% of questions \(95% CI \d+–\d+%\); "
    r"\d+ of (\d+) questions flagged at FDR ([\d.]+)%; dataset test p = \S+$"
)


def _bench_rows():
    rows = [{"id": str(i), "question": f"Tom has {i + 2} apples and buys {i + 5} more. How many apples now?"} for i in range(22)]
    rows.append({"id": "words", "question": "What is the capital of France?"})  # no number: --make-reference drops it
    return rows


def _ref_rows(start=0, n=24):
    # Numbered like the benchmark (ids "0", "1", ...): the store keeps them apart with the ref: prefix.
    return [{"id": str(i), "question": f"Sara runs {i + 3} km a day for {i + 4} days. How far?"} for i in range(start, start + n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _main(argv):
    return run_cli(argv, show_warnings=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit-files")
    return {
        "dir": d,
        "bench": _write(d / "bench.jsonl", _bench_rows()),
        "ref": _write(d / "ref.jsonl", _ref_rows()),
    }


@pytest.fixture(scope="module")
def first(files, tiny_dir):
    out = files["dir"] / "audit"
    argv = ["audit", "--model", str(tiny_dir), "--questions", str(files["bench"]), "--reference", str(files["ref"])]
    argv += ["--out", str(out), "--max-new-tokens", str(MAX_NEW), "--param", f"tpd.max_tokens={TPD_M}", "--bootstrap", "200"]
    rc, stdout, stderr = _main(argv)
    assert rc == 0, stderr
    return {"out": out, "stdout": stdout, "stderr": stderr, "argv": argv}


@pytest.fixture()
def count_generation(monkeypatch):
    """Count the questions any backend generates (make_backend is looked up at call time)."""
    import distill_detect.backends as B

    seen: list[str] = []
    real = B.make_backend

    def counting(*a, **k):
        be = real(*a, **k)
        gen = be.generate

        def generate(batch, **kw):
            seen.extend(q.id for q in batch)
            return gen(batch, **kw)

        be.generate = generate
        return be

    monkeypatch.setattr(B, "make_backend", counting)
    return seen


def test_verdict_first_then_files(first):
    out, lines = first["out"], first["stdout"].splitlines()
    m = VERDICT.match(lines[0])
    assert m, lines[0]
    assert m.group(2) == "23" and m.group(3) == "5"
    assert any("AUC benchmark vs reference" in x for x in lines) and any("LOWER bound" in x for x in lines)
    assert any("flags none or at least" in x for x in lines)

    doc = json.loads((out / "audit.json").read_text())
    assert doc["verdict"] == lines[0]
    assert doc["n_bench"] == 23 and doc["n_ref"] == 24 and doc["method"] == "tpd" and doc["params"]["max_tokens"] == TPD_M
    assert doc["source"]["fingerprint"]["model"]["content_hash"] and doc["package_version"] and doc["seed"] == 0
    assert doc["reference"]["source"].endswith("ref.jsonl") and doc["reference"]["kind"] == "file"
    assert doc["fraction"]["is_lower_bound"] is True and doc["min_flaggable"] >= 1
    assert [q["id"] for q in doc["questions"]] == [r["id"] for r in _bench_rows()]
    for q in doc["questions"]:
        assert 0 < q["pvalue"] <= 1 and q["score"] == pytest.approx(-q["raw_score"])  # TPD: lower = member

    with open(out / "audit_questions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 23 and list(rows[0]) == [
        "rank",
        "index",
        "id",
        "flagged",
        "pvalue",
        "qvalue",
        "score",
        "raw_score",
        "question",
    ]
    assert [float(r["pvalue"]) for r in rows] == sorted(float(r["pvalue"]) for r in rows)

    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 47
    assert all("label" not in r for r in scores[:23]) and all(r["label"] == 0 and r["id"].startswith("ref:") for r in scores[23:])

    sets = json.loads((out / "audit_sets.json").read_text())
    assert len(sets["benchmark"]["ids"]) == 23 and sets["reference"]["ids"][0] == "ref:0"

    html = (out / "report.html").read_text(encoding="utf-8")
    assert '"audit": {' in html and doc["verdict"].split(";")[0] in html


def test_tpd_only_decodes_its_budget(first):
    from distill_detect.pipeline import read_run

    traces, _, counts = read_run(first["out"] / "run")
    assert counts["traces"] == 47
    assert max(t.num_tokens for t in traces) <= TPD_M and all(t.max_new_tokens == TPD_M for t in traces)


def test_other_fdr_and_reference_cost_no_generation_for_stored_questions(first, files, count_generation):
    argv = list(first["argv"])
    argv[argv.index("--out") + 1] = str(files["dir"] / "audit-fdr")
    # Same run directory: point --run at the first audit's store.
    argv += ["--run", str(first["out"] / "run"), "--fdr", "0.1", "--no-report"]
    rc, stdout, _ = _main(argv)
    assert rc == 0 and count_generation == []
    assert "at FDR 10%" in stdout.splitlines()[0]

    # A second reference: 20 stored questions and 4 new ones; only the new ones are generated.
    ref2 = _write(files["dir"] / "ref2.jsonl", _ref_rows(4, 24))
    argv[argv.index("--reference") + 1] = str(ref2)
    rc, stdout, stderr = _main(argv)
    assert rc == 0, stderr
    assert sorted(count_generation) == sorted(f"ref:{i}" for i in range(24, 28))


def test_from_redoes_statistics_without_a_model(first, files, monkeypatch):
    import distill_detect.backends as B

    def refuse(*a, **k):
        raise AssertionError("--from must not load a model")

    monkeypatch.setattr(B, "make_backend", refuse)
    out2 = files["dir"] / "audit-from"
    rc, stdout, _ = _main(["audit", "--from", str(first["out"]), "--alpha", "0.5", "--out", str(out2), "--no-report"])
    assert rc == 0
    a = json.loads((first["out"] / "audit.json").read_text())
    b = json.loads((out2 / "audit.json").read_text())
    assert b["alpha"] == 0.5 and stdout.splitlines()[0] == b["verdict"]
    assert [q["pvalue"] for q in a["questions"]] == [q["pvalue"] for q in b["questions"]]
    assert b["dataset_test"]["pvalue"] == a["dataset_test"]["pvalue"]
    # --fail-if-contaminated: status 1 exactly when the verdict is "contaminated".
    rc, _, _ = _main(
        ["audit", "--from", str(first["out"]), "--alpha", "0.5", "--out", str(out2), "--no-report", "--fail-if-contaminated"]
    )
    assert rc == (1 if b["contaminated"] else 0)


def test_make_reference(first, files, tiny_dir, count_generation):
    out = files["dir"] / "audit-perturbed"
    argv = ["audit", "--model", str(tiny_dir), "--questions", str(files["bench"]), "--make-reference", "--out", str(out)]
    argv += ["--run", str(first["out"] / "run"), "--max-new-tokens", str(MAX_NEW), "--param", f"tpd.max_tokens={TPD_M}"]
    rc, stdout, stderr = _main(argv + ["--bootstrap", "50", "--no-report"])
    assert rc == 0, stderr
    assert "dropped 1 benchmark question(s) with no number to change" in stderr
    rows = [json.loads(x) for x in (out / "reference.perturbed.jsonl").read_text().splitlines()]
    assert len(rows) == 22 and all(r["id"].endswith("-perturbed") for r in rows)
    bench_text = {r["question"] for r in _bench_rows()}
    assert not any(r["question"] in bench_text for r in rows)
    # The benchmark was stored by the first audit: only the perturbed questions are generated.
    assert sorted(count_generation) == sorted("ref:" + r["id"] for r in rows)
    doc = json.loads((out / "audit.json").read_text())
    assert doc["reference"]["kind"] == "perturbed" and doc["reference"]["dropped"] == ["words"] and doc["n_ref"] == 22
    assert VERDICT.match(stdout.splitlines()[0]) and "caution: a perturbed reference" in stdout


COMBINED = ["tpd", "out_max_prob", "out_ppl"]


def test_combined_audit(first, files, tmp_path, count_generation, monkeypatch):
    """--combine: several detectors' cross-fitted combination; the verdict names it, the statistics equal
    audit.audit_combined on the detectors' stored raw scores, and --from redoes it without a model."""
    from distill_detect.audit import audit_combined

    ref = _write(tmp_path / "ref48.jsonl", _ref_rows(0, 24) + _ref_rows(200, 24))  # 24 stored by the first audit + 24 new
    out = tmp_path / "combined"
    argv = ["audit", "--model", first["argv"][2], "--run", str(first["out"] / "run"), "--questions", str(files["bench"])]
    argv += ["--reference", str(ref), "--out", str(out), "--methods", ",".join(COMBINED), "--combine", "--fdr", "0.2"]
    argv += ["--max-new-tokens", str(MAX_NEW), "--bootstrap", "50"]
    argv += [x for m in COMBINED for x in ("--param", f"{m}.max_tokens={TPD_M}")]  # read what the first audit decoded
    rc, stdout, stderr = _main(argv)
    assert rc == 0, stderr
    assert sorted(count_generation) == sorted(f"ref:{i}" for i in range(200, 224))
    lines = stdout.splitlines()
    assert lines[0].endswith("; scores: cross-fitted combination of tpd, out_max_prob, out_ppl (2 folds)"), lines[0]
    assert VERDICT.match(lines[0].split("; scores: ")[0])
    assert any("Bonferroni over 2 folds" in x for x in lines) and any("BH within each of 2 folds at FDR 10%" in x for x in lines)
    assert any("learned without labels" in x for x in lines)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "cross-fitted combination of tpd, out_max_prob, out_ppl" in html

    doc = json.loads((out / "audit.json").read_text())
    assert doc["method"] == "combined:" + ",".join(COMBINED) and doc["params"] == {"folds": 2, "C": 0.1, "seed": 0}
    assert list(doc["detector_params"]) == COMBINED and doc["detector_params"]["out_ppl"]["max_tokens"] == TPD_M
    assert doc["higher_is_member"] is True
    c = doc["combination"]
    assert c["detectors"] == COMBINED and c["folds"] == 2 and np.sum(c["fold_sizes"], axis=0).tolist() == [23, 48]
    assert doc["min_pvalue"] == pytest.approx(1 / 25) and "cross-fitted" in doc["notes"][0]
    assert all(q["score"] == q["raw_score"] and q["fold"] in (0, 1) for q in doc["questions"])
    # Twin: the same statistics from the detectors' raw scores in scores.jsonl.
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    x = np.array([[r[m] for m in COMBINED] for r in rows])
    want = audit_combined([r["id"] for r in rows[:23]], x[:23], x[23:], methods=COMBINED, fdr=0.2, n_boot=50)
    assert [q["pvalue"] for q in doc["questions"]] == pytest.approx(want.pvalues.tolist())
    assert doc["dataset_test"]["pvalue"] == pytest.approx(want.dataset.pvalue) and doc["verdict"] == want.verdict()

    # --from: the stored combination again, other level, no model.
    import distill_detect.backends as B

    monkeypatch.setattr(B, "make_backend", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no model for --from")))
    rc, stdout, stderr = _main(["audit", "--from", str(out), "--fdr", "0.3", "--out", str(tmp_path / "again"), "--no-report"])
    assert rc == 0, stderr
    again = json.loads((tmp_path / "again" / "audit.json").read_text())
    assert again["method"] == doc["method"] and again["detector_params"] == doc["detector_params"] and again["fdr"] == 0.3
    assert [q["pvalue"] for q in again["questions"]] == [q["pvalue"] for q in doc["questions"]]


@pytest.mark.parametrize(
    "extra, needle",
    [
        ([], "give exactly one of --reference"),
        (["--reference", "REF", "--make-reference"], "give exactly one of --reference"),
        (["--reference", "OVERLAP"], "also in the benchmark"),
        (["--reference", "FEW"], "need at least 20"),
        (["--reference", "REF", "--fdr", "0.01"], "need at least 99"),
        (["--reference", "REF", "--fdr", "1.5"], "--fdr must be in (0, 1)"),
        (["--reference", "REF", "--method", "tpd,loss"], "one detector"),
        (["--reference", "REF", "--methods", "tpd,loss", "--combine"], "need at least 78"),
        (["--reference", "REF", "--methods", "tpd", "--combine"], "at least two different detectors"),
        (["--reference", "REF", "--combine"], "name the detectors to combine"),
        (["--reference", "missing.jsonl"], "missing.jsonl: file not found"),
    ],
)
def test_user_errors_are_one_line_exit_2(files, tmp_path, monkeypatch, extra, needle):
    monkeypatch.chdir(tmp_path)
    bench = _bench_rows()
    paths = {
        "REF": str(files["ref"]),
        "OVERLAP": str(_write(tmp_path / "overlap.jsonl", _ref_rows() + [{"id": "x", "question": bench[3]["question"]}])),
        "FEW": str(_write(tmp_path / "few.jsonl", _ref_rows(0, 5))),
    }
    extra = [paths.get(x, x) for x in extra]
    rc, _, err = _main(
        ["audit", "--model", "/nonexistent/never-loaded", "--questions", str(files["bench"]), "--out", "o", *extra]
    )
    err = err.strip()
    assert rc == 2 and err.startswith("distill-detect: error:") and needle in err and "\n" not in err, err


def test_errors_about_stored_traces(first, files, tmp_path):
    # --run without --model: every audited question must already be stored.
    new_ref = _write(tmp_path / "new.jsonl", _ref_rows(100, 24))
    rc, _, err = _main(
        [
            "audit",
            "--run",
            str(first["out"] / "run"),
            "--questions",
            str(files["bench"]),
            "--reference",
            str(new_ref),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "24 of 47 audited questions have no complete trace" in err and err.count("\n") == 1
    # A finished run never stands in for another model.
    rc, _, err = _main(first["argv"][:2] + ["default"] + first["argv"][3:])
    last = err.strip().splitlines()[-1]  # one error line (after the budget note), checked before any model is loaded
    assert rc == 2 and last.startswith("distill-detect: error:") and "different settings" in last and "model" in last
    rc, _, err = _main(["audit", "--from", str(tmp_path)])
    assert rc == 2 and "no audit_sets.json" in err


def test_audit_section_in_the_browser(first):
    """The report's audit section renders (verdict, one row per benchmark question) with no console error."""
    import os
    import shutil

    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    sync_api = pytest.importorskip("playwright.sync_api") if path else None
    if not path or sync_api is None:
        pytest.skip("needs chromium and playwright (bash scripts/ci_browser.sh)")
    doc = json.loads((first["out"] / "audit.json").read_text())
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((first["out"] / "report.html").as_uri())
        page.wait_for_selector("#audit-table tbody tr")
        assert page.inner_text("#audit-verdict") == doc["verdict"]
        assert page.locator("#audit-table tbody tr").count() == doc["n_bench"]
        browser.close()
    assert errors == []
