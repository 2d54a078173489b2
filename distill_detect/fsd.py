"""The FSD model and its pass: the student briefly fine-tuned on questions known to be unseen.

Fine-tuned Score Deviation (Zhang et al., ICLR 2025, arXiv:2410.10880) scores a candidate by
how much a short fine-tune on known non-members moves its score (``detectors/fsd.py``). For a
distilled student the known non-members are questions outside its distillation data (the
audit's reference set) answered by the student itself, greedily: an auditor always has those,
while teacher answers are rarely at hand.

* ``tuning_examples(traces)``: (question, the student's greedy answer) pairs from stored traces.
* ``build_fsd_model(student, examples, out)``: the FSD model, with ``finetune.finetune`` and the
  fixed ``FSD_TRAINING`` settings (chosen on the seed-42 GSM8K student only).
* ``fsd_pass(run_dir, fsd_model)``: teacher-forces every stored greedy output of a run through
  the FSD model and stores ``Trace.extra["fsd_output_logprobs"]`` in the run (resumable, once
  per FSD model), where ``score``/``run`` read it. ``--fsd-model DIR`` runs it.

The pass registered as ``fsd`` in ``passes.PASSES`` only names the arrays: the generic pass
runner holds the student and the reference model, not this third one, so the arrays come from
``fsd_pass`` and the registered function explains how to get them when they are missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from distill_detect.errors import ConfigError, DistillDetectError
from distill_detect.types import Question, Trace

KEY = "fsd_output_logprobs"
META = "fsd_model"
"""Run-store meta key: the identity of the FSD model whose arrays the run holds."""

FSD_TRAINING = {"epochs": 3, "learning_rate": 1e-4, "per_device_batch_size": 8, "seed": 42}
"""The FSD fine-tune: 3 passes over the tuning set at lr 1e-4 (the students' own rate), batch 8."""


def tuning_examples(traces: Iterable[Trace]) -> list[Question]:
    """(question, the student's own greedy answer) of each trace with a non-empty answer, as finetune takes them."""
    out = []
    for t in traces:
        if not t.question:
            raise DistillDetectError(f"trace {t.id!r} has no question text to tune on")
        if t.output_text and t.output_text.strip():
            out.append(Question(id=t.id, text=t.question, response=t.output_text))
    if not out:
        raise ConfigError("no trace has a greedy answer to tune the FSD model on")
    return out


def build_fsd_model(student, examples: Sequence[Question], out, *, threads: int | None = None, progress: bool = True,
                    **overrides) -> Path:  # fmt: skip
    """Fine-tune ``student`` on ``examples`` (questions known to be unseen, with responses) into ``out``: the FSD model.

    Settings are ``FSD_TRAINING`` (``overrides`` replace them, e.g. for tests); the fine-tune resumes
    and is kept like any ``distill-detect finetune`` output.
    """
    from distill_detect.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(**{**FSD_TRAINING, "threads": threads, **overrides})
    return finetune(student, list(examples), out, config, progress=progress)


def _backend(fsd_model: str, fingerprint: dict | None, threads: int | None):
    from distill_detect.models import resolve_model
    from distill_detect.settings import GenConfig, ModelSettings

    fp = fingerprint or {}
    settings = ModelSettings(
        model=str(fsd_model), dtype=fp.get("dtype", "auto"), device=fp.get("device", "auto"), threads=threads
    )
    return settings.factory(GenConfig(system_prompt=fp.get("system_prompt"))), dict(resolve_model(str(fsd_model)).identity)


def logprobs_under(backend, traces: Sequence[Trace], batch_size: int = 8) -> dict[str, dict[str, np.ndarray]]:
    """``{trace_id: {"fsd_output_logprobs": float32 [T]}}``: each trace's generated tokens teacher-forced through ``backend``.

    The same computation and tokenizer checks as the reference pass (``passes.reference_pass``).
    """
    from distill_detect.passes import reference_pass

    res = reference_pass(backend, traces, batch_size, prompt=False, output=True)
    return {tid: {KEY: row["reference_output_logprobs"]} for tid, row in res.items()}


def fsd_pass(run_dir, fsd_model, *, batch_size: int = 8, threads: int | None = None, chunk: int = 16,
             log: Callable[[str], None] | None = None) -> int:  # fmt: skip
    """Store the FSD model's log-probabilities of every stored greedy output of ``run_dir``; returns traces computed now.

    Resumable: arrays are written every ``chunk`` traces under a fingerprint naming the FSD model and
    only then, all present, re-filed under the pass runner's fingerprint with the model recorded in the
    run's meta; a run holding another FSD model's arrays is recomputed in full.
    """
    from distill_detect.store import TraceStore

    with TraceStore(run_dir) as store:
        run_fp = store.get_meta("fingerprint")
        held = store.get_meta(META)
    factory, identity = _backend(fsd_model, run_fp, threads)
    final = {"pass": "fsd", "student": run_fp}  # what pipeline.run_passes looks for
    mine = {**final, "fsd_model": identity}
    with TraceStore(run_dir) as store:
        all_ids = [t.id for t in store.traces()]
        done = set(all_ids) - store.extras_missing((KEY,), mine)
        if held == identity:
            done |= set(all_ids) - store.extras_missing((KEY,), final)
        todo = [t for t in store.traces() if t.id not in done]
    if todo:
        if log:
            log(f"fsd pass over {len(todo)} traces ({fsd_model})")
        backend = factory()
        try:
            for start in range(0, len(todo), max(int(chunk), 1)):
                part = logprobs_under(backend, todo[start : start + chunk], batch_size)
                with TraceStore(run_dir) as store, store.writer(run_fp):
                    store.put_extras(part, mine)
        finally:
            backend.close()
    with TraceStore(run_dir) as store:
        if held != identity or store.extras_missing((KEY,), final):
            arrays = {t.id: {KEY: t.extra[KEY]} for t in store.traces() if (t.extra or {}).get(KEY) is not None}
            missing = set(all_ids) - set(arrays)
            if missing:
                raise DistillDetectError(f"fsd pass: {len(missing)} traces still lack {KEY} (first {sorted(missing)[0]!r})")
            with store.writer(run_fp):
                store.put_extras(arrays, final)
                store.set_meta(META, identity)
    return len(todo)


def uses_fsd(methods: Iterable[str]) -> bool:
    """Whether any of these methods reads the FSD model's arrays."""
    from distill_detect.passes import required_extras

    return KEY in required_extras(methods)


def missing_arrays(backend, traces, batch_size) -> dict:
    """The registered ``fsd`` pass: reached only when a run lacks the arrays and no FSD model was given."""
    raise ConfigError(
        f"the fsd methods need the FSD model's log-probabilities of the student's tokens, which {len(list(traces))} "
        "stored trace(s) lack: give --fsd-model DIR (the student fine-tuned on questions known to be unseen, built by "
        "distill_detect.fsd.build_fsd_model) to 'score --run RUN' or 'run'"
    )
