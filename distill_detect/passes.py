"""Extra model passes: the arrays some detectors read from ``Trace.extra``.

Generation records what most detectors need. A few baselines need one more array per
trace, computed after generation:

=================  ==============================================  ==============================
pass               extra keys it produces                          detectors that read them
=================  ==============================================  ==============================
``lowercase``      ``lowercase_prompt_logprobs``                   lowercase
``reference``      ``reference_prompt_logprobs``,                  reference, tpd_ref
                   ``reference_output_logprobs``
``dcpdd_freq``     ``dcpdd_token_freq``                            dc_pdd
``fsd``            ``fsd_output_logprobs``                         fsd, fsd_tpd
=================  ==============================================  ==============================

Each pass takes traces (and a backend or a table) and returns ``{trace_id: {key: float32
array}}``; it never edits a trace and never writes a file, so the store decides where the
arrays live. ``required_passes(methods)`` says which passes a list of methods needs and
``pending(traces, name)`` which traces still lack a pass's arrays (to resume).

The DC-PDD token-frequency table is built offline from local text with the audited
model's tokenizer (``build_token_freq_table``; ``bundled_corpus_texts`` gives the
question sets shipped in the package) and saved as a plain ``.npy`` array, never
pickled and never downloaded.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill_detect.errors import ConfigError, DistillDetectError, InputError
from distill_detect.types import Question, Trace


@dataclass(frozen=True)
class Pass:
    """An extra model pass, registered like a detector: what it adds and which model it runs."""

    name: str
    produces: tuple[str, ...]
    """The ``Trace.extra`` keys it adds."""
    model: str
    """'student' (the audited model again), 'reference' (the pre-distillation model), 'tokenizer' (no forward)
    or 'fsd' (the FSD model: its arrays come from ``distill_detect.fsd.fsd_pass``)."""
    fn: Callable
    """fn(model_or_tokenizer, traces, batch_size) -> {trace_id: {key: array}}."""
    summary: str


PASSES: dict[str, Pass] = {}


def register_pass(p: Pass) -> Pass:
    from distill_detect.detectors.base import add_unique

    return add_unique(PASSES, p, "pass")


# -- which passes a run needs ---------------------------------------------------------------------


def required_extras(method_names: Iterable[str]) -> set[str]:
    """The ``Trace.extra`` keys that these methods read.

    >>> sorted(required_extras(["tpd", "reference", "tpd_ref"]))
    ['reference_output_logprobs', 'reference_prompt_logprobs']
    """
    from distill_detect.detectors import get

    keys = set()
    for name in method_names:
        keys |= {n[len("extra:") :] for n in get(name).needs if n.startswith("extra:")}
    return keys


def required_passes(method_names: Iterable[str]) -> set[str]:
    """The passes (names in ``PASSES``) to run before scoring these methods.

    >>> sorted(required_passes(["tpd", "loss", "lowercase", "dc_pdd"]))
    ['dcpdd_freq', 'lowercase']
    """
    out = set()
    for key in required_extras(method_names):
        if key not in EXTRA_PASS:
            raise ValueError(f"no pass produces Trace.extra[{key!r}]; register one with register_pass")
        out.add(EXTRA_PASS[key])
    return out


def pending(traces: Iterable[Trace], pass_name: str, keys: Iterable[str] | None = None) -> list[Trace]:
    """Traces that still lack any of the pass's extra keys (or of ``keys``, a subset of them)."""
    if pass_name not in PASS_EXTRAS:
        raise ConfigError(f"unknown pass {pass_name!r}; known: {', '.join(PASS_EXTRAS)}")
    wanted = tuple(PASS_EXTRAS[pass_name] if keys is None else keys)
    return [t for t in traces if any((t.extra or {}).get(k) is None for k in wanted)]


# -- shared helpers ---------------------------------------------------------------------------------


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}; try 8")
    return int(batch_size)


def _question_of(trace: Trace, pass_name: str) -> str:
    if not trace.question:
        raise DistillDetectError(
            f"the {pass_name} pass needs the question text, which trace {trace.id!r} lacks "
            "(traces written by the store keep it; re-import with the question field)"
        )
    return trace.question


def _batches(order: Sequence[int], batch_size: int, desc: str):
    """Yield slices of ``order`` of at most ``batch_size``, with a tqdm bar over questions."""
    from tqdm.auto import tqdm

    with tqdm(total=len(order), desc=desc, unit="q", disable=None) as bar:
        for start in range(0, len(order), batch_size):
            chunk = list(order[start : start + batch_size])
            yield chunk
            bar.update(len(chunk))


def _by_length(lengths: Sequence[int]) -> list[int]:
    """Indices sorted by length, so a batch pads little (results do not depend on the order)."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).reshape(-1)


# -- lowercase ----------------------------------------------------------------------------------------


def lowercase_pass(backend, traces: Sequence[Trace], batch_size: int = 8) -> dict[str, dict[str, np.ndarray]]:
    """Teacher-forced log-probabilities of each lowercased question in the model's own chat prompt.

    Returns ``{trace_id: {"lowercase_prompt_logprobs": float32 [P']}}`` where P' is the
    number of tokens of ``question.lower()`` (generally not the original P). Use the
    backend that generated the traces (same model, same system prompt).
    """
    bs = _check_batch_size(batch_size)
    texts = [_question_of(t, "lowercase").lower() for t in traces]
    out: dict[str, dict[str, np.ndarray]] = {}
    for chunk in _batches(_by_length([len(x) for x in texts]), bs, "lowercase pass"):
        qs = [Question(id=traces[i].id, text=texts[i]) for i in chunk]
        try:
            res = backend.score_prompts(qs)
        except NotImplementedError as exc:
            raise ConfigError(f"the lowercase baseline needs prompt log-probabilities: {exc}") from None
        for i, r in zip(chunk, res):
            out[traces[i].id] = {"lowercase_prompt_logprobs": _f32(r["prompt_logprobs"])}
    return out


# -- reference model ----------------------------------------------------------------------------------


def _tokenizer_mismatch(detail: str) -> ConfigError:
    return ConfigError(
        "the reference model's tokenizer differs from the student's: "
        f"{detail}. The reference must share the student's tokenizer and chat template; use the base "
        "model the student was fine-tuned from"
    )


def reference_pass(
    ref_backend,
    traces: Sequence[Trace],
    batch_size: int = 8,
    *,
    prompt: bool = True,
    output: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Score each trace's question tokens and generated tokens under a reference model.

    The reference is normally the pre-distillation base model. Returns ``{trace_id:
    {"reference_prompt_logprobs": float32 [P], "reference_output_logprobs": float32 [T]}}``
    (only the parts asked for with ``prompt``/``output``). ``reference_output_logprobs``
    teacher-forces the student's own ``output_ids`` after the reference's prompt, so it is
    aligned token by token with ``output_logprobs``.

    The tokenizers must agree. Where a trace has ``prompt_ids`` the reference's question
    tokens must equal them; where the backend exposes its tokenizer (``.tok``), every
    generated id must be inside its vocabulary and decode to the trace's text. A mismatch
    raises ``ConfigError``; when nothing could be checked a warning says so.
    """
    bs = _check_batch_size(batch_size)
    if not (prompt or output):
        raise ConfigError("reference_pass: nothing to do (prompt and output are both False)")
    traces = list(traces)
    texts = [_question_of(t, "reference") for t in traces]
    if output:
        for t in traces:
            if t.output_ids is None:
                raise DistillDetectError(
                    f"the reference pass needs the generated token ids, which trace {t.id!r} lacks "
                    "(traces imported from logs without ids cannot be re-scored; regenerate them)"
                )
    tok = getattr(ref_backend, "tok", None)
    vocab = len(tok) if tok is not None else None
    checked = False
    lengths = [len(x) + (len(t.output_ids) if output else 0) for x, t in zip(texts, traces)]
    out: dict[str, dict[str, np.ndarray]] = {}
    for chunk in _batches(_by_length(lengths), bs, "reference pass"):
        qs = [Question(id=traces[i].id, text=texts[i]) for i in chunk]
        rows: list[dict[str, np.ndarray]] = [{} for _ in chunk]
        # The question tokens are scored whenever they can be compared with the student's.
        if prompt or any(traces[i].prompt_ids is not None for i in chunk):
            try:
                res = ref_backend.score_prompts(qs)
            except NotImplementedError as exc:
                if prompt:
                    raise ConfigError(
                        f"the reference baseline needs prompt log-probabilities from the reference: {exc}"
                    ) from None
                res = None
            if res is not None:
                for row, i, r in zip(rows, chunk, res):
                    t = traces[i]
                    ids = np.asarray(r.get("prompt_ids", []), dtype=np.int64)
                    if t.prompt_ids is not None:
                        if not np.array_equal(ids, np.asarray(t.prompt_ids, dtype=np.int64)):
                            raise _tokenizer_mismatch(
                                f"question {t.id!r} is {len(t.prompt_ids)} tokens for the student but {len(ids)} "
                                "different or differently split tokens for the reference"
                            )
                        checked = True
                    if prompt:
                        row["reference_prompt_logprobs"] = _f32(r["prompt_logprobs"])
        if output:
            conts = [np.asarray(traces[i].output_ids, dtype=np.int64) for i in chunk]
            if vocab is not None:
                for i, c in zip(chunk, conts):
                    t = traces[i]
                    if c.size and int(c.max()) >= vocab:
                        raise _tokenizer_mismatch(
                            f"trace {t.id!r} has token id {int(c.max())} but the reference vocabulary has {vocab} entries"
                        )
                    if t.output_text is not None and t.prompt_ids is None:
                        if tok.decode(c.tolist(), skip_special_tokens=True) != t.output_text:
                            raise _tokenizer_mismatch(f"trace {t.id!r}'s token ids decode to other text with the reference")
                        checked = True
            try:
                res_out = ref_backend.score(qs, conts)
            except NotImplementedError as exc:
                raise ConfigError(f"tpd_ref needs a reference backend that can teacher-force tokens: {exc}") from None
            for row, c, lp in zip(rows, conts, res_out):
                lp = _f32(lp)
                if lp.size != c.size:
                    raise DistillDetectError(f"reference backend returned {lp.size} log-probs for {c.size} tokens")
                row["reference_output_logprobs"] = lp
        for row, i in zip(rows, chunk):
            out[traces[i].id] = row
    if traces and not checked:
        warnings.warn(
            "the reference model pass (--reference-model) could not verify that the reference shares the student's tokenizer "
            "(no prompt_ids in the traces and no tokenizer on the backend)",
            stacklevel=2,
        )
    return out


# -- DC-PDD token-frequency table -------------------------------------------------------------------


def bundled_corpus_texts(sets: Iterable[str] | None = None, *, exclude: Iterable[str] = (), responses: bool = True) -> list[str]:
    """Local text for a token-frequency table: questions (and responses) of bundled sets.

    ``sets`` defaults to every bundled set (``distill_detect.data.bundled_sets()``). The
    files hold members and non-members alike, so their presence in the corpus does not
    depend on labels; pass ``exclude`` to leave the evaluated set out all the same.
    """
    from distill_detect.data import bundled_sets, load_questions

    names = list(bundled_sets()) if sets is None else list(sets)
    skip = set(exclude)
    texts: list[str] = []
    for name in names:
        if name in skip:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate-question notices are not news here
            qs = load_questions(f"bundled:{name}")
        for q in qs:
            texts.append(q.text)
            if responses and q.response:
                texts.append(q.response)
    if not texts:
        raise ConfigError("the token-frequency corpus is empty; keep at least one bundled set")
    return texts


def build_token_freq_table(tokenizer, texts: Iterable[str], *, batch_size: int = 512) -> np.ndarray:
    """Laplace-smoothed token frequencies f(v) = (count(v) + 1) / (N + V) over ``texts``.

    ``tokenizer`` is the audited model's (a transformers tokenizer: ``len(tokenizer)``
    entries, called on a list of strings). Texts are tokenised without special tokens.
    Returns float64 ``[V]``, every entry > 0, summing to 1 (DC-PDD, Zhang et al. 2024,
    arXiv:2409.14781, Section 3).
    """
    from tqdm.auto import tqdm

    bs = _check_batch_size(batch_size)
    texts = list(texts)
    vocab = len(tokenizer)
    counts = np.zeros(vocab, dtype=np.int64)
    for start in tqdm(range(0, len(texts), bs), desc="token frequencies", unit="batch", disable=None):
        enc = tokenizer(texts[start : start + bs], add_special_tokens=False)["input_ids"]
        ids = np.fromiter((i for seq in enc for i in seq), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ConfigError(f"the tokenizer produced id {int(ids.max())} outside its own vocabulary of {vocab}")
        counts += np.bincount(ids, minlength=vocab)
    return (counts + 1.0) / (counts.sum() + vocab)


def save_token_freq_table(path, table: np.ndarray) -> Path:
    """Write the table as a plain ``.npy`` float64 array (no pickle); returns the path written."""
    path = Path(path)
    arr = _valid_table(np.asarray(table), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr.astype(np.float64), allow_pickle=False)
    tmp.replace(path)
    return path


def load_token_freq_table(path, *, vocab_size: int | None = None) -> np.ndarray:
    """Read a table written by ``save_token_freq_table`` (pickle refused) and validate it."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "token-frequency table not found (build it with passes.build_token_freq_table)")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise InputError(path, f"not a plain numeric .npy array ({exc})") from None
    arr = _valid_table(arr, str(path))
    if vocab_size is not None and arr.size != vocab_size:
        raise InputError(path, f"table has {arr.size} entries but the model's vocabulary has {vocab_size}; rebuild it")
    return arr


def _valid_table(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.floating):
        raise InputError(where, f"a token-frequency table is a 1-D float array, got shape {arr.shape} dtype {arr.dtype}")
    if not (np.all(np.isfinite(arr)) and np.all(arr > 0) and abs(float(arr.sum(dtype=np.float64)) - 1.0) < 1e-4):
        raise InputError(where, "token frequencies must be finite, > 0 and sum to 1 (Laplace-smoothed)")
    return arr


def dcpdd_freq_pass(traces: Iterable[Trace], freq_table: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Look up each question token's corpus frequency: ``{trace_id: {"dcpdd_token_freq": float32 [P]}}``.

    No model runs: the frequencies are gathered from ``freq_table`` at ``Trace.prompt_ids``,
    which keeps the dc_pdd detector a pure function of the trace.
    """
    table = _valid_table(np.asarray(freq_table), "freq_table")
    out = {}
    for t in traces:
        if t.prompt_ids is None:
            raise DistillDetectError(
                f"the dcpdd_freq pass needs the question's token ids, which trace {t.id!r} lacks: they are recorded "
                "with the prompt log-probabilities: generate without --no-prompt-logprobs (the same command fills them in)"
            )
        ids = np.asarray(t.prompt_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= table.size):
            raise ConfigError(
                f"trace {t.id!r} has token id {int(ids.max())} but the frequency table covers {table.size} ids; "
                "build the table with the audited model's tokenizer"
            )
        out[t.id] = {"dcpdd_token_freq": table[ids].astype(np.float32)}
    return out


def freq_table_for(tokenizer, texts: Sequence[str] | None = None) -> np.ndarray:
    """DC-PDD's token-frequency table for ``tokenizer`` over ``texts`` (default: the bundled corpus).

    Cached under the cache directory, keyed by the tokenizer's vocabulary AND the corpus
    text, so a changed corpus never reuses old frequencies.
    """
    from distill_detect.models import cache_dir

    texts = list(bundled_corpus_texts() if texts is None else texts)
    if hasattr(tokenizer, "cache_key"):  # the llama.cpp backend's GGUF tokenizer
        tok_key = tokenizer.cache_key()
    else:
        tok_key = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
    corpus = hashlib.sha256()
    for t in texts:
        corpus.update(t.encode("utf-8") + b"\0")
    path = cache_dir() / "token_freq" / f"{tok_key}-{corpus.hexdigest()[:16]}.npy"
    if path.exists():
        return load_token_freq_table(path, vocab_size=len(tokenizer))
    table = build_token_freq_table(tokenizer, texts)
    save_token_freq_table(path, table)
    return table


def solution_pass(backend, traces: Sequence[Trace], batch_size: int = 8, *, key: str = "solution_logprobs"):
    """Teacher-force each question's own solution (``Trace.solution``: the question file's ``response``, else
    ``answer``) as the assistant turn, exactly as ``finetune`` encodes a training example, and return
    ``{trace_id: {key: float32 [S]}}``: log p of each solution token and of the end-of-turn after it."""
    from distill_detect.finetune import encode_example

    bs = _check_batch_size(batch_size)
    traces = [t for t in traces]
    missing = [t.id for t in traces if not t.solution]
    if missing:
        raise ConfigError(
            f"{len(missing)} question(s) have no solution to score (first: {missing[0]!r}); the sol_* methods need a "
            "'response' (or 'answer') field in the question file"
        )
    conts = []
    for t in traces:
        ex = encode_example(backend.tok, _question_of(t, "solution"), t.solution, backend.system_prompt)
        conts.append(np.asarray([i for i, m in zip(ex["input_ids"], ex["completion_mask"]) if m], dtype=np.int64))
    out: dict[str, dict[str, np.ndarray]] = {}
    for chunk in _batches(_by_length([len(c) for c in conts]), bs, f"{key.split('_')[0]} solution pass"):
        try:
            res = backend.score([Question(id=traces[i].id, text=traces[i].question) for i in chunk], [conts[i] for i in chunk])
        except NotImplementedError as exc:
            raise ConfigError(f"the sol_* methods need a backend that can teacher-force a continuation: {exc}") from None
        for i, lp in zip(chunk, res):
            out[traces[i].id] = {key: _f32(lp)}
    return out


def reference_solution_pass(ref_backend, traces: Sequence[Trace], batch_size: int = 8):
    """``solution_pass`` under the reference (pre-distillation) model."""
    return solution_pass(ref_backend, traces, batch_size, key="reference_solution_logprobs")


def _fsd_arrays(backend, traces, batch_size):
    from distill_detect.fsd import missing_arrays  # the arrays come from fsd.fsd_pass (--fsd-model); this only explains

    return missing_arrays(backend, traces, batch_size)


register_pass(Pass("lowercase", ("lowercase_prompt_logprobs",), "student", lowercase_pass,
                   "the question lowercased, teacher-forced through the audited model"))  # fmt: skip
register_pass(Pass("reference", ("reference_prompt_logprobs", "reference_output_logprobs"), "reference", reference_pass,
                   "the question and the student's tokens under the pre-distillation model (--reference-model)"))  # fmt: skip
register_pass(Pass("solution", ("solution_logprobs",), "student", solution_pass,
                   "the question file's solution teacher-forced through the audited model"))  # fmt: skip
register_pass(Pass("reference_solution", ("reference_solution_logprobs",), "reference", reference_solution_pass,
                   "the question file's solution teacher-forced through the pre-distillation model (--reference-model)"))  # fmt: skip
register_pass(Pass("fsd", ("fsd_output_logprobs",), "fsd", _fsd_arrays,
                   "the student's tokens under the FSD model (--fsd-model; computed by distill_detect.fsd.fsd_pass)"))  # fmt: skip
register_pass(Pass("dcpdd_freq", ("dcpdd_token_freq",), "tokenizer",
                   lambda tok, traces, batch_size: dcpdd_freq_pass(traces, freq_table_for(tok)),
                   "corpus frequencies of the question tokens (DC-PDD), from the bundled corpus"))  # fmt: skip

PASS_EXTRAS: dict[str, tuple[str, ...]] = {name: p.produces for name, p in PASSES.items()}
"""Pass name -> the ``Trace.extra`` keys it produces."""

EXTRA_PASS: dict[str, str] = {key: name for name, keys in PASS_EXTRAS.items() for key in keys}
"""``Trace.extra`` key -> the pass that produces it."""
