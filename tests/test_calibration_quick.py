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


def _file_digests(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _reproduce_like_student(root: Path, cal) -> tuple[Path, list, list]:
    """A tiny student laid out as benchmarks/reproduce.py leaves one: ``student/`` fine-tuned on members[:8] of
    ``draw_split(pool_size=40, seed=3)`` and ``results/run`` holding its 8 members and 8 non-members at 6 tokens."""
    from distill_detect import api
    from distill_detect.data import load_questions
    from distill_detect.experiment import cpu_float32, draw_split
    from distill_detect.finetune import FinetuneConfig, finetune
    from distill_detect.types import GenConfig

    tiny = cal.build_tiny(root / "tiny")
    _, members, nonmembers, _ = draw_split(load_questions("bundled:gsm8k_gpt3", require_response=True), pool_size=40, seed=3)
    wd = root / "repro"
    ft = FinetuneConfig(epochs=1, learning_rate=1e-3, per_device_batch_size=4, max_seq_len=192, max_steps=2, seed=3)
    finetune(str(tiny), members[:8], wd / "student", ft, progress=False)
    gen = GenConfig(max_new_tokens=6, batch_size=12)
    api.generate(members[:8] + nonmembers, wd / "results" / "run", model=cpu_float32(str(wd / "student")), gen=gen)
    return wd, members[:8], nonmembers


def test_quick_reused_students(tmp_path, capsys):
    """--students: a reproduce.py student reused (never written), the sol_loss pass run, TPD and sol_loss on the same draws."""
    import pytest

    cal = _load_script()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wd, members, nonmembers = _reproduce_like_student(tmp_path, cal)
        before = _file_digests(wd)
        res, work = tmp_path / "results", tmp_path / "work"
        argv = ["--quick", "--methods", "sol_loss", "--work", str(work), "--results", str(res)]
        assert cal.main([*argv, "--students", f"t3={wd}"]) == 0
        # The training data's hash decides which questions are members: another seed's split is refused.
        with pytest.raises(SystemExit, match="data hash"):
            cal.main([*argv, "--students", f"t3={wd},4"])
    capsys.readouterr()
    assert _file_digests(wd) == before  # the reproduce work dir is only read
    assert sorted(p.name for p in res.iterdir()) == [f"calibration_sol_quick.{x}" for x in ("json", "md", "png")]

    cfg = cal.QUICK
    doc = json.loads((res / "calibration_sol_quick.json").read_text())
    assert doc["config"]["methods"] == ["tpd", "sol_loss"] and doc["config"]["pool"] == cal.REUSE_QUICK["pool"]
    (st,) = doc["students"]
    assert st["name"] == "t3" and st["seed"] == 3 and st["copied_store"] is True
    assert st["member_ids"] == [q.id for q in members] and st["unseen_ids"][:8] == [q.id for q in nonmembers]
    assert len(st["unseen_ids"]) == cfg["unseen"] and not set(st["member_ids"]) & set(st["unseen_ids"])
    # 16 traces reused from the stored run (6 tokens, read at 4); the 20 other unseen questions generated here.
    assert st["times"]["reused_traces"] == 16 and st["times"]["generated_questions"] == 20
    assert st["stored_caps"] == {"6": 16, str(cfg["max_new_tokens"]): 20}
    for m in ("tpd", "sol_loss"):
        p = st["methods"][m]
        assert 0 <= p["auc_members_vs_unseen"] <= 1 and p["auc_ci"][0] <= p["auc_ci"][1]
        assert len(st["scores"][m]["member"]) == 8 and len(st["scores"][m]["unseen"]) == cfg["unseen"]
    assert "vs_tpd" in st["methods"]["sol_loss"] and "vs_tpd" not in st["methods"]["tpd"]
    assert st["scores"]["sol_loss"]["member"] != st["scores"]["tpd"]["member"]

    # Paired: every method audited on the same draws (same questions per draw).
    rows = doc["draws"]
    assert len(rows) == 2 * len(cfg["fractions"]) * cfg["draws"]
    by = {}
    for r in rows:
        by.setdefault((r["fraction"], r["draw"]), {})[r["method"]] = r["draw_id"]
    assert all(len(v) == 2 and len(set(v.values())) == 1 for v in by.values())
    assert len({r["draw_id"] for r in rows if r["method"] == "tpd"}) > 1
    for d in doc["methods"].values():
        assert [(r["seed"], r["fraction"]) for r in d["summary"]] == [(s, f) for s in ("t3", "all") for f in cfg["fractions"]]
        assert sum("false-positive rate at 0%" in c for c in d["checks"]) == 2
    assert [r["fraction"] for r in doc["methods"]["sol_loss"]["paired_vs_tpd"]] == list(cfg["fractions"])
    for d in doc["methods"].values():  # at least one BH flag: a rate with its interval per fraction
        assert sorted(d["any_flag"], key=float) == [str(f) for f in cfg["fractions"]]
        assert all(r["n"] == cfg["draws"] and r["ci95"][0] <= r["rate"] <= r["ci95"][1] for r in d["any_flag"].values())

    md = (res / "calibration_sol_quick.md").read_text()
    for needle in (
        "development seed",
        "ARE the text the students were distilled on",
        "final answers",
        "| sol_loss |",
        "same draws",
    ):
        assert needle in md
    assert (res / "calibration_sol_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
