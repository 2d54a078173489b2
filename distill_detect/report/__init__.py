"""The HTML report: ``distill-detect report DIR`` writes ``DIR/report.html`` and ``DIR/figures/*.png``.

One self-contained page (inline CSS, script and data; no network; opens from
``file://``) with the metrics of every method, ROC curves (linear and log-log), score
histograms of members vs non-members, the distribution of generated-token
probabilities (the paper's motivating figure), TPD's ablation curves when
``DIR/ablations.json`` exists, and a sortable, filterable per-question table whose rows
open onto the question and its first M generated tokens coloured by probability.

Importing this module is cheap: numpy, sklearn, matplotlib and transformers are loaded
only when a report is written.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_report", "add_cli", "cmd_report"]

EPILOG = """example:
  distill-detect run --members bundled:gsm8k_train_sample --nonmembers bundled:gsm8k_test --limit 16 --out results/demo
  distill-detect report results/demo                  # writes results/demo/report.html
  distill-detect report results/demo --ablations      # also sweeps TPD's M, tau and alpha (no model needed)
  distill-detect report results/api --tokenizer ./my-student   # show token text, not ids"""


def write_report(out_dir, *, traces=None, tokenizer=None, figures: bool = True) -> Path:
    """Write ``out_dir/report.html`` from the results in ``out_dir``; returns its path.

    See ``distill_detect.report.build.write_report``.
    """
    from distill_detect.report.build import write_report as _write

    return _write(out_dir, traces=traces, tokenizer=tokenizer, figures=figures)


def cmd_report(args) -> int:
    from distill_detect.errors import DistillDetectError
    from distill_detect.report.build import load_traces

    out = Path(args.dir)
    if not out.is_dir():
        raise DistillDetectError(f"{out}: no such results directory (give the --out of 'run' or 'score')")
    traces = None
    if args.ablations:
        import json

        from distill_detect.ablation import tpd_ablation, write_ablations

        metrics = out / "metrics.json"
        config = json.loads(metrics.read_text(encoding="utf-8")).get("config", {}) if metrics.exists() else {}
        traces, why = load_traces(config, out)
        if not traces:
            raise DistillDetectError(f"--ablations needs the traces ({why})")
        if not any(t.label == 1 for t in traces) or not any(t.label == 0 for t in traces):
            raise DistillDetectError("--ablations needs labelled members and non-members in the traces")
        write_ablations(out, tpd_ablation(traces))
    path = write_report(out, traces=traces, tokenizer=args.tokenizer, figures=not args.no_figures)
    print(path)
    return 0


def add_cli(subparsers) -> None:
    """Add ``report DIR [--ablations] [--tokenizer T] [--no-figures]`` to the CLI."""
    import argparse

    p = subparsers.add_parser(
        "report",
        help="write DIR/report.html (metrics, ROC, histograms, tokens) and PNG figures",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="results directory written by 'run' or 'score' (holds scores.jsonl)")
    p.add_argument(
        "--ablations", action="store_true", help="first sweep TPD's M, tau and alpha on the stored traces (DIR/ablations.json)"
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer directory or hub id for token text (default: the run's model when known)"
    )
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures (DIR/figures/*.png)")
    p.set_defaults(func=cmd_report)
