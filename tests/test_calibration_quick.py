"""``benchmarks/calibration.py --quick``: the calibration machinery end to end on a tiny random model.

Checks the files and their shapes, not the numbers (a random model detects nothing).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("calibration_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_calibration_writes_results(tmp_path, capsys):
    cal = _load_script()
    res = tmp_path / "results"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cal.main(["--quick", "--work", str(tmp_path / "work"), "--results", str(res)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in res.iterdir()) == ["calibration_quick.json", "calibration_quick.md", "calibration_quick.png"]

    cfg = cal.QUICK
    fractions, draws, seeds = cfg["fractions"], cfg["draws"], [0, 1]
    doc = json.loads((res / "calibration_quick.json").read_text())
    h = doc["header"]
    assert h["quick"] is True and h["seeds"] == seeds and h["wall_time_s"] > 0 and h["machine"] and h["package_version"]
    assert doc["config"]["n_bench"] == cfg["n_bench"] and doc["config"]["fractions"] == list(fractions)
    assert set(doc["design"]) == {"contamination_control", "why", "correlation"}

    assert [s["seed"] for s in doc["students"]] == seeds
    for s in doc["students"]:
        assert {"auc_members_vs_unseen", "detectable_factor", "final_train_loss", "times"} <= set(s)
        assert s["times"]["finetune_s"] > 0 and s["times"]["generate_s"] > 0

    # One row per (seed, fraction, draw); the truth and the audit's answers side by side.
    rows = doc["draws"]
    assert len(rows) == len(seeds) * len(fractions) * draws
    for r in rows:
        assert r["true_fraction"] == round(r["fraction"] * cfg["n_bench"]) / cfg["n_bench"]
        assert 0 <= r["estimate"] <= 1 and 0 < r["pvalue"] <= 1 and r["ci_low"] <= r["ci_high"]
        assert r["true_flags"] + r["false_flags"] == r["n_flagged"] and r["true_flags"] <= r["n_members"]

    # Summary: per seed and pooled ("all"), one row per fraction.
    summ = doc["summary"]
    assert [(r["seed"], r["fraction"]) for r in summ] == [(s, f) for s in [*seeds, "all"] for f in fractions]
    for r in summ:
        rej = r["rejection"]
        assert 0 <= rej["rate"] <= 1 and rej["ci95"][0] <= rej["rate"] <= rej["ci95"][1]
        assert rej["n"] == draws * (len(seeds) if r["seed"] == "all" else 1)
        assert 0 <= r["realised_fdr"] <= 1 and 0 <= r["ci_coverage_true"] <= 1
    assert sum("false-positive rate at 0%" in c for c in doc["checks"]) == len(seeds) + 1
    assert any(c.startswith("power at 10.0%") for c in doc["checks"]) and any("realised FDR" in c for c in doc["checks"])

    md = (res / "calibration_quick.md").read_text()
    for needle in ("controlled on the benchmark side", "correlated", "CPU budget", "| true fraction |", "wall time", "machine:"):
        assert needle in md
    assert "calibration_quick.png" in md
    png = (res / "calibration_quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # The dataset test alone on many clean benchmarks per seed: its false-positive rate with a tight interval.
    assert sorted(doc["null_check"]) == ["0", "1"]
    for r in doc["null_check"].values():
        assert r["n"] == cfg["null_draws"] and 0 <= r["rate"] <= 1 and r["ci95"][0] <= r["rate"] <= r["ci95"][1]
    assert sum("clean benchmarks redrawn" in c for c in doc["checks"]) == len(seeds)

    # A re-run reuses the students and traces and reports the times of the run that made them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cal.main(["--quick", "--work", str(tmp_path / "work"), "--results", str(res)]) == 0
    capsys.readouterr()
    again = json.loads((res / "calibration_quick.json").read_text())
    for a, b in zip(again["students"], doc["students"]):
        assert a["times"]["finetune_s"] == b["times"]["finetune_s"] and a["times"]["generated_tokens"] > 0
    assert again["draws"] == doc["draws"]
