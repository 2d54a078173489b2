"""Question loading (every format, every error names file/line/field) and the paper's split."""

from __future__ import annotations

import gzip
import json

import pytest

from distill_detect.data import bundled_sets, combine_labelled, load_questions, paper_split
from distill_detect.errors import InputError
from distill_detect.types import Question, text_id


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_ids_labels_and_hash_ids(tmp_path):
    p = _jsonl(tmp_path / "q.jsonl", [{"id": 7, "question": "a?", "label": 1}, {"question": "b?"}])
    qs = load_questions(p)
    assert [q.id for q in qs] == ["7", text_id("b?")]
    assert [q.label for q in qs] == [1, None]
    assert text_id("b?") == text_id("b?") and text_id("b?") != text_id("b? ")


def test_csv_tsv_parquet_and_gz_agree(tmp_path):
    rows = [{"id": "x", "problem": "What is 1+1?", "label": 0}, {"id": "y", "problem": "Name, with comma", "label": 1}]
    _jsonl(tmp_path / "q.jsonl", rows)
    with gzip.open(tmp_path / "q.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "q.csv").write_text('id,problem,label\nx,What is 1+1?,0\ny,"Name, with comma",1\n')
    (tmp_path / "q.tsv").write_text("id\tproblem\tlabel\nx\tWhat is 1+1?\t0\ny\tName, with comma\t1\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "q.parquet")
    got = {ext: load_questions(tmp_path / f"q.{ext}", field="problem") for ext in ("jsonl", "jsonl.gz", "csv", "tsv", "parquet")}
    ref = got["jsonl"]
    assert [(q.id, q.text, q.label) for q in ref] == [("x", "What is 1+1?", 0), ("y", "Name, with comma", 1)]
    for ext, qs in got.items():
        assert qs == ref, ext


@pytest.mark.parametrize(
    "content, line, field, needle",
    [
        ('{"question": "a"}\n{"question": "b"\n', 2, None, "invalid JSON"),
        ('{"question": "a"}\n{"text": "b"}\n', 2, "question", "missing"),
        ('{"question": "a"}\n{"question": "   "}\n', 2, "question", "empty question"),
        ('{"question": "a", "label": 2}\n', 1, "label", "0 or 1"),
        ('{"question": "a", "label": "1"}\n', 1, "label", "number 0 or 1"),
        ('{"question": "a", "label": true}\n', 1, "label", "number 0 or 1"),
        ('{"question": 5}\n', 1, "question", "must be a string"),
        ('{"id": "a", "question": "x"}\n{"id": "a", "question": "y"}\n', 2, "id", "duplicate id"),
        ("[1, 2]\n", 1, None, "expected a JSON object"),
    ],
)
def test_bad_jsonl_names_file_line_field(tmp_path, content, line, field, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(InputError) as ei:
        load_questions(p)
    e = ei.value
    assert (e.line, e.field) == (line, field)
    assert needle in str(e) and str(e).startswith(f"{p}:{line}:")
    assert "\n" not in str(e)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_questions(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="empty"):
        load_questions(tmp_path / "empty.jsonl")


def test_csv_missing_column_and_bad_label(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text("id,text\n1,hello\n")
    with pytest.raises(InputError, match="missing column 'question'.*found: id, text") as ei:
        load_questions(p)
    assert ei.value.line == 2
    p.write_text("question,label\nhi,1\nho,yes\n")
    with pytest.raises(InputError, match="label must be 0 or 1") as ei:
        load_questions(p)
    assert ei.value.line == 3


def test_non_utf8_names_line(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_bytes(b'{"question": "ok"}\n{"question": "caf\xe9"}\n')
    with pytest.raises(InputError, match="not valid UTF-8") as ei:
        load_questions(p)
    assert ei.value.line == 2


def test_parquet_wrong_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": [1, 2]}), tmp_path / "q.parquet")
    with pytest.raises(InputError, match="must be a string, got int") as ei:
        load_questions(tmp_path / "q.parquet")
    assert ei.value.line == 1


def test_exact_duplicates_dropped_with_warning(tmp_path):
    p = _jsonl(tmp_path / "q.jsonl", [{"id": "a", "question": "x"}, {"id": "a", "question": "x"}])
    with pytest.warns(UserWarning, match="1 exact duplicate"):
        assert len(load_questions(p)) == 1


def test_bundled_sets_load():
    assert set(bundled_sets()) >= {"gsm8k_gpt3", "math_test", "gsm8k_test", "gsm8k_train_sample"}
    gpt3 = load_questions("bundled:gsm8k_gpt3", require_response=True)
    assert len(gpt3) == 742 and all(q.response for q in gpt3)
    assert len(load_questions("bundled:math_test")) == 5000
    with pytest.raises(InputError, match="Did you mean 'bundled:gsm8k_test'"):
        load_questions("bundled:gsm8k_tset")


def test_combine_refuses_overlap():
    a = [Question("1", "same text"), Question("2", "other")]
    with pytest.raises(InputError, match="same text as member '1'"):
        combine_labelled(a, [Question("9", "same text")])
    with pytest.raises(InputError, match="also in the members file"):
        combine_labelled(a, [Question("2", "different")])
    both = combine_labelled(a, [Question("3", "new")])
    assert [q.label for q in both] == [1, 1, 0]


def test_paper_split_protocol():
    qs = [Question(str(i), f"q{i}") for i in range(1000)]
    members, nonmembers, evaluation = paper_split(qs, seed=42)
    assert (len(members), len(nonmembers)) == (800, 200)
    assert {q.id for q in members}.isdisjoint(q.id for q in nonmembers)
    assert evaluation[:200] == members[:200] and evaluation[200:] == nonmembers
    assert sum(q.label for q in evaluation) == 200
    again = paper_split(qs, seed=42)
    assert again[0] == members  # deterministic under the seed
    assert paper_split(qs, seed=1)[0] != members
