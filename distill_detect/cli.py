"""Command line: ``distill-detect SUBCOMMAND``. Each subcommand is one library call.

``main(argv) -> int`` never raises for user errors: a ``DistillDetectError`` becomes one
line on stderr and exit code 2 (a traceback only with ``--debug``); Ctrl-C exits 130
after saying how far the run got.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path

from distill_detect import __version__
from distill_detect.errors import ConfigError, DistillDetectError

# Subcommands that live in their own modules: each module has add_cli(subparsers).
EXTRA_COMMANDS: list[str] = [
    "distill_detect.finetune",
    "distill_detect.report",
    "distill_detect.distributed",
    "distill_detect.audit_cli",
]

EXAMPLES = {
    "generate": """example:
  distill-detect generate --questions bundled:gsm8k_test --limit 20 --out runs/gsm8k --max-new-tokens 300
  distill-detect generate --model ./my-student --questions bench.jsonl --field problem --out runs/bench --batch-size 8

Run the same command again after an interruption: finished questions are kept, the rest are generated.""",
    "score": """example:
  distill-detect score --run runs/gsm8k --out results/gsm8k
  distill-detect score --traces api_logs.jsonl --out results/api --tpd-tokens 100 --tpd-alpha 0.4""",
    "export": """example:
  distill-detect export runs/gsm8k --out gsm8k_traces.jsonl""",
    "run": """example:
  distill-detect run --members bundled:gsm8k_train_sample --nonmembers bundled:gsm8k_test --limit 32 --out results/demo --max-new-tokens 64
  distill-detect run --model ./student --members seen.jsonl --nonmembers unseen.jsonl --out results/student""",
}


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default="default", help="local HF checkpoint directory, hub id, or 'default' (embedded SmolLM2-135M-Instruct)"
    )
    g.add_argument("--backend", default="hf", help="generation backend (default: hf)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--system-prompt", default=None, help="system turn (default: the chat template's own)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")
    g.add_argument("--batch-size", type=int, default=8, help="questions decoded together (default: 8)")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the hf and llamacpp backends (default: torch's / every core); 1 is fastest on a busy machine",
    )
    g.add_argument(
        "--no-fused",
        dest="fused",
        action="store_const",
        const=False,
        default=None,
        help="hf backend on CPU: decode through transformers' modules instead of the fused Llama-family forward",
    )
    g.add_argument("--max-new-tokens", type=int, default=1000, help="cap on generated tokens (default: 1000)")
    g.add_argument("--no-prompt-logprobs", action="store_true", help="skip question-token log-probs (only TPD/output methods)")


def _scale_args(p: argparse.ArgumentParser, shard: bool = False) -> None:
    """--base-url, --concurrency, --workers, --shard ... (backends/capabilities.py)."""
    from distill_detect.backends.capabilities import add_backend_args

    add_backend_args(p, shard=shard)


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--field", default="question", help="name of the question field/column (default: question)")
    p.add_argument("--id-field", default="id", help="name of the id field (default: id; missing ids = hash of the text)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions of each file")


def _method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("methods")
    g.add_argument("--methods", default="tpd", help="comma-separated detectors (see 'distill-detect methods'); default: tpd")
    g.add_argument("--tpd-tau", type=float, default=None, help="TPD probability threshold tau in (0, 1] (default 1.0)")
    g.add_argument("--tpd-alpha", type=float, default=None, help="TPD exponent alpha > 0 (default 0.6)")
    g.add_argument("--tpd-tokens", type=int, default=None, help="TPD budget M: first M generated tokens (default 300)")
    g.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="any detector parameter, e.g. out_ppl.max_tokens=300",
    )
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC interval (default 1000)")
    g.add_argument("--no-report", action="store_true", help="skip the HTML report and TPD ablations")


def _reference_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reference-model",
        default=None,
        help="the model before distillation (the student's base), for the 'reference' and 'tpd_ref' methods",
    )


def _reference_factory(args, fingerprint: dict | None):
    """(factory, identity) of the reference model, loaded like the student (same dtype/device/template)."""
    if not getattr(args, "reference_model", None):
        return None, None
    from distill_detect.models import resolve_model

    ref = resolve_model(args.reference_model)
    fp = fingerprint or {}

    def make():
        from distill_detect.backends import make_backend

        return make_backend(
            "hf",
            model=args.reference_model,
            dtype=fp.get("dtype", "auto"),
            device=fp.get("device", "auto"),
            system_prompt=fp.get("system_prompt"),
        )

    return make, ref.identity


def _student_factory_from_run(run_dir, fingerprint: dict | None):
    """Reload the model that generated a run (for passes run at scoring time)."""
    from distill_detect.store import TraceStore

    with TraceStore(run_dir) as st:
        where = st.get_meta("model") or {}
    fp = fingerprint or {}

    def make():
        from distill_detect.backends import make_backend

        if not where.get("location"):
            raise DistillDetectError(
                f"{run_dir} does not record where its model came from; use 'distill-detect run' to compute these methods"
            )
        return make_backend(
            where.get("backend") or "hf",
            model=where["location"],
            dtype=fp.get("dtype", "auto"),
            device=fp.get("device", "auto"),
            system_prompt=fp.get("system_prompt"),
        )

    return make


def _parse_params(args) -> tuple[list[str], dict[str, dict]]:
    from distill_detect.detectors import parse_methods

    methods = parse_methods(args.methods)
    params: dict[str, dict] = {}
    for flag, key in (("tpd_tau", "tau"), ("tpd_alpha", "alpha"), ("tpd_tokens", "max_tokens")):
        v = getattr(args, flag)
        if v is not None:
            params.setdefault("tpd", {})[key] = v
    for item in args.param:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--param {item!r}: expected METHOD.NAME=VALUE, e.g. tpd.alpha=0.4")
        lhs, value = item.split("=", 1)
        method, name = lhs.split(".", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        params.setdefault(method, {})[name] = parsed
    for m in params:
        if m not in methods:
            raise ConfigError(f"parameters given for {m!r}, which is not among --methods ({','.join(methods)})")
    from distill_detect.detectors.tpd import check_tpd_params
    from distill_detect.scoring import resolve_methods

    resolved = resolve_methods(methods, params)
    if "tpd" in resolved:
        check_tpd_params(**resolved["tpd"])
    return methods, resolved


def _backend_factory(args, methods=None):
    def make():
        from distill_detect.backends import make_backend
        from distill_detect.backends.capabilities import backend_kwargs

        common = dict(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            system_prompt=args.system_prompt,
            prompt_logprobs=not args.no_prompt_logprobs,
            trust_remote_code=args.trust_remote_code,
        )
        return make_backend(args.backend, **backend_kwargs(args.backend, args, common))

    from distill_detect.backends import get_backend_class
    from distill_detect.backends.capabilities import checked_factory

    get_backend_class(args.backend)  # an unknown name fails before anything is loaded
    # Methods the backend cannot run are refused now, and again once it is up (a server's echo support).
    return checked_factory(make, args, methods)


def _load(path, args, label=None):
    from distill_detect.data import load_questions

    qs = load_questions(path, field=args.field, id_field=args.id_field, label=label)
    qs = qs[: args.limit] if args.limit else qs
    # Which file each question came from: an error found later (e.g. too long for the model) names file and line.
    vars(args).setdefault("_sources", {}).update((q.id, path) for q in qs)
    return qs


def _locate(exc: DistillDetectError, args) -> DistillDetectError:
    """An InputError about one question (its path is the question id) re-aimed at the input file and line."""
    from distill_detect.data import question_line
    from distill_detect.errors import InputError

    src = getattr(args, "_sources", {}).get(getattr(exc, "path", None))
    if not isinstance(exc, InputError) or exc.line is not None or src is None:
        return exc
    line = question_line(src, exc.path, field=args.field, id_field=args.id_field)
    return InputError(src, f"question {exc.path!r}: {exc.problem}", line=line, field=exc.field)


def _check_gen_args(args) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


# -- subcommands -------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    from distill_detect.distributed import run_generation

    _check_gen_args(args)
    qs = _load(args.questions, args, label=args.label)
    s = run_generation(
        qs, args.out, _backend_factory(args), args, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, log=_say
    )
    rate = f", {s['tokens'] / s['seconds']:.1f} tok/s" if s["tokens"] else ""
    _say(
        f"{args.out}: {s['planned']} questions, {s['generated']} generated now ({s['tokens']} tokens{rate}), {s['already_done']} already stored"
    )
    return 0


def cmd_score(args) -> int:
    from distill_detect.pipeline import load_run_traces, score_and_write, summarize_missing

    methods, resolved = _parse_params(args)
    if bool(args.run) == bool(args.traces):
        raise ConfigError("give exactly one of --run RUN or --traces T.jsonl")
    if args.run:
        from distill_detect.pipeline import run_passes

        _, fp, _ = load_run_traces(args.run)
        ref_factory, ref_id = _reference_factory(args, fp)
        run_passes(
            args.run,
            methods,
            student_factory=_student_factory_from_run(args.run, fp),
            reference_factory=ref_factory,
            reference_identity=ref_id,
            batch_size=args.batch_size,
            log=_say,
        )
        traces, fp, counts = load_run_traces(args.run)
        model_location = _run_model_location(args.run)
        if not traces:
            raise DistillDetectError(f"{args.run}: no traces stored yet; run 'distill-detect generate' first")
        missing = summarize_missing(counts["questions"], len(traces), args.run)
        if missing:
            warnings.warn(missing + " (scoring what is there)")
        source = {"run": str(Path(args.run).resolve()), "fingerprint": fp}
    else:
        model_location = None
        from distill_detect.traceio import read_traces_jsonl

        traces = read_traces_jsonl(args.traces)
        source = {"traces": str(Path(args.traces).resolve())}
    _check_trace_needs(traces, resolved)
    config = {"source": source, "methods": resolved, "model_location": model_location}
    doc = score_and_write(traces, resolved, args.out, config, n_resamples=args.bootstrap)
    _print_result(doc, args.out, len(traces))
    _finish_with_report(args, traces, resolved)
    return 0


def _check_trace_needs(traces, resolved) -> None:
    """Fail before scoring when a method needs something the traces lack (names the field and its source)."""
    from distill_detect.detectors import check_needs

    for name in resolved:
        check_needs(name, traces)


def _print_result(doc, out_dir, n: int) -> None:
    from distill_detect.scoring import format_table

    if doc["methods"]:
        print(format_table(doc["methods"]))
    else:
        print(f"{n} questions scored (no labels, so no metrics)")
    print(
        f"\nscores: {Path(out_dir) / 'scores.jsonl'}" + (f"\nmetrics: {Path(out_dir) / 'metrics.json'}" if doc["methods"] else "")
    )


def cmd_export(args) -> int:
    from distill_detect.store import TraceStore
    from distill_detect.traceio import write_traces_jsonl

    with TraceStore(args.run) as store:
        n = write_traces_jsonl(args.out, store.traces())
        total = store.counts()["questions"]
    _say(
        f"wrote {n} traces to {args.out}"
        + (f" ({total - n} of {total} planned questions not generated yet)" if n < total else "")
    )
    return 0


def cmd_run(args) -> int:
    from distill_detect.data import combine_labelled
    from distill_detect.distributed import run_generation
    from distill_detect.pipeline import load_run_traces, score_and_write
    from distill_detect.scoring import generation_budget

    _check_gen_args(args)
    methods, resolved = _parse_params(args)
    members = _load(args.members, args)
    nonmembers = _load(args.nonmembers, args)
    qs = combine_labelled(
        members, nonmembers, members_path=args.members, nonmembers_path=args.nonmembers, field=args.field, id_field=args.id_field
    )
    budget = generation_budget(resolved, args.max_new_tokens)
    if budget < args.max_new_tokens:
        _say(f"the requested methods read at most {budget} generated tokens: decoding stops there")
    run_dir = Path(args.out) / "run"
    s = run_generation(
        qs, run_dir, _backend_factory(args, methods), args, max_new_tokens=budget, batch_size=args.batch_size, log=_say
    )
    if s["tokens"]:
        _say(
            f"generated {s['generated']} questions, {s['tokens']} tokens in {s['seconds']:.0f}s ({s['tokens'] / s['seconds']:.1f} tok/s)"
        )
    wanted = {q.id for q in qs}
    from distill_detect.pipeline import run_passes

    _, fp0, _ = load_run_traces(run_dir)
    ref_factory, ref_id = _reference_factory(args, fp0)
    run_passes(
        run_dir,
        methods,
        student_factory=_backend_factory(args),
        reference_factory=ref_factory,
        reference_identity=ref_id,
        batch_size=args.batch_size,
        ids=wanted,
        log=_say,
    )
    traces, fp, _ = load_run_traces(run_dir, max_new_tokens=budget)
    traces = [t for t in traces if t.id in wanted]
    _check_trace_needs(traces, resolved)
    config = {
        "source": {"run": str(run_dir.resolve()), "fingerprint": fp},
        "reference_model": ref_id,
        "methods": resolved,
        "members": str(args.members),
        "nonmembers": str(args.nonmembers),
        "limit": args.limit,
        "max_new_tokens": budget,
    }
    config["model_location"] = _run_model_location(run_dir)
    doc = score_and_write(traces, resolved, args.out, config, n_resamples=args.bootstrap)
    _print_result(doc, args.out, len(traces))
    _finish_with_report(args, traces, resolved)
    return 0


def _run_model_location(run_dir):
    from distill_detect.store import TraceStore

    with TraceStore(run_dir) as st:
        return (st.get_meta("model") or {}).get("location")


def _finish_with_report(args, traces, resolved) -> None:
    """TPD ablations (from the stored traces) and the HTML report, unless --no-report."""
    if getattr(args, "no_report", False):
        return
    from distill_detect.report import write_report

    labels = [t.label for t in traces]
    if "tpd" in resolved and len(set(x for x in labels if x is not None)) == 2:
        from distill_detect.ablation import tpd_ablation, write_ablations

        write_ablations(args.out, tpd_ablation(traces, labels))
    print(f"report: {write_report(args.out, traces=traces)}")


def cmd_methods(args) -> int:
    from distill_detect.detectors import REGISTRY

    for name, det in REGISTRY.items():
        direction = "higher = member" if det.higher_is_member else "lower = member"
        params = ", ".join(f"{k}={v}" for k, v in det.defaults.items())
        print(f"{name:<12} {direction:<16} {params}\n{'':<12} {det.summary}")
    return 0


def cmd_datasets(args) -> int:
    from distill_detect.data import bundled_sets

    for name, desc in bundled_sets().items():
        print(f"bundled:{name:<20} {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="distill-detect",
        description="Find the questions a language model was distilled on, from the probabilities of its own greedy tokens (TPD) and baselines.",
        epilog="Start with 'make demo', or: distill-detect run --members bundled:gsm8k_train_sample "
        "--nonmembers bundled:gsm8k_test --limit 16 --max-new-tokens 64 --out results/demo",
    )
    parser.add_argument("--version", action="version", version=f"distill-detect {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "generate",
        help="greedy-decode questions with per-token log-probs into a resumable run",
        epilog=EXAMPLES["generate"],
        formatter_class=fmt,
    )
    p.add_argument("--questions", required=True, help="JSONL/CSV/TSV/Parquet file, or bundled:NAME")
    p.add_argument("--out", required=True, help="run directory (created; resumable)")
    p.add_argument("--label", type=int, choices=(0, 1), default=None, help="label every question 1 (member) or 0 (non-member)")
    _input_args(p)
    _model_args(p)
    _scale_args(p, shard=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "score",
        help="score stored traces with detectors; write scores.jsonl and metrics.json",
        epilog=EXAMPLES["score"],
        formatter_class=fmt,
    )
    p.add_argument("--run", help="run directory written by 'generate'")
    p.add_argument("--traces", help="traces JSONL (the format 'export' writes)")
    p.add_argument("--out", required=True, help="output directory")
    _method_args(p)
    _reference_arg(p)
    p.add_argument("--batch-size", type=int, default=8, help="batch size of extra model passes (lowercase, reference)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "export", help="write a run's traces as JSONL (works on unfinished runs)", epilog=EXAMPLES["export"], formatter_class=fmt
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "run", help="generate + score members against non-members in one go", epilog=EXAMPLES["run"], formatter_class=fmt
    )
    p.add_argument("--members", required=True, help="questions known to be in the distillation data")
    p.add_argument("--nonmembers", required=True, help="questions known not to be")
    p.add_argument("--out", required=True, help="output directory (the run is stored in OUT/run)")
    _input_args(p)
    _model_args(p)
    _scale_args(p)
    _method_args(p)
    _reference_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("methods", help="list the detectors, their direction and parameters")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("datasets", help="list the question sets bundled with the package")
    p.set_defaults(func=cmd_datasets)

    for mod in EXTRA_COMMANDS:
        importlib.import_module(mod).add_cli(sub)
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    old = warnings.showwarning
    warnings.showwarning = _warning_line
    try:
        return int(args.func(args) or 0)
    except DistillDetectError as exc:
        if args.debug:
            raise
        print(f"distill-detect: error: {_locate(exc, args)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        msg = str(exc) or "interrupted; every finished batch is stored: run the same command again to resume"
        print(f"distill-detect: {msg}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into head
        return 0
    except OSError as exc:  # a full disk or a permission problem the code above did not word itself
        if args.debug:
            raise
        where = exc.filename or getattr(args, "out", None) or getattr(args, "dir", None)
        where = f" {where}" if where else ""
        print(f"distill-detect: error: could not read or write{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = old


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
