"""How well do the text-only detectors find distilled questions, and what do they cost? (docs/black-box.md)

    python benchmarks/black_box.py --student ./students/gsm8k              # -> benchmarks/results/black_box.{md,json}
    python benchmarks/black_box.py --student ./students/gsm8k --n 4 8 16 --temperature 1.0
    python benchmarks/black_box.py --backend openai --base-url http://127.0.0.1:8000/v1 --student served-name \\
        --tokenizer ./students/gsm8k --no-logprobs                          # a server with log-probabilities off
    python benchmarks/black_box.py --quick --results DIR                   # tiny random model: the machinery only

Design: the student's members and non-members (default: the paper's split of
``bundled:gsm8k_gpt3``, seed 42, the first ``--members`` of each side) are generated once into
one run: the greedy trace of every question and max(N) answers sampled at ``--temperature``
with ``--sample-seed``. Answer k of a question does not depend on N, so the scores at N = 4 and
8 read the first 4 and 8 of the 16 answers (``distill-detect score --samples N``): one generation,
every N. For each N the text-only detectors are scored next to TPD on the same questions (TPD
reads the greedy trace only; absent with ``--no-logprobs``), with AUC and its 95% bootstrap
interval. Cost: generated tokens of the greedy traces and of the first N sampled answers, per
question (what a hosted API bills for), and the wall time of each generation step.

Nothing here is a number until it is run on a real student; ``--quick`` checks the machinery
on a random 2-layer Llama (its AUCs mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

TEXT_METHODS = ("cdd", "answer_agree", "answer_correct", "sol_ngram", "sol_edit")


def _questions(args):
    """(members, non-members) as labelled ``Question`` lists."""
    from distill_detect.api import QuestionSource
    from distill_detect.data import paper_split

    if args.members_file:
        src = QuestionSource()
        return src.load(args.members_file, label=1)[: args.members], src.load(args.nonmembers_file, label=0)[: args.members]
    qs = QuestionSource().load(args.data)
    members, nonmembers, _ = paper_split(qs, seed=args.seed)
    return members[: args.members], nonmembers[: args.members]


def _cost(traces, n: int) -> dict:
    greedy = sum(t.num_tokens for t in traces)
    sampled = sum(sum(t.samples.num_tokens[:n]) for t in traces if t.samples is not None)
    q = max(len(traces), 1)
    return {"greedy_tokens_per_q": greedy / q, "sample_tokens_per_q": sampled / q}


def run(args) -> dict:
    import distill_detect as dd
    from distill_detect import api, pipeline
    from distill_detect.types import GenConfig

    work = Path(args.work)
    student = args.student
    if args.quick:
        from calibration import build_tiny

        student = str(build_tiny(work / "tiny-llama"))
    members, nonmembers = _questions(args)
    ns = sorted(set(args.n))
    gen = GenConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples=max(ns),
                    temperature=args.temperature, top_p=args.top_p, seed=args.sample_seed, logprobs=not args.no_logprobs)  # fmt: skip
    model = dd.ModelSettings(model=student, backend=args.backend, base_url=args.base_url, tokenizer=args.tokenizer,
                             endpoint=args.endpoint, concurrency=args.concurrency, dtype=args.dtype, device=args.device)  # fmt: skip
    run_dir = work / "run"
    qs = [*members, *nonmembers]
    t0 = time.time()
    summary = pipeline.generate(qs, run_dir, model, gen, methods=list(TEXT_METHODS), log=print)
    wall = time.time() - t0
    # The generation's cost is kept with the run: a later call that only rescores reports the run that generated.
    timing = work / "generation.json"
    if summary.get("generated") or summary.get("samples_generated"):
        import os

        timing.write_text(json.dumps({**summary, "wall_s": wall, "torch_threads": os.environ.get("OMP_NUM_THREADS"),
                                      "load_average_after": os.getloadavg()}))  # fmt: skip
    gen_record = json.loads(timing.read_text()) if timing.exists() else {**summary, "wall_s": wall}
    methods = list(TEXT_METHODS) + ([] if args.no_logprobs else ["tpd"])
    params = {} if args.no_logprobs else {"tpd": {"max_tokens": min(300, args.max_new_tokens)}}
    rows = []
    for n in ns:
        res = api.score(run_dir, methods=methods, params=params, samples=n, temperature=args.temperature, top_p=args.top_p,
                        sample_seed=args.sample_seed, bootstrap=args.bootstrap)  # fmt: skip
        for m in methods:
            mm = res.metrics[m]
            rows.append({"n": n, "method": m, "auc": mm["auc"], "auc_ci": mm["auc_ci"],
                         "tpr_at_5pct_fpr_strict": mm["tpr_at_5pct_fpr_strict"], "tpr_at_1pct_fpr_strict": mm["tpr_at_1pct_fpr_strict"], **_cost(res.traces, n if m != "tpd" else 0)})  # fmt: skip
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("work", "results")} | {"student": student},
        "counts": {"members": len(members), "nonmembers": len(nonmembers)},
        "generation": gen_record,
        "rows": rows,
    }


def markdown(doc: dict) -> str:
    c, g = doc["config"], doc["generation"]
    title = "# Text-only detectors against TPD" + (" (quick: tiny random model, machinery only)" if c["quick"] else "")
    lines = [
        title,
        "",
        f"Student `{c['student']}` on backend `{c['backend']}`{' with log-probabilities off' if c['no_logprobs'] else ''}; "
        f"{doc['counts']['members']} members + {doc['counts']['nonmembers']} non-members; greedy and up to "
        f"{max(c['n'])} answers sampled at temperature {c['temperature']} (top-p {c['top_p']}, seed {c['sample_seed']}), "
        f"{c['max_new_tokens']} new tokens at most. Generation: {g['wall_s']:.0f} s wall"
        f" (OMP_NUM_THREADS={g.get('torch_threads')}, load average after {g.get('load_average_after')}).",
        "",
        "| N | method | AUC | 95% CI | TPR@1%FPR (strict) | TPR@5%FPR (strict) | greedy tokens/q | sampled tokens/q |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lo, hi = r["auc_ci"]
        lines.append(f"| {r['n'] if r['method'] != 'tpd' else '-'} | {r['method']} | {r['auc']:.3f} | [{lo:.3f}, {hi:.3f}] | "
                     f"{r['tpr_at_1pct_fpr_strict']:.2f} | {r['tpr_at_5pct_fpr_strict']:.2f} | {r['greedy_tokens_per_q']:.1f} | {r['sample_tokens_per_q']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="default", help="the distilled student (checkpoint dir, GGUF, served name)")
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--endpoint", default="completions", choices=("completions", "chat"))
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-logprobs", action="store_true", help="text only (a server with log-probabilities off): no TPD column")
    ap.add_argument("--data", default="bundled:gsm8k_gpt3", help="questions split 80/20 with --seed (the paper's protocol)")
    ap.add_argument("--members-file", default=None, help="instead of --data: the members ...")
    ap.add_argument("--nonmembers-file", default=None, help="... and the non-members")
    ap.add_argument("--members", type=int, default=100, help="members evaluated, and as many non-members (default 100)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8, 16], help="sampled answers per question to score at")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument(
        "--quick", action="store_true", help="tiny random model and tiny sizes: checks the machinery, not the numbers"
    )
    ap.add_argument("--work", default=None, help="working directory (default: $DISTILL_DETECT_CACHE/benchmarks/black_box)")
    ap.add_argument(
        "--results", default=None, help="where black_box.{md,json} go (default benchmarks/results; quick: the work dir)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.members, args.n, args.max_new_tokens, args.bootstrap = min(args.members, 4), [1, 2], 8, 50
    if args.work is None:
        from distill_detect.models import cache_dir

        args.work = str(Path(cache_dir()) / "benchmarks" / ("black_box_quick" if args.quick else "black_box"))
    results = Path(args.results) if args.results else (Path(args.work) if args.quick else RESULTS)
    doc = run(args)
    results.mkdir(parents=True, exist_ok=True)
    name = "black_box_quick" if args.quick else "black_box"
    (results / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    (results / f"{name}.md").write_text(markdown(doc), encoding="utf-8")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
