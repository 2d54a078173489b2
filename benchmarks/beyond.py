"""Beyond the paper: do the new detectors find distillation data before the student has memorised it?

    python benchmarks/beyond.py --phase dev --run e5=DIR [--run main=DIR ...]
    python benchmarks/beyond.py --phase confirm --run seed7=DIR --run math=DIR@bundled:math_test

Each DIR is the results directory of a student that ``benchmarks/reproduce.py`` built (its
``run/`` store holds the greedy traces, the question-token passes and the base model's
log-probabilities of the student's tokens). Nothing is generated here: every detector is
scored from those stored traces, so a table costs seconds.

For each student it writes, into ``benchmarks/results/beyond_<phase>.{md,json}``:

* every detector's AUC with its bootstrap interval and both TPR@1%FPR readings;
* DeLong's paired test of each detector against TPD on the same questions ("better than TPD"
  only when the AUC is higher AND p < 0.05);
* fair budgets: each generated-token detector read at the same M tokens (16, 32, 64, all).

``--phase dev`` is for development (seed-42 students only); ``--phase confirm`` runs on
students no detector was developed on, with the hyperparameters fixed in code. Model, data,
split, seed and machine are written beside every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from distill_detect import api  # noqa: E402
from distill_detect.detectors import REGISTRY, without_samples  # noqa: E402
from distill_detect.metrics import delong_test, fmt_delong  # noqa: E402

BUDGETS = (16, 32, 64, None)
"""Tokens read by every generated-token detector in the fair-budget table (None: all generated)."""


def student_info(results_dir: Path) -> dict:
    """What the student is: its fine-tune record and the run's fingerprint, from the files reproduce.py left."""
    info: dict = {"results": str(results_dir)}
    marker = results_dir.parent / "student" / "distill_detect_finetune.json"
    if marker.exists():
        rec = json.loads(marker.read_text())
        info["finetune"] = {k: rec.get("config", {}).get(k) for k in ("epochs", "learning_rate", "lora", "seed", "max_seq_len")}
        info["final_train_loss"] = rec.get("train", {}).get("final_train_loss")
        info["trained_on"] = rec.get("data", {}).get("n") or rec.get("n_examples")
    return info


def record_solutions(run_dir: Path, source: str) -> int:
    """Store the question file's solutions in a run made before runs kept them (no model; the ids must match)."""
    from distill_detect.data import load_questions
    from distill_detect.store import TraceStore

    with TraceStore(run_dir) as st:
        planned = {q.id for q in st.questions()}
        sols = {q.id: q.solution for q in load_questions(source) if q.id in planned and q.solution}
        st.put_solutions(sols)
    return len(sols)


def table_for(run_dir: Path, methods: list[str], bootstrap: int, reference_model: str) -> dict:
    res = api.score(run_dir, methods=methods, bootstrap=bootstrap, reference_model=reference_model, log=print)
    labels = [t.label for t in res.traces]
    tpd = res.membership("tpd")
    rows = {}
    for m in methods:
        block = dict(res.metrics[m])
        if m != "tpd":
            block["vs_tpd"] = delong_test(labels, res.membership(m), tpd)
        rows[m] = block
    fair: dict = {}
    output_methods = [m for m in methods if REGISTRY[m].budget_param]
    for budget in BUDGETS:
        params = {m: {REGISTRY[m].budget_param: budget} for m in output_methods} if budget else None
        r = api.score(run_dir, methods=output_methods, params=params, bootstrap=0, reference_model=reference_model)
        fair[str(budget or "all")] = {m: r.metrics[m]["auc"] for m in output_methods}
    return {
        "n_members": rows["tpd"]["n_members"],
        "n_nonmembers": rows["tpd"]["n_nonmembers"],
        "max_new_tokens": res.config.get("max_new_tokens"),
        "methods": rows,
        "fair_budget_auc": fair,
    }


def _f(x, pct=False):
    if x is None or x != x:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def markdown(doc: dict) -> str:
    what = {
        "dev": "Development students only (seed 42): the detectors' hyperparameters may have been chosen on these numbers.",
        "confirm": "Confirmation students (seeds and data no detector was developed on); hyperparameters fixed in code before.",
    }[doc["phase"]]
    out = [f"# Beyond the paper: {doc['phase']} results", "", what, "", doc["machine"], f"Scored in {doc['seconds']} s.", ""]
    for name, st in doc["students"].items():
        t = st["table"]
        ft = st["info"].get("finetune", {})
        out += [
            f"## {name}",
            "",
            f"Student: {ft}, final train loss {_f(st['info'].get('final_train_loss'))}; "
            f"{t['n_members']} members vs {t['n_nonmembers']} non-members, {t['max_new_tokens']} generated tokens "
            f"(results dir `{st['info']['results']}`).",
            "",
            "| method | AUC [95% CI] | TPR@1%FPR paper (strict) | vs TPD: ΔAUC, DeLong p |",
            "|---|---|---|---|",
        ]
        order = sorted(t["methods"], key=lambda m: -(t["methods"][m]["auc"]))
        for m in order:
            b = t["methods"][m]
            lo, hi = b["auc_ci"]
            vs = b.get("vs_tpd")
            cmp = fmt_delong(vs)
            out.append(
                f"| {m} | {_f(b['auc'])} [{_f(lo)}, {_f(hi)}] | {_f(b['tpr_at_1pct_fpr'], True)} "
                f"({_f(b['tpr_at_1pct_fpr_strict'], True)}) | {cmp} |"
            )
        fair = t["fair_budget_auc"]
        ms = list(next(iter(fair.values())))
        out += ["", "Fair budgets (AUC with every generated-token detector reading the same first M tokens):", ""]
        out += ["| M | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
        for k, row in fair.items():
            out.append(f"| {k} | " + " | ".join(_f(row[m]) for m in ms) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("dev", "confirm"), required=True)
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR[@SOLUTIONS]",
                    help="a reproduce.py results directory, with the question file of its solutions if not --solutions")  # fmt: skip
    # Every detector that reads log-probabilities (the text-only ones need sampled answers: benchmarks/black_box.py).
    # (FSD needs a model fine-tuned on a reference set: benchmarks/fsd.py.)
    default = [m for m in without_samples() if not REGISTRY[m].needs & {"solution", "output_text"}]
    ap.add_argument("--methods", default=",".join(default))
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--reference-model", default="default", help="the students' base (for the base-calibrated methods)")
    ap.add_argument(
        "--solutions", default="bundled:gsm8k_gpt3", help="question file whose response field the sol_* methods score"
    )
    ap.add_argument("--results", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    t0 = time.time()
    doc = {
        "phase": a.phase,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "students": {},
    }
    for spec in a.run:
        name, _, d = spec.partition("=")
        d, _, solutions = d.partition("@")
        solutions = solutions or a.solutions
        results_dir = Path(d)
        n_sol = record_solutions(results_dir / "run", solutions)
        doc["students"][name] = {
            "info": {**student_info(results_dir), "solutions": f"{n_sol} from {solutions}"},
            "table": table_for(results_dir / "run", a.methods.split(","), a.bootstrap, a.reference_model),
        }
    doc["seconds"] = round(time.time() - t0, 1)
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"beyond_{a.phase}.json").write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    (out / f"beyond_{a.phase}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
