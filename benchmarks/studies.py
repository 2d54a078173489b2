"""Reviewers' studies (issue #14, "Beyond the paper"): does detection hold up under conditions the paper did not test?

    python benchmarks/studies.py sampled --temperature 0.6   # 1. the student samples instead of decoding greedily
    python benchmarks/studies.py sampled --temperature 1.0
    python benchmarks/studies.py perturbed                    # 2. members asked with their numbers changed
    python benchmarks/studies.py further                      # 3. the student trained further on 200 other items
    python benchmarks/studies.py lora --rank 8                # 4. a LoRA student instead of a full fine-tune
    python benchmarks/studies.py markdown                     # rewrite the table from the JSON

All studies start from the cached development student of ``benchmarks/reproduce.py --config gsm8k``
(seed 42: the embedded SmolLM2-135M-Instruct fully fine-tuned for 5 epochs at lr 1e-4 on the GPT-3
solutions of 100 members of ``bundled:gsm8k_gpt3``) and its stored greedy run (100 members + 100
non-members, 128 new tokens), which is the "original" every condition is compared with. Each
study writes its block into ``benchmarks/results/beyond_studies.json`` and rewrites
``beyond_studies.md``; everything generated goes under ``~/.cache/distill-detect/benchmarks/studies/``.

Every detector row gives the AUC with its bootstrap 95% interval, DeLong's paired test against
the same detector in the original greedy setting (paired by question: the same questions, or for
study 2 each perturbed member with its original), and DeLong's test against TPD in the same condition.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from distill_detect import api, pipeline  # noqa: E402
from distill_detect.backends.hf import HFBackend  # noqa: E402
from distill_detect.models import cache_dir  # noqa: E402
from distill_detect.types import GenConfig  # noqa: E402

SEED = 42
"""The development seed: the split, the student and every study here (no confirmation seed)."""
BASE = "default"
BENCH = cache_dir() / "benchmarks"
STUDENT = BENCH / "gsm8k" / "student"
ORIGINAL_RUN = BENCH / "gsm8k" / "results" / "run"
WORK = BENCH / "studies"
RESULTS = HERE / "results"
OUTPUT_METHODS = ["tpd", "out_ppl", "out_max_prob", "tpd_ref", "wbc", "ref_imbalance"]
SOLUTION_METHODS = ["sol_loss", "sol_ratio"]
METHODS = OUTPUT_METHODS + SOLUTION_METHODS
MAX_NEW_TOKENS = 128
GEN_BATCH = 16
BOOTSTRAP = 1000


# -- the split and the original greedy setting ---------------------------------------------------------


def evaluation_split():
    """(evaluated members, non-members, the other members) of the seed-42 GSM8K split reproduce.py drew.

    The evaluated set is the first 100 members (the ones the student was trained on) and the
    100 non-members; the other 300 members of the 500-question pool were never trained on."""
    sys.path.insert(0, str(HERE))
    from reproduce import CONFIGS

    from distill_detect.data import load_questions
    from distill_detect.experiment import draw_split, fits_question_tokens

    cfg = CONFIGS["gsm8k"]
    _, members, nonmembers, evaluation = draw_split(
        load_questions(cfg["data"], require_response=True), pool_size=cfg["pool"], seed=SEED,
        keep=fits_question_tokens(cfg["base"], cfg.get("max_question_tokens")),
    )  # fmt: skip
    n = len(nonmembers)
    return evaluation[:n], evaluation[n:], members[n:]


def original_scores(methods=METHODS, bootstrap: int = BOOTSTRAP) -> api.Scores:
    """The stored greedy run's scores (its passes are cached, so this needs no model)."""
    return api.score(ORIGINAL_RUN, methods=methods, reference_model=BASE, bootstrap=bootstrap)


def compare(res: api.Scores, original: api.Scores, methods, *, original_id=lambda i: i) -> dict:
    """Per detector: its metrics in this condition, DeLong against the same detector on the original
    greedy traces (paired by ``original_id(id)``), and DeLong against TPD in this condition.

    DeLong et al. (1988): the AUCs of two scores of the same questions compared through the
    covariance of their placement values, which is what makes the paired test sensitive."""
    from distill_detect.metrics import delong_test

    labels = np.asarray(res.labels, dtype=int)
    pos = {i: k for k, i in enumerate(original.ids)}
    idx = [pos[original_id(i)] for i in res.ids]
    if list(np.asarray(original.labels)[idx]) != list(labels):
        raise AssertionError("paired questions carry different labels")
    rows = {}
    for m in methods:
        block = {k: res.metrics[m][k] for k in ("auc", "auc_ci", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_strict")}
        block["vs_original"] = delong_test(labels, res.membership(m), original.membership(m)[idx])
        if m != "tpd" and "tpd" in res.raw:
            block["vs_tpd"] = delong_test(labels, res.membership(m), res.membership("tpd"))
        rows[m] = block
    return rows


def trace_stats(traces) -> dict:
    """What was generated: tokens in all, mean per answer, answers that ended on their own."""
    n = [t.num_tokens for t in traces]
    return {
        "tokens": int(sum(n)),
        "mean_tokens": round(float(np.mean(n)), 1),
        "stopped": int(sum(t.finish_reason == "stop" for t in traces)),
        "answers": len(n),
    }


# -- study 1: sampled decoding ------------------------------------------------------------------------


class SampledHF(HFBackend):
    """The HF backend with its primary trace sampled instead of greedy.

    Each token is drawn at ``temperature`` (top-p 1) by the backend's own sampler from the seeded
    stream of answer 0 (``sample_rng(seed, id, 0)``), and ``output_logprobs[t]`` is the log-probability
    of the token DRAWN under the student's unscaled distribution (what vLLM returns by default),
    read from the same logits the step decoded from. The question-token fields come from a
    teacher-forced pass as for greedy traces. The fingerprint says ``decoding: sampled``."""

    def __init__(self, model, *, temperature: float, seed: int, **kw):
        super().__init__(model, **kw)
        self.temperature, self.seed = float(temperature), int(seed)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "decoding": {"sampled": True, "temperature": self.temperature, "top_p": 1.0,
                                                      "seed": self.seed}}  # fmt: skip

    def generate(self, questions, *, max_new_tokens: int):
        from distill_detect.backends.base import sample_rng

        torch = self.torch
        draw = self._sampler([sample_rng(self.seed, q.id, 0) for q in questions], self.temperature, 1.0)
        chosen: list[list[float]] = [[] for _ in questions]

        def pick(logits, rows):
            tok = draw(logits, rows)
            lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tok[:, None])[:, 0]
            for r, v in zip(rows.tolist(), lp.tolist()):  # a row is in the batch from step 0 until it leaves
                chosen[int(r)].append(v)
            return tok

        traces = self._decode(questions, max_new_tokens, pick=pick)
        prompts = self.score_prompts(questions) if self.want_prompt_logprobs else [{} for _ in questions]
        return [
            dataclasses.replace(t, output_logprobs=np.asarray(chosen[i][: t.num_tokens], np.float32), **prompts[i])
            for i, t in enumerate(traces)
        ]


def study_sampled(temperature: float, *, seed: int = SEED) -> dict:
    members, nonmembers, _ = evaluation_split()
    run_dir = WORK / "sampled" / f"t{temperature:g}-seed{seed}" / "run"
    factory = lambda: SampledHF(str(STUDENT), dtype="float32", device="cpu", temperature=temperature, seed=seed)  # noqa: E731
    t0 = time.time()
    s = pipeline.generate_run(members + nonmembers, run_dir, factory, max_new_tokens=MAX_NEW_TOKENS, batch_size=GEN_BATCH)
    gen_s = time.time() - t0
    t0 = time.time()
    res = api.score(run_dir, methods=OUTPUT_METHODS, reference_model=BASE, bootstrap=BOOTSTRAP)
    score_s = time.time() - t0
    rows = compare(res, original_scores(OUTPUT_METHODS), OUTPUT_METHODS)
    return {
        "condition": f"sampled, temperature {temperature:g}, seed {seed}",
        "decoding": f"sampled at temperature {temperature:g}, top-p 1, seed {seed} (answer 0 of the backend's seeded "
        f"streams); log-probs of the drawn tokens under the unscaled distribution; {MAX_NEW_TOKENS} new tokens, batch {GEN_BATCH}",
        "run": str(run_dir),
        "generated": {**trace_stats(res.traces), "generated_now": s["generated"]},
        "seconds": {"generate": round(gen_s, 1), "passes_and_score": round(score_s, 1)},
        "skipped": {
            m: "reads the question file's solution teacher-forced, not the generated tokens: identical to the "
            "greedy setting by construction"
            for m in SOLUTION_METHODS
        },  # fmt: skip
        "methods": rows,
    }


# -- study 2: members with their numbers changed -----------------------------------------------------


def study_perturbed(*, seed: int = SEED) -> dict:
    """Members asked with every number changed (``audit.make_reference``), against the original non-members.

    The perturbed members keep label 1 and, as their solution, the ORIGINAL GPT-3 solution (the
    only one an auditor holds; its numbers no longer match the question)."""
    from distill_detect.audit import make_reference
    from distill_detect.experiment import cpu_float32

    members, nonmembers, _ = evaluation_split()
    by_id = {q.id: q for q in members}
    ref, dropped = make_reference(members, seed=seed)
    perturbed = [dataclasses.replace(q, label=1, response=by_id[q.id.removesuffix("-perturbed")].response) for q in ref]
    run_dir = WORK / "perturbed" / f"seed{seed}" / "run"
    model = cpu_float32(str(STUDENT))
    t0 = time.time()
    s = api.generate(perturbed, run_dir, model=model, gen=GenConfig(max_new_tokens=MAX_NEW_TOKENS, batch_size=GEN_BATCH))
    gen_s = time.time() - t0
    t0 = time.time()
    fp = api._fingerprint(run_dir)
    ref_factory, ref_id = api.reference_backend(BASE, fp)
    pipeline.run_passes(run_dir, METHODS, student_factory=model.factory(GenConfig()), reference_factory=ref_factory,
                        reference_identity=ref_id, batch_size=8)  # fmt: skip
    p_traces = pipeline.read_run(run_dir)[0]
    original = original_scores()
    keep = {q.id for q in ref}
    n_traces = [t for t in original.traces if t.label == 0]
    res = api.score(p_traces + n_traces, methods=METHODS, bootstrap=BOOTSTRAP)
    score_s = time.time() - t0
    rows = compare(res, original, METHODS, original_id=lambda i: i.removesuffix("-perturbed"))
    # The same comparison on the original members that could be perturbed (the unpaired baseline row).
    kept_orig = [t for t in original.traces if t.label == 0 or f"{t.id}-perturbed" in keep]
    base = api.score(kept_orig, methods=METHODS, bootstrap=BOOTSTRAP)
    for m in METHODS:
        rows[m]["original_auc_ci"] = base.metrics[m]["auc_ci"]
    changed = sum(1 for q in ref if q.text != by_id[q.id.removesuffix("-perturbed")].text)
    return {
        "condition": f"members with their numbers changed (make_reference, seed {seed}) vs the original non-members",
        "decoding": f"greedy, {MAX_NEW_TOKENS} new tokens, batch {GEN_BATCH} (non-members: the original greedy traces)",
        "run": str(run_dir),
        "perturbation": {
            "members": len(members),
            "perturbed": len(ref),
            "changed_text": changed,
            "dropped_no_number": list(dropped),
            "example": {"original": by_id[ref[0].id.removesuffix("-perturbed")].text, "perturbed": ref[0].text},
        },  # fmt: skip
        "solution_scored": "the original GPT-3 solution of the unperturbed question (its numbers no longer match)",
        "generated": {**trace_stats(p_traces), "generated_now": s["generated"]},
        "seconds": {"generate": round(gen_s, 1), "passes_and_score": round(score_s, 1)},
        "methods": rows,
    }


# -- studies 3 and 4: other students ------------------------------------------------------------------


def finetune_and_run(name: str, base_model: str, train, ft: dict) -> dict:
    """Fine-tune ``base_model`` on ``train`` (``finetune.finetune``), then greedy-generate, pass and score the
    200 evaluated questions with ``api.run`` (the reference for tpd_ref/wbc/ref_imbalance/sol_ratio stays
    the ORIGINAL base model, the model before any distillation)."""
    from distill_detect.experiment import cpu_float32
    from distill_detect.finetune import FinetuneConfig, finetune
    from distill_detect.models import resolve_model

    members, nonmembers, _ = evaluation_split()
    work = WORK / name
    t0 = time.time()
    student = finetune(base_model, list(train), work / "student", FinetuneConfig(**ft), progress=True)
    ft_s = time.time() - t0
    record = json.loads((Path(student) / "distill_detect_finetune.json").read_text())
    t0 = time.time()
    res = api.run(members, nonmembers, out=work / "results", model=cpu_float32(str(student)), methods=METHODS,
                  gen=GenConfig(max_new_tokens=MAX_NEW_TOKENS, batch_size=GEN_BATCH),
                  reference_model=resolve_model(BASE).location, bootstrap=BOOTSTRAP, report=False, log=print)  # fmt: skip
    run_s = time.time() - t0
    return {
        "student": str(student),
        "finetune": {
            **ft,
            "trained_on": len(train),
            "final_train_loss": record.get("train", {}).get("final_train_loss"),
            "seconds": round(ft_s, 1),
        },  # fmt: skip
        "decoding": f"greedy, {MAX_NEW_TOKENS} new tokens, batch {GEN_BATCH}",
        "run": str(work / "results" / "run"),
        "generated": trace_stats(res.traces),
        "seconds": {"finetune": round(ft_s, 1), "generate_passes_score": round(run_s, 1)},
        "methods": compare(res, original_scores(), METHODS),
    }


def study_further() -> dict:
    members, nonmembers, others = evaluation_split()
    evaluated = {q.id for q in members + nonmembers}
    train = others[:200]
    assert not evaluated & {q.id for q in train}
    ft = dict(epochs=2, learning_rate=1e-4, per_device_batch_size=8, max_seq_len=320, seed=SEED, threads=1)
    out = finetune_and_run("further", str(STUDENT), train, ft)
    out["condition"] = "the distilled student fine-tuned again on 200 other gsm8k_gpt3 items (2 epochs, lr 1e-4)"
    out["further_data"] = ("members[100:300] of the seed-42 pool split: pool questions the student was never trained on "
                           "and that are not among the 200 evaluated, with their GPT-3 solutions")  # fmt: skip
    return out


def study_lora(rank: int) -> dict:
    members, _, _ = evaluation_split()
    ft = dict(epochs=5, learning_rate=1e-3, per_device_batch_size=8, max_seq_len=320, seed=SEED, threads=1,
              lora=True, lora_r=rank)  # fmt: skip
    out = finetune_and_run(f"lora-r{rank}", BASE, members, ft)
    out["condition"] = (f"LoRA r={rank} (alpha 32, dropout 0.05, all linear layers, merged) on the same 100 members, "
                        "5 epochs, lr 1e-3 (the sweep's LoRA setting)")  # fmt: skip
    return out


# -- the document ------------------------------------------------------------------------------------


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"load average {load} at the end; torch threads {_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")  # fmt: skip


def _threads() -> int:
    import torch

    return torch.get_num_threads()


STUDY_ORDER = ["sampled", "perturbed", "further", "lora"]
SETTING = (
    "Model: the embedded SmolLM2-135M-Instruct (float32, CPU). Data: `bundled:gsm8k_gpt3`, 500-question pool drawn with "
    "seed 42 -> 400 members / 100 non-members (the paper's 80/20 split); evaluated: the first 100 members (the ones the "
    "student was trained on) + the 100 non-members. Original student: full fine-tune, 5 epochs, lr 1e-4, batch 8, max "
    "length 320, seed 42, final train loss 0.103; original setting: its greedy traces, 128 new tokens. **Development "
    "seed (42) only**: no confirmation seed was run for these studies."
)


def _f(x, pct=False):
    if x is None or x != x:
        return "n/a"
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}"


def _ci(ci) -> str:
    return f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else ""


def _p(d: dict | None) -> str:
    if not d:
        return "—"
    return f"{d['diff']:+.3f}, p = {d['pvalue']:.2g}"


def section(key: str, st: dict) -> list[str]:
    out = [f"### {st['condition']}", ""]
    out.append(f"- decoding: {st['decoding']}")
    if "finetune" in st:
        f = st["finetune"]
        out.append(f"- student: `{st['student']}`, fine-tune { ({k: v for k, v in f.items() if k not in ('seconds',)}) }")
    for k in ("further_data", "solution_scored"):
        if k in st:
            out.append(f"- {k.replace('_', ' ')}: {st[k]}")
    if "perturbation" in st:
        p = st["perturbation"]
        out.append(f"- perturbed {p['perturbed']} of {p['members']} members ({len(p['dropped_no_number'])} dropped: no number to "
                   f"change); example: \"{p['example']['original'][:300]}\" -> \"{p['example']['perturbed'][:300]}\"")  # fmt: skip
    g = st["generated"]
    out.append(f"- generated: {g['tokens']} tokens, {g['mean_tokens']} per answer, {g['stopped']} of {g['answers']} answers "
               "ended before the cap")  # fmt: skip
    out.append(f"- wall time (s): {st['seconds']}; machine: {st['machine']}; run `{st['run']}`; finished {st['finished']}")
    out += [
        "",
        "| detector | AUC [95% CI] | TPR@1%FPR (strict) | original AUC | vs original: ΔAUC, DeLong p | vs TPD here: ΔAUC, p |",
        "|---|---|---|---|---|---|",
    ]
    for m, b in st["methods"].items():
        lo, hi = b["auc_ci"]
        o = b["vs_original"]
        out.append(f"| {m} | {_f(b['auc'])} [{_f(lo)}, {_f(hi)}] | {_f(b['tpr_at_1pct_fpr'], True)} "
                   f"({_f(b['tpr_at_1pct_fpr_strict'], True)}) | {_f(o['auc_b'])}{_ci(b.get('original_auc_ci'))} | {_p(o)} | {_p(b.get('vs_tpd'))} |")  # fmt: skip
    for m, why in st.get("skipped", {}).items():
        out.append(f"| {m} | skipped: {why} | | | | |")
    sig = [f"{m} {b['vs_original']['diff']:+.3f}" for m, b in st["methods"].items() if b["vs_original"]["pvalue"] < 0.05]
    out += ["", "Changed significantly from the original setting (DeLong p < 0.05): " + (", ".join(sig) or "none") + "."]
    return out + [""]


NOTES = {
    "sampled": (
        "How the sampled traces are made: `SampledHF` (this script) subclasses the HF backend and decodes the primary "
        "trace with the backend's own seeded sampler (`HFBackend._sampler`, the stream of sampled answer 0), recording "
        "for each step the log-probability of the DRAWN token under the unscaled (temperature-1) softmax of the same "
        "logits, as vLLM returns by default; so `out_max_prob` here averages the drawn tokens' probabilities (no longer "
        "the argmax's), and TPD's p_t is the drawn token's probability. The traces go through `pipeline.generate_run` "
        "into their own run (fingerprint `decoding: sampled`), and `api.score` runs the reference pass (the base model "
        "teacher-forced on the drawn tokens) as for greedy runs. No library change: the pipeline's own sampled answers "
        "(`GenConfig.samples`) keep text only, and HF `_decode(pick=...)` records the argmax's log-prob, not the drawn "
        "token's, so a library option would have to record the drawn token's log-prob (a small change in `hf._decode`)."
    ),
    "perturbed": (
        "Members' numbers are changed by `audit.make_reference` (the `--make-reference` perturbation); the student answers "
        "the perturbed questions greedily; the non-members are the original run's 100 (same traces). 'vs original' pairs "
        "each perturbed member with the same member asked as trained (DeLong on the item pairs; the non-members are "
        "identical in both). sol_loss/sol_ratio score the ORIGINAL GPT-3 solution after the perturbed question."
    ),
    "further": (
        "The reference model for tpd_ref, wbc, ref_imbalance and sol_ratio stays the original base (SmolLM2-135M-Instruct "
        "before any distillation): the auditor's reference."
    ),
    "lora": "Students trained from the base with LoRA (merged into the saved weights); everything else as the original.",
}


def markdown(doc: dict) -> str:
    out = ["# Beyond the paper: reviewers' studies (issue #14)", "", SETTING, "",
           "Every AUC with its bootstrap 95% interval (1000 resamples); 'vs original' is DeLong's paired test against the "
           "same detector on the original student's greedy traces of the same questions; 'vs TPD here' against TPD in "
           "the same condition. A difference is called significant only at p < 0.05.", ""]  # fmt: skip
    titles = {"sampled": "1. Sampled decoding", "perturbed": "2. Evasion by rewording (numbers changed)",
              "further": "3. Further training after distillation", "lora": "4. LoRA students"}  # fmt: skip
    for group in STUDY_ORDER:
        keys = [k for k in doc["studies"] if k.split(":")[0] == group]
        if not keys:
            continue
        out += [f"## {titles[group]}", "", NOTES[group], ""]
        for k in keys:
            out += section(k, doc["studies"][k])
    missing = [titles[g] for g in STUDY_ORDER if not any(k.split(":")[0] == g for k in doc["studies"])]
    if missing:
        out += [
            "## Not (yet) run",
            "",
            "; ".join(missing) + ": not run yet. In the session of 2026-12-01 the shared CPU slot (one core, queued with "
            "other jobs) left no time for a fine-tune plus a 200-question generation (about 35 min) before the deadline; "
            "run them with `python benchmarks/studies.py further` and `python benchmarks/studies.py lora --rank 8`.",
            "",
        ]
    return "\n".join(out) + "\n"


def save(key: str, block: dict, results: Path = RESULTS) -> None:
    """Add one study's block to the JSON (kept across runs) and rewrite the markdown."""
    path = results / "beyond_studies.json"
    doc = json.loads(path.read_text()) if path.exists() else {"studies": {}}
    block = {**block, "machine": machine(), "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    doc["studies"][key] = block
    doc["studies"] = {k: doc["studies"][k] for k in sorted(doc["studies"], key=lambda k: (STUDY_ORDER.index(k.split(":")[0]), k))}
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    (results / "beyond_studies.md").write_text(markdown(doc))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=[*STUDY_ORDER, "markdown"])
    ap.add_argument("--temperature", type=float, default=1.0, help="sampled: the sampling temperature")
    ap.add_argument("--rank", type=int, default=8, help="lora: the LoRA rank")
    a = ap.parse_args(argv)
    if a.study == "markdown":
        doc = json.loads((RESULTS / "beyond_studies.json").read_text())
        (RESULTS / "beyond_studies.md").write_text(markdown(doc))
        return 0
    if a.study == "sampled":
        key, block = f"sampled:t{a.temperature:g}", study_sampled(a.temperature)
    elif a.study == "perturbed":
        key, block = "perturbed", study_perturbed()
    elif a.study == "further":
        key, block = "further", study_further()
    else:
        key, block = f"lora:r{a.rank}", study_lora(a.rank)
    save(key, block)
    print(markdown({"studies": {key: {**block, "machine": machine(), "finished": "now"}}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
