"""The audit pipeline: plan benchmark and reference in one run, generate what is missing, read
every trace at one budget, score with one detector, run the statistics, write the outputs.

1. The benchmark (labels unknown) and the reference set (known unseen, from a file or built by
   ``make_reference``) are planned in ONE run directory (``OUT/run`` unless ``run_dir`` names
   another). Benchmark ids are stored as given; reference ids get the prefix ``ref:`` so a
   reference file numbered like the benchmark cannot collide with it. ``OUT/audit_sets.json``
   records which stored ids form each set.
2. Only missing traces are generated, and only as many tokens as the method reads; every trace
   is then read at that one budget, so a reused store holding longer traces cannot tilt the
   comparison, and traces cut short by an older, lower cap are refused by name. A text-only
   method reads the sampled answers of the setting chosen here (``audit_sampling``), recorded in
   ``audit_sets.json`` so ``audit_from`` reads the same ones.
3. Every trace is scored with the detector; ``audit.audit`` orients the raw scores by the
   method's direction and returns conformal p-values, BH flags, the dataset test and the fraction.
   ``method="combined:tpd,wbc,..."`` (CLI: ``--methods tpd,wbc,... --combine``) scores every trace
   with each named detector and audits their cross-fitted combination, learned without labels
   (``audit.audit_combined``): each question's score comes from a fit on the other folds and is
   compared with its own fold's reference, so the guarantees hold at a coarser resolution.
4. Outputs: ``OUT/audit.json``, ``OUT/audit_questions.csv``, ``OUT/scores.jsonl``, ``OUT/report.html``.

``audit_from(DIR)`` redoes step 3 from DIR's stored traces with other levels or seed (no model).
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from distill_detect.audit import CROSSFIT_FOLDS, fmt_p
from distill_detect.errors import ConfigError, DistillDetectError

REF_PREFIX = "ref:"
"""Prefix of reference questions' ids in the run's store."""
SETS_FILE = "audit_sets.json"
AUDIT_FILE = "audit.json"
CSV_FILE = "audit_questions.csv"
PERTURBED_FILE = "reference.perturbed.jsonl"
MIN_REFERENCE = 20
"""Fewest reference questions accepted (the asymptotic Mann-Whitney test wants >= 20 per side)."""
COMBINED_PREFIX = "combined:"
"""``method="combined:tpd,wbc"``: audit the cross-fitted combination of these detectors (``audit.audit_combined``)."""


def min_reference(fdr: float, folds: int = 1) -> int:
    """Fewest reference questions: MIN_REFERENCE, and enough that BH can flag a question at ``fdr`` at all.

    The smallest conformal p-value is 1/(m+1); BH can flag anything only if that is <= fdr. A combined
    audit (K folds) compares each question with its fold's m/K reference questions and runs BH at fdr/K
    within each fold, so every fold needs that many.

    >>> min_reference(0.05), min_reference(0.01), min_reference(0.05, folds=2)
    (20, 99, 78)
    """
    return int(folds) * max(MIN_REFERENCE, math.ceil(int(folds) / fdr - 1e-9) - 1)


def check_sets(bench, ref, *, bench_src: str, ref_src: str, fdr: float, perturbed: int | None = None, folds: int = 1) -> None:
    """Refuse an audit that cannot be valid: overlapping sets, too few questions (with the right remedy)."""
    if len(bench) < 2 * folds:
        need = (
            "at least 2 benchmark questions" if folds == 1 else f"at least {2 * folds} benchmark questions ({folds} folds of 2)"
        )
        raise ConfigError(f"{bench_src}: {len(bench)} question(s); the audit needs {need}")
    by_text = {q.text.strip(): q.id for q in bench}
    for r in ref:
        if r.text.strip() in by_text:
            n = sum(1 for x in ref if x.text.strip() in by_text)
            raise ConfigError(
                f"{ref_src}: {n} reference question(s) also in the benchmark (first: {r.id!r} = benchmark {by_text[r.text.strip()]!r}); "
                "a reference must be known-unseen questions distinct from the benchmark"
            )
    need = min_reference(fdr, folds)
    if len(ref) >= need:
        return
    why = (
        f"at FDR {fdr:g} BH cannot flag any question with fewer"
        if need > MIN_REFERENCE * folds
        else "the dataset test needs at least that many"
    )
    if folds > 1:
        why += f", {need // folds} in each of the combination's {folds} folds"
    if perturbed is not None:
        raise ConfigError(
            f"--make-reference built {len(ref)} reference question(s) from the {perturbed} questions of {bench_src}; "
            f"the audit needs at least {need} ({why}). Give --reference REF.jsonl with at least {need} questions "
            "known not to be in the distillation data"
        )
    raise ConfigError(f"{ref_src}: {len(ref)} reference question(s), need at least {need} ({why}); add known-unseen questions")


def store_ids(bench, ref) -> tuple[list, list]:
    """The questions as planned in the store: benchmark unlabelled, reference prefixed and labelled 0."""
    b = [replace(q, label=None) for q in bench]
    r = [replace(q, id=REF_PREFIX + q.id, label=0) for q in ref]
    seen: set[str] = set()
    for q in b + r:
        if q.id in seen:
            raise ConfigError(f"question id {q.id!r} appears twice across the benchmark and the reference; ids must be unique")
        seen.add(q.id)
    return b, r


def audit_sampling(gen, budget: int, run_dir: Path, method) -> dict | None:
    """The sampled answers the audit reads (``{**GenConfig.sampling(), "n": N}``), chosen here, not left to the
    run's latest request: those ``gen`` asks for (at the decoding budget, as they were generated), else, for a
    method that reads sampled answers, the setting the run stored last (``pipeline.choose_sampling``); None when
    the method reads none."""
    from distill_detect.detectors import get
    from distill_detect.pipeline import choose_sampling

    if gen.samples:
        return {**replace(gen, max_new_tokens=budget).sampling(), "n": gen.samples}
    names = [method] if isinstance(method, str) else list(method)
    if any("output_samples" in get(m).needs for m in names) and (Path(run_dir) / "traces.sqlite").exists():
        return choose_sampling(run_dir)
    return None


def pick_traces(run_dir: Path, bench, ref, *, sampling: dict | None = None):
    """(benchmark traces, reference traces, fingerprint, their ids in the store), in set order.

    A question is found by its id (reference: with or without the ``ref:`` prefix) when the
    stored text matches, else by its text; an error names how many are missing. ``sampling``
    (``audit_sampling``) names the sampled answers attached to the traces.
    """
    from distill_detect.pipeline import read_run

    traces, fp, _ = read_run(run_dir, sampling=sampling)
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


def _method_line(res, name, params, det) -> str:
    if res.combination is None:
        p = ", ".join(f"{k}={v}" for k, v in params.items())
        return f"  method: {name} ({p}); {'higher' if det.higher_is_member else 'lower'} raw score = more member-like"
    cf = res.combination.crossfit
    return (
        f"  method: {res.combination.describe()}, learned without labels: logistic regression of benchmark vs reference "
        f"(standardised scores, C={cf.C:g}) fitted on the other folds scores each fold (seed {cf.seed}); "
        "higher combined score = more member-like"
    )


def context_lines(res, name, params, det, sets, doc) -> list[str]:
    ref = sets["reference"]
    kind = "perturbed from the benchmark" if ref.get("kind") == "perturbed" else "known unseen"
    f = res.fraction
    comb = res.combination
    if comb:
        kinds = "/".join(sorted({t.method for t in comb.fold_tests}))
        test = f"one-sided Mann-Whitney U in each fold ({kinds}), Bonferroni over {comb.folds} folds"
    else:
        test = f"one-sided Mann-Whitney U ({res.dataset.method})"
    bh = (
        f"BH within each of {comb.folds} folds at FDR {100 * res.fdr / comb.folds:g}%"
        if comb
        else f"BH at FDR {100 * res.fdr:g}%"
    )
    least = (
        f"1/(m_k+1) = {res.min_pvalue:.3g}, each question against its fold's reference"
        if comb
        else f"1/(m+1) = {res.min_pvalue:.3g}"
    )
    lines = [
        _method_line(res, name, params, det)
        + (f"; decoded at most {sets['max_new_tokens']} tokens per question" if sets.get("max_new_tokens") else ""),
        f"  benchmark: {sets['benchmark']['source']}, {res.n_bench} questions; reference: {ref['source']}, {res.n_ref} questions ({kind})",
        f"  dataset test: {test}, p = {fmt_p(res.dataset.pvalue)} at alpha {res.alpha:g}; "
        f"AUC benchmark vs reference {res.dataset.auc:.3f} (0.5 = indistinguishable)",
        f"  fraction: Storey's estimate {100 * f.estimate:.0f}%"
        + (f", {100 * f.confidence:g}% bootstrap CI {100 * f.ci_low:.0f}–{100 * f.ci_high:.0f}%" if f.n_boot else "")
        + "; a LOWER bound: seen questions the detector scores like unseen ones are not counted",
        f"  flags: {bh} flags none or at least {res.min_flaggable} questions (smallest possible p-value {least})",
    ]
    if ref.get("kind") == "perturbed":
        lines.append(
            "  caution: a perturbed reference can itself "
            "look less familiar than unseen originals, which reads as contamination; prefer a real held-out set"
        )
    flagged = sorted((q for q in doc["questions"] if q["flagged"]), key=lambda q: q["pvalue"])
    if flagged:
        shown = ", ".join(f"{q['id']} (p={fmt_p(q['pvalue'])})" for q in flagged[:10])
        more = f" and {len(flagged) - 10} more" if len(flagged) > 10 else ""
        lines.append(f"  flagged: {shown}{more}")
    return lines


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_csv(path: Path, traces, rows: list[dict]) -> None:
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


@dataclass
class AuditReport:
    """An audit's statistics (``result``: ``audit.AuditResult``), its document and where it was written."""

    result: object
    doc: dict
    sets: dict
    context: list[str]
    out: Path
    report_path: Path | None = None

    def verdict(self) -> str:
        return self.result.verdict()

    def summary(self) -> str:
        """The verdict line, then what it rests on (what the CLI prints)."""
        return "\n".join([self.verdict(), *self.context])

    @property
    def contaminated(self) -> bool:
        return bool(self.result.contaminated)


def _resolve(method: str, params: dict | None):
    """(name, {detector: params}, detector or None) for ``method``: one detector's name, or
    ``combined:A,B,...`` with ``params`` then keyed by detector ({"tpd": {"max_tokens": 64}})."""
    from distill_detect.api import resolve_methods
    from distill_detect.detectors import get

    if method.startswith(COMBINED_PREFIX):
        names = [m.strip() for m in method[len(COMBINED_PREFIX) :].split(",") if m.strip()]
        if len(set(names)) < 2:
            raise ConfigError(f"--methods {method!r}: a combination needs at least two different detectors")
        resolved = resolve_methods(names, params or None)
        return COMBINED_PREFIX + ",".join(resolved), resolved, None
    if "," in method:
        raise ConfigError(
            f"--methods {method!r}: an audit uses one detector, or their cross-fitted combination with --combine "
            f"(Python: method='{COMBINED_PREFIX}{method}')"
        )
    resolved = resolve_methods(method, {method: params} if params else None)
    return method, resolved, get(method)


def _stored_params(name: str, resolved: dict) -> dict:
    """What audit_sets.json and audit.json record as ``params``: the detector's, or {detector: params} when combined."""
    return resolved if name.startswith(COMBINED_PREFIX) else resolved[name]


def _check_levels(fdr: float, alpha: float, bootstrap: int) -> None:
    for name, v in (("--fdr", fdr), ("--alpha", alpha)):
        if not 0.0 < v < 1.0:
            raise ConfigError(f"{name} must be in (0, 1), got {v}; e.g. 0.05")
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {bootstrap}")


def _perturbed_reference(bench, bench_src, out: Path, seed: int, log):
    from distill_detect.audit import make_reference
    from distill_detect.data import questions_to_rows, write_jsonl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref, dropped = make_reference(bench, seed=seed)
    # A perturbation can land exactly on another benchmark question (templated sets): drop it.
    texts = {q.text.strip() for q in bench}
    clash = [r.id for r in ref if r.text.strip() in texts]
    ref = [r for r in ref if r.text.strip() not in texts]
    ref_src = str(out / PERTURBED_FILE)
    write_jsonl(out / PERTURBED_FILE, questions_to_rows(ref))
    if log:
        log(f"--make-reference: wrote {len(ref)} perturbed reference questions to {ref_src}; dropped {len(dropped)} benchmark "
            "question(s) with no number to change" + (f" and {len(clash)} perturbation(s) equal to a benchmark question" if clash else ""))  # fmt: skip
    info = {
        "source": ref_src,
        "kind": "perturbed",
        "from": bench_src,
        "seed": seed,
        "dropped": dropped,
        "dropped_equal_to_benchmark": clash,
    }
    return ref, info


def audit_pipeline(questions, reference, *, out: Path, make_reference: bool, settings, run_dir, method: str, params,
                   gen, reference_model, fdr: float, alpha: float, seed: int, bootstrap: int, source, report: bool, log) -> AuditReport:  # fmt: skip
    """``distill_detect.api.audit``: see the module docstring."""
    from distill_detect import pipeline
    from distill_detect.api import reference_backend
    from distill_detect.scoring import generation_budget

    _check_levels(fdr, alpha, bootstrap)
    if (reference is None) == (not make_reference):
        raise ConfigError(
            "give exactly one of --reference REF.jsonl (questions known not to be in the distillation data) or --make-reference"
        )
    name, resolved, det = _resolve(method, params)
    folds = CROSSFIT_FOLDS if det is None else 1
    bench_src = str(questions) if isinstance(questions, (str, Path)) else "benchmark"
    bench = source.load(questions)
    if make_reference:
        ref, info = _perturbed_reference(bench, bench_src, out, seed, log)
    else:
        ref = source.load(reference, label=0)
        info = {"source": str(reference) if isinstance(reference, (str, Path)) else "reference", "kind": "file"}
    check_sets(bench, ref, bench_src=bench_src, ref_src=info["source"], fdr=fdr, perturbed=len(bench) if make_reference else None,
               folds=folds)  # fmt: skip
    sb, sr = store_ids(bench, ref)
    run_dir = Path(run_dir) if run_dir else out / "run"
    if settings is None and not (run_dir / "traces.sqlite").exists():
        raise ConfigError(f"{run_dir} is not a run directory; give a model to generate the traces")
    budget = generation_budget(resolved, gen.max_new_tokens)
    if settings is not None:
        if budget < gen.max_new_tokens and log:
            log(f"{name} reads at most {budget} generated tokens: decoding stops there")
        with source.located():
            s = pipeline.generate(
                sb + sr, run_dir, settings, replace(gen, max_new_tokens=budget), methods=list(resolved), log=log
            )
        if log:
            made = f"{s['tokens']} tokens in {s['seconds']:.0f}s" if gen.logprobs else f"text only, in {s['seconds']:.0f}s"
            log(f"generated {s['generated']} questions ({made}); {s['already_done']} were already stored"
                if s["generated"] else f"all {s['planned']} questions already stored in {run_dir}: no generation")  # fmt: skip
            if s.get("samples_generated"):
                log(
                    f"sampled {s['samples_generated']} answers ({s['sample_tokens']} tokens); {s['samples_already_done']} were already stored"
                )
        with _store(run_dir) as st:
            fp0 = st.get_meta("fingerprint")
        ref_factory, ref_id = reference_backend(reference_model, fp0)
        pipeline.run_passes(run_dir, list(resolved), student_factory=settings.factory(gen), reference_factory=ref_factory,
                            reference_identity=ref_id, batch_size=gen.batch_size, ids={q.id for q in sb + sr}, log=log)  # fmt: skip
    sampling = audit_sampling(gen, budget, run_dir, list(resolved))
    tb, tr, fp, store_b, store_r = pick_traces(run_dir, sb, sr, sampling=sampling)
    read = pipeline.read_budget(resolved, budget)
    both = pipeline.at_budget(tb + tr, read, where=run_dir)
    tb, tr = both[: len(tb)], both[len(tb) :]
    sets = {
        "run": str(run_dir.resolve()),
        "method": name,
        "params": _stored_params(name, resolved),
        "max_new_tokens": read,
        "benchmark": {"source": bench_src, "ids": [q.id for q in sb], "store_ids": store_b},
        "reference": {**info, "ids": [q.id for q in sr], "store_ids": store_r},
        **({"sampling": sampling} if sampling else {}),
    }
    return finish(out, sets, tb, tr, fp, name, resolved, det, fdr=fdr, alpha=alpha, seed=seed, bootstrap=bootstrap, report=report)


def audit_from(src, *, out=None, run_dir=None, method: str | None = None, params: dict | None = None, fdr: float = 0.05,
               alpha: float = 0.05, seed: int = 0, bootstrap: int = 2000, report: bool = True) -> AuditReport:  # fmt: skip
    """Redo the statistics of a finished audit ``src`` from its stored traces (no model)."""
    from distill_detect import pipeline
    from distill_detect.detectors import get

    _check_levels(fdr, alpha, bootstrap)
    src = Path(src)
    sets_path = src / SETS_FILE
    if not sets_path.exists():
        raise DistillDetectError(f"{src}: no {SETS_FILE}; give the --out of an earlier 'distill-detect audit'")
    try:
        sets = json.loads(sets_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DistillDetectError(f"{sets_path}: not readable ({exc})") from None
    run_dir = Path(run_dir or sets["run"])
    if method or params:
        name, resolved, det = _resolve(method or sets["method"], params)
    else:  # the audited method, with the parameters it was audited with
        name, resolved, det = _resolve(sets["method"], None)
        stored = sets.get("params") or {}
        resolved = (
            {m: {**p, **(stored.get(m) or {})} for m, p in resolved.items()}
            if det is None
            else {name: {**resolved[name], **stored}}
        )
    sampling = sets.get("sampling")  # the answers the audit read, whatever the run sampled since
    if sampling is None and any("output_samples" in get(m).needs for m in resolved):
        sampling = pipeline.choose_sampling(run_dir)
    traces, fp, _ = pipeline.read_run(run_dir, sampling=sampling)
    by_id = {t.id: t for t in traces}
    b, r = sets["benchmark"], sets["reference"]
    missing = [i for i in b["store_ids"] + r["store_ids"] if i not in by_id]
    if missing:
        raise DistillDetectError(
            f"{run_dir}: {len(missing)} traces of the audit are missing (first: {missing[0]!r}); was the run moved?"
        )
    tb = [replace(by_id[s], id=i, label=None) for i, s in zip(b["ids"], b["store_ids"])]
    tr = [replace(by_id[s], id=i, label=0) for i, s in zip(r["ids"], r["store_ids"])]
    folds = CROSSFIT_FOLDS if det is None else 1
    if len(tr) < min_reference(fdr, folds):
        raise ConfigError(
            f"--fdr {fdr:g}: with {len(tr)} reference questions BH cannot flag any question"
            + (f" in {folds} folds" if folds > 1 else "")
            + f"; need at least {min_reference(fdr, folds)}"
        )
    cap = sets.get("max_new_tokens")
    read = pipeline.read_budget(resolved, cap or 10**9)
    common = pipeline.common_budget(tb + tr)
    if cap is None and read is not None:  # an audit from before budgets were recorded: read at the lowest cap, if any
        read = None if common is None else min(read, common)
    both = pipeline.at_budget(tb + tr, read, where=run_dir)
    tb, tr = both[: len(tb)], both[len(tb) :]
    sets = {
        **sets,
        "run": str(run_dir.resolve()),
        "method": name,
        "params": _stored_params(name, resolved),
        "max_new_tokens": read,
    }
    if sampling:
        sets["sampling"] = sampling
    return finish(Path(out) if out else src, sets, tb, tr, fp, name, resolved, det, fdr=fdr, alpha=alpha, seed=seed,
                  bootstrap=bootstrap, report=report)  # fmt: skip


def _store(run_dir):
    from distill_detect.store import TraceStore

    return TraceStore(run_dir)


def finish(
    out: Path, sets: dict, tb, tr, fp, name: str, resolved: dict, det, *, fdr, alpha, seed, bootstrap, report
) -> AuditReport:
    """Score, run the statistics, write every output; returns the report (nothing printed).

    ``resolved``: {detector: params}; ``det`` the one detector, or None for a combination of all of them.
    """
    from distill_detect import __version__, pipeline
    from distill_detect.audit import audit, audit_combined
    from distill_detect.report.data import finite_or_none
    from distill_detect.scoring import score_traces, write_outputs

    pipeline.check_trace_needs(tb + tr, resolved)
    raws = score_traces(tb + tr, resolved)
    for m, raw in raws.items():
        bad = ~np.isfinite(raw)
        if bad.any():
            first = (tb + tr)[int(np.flatnonzero(bad)[0])].id
            raise DistillDetectError(
                f"{m} gave {int(bad.sum())} non-finite score(s) (first: {first!r}); the audit needs a finite score per question"
            )
    n = len(tb)
    ids = [t.id for t in tb]
    if det is None:
        x = np.column_stack([raws[m] for m in resolved])
        res = audit_combined(ids, x[:n], x[n:], methods=list(resolved), fdr=fdr, alpha=alpha, n_boot=bootstrap, seed=seed)
        raw = res.scores  # no raw score of its own: the combined score is its raw score
        cf = res.combination.crossfit
        params = {"folds": cf.folds, "C": cf.C, "seed": cf.seed}  # the combination's own; the detectors' go in detector_params
    else:
        raw = raws[name][:n]
        res = audit(ids, raw, raws[name][n:], method=name, fdr=fdr, alpha=alpha, n_boot=bootstrap, seed=seed)
        params = resolved[name]
    out.mkdir(parents=True, exist_ok=True)
    doc = res.to_dict()
    for row, r in zip(doc["questions"], raw):
        row["raw_score"] = float(r)
    model = (fp or {}).get("model") or {}
    src = {"run": sets["run"], "fingerprint": fp, **({"sampling": sets["sampling"]} if sets.get("sampling") else {})}
    with _store(sets["run"]) as st:
        location = (st.get_meta("model") or {}).get("location")
    doc.update(
        {
            "method": name,
            "params": params,
            **({"detector_params": resolved} if det is None else {}),
            "higher_is_member": True if det is None else det.higher_is_member,
            "score_orientation": "score = membership score, higher = more likely seen; raw_score is in the method's own sign"
            if det is not None
            else "score = raw_score = out-of-fold combined score (log-odds of benchmark vs reference), higher = more likely seen",
            "benchmark": {"source": sets["benchmark"]["source"], "n": n},
            "reference": {k: v for k, v in sets["reference"].items() if k not in ("ids", "store_ids")} | {"n": len(tr)},
            "model": model.get("name") or model.get("hub_id"),
            "model_location": location,
            "source": src,
            "max_new_tokens": sets.get("max_new_tokens"),
            "package_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "notes": (_combined_notes(res) if det is None else [])
            + [
                "contaminated iff the one-sided Mann-Whitney test of benchmark vs reference scores gives p < alpha",
                "the estimated fraction is a lower bound: seen questions that the detector scores like unseen ones count as unseen",
                f"BH flags either no question or at least min_flaggable = {res.min_flaggable}; the smallest p-value is 1/(m+1)",
                "valid only if the reference is exchangeable with the benchmark's unseen questions (same source, style, difficulty)",
            ],
        }
    )
    write_json(out / AUDIT_FILE, finite_or_none(doc))
    write_json(out / SETS_FILE, sets)
    write_csv(out / CSV_FILE, tb, doc["questions"])
    config = {"source": src, "methods": resolved, "audit": str(out / AUDIT_FILE),
              "model_location": location}  # fmt: skip
    write_outputs(out, tb + tr, raws, None, config)  # each detector's raw scores (a combination: its inputs)
    rep = AuditReport(res, doc, sets, context_lines(res, name, params, det, sets, doc), out)
    if report:
        from distill_detect.report import write_report

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "only one class": the audit section says what matters
            rep.report_path = write_report(out, traces=tb + tr)
    return rep


def _combined_notes(res) -> list[str]:
    c = res.combination
    return [
        f"scores: {c.describe()}, learned without membership labels (benchmark vs reference); each question is scored by "
        "the fit on the other folds and compared with its own fold's reference questions only",
        f"the dataset test is one Mann-Whitney test per fold, joined by Bonferroni (p = {c.folds} x the smallest); "
        f"BH runs within each fold at fdr/{c.folds} (FDR <= fdr over the union, under any dependence between folds)",
    ]
