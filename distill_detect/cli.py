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
  distill-detect generate --questions bundled:gsm8k_test --limit 20 --out runs/gsm8k --max-new-tokens 300 --samples 8 --temperature 1.0
  distill-detect generate --backend openai --base-url http://127.0.0.1:8000/v1 --model served --endpoint chat --no-logprobs \
      --questions bench.jsonl --out runs/api --samples 8   # a server that returns text only (docs/black-box.md)

Run the same command again after an interruption: finished questions are kept, the rest are generated.""",
    "score": """example:
  distill-detect score --run runs/gsm8k --out results/gsm8k
  distill-detect score --traces api_logs.jsonl --out results/api --tpd-tokens 100 --tpd-alpha 0.4
  distill-detect score --run runs/gsm8k --out results/text --methods cdd,answer_agree,answer_correct --samples 4
  distill-detect score --run runs/gsm8k --out results/t08 --methods cdd --temperature 0.8 --param cdd.alpha=0.1""",
    "export": """example:
  distill-detect export --run runs/gsm8k --out gsm8k_traces.jsonl""",
    "run": """example:
  distill-detect run --members bundled:gsm8k_train_sample --nonmembers bundled:gsm8k_test --limit 32 --out results/demo --max-new-tokens 64
  distill-detect run --model ./student --members seen.jsonl --nonmembers unseen.jsonl --out results/student
  distill-detect run --model ./student --members seen.jsonl --nonmembers unseen.jsonl --out results/text \
      --methods tpd,cdd,answer_agree,answer_correct --samples 8 --temperature 1.0""",
}


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default="default", help="local HF checkpoint directory, hub id, or 'default' (embedded SmolLM2-135M-Instruct)"
    )
    g.add_argument("--backend", default="hf", help="generation backend (default: hf; see 'distill-detect backends')")
    g.add_argument(
        "--dtype",
        default="auto",
        help="float32, bfloat16 or float16 (default auto: float32 on CPU; on a GPU the checkpoint's half precision, else bfloat16)",
    )
    g.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available; vLLM follows CUDA_VISIBLE_DEVICES)"
    )
    g.add_argument("--system-prompt", default=None, help="system turn (default: the chat template's own)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")
    g.add_argument("--batch-size", type=int, default=8, help="questions decoded together (default: 8)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the hf and llamacpp backends (default: torch's / every core); 1 is fastest on a busy machine")  # fmt: skip
    g.add_argument("--no-fused", dest="fused", action="store_const", const=False, default=None,
                   help="hf backend on CPU: decode through transformers' modules instead of the fused Llama-family forward")  # fmt: skip
    g.add_argument("--gguf-quant", choices=("f16", "q8_0"), default=None,
                   help="llamacpp with a checkpoint folder: the GGUF it is converted to, cached (default f16; q8_0 changes the verdict, docs/performance.md)")  # fmt: skip
    g.add_argument("--max-new-tokens", type=int, default=1000, help="cap on generated tokens (default: 1000)")
    g.add_argument("--no-prompt-logprobs", action="store_true", help="skip question-token log-probs (only TPD/output methods)")
    sampling_args(p)
    from distill_detect.backends.capabilities import add_backend_args

    add_backend_args(p, shard=p.prog.endswith("generate"))


def sampling_args(p: argparse.ArgumentParser, *, select: bool = False) -> None:
    """Sampled answers for the text-only methods (docs/black-box.md); with ``select``, which stored ones ``score`` reads."""
    g = p.add_argument_group(
        "sampled answers (text-only methods: cdd, answer_agree)" if not select else "sampled answers (which stored ones to read)"
    )
    if select:
        g.add_argument("--samples", type=int, default=None, metavar="N",
                       help="read the first N stored sampled answers per question (default: as many as the run's latest request), e.g. --samples 4")  # fmt: skip
        g.add_argument("--temperature", type=float, default=None,
                       help="read the answers sampled at this temperature (default: the run's latest sampling request), e.g. --temperature 0.8")  # fmt: skip
        g.add_argument("--top-p", type=float, default=None, help="read the answers sampled with this top-p, e.g. --top-p 0.95")
        g.add_argument(
            "--sample-seed", type=int, default=None, help="read the answers sampled with this seed, e.g. --sample-seed 1"
        )
        return
    g.add_argument("--samples", type=int, default=0, metavar="N",
                   help="also sample N answers per question at --temperature (default 0: greedy only), stored beside the greedy "
                        "traces, e.g. --samples 8 --methods cdd,answer_agree")  # fmt: skip
    g.add_argument(
        "--temperature", type=float, default=1.0, help="temperature of the sampled answers (default 1.0), e.g. --temperature 0.8"
    )
    g.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus cut of the sampled answers (default 1.0: none), e.g. --top-p 0.95"
    )
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the sampled answers (default 0), e.g. --sample-seed 1")
    g.add_argument("--no-logprobs", action="store_true",
                   help="text only, for servers that return no log-probabilities (--backend openai): only the text-only "
                        "methods run, e.g. --no-logprobs --samples 8 --methods cdd,answer_agree")  # fmt: skip


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--field", default="question", help="name of the question field/column (default: question)")
    p.add_argument("--id-field", default="id", help="name of the id field (default: id; missing ids = hash of the text)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions of each file")


def method_args(p: argparse.ArgumentParser, *, default: str = "tpd", bootstrap: int = 1000) -> None:
    """--methods, TPD's three flags, --param, --bootstrap, --no-report: one spelling in every command."""
    g = p.add_argument_group("methods")
    g.add_argument("--methods", "--method", dest="methods", default=default,
                   help=f"comma-separated detectors (see 'distill-detect methods'); default: {default or 'tpd (with --from: the audited one)'}")  # fmt: skip
    g.add_argument("--tpd-tau", type=float, default=None, help="TPD probability threshold tau in (0, 1] (default 1.0)")
    g.add_argument("--tpd-alpha", type=float, default=None, help="TPD exponent alpha > 0 (default 0.6)")
    g.add_argument("--tpd-tokens", type=int, default=None, help="TPD budget M: first M generated tokens (default 300)")
    g.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="any detector parameter, e.g. out_ppl.max_tokens=300 or tpd.max_tokens=100")  # fmt: skip
    g.add_argument("--bootstrap", type=int, default=bootstrap, help=f"bootstrap resamples (default {bootstrap})")
    g.add_argument("--no-report", action="store_true", help="skip the HTML report and TPD ablations")
    g.add_argument("--reference-model", default=None,
                   help="the model before distillation (the student's base), for the 'reference' and 'tpd_ref' methods")  # fmt: skip


def _fsd_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fsd-model", default=None,
                   help="the student briefly fine-tuned on questions known to be unseen (distill_detect.fsd.build_fsd_model), "
                        "for the 'fsd' and 'fsd_tpd' methods")  # fmt: skip


def method_params(args) -> tuple[list[str], dict[str, dict]]:
    """(method names, {method: params given}) from --methods, --tpd-* and --param."""
    from distill_detect.detectors import parse_methods

    methods = parse_methods(args.methods)
    params: dict[str, dict] = {}
    for flag, key in (("tpd_tau", "tau"), ("tpd_alpha", "alpha"), ("tpd_tokens", "max_tokens")):
        if getattr(args, flag) is not None:
            params.setdefault("tpd", {})[key] = getattr(args, flag)
    for item in args.param:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--param {item!r}: expected METHOD.NAME=VALUE, e.g. tpd.alpha=0.4")
        lhs, value = item.split("=", 1)
        method, name = lhs.split(".", 1)
        try:
            params.setdefault(method, {})[name] = json.loads(value)
        except json.JSONDecodeError:
            params.setdefault(method, {})[name] = value
    return methods, params


def settings(args):
    """(ModelSettings, GenConfig, QuestionSource) from the flags."""
    from dataclasses import fields

    from distill_detect.api import QuestionSource
    from distill_detect.settings import ModelSettings
    from distill_detect.types import GenConfig

    model = ModelSettings(**{f.name: getattr(args, f.name) for f in fields(ModelSettings) if hasattr(args, f.name)})
    gen = GenConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, system_prompt=args.system_prompt,
                    prompt_logprobs=not args.no_prompt_logprobs, samples=args.samples, temperature=args.temperature,
                    top_p=args.top_p, seed=args.sample_seed, logprobs=not args.no_logprobs)  # fmt: skip
    return model, gen, QuestionSource(field=args.field, id_field=args.id_field, limit=args.limit)


def say(msg: str) -> None:
    print(msg, file=sys.stderr)


def print_scores(res) -> None:
    print(res.table())
    print(f"\nscores: {res.out / 'scores.jsonl'}" + (f"\nmetrics: {res.out / 'metrics.json'}" if res.metrics else ""))
    if (res.out / "report.html").exists() and not getattr(res, "_no_report", False):
        print(f"report: {res.out / 'report.html'}")


# -- subcommands -------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    from distill_detect import api

    model, gen, source = settings(args)
    s = api.generate(args.questions, args.out, model=model, gen=gen, source=source, label=args.label, log=say)
    rate = f", {s['tokens'] / s['seconds']:.1f} tok/s" if s["tokens"] else ""
    filled = f", prompt log-probs filled in for {s['prompts_filled']}" if s.get("prompts_filled") else ""
    say(f"{args.out}: {s['planned']} questions, {s['generated']} generated now ({s['tokens']} tokens{rate}), "
        f"{s['already_done']} already stored{filled}")  # fmt: skip
    if "samples_generated" in s:
        say(f"{args.out}: {s['samples_generated']} sampled answers generated now ({s['sample_tokens']} tokens), "
            f"{s['samples_already_done']} already stored")  # fmt: skip
    return 0


def cmd_score(args) -> int:
    from distill_detect import api

    if bool(args.run) == bool(args.traces):
        raise ConfigError("give exactly one of --run RUN or --traces T.jsonl")
    methods, params = method_params(args)
    picked = (args.samples, args.temperature, args.top_p, args.sample_seed)
    if args.traces and any(v is not None for v in picked):
        raise ConfigError("--samples/--temperature/--top-p/--sample-seed choose a run's stored sampled answers: use --run RUN")
    res = api.score(args.run or args.traces, methods=methods, params=params, max_new_tokens=args.max_new_tokens,
                    reference_model=args.reference_model, fsd_model=args.fsd_model, batch_size=args.batch_size,
                    bootstrap=args.bootstrap, out=args.out, report=not args.no_report, log=say, samples=args.samples, temperature=args.temperature,
                    top_p=args.top_p, sample_seed=args.sample_seed)  # fmt: skip
    print_scores(res)
    return 0


def cmd_export(args) -> int:
    from distill_detect.store import TraceStore
    from distill_detect.traceio import write_traces_jsonl

    run = args.run or args.run_pos
    if not run:
        raise ConfigError("give the run directory: distill-detect export --run RUN --out traces.jsonl")
    with TraceStore(run) as store:
        n = write_traces_jsonl(args.out, store.traces(sampling=store.get_meta("sampling")))
        total = store.counts()["questions"]
    say(
        f"wrote {n} traces to {args.out}"
        + (f" ({total - n} of {total} planned questions not generated yet)" if n < total else "")
    )
    return 0


def cmd_run(args) -> int:
    from distill_detect import api

    model, gen, source = settings(args)
    methods, params = method_params(args)
    res = api.run(args.members, args.nonmembers, out=args.out, model=model, methods=methods, params=params, gen=gen,
                  reference_model=args.reference_model, fsd_model=args.fsd_model, source=source,
                  bootstrap=args.bootstrap, report=not args.no_report, log=say)  # fmt: skip
    print_scores(res)
    return 0


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


class Parser(argparse.ArgumentParser):
    """argparse with a did-you-mean for a mistyped flag."""

    def parse_args(self, args=None, namespace=None):
        import difflib

        argv = sys.argv[1:] if args is None else list(args)
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        cmd = next((w for w in argv if not w.startswith("-")), None)
        if sub is not None and cmd in sub.choices:
            p = sub.choices[cmd]
            options = [o for a in p._actions for o in a.option_strings if o.startswith("--")]
            for w in argv:
                flag = w.split("=", 1)[0]
                if w.startswith("--") and flag != "--" and not any(o.startswith(flag) for o in options):
                    close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
                    p.error(f"unrecognized argument {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
        return super().parse_args(argv, namespace)


INPUTS = "JSONL, JSON array, CSV/TSV or Parquet file (optionally .gz), or bundled:NAME"


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = Parser(
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
    p.add_argument("--questions", required=True, help=INPUTS)
    p.add_argument("--out", required=True, help="run directory (created; resumable)")
    p.add_argument("--label", type=int, choices=(0, 1), default=None, help="label every question 1 (member) or 0 (non-member)")
    _input_args(p)
    _model_args(p)
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
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="read every trace at this many tokens (default: the lowest cap any trace was cut at, if they differ)")  # fmt: skip
    method_args(p)
    _fsd_arg(p)
    sampling_args(p, select=True)
    p.add_argument("--batch-size", type=int, default=8, help="batch size of extra model passes (lowercase, reference)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "export", help="write a run's traces as JSONL (works on unfinished runs)", epilog=EXAMPLES["export"], formatter_class=fmt
    )
    p.add_argument("--run", help="run directory")
    p.add_argument("run_pos", nargs="?", metavar="RUN", help=argparse.SUPPRESS)  # the older positional spelling
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "run", help="generate + score members against non-members in one go", epilog=EXAMPLES["run"], formatter_class=fmt
    )
    p.add_argument("--members", required=True, help=f"questions known to be in the distillation data: {INPUTS}")
    p.add_argument("--nonmembers", required=True, help="questions known not to be (same formats)")
    p.add_argument("--out", required=True, help="output directory (the run is stored in OUT/run)")
    _input_args(p)
    _model_args(p)
    method_args(p)
    _fsd_arg(p)
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
        print(f"distill-detect: error: {exc}", file=sys.stderr)
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
