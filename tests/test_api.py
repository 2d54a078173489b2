"""The Python API is the product: the CLI is its thin client and both give the same numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import distill_detect as dd
from distill_detect.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    m = _write(
        d / "m.jsonl", [{"id": f"m{i}", "question": f"Ann has {i + 3} pens and loses {i + 1}. How many left?"} for i in range(6)]
    )
    n = _write(
        d / "n.jsonl", [{"id": f"n{i}", "question": f"A car drives {i + 40} km in {i + 2} hours. Speed?"} for i in range(6)]
    )
    return d, m, n


def test_run_in_five_lines_gives_the_cli_numbers(sets, tiny_dir):
    d, m, n = sets
    res = dd.run(
        m, n, out=d / "py", model=str(tiny_dir), methods="tpd,out_ppl,loss", gen=dd.GenConfig(max_new_tokens=6), bootstrap=100
    )
    assert set(res.metrics) == {"tpd", "out_ppl", "loss"} and res.metrics["tpd"]["n_members"] == 6
    assert res.labels == [1] * 6 + [0] * 6 and len(res.raw["tpd"]) == 12
    assert "tpd" in res.table() and (d / "py" / "report.html").exists()
    argv = ["run", "--model", str(tiny_dir), "--members", str(m), "--nonmembers", str(n), "--out", str(d / "cli"),
            "--methods", "tpd,out_ppl,loss", "--max-new-tokens", "6", "--bootstrap", "100", "--no-report"]  # fmt: skip
    assert main(argv) == 0
    cli = json.loads((d / "cli" / "metrics.json").read_text())["methods"]
    for name in res.metrics:
        assert cli[name]["auc"] == res.metrics[name]["auc"] and cli[name]["auc_ci"] == res.metrics[name]["auc_ci"]
    # TPD's raw scores, and their orientation for a membership score.
    np.testing.assert_array_equal(res.membership("tpd"), -res.raw["tpd"])


def test_score_and_audit_from_python(sets, tiny_dir):
    d, m, n = sets
    g = dd.generate(m, d / "store", model=str(tiny_dir), gen=dd.GenConfig(max_new_tokens=4))
    assert g["generated"] == 6 and g["already_done"] == 0
    again = dd.generate(m, d / "store", model=dd.ModelSettings(model=str(tiny_dir)), gen=dd.GenConfig(max_new_tokens=4))
    assert again["generated"] == 0 and again["already_done"] == 6
    s = dd.score(d / "store", methods=["tpd"], params={"tpd": {"alpha": 1.0}})
    assert s.metrics is None and s.methods["tpd"]["alpha"] == 1.0 and len(s.ids) == 6
    ref = [dd.Question(id=f"r{i}", text=f"Bob reads {i + 5} pages a day for {i + 2} days. How many pages?") for i in range(20)]
    rep = dd.audit(m, ref, out=d / "audit", model=str(tiny_dir), gen=dd.GenConfig(max_new_tokens=4), bootstrap=50, report=False)
    assert rep.verdict().split(":")[0] in ("contaminated", "no evidence of contamination")
    assert len(rep.result.pvalues) == 6 and (d / "audit" / "audit.json").exists()


def test_the_example_script_runs(tmp_path, tiny_dir):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "api_quickstart.py"), str(tiny_dir)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tpd" in r.stdout and "contamina" in r.stdout.split("outputs in")[0]


def test_api_names_stay_functions_after_their_namesake_modules_are_imported():
    import distill_detect.audit
    import distill_detect.finetune  # noqa: F401
    from distill_detect.api import audit
    from distill_detect.finetune import finetune

    assert dd.audit is audit and dd.finetune is finetune
    assert sys.modules["distill_detect.audit"].audit is not audit  # the statistics function, in its module
