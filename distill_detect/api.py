"""The Python API: every command of the CLI is one of these calls.

>>> import distill_detect as dd                                          # doctest: +SKIP
>>> res = dd.run("seen.jsonl", "unseen.jsonl", out="results/a", model="./student",
...              methods="tpd,out_ppl", gen=dd.GenConfig(max_new_tokens=300))   # doctest: +SKIP
>>> print(res.table()); res.metrics["tpd"]["auc"]                       # doctest: +SKIP

* ``generate(questions, run, model=...)``: greedy traces into a resumable run directory.
* ``score(source, methods=...)``: detectors over a run, a traces JSONL or a list of traces (no model,
  except the extra passes some baselines need).
* ``run(members, nonmembers, out=...)``: generate both sets, run the passes, score, write.
* ``audit(questions, reference=..., out=...)``: is a benchmark contaminated (``distill_detect.audit``).

Questions are a path (JSONL, JSON, CSV/TSV, Parquet, optionally ``.gz``), ``bundled:NAME``, or a
list of ``Question``. ``model`` is a name/path or a ``ModelSettings``; decoding settings are a
``GenConfig``. Results are ``Scores`` objects (per-question raw scores, metrics, the config) that
write the output contract and the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill_detect import pipeline
from distill_detect.errors import ConfigError, DistillDetectError, InputError
from distill_detect.settings import ModelSettings
from distill_detect.types import GenConfig, Question, Trace

Log = Callable[[str], None] | None


# -- inputs -------------------------------------------------------------------------------------------


@dataclass
class QuestionSource:
    """Questions loaded from files, remembering which file each came from (errors name file and line)."""

    field: str = "question"
    id_field: str = "id"
    limit: int | None = None
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    def load(self, src, *, label: int | None = None) -> list[Question]:
        if not isinstance(src, (str, Path)):
            qs = list(src)
            return [q if label is None else dataclasses.replace(q, label=label) for q in qs]
        from distill_detect.data import load_questions

        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        qs = load_questions(src, field=self.field, id_field=self.id_field, label=label)
        qs = qs[: self.limit] if self.limit else qs
        self.files.update((q.id, str(src)) for q in qs)
        return qs

    @contextlib.contextmanager
    def located(self):
        """Re-aim an error about one question (its path is the question id) at its input file and line."""
        try:
            yield
        except InputError as exc:
            src = self.files.get(getattr(exc, "path", None))
            if exc.line is not None or src is None:
                raise
            from distill_detect.data import question_line

            line = question_line(src, exc.path, field=self.field, id_field=self.id_field)
            raise InputError(src, f"question {exc.path!r}: {exc.problem}", line=line, field=exc.field) from None


def resolve_methods(methods: str | Sequence[str] = "tpd", params: dict[str, dict] | None = None) -> dict[str, dict]:
    """{name: full parameters}: the detectors' defaults with ``params`` applied and checked."""
    from distill_detect.detectors import parse_methods
    from distill_detect.detectors.tpd import check_tpd_params
    from distill_detect.scoring import resolve_methods as _resolve

    names = parse_methods(methods)
    params = params or {}
    for m in params:
        if m not in names:
            raise ConfigError(f"parameters given for {m!r}, which is not among --methods ({','.join(names)})")
    resolved = _resolve(names, params)
    if "tpd" in resolved:
        check_tpd_params(**resolved["tpd"])
    return resolved


def reference_backend(reference_model: str | None, fingerprint: dict | None):
    """(factory, identity) of the reference (pre-distillation) model, loaded like the student."""
    if not reference_model:
        return None, None
    from distill_detect.models import resolve_model

    fp = fingerprint or {}
    settings = ModelSettings(model=reference_model, dtype=fp.get("dtype", "auto"), device=fp.get("device", "auto"))
    return settings.factory(GenConfig(system_prompt=fp.get("system_prompt"))), resolve_model(reference_model).identity


def _fsd_pass(run_dir, methods, fsd_model: str | None, batch_size: int, log) -> None:
    """The FSD model's arrays for the fsd methods (``distill_detect.fsd.fsd_pass``), when one is given and read."""
    if not fsd_model:
        return
    from distill_detect.fsd import fsd_pass, uses_fsd

    if uses_fsd(methods):
        fsd_pass(run_dir, fsd_model, batch_size=batch_size, log=log)


def _student_from_run(run_dir, fingerprint: dict | None):
    """A factory reloading the model that generated a run (for passes run at scoring time)."""
    from distill_detect.store import TraceStore

    with TraceStore(run_dir) as st:
        where = st.get_meta("model") or {}
    fp = fingerprint or {}

    def make():
        if not where.get("location"):
            raise DistillDetectError(
                f"{run_dir} does not record where its model came from; use 'distill-detect run' to compute these methods"
            )
        s = ModelSettings(model=where["location"], backend=where.get("backend") or "hf", dtype=fp.get("dtype", "auto"),
                          device=fp.get("device", "auto"))  # fmt: skip
        return s.factory(GenConfig(system_prompt=fp.get("system_prompt")))()

    return make, where.get("location")


# -- results ------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Per-question raw scores of each method (in the method's own sign), metrics when labels exist."""

    traces: list[Trace]
    raw: dict[str, np.ndarray]
    methods: dict[str, dict]
    metrics: dict | None
    config: dict
    out: Path | None = None

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.traces]

    @property
    def labels(self) -> list[int | None]:
        return [t.label for t in self.traces]

    def membership(self, method: str) -> np.ndarray:
        """The method's scores oriented higher = more likely a member."""
        from distill_detect.detectors import get
        from distill_detect.metrics import membership_score

        return membership_score(get(method), self.raw[method])

    def table(self) -> str:
        from distill_detect.scoring import format_table

        if not self.metrics:
            return f"{len(self.traces)} questions scored (no labels, so no metrics)"
        return format_table(self.metrics)

    def write(self, out, *, report: bool = True) -> Path:
        """Write scores.jsonl, metrics.json (with labels), TPD's ablations and report.html into ``out``."""
        from distill_detect.scoring import write_outputs

        self.out = Path(out)
        write_outputs(self.out, self.traces, self.raw, self.metrics, self.config)
        if report:
            write_report(self.out, self.traces, self.methods)
        return self.out


def write_report(out: Path, traces: Sequence[Trace], methods: dict) -> Path:
    """TPD's ablations (from the stored traces, with both classes) and the HTML report."""
    from distill_detect.report import write_report as _write

    labels = [t.label for t in traces]
    if "tpd" in methods and len({x for x in labels if x is not None}) == 2:
        from distill_detect.ablation import tpd_ablation, write_ablations

        write_ablations(out, tpd_ablation(list(traces), labels))
    return _write(out, traces=list(traces))


def score_traces(traces: Sequence[Trace], methods: dict[str, dict], config: dict, *, bootstrap: int = 1000) -> Scores:
    """Score traces already read at one budget; metrics over the labelled ones."""
    from distill_detect.scoring import evaluate
    from distill_detect.scoring import score_traces as _score

    pipeline.check_trace_needs(traces, methods)
    with warnings.catch_warnings():
        from distill_detect.detectors import get
        from distill_detect.scoring import EmptyTraceWarning

        if all(get(m).needs <= pipeline.TEXT_NEEDS for m in methods):  # they read text, not token counts
            warnings.simplefilter("ignore", EmptyTraceWarning)
        raw = _score(traces, methods)
    labels = [t.label for t in traces]
    metrics = evaluate(labels, raw, methods, n_resamples=bootstrap) if any(x is not None for x in labels) else None
    return Scores(list(traces), raw, methods, metrics, config)


# -- the commands -------------------------------------------------------------------------------------


def generate(questions, run, *, model: str | ModelSettings = "default", gen: GenConfig | None = None,
             methods: Sequence[str] = (), source: QuestionSource | None = None, label: int | None = None, log: Log = None) -> dict:  # fmt: skip
    """Greedy traces of ``questions`` into the run directory ``run`` (resumable; only what is missing is generated).

    Returns counts: planned, generated (now), already_done, tokens, prompts_filled, seconds.
    """
    source = source or QuestionSource()
    qs = source.load(questions, label=label)
    with source.located():
        return pipeline.generate(qs, run, ModelSettings.of(model), gen or GenConfig(), methods=methods, log=log)


def score(source, *, methods: str | Sequence[str] = "tpd", params: dict | None = None, max_new_tokens: int | None = None,
          reference_model: str | None = None, batch_size: int = 8, bootstrap: int = 1000, out=None, report: bool = True,
          log: Log = None, samples: int | None = None, temperature: float | None = None, top_p: float | None = None,
          sample_seed: int | None = None, fsd_model: str | None = None) -> Scores:  # fmt: skip
    """Score stored traces: ``source`` is a run directory, a traces JSONL file, or a list of ``Trace``.

    Traces decoded to different caps are read at one budget (``max_new_tokens``, else the lowest
    cap any was cut at, with a warning). Passes that some baselines need run on the run's model.
    The text-only methods read the run's stored sampled answers: those of its latest sampling
    request, or those chosen by ``temperature``/``top_p``/``sample_seed``; ``samples=N`` reads the
    first N of them (no model either way). ``fsd_model``: the FSD model the fsd methods read (``distill_detect.fsd``).
    """
    resolved = resolve_methods(methods, params)
    location = None
    if isinstance(source, (str, Path)) and not Path(source).is_file():  # a run directory (TraceStore says if it is not)
        fp = _fingerprint(source)
        student, location = _student_from_run(source, fp)
        ref_factory, ref_id = reference_backend(reference_model, fp)
        _fsd_pass(source, resolved, fsd_model, batch_size, log)
        pipeline.run_passes(source, list(resolved), student_factory=student, reference_factory=ref_factory,
                            reference_identity=ref_id, batch_size=batch_size, log=log)  # fmt: skip
        sampling = pipeline.choose_sampling(source, n=samples, temperature=temperature, top_p=top_p, seed=sample_seed)
        traces, fp, counts = pipeline.read_run(source, sampling=sampling)
        if not traces:
            raise DistillDetectError(f"{source}: no traces stored yet; run 'distill-detect generate' first")
        if counts["questions"] > len(traces):
            import warnings

            warnings.warn(f"{counts['questions'] - len(traces)} of {counts['questions']} questions in {source} have no "
                          "trace yet; run 'generate' again to finish (scoring what is there)", stacklevel=2)  # fmt: skip
        src = {"run": str(Path(source).resolve()), "fingerprint": fp, **({"sampling": sampling} if sampling else {})}
    elif isinstance(source, (str, Path)):  # a traces JSONL file
        from distill_detect.traceio import read_traces_jsonl

        traces, src = read_traces_jsonl(source), {"traces": str(Path(source).resolve())}
    else:
        traces, src = list(source), {"traces": "in memory"}
    traces, budget = pipeline.at_common_budget(traces, resolved, max_new_tokens, where=src.get("run") or src["traces"])
    config = {"source": src, "methods": resolved, "model_location": location, "max_new_tokens": budget}
    res = score_traces(traces, resolved, config, bootstrap=bootstrap)
    if out is not None:
        res.write(out, report=report)
    return res


def run(members, nonmembers, *, out, model: str | ModelSettings = "default", methods: str | Sequence[str] = "tpd",
        params: dict | None = None, gen: GenConfig | None = None, reference_model: str | None = None,
        source: QuestionSource | None = None, bootstrap: int = 1000, report: bool = True, log: Log = None,
        fsd_model: str | None = None) -> Scores:  # fmt: skip
    """Members against non-members end to end: generate (only the tokens the methods read), passes, score, write.

    >>> import distill_detect as dd                                                   # doctest: +SKIP
    >>> dd.run("bundled:gsm8k_train_sample", "bundled:gsm8k_test", out="results/demo",
    ...        source=dd.QuestionSource(limit=16), gen=dd.GenConfig(max_new_tokens=64)).table()  # doctest: +SKIP
    """
    from distill_detect.data import combine_labelled
    from distill_detect.scoring import generation_budget

    settings, gen, source = ModelSettings.of(model), gen or GenConfig(), source or QuestionSource()
    resolved = resolve_methods(methods, params)
    pipeline.check_decoding_feeds(list(resolved), gen.prompt_logprobs)
    pipeline.check_sampling_feeds(list(resolved), gen)
    qs = combine_labelled(source.load(members), source.load(nonmembers), members_path=_name(members, "members"),
                          nonmembers_path=_name(nonmembers, "non-members"), field=source.field, id_field=source.id_field)  # fmt: skip
    budget = generation_budget(resolved, gen.max_new_tokens)
    if budget < gen.max_new_tokens and log:
        log(f"the requested methods read at most {budget} generated tokens: decoding stops there")
    run_dir = Path(out) / "run"
    with source.located():
        s = pipeline.generate(
            qs, run_dir, settings, dataclasses.replace(gen, max_new_tokens=budget), methods=list(resolved), log=log
        )
    if s["tokens"] and log:
        log(
            f"generated {s['generated']} questions, {s['tokens']} tokens in {s['seconds']:.0f}s ({s['tokens'] / s['seconds']:.1f} tok/s)"
        )
    if s.get("samples_generated") and log:
        log(
            f"sampled {s['samples_generated']} answers ({s['sample_tokens']} tokens); {s['samples_already_done']} were already stored"
        )
    wanted = {q.id for q in qs}
    fp = _fingerprint(run_dir)
    ref_factory, ref_id = reference_backend(reference_model, fp)
    _fsd_pass(run_dir, resolved, fsd_model, gen.batch_size, log)
    pipeline.run_passes(run_dir, list(resolved), student_factory=settings.factory(gen), reference_factory=ref_factory,
                        reference_identity=ref_id, batch_size=gen.batch_size, ids=wanted, log=log)  # fmt: skip
    sampling = {**dataclasses.replace(gen, max_new_tokens=budget).sampling(), "n": gen.samples} if gen.samples else None
    traces, fp, _ = pipeline.read_run(run_dir, wanted, sampling=sampling)
    traces = pipeline.at_budget(traces, pipeline.read_budget(resolved, budget), where=run_dir)
    src = {"run": str(run_dir.resolve()), "fingerprint": fp, **({"sampling": sampling} if sampling else {})}
    config = {"source": src, "reference_model": ref_id, "methods": resolved,
              "members": _name(members, "members"), "nonmembers": _name(nonmembers, "non-members"), "limit": source.limit, "max_new_tokens": budget,
              "model_location": _model_location(run_dir)}  # fmt: skip
    res = score_traces(traces, resolved, config, bootstrap=bootstrap)
    res.write(out, report=report)
    return res


def audit(questions, reference=None, *, out, make_reference: bool = False, model: str | ModelSettings | None = "default",
          run_dir=None, method: str = "tpd", params: dict | None = None, gen: GenConfig | None = None,
          reference_model: str | None = None, fdr: float = 0.05, alpha: float = 0.05, seed: int = 0, bootstrap: int = 2000,
          source: QuestionSource | None = None, report: bool = True, log: Log = None):  # fmt: skip
    """Is the benchmark ``questions`` contaminated? Compared with ``reference`` (known unseen) or a
    perturbed copy of itself (``make_reference``). ``model=None`` with ``run_dir``: stored traces only.
    Returns an ``AuditReport`` (``.result`` holds the statistics, ``.verdict()`` the first line)."""
    from distill_detect.auditing import audit_pipeline

    return audit_pipeline(questions, reference, out=Path(out), make_reference=make_reference,
                          settings=None if model is None else ModelSettings.of(model), run_dir=run_dir, method=method,
                          params=params, gen=gen or GenConfig(), reference_model=reference_model, fdr=fdr, alpha=alpha,
                          seed=seed, bootstrap=bootstrap, source=source or QuestionSource(), report=report, log=log)  # fmt: skip


def _name(src, what: str) -> str:
    """A question source as it appears in messages and the config: its path, or 'N members (in memory)'."""
    return str(src) if isinstance(src, (str, Path)) else f"{len(src)} {what} (in memory)"


def _fingerprint(run_dir) -> dict | None:
    from distill_detect.store import TraceStore

    with TraceStore(run_dir) as st:
        return st.get_meta("fingerprint")


def _model_location(run_dir):
    from distill_detect.store import TraceStore

    with TraceStore(run_dir) as st:
        return (st.get_meta("model") or {}).get("location")
