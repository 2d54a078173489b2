"""Assemble the report: read a results directory, compute the figure data, write the HTML and PNGs.

``collect(out_dir, traces=..., tokenizer=...)`` returns the one JSON document the page
draws from; ``render_html(doc)`` turns it into a self-contained page; ``write_report``
does both and writes the matplotlib PNGs next to it.

Safety: the page never interprets data as markup. The data travels as JSON inside a
``<script type="application/json">`` block in which ``<``, ``>`` and ``&`` are written as
``\\u003c``, ``\\u003e`` and ``\\u0026`` (so no ``</script>`` can appear in it), and the
page's script inserts every data-derived string with ``textContent``. A Content
Security Policy lets only the page's own script (by its sha256) run and forbids every
network request, so even markup that slipped through could neither run nor load.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np

from distill_detect.errors import DistillDetectError
from distill_detect.report import data as D

_HERE = Path(__file__).parent

TPD_DEFAULTS = {"tau": 1.0, "alpha": 0.6, "max_tokens": 300}


def load_traces(config: dict, out_dir: Path):
    """Traces named by the run config (a run directory or a traces file), or (None, why not)."""
    src = config.get("source") or {}
    candidates = []
    if src.get("run"):
        candidates.append(("run", Path(src["run"])))
    if src.get("traces"):
        candidates.append(("traces", Path(src["traces"])))
    if not candidates and (out_dir / "run").is_dir():
        candidates.append(("run", out_dir / "run"))
    for kind, path in candidates:
        try:
            if kind == "run":
                from distill_detect.pipeline import load_run_traces

                return load_run_traces(path)[0], f"run {path}"
            from distill_detect.traceio import read_traces_jsonl

            return read_traces_jsonl(path), f"traces {path}"
        except Exception as exc:  # moved or deleted: the report still shows the scores
            warnings.warn(f"report: could not read the traces from {path} ({exc}); tokens are left out", stacklevel=3)
            return None, f"traces not readable: {path}"
    return None, "the results do not say where the traces are"


def _read_audit(out_dir: Path) -> dict | None:
    """The audit section's data from ``DIR/audit.json`` (written by ``distill-detect audit``), or None.

    Per-question rows are sorted most member-like first (smallest p-value).
    """
    path = out_dir / "audit.json"
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warnings.warn(f"report: {path} is not readable JSON ({exc}); the audit section is left out", stacklevel=3)
        return None
    keep = ("verdict", "contaminated", "n_bench", "n_ref", "fdr", "alpha", "n_flagged", "min_flaggable", "min_pvalue")
    keep += ("dataset_test", "fraction", "method", "params", "higher_is_member", "benchmark", "reference", "model", "notes")
    out = {k: doc.get(k) for k in keep}
    rows = doc.get("questions") or []
    out["questions"] = sorted(rows, key=lambda r: (r.get("pvalue", 1.0), -(r.get("score") or 0.0)))
    out["source"] = doc.get("source")
    out["created"], out["package_version"] = doc.get("created"), doc.get("package_version")
    return out


def _store_model_location(run) -> str | None:
    """Where a run's model was loaded from (its store's ``model`` meta), read without writing; or None."""
    import sqlite3

    path = Path(run) / "traces.sqlite"
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
        finally:
            db.close()
        return (json.loads(row[0]) or {}).get("location") if row else None
    except (sqlite3.Error, ValueError, TypeError, AttributeError):
        return None


def _finetune_base(ckpt: Path) -> str | None:
    """'BASE fine-tune' for a checkpoint written by ``distill-detect finetune`` (its marker names the base)."""
    try:
        meta = json.loads((ckpt / "distill_detect_finetune.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    b = meta.get("base_model") or {}
    ident = b.get("identity") or {}
    base = ident.get("hub_id") or ident.get("name") or b.get("spec")
    if not base:
        return None
    return f"{base} LoRA fine-tune" if (meta.get("config") or {}).get("lora") else f"{base} fine-tune"


def _architecture(ckpt: Path) -> str | None:
    try:
        cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    return mt if isinstance(mt, str) and mt else None


def describe_model(config: dict) -> tuple[str | None, dict]:
    """What the model is, in words, and the facts behind it, from the run config's fingerprint.

    The fingerprint's ``model.name`` of a checkpoint directory is only the directory's name
    (often 'student'), so the line says what the checkpoint is (the base it was fine-tuned
    from, when ``distill-detect finetune`` made it; else its architecture) and where it is,
    then the backend, dtype and device it ran with:
    'SmolLM2-135M-Instruct fine-tune at /runs/student (hf, float32, cpu)'.
    """
    src = config.get("source") or {}
    fp = src.get("fingerprint") or {}
    ident = fp.get("model") or {}
    location = config.get("model_location")
    if not location and src.get("run"):
        location = _store_model_location(src["run"])
    info = {k: v for k, v in {"identity": ident or None, "location": location}.items() if v}
    info.update({k: fp[k] for k in ("backend", "dtype", "device") if fp.get(k)})
    name, hub = ident.get("name"), ident.get("hub_id")
    if hub:
        rev = ident.get("revision")
        what = f"{hub} from the Hugging Face hub" + (f" at revision {str(rev)[:7]}" if rev else "")
    elif ident.get("gguf_sha256"):
        what = f"{name or 'GGUF model'} (GGUF sha256 {str(ident['gguf_sha256'])[:12]})" + (f" at {location}" if location else "")
    elif location and Path(location).is_dir():
        kind = _finetune_base(Path(location))
        if kind is None:
            arch = _architecture(Path(location))
            kind = f"{arch} checkpoint" if arch else "checkpoint"
        what = f"{kind} at {location}"
    elif name or location:
        h = ident.get("content_hash")
        what = f"checkpoint directory '{name}'" if name else "checkpoint"
        if h:
            what += f" (content hash {str(h)[:12]})"
        if location:
            what += f", was at {location}"
    else:
        return None, info
    settings = [str(fp[k]) for k in ("backend", "dtype", "device") if fp.get(k)]
    return (what + (f" ({', '.join(settings)})" if settings else "")), info


def _tpd_params(metrics_doc: dict) -> dict:
    m = (metrics_doc.get("methods") or {}).get("tpd") or {}
    params = m.get("params") or ((metrics_doc.get("config") or {}).get("methods") or {}).get("tpd") or {}
    return {**TPD_DEFAULTS, **params}


def _summary(method: str) -> str:
    try:
        from distill_detect.detectors import get

        return get(method).summary
    except Exception:
        return ""


GROUP_NAMES = {"member": "members", "nonmember": "non-members", "unlabelled": "unlabelled"}
AUDIT_GROUP_NAMES = {"member": "members", "nonmember": "reference questions", "unlabelled": "benchmark questions"}
"""In an audit, label 0 marks the reference (known unseen) and no label the benchmark under audit."""


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _pct(v) -> str:
    v = _num(v)
    return "–" if v is None else f"{100 * v:.1f}%"


def _cards(meta: dict, method_docs: list[dict], audit: dict | None) -> list[dict]:
    """The headline cards at the top of the page: ``{"k": title, "v": value, "s": sub-line, "warn": caveat}``.

    An audit has no known members: its cards count benchmark, reference and flagged
    questions. A labelled run counts members and non-members and gives the headline
    method's AUC and TPRs, each TPR with a warning when fewer than 100 non-members set it.
    """
    if audit is not None:
        nb, nr = audit.get("n_bench"), audit.get("n_ref")
        ref = audit.get("reference") or {}
        fdr = _num(audit.get("fdr"))
        return [
            {"k": "benchmark questions", "v": str(nb), "s": "under audit; labels unknown"},
            {
                "k": "reference questions",
                "v": str(nr),
                "s": "perturbed from the benchmark" if ref.get("kind") == "perturbed" else "known unseen, the yardstick",
            },
            {
                "k": "flagged questions",
                "v": f"{audit.get('n_flagged')} of {nb}",
                "s": "benchmark questions flagged" + (f" at FDR {100 * fdr:g}%" if fdr is not None else ""),
            },
        ]
    cards = [
        {
            "k": "questions",
            "v": str(meta["n_questions"]),
            "s": f"{meta['n_unlabelled']} unlabelled" if meta["n_unlabelled"] else "",
        },
        {"k": "members", "v": str(meta["n_members"]), "s": "in the distillation data"},
        {"k": "non-members", "v": str(meta["n_nonmembers"]), "s": "never trained on"},
    ]
    with_metrics = [m for m in method_docs if m.get("metrics")]
    headline = next((m for m in with_metrics if m["name"] == "tpd"), None)
    if headline is None and with_metrics:
        headline = max(with_metrics, key=lambda m: _num(m["metrics"].get("auc")) or -1.0)
    if headline is not None:
        mm, name = headline["metrics"], headline["name"]
        ci = mm.get("auc_ci") or [None, None]
        lo, hi = (_num(ci[0]), _num(ci[1])) if len(ci) == 2 else (None, None)
        auc = _num(mm.get("auc"))
        cards.append(
            {
                "k": f"{name} AUC",
                "v": "–" if auc is None else f"{auc:.3f}",
                "s": f"95% CI {lo:.3f}–{hi:.3f}" if lo is not None and hi is not None else "",
            }
        )
        cav = headline.get("tpr_caveat") or {}
        cards.append(
            {
                "k": f"{name} TPR@1%FPR",
                "v": _pct(mm.get("tpr_at_1pct_fpr_strict")),
                "s": "strict; paper's reading " + _pct(mm.get("tpr_at_1pct_fpr")),
                "warn": cav.get("0.01"),
            }
        )
        cards.append({"k": f"{name} TPR@5%FPR", "v": _pct(mm.get("tpr_at_5pct_fpr")), "s": "", "warn": cav.get("0.05")})
    return cards


def collect(out_dir, *, traces=None, tokenizer=None) -> dict:
    """Everything the report shows, as one JSON-ready document."""
    out_dir = Path(out_dir)
    scores_path = out_dir / "scores.jsonl"
    if not scores_path.exists():
        raise DistillDetectError(f"{out_dir}: no scores.jsonl; run 'distill-detect score' or 'run' with --out {out_dir} first")
    rows, methods = D.read_scores(scores_path)
    metrics_path = out_dir / "metrics.json"
    metrics_doc = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
    config = metrics_doc.get("config") or {}
    audit = _read_audit(out_dir)
    if audit:
        # An audit directory has no metrics.json: its audit.json says where the traces are.
        src = audit.pop("source", None)
        if not config.get("source") and src:
            config = {**config, "source": src, "created": audit.get("created"), "package_version": audit.get("package_version")}
    for m in metrics_doc.get("methods") or {}:
        if m not in methods:
            methods.append(m)

    n = len(rows)
    y = np.array([int(r["label"]) if r.get("label") is not None else -1 for r in rows], dtype=int)
    has_labels = bool((y == 1).any() and (y == 0).any())
    groups = {"member": y == 1, "nonmember": y == 0, "unlabelled": y == -1}
    groups = {k: v for k, v in groups.items() if v.any()}

    # -- per method: metrics, ROC, histogram, verdicts ---------------------------------------------
    method_docs = []
    for name in methods:
        raw = np.array([r.get(name, math.nan) if r.get(name) is not None else math.nan for r in rows], dtype=np.float64)
        higher = D.higher_is_member(name, metrics_doc)
        block = (metrics_doc.get("methods") or {}).get(name)
        doc = {
            "name": name,
            "higher_is_member": higher,
            "summary": _summary(name),
            "params": (block or {}).get("params") or ((config.get("methods") or {}).get(name)) or {},
            "metrics": {k: v for k, v in (block or {}).items() if k not in ("params", "higher_is_member")} or None,
            "hist": D.histogram(raw, groups),
            "roc": None,
            "verdicts": {},
        }
        finite = np.isfinite(raw)
        n_non = (block or {}).get("n_nonmembers")
        if n_non is None:
            n_non = int(((y == 0) & finite).sum())
        doc["tpr_caveat"] = {f"{lv:g}": D.tpr_caveat(n_non, lv) for lv in D.FPR_LEVELS}
        if higher is not None and finite.any():
            s = np.where(finite, D.oriented(np.nan_to_num(raw), higher), -np.inf)
            lab = (y >= 0) & finite
            if has_labels:
                doc["roc"] = D.roc_points(y[lab], s[lab])
            v = D.verdicts(np.where(finite, y, -2), np.where(finite, s, -np.inf))
            for blk in v.values():
                # Threshold back in the method's own sign, for display ("TPD < 0.41").
                blk["threshold_raw"] = blk["threshold"] if higher else -blk["threshold"]
                blk["caveat"] = D.tpr_caveat(int(((y == 0) & finite).sum()), blk["level"])
            doc["verdicts"] = v
        method_docs.append(doc)

    # -- tokens --------------------------------------------------------------------------------------
    tpd = _tpd_params(metrics_doc)
    if audit and audit.get("method") == "tpd" and not metrics_doc:
        tpd = {**TPD_DEFAULTS, **(audit.get("params") or {})}
    M, tau = int(tpd["max_tokens"]), float(tpd["tau"])
    trace_note = "traces given by the caller"
    if traces is None:
        traces, trace_note = load_traces(config, out_dir)
    by_id = {t.id: t for t in traces} if traces else {}
    tok, tok_note = (None, "no generated-token ids in the traces")
    if by_id and any(t.output_ids is not None for t in by_id.values()):
        from distill_detect.report.tokens import resolve_tokenizer

        tok, tok_note = resolve_tokenizer(tokenizer, config=config)
    vocab_ids: set[int] = set()
    token_rows, first_probs, first_labels = [], [], []
    questions = []
    for i, r in enumerate(rows):
        qid = str(r["id"])
        t = by_id.get(qid)
        q = {
            "id": qid,
            "label": None if y[i] < 0 else int(y[i]),
            "text": (t.question if t is not None else None),
            "scores": {m: r.get(m) for m in methods},
        }
        if t is not None and t.samples is not None:  # the text-only methods' evidence: how many sampled answers
            q["samples"] = {"n": t.samples.n, "temperature": t.samples.temperature}
        if t is not None and t.output_logprobs is not None:  # a text-only trace has no token probabilities to show
            lp = np.asarray(t.output_logprobs, dtype=np.float64)
            p = np.exp(lp[:M])  # float64, exactly as tpd_score computes it
            q["n_tokens"] = int(t.num_tokens)
            q["finish"] = t.finish_reason
            q["n_low"] = int((p < 0.9).sum())
            ids = None if t.output_ids is None else [int(x) for x in t.output_ids[:M]]
            if ids is not None:
                vocab_ids.update(ids)
            token_rows.append(
                {
                    "ids": ids,
                    "p": [float(f"{x:.6g}") for x in p],
                    "in": "".join("1" if x < tau else "0" for x in p),
                    "more": max(int(t.num_tokens) - M, 0),
                }
            )
            first_probs.append(p)
            first_labels.append(int(y[i]))
        else:
            token_rows.append(None)
        questions.append(q)
    vocab = None
    if tok is not None and vocab_ids:
        from distill_detect.report.tokens import decode_each

        vocab = {str(k): v for k, v in decode_each(tok, vocab_ids).items()}

    ablations = None
    ab_path = out_dir / "ablations.json"
    if ab_path.exists():
        try:
            ablations = json.loads(ab_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            warnings.warn(f"report: {ab_path} is not readable JSON ({exc}); ablations left out", stacklevel=2)
    if isinstance(ablations, dict):
        ablations["tpr_caveat"] = {f"{lv:g}": D.tpr_caveat(ablations.get("n_nonmembers"), lv) for lv in D.FPR_LEVELS}

    src = config.get("source") or {}
    model_line, model_info = describe_model(config)
    meta = {
        "out_dir": str(out_dir.resolve()),
        "created": config.get("created"),
        "package_version": config.get("package_version"),
        "source": src.get("run") or src.get("traces"),
        "model": model_line,
        "model_info": model_info,
        "members": config.get("members"),
        "nonmembers": config.get("nonmembers"),
        "max_new_tokens": config.get("max_new_tokens"),
        "n_questions": n,
        "n_members": int((y == 1).sum()),
        "n_nonmembers": int((y == 0).sum()),
        "n_unlabelled": int((y == -1).sum()),
        "traces": trace_note if by_id else f"no traces: {trace_note}",
        "tokenizer": tok_note if vocab is not None else (tok_note if by_id else None),
    }
    return D.finite_or_none(
        {
            "kind": "audit" if audit is not None else "labelled",
            "meta": meta,
            "cards": _cards(meta, method_docs, audit),
            "group_names": AUDIT_GROUP_NAMES if audit is not None else GROUP_NAMES,
            "label_names": {"0": "reference", "none": "benchmark"}
            if audit is not None
            else {"1": "member", "0": "non-member", "none": "unlabelled"},
            "has_labels": has_labels,
            "methods": method_docs,
            "questions": questions,
            "tokens": {
                "available": bool(by_id),
                "M": M,
                "tau": tau,
                "alpha": float(tpd["alpha"]),
                "vocab": vocab,
                "rows": token_rows,
            },
            "token_hist": D.token_probability_histogram(first_probs, first_labels) if first_probs else None,
            "ablations": ablations,
            "audit": audit,
            "levels": list(D.FPR_LEVELS),
        }
    )


# -- HTML -------------------------------------------------------------------------------------------


def embed_json(doc) -> str:
    """JSON for a ``<script type="application/json">`` block: nothing in it can end the block.

    >>> embed_json({"q": "</script><b>&"})
    '{"q": "\\\\u003c/script\\\\u003e\\\\u003cb\\\\u003e\\\\u0026"}'
    """
    text = json.dumps(doc, ensure_ascii=False, allow_nan=False)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src '%(script_hash)s'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'">
<title>distill-detect report</title>
<style>
%(css)s
</style>
</head>
<body>
<noscript><p class="noscript">This report draws its tables and charts with JavaScript; please enable it for this file.</p></noscript>
<div id="app"></div>
<script type="application/json" id="report-data">%(data)s</script>
<script>%(js)s</script>
</body>
</html>
"""


def render_html(doc: dict) -> str:
    """The self-contained page for a document from ``collect``."""
    css = (_HERE / "report.css").read_text(encoding="utf-8")
    js = (_HERE / "report.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    return _PAGE % {"css": css, "js": js, "data": embed_json(doc), "script_hash": f"sha256-{digest}"}


def write_report(out_dir, *, traces=None, tokenizer=None, figures: bool = True) -> Path:
    """Write ``out_dir/report.html`` (and ``out_dir/figures/*.png`` when matplotlib is there).

    ``out_dir`` is a results directory (``scores.jsonl``, ``metrics.json``, optionally
    ``ablations.json``). ``traces`` defaults to those the results were computed from;
    ``tokenizer`` (an object with ``decode``, or a path) turns token ids into text.
    """
    out_dir = Path(out_dir)
    doc = collect(out_dir, traces=traces, tokenizer=tokenizer)
    path = out_dir / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_html(doc), encoding="utf-8")
    tmp.replace(path)
    if figures:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            warnings.warn(
                "report: matplotlib is not installed, so no PNG figures (pip install 'distill-detect[plot]')", stacklevel=2
            )
        else:
            from distill_detect.report.figures import write_figures

            write_figures(doc, out_dir / "figures")
    return path
