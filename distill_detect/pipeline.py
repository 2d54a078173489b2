"""The jobs behind the CLI, as library calls: generate into a run, score a run, run end to end."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from distill_detect.errors import DistillDetectError
from distill_detect.store import TraceStore
from distill_detect.types import Question


def _progress(total: int, desc: str, unit: str = "q"):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in logs and CI.
    return tqdm(total=total, desc=desc, unit=unit, disable=None, dynamic_ncols=True, file=sys.stderr)


def generate_run(
    questions: Sequence[Question],
    run_dir,
    backend_factory: Callable[[], object],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    fingerprint: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Generate every question of ``questions`` into ``run_dir`` that lacks a complete trace.

    ``backend_factory`` is called only when there is work left, so a finished run
    resumes without loading the model. ``fingerprint`` may be given to check the run
    before loading; otherwise the backend's own is used. Batches are formed from
    questions of similar length (less padding) and committed one at a time.
    Returns counts: planned, generated now, already done, tokens generated now, seconds.
    """
    t0 = time.time()
    store = TraceStore(run_dir, create=True)
    try:
        store.check_questions(questions)
        if fingerprint is not None and store.get_meta("fingerprint") is not None:
            store.bind(fingerprint)
        complete = store.complete_ids(max_new_tokens)
        todo = [q for q in questions if q.id not in complete]
        done_before = len(questions) - len(todo)
        summary = {"planned": len(questions), "generated": 0, "already_done": done_before, "tokens": 0}
        if not todo:
            summary["seconds"] = time.time() - t0
            return summary
        if log and done_before:
            log(f"resuming {store.dir}: {done_before} of {len(questions)} questions already generated")
        backend = backend_factory()
        with store.writer(backend.fingerprint()):
            store.add_questions(questions)
            # Where the model came from (not part of the fingerprint): lets later passes reload it.
            store.set_meta("model", {"backend": getattr(backend, "name", None), "location": getattr(backend, "location", None)})
            # Similar lengths together: left padding costs compute on every decoding step.
            todo = sorted(todo, key=lambda q: len(q.text))
            bar = _progress(len(todo), "generating")
            try:
                for i in range(0, len(todo), batch_size):
                    batch = todo[i : i + batch_size]
                    try:
                        traces = backend.generate(batch, max_new_tokens=max_new_tokens)
                    except Exception as exc:
                        if not is_out_of_memory(exc):
                            raise
                        raise out_of_memory_error(summary, store.dir, len(batch), max_new_tokens) from None
                    store.put_traces(traces)
                    summary["generated"] += len(batch)
                    summary["tokens"] += sum(t.num_tokens for t in traces)
                    bar.update(len(batch))
                    bar.set_postfix(tok_s=f"{summary['tokens'] / max(bar.format_dict['elapsed'], 1e-9):.1f}")
            except KeyboardInterrupt:
                # Count from the store: a Ctrl-C just after a commit must not under-report that batch.
                summary["generated"] = len(store.complete_ids(max_new_tokens) & {q.id for q in todo})
                raise GenerationInterrupted(summary, store.dir) from None
            finally:
                bar.close()
        summary["seconds"] = time.time() - t0
        return summary
    finally:
        store.close()


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, MPS, XPU), or a RuntimeError that says 'out of memory' (older torch, vLLM)."""
    return type(exc).__name__ == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def out_of_memory_error(summary: dict, run_dir, batch: int, max_new_tokens: int) -> DistillDetectError:
    done = summary["already_done"] + summary["generated"]
    return DistillDetectError(
        f"out of memory generating a batch of {batch} questions with up to {max_new_tokens} new tokens; "
        f"{done} of {summary['planned']} questions are stored in {run_dir}. Run the same command again with a smaller "
        f"--batch-size (e.g. {max(1, batch // 2)}) or a lower --max-new-tokens to resume"
    )


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during generation; carries how far the run got (every finished batch is stored)."""

    def __init__(self, summary: dict, run_dir):
        self.summary = summary
        self.run_dir = run_dir
        done = summary["already_done"] + summary["generated"]
        super().__init__(
            f"interrupted: {done} of {summary['planned']} questions are stored in {run_dir}; run the same command again to resume"
        )


def load_run_traces(run_dir, *, max_new_tokens: int | None = None):
    """(traces, fingerprint, counts) of a run; traces in input order."""
    with TraceStore(run_dir) as store:
        return list(store.traces(complete_for=max_new_tokens)), store.get_meta("fingerprint"), store.counts()


def score_and_write(traces, methods: dict[str, dict], out_dir, config: dict, *, n_resamples: int = 1000) -> dict:
    """Score traces, compute metrics if labels exist, write the outputs; returns the metrics document."""
    from distill_detect.scoring import evaluate, score_traces, write_outputs

    raw = score_traces(traces, methods)
    labels = [t.label for t in traces]
    metrics = evaluate(labels, raw, methods, n_resamples=n_resamples) if any(x is not None for x in labels) else None
    doc = write_outputs(out_dir, traces, raw, metrics, config)
    doc["_raw"] = raw
    return doc


def summarize_missing(expected: int, got: int, run_dir) -> str | None:
    if got < expected:
        return f"{expected - got} of {expected} questions in {Path(run_dir)} have no complete trace yet; run 'generate' again to finish"
    return None


def _freq_table_for(tokenizer) -> np.ndarray:
    """DC-PDD's token-frequency table over the bundled corpus, cached per tokenizer."""
    import hashlib
    import json as _json

    from distill_detect.models import cache_dir
    from distill_detect.passes import build_token_freq_table, bundled_corpus_texts, load_token_freq_table, save_token_freq_table

    if hasattr(tokenizer, "cache_key"):  # the llama.cpp backend's GGUF tokenizer
        key = tokenizer.cache_key()
    else:
        vocab = tokenizer.get_vocab()
        key = hashlib.sha256(_json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    path = cache_dir() / "token_freq" / f"bundled-{key}.npy"
    if path.exists():
        return load_token_freq_table(path, vocab_size=len(tokenizer))
    table = build_token_freq_table(tokenizer, bundled_corpus_texts())
    save_token_freq_table(path, table)
    return table


def run_passes(
    run_dir,
    methods: Sequence[str],
    *,
    student_factory: Callable[[], object],
    reference_factory: Callable[[], object] | None = None,
    reference_identity: dict | None = None,
    batch_size: int = 8,
    ids: set[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the extra passes that ``methods`` need over the stored traces that lack them.

    Results go into the run's store (``extras``), keyed by a fingerprint of the pass, so a
    second scoring with the same methods costs no model time and an interrupted pass
    resumes where it stopped. Returns {pass name: traces processed now}.
    """
    from distill_detect.errors import ConfigError
    from distill_detect.passes import PASS_EXTRAS, dcpdd_freq_pass, lowercase_pass, reference_pass, required_passes

    needed = required_passes(methods)
    done: dict[str, int] = {}
    if not needed:
        return done
    store = TraceStore(run_dir)
    try:
        run_fp = store.get_meta("fingerprint")
        student = None
        for name in sorted(needed):
            if name == "reference":
                if reference_factory is None:
                    raise ConfigError(
                        "methods 'reference' and 'tpd_ref' need --reference-model: the model before distillation (the student's base)"
                    )
                pass_fp = {"pass": name, "student": run_fp, "reference": reference_identity}
            else:
                pass_fp = {"pass": name, "student": run_fp}
            todo_ids = store.extras_missing(PASS_EXTRAS[name], pass_fp)
            if ids is not None:
                todo_ids &= ids
            if not todo_ids:
                continue
            traces = [t for t in store.traces() if t.id in todo_ids]
            if log:
                log(f"{name} pass over {len(traces)} traces")
            if name == "lowercase":
                student = student or student_factory()
                res = lowercase_pass(student, traces, batch_size)
            elif name == "reference":
                ref = reference_factory()
                res = reference_pass(ref, traces, batch_size)
                ref.close()
            else:
                student = student or student_factory()
                res = dcpdd_freq_pass(traces, _freq_table_for(student.tok))
            with store.writer(run_fp):
                store.put_extras(res, pass_fp)
            done[name] = len(traces)
        return done
    finally:
        store.close()
