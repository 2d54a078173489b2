"""Beyond the paper, in one page: gather the committed result files into ``beyond.md``/``.json`` and a figure.

    python benchmarks/beyond_summary.py        # reads benchmarks/results/*.json, writes beyond.{md,json,png}

Nothing is computed from a model here: every number is read from the JSON files the experiment
scripts wrote from real runs (``beyond.py`` for development and confirmation, ``studies.py``,
``crossfit.py``, ``calibration.py``, ``black_box.py``). The issue's targets are checked against
those numbers in code, so the verdicts in the page cannot drift from the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

NEW = ("sol_loss", "sol_ratio", "wbc", "ref_imbalance", "combined_a", "combined_b")
"""The detectors built for this issue (``tpd_ref`` existed before)."""
NEEDS_TRAINING_TEXT = {"sol_loss", "sol_ratio", "combined_b"}
"""Detectors that score the text the student was distilled on: they need the auditor to hold it."""
SHOWN = (
    "sol_loss",
    "sol_ratio",
    "combined_b",
    "combined_a",
    "wbc",
    "tpd_ref",
    "ref_imbalance",
    "tpd",
    "out_max_prob",
    "out_ppl",
    "out_min_k",
    "loss",
    "min_k_pp",
)

TARGETS = {
    "gsm8k": {"auc": 0.80, "tpr_strict": 0.20},
    "math": {"auc": 0.70},
    "memorising_gap": 0.01,
}


def _load(name: str):
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def _f(x, pct=False) -> str:
    if x is None or x != x:
        return "n/a"
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}"


def students() -> list[dict]:
    """Every student of the development and confirmation phases: name, phase, info, per-method metrics."""
    out = []
    for phase in ("dev", "confirm"):
        doc = _load(f"beyond_{phase}.json")
        for name, st in (doc or {}).get("students", {}).items():
            out.append({"name": name, "phase": phase, "info": st["info"], "methods": st["table"]["methods"],
                        "n": (st["table"]["n_members"], st["table"]["n_nonmembers"])})  # fmt: skip
    return out


def add_combined(sts: list[dict]) -> None:
    """Add the cross-fitted combinations (``crossfit.py``) as methods ``combined_a``/``combined_b`` of the same
    students (matched by results directory). Their AUCs are out-of-fold: no question scored by a function
    fitted on it."""
    doc = _load("beyond_crossfit.json") or {}
    by_dir = {st["info"]["results"]: st for st in sts}
    for cf in doc.get("students", {}).values():
        st = by_dir.get(cf["info"]["results"])
        if st is None:
            continue
        for k, b in cf["eval"]["combined"].items():
            st["methods"][f"combined_{k}"] = b


def check_targets(sts: list[dict]) -> list[dict]:
    """The issue's targets, each with what reached it (or how far the best got)."""
    rows = []
    for st in sts:
        if st["phase"] != "confirm":
            continue
        math = "math" in st["name"]
        goal = TARGETS["math"] if math else TARGETS["gsm8k"]
        ok, best_any, best_free = [], None, None
        for m, b in st["methods"].items():
            if m == "tpd":
                continue
            reached = b["auc"] >= goal["auc"] and ("tpr_strict" not in goal or b["tpr_at_1pct_fpr_strict"] >= goal["tpr_strict"])
            if reached:
                ok.append(m)
            if best_any is None or b["auc"] > st["methods"][best_any]["auc"]:
                best_any = m
            if m not in NEEDS_TRAINING_TEXT and (best_free is None or b["auc"] > st["methods"][best_free]["auc"]):
                best_free = m
        goal_s = f"AUC >= {goal['auc']:.2f}" + (f", strict TPR@1%FPR >= {goal['tpr_strict']:.0%}" if "tpr_strict" in goal else "")
        rows.append({"student": st["name"], "target": goal_s, "reached_by": ok, "best": best_any, "best_without_training_text": best_free,
                     "tpd_auc": st["methods"]["tpd"]["auc"]})  # fmt: skip
    for st in sts:
        if "e10" not in st["name"]:
            continue
        tpd = st["methods"]["tpd"]["auc"]
        gaps = {m: st["methods"][m]["auc"] - tpd for m in NEW if m in st["methods"]}
        rows.append({"student": st["name"], "target": f"memorising: no new detector more than {TARGETS['memorising_gap']} below TPD",
                     "gaps": gaps, "reached_by": [m for m, g in gaps.items() if g >= -TARGETS["memorising_gap"]], "tpd_auc": tpd})  # fmt: skip
    return rows


def figure(sts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / max(len(sts), 1)
    for k, st in enumerate(sts):
        xs, ys, lo, hi = [], [], [], []
        for i, m in enumerate(SHOWN):
            b = st["methods"].get(m)
            if b is None:
                continue
            xs.append(i + (k - (len(sts) - 1) / 2) * width)
            ys.append(b["auc"])
            lo.append(b["auc"] - b["auc_ci"][0])
            hi.append(b["auc_ci"][1] - b["auc"])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, capsize=2, label=f"{st['name']} ({st['phase']})")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(SHOWN)), SHOWN, rotation=35, ha="right")
    ax.set_ylabel("AUC (95% bootstrap CI)")
    ax.set_title("Members vs non-members, per detector and student")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(st: dict, m: str | None) -> str:
    """One detector's AUC, interval and strict TPR@1%FPR on one student."""
    if m is None:
        return "n/a"
    b = st["methods"][m]
    return (
        f"{m} {_f(b['auc'])} [{_f(b['auc_ci'][0])}, {_f(b['auc_ci'][1])}], strict TPR@1% {_f(b['tpr_at_1pct_fpr_strict'], True)}"
    )


def markdown(sts: list[dict], targets: list[dict], extra: dict) -> str:
    out = [
        "# Beyond the paper: detecting distillation before the student has memorised",
        "",
        "Generated by `benchmarks/beyond_summary.py` from the committed result files; every number comes from a real",
        "run of SmolLM2-135M-Instruct students on this repository's 2-core CPU machine. Development (seed 42) and",
        "confirmation (seeds and data no detector was developed on, hyperparameters fixed in code before) are",
        "kept apart. Details, intervals and DeLong tests per student: [beyond_dev.md](beyond_dev.md),",
        "[beyond_confirm.md](beyond_confirm.md).",
        "",
        "## Targets (issue #14), checked in code",
        "",
        "| student | target | reached by | best detector | best without the training text | TPD |",
        "|---|---|---|---|---|---|",
    ]
    by_name = {s["name"]: s for s in sts}
    for t in targets:
        st = by_name[t["student"]]
        if "gaps" in t:
            gaps = ", ".join(f"{m} {g:+.3f}" for m, g in t["gaps"].items())
            out.append(
                f"| {t['student']} | {t['target']} | {', '.join(t['reached_by']) or 'none'} | gaps: {gaps} | | {_f(t['tpd_auc'])} |"
            )
            continue
        out.append(f"| {t['student']} | {t['target']} | {', '.join(t['reached_by']) or 'none'} | {_cell(st, t['best'])} | "
                   f"{_cell(st, t['best_without_training_text'])} | {_f(t['tpd_auc'])} |")  # fmt: skip
    out += [
        "",
        "`sol_loss` and `sol_ratio` score the text the student was distilled on (here the teacher solutions that",
        'ARE the training data): they answer "was this exact (question, solution) pair trained on?" and need the',
        "auditor to hold that text. With only the benchmark's final answers they are at chance (beyond_dev.md).",
        "`combined_a` / `combined_b`: the audit's cross-fitted combination (`--combine`) of tpd, tpd_ref, wbc,",
        "ref_imbalance, loss, reference (a) and of those plus sol_loss, sol_ratio (b), out-of-fold AUC",
        "([beyond_crossfit.md](beyond_crossfit.md)).",
        "",
        "## AUC per detector and student",
        "",
    ]
    header = (
        "| detector | "
        + " | ".join(f"{s['name']} ({s['phase']}, loss {_f(s['info'].get('final_train_loss'))})" for s in sts)
        + " |"
    )
    out += [header, "|---|" + "---|" * len(sts)]
    for m in SHOWN:
        cells = []
        for s in sts:
            b = s["methods"].get(m)
            cells.append("—" if b is None else f"{_f(b['auc'])} [{_f(b['auc_ci'][0])}, {_f(b['auc_ci'][1])}]")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "![AUC per detector and student](beyond.png)", ""]
    for title, text in extra.items():
        out += [f"## {title}", "", text, ""]
    return "\n".join(out) + "\n"


def extra_sections() -> dict:
    """Links to the studies, the cross-fitted combination, the calibration and the black-box results, when present."""
    sec = {}
    for name, title, what in (
        ("beyond_studies", "Studies", "sampled decoding, evasion by rewording, further training, LoRA rank"),
        ("beyond_fsd", "Fine-tuned score deviation", "FSD adapted to distillation (the student tuned on known non-members)"),
        (
            "beyond_crossfit",
            "A combination learned without benchmark labels",
            "cross-fitted combination of detectors (dataset inference)",
        ),
        ("calibration_sol", "The audit with the best detector", "calibration of `audit` (power, false positives, FDR)"),
        ("black_box", "Without log-probabilities", "text-only detectors on the 5-epoch student"),
        ("black_box_memorising", "Without log-probabilities, memorising student", "text-only detectors on the 10-epoch student"),
    ):
        if (RESULTS / f"{name}.md").exists():
            sec.setdefault(title, "")
            sec[title] += f"{what}: [{name}.md]({name}.md).\n"
    return sec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args(argv)
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    sts = students()
    if not sts:
        raise SystemExit(f"no beyond_dev.json / beyond_confirm.json under {RESULTS}: run benchmarks/beyond.py first")
    add_combined(sts)
    targets = check_targets(sts)
    figure(sts, out / "beyond.png")
    md = markdown(sts, targets, extra_sections())
    (out / "beyond.md").write_text(md)
    (out / "beyond.json").write_text(json.dumps({"targets": targets, "students": sts}, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
