"""Fine-tuned Score Deviation (FSD) adapted to distillation, on the GSM8K 100+100 students (issue #14).

FSD (Zhang et al., ICLR 2025, "Fine-tuning can help detect pretraining data from large language
models", arXiv:2410.10880) fine-tunes the audited model briefly on data known to be unseen and
scores each question by how much its score moves: unseen questions gain more than seen ones.
Here the audited model is a distilled student, the unseen data are never-trained GSM8K questions
with the student's OWN greedy answers (what an auditor without the teacher has), and the score is
read on the student's stored greedy tokens (``distill_detect.detectors.fsd``).

Every step is one short command, so each can run alone under the shared CPU lock::

    flock /tmp/dd-slot2.lock .venv/bin/python benchmarks/fsd.py gen   --student gsm8k        # tuning answers
    flock /tmp/dd-slot2.lock .venv/bin/python benchmarks/fsd.py tune  --student gsm8k        # the FSD model
    flock /tmp/dd-slot2.lock .venv/bin/python benchmarks/fsd.py pass  --student gsm8k        # fsd pass, 200 traces
    .venv/bin/python benchmarks/fsd.py score --student gsm8k --stage development
    .venv/bin/python benchmarks/fsd.py write                                                 # results/beyond_fsd.*

Students: ``$DISTILL_DETECT_CACHE/benchmarks/<student>/student``, evaluated traces in ``.../results/run``
(``benchmarks/reproduce.py``). The split is ``experiment.draw_split(bundled:gsm8k_gpt3, pool_size=500,
seed=SEED)``: the student trained on members[:100] and was evaluated on those and the 100 non-members;
the FSD tuning set is members[100:200] of the same pool, never trained on and never evaluated.
Generated files live under ``$DISTILL_DETECT_CACHE/benchmarks/fsd/<student>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STUDENTS = {"gsm8k": 42, "gsm8k-seed7": 7}
"""Student directory name -> the split seed it was trained with (seed 42: development, seed 7: confirmation)."""
TUNE_SLICE = (100, 200)
"""The FSD tuning set: these members of the pool (beyond the 100 trained), never trained on nor evaluated."""
TUNE_TOKENS = 128
"""Greedy tokens of each tuning answer (the evaluated traces' cap)."""
THREADS = 1


def paths(student: str) -> dict[str, Path]:
    from distill_detect.models import cache_dir

    bench = cache_dir() / "benchmarks"
    work = bench / "fsd" / student
    return {
        "student": bench / student / "student",
        "run": bench / student / "results" / "run",
        "work": work,
        "tune_questions": work / "tune_questions.jsonl",
        "tune_run": work / "tune_run",
        "fsd_model": work / "fsd_model",
        "scores": work / "scores.json",
    }


def split(seed: int):
    """(trained members, evaluated non-members, FSD tuning questions) of the protocol's split."""
    from distill_detect.data import load_questions
    from distill_detect.experiment import draw_split

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qs = load_questions("bundled:gsm8k_gpt3", require_response=True)
    _, members, nonmembers, _ = draw_split(qs, pool_size=500, seed=seed)
    return members[:100], nonmembers, members[TUNE_SLICE[0] : TUNE_SLICE[1]]


def _record(student: str, row: dict) -> None:
    p = paths(student)
    p["work"].mkdir(parents=True, exist_ok=True)
    row = {"step": row.pop("step"), "student": student, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "threads": THREADS, "loadavg_1m_at_end": round(os.getloadavg()[0], 2), **row}  # fmt: skip
    with open(p["work"] / "steps.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str))


def _steps(student: str) -> list[dict]:
    f = paths(student)["work"] / "steps.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def cmd_gen(student: str) -> None:
    """The student's own greedy answers to the tuning questions (resumable run directory)."""
    import distill_detect as dd

    p = paths(student)
    trained, nonmembers, tune = split(STUDENTS[student])
    evaluated = {q.id for q in trained} | {q.id for q in nonmembers}
    assert not evaluated & {q.id for q in tune}, "the tuning set overlaps the trained or evaluated questions"
    from distill_detect.finetune import rows_hash

    trained_on = json.loads((p["student"] / "distill_detect_finetune.json").read_text())["run"]["data_hash"]
    assert rows_hash([q.id, q.text, q.response] for q in trained) == trained_on, "the student was not trained on members[:100]"
    p["work"].mkdir(parents=True, exist_ok=True)
    with open(p["tune_questions"], "w") as f:
        for q in tune:
            f.write(json.dumps({"id": q.id, "question": q.text}) + "\n")
    t0 = time.time()
    res = dd.generate(str(p["tune_questions"]), str(p["tune_run"]), model=dd.ModelSettings(model=str(p["student"]), threads=THREADS),
                      gen=dd.GenConfig(max_new_tokens=TUNE_TOKENS, batch_size=8, prompt_logprobs=False), log=print)  # fmt: skip
    _record(student, {"step": "gen", "wall_s": round(time.time() - t0, 1), **res})


def cmd_tune(student: str) -> None:
    """The FSD model: the student fine-tuned on its own answers to the tuning questions (``fsd.FSD_TRAINING``)."""
    from distill_detect.fsd import FSD_TRAINING, build_fsd_model, tuning_examples
    from distill_detect.store import TraceStore

    p = paths(student)
    with TraceStore(p["tune_run"]) as store:
        traces = list(store.traces())
    assert len(traces) == TUNE_SLICE[1] - TUNE_SLICE[0], f"{len(traces)} tuning answers; run the gen step to the end"
    examples = tuning_examples(traces)
    t0 = time.time()
    out = build_fsd_model(str(p["student"]), examples, p["fsd_model"], threads=THREADS)
    meta = json.loads((out / "distill_detect_finetune.json").read_text())
    _record(student, {"step": "tune", "wall_s": round(time.time() - t0, 1), "n_examples": len(examples),
                      "settings": FSD_TRAINING, "final_train_loss": meta.get("train", {}).get("final_train_loss"),
                      "cut_answers": sum(t.finish_reason != "stop" for t in traces)})  # fmt: skip


def _copy_run(student: str) -> Path:
    """A private copy of the student's evaluated run (SQLite backup), so the shared store is never written."""
    import sqlite3

    p = paths(student)
    dst = p["work"] / "run"
    if not (dst / "traces.sqlite").exists():
        dst.mkdir(parents=True, exist_ok=True)
        tmp = dst / "traces.sqlite.tmp"
        src = sqlite3.connect(f"file:{p['run'] / 'traces.sqlite'}?mode=ro", uri=True)
        out = sqlite3.connect(tmp)
        with out:
            src.backup(out)
        src.close()
        out.close()
        tmp.replace(dst / "traces.sqlite")
    return dst


def cmd_pass(student: str) -> None:
    """Teacher-force the 200 stored greedy outputs through the FSD model (``fsd.fsd_pass``)."""
    from distill_detect.fsd import fsd_pass

    p = paths(student)
    run = _copy_run(student)
    t0 = time.time()
    n = fsd_pass(run, str(p["fsd_model"]), batch_size=8, threads=THREADS, log=print)
    _record(student, {"step": "pass", "wall_s": round(time.time() - t0, 1), "traces": n})


METHODS = ("fsd", "fsd_tpd", "tpd", "tpd_ref", "out_ppl")
"""Scored per student: the two FSD statistics, TPD, and two generated-token baselines on the same tokens."""


def score(student: str, stage: str = "development") -> dict:
    """Every method's metrics, and DeLong's paired test of each against TPD, on the 100 + 100 evaluated questions."""
    import numpy as np

    from distill_detect.detectors import get
    from distill_detect.metrics import delong_test, membership_score, summarize
    from distill_detect.pipeline import read_run

    p = paths(student)
    traces, fp, _ = read_run(p["work"] / "run")
    y = np.asarray([t.label for t in traces], dtype=int)
    mem = {}
    out: dict = {"n_members": int(y.sum()), "n_nonmembers": int((1 - y).sum()), "methods": {}}
    for m in METHODS:
        det = get(m)
        raw = np.asarray([det(t) for t in traces], dtype=np.float64)
        mem[m] = membership_score(det, raw)
        out["methods"][m] = {**summarize(y, mem[m], n_resamples=1000, seed=0),
                             "raw_mean_members": float(raw[y == 1].mean()), "raw_mean_nonmembers": float(raw[y == 0].mean())}  # fmt: skip
    for m in METHODS:
        if m != "tpd":
            out["methods"][m]["delong_vs_tpd"] = delong_test(y, mem[m], mem["tpd"])
    if stage == "development":  # the candidates the fsd statistic was chosen from (membership AUC, higher = member)
        from distill_detect.detectors.fsd import logprob_gain
        from distill_detect.metrics import roc_auc

        pairs = [(t.output_logprobs.astype(np.float64), t.extra["fsd_output_logprobs"].astype(np.float64)) for t in traces]
        gain = np.asarray([logprob_gain(a, b) for a, b in pairs])
        out["dev_candidates_auc"] = {
            "signed gain, lower = member (the paper's way round)": roc_auc(y, -gain),
            "signed gain, higher = member": roc_auc(y, gain),
            "|signed gain|, lower = member": roc_auc(y, -np.abs(gain)),
            "mean |per-token change|, lower = member (chosen: fsd)": roc_auc(
                y, np.asarray([-np.mean(np.abs(b - a)) for a, b in pairs])
            ),
            "rms per-token change, lower = member": roc_auc(y, np.asarray([-np.sqrt(np.mean((b - a) ** 2)) for a, b in pairs])),
        }
    out["tokens"] = {"max_new_tokens": int(max(t.max_new_tokens or 0 for t in traces)),
                     "mean_generated": float(np.mean([len(t.output_logprobs) for t in traces]))}  # fmt: skip
    out["fingerprint"] = fp
    return out


def cmd_score(student: str, stage: str) -> None:
    t0 = time.time()
    res = {"student": student, "seed": STUDENTS[student], "stage": stage, **score(student, stage)}
    res["scored_s"] = round(time.time() - t0, 1)
    paths(student)["scores"].write_text(json.dumps(res, indent=1, default=str))
    for m, r in res["methods"].items():
        d = r.get("delong_vs_tpd", {})
        print(f"{m:8s} AUC {r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] strict TPR@1% {r['tpr_at_1pct_fpr_strict']:.2f} "
              f"raw mem {r['raw_mean_members']:.4f} non {r['raw_mean_nonmembers']:.4f}"
              + (f"  vs TPD {d['diff']:+.3f} p={d['pvalue']:.3g}" if d else ""))  # fmt: skip


def _fmt(r: dict, stage: str) -> str:
    from distill_detect.metrics import fmt_delong

    d = r.get("delong_vs_tpd")
    vs = fmt_delong(d)
    return (f"{r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] | {100 * r['tpr_at_1pct_fpr_strict']:.1f}% | "
            f"{r['raw_mean_members']:.4f} / {r['raw_mean_nonmembers']:.4f} | {vs}")  # fmt: skip


def cmd_write() -> None:
    """benchmarks/results/beyond_fsd.{md,json} from the students scored so far."""
    from distill_detect.fsd import FSD_TRAINING

    rows = {}
    for student in STUDENTS:
        f = paths(student)["scores"]
        if f.exists():
            rows[student] = {**json.loads(f.read_text()), "steps": _steps(student)}
    machine = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "threads": THREADS, "note": "shared 2-core machine; other jobs ran beside these (load at the end of each step is recorded)"}  # fmt: skip
    doc = {"what": "FSD adapted to distillation (issue #14)", "fsd_training": FSD_TRAINING, "tune_slice": TUNE_SLICE,
           "tune_tokens": TUNE_TOKENS, "machine": machine, "students": rows}  # fmt: skip
    res_dir = ROOT / "benchmarks" / "results"
    (res_dir / "beyond_fsd.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    lines = [
        "# Beyond the paper: FSD (fine-tuned score deviation) adapted to distillation",
        "",
        "FSD (Zhang et al., ICLR 2025, arXiv:2410.10880): fine-tune the student briefly on questions known to be unseen, with",
        "the student's OWN greedy answers, and score each benchmark question by how far the student's greedy tokens move",
        "under the tuned copy (`fsd`: mean absolute per-token log-prob change over the first M tokens, chosen on development data",
        f"below; `fsd_tpd`: TPD under the student minus under the tuned copy, fixed beforehand). Lower = member. "
        f"FSD fine-tune: {FSD_TRAINING['epochs']} epochs, lr {FSD_TRAINING['learning_rate']:g}, batch {FSD_TRAINING['per_device_batch_size']}, "
        f"seed {FSD_TRAINING['seed']}, cosine with 5% warm-up (finetune defaults); tuning answers greedy, {TUNE_TOKENS} tokens.",
        "",
        "Data: `bundled:gsm8k_gpt3` (GSM8K questions with GPT-3 solutions), split "
        "`experiment.draw_split(pool_size=500, seed=SEED)`: the student was trained on members[:100] (5 epochs, lr 1e-4) and is "
        f"evaluated on those 100 against the 100 non-members; the FSD tuning set is members[{TUNE_SLICE[0]}:{TUNE_SLICE[1]}] of the "
        "same pool (never trained on, never evaluated). Model: SmolLM2-135M-Instruct students, CPU float32, "
        f"{THREADS} thread per step under a shared lock. Machine: {machine['platform']}, {machine['cpus']} cores, Python {machine['python']}.",
        "",
        "Development: seed 42 (the statistic and its direction were fixed there). Confirmation: seed 7, run once with everything fixed.",
        "",
    ]
    for student, r in rows.items():
        ft = {s["step"]: s for s in r["steps"]}
        lines += [f"## {r['stage']}: `{student}` (seed {r['seed']})", "",
                  f"{r['n_members']} members vs {r['n_nonmembers']} non-members; {r['tokens']['max_new_tokens']} generated tokens cap "
                  f"(mean {r['tokens']['mean_generated']:.1f}).", "",
                  "| method | AUC [95% CI] | strict TPR@1%FPR | raw mean members / non-members | vs TPD: ΔAUC, DeLong p |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {m} | {_fmt(x, r['stage'])} |" for m, x in r["methods"].items()]
        wall = ", ".join(f"{k} {v['wall_s']:.0f} s (load {v['loadavg_1m_at_end']})" for k, v in ft.items() if "wall_s" in v)
        tune = ft.get("tune", {})
        if r.get("dev_candidates_auc"):
            lines += ["", "Candidates for the `fsd` statistic on this development student (AUC as a membership score):", ""]
            lines += [f"- {k}: {v:.3f}" for k, v in r["dev_candidates_auc"].items()]
        lines += ["", f"Wall time (1 thread): {wall}. FSD fine-tune: {tune.get('n_examples')} examples "
                      f"({tune.get('cut_answers')} answers cut at {TUNE_TOKENS} tokens), final train loss {tune.get('final_train_loss', float('nan')):.3f}.", ""]  # fmt: skip
    if "gsm8k-seed7" not in rows:
        lines += ["## confirmation: `gsm8k-seed7` (seed 7): not run yet", "",
                  "The shared CPU lock left no time for it before the deadline. With everything fixed as committed, run:", "",
                  "    for s in gen tune pass; do flock /tmp/dd-slot2.lock .venv/bin/python benchmarks/fsd.py $s --student gsm8k-seed7; done",
                  "    .venv/bin/python benchmarks/fsd.py score --student gsm8k-seed7 --stage confirmation && .venv/bin/python benchmarks/fsd.py write",
                  ""]  # fmt: skip
    (res_dir / "beyond_fsd.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["gen", "tune", "pass", "score", "write"])
    ap.add_argument("--student", choices=sorted(STUDENTS), default="gsm8k")
    ap.add_argument("--stage", choices=["development", "confirmation"], default="development")
    args = ap.parse_args(argv)
    steps = {"gen": lambda: cmd_gen(args.student), "tune": lambda: cmd_tune(args.student), "pass": lambda: cmd_pass(args.student),
             "score": lambda: cmd_score(args.student, args.stage), "write": cmd_write}  # fmt: skip
    steps[args.step]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
