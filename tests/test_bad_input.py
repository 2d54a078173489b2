"""Bad input through the command line: exit 2 and one line naming the file, the line, the field and the problem.

The loaders' own tests (tests/test_data.py, tests/test_traceio.py) check the same errors at
the library level; here each goes through ``cli.main`` as a user meets it, and nothing is
written for a refused input. Unknown method names, the first out-of-range TPD parameters and the
one-class / zero-token warnings already go through the CLI in tests/test_cli.py.
"""

from __future__ import annotations

import gzip
import json

import pytest

from distill_detect.cli import main
from distill_detect.store import TraceStore

PREFIX = "distill-detect: error: "


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX) and "Traceback" not in err
    return lines[0][len(PREFIX) :]


def _parquet(path, columns: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


# name, file name, content (bytes, or a callable writing the file), line, field, problem
QUESTION_FILES = [
    ("empty", "q.jsonl", b"", None, None, "the file has no records (it is empty)"),
    ("blank lines only", "q.jsonl", b"\n  \n\n", None, None, "the file has no records (it is empty)"),
    ("header only csv", "q.csv", b"id,question\n", None, None, "the file has no records (it is empty)"),
    ("empty parquet", "q.parquet", lambda p: _parquet(p, {"question": []}), None, None, "the file has no records"),
    ("invalid json on line 3", "q.jsonl", b'{"question": "a"}\n{"question": "b"}\n{"question": "c"\n', 3, None, "invalid JSON"),
    ("not gzip", "q.jsonl.gz", b"plain text", None, None, "not a valid gzip file"),
    ("csv missing column", "q.csv", b"id,text\n1,hello\n", 2, "question", "missing column 'question' (found: id, text)"),
    ("csv ragged row", "q.csv", b"id,question\n1,a\n2,b,extra\n", 3, None, "3 columns but the header has 2"),
    (
        "parquet int question",
        "q.parquet",
        lambda p: _parquet(p, {"question": [1, 2]}),
        1,
        "question",
        "must be a string, got int",
    ),
    (
        "parquet string label",
        "q.parquet",
        lambda p: _parquet(p, {"question": ["a", "b"], "label": ["1", "0"]}),
        1,
        "label",
        "label must be the number 0 or 1, got '1' (str)",
    ),
    ("missing question", "q.jsonl", b'{"question": "a"}\n{"text": "b"}\n', 2, "question", "missing or null"),
    ("null question", "q.jsonl", b'{"question": "a"}\n{"question": null}\n', 2, "question", "missing or null"),
    ("empty question", "q.jsonl", b'{"question": "a"}\n{"question": " \\t "}\n', 2, "question", "empty question"),
    ("empty csv cell", "q.csv", b"id,question\n1,a\n2,\n", 3, "question", "empty question"),
    (
        "duplicate id other text",
        "q.jsonl",
        b'{"id": "a", "question": "x"}\n{"id": "b", "question": "y"}\n{"id": "a", "question": "z"}\n',
        3,
        "id",
        "duplicate id 'a' with different text (first seen on line 1)",
    ),
    ("label 2", "q.jsonl", b'{"question": "a", "label": 2}\n', 1, "label", "label must be 0 or 1, got 2"),
    ("label 0.5", "q.jsonl", b'{"question": "a", "label": 0.5}\n', 1, "label", "label must be 0 or 1, got 0.5"),
    ("label string", "q.jsonl", b'{"question": "a", "label": "member"}\n', 1, "label", "must be the number 0 or 1, got 'member'"),
    ("label bool", "q.jsonl", b'{"question": "a", "label": true}\n', 1, "label", "must be the number 0 or 1, got True"),
    ("csv label yes", "q.csv", b"question,label\nhi,1\nho,yes\n", 3, "label", "label must be 0 or 1, got 'yes'"),
    ("id of a wrong type", "q.jsonl", b'{"id": [1], "question": "a"}\n', 1, "id", "id must be a string or integer, got list"),
    ("non-utf8", "q.jsonl", b'{"question": "ok"}\n{"question": "caf\xe9"}\n', 2, None, "not valid UTF-8 (byte 0xe9"),
    ("non-utf8 csv", "q.csv", b"question\nok\n\xff\xfe\n", 3, None, "not valid UTF-8 (byte 0xff"),
]


@pytest.mark.parametrize(
    "name, fname, content, line, field, problem", QUESTION_FILES, ids=[c[0].replace(" ", "-") for c in QUESTION_FILES]
)
def test_bad_question_file_is_one_line_and_writes_nothing(tmp_path, capsys, name, fname, content, line, field, problem):
    p = tmp_path / fname
    if callable(content):
        content(p)
    else:
        p.write_bytes(content)
    out = tmp_path / "run"
    assert main(["generate", "--questions", str(p), "--out", str(out)]) == 2
    msg = _one_line(capsys)
    where = f"{p}" if line is None else f"{p}:{line}"
    what = f"field '{field}': " if field else ""
    assert msg.startswith(f"{where}: {what}"), msg
    assert problem in msg
    assert not out.exists()  # refused before anything was created (and before any model load)


def test_members_and_nonmembers_overlap_names_the_line(tmp_path, capsys):
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "m1", "question": "What is 2+2?"}\n{"id": "m2", "question": "Name a colour."}\n')
    n = tmp_path / "n.csv"
    n.write_text("id,question\nn1,Something else\nn2,Name a colour.\n")
    assert main(["run", "--members", str(m), "--nonmembers", str(n), "--out", str(tmp_path / "o")]) == 2
    assert _one_line(capsys) == f"{n}:3: field 'question': question 'n2' has the same text as member 'm2' in {m}"
    n.write_text("id,question\nn1,Something else\nm1,Different text\n")
    assert main(["run", "--members", str(m), "--nonmembers", str(n), "--out", str(tmp_path / "o")]) == 2
    assert _one_line(capsys) == f"{n}:3: field 'id': id 'm1' is also in the members file {m}"
    assert not (tmp_path / "o").exists()


TRACE_LINES = [
    (
        "inf",
        '{"id": "b", "output_logprobs": [-0.1, Infinity]}',
        "output_logprobs",
        "element 1 is inf; log-probabilities must be finite",
    ),
    (
        "-inf",
        '{"id": "b", "output_logprobs": [-Infinity]}',
        "output_logprobs",
        "element 0 is -inf; log-probabilities must be finite",
    ),
    ("positive", '{"id": "b", "output_logprobs": [-0.1, 0.01]}', "output_logprobs", "a log-probability cannot be positive"),
    ("null log-probs", '{"id": "b", "output_logprobs": null}', "output_logprobs", "is null"),
    ("nan in prompt", '{"id": "b", "output_logprobs": [-1], "prompt_logprobs": [NaN]}', "prompt_logprobs", "must be finite"),
    (
        "positive extra",
        '{"id": "b", "output_logprobs": [-1], "extra": {"reference_output_logprobs": [2.0]}}',
        "extra.reference_output_logprobs",
        "cannot be positive",
    ),
    ("label string", '{"id": "b", "output_logprobs": [-1], "label": "1"}', "label", "must be the number 0 or 1"),
    (
        "token ids not ints",
        '{"id": "b", "output_logprobs": [-1], "output_token_ids": [1.5]}',
        "output_token_ids",
        "expected integers",
    ),
    ("negative cap", '{"id": "b", "output_logprobs": [-1], "max_new_tokens": -1}', "max_new_tokens", "non-negative integer"),
]


@pytest.mark.parametrize("name, line, field, problem", TRACE_LINES, ids=[c[0].replace(" ", "-") for c in TRACE_LINES])
def test_bad_traces_file_is_one_line(tmp_path, capsys, name, line, field, problem):
    """NaN in output_logprobs and the rest of the trace checks at library level: tests/test_cli.py, tests/test_traceio.py."""
    p = tmp_path / "t.jsonl"
    p.write_text('{"id": "a", "output_logprobs": [-0.2]}\n' + line + "\n")
    assert main(["score", "--traces", str(p), "--out", str(tmp_path / "o")]) == 2
    msg = _one_line(capsys)
    assert msg.startswith(f"{p}:2: field '{field}': ") and problem in msg, msg
    assert not (tmp_path / "o").exists()


TPD_FLAGS = [
    (["--tpd-tau", "0"], "TPD tau must be in (0, 1], got 0.0"),
    (["--tpd-tau", "-0.5"], "TPD tau must be in (0, 1], got -0.5"),
    (["--tpd-tau", "nan"], "TPD tau must be in (0, 1], got nan"),
    (["--tpd-alpha", "-1"], "TPD alpha must be a positive number, got -1.0"),
    (["--tpd-alpha", "nan"], "TPD alpha must be a positive number, got nan"),
    (["--tpd-alpha", "inf"], "TPD alpha must be a positive number, got inf"),
    (["--tpd-tokens", "-3"], "TPD max_tokens (M) must be an integer >= 1, got -3"),
    (["--param", "tpd.max_tokens=2.5"], "TPD max_tokens (M) must be an integer >= 1, got 2.5"),
    (["--param", "tpd.tau=0"], "TPD tau must be in (0, 1], got 0"),
    (["--param", "tpd.tau=abc"], "TPD tau must be in (0, 1], got 'abc'"),
    (["--param", "tpd.max_tokens=1e999"], "TPD max_tokens (M) must be an integer >= 1, got inf"),
    (["--param", "tpd.alpha=true"], "TPD alpha must be a positive number, got True"),
    (["--methods", "tpd,min_kk"], "unknown method 'min_kk'. Did you mean 'min_k'"),
]


@pytest.mark.parametrize("flags, problem", TPD_FLAGS, ids=[" ".join(f) for f, _ in TPD_FLAGS])
def test_out_of_range_tpd_parameters_name_the_parameter(tmp_path, capsys, flags, problem):
    """Boundaries not in tests/test_cli.py::test_user_errors_are_one_line_exit_2 (tau 1.5, alpha 0, M 0, 'tdp')."""
    p = tmp_path / "t.jsonl"
    p.write_text('{"id": "a", "output_logprobs": [-0.2]}\n')
    assert main(["score", "--traces", str(p), "--out", str(tmp_path / "o"), *flags]) == 2
    assert problem in _one_line(capsys)
    assert not (tmp_path / "o").exists()


# -- a question longer than the model's context: refused, naming the file and the line --------------------------


def _long_question() -> str:
    return "Add these numbers: " + " ".join(str(i) for i in range(1200)) + ". What is the total?"


def test_question_longer_than_the_context_is_refused_naming_file_and_line(tiny_dir, tmp_path, capsys):
    """Policy: refuse (never truncate, which would change the question); the shorter questions are kept."""
    p = tmp_path / "q.jsonl"  # no ids: the message shows the text hash and the line is found from the text
    p.write_text("".join(json.dumps({"question": q}) + "\n" for q in ["What is 1+1?", _long_question(), "What is 2+3?"]))
    run = tmp_path / "run"
    argv = ["generate", "--model", str(tiny_dir), "--questions", str(p), "--out", str(run)]
    assert main([*argv, "--batch-size", "1", "--max-new-tokens", "3"]) == 2
    msg = _one_line(capsys)
    assert msg.startswith(f"{p}:2: field 'question': question 'q-") and "the model's context is 1024" in msg, msg
    assert "shorten or drop this question" in msg
    with TraceStore(run) as st:
        assert st.integrity_check() == [] and st.counts()["traces"] == 2  # the others were generated and kept


def test_question_longer_than_the_context_in_run_names_the_csv_line(tiny_dir, tmp_path, capsys):
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "m1", "question": "What is 1+1?"}\n')
    n = tmp_path / "n.csv"
    n.write_text(f"id,question\nn1,What is 2+2?\nn2,{_long_question()}\n")
    argv = ["run", "--model", str(tiny_dir), "--members", str(m), "--nonmembers", str(n), "--out", str(tmp_path / "o")]
    assert main([*argv, "--max-new-tokens", "3", "--no-report", "--bootstrap", "10"]) == 2
    msg = _one_line(capsys)
    assert msg.startswith(f"{n}:3: field 'question': question 'n2': prompt is ") and "context is 1024" in msg, msg


def test_gzip_jsonl_with_a_bad_line_names_the_line(tmp_path, capsys):
    p = tmp_path / "q.jsonl.gz"
    with gzip.open(p, "wt") as fh:
        fh.write('{"question": "a"}\n{"question": "b", "label": 7}\n')
    assert main(["generate", "--questions", str(p), "--out", str(tmp_path / "r")]) == 2
    assert _one_line(capsys) == f"{p}:2: field 'label': label must be 0 or 1, got 7"
