"""The trace interchange format: JSONL, one generation per line.

Written by ``distill-detect export`` and read by ``distill-detect score --traces``, so
generations made elsewhere (API logs, another engine) can be scored too.

Required per line:
    ``id``               string or integer, unique in the file
    ``output_logprobs``  list of numbers: log p of each emitted token, in generation order
                         (finite, <= 0; values in (0, 1e-6] are rounding and read as 0).
                         A text-only trace (a server that returns no log-probabilities) omits
                         it and gives ``output_text``; only the text-only methods read it.
Optional:
    ``label`` (0/1), ``question``, ``output_text``, ``output_token_ids`` (ints, same length),
    ``finish_reason``, ``max_new_tokens``, ``output_mean_logp``, ``output_std_logp``,
    ``prompt_ids``, ``prompt_logprobs``, ``prompt_mean_logp``, ``prompt_std_logp``,
    ``extra`` (an object of named number lists, e.g. ``reference_output_logprobs``),
    ``solution`` (the benchmark's own solution or final answer), ``text_tokens`` (a text-only
    trace's generated-token count), and ``samples`` (the answers sampled for the text-only
    methods: ``{"texts": [...], "temperature", "top_p", "seed", "max_new_tokens", "num_tokens": [...]}``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from distill_detect.data import read_records
from distill_detect.errors import DistillDetectError, InputError
from distill_detect.types import JSON_NAMES, TRACE_ARRAYS, Samples, Trace

_SCALARS = ("label", "question", "output_text", "finish_reason", "max_new_tokens", "solution", "text_tokens")
_INTS = ("label", "max_new_tokens", "text_tokens")
_ROUNDING = 1e-6


def trace_to_dict(t: Trace) -> dict:
    """One trace as a JSON object: the scalars that are set, every array of the schema that is present, ``extra``."""
    d: dict = {"id": t.id}
    for k in _SCALARS:
        v = getattr(t, k)
        if v is not None:
            d[k] = int(v) if k in _INTS else v
    for name, dtype in TRACE_ARRAYS.items():
        v = getattr(t, name)
        if v is not None:
            d[JSON_NAMES[name]] = v.tolist() if dtype.kind == "i" else [float(x) for x in v]
    if t.extra:
        d["extra"] = {k: np.asarray(v).tolist() for k, v in t.extra.items()}
    if t.samples is not None:
        d["samples"] = {"texts": list(t.samples.texts), **t.samples.settings(), "num_tokens": list(t.samples.num_tokens)}
    return d


def _samples(path, line: int, rec) -> Samples:
    """The ``samples`` object of one line, checked field by field."""
    if not isinstance(rec, dict):
        raise InputError(
            path, "must be an object with texts, temperature, top_p, seed, max_new_tokens", line=line, field="samples"
        )
    texts = rec.get("texts")
    if not isinstance(texts, list) or not all(isinstance(x, str) for x in texts):
        raise InputError(path, "must be a list of strings (the sampled answers)", line=line, field="samples.texts")
    for k in ("temperature", "top_p"):
        v = rec.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise InputError(path, f"must be a positive number, got {v!r}", line=line, field=f"samples.{k}")
    for k in ("seed", "max_new_tokens"):
        v = rec.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(path, f"must be a non-negative integer, got {v!r}", line=line, field=f"samples.{k}")
    counts = rec.get("num_tokens") or []
    if not isinstance(counts, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in counts):
        raise InputError(path, "must be a list of integers", line=line, field="samples.num_tokens")
    if counts and len(counts) != len(texts):
        raise InputError(path, f"{len(counts)} counts for {len(texts)} answers", line=line, field="samples.num_tokens")
    return Samples(texts=tuple(texts), temperature=float(rec["temperature"]), top_p=float(rec["top_p"]), seed=rec["seed"],
                   max_new_tokens=rec["max_new_tokens"], num_tokens=tuple(counts))  # fmt: skip


def write_traces_jsonl(path, traces: Iterable[Trace]) -> int:
    """Write traces atomically; returns how many were written."""
    import os

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            for t in traces:
                fh.write(json.dumps(trace_to_dict(t), ensure_ascii=False) + "\n")
                n += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # e.g. a full disk: leave no partial file behind (the target is untouched)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            blocked = path.parent.exists() and not path.parent.is_dir()
            why = f"{path.parent} is not a directory" if blocked else exc.strerror or exc
            raise DistillDetectError(f"cannot write {path}: {why}") from None
        raise
    return n


def _numbers(path, line, field, value, *, logprob: bool, integer: bool = False) -> np.ndarray:
    if not isinstance(value, list):
        raise InputError(path, f"must be a list of numbers, got {type(value).__name__}", line=line, field=field)
    for k, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or (integer and not isinstance(x, int)):
            kind = "integers" if integer else "numbers"
            raise InputError(path, f"element {k} is {x!r}; expected {kind}", line=line, field=field)
        if not integer and not math.isfinite(x):
            raise InputError(path, f"element {k} is {x!r}; log-probabilities must be finite", line=line, field=field)
        if logprob and x > _ROUNDING:
            raise InputError(path, f"element {k} is {x!r}; a log-probability cannot be positive", line=line, field=field)
    if integer:
        return np.asarray(value, dtype=np.int64)
    arr = np.asarray(value, dtype=np.float64)
    return np.minimum(arr, 0.0) if logprob else arr


def read_traces_jsonl(path) -> list[Trace]:
    """Read and validate a traces file; every problem names the file, line and field."""
    from distill_detect.data import parse_label

    out: list[Trace] = []
    seen: dict[str, int] = {}
    for line, rec in read_records(path):
        if "id" not in rec:
            raise InputError(path, "missing", line=line, field="id")
        raw_id = rec["id"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            raise InputError(path, f"must be a string or integer, got {type(raw_id).__name__}", line=line, field="id")
        qid = str(raw_id)
        if qid in seen:
            raise InputError(path, f"duplicate id {qid!r} (first on line {seen[qid]})", line=line, field="id")
        seen[qid] = line
        text_only = rec.get("output_logprobs") is None and isinstance(rec.get("output_text"), str)
        if "output_logprobs" not in rec and not text_only:
            raise InputError(path, "missing (the emitted tokens' log-probabilities; a text-only trace gives output_text instead)",
                             line=line, field="output_logprobs")  # fmt: skip
        if "output_logprobs" in rec and rec["output_logprobs"] is None and not text_only:
            raise InputError(path, "is null; expected the emitted tokens' log-probabilities", line=line, field="output_logprobs")
        kw: dict = {}
        for name, dtype in TRACE_ARRAYS.items():
            key = JSON_NAMES[name]
            if rec.get(key) is not None:
                kw[name] = _numbers(path, line, key, rec[key], logprob=name.endswith("logprobs"), integer=dtype.kind == "i")
        if (
            kw.get("output_ids") is not None
            and kw.get("output_logprobs") is not None
            and len(kw["output_ids"]) != len(kw["output_logprobs"])
        ):
            raise InputError(
                path,
                f"{len(kw['output_ids'])} token ids but {len(kw['output_logprobs'])} log-probabilities",
                line=line,
                field="output_token_ids",
            )
        for f in ("question", "output_text", "finish_reason", "solution"):
            v = rec.get(f)
            if v is not None and not isinstance(v, str):
                raise InputError(path, f"must be a string, got {type(v).__name__}", line=line, field=f)
            kw[f] = v
        extra = rec.get("extra") or {}
        if not isinstance(extra, dict):
            raise InputError(path, "must be an object of named number lists", line=line, field="extra")
        kw["extra"] = {
            k: _numbers(path, line, f"extra.{k}", v, logprob=k.endswith("logprobs")).astype(np.float32) for k, v in extra.items()
        }
        for f in ("max_new_tokens", "text_tokens"):
            v = rec.get(f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InputError(path, f"must be a non-negative integer, got {v!r}", line=line, field=f)
            kw[f] = v
        if rec.get("samples") is not None:
            kw["samples"] = _samples(path, line, rec["samples"])
        kw.setdefault("output_logprobs", None)  # a text-only trace
        out.append(Trace(id=qid, label=parse_label(path, line, rec.get("label"), False), **kw))
    return out
