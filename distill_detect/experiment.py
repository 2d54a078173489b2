"""One distillation experiment, end to end: split, distil a student, generate, score, report.

Shared by ``make demo`` (``distill_detect.demo``) and ``benchmarks/reproduce.py`` so both run
the same protocol (PAPER.md): the paper's 80/20 split with a balanced evaluation set, a student
fine-tuned on members' teacher responses (loss on the response only), one greedy generation
pass from the student, the extra passes (lowercase, the base model as reference), every
detector, the blind text baseline, TPD's ablations from the stored traces and the report.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_float32(model: str):
    """The experiments' model settings: float32 on the CPU (the protocol's reference precision)."""
    from distill_detect.settings import ModelSettings

    return ModelSettings(model=model, dtype="float32", device="cpu")


def hf_factory(model: str):
    """A backend factory for ``model`` in float32 on the CPU (benchmarks that drive ``pipeline.generate_run``)."""
    from distill_detect.types import GenConfig

    return cpu_float32(model).factory(GenConfig())


def draw_split(questions, *, pool_size: int, seed: int, keep=None):
    """The protocol's split: draw ``pool_size`` of ``questions`` with ``seed`` (kept in their order), then the paper's
    80/20 split of that pool. Returns ``(pool, members, nonmembers, evaluation)`` as ``data.paper_split`` does.

    ``keep`` (a predicate on a question), when given, drops the members it rejects (they cannot be trained on) after
    the split; the evaluated members are then the first n members kept. Non-members are never dropped, so a draw
    whose first n members all pass is exactly the draw made without ``keep``."""
    import numpy as np

    from distill_detect.data import paper_split

    rng = np.random.default_rng(seed)
    pool = [questions[i] for i in sorted(rng.choice(len(questions), size=min(pool_size, len(questions)), replace=False))]
    members, nonmembers, evaluation = paper_split(pool, seed=seed)
    if keep is not None:
        members = [q for q in members if keep(q)]
        evaluation = members[: len(nonmembers)] + nonmembers
    return pool, members, nonmembers, evaluation


def fits_question_tokens(base: str, limit: int | None):
    """A ``draw_split`` predicate: the question alone is at most ``limit`` tokens of ``base``'s tokenizer (None: all)."""
    if limit is None:
        return None
    from transformers import AutoTokenizer

    from distill_detect.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(base).location)
    return lambda q: len(tok(q.text, add_special_tokens=False).input_ids) <= limit


def student_experiment(
    cfg: dict,
    *,
    seed: int,
    work: Path,
    methods: list[str],
    pool_size: int,
    max_new_tokens: int,
    ft_overrides: dict | None = None,
    report: bool = True,
) -> dict:
    """Split, fine-tune, generate, pass, score.

    Returns a dict: ``metrics``, ``ablations``, ``times``, ``train`` (the student's training record), ``sizes``,
    ``fingerprint``, ``traces``, ``out`` (the results folder), ``student`` (the fine-tuned checkpoint's Path),
    ``members`` and ``nonmembers`` (the evaluated questions, as lists of ``Question``, in evaluation order).
    """
    from distill_detect import api
    from distill_detect.blind import blind_scores
    from distill_detect.data import load_questions
    from distill_detect.finetune import FinetuneConfig, finetune
    from distill_detect.metrics import summarize
    from distill_detect.models import resolve_model
    from distill_detect.scoring import write_outputs
    from distill_detect.types import GenConfig

    times: dict[str, float] = {}
    pool, members, nonmembers, evaluation = draw_split(
        load_questions(cfg["data"], require_response=True), pool_size=pool_size, seed=seed,
        keep=fits_question_tokens(cfg["base"], cfg.get("max_question_tokens")),
    )  # fmt: skip
    n = len(nonmembers)
    train = members[:n] if cfg["train_on"] == "evaluated" else members
    ft = {
        "epochs": cfg["epochs"],
        "learning_rate": cfg["learning_rate"],
        "per_device_batch_size": cfg["batch_size"],
        "max_seq_len": cfg["max_seq_len"],
        "seed": seed,
        **(ft_overrides or {}),
    }
    t = time.time()
    student = work / "student"
    say(f"fine-tuning on {len(train)} members ({ft}) -> {student}")
    finetune(cfg["base"], train, student, FinetuneConfig(**ft), progress=True)
    times["finetune_s"] = time.time() - t
    record = json.loads((student / "distill_detect_finetune.json").read_text())

    # The one pipeline (distill_detect.api): generation first, timed alone, then passes and scoring.
    out, model = work / "results", cpu_float32(str(student))
    gen = GenConfig(max_new_tokens=max_new_tokens, batch_size=cfg["gen_batch"])
    t = time.time()
    say(f"generating {len(evaluation)} questions, {max_new_tokens} tokens each")
    s = api.generate(evaluation, out / "run", model=model, gen=gen, log=say)
    times["generate_s"] = time.time() - t
    times["generated_tokens"] = s["tokens"]
    t = time.time()
    res = api.run(evaluation[:n], evaluation[n:], out=out, model=model, methods=methods, gen=gen,
                  reference_model=resolve_model(cfg["base"]).location, report=False, log=say)  # fmt: skip
    times["passes_and_score_s"] = time.time() - t
    traces, metrics, config = res.traces, res.metrics, res.config
    fp = config["source"]["fingerprint"]
    labels = [t.label for t in traces]
    blind = blind_scores([t.question for t in traces], labels, seed=seed)
    metrics["blind"] = {
        **summarize(labels, blind),
        "higher_is_member": True,
        "params": {"model": "tfidf+logreg, 5-fold out-of-fold"},
    }
    # Rewrite the outputs with the blind baseline beside the detectors (it is not a per-trace detector).
    write_outputs(out, traces, {**res.raw, "blind": blind}, metrics, {**config, "blind": "model-free text classifier"})
    ablations = None
    if "tpd" in methods:
        from distill_detect.ablation import tpd_ablation, write_ablations

        ablations = tpd_ablation(traces, labels)
        write_ablations(out, ablations)
    if report:
        from distill_detect.report import write_report

        say(f"report: {write_report(out, traces=traces)}")
    return {
        "metrics": metrics,
        "ablations": ablations,
        "times": times,
        "train": record.get("train", {}),
        "sizes": {
            "pool": len(pool),
            "members_dropped_too_long": len(pool) - len(nonmembers) - len(members),
            "members": len(members),
            "nonmembers": n,
            "trained_on": len(train),
            "evaluated": len(evaluation),
        },
        "fingerprint": fp,
        "traces": traces,
        "out": str(out),
        "student": student,
        "members": evaluation[:n],
        "nonmembers": evaluation[n:],
    }
