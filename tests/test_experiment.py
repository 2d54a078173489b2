"""The whole protocol (split, distil, generate, passes, every detector, blind baseline, report) on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill_detect.experiment import student_experiment

ALL = [
    "tpd",
    "tpd_ref",
    "out_ppl",
    "out_min_k",
    "out_entropy",
    "out_max_prob",
    "loss",
    "zlib",
    "lowercase",
    "min_k",
    "min_k_pp",
    "dc_pdd",
    "reference",
]


@pytest.mark.slow
def test_protocol_in_miniature_on_tiny_model(tmp_path, tiny_dir):
    cfg = dict(
        data="bundled:gsm8k_gpt3",
        epochs=1,
        learning_rate=1e-3,
        batch_size=4,
        max_seq_len=256,
        gen_batch=8,
        train_on="evaluated",
        base=str(tiny_dir),
    )
    res = student_experiment(cfg, seed=42, work=tmp_path / "w", methods=ALL, pool_size=20, max_new_tokens=8)
    assert res["sizes"] == {
        "pool": 20,
        "members": 16,
        "nonmembers": 4,
        "trained_on": 4,
        "evaluated": 8,
        "members_dropped_too_long": 0,
    }
    assert set(res["metrics"]) == set(ALL) | {"blind"}
    for name, m in res["metrics"].items():
        assert m["n_members"] == 4 and m["n_nonmembers"] == 4, name
        assert 0.0 <= m["auc"] <= 1.0, name
    out = Path(res["out"])
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]) == {"id", "label", "blind", *ALL}
    assert (out / "report.html").exists() and (out / "ablations.json").exists()
    # The student really was trained from the tiny base, and the reference pass used that base.
    assert res["train"]["final_train_loss"] > 0
    # Rerunning reuses the finished fine-tune and the stored traces: no new generation.
    again = student_experiment(cfg, seed=42, work=tmp_path / "w", methods=ALL, pool_size=20, max_new_tokens=8, report=False)
    assert again["times"]["generated_tokens"] == 0
    assert again["metrics"]["tpd"]["auc"] == res["metrics"]["tpd"]["auc"]


def test_reproduce_script_help():
    r = subprocess.run(
        [sys.executable, "benchmarks/reproduce.py", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[1],
    )
    assert r.returncode == 0 and "--config" in r.stdout and "quick" in r.stdout


@pytest.mark.slow
def test_sweep_splits_over_processes_and_gathers(tmp_path, tiny_dir, monkeypatch):
    """Settings computed by separate calls (as separate processes would) are gathered by a last call."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import reproduce

    monkeypatch.setitem(reproduce.SWEEP, "pool", 20)
    monkeypatch.setitem(reproduce.SWEEP, "max_new_tokens", 6)
    monkeypatch.setitem(
        reproduce.SWEEP,
        "settings",
        [{"name": "a-e1", "epochs": 1, "learning_rate": 1e-3}, {"name": "b-e2", "epochs": 2, "learning_rate": 1e-3}],
    )
    monkeypatch.setattr(reproduce, "SWEEP_METHODS", ["tpd", "out_ppl", "loss"])
    cfg = dict(data="bundled:gsm8k_gpt3", epochs=1, learning_rate=1e-3, batch_size=4, max_seq_len=256, gen_batch=8,
               train_on="evaluated", base=str(tiny_dir))  # fmt: skip
    work, results = tmp_path / "w", tmp_path / "r"
    results.mkdir()
    first = reproduce.sweep(cfg, seed=1, work=work, only={"b-e2"})
    assert [r["name"] for r in first] == ["b-e2"] and first[0]["epochs"] == 2
    reproduce.write_sweep(first, name="t", cfg=cfg, seed=1, results=results)
    assert "Not run yet: a-e1" in (results / "t_sweep.md").read_text()
    reproduce.sweep(cfg, seed=1, work=work, only={"a-e1"})
    saved = json.loads((work / "sweep" / "b-e2" / "sweep_row.json").read_text())
    gathered = reproduce.sweep(cfg, seed=1, work=work, only=set())  # computes nothing, gathers both
    assert [r["name"] for r in gathered] == ["a-e1", "b-e2"] and gathered[1] == saved
    assert gathered[0]["final_train_loss"] > gathered[1]["final_train_loss"] > 0  # two epochs fit harder than one
    reproduce.write_sweep(gathered, name="t", cfg=cfg, seed=1, results=results)
    doc = json.loads((results / "t_sweep.json").read_text())
    assert doc["config"]["missing_settings"] == [] and (results / "t_sweep.png").stat().st_size > 0
    assert "Not run yet" not in (results / "t_sweep.md").read_text()


def test_draw_split_drops_only_members_that_cannot_be_trained():
    """A predicate drops rejected members after the split; non-members stay; a draw whose evaluated members
    all pass is the draw made without it (so seed 42's MATH evaluation set did not change)."""
    from distill_detect.experiment import draw_split
    from distill_detect.types import Question

    qs = [Question(id=f"q{i}", text="x" * (i % 7), response="r") for i in range(60)]
    pool, members, nonmembers, evaluation = draw_split(qs, pool_size=50, seed=3)
    long_member = members[0].id
    kept = draw_split(qs, pool_size=50, seed=3, keep=lambda q: q.id != long_member)
    assert kept[0] == pool and kept[2] == nonmembers
    assert long_member not in [q.id for q in kept[1]] and long_member not in [q.id for q in kept[3]]
    assert [q.id for q in kept[3][: len(nonmembers)]] == [q.id for q in members[1 : len(nonmembers) + 1]]
    unevaluated = members[-1].id  # not among the first n members: the evaluation set is unchanged
    same = draw_split(qs, pool_size=50, seed=3, keep=lambda q: q.id != unevaluated)
    assert [q.id for q in same[3]] == [q.id for q in evaluation]
