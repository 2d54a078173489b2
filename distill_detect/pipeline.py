"""The one pipeline behind every command: generate into a run, run the extra passes, read the
traces at one token budget, score. ``distill_detect.api`` strings these steps together for
``run``, ``score`` and ``audit``; the demo and the benchmarks call the same functions.

Each step is resumable (the store keeps every finished batch and pass) and refuses what
cannot be right before any model time is spent: another model on a finished run, a method
that the decoding settings cannot feed, traces cut short by an older, lower cap.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

from distill_detect.errors import ConfigError, DistillDetectError
from distill_detect.store import TraceStore, fingerprint_diff
from distill_detect.types import Question, Trace


def _progress(total: int, desc: str, unit: str = "q"):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in logs and CI.
    return tqdm(total=total, desc=desc, unit=unit, disable=None, dynamic_ncols=True, file=sys.stderr)


# -- checks made before any model time ------------------------------------------------------------


def check_decoding_feeds(methods: Sequence[str], prompt_logprobs: bool) -> None:
    """Refuse methods that read question-token log-probabilities when they are switched off."""
    from distill_detect.detectors import get
    from distill_detect.detectors.checks import NEEDS

    if prompt_logprobs:
        return
    bad = [m for m in methods if any(NEEDS[n].with_prompt_logprobs for n in get(m).needs if n in NEEDS)]
    if bad:
        raise ConfigError(
            f"--methods {','.join(bad)} read the question tokens' log-probabilities, which --no-prompt-logprobs switches off; "
            "drop --no-prompt-logprobs, or choose methods that read generated tokens only (tpd, out_ppl, out_min_k, out_max_prob)"
        )


TEXT_NEEDS = frozenset({"output_text", "output_samples", "solution", "question"})
"""Need words that no log-probability feeds: what a model behind a text-only API can still give."""


def text_only_methods() -> list[str]:
    """The registered methods that read no log-probabilities."""
    from distill_detect.detectors import REGISTRY

    return [m for m, d in REGISTRY.items() if d.needs <= TEXT_NEEDS]


def check_sampling_feeds(methods: Sequence[str], gen) -> None:
    """Refuse, before any model time, methods the sampling settings cannot feed: sampled-answer methods
    without --samples, and log-probability methods with --no-logprobs (naming the methods left)."""
    from distill_detect.detectors import get

    if not gen.samples:
        bad = [m for m in methods if "output_samples" in get(m).needs]
        if bad:
            raise ConfigError(
                f"--methods {','.join(bad)} read answers sampled at a temperature: add --samples N "
                "(e.g. --samples 8 --temperature 1.0 --sample-seed 0)"
            )
    if not gen.logprobs:
        bad = [m for m in methods if not get(m).needs <= TEXT_NEEDS]
        if bad:
            raise ConfigError(
                f"--no-logprobs records text only, so --methods {','.join(bad)} cannot run; the methods left are "
                f"{', '.join(text_only_methods())} (drop --no-logprobs if the server returns log-probabilities)"
            )


def check_identity(store: TraceStore, identity: dict | None) -> None:
    """Refuse a run made with another model/backend/system prompt, comparing only what ``identity`` knows."""
    old = store.get_meta("fingerprint")
    if not identity or old is None:
        return
    diff = fingerprint_diff(_subset(old, identity), identity)
    if diff:
        raise ConfigError(
            f"{store.dir} holds traces made with different settings ({'; '.join(diff)}). "
            "Use another --out for the new settings, or repeat the original ones to resume"
        )


def _subset(old: dict, new: dict) -> dict:
    """``old`` restricted to the keys of ``new`` (recursively): a hub id's stored revision is not compared."""
    out = {}
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            out[k] = _subset(old[k], v)
        else:
            out[k] = old.get(k)
    return out


# -- generation ------------------------------------------------------------------------------------


def generate_run(questions: Sequence[Question], run_dir, backend_factory: Callable[[], object], *, max_new_tokens: int,
                 batch_size: int = 8, identity: dict | None = None, fill_prompts: bool = False, log=None,
                 sampling: dict | None = None) -> dict:  # fmt: skip
    """Generate every question of ``questions`` into ``run_dir`` that lacks a complete trace.

    ``identity`` (``ModelSettings.identity``) is checked against the run FIRST, so a finished
    run refuses another model instead of reporting its traces as done. ``backend_factory``
    is called only when there is work left. With ``fill_prompts``, stored traces generated
    without prompt log-probabilities get them from a teacher-forced pass. Batches are formed
    from questions of similar length and committed one at a time. Returns counts: planned,
    generated now, already done, tokens generated now, prompts filled in, seconds.

    ``sampling`` (``{**GenConfig.sampling(), "n": N}``): also N answers per question sampled with
    those settings by the same backend, stored apart from the greedy traces (``store.samples``) and
    generated only where missing; adds the counts ``samples_generated``, ``samples_already_done``,
    ``sample_tokens``. The benchmark's own solutions of the questions are recorded too.
    """
    t0 = time.time()
    store = TraceStore(run_dir, create=True)
    try:
        store.check_questions(questions)
        check_identity(store, identity)
        complete = store.complete_ids(max_new_tokens)
        todo = [q for q in questions if q.id not in complete]
        no_prompt = store.missing_prompt_ids() & {q.id for q in questions} - {q.id for q in todo} if fill_prompts else set()
        summary = {"planned": len(questions), "generated": 0, "already_done": len(questions) - len(todo), "tokens": 0}
        summary["prompts_filled"] = 0
        pairs = store.samples_missing(sampling, sampling["n"], [q.id for q in questions]) if sampling else []
        if sampling:
            summary.update(samples_generated=0, samples_already_done=len(questions) * sampling["n"] - len(pairs), sample_tokens=0)
        _record_solutions(store, questions)
        if not todo and not no_prompt and not pairs:
            if sampling and store.get_meta("fingerprint") is not None:
                store.set_meta("sampling", sampling)
            summary["seconds"] = time.time() - t0
            return summary
        if log and summary["already_done"] and todo:
            log(f"resuming {store.dir}: {summary['already_done']} of {len(questions)} questions already generated")
        backend = backend_factory()
        with store.writer(backend.fingerprint()):
            store.add_questions(questions)
            # Where the model came from (not part of the fingerprint): lets later passes reload it.
            store.set_meta("model", {"backend": getattr(backend, "name", None), "location": getattr(backend, "location", None)})
            _decode(backend, store, sorted(todo, key=lambda q: len(q.text)), max_new_tokens, batch_size, summary)
            if no_prompt and "prompt_logprobs" in getattr(backend, "capabilities", ()):
                if log:
                    log(f"filling in the prompt log-probabilities of {len(no_prompt)} traces generated without them")
                _fill_prompts(backend, store, [q for q in questions if q.id in no_prompt], batch_size, summary)
            if sampling:
                store.set_meta("sampling", sampling)
                if pairs:
                    by_id = {q.id: q for q in questions}
                    if log and summary["samples_already_done"]:
                        log(f"resuming the sampled answers: {summary['samples_already_done']} already stored")
                    _sample(backend, store, [(by_id[i], k) for i, k in pairs], sampling, batch_size, summary)
        summary["seconds"] = time.time() - t0
        return summary
    finally:
        store.close()


def _record_solutions(store: TraceStore, questions: Sequence[Question]) -> None:
    """Store the benchmark's own solution or answer of each question that has one and lacks it (no model needed)."""
    have = store.solutions()
    new = {q.id: q.solution for q in questions if getattr(q, "solution", None) and have.get(q.id) != q.solution}
    if new:
        store.put_solutions(new)


def _sample(
    backend, store: TraceStore, pairs: list[tuple[Question, int]], sampling: dict, batch_size: int, summary: dict
) -> None:
    """Sampled answers for the (question, k) ``pairs``, ``batch_size`` at a time, each batch committed."""
    if "samples" not in getattr(backend, "capabilities", ()) and not hasattr(backend, "sample"):
        raise ConfigError(f"the {getattr(backend, 'name', '?')} backend cannot sample answers; use another --backend")
    kw = {k: sampling[k] for k in ("temperature", "top_p", "seed", "max_new_tokens")}
    bar = _progress(len(pairs), "sampling", unit="answer")
    try:
        for i in range(0, len(pairs), batch_size):
            batch = pairs[i : i + batch_size]
            got = backend.sample(batch, **kw)
            store.put_samples(sampling, [(q.id, k, s.text, s.num_tokens, s.finish_reason) for (q, k), s in zip(batch, got)])
            summary["samples_generated"] += len(batch)
            summary["sample_tokens"] += sum(s.num_tokens for s in got)
            bar.update(len(batch))
    except KeyboardInterrupt:
        raise GenerationInterrupted(summary, store.dir) from None
    finally:
        bar.close()


def _decode(backend, store: TraceStore, todo: list[Question], max_new_tokens: int, batch_size: int, summary: dict) -> None:
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


def _fill_prompts(backend, store: TraceStore, questions: list[Question], batch_size: int, summary: dict) -> None:
    for i in range(0, len(questions), batch_size):
        batch = questions[i : i + batch_size]
        store.put_prompt_fields({q.id: f for q, f in zip(batch, backend.score_prompts(batch))})
        summary["prompts_filled"] += len(batch)


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


def generate(questions: Sequence[Question], run_dir, settings, gen, *, methods: Sequence[str] = (), log=None) -> dict:
    """Generate ``questions`` into ``run_dir`` with ``settings`` (``ModelSettings``) and ``gen`` (``GenConfig``):
    in this process, on Ray actors (``settings.workers``) or for one shard (``settings.shard``)."""
    from distill_detect.distributed import generate_run_ray, parse_shard, shard_questions

    check_decoding_feeds(methods, gen.prompt_logprobs)
    check_sampling_feeds(methods, gen)
    factory = settings.factory(gen, methods)  # text only from the start with --no-logprobs
    sampling = {**gen.sampling(), "n": gen.samples} if gen.samples else None
    if settings.shard:
        i, n = parse_shard(settings.shard)
        before, questions = len(questions), shard_questions(questions, i, n)
        if log:
            log(f"shard {i}/{n}: {len(questions)} of {before} questions")
    identity = settings.identity(gen)
    if not settings.workers:
        return generate_run(questions, run_dir, factory, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                            identity=identity, fill_prompts=gen.prompt_logprobs, log=log, sampling=sampling)  # fmt: skip
    gpus = (
        float(settings.tensor_parallel_size or 1)
        if settings.backend == "vllm"
        else float(str(settings.device).startswith("cuda"))
    )
    with TraceStore(run_dir, create=True) as store:
        check_identity(store, identity)
    summary = generate_run_ray(questions, run_dir, factory, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                               workers=settings.workers, address=settings.ray_address, num_gpus=gpus, log=log)  # fmt: skip
    if sampling:  # the sampled answers in this process (greedy traces are all there now, so only sampling is left)
        s = generate_run(questions, run_dir, factory, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                         identity=identity, log=log, sampling=sampling)  # fmt: skip
        summary.update({k: v for k, v in s.items() if k.startswith("sample")})
    return summary


# -- extra passes ------------------------------------------------------------------------------------


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
    """Run the extra passes (``passes.PASSES``) that ``methods`` need over the stored traces that lack them.

    Results go into the run's store keyed by a fingerprint of the pass, so a second scoring
    costs no model time and an interrupted pass resumes. Returns {pass name: traces processed now}.
    """
    from distill_detect.passes import PASSES, required_passes

    done: dict[str, int] = {}
    needed = sorted(required_passes(methods))
    if not needed:
        return done
    student = None
    with TraceStore(run_dir) as store:
        run_fp = store.get_meta("fingerprint")
        for name in needed:
            p = PASSES[name]
            if p.model == "reference" and reference_factory is None:
                # Arrays a reference computed earlier serve (the store keeps which model that was); else ask for one.
                lacking = store.extras_missing(p.produces, None)
                if lacking & ids if ids is not None else lacking:
                    raise ConfigError(
                        f"methods {', '.join(sorted(m for m in methods if _uses(m, p)))} need --reference-model: "
                        "the model before distillation (the student's base)"
                    )
                continue
            pass_fp = {"pass": name, "student": run_fp, **({"reference": reference_identity} if p.model == "reference" else {})}
            if "solution" in name:  # its input is the stored solutions: other solutions, other arrays
                pass_fp["solutions"] = _digest(store.solutions())
            todo_ids = store.extras_missing(p.produces, pass_fp)
            todo_ids = todo_ids & ids if ids is not None else todo_ids
            if not todo_ids:
                continue
            traces = [t for t in store.traces() if t.id in todo_ids]
            if log:
                log(f"{name} pass over {len(traces)} traces")
            if p.model == "reference":
                ref = reference_factory()
                try:
                    res = p.fn(ref, traces, batch_size)
                finally:
                    ref.close()
            else:
                student = student or student_factory()
                res = p.fn(student.tok if p.model == "tokenizer" else student, traces, batch_size)
            with store.writer(run_fp):
                store.put_extras(res, pass_fp)
            done[name] = len(traces)
    return done


def _digest(obj) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _uses(method: str, p) -> bool:
    from distill_detect.detectors import get

    return any(n[len("extra:") :] in p.produces for n in get(method).needs if n.startswith("extra:"))


# -- reading traces at one budget --------------------------------------------------------------------


def read_run(run_dir, ids: set[str] | None = None, sampling: dict | None = None) -> tuple[list[Trace], dict | None, dict]:
    """(traces, fingerprint, counts) of a run, read once; traces in input order (only ``ids`` if given).

    Sampled answers are attached as ``Trace.samples``: those of ``sampling`` (``{**GenConfig.sampling(),
    "n": N}``), else of the run's latest sampling request (none when the run has none).
    """
    with TraceStore(run_dir) as store:
        sampling = sampling or store.get_meta("sampling")
        traces = [t for t in store.traces(sampling=sampling) if ids is None or t.id in ids]
        return traces, store.get_meta("fingerprint"), store.counts()


def choose_sampling(run_dir, *, n: int | None = None, temperature: float | None = None, top_p: float | None = None,
                    seed: int | None = None, max_new_tokens: int | None = None) -> dict | None:  # fmt: skip
    """The stored sampling setting that ``score`` reads: the run's latest request, narrowed by what is given.

    Refuses, naming the flags, a choice that matches no stored setting or matches several.
    """
    with TraceStore(run_dir) as store:
        stored = store.sample_settings()
        latest = store.get_meta("sampling")
    given = {"temperature": temperature, "top_p": top_p, "seed": seed, "max_new_tokens": max_new_tokens}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        pick = latest or (stored[-1] if stored else None)
    else:
        match = [s for s in stored if all(s[k] == (float(v) if k in ("temperature", "top_p") else v) for k, v in given.items())]
        if not match:
            have = "; ".join(_sampling_words(s) for s in stored) or "none"
            raise ConfigError(f"{run_dir} holds no answers sampled with {_sampling_words(given)} (stored: {have}); "
                              "choose one with --temperature/--top-p/--sample-seed")  # fmt: skip
        if len(match) > 1:
            have = "; ".join(_sampling_words(s) for s in match)
            raise ConfigError(f"{run_dir} holds several sampling settings that match ({have}); "
                              "name one with --temperature, --top-p, --sample-seed and --max-new-tokens")  # fmt: skip
        pick = match[0]
    if pick is None:
        return None
    if n is not None:
        pick = {**pick, "n": int(n)}
    return pick


def _sampling_words(s: dict) -> str:
    names = {"temperature": "temperature", "top_p": "top-p", "seed": "sample-seed", "max_new_tokens": "max-new-tokens", "n": "N"}
    return ", ".join(f"{names[k]} {s[k]}" for k in names if k in s)


def read_budget(methods: dict[str, dict], max_new_tokens: int) -> int | None:
    """The generated tokens these methods read (None when none reads generated tokens)."""
    from distill_detect.detectors import get
    from distill_detect.scoring import generation_budget

    if not any(n.startswith("output") or n == "extra:reference_output_logprobs" for m in methods for n in get(m).needs):
        return None
    return generation_budget(methods, max_new_tokens)


def common_budget(traces: Sequence[Trace]) -> int | None:
    """The largest budget at which every trace is complete: the lowest cap a trace was cut at (None: none was cut)."""
    caps = [t.max_new_tokens for t in traces if t.finish_reason != "stop" and t.max_new_tokens is not None]
    return min(caps) if caps else None


def at_budget(traces: Sequence[Trace], budget: int | None, *, where) -> list[Trace]:
    """Every trace read at ``budget`` tokens, so no question is compared on more tokens than another.

    Refuses, naming them, traces cut by an older, lower cap: they cannot be read at ``budget``.
    """
    if budget is None:
        return list(traces)
    short = [t for t in traces if t.finish_reason != "stop" and t.max_new_tokens is not None and t.max_new_tokens < budget]
    if short:
        lo = min(t.max_new_tokens for t in short)
        names = ", ".join(repr(t.id) for t in short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
        raise ConfigError(
            f"{where}: {len(short)} of {len(traces)} traces were cut at {lo} tokens by an older, lower --max-new-tokens "
            f"({names}), so they cannot be read at {budget} tokens like the others. Generate them again at {budget} "
            f"(give --model), or read every trace at {lo} with --max-new-tokens {lo}"
        )
    return [t.at_budget(budget) for t in traces]


def at_common_budget(traces: Sequence[Trace], methods: dict[str, dict], max_new_tokens: int | None, *, where, log=None):
    """``at_budget`` for scoring stored traces: at the methods' budget under ``max_new_tokens`` when it is
    given; otherwise at the lowest cap any trace was cut at, when traces of different caps would
    otherwise be compared (said in a warning). Returns (traces, budget)."""
    import warnings

    need = read_budget(methods, max_new_tokens or 10**9)
    if max_new_tokens is not None or need is None:
        return at_budget(traces, need, where=where), need
    common = common_budget(traces)
    if common is not None and common < need:
        if any(t.num_tokens > common for t in traces):
            caps = sorted({t.max_new_tokens for t in traces if t.max_new_tokens})
            warnings.warn(
                f"{where}: traces were decoded to different caps ({', '.join(map(str, caps))} tokens); every trace is read at "
                f"their common budget of {common} tokens (give --max-new-tokens to choose another)",
                stacklevel=2,
            )
        need = common
    return at_budget(traces, need, where=where), need


# -- scoring -----------------------------------------------------------------------------------------


def check_trace_needs(traces: Sequence[Trace], methods: dict[str, dict]) -> None:
    """Fail before scoring when a method needs something the traces lack (names the field and its source)."""
    from distill_detect.detectors import check_needs

    for name in methods:
        check_needs(name, traces)


def score_and_write(traces, methods: dict[str, dict], out_dir, config: dict, *, n_resamples: int = 1000) -> dict:
    """Score traces, compute metrics if labels exist, write the outputs; returns the metrics document."""
    from distill_detect.scoring import evaluate, score_traces, write_outputs

    raw = score_traces(traces, methods)
    labels = [t.label for t in traces]
    metrics = evaluate(labels, raw, methods, n_resamples=n_resamples) if any(x is not None for x in labels) else None
    doc = write_outputs(out_dir, traces, raw, metrics, config)
    doc["_raw"] = raw
    return doc


load_run_traces = read_run  # the name the report module and older scripts use
