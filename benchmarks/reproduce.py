"""Reproduce the paper's protocol in miniature: distil a student, detect its members, compare detectors.

    python benchmarks/reproduce.py --config gsm8k          # the committed default run for GSM8K
    python benchmarks/reproduce.py --config math           # ... for MATH
    python benchmarks/reproduce.py --config quick          # CI smoke test: tiny sizes, checks the pipeline only
    python benchmarks/reproduce.py --config gsm8k --sweep  # plus the memorisation sweep (epochs, learning rate, LoRA)

Steps (PAPER.md's protocol, sized for a 2-core CPU):

1. Draw a pool from a bundled distillation set (question + teacher response), shuffle it with
   the seed and split it 80/20 (``data.paper_split``): members / non-members; the evaluation
   set is balanced (the first n members, n = number of non-members).
2. Fine-tune the embedded SmolLM2-135M-Instruct on members' (question, teacher response) pairs,
   loss on the response only (``finetune.finetune``). To fit the CPU budget, only the members
   that are evaluated are trained on (``train_on = "evaluated"``); the paper trains on all 80%.
3. Generate greedily from the student for every evaluation question (one pass, stored), run the
   extra passes (lowercase; the base model as reference), score every detector, add the blind
   text baseline, sweep TPD's hyperparameters from the stored traces, and write the report.
4. Write ``benchmarks/results/<config>.md`` and ``.json`` (the ``metrics.json`` shape).

Working files (student checkpoint, traces) go under the cache directory, never into the repo:
``$DISTILL_DETECT_CACHE/benchmarks/<config>/``. Re-running with the same seed reuses them
(the fine-tune and the generation are resumable), so an interrupted run picks up where it was.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from distill_detect.detectors import without_samples  # noqa: E402
from distill_detect.experiment import say, student_experiment  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

ALL_METHODS = without_samples()  # every detector a greedy run can score (the sampled ones: black_box.py)

CONFIGS = {
    # 500-question pool -> 400 members / 100 non-members; 100 + 100 evaluated.
    "gsm8k": dict(
        data="bundled:gsm8k_gpt3",
        pool=500,
        epochs=5,
        learning_rate=1e-4,
        batch_size=8,
        max_seq_len=320,
        max_new_tokens=128,
        gen_batch=16,
        train_on="evaluated",
        base="default",
    ),
    "math": dict(
        data="bundled:math_test",
        pool=500,
        epochs=5,
        learning_rate=1e-4,
        batch_size=8,
        max_seq_len=512,  # one drawn problem's prompt alone is 391 tokens
        max_question_tokens=400,  # drawn problems longer than this are dropped before the split (none at seed 42)
        max_new_tokens=128,
        gen_batch=16,
        train_on="evaluated",
        base="default",
    ),
    # CI: checks the machinery end to end on the real model in a few minutes, not the numbers.
    "quick": dict(
        data="bundled:gsm8k_gpt3",
        pool=30,
        epochs=1,
        learning_rate=1e-4,
        batch_size=4,
        max_seq_len=192,
        max_new_tokens=12,
        gen_batch=6,
        train_on="evaluated",
        base="default",
    ),
}

# The memorisation sweep: one student per setting on a smaller evaluation set.
SWEEP = {
    "pool": 240,  # 192 members / 48 non-members; 48 + 48 evaluated
    "max_new_tokens": 96,
    "settings": [
        {"name": "full-e1-lr1e-4", "epochs": 1, "learning_rate": 1e-4},
        {"name": "full-e3-lr1e-4", "epochs": 3, "learning_rate": 1e-4},
        {"name": "full-e5-lr1e-4", "epochs": 5, "learning_rate": 1e-4},
        {"name": "full-e10-lr1e-4", "epochs": 10, "learning_rate": 1e-4},
        {"name": "full-e5-lr3e-5", "epochs": 5, "learning_rate": 3e-5},
        {"name": "lora-e5-lr1e-3", "epochs": 5, "learning_rate": 1e-3, "lora": True},
    ],
}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _fmt(x, pct=False):
    import math

    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def table(metrics: dict) -> list[str]:
    lines = [
        "| method | direction | AUC | 95% CI | TPR@1%FPR (paper) | TPR@1%FPR (strict) | TPR@5%FPR |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(metrics, key=lambda k: -(metrics[k]["auc"] if metrics[k]["auc"] == metrics[k]["auc"] else -1)):
        m = metrics[name]
        lo, hi = m["auc_ci"]
        d = "higher = member" if m.get("higher_is_member") else "lower = member"
        lines.append(
            f"| {name} | {d} | {_fmt(m['auc'])} | [{_fmt(lo)}, {_fmt(hi)}] | {_fmt(m['tpr_at_1pct_fpr'], True)} | "
            f"{_fmt(m['tpr_at_1pct_fpr_strict'], True)} | {_fmt(m['tpr_at_5pct_fpr'], True)} |"
        )
    return lines


SWEEP_METHODS = ["tpd", "tpd_ref", "out_ppl", "out_max_prob", "loss", "min_k_pp", "reference"]


def sweep(cfg: dict, *, seed: int, work: Path, only: set[str] | None = None) -> list[dict]:
    """Run the sweep's settings (``only``: a subset) and return every setting's row computed so far.

    Each setting's row is saved as ``work/sweep/NAME/sweep_row.json`` when it is first computed
    (with the wall time of that computation), so the settings can be split over several
    processes (``--sweep-settings``) and a last call without a subset gathers them all.
    """
    rows = []
    for st in SWEEP["settings"]:
        where = work / "sweep" / st["name"]
        saved = where / "sweep_row.json"
        if saved.exists():
            rows.append(json.loads(saved.read_text()))
            continue
        if only is not None and st["name"] not in only:
            continue
        t0 = time.time()
        over = {k: v for k, v in st.items() if k != "name"}
        say(f"sweep: {st['name']}")
        res = student_experiment(
            cfg,
            seed=seed,
            work=where,
            methods=SWEEP_METHODS,
            pool_size=SWEEP["pool"],
            max_new_tokens=SWEEP["max_new_tokens"],
            ft_overrides=over,
            report=False,
        )
        row = {
            "name": st["name"],
            **over,
            "final_train_loss": res["train"].get("final_train_loss"),
            "sizes": res["sizes"],
            "auc": {k: v["auc"] for k, v in res["metrics"].items()},
            "auc_ci": {k: v["auc_ci"] for k, v in res["metrics"].items()},
            "tpr_at_5pct_fpr": {k: v["tpr_at_5pct_fpr"] for k, v in res["metrics"].items()},
            "wall_s": round(time.time() - t0, 1),
            "stage_times_s": {k: round(v, 1) for k, v in res["times"].items()},
            "torch_threads": _torch_threads(),
            "load_average_after": list(os.getloadavg()),
        }
        saved.write_text(json.dumps(row, indent=2, default=float) + "\n")
        rows.append(row)
    return rows


def _threads(n) -> str:
    return "? threads" if n is None else f"{n} thread{'' if n == 1 else 's'}"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def write_sweep(rows: list[dict], *, name: str, cfg: dict, seed: int, results: Path) -> None:
    """``<name>_sweep.{json,md,png}``: one row per setting, AUC against the final training loss."""
    missing = [st["name"] for st in SWEEP["settings"] if st["name"] not in {r["name"] for r in rows}]
    header = {
        "model": "SmolLM2-135M-Instruct (embedded default, dequantised Q4_1 GGUF)",
        "data": cfg["data"],
        "pool": SWEEP["pool"],
        "seed": seed,
        "max_new_tokens": SWEEP["max_new_tokens"],
        "batch_size": cfg["batch_size"],
        "max_seq_len": cfg["max_seq_len"],
        "machine": machine(),
        "missing_settings": missing,
    }
    (results / f"{name}_sweep.json").write_text(json.dumps({"config": header, "rows": rows}, indent=2, default=float) + "\n")
    if rows:
        plot_sweep(rows, results / f"{name}_sweep.png")
    sizes = rows[0]["sizes"] if rows else {}
    md = [
        f"# Memorisation sweep: {name}",
        "",
        f"- model: {header['model']}; one student per setting (separate fine-tunes from the same base)",
        f"- data: `{cfg['data']}`, pool {SWEEP['pool']} -> {sizes.get('members', '?')} members / "
        f"{sizes.get('nonmembers', '?')} non-members (seed {seed}); evaluated {sizes.get('evaluated', '?')}; "
        f"trained on the {sizes.get('trained_on', '?')} evaluated members",
        f"- fine-tune: batch {cfg['batch_size']}, cosine, 5% warm-up, max length {cfg['max_seq_len']}; epochs, learning rate "
        "and full vs LoRA per row",
        f"- generation: greedy, {SWEEP['max_new_tokens']} new tokens (TPD's M = {SWEEP['max_new_tokens']} effective)",
        f"- machine: {header['machine']}",
        "",
        "| setting | final train loss | " + " | ".join(f"AUC {m}" for m in SWEEP_METHODS) + " | TPR@5%FPR tpd | wall |",
        "|---|---|" + "---|" * len(SWEEP_METHODS) + "---|---|",
    ]
    for r in sorted(rows, key=lambda r: -(r["final_train_loss"] or 0)):
        md.append(
            f"| {r['name']} | {_fmt(r['final_train_loss'])} | "
            + " | ".join(_fmt(r["auc"].get(m)) for m in SWEEP_METHODS)
            + f" | {_fmt(r['tpr_at_5pct_fpr'].get('tpd'), True)} | {r['wall_s'] / 60:.0f} min ({_threads(r.get('torch_threads'))}) |"
        )
    tpd_ci = {r["name"]: r.get("auc_ci", {}).get("tpd") for r in rows}
    md += [
        "",
        "AUC 95% bootstrap intervals for TPD: "
        + "; ".join(f"{k} [{_fmt(v[0])}, {_fmt(v[1])}]" for k, v in tpd_ci.items() if v)
        + ". With this many questions per class an interval is about ±0.1 wide, so neighbouring rows differ only "
        "where their intervals separate.",
        "",
    ]
    if missing:
        md += [f"Not run yet: {', '.join(missing)}.", ""]
    if rows:
        md += [f"![AUC against the final training loss]({name}_sweep.png)", ""]
    (results / f"{name}_sweep.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=130)
    methods = ["tpd", "tpd_ref", "out_ppl", "out_max_prob", "min_k_pp", "reference"]
    marks = dict(zip(methods, "os^vDx"))
    for m in methods:
        pts = sorted((r["final_train_loss"], r["auc"][m]) for r in rows if r["final_train_loss"] is not None and m in r["auc"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marks[m], label=m, lw=2 if m == "tpd" else 1)
    ax.axhline(0.5, color="#888", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("student's final training loss on its distillation data (log)")
    ax.set_ylabel("AUC (members vs non-members)")
    ax.set_title("Detection vs how hard the student fits its data")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="gsm8k")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--sweep", action="store_true", help="also run the memorisation sweep (separate fine-tunes)")
    ap.add_argument("--sweep-only", action="store_true", help="run only the memorisation sweep, not the main configuration")
    ap.add_argument(
        "--sweep-settings",
        default=None,
        metavar="NAMES",
        help="comma-separated sweep settings to compute in this process (others: only gathered if already done); "
        f"known: {', '.join(st['name'] for st in SWEEP['settings'])}",
    )
    ap.add_argument("--results", default=str(RESULTS), help="where the .md/.json results go")
    ap.add_argument("--work", default=None, help="working directory (default: the cache directory)")
    args = ap.parse_args(argv)

    from distill_detect.models import cache_dir

    cfg = CONFIGS[args.config]
    name = args.config if args.seed == 42 else f"{args.config}-seed{args.seed}"
    work = Path(args.work) if args.work else cache_dir() / "benchmarks" / name
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    only = None
    if args.sweep_settings:
        only = {x.strip() for x in args.sweep_settings.split(",") if x.strip()}
        unknown = only - {st["name"] for st in SWEEP["settings"]}
        if unknown:
            ap.error(f"--sweep-settings: unknown {', '.join(sorted(unknown))}")
    if args.sweep_only:
        rows = sweep(cfg, seed=args.seed, work=work, only=only)
        write_sweep(rows, name=name, cfg=cfg, seed=args.seed, results=results)
        return 0
    t0 = time.time()
    say(f"config {args.config}: {cfg}; work dir {work}")
    res = student_experiment(
        cfg, seed=args.seed, work=work, methods=ALL_METHODS, pool_size=cfg["pool"], max_new_tokens=cfg["max_new_tokens"]
    )
    wall = time.time() - t0
    if args.sweep:
        write_sweep(sweep(cfg, seed=args.seed, work=work, only=only), name=name, cfg=cfg, seed=args.seed, results=results)

    import distill_detect

    header = {
        "name": name,
        "model": "SmolLM2-135M-Instruct (embedded default, dequantised Q4_1 GGUF), full fine-tune",
        "data": cfg["data"],
        "sizes": res["sizes"],
        "seed": args.seed,
        "finetune": {k: cfg[k] for k in ("epochs", "learning_rate", "batch_size", "max_seq_len", "train_on")},
        "final_train_loss": res["train"].get("final_train_loss"),
        "max_new_tokens": cfg["max_new_tokens"],
        "machine": machine(),
        "wall_time_s": round(wall, 1),
        "stage_times_s": {k: round(v, 1) for k, v in res["times"].items()},
        "package_version": distill_detect.__version__,
    }
    doc = {"methods": res["metrics"], "config": header, "ablations": res["ablations"]}
    (results / f"{name}.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")

    fig_lines = []
    if res["ablations"]:
        from distill_detect.report.figures import ablation_figure

        png = results / f"{name}_tpd_ablation.png"
        try:
            ablation_figure({"ablations": res["ablations"]}, png)
            fig_lines = [f"![TPD ablations]({png.name})", ""]
        except Exception as exc:  # the figure is a nicety; the numbers are in the .json
            say(f"ablation figure failed: {exc}")
    md = [
        f"# Reproduction in miniature: {name}",
        "",
        f"- model: {header['model']}",
        f"- data: `{cfg['data']}`, pool {res['sizes']['pool']} -> {res['sizes']['members']} members / "
        f"{res['sizes']['nonmembers']} non-members (seed {args.seed}); evaluated {res['sizes']['evaluated']} "
        f"({res['sizes']['nonmembers']} + {res['sizes']['nonmembers']}); trained on {res['sizes']['trained_on']} members",
        f"- fine-tune: {cfg['epochs']} epochs, lr {cfg['learning_rate']}, batch {cfg['batch_size']}, cosine, 5% warm-up, "
        f"weight decay 1e-4, AdamW (0.9, 0.95), max length {cfg['max_seq_len']}; final train loss "
        f"{_fmt(header['final_train_loss'])}",
        f"- generation: greedy, {cfg['max_new_tokens']} new tokens (TPD reads min(M=300, generated)); output methods read the same budget",
        f"- machine: {header['machine']}",
        f"- wall time: {wall / 60:.1f} min ({', '.join(f'{k} {v:.0f}' for k, v in header['stage_times_s'].items())})",
        "",
        *table(res["metrics"]),
        "",
        "TPR@1%FPR (paper): TPR at the first point of sklearn's default ROC curve with FPR >= 1%; (strict): the largest TPR with FPR <= 1%.",
        "`blind` is a model-free text classifier on the question alone (cross-validated): near 0.5 means the split is not shifted.",
        "",
        *fig_lines,
    ]
    (results / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
