"""Generation across processes and machines: Ray actors, scheduler shards, and merging runs.

Three ways to spread one audit over more hardware, all ending in ordinary run
directories (``distill_detect.store``):

* **Ray** (``generate_run_ray``, ``--workers N [--ray-address ADDR]``): the driver
  shards the pending questions into batches and hands them to N actors, each holding
  its own backend (HF on a CPU or GPU, vLLM per GPU or node). Actors only compute;
  the driver is the one writer of the store and commits each batch as it returns, so
  the durability of the single-process path is kept (a killed driver loses at most the
  batches in flight). An actor that dies (killed, out of memory, node lost) has its
  batch put back on the queue for the others; a batch that kills actors
  ``max_attempts`` times stops the run with an error instead of eating the pool.
* **Shards** (``shard_questions``, ``--shard i/N``): for schedulers such as SLURM, each
  job takes the questions whose id hashes to its shard (sha256, stable across machines
  and Python versions) and writes its own run directory.
* **Merge** (``merge_runs``, ``distill-detect merge RUN1 RUN2 ... --out RUN``): combines
  runs made with the same fingerprint. A question present in several runs is accepted
  only when its traces are identical (same tokens, log-probs, text, cap); otherwise the
  merge is refused, naming the question.

Ray is imported only inside ``generate_run_ray`` (extra ``[ray]``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from distill_detect.errors import ConfigError, DistillDetectError
from distill_detect.store import TraceStore, fingerprint_diff
from distill_detect.types import Question

# -- shards ---------------------------------------------------------------------------------------


def parse_shard(spec: str) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N.

    >>> parse_shard("2/8")
    (2, 8)
    """
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec!r}: expected I/N with integers, e.g. 0/4 for the first of four shards") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {spec!r}: need 0 <= I < N (shards are numbered from 0), e.g. 0/{max(n, 1)}")
    return i, n


def shard_of(question_id: str, n: int) -> int:
    """The shard (0..n-1) of a question id: sha256 of the id, so every machine agrees.

    >>> shard_of("q-1", 4) == shard_of("q-1", 4)
    True
    """
    return int.from_bytes(hashlib.sha256(question_id.encode("utf-8")).digest()[:8], "big") % n


def shard_questions(questions: Sequence[Question], index: int, count: int) -> list[Question]:
    """The questions of shard ``index`` of ``count`` (input order kept)."""
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count}: need 0 <= index < count")
    return [q for q in questions if shard_of(q.id, count) == index]


# -- merge ----------------------------------------------------------------------------------------


def merge_runs(sources: Sequence, out, *, log: Callable[[str], None] | None = None) -> dict:
    """Combine run directories made with one fingerprint into ``out`` (created, or extended if it matches).

    Questions keep the order of the sources (first run first). A question in several
    runs must carry the same text, and its traces (and extra-pass arrays) must be
    identical, or the merge is refused before anything is written. The sampled answers
    (every sampling setting) and the benchmark's solutions are copied the same way:
    an identical duplicate is kept once, a conflicting one refuses the merge. The merged
    run's latest sampling request (what ``score`` reads by default) is the first source's
    that has one (``out``'s own when it already has one). Returns counts.
    """
    if not sources:
        raise ConfigError("merge needs at least one run directory")
    srcs = [Path(s) for s in sources]
    out = Path(out)
    if any(s.resolve() == out.resolve() for s in srcs):
        raise ConfigError(f"--out {out} is also one of the inputs; merge into a new directory")
    stores = [TraceStore(s, readonly=True) for s in srcs]
    try:
        fps = [st.get_meta("fingerprint") for st in stores]
        for s, fp in zip(srcs, fps):
            if fp is None:
                raise DistillDetectError(f"{s}: has no fingerprint yet (no trace was ever generated); leave it out")
        for s, fp in zip(srcs[1:], fps[1:]):
            diff = fingerprint_diff(fps[0], fp)
            if diff:
                raise ConfigError(f"cannot merge {srcs[0]} and {s}: made with different settings ({'; '.join(diff)})")
        # Gather everything first and check it; write only when the whole merge is consistent.
        questions: dict[str, tuple] = {}
        traces: dict[str, tuple] = {}
        extras: dict[tuple[str, str], tuple] = {}
        samples: dict[tuple[str, str, int], tuple] = {}  # (id, setting, k) -> ((text, tokens, finish), created, source)
        solutions: dict[str, tuple[str, Path]] = {}
        dup_identical = 0
        for s, st in zip(srcs, stores):
            for q in st.questions():
                known = questions.get(q.id)
                if known and known[0] != q.text:
                    raise ConfigError(f"question id {q.id!r} has different text in {known[2]} and {s}; cannot merge")
                if known and known[1] != q.label and None not in (known[1], q.label):
                    raise ConfigError(f"question {q.id!r} has label {known[1]} in {known[2]} but {q.label} in {s}")
                if not known or known[1] is None:
                    questions[q.id] = (q.text, q.label, s)
            for qid, *data in st.trace_rows():
                if qid in traces:
                    if traces[qid][0] != tuple(data):
                        raise ConfigError(
                            f"question {qid!r} has different traces in {traces[qid][1]} and {s} (same fingerprint, so one of "
                            "them was generated under another cap or by a non-deterministic server); merge without one of them"
                        )
                    dup_identical += 1
                    continue
                traces[qid] = (tuple(data), s)
            for qid, name, *val in st.extra_rows():
                key = (qid, name)
                if key in extras and extras[key][0] != tuple(val):
                    raise ConfigError(f"question {qid!r}: extra array {name!r} differs between {extras[key][1]} and {s}")
                extras.setdefault(key, (tuple(val), s))
            for qid, setting, k, *val, created in st.sample_rows():
                key = (qid, setting, int(k))
                if key in samples and samples[key][0] != tuple(val):
                    raise ConfigError(
                        f"question {qid!r}: sampled answer {k} ({_setting_words(setting)}) differs between {samples[key][2]} "
                        f"and {s} (same seed, so one of them came from another server or model); merge without one of them"
                    )
                samples.setdefault(key, (tuple(val), created, s))
            for qid, text in st.solutions().items():
                if qid in solutions and solutions[qid][0] != text:
                    raise ConfigError(f"question {qid!r} has a different solution in {solutions[qid][1]} and {s}; cannot merge")
                solutions.setdefault(qid, (text, s))
        model_meta = stores[0].get_meta("model")
        sampling_meta = next((m for m in (st.get_meta("sampling") for st in stores) if m is not None), None)
    finally:
        for st in stores:
            st.close()

    store = TraceStore(out, create=True)
    try:
        with store.writer(fps[0]):
            existing = {qid: tuple(data) for qid, *data in store.trace_rows()}
            for qid, (data, s) in traces.items():
                if qid in existing and existing[qid] != data:
                    raise ConfigError(f"question {qid!r} in {s} differs from the trace already in {out}; cannot merge")
            have = {(qid, setting, int(k)): tuple(val) for qid, setting, k, *val, _ in store.sample_rows()}
            for (qid, setting, k), (val, _, s) in samples.items():
                if have.get((qid, setting, k), val) != val:
                    raise ConfigError(
                        f"question {qid!r}: sampled answer {k} ({_setting_words(setting)}) in {s} differs from the one "
                        f"already in {out}; cannot merge"
                    )
            had = store.solutions()
            for qid, (text, s) in solutions.items():
                if had.get(qid, text) != text:
                    raise ConfigError(
                        f"question {qid!r}: the solution in {s} differs from the one already in {out}; cannot merge"
                    )
            store.add_questions(Question(id=q, text=t, label=lab) for q, (t, lab, _) in questions.items())
            if model_meta is not None:
                store.set_meta("model", model_meta)
            store.put_trace_rows(
                ((qid, *data) for qid, (data, _) in traces.items()),
                ((qid, name, *val) for (qid, name), (val, _) in extras.items()),
            )
            store.put_sample_rows((qid, setting, k, *val, created) for (qid, setting, k), (val, created, _) in samples.items())
            store.put_solutions({qid: text for qid, (text, _) in solutions.items()})
            if sampling_meta is not None and store.get_meta("sampling") is None:
                store.set_meta("sampling", sampling_meta)
            counts = store.counts()
            sample_counts = store.sample_counts()
    finally:
        store.close()
    summary = {
        "sources": len(srcs),
        "questions": counts["questions"],
        "traces": counts["traces"],
        "duplicates_identical": dup_identical,
        "samples": sample_counts["samples"],
        "solutions": len(solutions),
    }
    if log:
        log(f"merged {len(srcs)} runs into {out}: {counts['traces']} traces of {counts['questions']} questions"
            + (f" ({dup_identical} identical duplicates kept once)" if dup_identical else "")
            + (f"; {sample_counts['samples']} sampled answers" if sample_counts["samples"] else ""))  # fmt: skip
    return summary


def _setting_words(setting: str) -> str:
    """A stored sampling key (``TraceStore.sampling_key``) in words, for messages."""
    try:
        d = json.loads(setting)
        return ", ".join(f"{k}={d[k]}" for k in ("temperature", "top_p", "seed", "max_new_tokens") if k in d)
    except (ValueError, TypeError, AttributeError):
        return setting


# -- the CLI's entry points ----------------------------------------------------------------------


def run_generation(questions, run_dir, backend_factory, args, *, max_new_tokens: int, batch_size: int, log=None) -> dict:
    """Generate with Ray when ``args.workers`` is set, else in this process (``pipeline.generate_run``)."""
    from distill_detect.pipeline import generate_run

    if getattr(args, "shard", None):
        i, n = parse_shard(args.shard)
        before = len(questions)
        questions = shard_questions(questions, i, n)
        if log:
            log(f"shard {i}/{n}: {len(questions)} of {before} questions")
    workers = getattr(args, "workers", None)
    if not workers:
        return generate_run(questions, run_dir, backend_factory, max_new_tokens=max_new_tokens, batch_size=batch_size, log=log)
    gpus = 0.0
    if args.backend == "vllm":
        gpus = float(getattr(args, "tensor_parallel_size", 1) or 1)
    elif str(getattr(args, "device", "")).startswith("cuda"):
        gpus = 1.0
    return generate_run_ray(
        questions,
        run_dir,
        backend_factory,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        workers=workers,
        address=getattr(args, "ray_address", None),
        num_gpus=gpus,
        log=log,
    )


def cmd_merge(args) -> int:
    merge_runs(args.runs, args.out, log=lambda m: print(m, file=sys.stderr))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="combine runs made with the same settings (e.g. --shard jobs) into one run",
        description="Combine run directories made with one fingerprint. A question in several runs must have identical traces.",
        epilog="example:\n  distill-detect merge runs/s0 runs/s1 runs/s2 --out runs/all",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="merged run directory (created, or extended when its settings match)")
    p.set_defaults(func=cmd_merge)
    from distill_detect.backends.capabilities import cmd_backends

    p = sub.add_parser("backends", help="which methods each backend can run (capability table)")
    p.set_defaults(func=cmd_backends)


# -- Ray ------------------------------------------------------------------------------------------


class _Worker:
    """Ray actor body: one backend, built lazily in the actor's own process."""

    def __init__(self, factory):
        self.backend = factory()

    def fingerprint(self) -> dict:
        return self.backend.fingerprint()

    def meta(self) -> dict:
        return {"backend": getattr(self.backend, "name", None), "location": getattr(self.backend, "location", None)}

    def generate(self, batch, max_new_tokens: int):
        return self.backend.generate(batch, max_new_tokens=max_new_tokens)


def generate_run_ray(
    questions: Sequence[Question],
    run_dir,
    backend_factory: Callable[[], object],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    workers: int = 2,
    address: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    max_attempts: int = 3,
    log: Callable[[str], None] | None = None,
    on_commit: Callable[[dict, list], None] | None = None,
    init_kwargs: dict | None = None,
) -> dict:
    """``pipeline.generate_run`` with the model calls spread over ``workers`` Ray actors.

    ``backend_factory`` is shipped to each actor (it must pickle with cloudpickle) and
    called there. ``address``: an existing cluster ('auto', 'ray://host:10001'); None
    starts a local one. ``num_cpus``/``num_gpus``: resources per actor (a vLLM actor on
    one GPU: ``num_gpus=1``). ``on_commit(summary, actors)`` is called after each stored
    batch (progress hooks; tests kill an actor there). Returns the same counts as
    ``generate_run`` plus ``retried`` batches and ``workers_lost``.
    """
    from distill_detect.errors import require

    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be an integer >= 1, got {workers!r}")
    t0 = time.time()
    store = TraceStore(run_dir, create=True)
    try:
        store.check_questions(questions)
        complete = store.complete_ids(max_new_tokens)
        todo = [q for q in questions if q.id not in complete]
        summary = {"planned": len(questions), "generated": 0, "already_done": len(questions) - len(todo), "tokens": 0}
        summary.update(retried=0, workers_lost=0)
        if not todo:
            summary["seconds"] = time.time() - t0
            return summary
        ray = require("ray", "ray", "Generation with --workers")
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        dead_errors = (RayActorError, ActorDiedError, ActorUnavailableError)
        started_here = not ray.is_initialized()
        if started_here:
            kw = {"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})}
            ray.init(address=address, **kw)
        try:
            Worker = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(_Worker)
            actors = [Worker.remote(backend_factory) for _ in range(workers)]
            alive, error = _gather_alive(ray, actors, "fingerprint", dead_errors)
            if not alive:
                raise DistillDetectError(f"no Ray worker could start its backend: {error}")
            first = alive[0][1]
            for _, fp in alive:
                diff = fingerprint_diff(first, fp)
                if diff:
                    raise ConfigError(
                        f"Ray workers built different backends ({'; '.join(diff)}); give every node the same model and versions"
                    )
            actors = [a for a, _ in alive]
            meta = ray.get(actors[0].meta.remote())
            with store.writer(first):
                store.add_questions(questions)
                store.set_meta("model", meta)
                todo = sorted(todo, key=lambda q: len(q.text))
                queue = deque((todo[i : i + batch_size], 0) for i in range(0, len(todo), batch_size))
                idle = deque(actors)
                running: dict = {}  # ObjectRef -> (actor, batch, attempts)
                if log:
                    log(f"generating {len(todo)} questions on {len(actors)} Ray workers")
                while queue or running:
                    while queue and idle:
                        actor = idle.popleft()
                        batch, attempts = queue.popleft()
                        running[actor.generate.remote(batch, max_new_tokens)] = (actor, batch, attempts)
                    if not running:
                        raise DistillDetectError(
                            f"all Ray workers died; {summary['generated'] + summary['already_done']} of {len(questions)} "
                            f"questions are stored in {store.dir}: run the same command again to resume"
                        )
                    done, _ = ray.wait(list(running), num_returns=1)
                    ref = done[0]
                    actor, batch, attempts = running.pop(ref)
                    try:
                        traces = ray.get(ref)
                    except dead_errors:
                        summary["workers_lost"] += 1
                        if attempts + 1 >= max_attempts:
                            raise DistillDetectError(
                                f"a batch of {len(batch)} questions (first {batch[0].id!r}) was lost with {attempts + 1} "
                                "Ray workers in a row; it may be what kills them (memory?). Finished batches are stored"
                            ) from None
                        queue.appendleft((batch, attempts + 1))
                        summary["retried"] += 1
                        if log:
                            log(f"a Ray worker died; its {len(batch)} questions go to another worker")
                        continue
                    store.put_traces(traces)
                    summary["generated"] += len(batch)
                    summary["tokens"] += sum(t.num_tokens for t in traces)
                    idle.append(actor)
                    if on_commit is not None:
                        on_commit(dict(summary), list(actors))
            for a in actors:
                ray.kill(a)
        finally:
            if started_here:
                ray.shutdown()
        summary["seconds"] = time.time() - t0
        return summary
    finally:
        store.close()


def _gather_alive(ray, actors, method: str, dead_errors) -> tuple[list, str | None]:
    """([(actor, result)], first error) of calling ``method`` on every actor; actors that died are left out."""
    refs = [(getattr(a, method).remote(), a) for a in actors]
    out, error = [], None
    for ref, actor in refs:
        try:
            out.append((actor, ray.get(ref)))
        except dead_errors as exc:
            error = error or str(exc).strip().splitlines()[-1][:500]
    return out, error
