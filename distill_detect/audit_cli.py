"""``distill-detect audit``: is this benchmark contaminated, how much of it, and which questions?

The command is a thin client of ``distill_detect.api.audit`` (the pipeline is in
``distill_detect.auditing``, the statistics in ``distill_detect.audit``): it parses the flags,
makes one call and prints the verdict line first, then what it rests on.
"""

from __future__ import annotations

import argparse

from distill_detect.errors import ConfigError

EPILOG = """example:
  distill-detect audit --model ./student --questions aime2024.jsonl --reference aime2025.jsonl --out audits/aime
  distill-detect audit --model ./student --questions bundled:gsm8k_test --limit 200 --make-reference --out audits/gsm8k
  distill-detect audit --from audits/aime --fdr 0.1              # other FDR level: no model, stored traces only
  distill-detect audit --run audits/aime/run --questions aime2024.jsonl --reference other_ref.jsonl --out audits/aime-ref2
  distill-detect audit --from audits/aime --methods tpd,tpd_ref,wbc,ref_imbalance,loss,reference --combine --out audits/aime-comb

The first line printed is the verdict, e.g.
  contaminated: estimated 24% of questions (95% CI 15–33%); 19 of 80 questions flagged at FDR 5%; dataset test p = 2e-6
Exit status: 0, or 1 with --fail-if-contaminated when the dataset test rejects; 2 for a usage or input error.
A reference set must be questions known NOT to be in the distillation data and drawn like the benchmark
(written after the model's cutoff, or the held-out part of a split); see docs/audit.md."""


def add_cli(subparsers) -> None:
    """Add ``audit`` to the CLI (argument helpers shared with ``run``)."""
    from distill_detect import cli

    p = subparsers.add_parser(
        "audit",
        help="is a benchmark contaminated? p-values per question, FDR flags, a dataset test and the contaminated share",
        description="Audit a benchmark against a reference set of known-unseen questions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to audit")
    g.add_argument("--questions", help="the benchmark under audit (JSONL/CSV/Parquet or bundled:NAME); its labels are ignored")
    g.add_argument("--reference", help="questions known NOT to be in the distillation data, drawn like the benchmark")
    g.add_argument(
        "--make-reference",
        action="store_true",
        help="build the reference from the benchmark by changing its numbers consistently (weaker; see docs/audit.md)",
    )
    g.add_argument("--out", help="output directory (traces go to OUT/run unless --run is given)")
    g.add_argument("--run", default=None, help="use this run directory as the trace store; without --model, no generation")
    g.add_argument(
        "--from", dest="from_dir", default=None, metavar="DIR", help="redo the statistics of a finished audit DIR (no model)"
    )
    g = p.add_argument_group("statistics")
    g.add_argument("--fdr", type=float, default=0.05, help="false-discovery rate of the flagged questions (default 0.05)")
    g.add_argument(
        "--alpha", type=float, default=0.05, help="level of the dataset test: 'contaminated' iff p < alpha (default 0.05)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the bootstrap interval and of --make-reference (default 0)")
    g.add_argument(
        "--fail-if-contaminated", action="store_true", help="exit with status 1 when the verdict is 'contaminated' (for CI)"
    )
    cli.method_args(p, default=None, bootstrap=2000)
    p.add_argument(
        "--combine",
        action="store_true",
        help="audit with a cross-fitted combination of the --methods detectors, learned without labels "
        "(benchmark vs reference, 2 folds; needs >= 40 reference questions, 78 at FDR 5%%; see docs/audit.md)",
    )
    cli._input_args(p)
    cli._model_args(p)
    # No --model means: the embedded default model, except with --run or --from (stored traces only).
    p.set_defaults(func=cmd_audit, model=None)


def cmd_audit(args) -> int:
    from distill_detect import api, cli
    from distill_detect.auditing import COMBINED_PREFIX, audit_from

    given = args.methods is not None
    args.methods = args.methods or "tpd"
    combine = args.combine or args.methods.startswith(COMBINED_PREFIX)
    args.methods = args.methods.removeprefix(COMBINED_PREFIX)
    methods, params = cli.method_params(args)
    if combine:
        if not given:
            raise ConfigError(
                "--combine: name the detectors to combine, e.g. --methods tpd,tpd_ref,wbc,ref_imbalance,loss,reference"
            )
        method = COMBINED_PREFIX + ",".join(methods)
        params = params or None  # {detector: params}
    else:
        method = ",".join(methods)
        params = params.get(methods[0]) if len(methods) == 1 else None
    if args.from_dir:
        if args.questions or args.reference or args.make_reference or args.model:
            raise ConfigError("--from DIR reuses DIR's benchmark, reference and traces; drop --questions/--reference/--make-reference/"
                              "--model (to audit other sets from stored traces use --run RUN)")  # fmt: skip
        given = given or bool(params)
        rep = audit_from(args.from_dir, out=args.out, run_dir=args.run, method=method if given else None, params=params,
                         fdr=args.fdr, alpha=args.alpha, seed=args.seed, bootstrap=args.bootstrap, report=not args.no_report)  # fmt: skip
    else:
        if not args.out or not args.questions:
            raise ConfigError("give --questions BENCH.jsonl and --out DIR (or --from DIR to redo a finished audit)")
        use_model = args.model is not None or not args.run
        args.model = args.model or "default"
        model, gen, source = cli.settings(args)
        rep = api.audit(args.questions, args.reference, out=args.out, make_reference=args.make_reference,
                        model=model if use_model else None, run_dir=args.run, method=method, params=params, gen=gen,
                        reference_model=args.reference_model, fdr=args.fdr, alpha=args.alpha, seed=args.seed,
                        bootstrap=args.bootstrap, source=source, report=not args.no_report, log=cli.say)  # fmt: skip
    print(rep.summary())
    if rep.report_path:
        print(f"report: {rep.report_path}")
    print(f"wrote {rep.out / 'audit.json'}, {rep.out / 'audit_questions.csv'}, {rep.out / 'scores.jsonl'}")
    return 1 if (args.fail_if_contaminated and rep.contaminated) else 0
