"""The durable trace store: one SQLite database per run directory.

Traces are the expensive artifact (model time), so they are written as soon as a
batch finishes, in one transaction per batch: a run killed at any moment (Ctrl-C,
kill -9, a full disk) loses at most the batch in flight, and the same command run
again generates exactly the questions that have no complete trace yet.

Layout of ``RUN/``:

* ``traces.sqlite``: tables ``meta`` (fingerprint, schema, versions), ``questions`` (the
  planned questions in input order, with labels), ``traces`` (one row per question,
  arrays as little-endian float32/int32 blobs) and ``extras`` (arrays added by later
  passes, e.g. a reference model's log-probs, keyed by question, name and the pass's
  fingerprint), ``samples`` (answers sampled at a temperature for the text-only methods, keyed by
  question, the sampling settings ``GenConfig.sampling()`` as JSON, and the answer's index k) and
  ``solutions`` (the benchmark's own solution or answer of a question, from the question file).
* ``.lock``: held with ``flock`` while a process writes; a second writer is refused
  at once with the holder's pid instead of interleaving.

A run is bound to one fingerprint (model, dtype, backend and versions, template,
decoding settings). Opening it for writing with another fingerprint is refused with
a message naming the settings that differ. The token cap is not part of the
fingerprint: each trace records the cap it was generated under, and a trace counts
as complete for a request of ``max_new_tokens`` when it stopped by itself or was
generated with a cap at least that large (greedy decoding makes the shorter trace a
prefix of the longer one).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from distill_detect.errors import ConfigError, DistillDetectError
from distill_detect.types import TRACE_ARRAYS, Question, Samples, Trace

SCHEMA = 1
DB_NAME = "traces.sqlite"

_ARRAYS = {name: dtype.type for name, dtype in TRACE_ARRAYS.items()}
"""One BLOB column per trace array (little-endian), from the trace schema in ``types.py``."""
_SCALARS = ("finish_reason", "max_new_tokens", "num_tokens", "output_text")
"""The trace columns that are not arrays (besides ``id`` and ``created``)."""
TRACE_COLUMNS: tuple[str, ...] = (*_SCALARS, *_ARRAYS)
"""The columns of one stored trace, in the order ``trace_rows``/``put_trace_rows`` use."""

_DDL = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS questions (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, question TEXT NOT NULL, label INTEGER
);
CREATE TABLE IF NOT EXISTS traces (
    id TEXT PRIMARY KEY REFERENCES questions(id),
    finish_reason TEXT, max_new_tokens INTEGER NOT NULL, num_tokens INTEGER NOT NULL,
    output_text TEXT, created REAL NOT NULL,
    {", ".join(f"{k} BLOB" for k in _ARRAYS)}
);
CREATE TABLE IF NOT EXISTS extras (
    id TEXT NOT NULL, name TEXT NOT NULL, pass_fp TEXT NOT NULL, dtype TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (id, name)
);
CREATE TABLE IF NOT EXISTS samples (
    id TEXT NOT NULL, setting TEXT NOT NULL, k INTEGER NOT NULL, text TEXT NOT NULL, num_tokens INTEGER NOT NULL,
    finish_reason TEXT, created REAL NOT NULL,
    PRIMARY KEY (id, setting, k)
);
CREATE TABLE IF NOT EXISTS solutions (id TEXT PRIMARY KEY, solution TEXT NOT NULL);
"""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """Human-readable list of the settings that differ between two fingerprints."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: run has {a.get(k)!r}, this command has {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _blob(arr, dtype) -> bytes | None:
    """Array -> little-endian bytes of ``dtype`` (None stays None)."""
    if arr is None:
        return None
    return np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


class RunLocked(DistillDetectError):
    pass


class TraceStore:
    """Read and write the traces of one run directory."""

    def __init__(self, run_dir, *, create: bool = False, readonly: bool = False):
        self.dir = Path(run_dir)
        self.path = self.dir / DB_NAME
        self._lock_fh = None
        if readonly:  # another process's run, e.g. a merge source: never written, never locked
            if not self.path.exists():
                raise DistillDetectError(f"{self.dir}: not a run directory (no {DB_NAME})")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
            return
        if not self.path.exists():
            if not create:
                raise DistillDetectError(
                    f"{self.dir}: not a run directory (no {DB_NAME}); create it with 'distill-detect generate'"
                )
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DistillDetectError(f"cannot create run directory {self.dir}: {exc.strerror}") from None
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed batch survives power loss too, not only a killed process.
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_DDL)
        except sqlite3.OperationalError as exc:
            raise DistillDetectError(f"cannot open the trace store {self.path}: {exc}") from None
        self._lock_fh = None

    # -- locking and fingerprint -----------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, fingerprint: dict):
        """Hold the run's write lock and bind it to ``fingerprint`` (refusing a different one)."""
        import fcntl

        lock_path = self.dir / ".lock"
        fh = open(lock_path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunLocked(
                f"{self.dir}: another distill-detect process (pid {holder}) is writing this run; "
                "wait for it to finish or use another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_fh = fh
        try:
            self.bind(fingerprint)
            yield self
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
            self._lock_fh = None

    def bind(self, fingerprint: dict) -> None:
        old = self.get_meta("fingerprint")
        if old is None:
            with self._tx():
                self._set_meta("fingerprint", fingerprint)
                self._set_meta("schema", SCHEMA)
                self._set_meta("created", time.time())
            return
        diff = fingerprint_diff(old, fingerprint)
        if diff:
            raise ConfigError(
                f"{self.dir} holds traces made with different settings ({'; '.join(diff)}). "
                "Use another --out for the new settings, or repeat the original ones to resume"
            )

    def get_meta(self, key: str):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value) -> None:
        """Record a non-fingerprint fact about the run (e.g. where the model was loaded from)."""
        with self._tx():
            self._set_meta(key, value)

    def _set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    @contextlib.contextmanager
    def _tx(self):
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise DistillDetectError(f"{self.path}: {exc}") from None
        # COMMIT inside the same try: a Ctrl-C landing between the body and the COMMIT cannot leave the
        # transaction open (it is rolled back, or was already committed and the ROLLBACK is a no-op).
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException as exc:
            # SQLite may have rolled back already (a full disk does that): a failed ROLLBACK must not hide the cause.
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):  # e.g. disk full: nothing of this transaction is kept
                raise DistillDetectError(self._write_failed(exc)) from None
            raise

    def _write_failed(self, exc) -> str:
        return (
            f"could not write to {self.path} ({exc}); nothing from this batch was stored, earlier batches are intact. "
            "Free disk space (or fix permissions) and run the same command again to resume"
        )

    # -- questions -------------------------------------------------------------------------------

    def check_questions(self, questions: Iterable[Question]) -> dict[str, str]:
        """Refuse a question whose id is already planned with other text; returns {id: text} of the plan."""
        known = {r[0]: r[1] for r in self.db.execute("SELECT id, question FROM questions")}
        for q in questions:
            if q.id in known and known[q.id] != q.text:
                raise ConfigError(
                    f"question id {q.id!r} is already in {self.dir} with different text; "
                    "ids must identify one question (use another --out or fix the input)"
                )
        return known

    def complete_ids(self, max_new_tokens: int) -> set[str]:
        """Ids whose stored trace is complete for a request of ``max_new_tokens``."""
        rows = self.db.execute("SELECT id FROM traces WHERE finish_reason = 'stop' OR max_new_tokens >= ?", (max_new_tokens,))
        return {r[0] for r in rows}

    def add_questions(self, questions: Iterable[Question]) -> int:
        """Plan questions (idempotent). Same id with other text is refused; labels are updated."""
        qs = list(questions)
        known = self.check_questions(qs)
        start = self.db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM questions").fetchone()[0]
        added = 0
        try:
            with self._tx():
                for q in qs:
                    if q.id in known:
                        self.db.execute("UPDATE questions SET label = ? WHERE id = ?", (q.label, q.id))
                    else:
                        self.db.execute(
                            "INSERT INTO questions (id, seq, question, label) VALUES (?, ?, ?, ?)",
                            (q.id, start + added, q.text, q.label),
                        )
                        known[q.id] = q.text
                        added += 1
        except sqlite3.OperationalError as exc:
            raise DistillDetectError(f"could not write to {self.path} ({exc})") from None
        return added

    def questions(self) -> list[Question]:
        return [
            Question(id=i, text=t, label=lab)
            for i, t, lab in self.db.execute("SELECT id, question, label FROM questions ORDER BY seq")
        ]

    def pending(self, max_new_tokens: int, ids: Iterable[str] | None = None) -> list[Question]:
        """Planned questions without a trace complete for ``max_new_tokens`` (in input order)."""
        rows = self.db.execute(
            "SELECT q.id, q.question, q.label FROM questions q LEFT JOIN traces t ON t.id = q.id "
            "WHERE t.id IS NULL OR (t.finish_reason != 'stop' AND t.max_new_tokens < ?) ORDER BY q.seq",
            (max_new_tokens,),
        ).fetchall()
        wanted = None if ids is None else set(ids)
        return [Question(id=i, text=t, label=lab) for i, t, lab in rows if wanted is None or i in wanted]

    # -- traces ----------------------------------------------------------------------------------

    def put_traces(self, traces: Iterable[Trace]) -> None:
        """Store one batch atomically (replacing shorter traces of the same questions)."""
        rows = []
        for t in traces:
            blobs = [_blob(getattr(t, k), dt) for k, dt in _ARRAYS.items()]
            rows.append(
                (t.id, t.finish_reason, int(t.max_new_tokens or t.num_tokens), t.num_tokens, t.output_text, time.time(), *blobs)
            )
        cols = ", ".join(("id", *_SCALARS, "created", *_ARRAYS))
        marks = ", ".join("?" * (2 + len(_SCALARS) + len(_ARRAYS)))
        with self._tx():
            self.db.executemany(f"INSERT OR REPLACE INTO traces ({cols}) VALUES ({marks})", rows)

    def missing_prompt_ids(self) -> set[str]:
        """Ids of stored traces without prompt log-probabilities (generated with them switched off)."""
        return {r[0] for r in self.db.execute("SELECT id FROM traces WHERE prompt_logprobs IS NULL")}

    def put_prompt_fields(self, fields: dict[str, dict[str, np.ndarray]]) -> None:
        """Fill in the prompt arrays of stored traces: {question_id: {prompt_ids, prompt_logprobs, ...}}."""
        names = [k for k in _ARRAYS if k.startswith("prompt_")]
        rows = [(*[_blob(f.get(k), _ARRAYS[k]) for k in names], qid) for qid, f in fields.items()]
        with self._tx():
            self.db.executemany(f"UPDATE traces SET {', '.join(f'{k} = ?' for k in names)} WHERE id = ?", rows)

    def trace_rows(self) -> Iterator[tuple]:
        """Every stored trace as ``(id, *TRACE_COLUMNS)`` raw column values (for ``merge``: compared and copied as bytes)."""
        yield from self.db.execute(f"SELECT id, {', '.join(TRACE_COLUMNS)} FROM traces")

    def extra_rows(self) -> Iterator[tuple]:
        """Every stored extra array as ``(id, name, pass_fp, dtype, data)``."""
        yield from self.db.execute("SELECT id, name, pass_fp, dtype, data FROM extras")

    def put_trace_rows(self, traces: Iterable[tuple], extras: Iterable[tuple] = ()) -> None:
        """Store raw rows from ``trace_rows``/``extra_rows`` of another run, in one transaction."""
        now = time.time()
        cols = ", ".join(TRACE_COLUMNS)
        with self._tx():
            self.db.executemany(
                f"INSERT OR REPLACE INTO traces (id, {cols}, created) VALUES ({', '.join('?' * (len(TRACE_COLUMNS) + 2))})",
                [(*row, now) for row in traces],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO extras (id, name, pass_fp, dtype, data) VALUES (?, ?, ?, ?, ?)", list(extras)
            )

    def put_extras(self, name_arrays: dict[str, dict[str, np.ndarray]], pass_fp: dict) -> None:
        """Store per-question arrays from a later pass: {question_id: {name: array}}."""
        fp = json.dumps(pass_fp, sort_keys=True)
        rows = []
        for qid, arrays in name_arrays.items():
            for name, arr in arrays.items():
                a = np.asarray(arr)
                dt = "<i4" if np.issubdtype(a.dtype, np.integer) else "<f4"
                rows.append((qid, name, fp, dt, np.ascontiguousarray(a.astype(dt)).tobytes()))
        with self._tx():
            self.db.executemany("INSERT OR REPLACE INTO extras (id, name, pass_fp, dtype, data) VALUES (?, ?, ?, ?, ?)", rows)

    def extras_missing(self, names: Iterable[str], pass_fp: dict | None) -> set[str]:
        """Question ids with a trace that lack any of ``names`` computed under ``pass_fp`` (None: under any)."""
        if pass_fp is None:
            rows = self.db.execute("SELECT id, name FROM extras")
        else:
            rows = self.db.execute("SELECT id, name FROM extras WHERE pass_fp = ?", (json.dumps(pass_fp, sort_keys=True),))
        have: dict[str, set] = {}
        for qid, name in rows:
            have.setdefault(qid, set()).add(name)
        want = set(names)
        return {qid for (qid,) in self.db.execute("SELECT id FROM traces") if not want <= have.get(qid, set())}

    def traces(self, *, complete_for: int | None = None, sampling: dict | None = None) -> Iterator[Trace]:
        """All stored traces in input order, with labels from the question plan, extras and solutions attached.

        ``sampling``: ``{**GenConfig.sampling(), "n": N}`` attaches the first N stored answers sampled with
        those settings (fewer where fewer are stored) as ``Trace.samples``; None attaches none.
        """
        samples = self.samples(sampling, n=sampling.get("n")) if sampling else {}
        solutions = self.solutions()
        extras: dict[str, dict] = {}
        for qid, name, dt, data in self.db.execute("SELECT id, name, dtype, data FROM extras"):
            extras.setdefault(qid, {})[name] = np.frombuffer(data, dtype=dt).astype(np.int32 if dt == "<i4" else np.float32)
        cols = ", ".join(f"t.{k}" for k in _ARRAYS)
        q = (
            f"SELECT q.id, q.question, q.label, t.finish_reason, t.max_new_tokens, t.num_tokens, t.output_text, {cols} "
            "FROM questions q JOIN traces t ON t.id = q.id ORDER BY q.seq"
        )
        for row in self.db.execute(q):
            qid, text, label, finish, cap, n_tokens, out_text, *blobs = row
            if complete_for is not None and finish != "stop" and cap < complete_for:
                continue
            arrays = {
                k: (None if b is None else np.frombuffer(b, dtype=np.dtype(dt).newbyteorder("<")).astype(dt))
                for (k, dt), b in zip(_ARRAYS.items(), blobs)
            }
            yield Trace(
                id=qid,
                question=text,
                label=label,
                finish_reason=finish,
                max_new_tokens=cap,
                output_text=out_text,
                extra=extras.get(qid, {}),
                samples=samples.get(qid),
                solution=solutions.get(qid),
                text_tokens=n_tokens if arrays.get("output_logprobs") is None and arrays.get("output_ids") is None else None,
                **arrays,
            )

    # -- sampled answers and solutions -------------------------------------------------------------

    @staticmethod
    def sampling_key(sampling: dict) -> str:
        """The stored key of a sampling setting: ``GenConfig.sampling()`` (without N) as sorted JSON."""
        keep = {k: sampling[k] for k in ("temperature", "top_p", "seed", "max_new_tokens")}
        keep["temperature"], keep["top_p"] = float(keep["temperature"]), float(keep["top_p"])
        keep["seed"], keep["max_new_tokens"] = int(keep["seed"]), int(keep["max_new_tokens"])
        return json.dumps(keep, sort_keys=True)

    def sample_settings(self) -> list[dict]:
        """Every sampling setting stored in this run, with ``n``: the most answers any question has under it."""
        rows = self.db.execute("SELECT setting, MAX(k) + 1 FROM samples GROUP BY setting ORDER BY MIN(created)").fetchall()
        return [{**json.loads(key), "n": int(n)} for key, n in rows]

    def samples_missing(self, sampling: dict, n: int, ids: Iterable[str]) -> list[tuple[str, int]]:
        """(question id, k) pairs among ``ids`` x range(n) not stored under ``sampling``, in the order of ``ids``."""
        key = self.sampling_key(sampling)
        have = set(self.db.execute("SELECT id, k FROM samples WHERE setting = ? AND k < ?", (key, n)))
        return [(qid, k) for qid in ids for k in range(n) if (qid, k) not in have]

    def put_samples(self, sampling: dict, rows: Iterable[tuple[str, int, str, int, str | None]]) -> None:
        """Store one batch of sampled answers atomically: rows of (question id, k, text, num_tokens, finish_reason)."""
        key, now = self.sampling_key(sampling), time.time()
        data = [(qid, key, int(k), text, int(ntok), finish, now) for qid, k, text, ntok, finish in rows]
        with self._tx():
            self.db.executemany(
                "INSERT OR REPLACE INTO samples (id, setting, k, text, num_tokens, finish_reason, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                data,
            )

    def samples(self, sampling: dict, *, n: int | None = None) -> dict[str, Samples]:
        """{question id: Samples}: the answers stored under ``sampling``, the first ``n`` (k < n) when given."""
        key = self.sampling_key(sampling)
        got: dict[str, list] = {}
        q = "SELECT id, k, text, num_tokens FROM samples WHERE setting = ? AND k < ? ORDER BY id, k"
        for qid, k, text, ntok in self.db.execute(q, (key, n if n is not None else 2**62)):
            got.setdefault(qid, []).append((k, text, ntok))
        settings = json.loads(key)
        out = {}
        for qid, rows in got.items():
            # Only the unbroken run k = 0, 1, ...: answer k means the same in every question.
            rows = [r for i, r in enumerate(rows) if r[0] == i]
            out[qid] = Samples(texts=tuple(r[1] for r in rows), num_tokens=tuple(int(r[2]) for r in rows), **settings)
        return out

    def sample_rows(self) -> Iterator[tuple]:
        """Every stored sampled answer as ``(id, setting, k, text, num_tokens, finish_reason, created)``, ``setting``
        being ``sampling_key``'s text (for ``merge``: compared and copied as stored)."""
        yield from self.db.execute("SELECT id, setting, k, text, num_tokens, finish_reason, created FROM samples")

    def put_sample_rows(self, rows: Iterable[tuple]) -> None:
        """Store raw rows from another run's ``sample_rows`` in one transaction (their ``created`` kept, so the
        order of the sampling settings, ``sample_settings``, is kept too)."""
        data = [tuple(r) for r in rows]
        with self._tx():
            self.db.executemany(
                "INSERT OR REPLACE INTO samples (id, setting, k, text, num_tokens, finish_reason, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                data,
            )

    def sample_counts(self) -> dict:
        """{answers stored, tokens they took} over every setting (the cost of sampling)."""
        n, tok = self.db.execute("SELECT COUNT(*), COALESCE(SUM(num_tokens), 0) FROM samples").fetchone()
        return {"samples": int(n), "sample_tokens": int(tok)}

    def put_solutions(self, solutions: dict[str, str]) -> None:
        """Record the benchmark's own solution or answer of questions (from the question file): {id: text}."""
        rows = [(qid, text) for qid, text in solutions.items() if text]
        if rows:
            with self._tx():
                self.db.executemany("INSERT OR REPLACE INTO solutions (id, solution) VALUES (?, ?)", rows)

    def solutions(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT id, solution FROM solutions"))

    def counts(self) -> dict:
        n_q = self.db.execute("SELECT COUNT(*) FROM questions").fetchone()[0]
        n_t, n_tok = self.db.execute("SELECT COUNT(*), COALESCE(SUM(num_tokens), 0) FROM traces").fetchone()
        return {"questions": n_q, "traces": n_t, "tokens": n_tok}

    def integrity_check(self) -> list[str]:
        """SQLite's own check plus the store's invariants; an empty list means healthy."""
        problems = [r[0] for r in self.db.execute("PRAGMA integrity_check") if r[0] != "ok"]
        orphans = self.db.execute("SELECT COUNT(*) FROM traces WHERE id NOT IN (SELECT id FROM questions)").fetchone()[0]
        if orphans:
            problems.append(f"{orphans} traces without a planned question")
        bad = self.db.execute(
            "SELECT COUNT(*) FROM traces WHERE output_logprobs IS NOT NULL AND num_tokens != LENGTH(output_logprobs) / 4"
        ).fetchone()[0]
        if bad:
            problems.append(f"{bad} traces whose token count does not match their arrays")
        return problems

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
