"""Load questions from local files and build the paper's member/non-member split.

Formats: JSONL (``.jsonl``, ``.jsonl.gz``, ``.ndjson``), a JSON array (``.json``), CSV/TSV
(``.csv``, ``.tsv``) and Parquet (``.parquet``; needs pyarrow). A bundled set is named
``bundled:NAME`` (see ``bundled_sets()``).

Fields: the question text (``question``, or ``--field``), an optional ``id`` (else a
stable hash of the text), an optional ``label`` (1 member, 0 non-member) and an
optional response/teacher trace (``response``) used by ``finetune``.

Every problem in a file raises ``InputError`` naming the file, the line (for CSV the
physical line, header = line 1; for Parquet the row number, first row = 1) and the field.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import warnings
from importlib import resources
from pathlib import Path

import numpy as np

from distill_detect.errors import InputError
from distill_detect.types import Question, text_id

BUNDLED = {
    "gsm8k_gpt3": "GSM8K test questions with the GPT-3 175B verifier solutions that are correct (742), "
    "from openai/grade-school-math (MIT). Field 'response' is the teacher trace.",
    "gsm8k_test": "GSM8K test questions (1319) with final answers, openai/grade-school-math (MIT).",
    "gsm8k_train_sample": "1000 GSM8K train questions (seeded sample), openai/grade-school-math (MIT).",
    "math_test": "MATH test problems (5000) with worked solutions as 'response', Hendrycks et al. (MIT).",
}


def bundled_sets() -> dict[str, str]:
    """Names and descriptions of the question sets shipped inside the package."""
    return dict(BUNDLED)


def bundled_path(name: str) -> Path:
    if name not in BUNDLED:
        import difflib

        close = difflib.get_close_matches(name, BUNDLED, n=1)
        hint = f" Did you mean 'bundled:{close[0]}'?" if close else ""
        raise InputError(f"bundled:{name}", f"no such bundled set.{hint} Known: {', '.join(BUNDLED)}")
    return Path(str(resources.files("distill_detect") / "datasets" / f"{name}.jsonl.gz"))


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except OSError as exc:
            raise InputError(path, f"not a valid gzip file ({exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(path, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})", line=line) from None


def read_records(path) -> list[tuple[int, dict]]:
    """Read a file into (line_number, record) pairs; raises InputError on anything unreadable."""
    spec = str(path)
    if spec.startswith("bundled:"):
        path = bundled_path(spec.split(":", 1)[1])
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a directory, expected a .jsonl, .csv, .tsv, .json or .parquet file")
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            recs = _read_parquet(path)
        elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
            recs = _read_csv(path, delimiter="\t" if ".tsv" in name else ",")
        elif name.endswith((".json", ".json.gz")):
            recs = _read_json_array(path)
        else:
            recs = _read_jsonl(path)
    except PermissionError:
        raise InputError(path, "permission denied") from None
    if not recs:
        raise InputError(path, "the file has no records (it is empty)")
    return recs


_ARRAY_IN_JSONL = "this is a JSON array, not JSON Lines (one object per line): name the file .json"


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    # Split on "\n" only: str.splitlines() would also split inside a JSON string holding U+2028 etc.
    for i, line in enumerate(_open_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if not out and line.lstrip().startswith("["):
                raise InputError(path, _ARRAY_IN_JSONL, line=i) from None
            raise InputError(path, f"invalid JSON ({exc.msg} at column {exc.colno})", line=i) from None
        if isinstance(rec, list) and rec and all(isinstance(x, dict) for x in rec) and not out:
            raise InputError(path, _ARRAY_IN_JSONL, line=i)
        if not isinstance(rec, dict):
            raise InputError(path, f"expected a JSON object, got {type(rec).__name__}", line=i)
        out.append((i, rec))
    return out


def _read_json_array(path: Path) -> list[tuple[int, dict]]:
    text = _open_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON ({exc.msg})", line=exc.lineno) from None
    if not isinstance(data, list):
        raise InputError(path, "expected a JSON array of objects (or use JSONL, one object per line)")
    out = []
    for k, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise InputError(path, f"element {k} is a {type(rec).__name__}, expected an object")
        out.append((k + 1, rec))
    return out


def _read_csv(path: Path, delimiter: str) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(_open_text(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise InputError(path, f"unreadable CSV header ({exc})", line=1) from None
    header = [h.strip() for h in header]
    out = []
    try:
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise InputError(path, f"{len(row)} columns but the header has {len(header)}", line=line)
            out.append((line, {"__csv__": True, **dict(zip(header, row))}))
    except csv.Error as exc:
        raise InputError(path, f"unreadable CSV ({exc})", line=reader.line_num) from None
    if not out:
        return []
    return out


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    from distill_detect.errors import require

    pq = require("pyarrow.parquet", "parquet", "Reading Parquet files")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise InputError(path, f"not a readable Parquet file ({exc})") from None
    return [(k + 1, rec) for k, rec in enumerate(table.to_pylist())]


def parse_label(path, line, value, from_csv: bool):
    if value is None:
        return None
    if from_csv:
        s = str(value).strip()
        if s == "":
            return None
        if s in ("0", "1"):
            return int(s)
        raise InputError(path, f"label must be 0 or 1, got {s!r}", line=line, field="label")
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)):
        raise InputError(
            path, f"label must be the number 0 or 1, got {value!r} ({type(value).__name__})", line=line, field="label"
        )
    if value not in (0, 1):
        raise InputError(path, f"label must be 0 or 1, got {value!r}", line=line, field="label")
    return int(value)


def text_or_number(path, line: int, rec: dict, field: str | None) -> str | None:
    """``rec[field]`` as text: a string as it is, a finite number written out (``42``, ``42.0`` -> ``"42"``,
    ``2.5`` -> ``"2.5"``), None when absent or null; any other type is an ``InputError`` naming file:line:field.

    >>> text_or_number("q.jsonl", 1, {"answer": 42.0}, "answer"), text_or_number("q.jsonl", 1, {"answer": 2.5}, "answer")
    ('42', '2.5')
    """
    value = rec.get(field) if field else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(path, f"must be text or a finite number, got {value!r}", line=line, field=field)
        return str(int(value)) if isinstance(value, int) or value.is_integer() else repr(value)
    raise InputError(path, f"must be text or a number, got {type(value).__name__}", line=line, field=field)


def load_questions(
    path,
    *,
    field: str = "question",
    id_field: str = "id",
    label_field: str = "label",
    response_field: str | None = "response",
    label: int | None = None,
    require_response: bool = False,
    answer_field: str | None = "answer",
) -> list[Question]:
    """Load questions from a local file (or ``bundled:NAME``).

    ``label`` forces every question's label (e.g. a members-only file). Duplicate ids
    with different text are an error; an exact duplicate (same id, same text) is dropped
    with a warning. ``response`` (a worked solution) and ``answer`` (the final answer) may be
    text or a number (``"answer": 42`` reads as ``"42"``); anything else is refused by line.
    """
    recs = read_records(path)
    name = str(path)
    seen: dict[str, tuple[str, int]] = {}
    out: list[Question] = []
    dup = 0
    first_line, first = recs[0]
    if field not in first:
        where = "column" if first.get("__csv__") else "field"
        have = ", ".join(k if k.isprintable() else repr(k) for k in first if k != "__csv__")  # one line, whatever the keys
        raise InputError(
            name, f"missing {where} '{field}' (found: {have}); choose one with --field", line=first_line, field=field
        )
    for line, rec in recs:
        from_csv = bool(rec.get("__csv__"))
        text = rec.get(field)
        if text is None:
            raise InputError(name, "missing or null", line=line, field=field)
        if not isinstance(text, str):
            raise InputError(name, f"must be a string, got {type(text).__name__}", line=line, field=field)
        if not text.strip():
            raise InputError(name, "empty question", line=line, field=field)
        raw_id = rec.get(id_field)
        if raw_id is None or (from_csv and str(raw_id).strip() == ""):
            qid = text_id(text)
        elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
            qid = str(raw_id)
        else:
            raise InputError(name, f"id must be a string or integer, got {type(raw_id).__name__}", line=line, field=id_field)
        lab = parse_label(name, line, rec.get(label_field), from_csv) if label is None else label
        resp = text_or_number(name, line, rec, response_field)
        answer = text_or_number(name, line, rec, answer_field)
        if require_response and not (resp and resp.strip()):
            raise InputError(name, "missing or empty response (needed for fine-tuning)", line=line, field=response_field)
        if qid in seen:
            old_text, old_line = seen[qid]
            if old_text != text:
                raise InputError(
                    name, f"duplicate id {qid!r} with different text (first seen on line {old_line})", line=line, field=id_field
                )
            dup += 1
            continue
        seen[qid] = (text, line)
        out.append(Question(id=qid, text=text, label=lab, response=resp, answer=answer if answer and answer.strip() else None))
    if dup:
        warnings.warn(f"{name}: dropped {dup} exact duplicate question(s)", stacklevel=2)
    return out


def question_line(path, qid: str, *, field: str = "question", id_field: str = "id") -> int | None:
    """Line of question ``qid`` in ``path`` (as ``load_questions`` numbers it), for error messages; None if absent."""
    try:
        recs = read_records(path)
    except InputError:
        return None
    for line, rec in recs:
        raw = rec.get(id_field)
        if raw is None or (rec.get("__csv__") and str(raw).strip() == ""):
            text = rec.get(field)
            if isinstance(text, str) and text_id(text) == qid:
                return line
        elif str(raw) == qid:
            return line
    return None


def combine_labelled(
    members: list[Question],
    nonmembers: list[Question],
    *,
    members_path="members",
    nonmembers_path="nonmembers",
    field: str = "question",
    id_field: str = "id",
) -> list[Question]:
    """Label two question lists 1/0 and refuse overlaps (same id or same text in both).

    The error names the non-members file and the line of the overlapping question
    (``field``/``id_field`` as given to ``load_questions``).
    """
    from dataclasses import replace

    m_ids = {q.id for q in members}
    m_text = {q.text.strip(): q.id for q in members}
    for q in nonmembers:
        if q.id in m_ids or q.text.strip() in m_text:
            line = question_line(nonmembers_path, q.id, field=field, id_field=id_field)
        if q.id in m_ids:
            raise InputError(
                nonmembers_path, f"id {q.id!r} is also in the members file {members_path}", line=line, field=id_field
            )
        if q.text.strip() in m_text:
            raise InputError(
                nonmembers_path,
                f"question {q.id!r} has the same text as member {m_text[q.text.strip()]!r} in {members_path}",
                line=line,
                field=field,
            )
    return [replace(q, label=1) for q in members] + [replace(q, label=0) for q in nonmembers]


def paper_split(questions: list[Question], *, seed: int = 42, member_fraction: float = 0.8):
    """The paper's protocol: shuffle with ``seed``, first 80% members, rest non-members.

    Returns ``(members, nonmembers, evaluation)`` where ``evaluation`` is balanced: the
    first n members (n = number of non-members) labelled 1, then all non-members labelled 0.
    ``members`` is the whole member set (what a student is fine-tuned on).
    """
    from dataclasses import replace

    if not 0 < member_fraction < 1:
        raise ValueError(f"member_fraction must be in (0, 1), got {member_fraction}")
    order = np.random.default_rng(seed).permutation(len(questions))
    shuffled = [questions[i] for i in order]
    k = int(round(member_fraction * len(shuffled)))
    members = [replace(q, label=1) for q in shuffled[:k]]
    nonmembers = [replace(q, label=0) for q in shuffled[k:]]
    evaluation = members[: len(nonmembers)] + nonmembers
    return members, nonmembers, evaluation


def write_jsonl(path, rows) -> None:
    """Write dict rows as JSONL atomically (temp file + rename), creating parent folders."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: leave no partial file behind (the target is untouched)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def questions_to_rows(questions: list[Question]) -> list[dict]:
    rows = []
    for q in questions:
        r = {"id": q.id, "question": q.text}
        if q.label is not None:
            r["label"] = q.label
        if q.response is not None:
            r["response"] = q.response
        rows.append(r)
    return rows
