"""``distill-detect audit``: is this benchmark contaminated, how much of it, and which questions?

The command wires the statistics of ``distill_detect.audit`` to the durable trace store:

1. The benchmark (labels unknown) and the reference set (known unseen, from ``--reference``
   or built by ``--make-reference``) are planned in ONE run directory (``OUT/run`` unless
   ``--run`` names another). Benchmark ids are stored as given; reference ids get the prefix
   ``ref:`` so a reference file numbered like the benchmark cannot collide with it, and
   reference questions carry label 0 (known non-member) while benchmark questions carry none.
   ``OUT/audit_sets.json`` records which stored ids form each set.
2. Only missing traces are generated, and only as many tokens as the method reads
   (``scoring.generation_budget``: TPD alone decodes M tokens). A second reference set or
   another ``--fdr`` costs no model call for questions already stored.
3. Every trace is scored with the detector and oriented once (``metrics.membership_score``:
   higher = member); ``audit.audit`` turns benchmark and reference scores into conformal
   p-values, Benjamini-Hochberg flags, a one-sided Mann-Whitney test and Storey's fraction.
4. Outputs: the verdict line first on stdout, then its context; ``OUT/audit.json``,
   ``OUT/audit_questions.csv``, ``OUT/scores.jsonl`` and ``OUT/report.html`` (with an audit
   section).

``--from DIR`` redoes step 3 from DIR's stored traces with other ``--fdr``/``--alpha``/``--seed``
without loading a model; ``--run RUN`` without ``--model`` audits sets whose traces are
already in RUN, also without a model.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

from distill_detect.errors import ConfigError, DistillDetectError

REF_PREFIX = "ref:"
"""Prefix of reference questions' ids in the run's store."""
SETS_FILE = "audit_sets.json"
AUDIT_FILE = "audit.json"
CSV_FILE = "audit_questions.csv"
PERTURBED_FILE = "reference.perturbed.jsonl"
MIN_REFERENCE = 20
"""Fewest reference questions accepted (the asymptotic Mann-Whitney test wants >= 20 per side)."""

EPILOG = """example:
  distill-detect audit --model ./student --questions aime2024.jsonl --reference aime2025.jsonl --out audits/aime
  distill-detect audit --model ./student --questions bundled:gsm8k_test --limit 200 --make-reference --out audits/gsm8k
  distill-detect audit --from audits/aime --fdr 0.1              # other FDR level: no model, stored traces only
  distill-detect audit --run audits/aime/run --questions aime2024.jsonl --reference other_ref.jsonl --out audits/aime-ref2

The first line printed is the verdict, e.g.
  contaminated: estimated 24% of questions (95% CI 15–33%); 19 of 80 questions flagged at FDR 5%; dataset test p = 2e-6
Exit status: 0, or 1 with --fail-if-contaminated when the dataset test rejects; 2 for a usage or input error.
A reference set must be questions known NOT to be in the distillation data and drawn like the benchmark
(written after the model's cutoff, or the held-out part of a split); see the README's audit section."""


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
        help="build the reference from the benchmark by changing its numbers consistently (weaker; see the README)",
    )
    g.add_argument("--out", help="output directory (traces go to OUT/run unless --run is given)")
    g.add_argument("--run", default=None, help="use this run directory as the trace store; without --model, no generation")
    g.add_argument(
        "--from", dest="from_dir", default=None, metavar="DIR", help="redo the statistics of a finished audit DIR (no model)"
    )
    g = p.add_argument_group("statistics")
    g.add_argument("--method", default=None, help="the detector whose scores are audited (default: tpd)")
    g.add_argument(
        "--param", action="append", default=[], metavar="METHOD.NAME=VALUE", help="detector parameter, e.g. tpd.max_tokens=100"
    )
    g.add_argument("--fdr", type=float, default=0.05, help="false-discovery rate of the flagged questions (default 0.05)")
    g.add_argument(
        "--alpha", type=float, default=0.05, help="level of the dataset test: 'contaminated' iff p < alpha (default 0.05)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the bootstrap interval and of --make-reference (default 0)")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the fraction's interval (default 2000)")
    g.add_argument(
        "--fail-if-contaminated", action="store_true", help="exit with status 1 when the verdict is 'contaminated' (for CI)"
    )
    g.add_argument("--no-report", action="store_true", help="skip the HTML report")
    cli._input_args(p)
    cli._model_args(p)
    cli._scale_args(p)
    cli._reference_arg(p)
    # No --model means: the embedded default model, except with --run or --from (stored traces only).
    p.set_defaults(func=cmd_audit, model=None)


# -- helpers ------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _check_levels(args) -> None:
    for name, v in (("--fdr", args.fdr), ("--alpha", args.alpha)):
        if not 0.0 < v < 1.0:
            raise ConfigError(f"{name} must be in (0, 1), got {v}; e.g. 0.05")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")


def _resolve_method(method: str | None, params: list[str]):
    """(name, full params, Detector) of the one audited method."""
    from types import SimpleNamespace

    from distill_detect.cli import _parse_params
    from distill_detect.detectors import get

    method = method or "tpd"
    if "," in method:
        raise ConfigError(f"--method {method!r}: an audit uses one detector; run one audit per method")
    ns = SimpleNamespace(methods=method, tpd_tau=None, tpd_alpha=None, tpd_tokens=None, param=params)
    names, resolved = _parse_params(ns)
    return names[0], resolved[names[0]], get(names[0])


def min_reference(fdr: float) -> int:
    """Fewest reference questions: MIN_REFERENCE, and enough that BH can flag a question at ``fdr`` at all.

    The smallest conformal p-value is 1/(m+1); BH can flag anything only if that is <= fdr.

    >>> min_reference(0.05), min_reference(0.01)
    (20, 99)
    """
    return max(MIN_REFERENCE, math.ceil(1.0 / fdr - 1e-9) - 1)


def _check_sets(bench, ref, *, bench_src: str, ref_src: str, fdr: float) -> None:
    """Refuse an audit that cannot be valid: overlapping sets, too few questions."""
    if len(bench) < 2:
        raise ConfigError(f"{bench_src}: {len(bench)} question(s); the audit needs at least 2 benchmark questions")
    by_text = {q.text.strip(): q.id for q in bench}
    for r in ref:
        if r.text.strip() in by_text:
            n = sum(1 for x in ref if x.text.strip() in by_text)
            raise ConfigError(
                f"{ref_src}: {n} reference question(s) also in the benchmark (first: {r.id!r} = benchmark {by_text[r.text.strip()]!r}); "
                "a reference must be known-unseen questions distinct from the benchmark"
            )
    need = min_reference(fdr)
    if len(ref) < need:
        why = (
            f"at FDR {fdr:g} BH cannot flag any question with fewer"
            if need > MIN_REFERENCE
            else "the dataset test needs at least that many"
        )
        raise ConfigError(
            f"{ref_src}: {len(ref)} reference question(s), need at least {need} ({why}); add known-unseen questions"
        )


def _store_ids(bench, ref) -> tuple[list, list]:
    """The questions as planned in the store: benchmark unlabelled, reference prefixed and labelled 0."""
    b = [replace(q, label=None) for q in bench]
    r = [replace(q, id=REF_PREFIX + q.id, label=0) for q in ref]
    seen: set[str] = set()
    for q in b + r:
        if q.id in seen:
            raise ConfigError(f"question id {q.id!r} appears twice across the benchmark and the reference; ids must be unique")
        seen.add(q.id)
    return b, r


def _check_same_model(run_dir: Path, args) -> None:
    """A finished run must not silently stand in for another model: compare the model identity."""
    from distill_detect.store import DB_NAME, TraceStore

    if args.backend not in ("hf", "vllm") or not (run_dir / DB_NAME).exists():
        return
    try:
        with TraceStore(run_dir) as st:
            fp = st.get_meta("fingerprint") or {}
    except DistillDetectError:
        return
    old = fp.get("model")
    if not old:
        return
    from distill_detect.models import resolve_model

    new = resolve_model(args.model).identity
    if old != new:
        name = old.get("name") or old.get("hub_id") or "another model"
        raise ConfigError(f"{run_dir} holds traces of {name}, not of --model {args.model}; use another --out (or --run)")


def _pick_traces(run_dir: Path, bench, ref, *, complete_for: int | None):
    """(benchmark traces, reference traces, fingerprint, their ids in the store), in set order.

    A question is found by its id (reference: with or without the ``ref:`` prefix) when the
    stored text matches, else by its text; an error names how many are missing.
    """
    from distill_detect.pipeline import load_run_traces

    traces, fp, _ = load_run_traces(run_dir, max_new_tokens=complete_for)
    by_id = {t.id: t for t in traces}
    by_text = {}
    for t in traces:
        by_text.setdefault((t.question or "").strip(), t)

    def find(q, alt_id=None):
        for i in (q.id, alt_id):
            t = by_id.get(i) if i else None
            if t is not None and (t.question or "").strip() == q.text.strip():
                return t
        return by_text.get(q.text.strip())

    got_b = [find(q) for q in bench]
    got_r = [find(q, q.id[len(REF_PREFIX) :] if q.id.startswith(REF_PREFIX) else None) for q in ref]
    missing = sum(t is None for t in got_b) + sum(t is None for t in got_r)
    if missing:
        first = next(q.id for q, t in zip(bench + ref, got_b + got_r) if t is None)
        raise DistillDetectError(
            f"{missing} of {len(bench) + len(ref)} audited questions have no complete trace in {run_dir} (first: {first!r}); "
            "generate them by giving --model (or run the first audit again)"
        )
    # Labels as the audit sees them: benchmark unknown, reference known unseen.
    tb = [replace(t, id=q.id, label=None) for q, t in zip(bench, got_b)]
    tr = [replace(t, id=q.id, label=0) for q, t in zip(ref, got_r)]
    return tb, tr, fp, [t.id for t in got_b], [t.id for t in got_r]


def _fmt_p(p: float) -> str:
    from distill_detect.audit import _fmt_p as f

    return f(p)


# -- the command --------------------------------------------------------------------------------


def cmd_audit(args) -> int:
    _check_levels(args)
    if args.from_dir:
        return _cmd_from(args)
    if not args.out:
        raise ConfigError("give --out DIR (where audit.json, the CSV and the report go), or --from DIR to redo a finished audit")
    if not args.questions:
        raise ConfigError("give --questions BENCH.jsonl: the benchmark to audit")
    if bool(args.reference) == bool(args.make_reference):
        raise ConfigError(
            "give exactly one of --reference REF.jsonl (questions known not to be in the distillation data) or --make-reference"
        )
    from distill_detect.cli import _check_gen_args, _load

    _check_gen_args(args)
    name, params, det = _resolve_method(args.method, args.param)
    out = Path(args.out)
    bench = _load(args.questions, args)
    if args.make_reference:
        from distill_detect.audit import make_reference
        from distill_detect.data import questions_to_rows, write_jsonl

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ref, dropped = make_reference(bench, seed=args.seed)
        # A perturbation can land exactly on another benchmark question (templated sets): drop it.
        texts = {q.text.strip() for q in bench}
        clash = [r.id for r in ref if r.text.strip() in texts]
        ref = [r for r in ref if r.text.strip() not in texts]
        ref_src = str(out / PERTURBED_FILE)
        write_jsonl(out / PERTURBED_FILE, questions_to_rows(ref))
        _say(
            f"--make-reference: wrote {len(ref)} perturbed reference questions to {ref_src}; dropped {len(dropped)} benchmark "
            f"question(s) with no number to change"
            + (f" and {len(clash)} perturbation(s) equal to a benchmark question" if clash else "")
        )
        reference_info = {
            "source": ref_src,
            "kind": "perturbed",
            "from": str(args.questions),
            "seed": args.seed,
            "dropped": dropped,
            "dropped_equal_to_benchmark": clash,
        }
    else:
        ref = _load(args.reference, args, label=0)
        ref_src = str(args.reference)
        reference_info = {"source": ref_src, "kind": "file"}
    _check_sets(bench, ref, bench_src=str(args.questions), ref_src=ref_src, fdr=args.fdr)
    sb, sr = _store_ids(bench, ref)

    run_dir = Path(args.run) if args.run else out / "run"
    use_model = args.model is not None or not args.run
    budget = None
    if use_model:
        from distill_detect.cli import _backend_factory, _reference_factory
        from distill_detect.pipeline import load_run_traces, run_passes

        args.model = args.model or "default"
        budget = _generate(args, run_dir, sb + sr, name, params)
        # Methods that need a second model pass (lowercase, reference, dc_pdd) get it here, once.
        _, fp0, _ = load_run_traces(run_dir)
        ref_factory, ref_id = _reference_factory(args, fp0)
        run_passes(
            run_dir,
            [name],
            student_factory=_backend_factory(args),
            reference_factory=ref_factory,
            reference_identity=ref_id,
            batch_size=args.batch_size,
            ids={q.id for q in sb + sr},
            log=_say,
        )
    from distill_detect.detectors import check_needs

    tb, tr, fp, store_b, store_r = _pick_traces(run_dir, sb, sr, complete_for=budget)
    check_needs(name, tb + tr)
    sets = {
        "run": str(run_dir.resolve()),
        "method": name,
        "params": params,
        "max_new_tokens": budget,
        "benchmark": {"source": str(args.questions), "ids": [q.id for q in sb], "store_ids": store_b},
        "reference": {**reference_info, "ids": [q.id for q in sr], "store_ids": store_r},
    }
    return _finish(args, out, sets, tb, tr, fp, name, params, det)


def _generate(args, run_dir: Path, questions, name: str, params: dict) -> int:
    """Generate the missing traces (only the tokens the method reads); returns the token budget."""
    from distill_detect.cli import _backend_factory
    from distill_detect.distributed import run_generation
    from distill_detect.scoring import generation_budget

    _check_same_model(run_dir, args)
    budget = generation_budget({name: params}, args.max_new_tokens)
    if budget < args.max_new_tokens:
        _say(f"{name} reads at most {budget} generated tokens: decoding stops there")
    s = run_generation(
        questions, run_dir, _backend_factory(args, [name]), args, max_new_tokens=budget, batch_size=args.batch_size, log=_say
    )
    if s["generated"]:
        _say(
            f"generated {s['generated']} questions ({s['tokens']} tokens in {s['seconds']:.0f}s); {s['already_done']} were already stored"
        )
    else:
        _say(f"all {s['planned']} questions already stored in {run_dir}: no generation")
    return budget


def _cmd_from(args) -> int:
    """Redo the statistics of a finished audit from its stored traces (no model)."""
    src = Path(args.from_dir)
    sets_path = src / SETS_FILE
    if not sets_path.exists():
        raise DistillDetectError(f"{src}: no {SETS_FILE}; give the --out of an earlier 'distill-detect audit'")
    if args.questions or args.reference or args.make_reference or args.model:
        raise ConfigError(
            "--from DIR reuses DIR's benchmark, reference and traces; drop --questions/--reference/--make-reference/--model "
            "(to audit other sets from stored traces use --run RUN)"
        )
    try:
        sets = json.loads(sets_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DistillDetectError(f"{sets_path}: not readable ({exc})") from None
    from distill_detect.detectors import check_needs
    from distill_detect.pipeline import load_run_traces

    run_dir = Path(args.run or sets["run"])
    if args.method or args.param:
        name, params, det = _resolve_method(args.method or sets["method"], args.param)
    else:
        name, params, det = _resolve_method(sets["method"], [])
        params = {**params, **(sets.get("params") or {})}
    traces, fp, _ = load_run_traces(run_dir)
    by_id = {t.id: t for t in traces}
    b, r = sets["benchmark"], sets["reference"]
    missing = [i for i in b["store_ids"] + r["store_ids"] if i not in by_id]
    if missing:
        raise DistillDetectError(
            f"{run_dir}: {len(missing)} traces of the audit are missing (first: {missing[0]!r}); was the run moved?"
        )
    tb = [replace(by_id[s], id=i, label=None) for i, s in zip(b["ids"], b["store_ids"])]
    tr = [replace(by_id[s], id=i, label=0) for i, s in zip(r["ids"], r["store_ids"])]
    check_needs(name, tb + tr)
    if len(tr) < min_reference(args.fdr):
        raise ConfigError(
            f"--fdr {args.fdr:g}: with {len(tr)} reference questions BH cannot flag any question; need at least {min_reference(args.fdr)}"
        )
    out = Path(args.out) if args.out else src
    sets = {**sets, "run": str(run_dir.resolve()), "method": name, "params": params}
    return _finish(args, out, sets, tb, tr, fp, name, params, det)


def _finish(args, out: Path, sets: dict, tb, tr, fp, name: str, params: dict, det) -> int:
    """Score, run the statistics, write every output, print the verdict; returns the exit status."""
    import numpy as np

    from distill_detect import __version__
    from distill_detect.audit import audit
    from distill_detect.metrics import membership_score
    from distill_detect.scoring import score_traces, write_outputs

    raw = score_traces(tb + tr, {name: params})[name]
    s = membership_score(det, raw)
    bad = ~np.isfinite(s)
    if bad.any():
        first = (tb + tr)[int(np.flatnonzero(bad)[0])].id
        raise DistillDetectError(
            f"{name} gave {int(bad.sum())} non-finite score(s) (first: {first!r}); the audit needs a finite score per question"
        )
    n = len(tb)
    res = audit([t.id for t in tb], s[:n], s[n:], fdr=args.fdr, alpha=args.alpha, n_boot=args.bootstrap, seed=args.seed)

    out.mkdir(parents=True, exist_ok=True)
    doc = res.to_dict()
    for row, r in zip(doc["questions"], raw[:n]):
        row["raw_score"] = float(r)
    model = (fp or {}).get("model") or {}
    doc.update(
        {
            "method": name,
            "params": params,
            "higher_is_member": det.higher_is_member,
            "score_orientation": "score = membership score, higher = more likely seen; raw_score is in the method's own sign",
            "benchmark": {"source": sets["benchmark"]["source"], "n": n},
            "reference": {k: v for k, v in sets["reference"].items() if k not in ("ids", "store_ids")} | {"n": len(tr)},
            "model": model.get("name") or model.get("hub_id"),
            "source": {"run": sets["run"], "fingerprint": fp},
            "max_new_tokens": sets.get("max_new_tokens"),
            "package_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "notes": [
                "contaminated iff the one-sided Mann-Whitney test of benchmark vs reference scores gives p < alpha",
                "the estimated fraction is a lower bound: seen questions that the detector scores like unseen ones count as unseen",
                f"BH flags either no question or at least min_flaggable = {res.min_flaggable}; the smallest p-value is 1/(m+1)",
                "valid only if the reference is exchangeable with the benchmark's unseen questions (same source, style, difficulty)",
            ],
        }
    )
    from distill_detect.report.data import finite_or_none

    _write_json(out / AUDIT_FILE, finite_or_none(doc))
    _write_json(out / SETS_FILE, sets)
    _write_csv(out / CSV_FILE, tb, doc["questions"])
    config = {"source": {"run": sets["run"], "fingerprint": fp}, "methods": {name: params}, "audit": str(out / AUDIT_FILE)}
    write_outputs(out, tb + tr, {name: raw}, None, config)

    print(res.verdict())
    _print_context(res, name, params, det, sets, doc)
    if not args.no_report:
        from distill_detect.report import write_report

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "only one class": the audit section says what matters
            path = write_report(out, traces=tb + tr)
        print(f"report: {path}")
    print(f"wrote {out / AUDIT_FILE}, {out / CSV_FILE}, {out / 'scores.jsonl'}")
    return 1 if (args.fail_if_contaminated and res.contaminated) else 0


def _print_context(res, name, params, det, sets, doc) -> None:
    ref = sets["reference"]
    kind = "perturbed from the benchmark" if ref.get("kind") == "perturbed" else "known unseen"
    p = ", ".join(f"{k}={v}" for k, v in params.items())
    f = res.fraction
    lines = [
        f"  method: {name} ({p}); {'higher' if det.higher_is_member else 'lower'} raw score = more member-like"
        + (f"; decoded at most {sets['max_new_tokens']} tokens per question" if sets.get("max_new_tokens") else ""),
        f"  benchmark: {sets['benchmark']['source']}, {res.n_bench} questions; reference: {ref['source']}, {res.n_ref} questions ({kind})",
        f"  dataset test: one-sided Mann-Whitney U ({res.dataset.method}), p = {_fmt_p(res.dataset.pvalue)} at alpha {res.alpha:g}; "
        f"AUC benchmark vs reference {res.dataset.auc:.3f} (0.5 = indistinguishable)",
        f"  fraction: Storey's estimate {100 * f.estimate:.0f}%"
        + (f", {100 * f.confidence:g}% bootstrap CI {100 * f.ci_low:.0f}–{100 * f.ci_high:.0f}%" if f.n_boot else "")
        + "; a LOWER bound: seen questions the detector scores like unseen ones are not counted",
        f"  flags: BH at FDR {100 * res.fdr:g}% flags none or at least {res.min_flaggable} questions "
        f"(smallest possible p-value 1/(m+1) = {1 / (res.n_ref + 1):.3g})",
    ]
    if ref.get("kind") == "perturbed":
        lines.append(
            "  caution: a perturbed reference can itself "
            "look less familiar than unseen originals, which reads as contamination; prefer a real held-out set"
        )
    print("\n".join(lines))
    flagged = sorted((q for q in doc["questions"] if q["flagged"]), key=lambda q: q["pvalue"])
    if flagged:
        shown = ", ".join(f"{q['id']} (p={_fmt_p(q['pvalue'])})" for q in flagged[:10])
        more = f" and {len(flagged) - 10} more" if len(flagged) > 10 else ""
        print(f"  flagged: {shown}{more}")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _write_csv(path: Path, traces, rows: list[dict]) -> None:
    """One row per benchmark question, most member-like first (smallest p-value)."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["pvalue"], -rows[i]["score"], i))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "index", "id", "flagged", "pvalue", "qvalue", "score", "raw_score", "question"])
        for rank, i in enumerate(order, 1):
            r = rows[i]
            w.writerow(
                [
                    rank,
                    i,
                    r["id"],
                    int(r["flagged"]),
                    f"{r['pvalue']:.6g}",
                    f"{r['qvalue']:.6g}",
                    f"{r['score']:.6g}",
                    f"{r['raw_score']:.6g}",
                    traces[i].question or "",
                ]
            )
    tmp.replace(path)
