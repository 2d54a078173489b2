"""The durable store: resume, no duplicates, fingerprints, locking, export of unfinished runs."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from distill_detect.errors import ConfigError
from distill_detect.pipeline import generate_run, read_run
from distill_detect.store import RunLocked, TraceStore
from distill_detect.types import Question, Trace


class FakeBackend:
    """Deterministic stand-in: question i yields tokens derived from its text; counts calls."""

    name = "fake"

    def __init__(self, tag="v1", fail_after=None):
        self.tag = tag
        self.calls: list[str] = []
        self.fail_after = fail_after

    def fingerprint(self):
        return {"backend": "fake", "model": {"tag": self.tag}, "decoding": "greedy"}

    def generate(self, questions, *, max_new_tokens):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        out = []
        for q in questions:
            self.calls.append(q.id)
            n = min(max_new_tokens, 3 + len(q.text) % 5)
            lp = -np.linspace(0.01, 1.0, n).astype(np.float32)
            fin = "stop" if n < max_new_tokens else "length"
            out.append(
                Trace(id=q.id, output_ids=np.arange(n), output_logprobs=lp, finish_reason=fin, max_new_tokens=max_new_tokens)
            )
        return out


QS = [Question(f"q{i}", "x" * (i + 1), label=i % 2) for i in range(10)]


def test_resume_generates_only_what_is_missing(tmp_path):
    run = tmp_path / "run"
    b1 = FakeBackend(fail_after=4)
    with pytest.raises(KeyboardInterrupt, match="4 of 10 questions are stored"):
        generate_run(QS, run, lambda: b1, max_new_tokens=50, batch_size=2)
    b2 = FakeBackend()
    s = generate_run(QS, run, lambda: b2, max_new_tokens=50, batch_size=2)
    assert s["already_done"] == 4 and s["generated"] == 6
    assert set(b1.calls).isdisjoint(b2.calls) and len(set(b1.calls) | set(b2.calls)) == 10
    traces, fp, counts = read_run(run)
    assert [t.id for t in traces] == [q.id for q in QS]  # input order, each once
    assert counts == {"questions": 10, "traces": 10, "tokens": sum(t.num_tokens for t in traces)}
    assert [t.label for t in traces] == [q.label for q in QS]
    with TraceStore(run) as st:
        assert st.integrity_check() == []
    # A finished run does not even construct a backend.
    s3 = generate_run(QS, run, lambda: pytest.fail("backend loaded for a finished run"), max_new_tokens=50)
    assert s3["generated"] == 0 and s3["already_done"] == 10


def test_arrays_round_trip_exactly(tmp_path):
    b = FakeBackend()
    generate_run(QS[:3], tmp_path, lambda: b, max_new_tokens=50)
    traces, _, _ = read_run(tmp_path)
    ref = b.generate(QS[:3], max_new_tokens=50)
    for a, r in zip(traces, ref):
        assert np.array_equal(a.output_logprobs, r.output_logprobs) and np.array_equal(a.output_ids, r.output_ids)
        assert a.output_logprobs.dtype == np.float32 and a.output_ids.dtype == np.int32


def test_larger_cap_regenerates_only_truncated_traces(tmp_path):
    generate_run(QS, tmp_path, lambda: FakeBackend(), max_new_tokens=4)
    b = FakeBackend()
    generate_run(QS, tmp_path, lambda: b, max_new_tokens=50)
    traces, _, _ = read_run(tmp_path)
    short = [q.id for q in QS if 3 + len(q.text) % 5 < 4]  # these stopped by themselves under cap 4
    assert set(b.calls) == {q.id for q in QS} - set(short)
    assert all(t.max_new_tokens == 50 or t.finish_reason == "stop" for t in traces)
    # A smaller cap later is already satisfied by the stored traces.
    assert generate_run(QS, tmp_path, lambda: pytest.fail("regenerated"), max_new_tokens=10)["generated"] == 0


def test_fingerprint_mismatch_is_refused_naming_the_difference(tmp_path):
    generate_run(QS[:2], tmp_path, lambda: FakeBackend("v1"), max_new_tokens=5)
    with pytest.raises(ConfigError, match=r"model\.tag: run has 'v1', this command has 'v2'"):
        generate_run(QS, tmp_path, lambda: FakeBackend("v2"), max_new_tokens=5)
    traces, _, counts = read_run(tmp_path)
    assert counts["questions"] == 2 and len(traces) == 2  # nothing was added by the refused command


def test_same_id_other_text_refused(tmp_path):
    generate_run(QS[:2], tmp_path, lambda: FakeBackend(), max_new_tokens=5)
    with pytest.raises(ConfigError, match="already in .* with different text"):
        generate_run([Question("q0", "changed")], tmp_path, lambda: FakeBackend(), max_new_tokens=5)


def test_second_writer_is_refused(tmp_path):
    a = TraceStore(tmp_path, create=True)
    b = TraceStore(tmp_path)
    with a.writer({"x": 1}):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            with b.writer({"x": 1}):
                pass
    with b.writer({"x": 1}):  # released after the first writer is done
        pass


def test_export_of_unfinished_run_and_reading_back(tmp_path):
    from distill_detect.cli import main
    from distill_detect.traceio import read_traces_jsonl

    with pytest.raises(KeyboardInterrupt):
        generate_run(QS, tmp_path / "run", lambda: FakeBackend(fail_after=3), max_new_tokens=50, batch_size=3)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "t.jsonl")]) == 0
    back = read_traces_jsonl(tmp_path / "t.jsonl")
    assert len(back) == 3 and all(t.label is not None for t in back)


def _count(db):
    try:
        with sqlite3.connect(db, timeout=1) as c:
            return c.execute("SELECT COUNT(*) FROM traces").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_kill_9_mid_generation_then_resume(tmp_path, tiny_dir):
    """SIGKILL the real CLI after some batches are committed; the same command finishes the run exactly."""
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": f"k{i}", "question": f"What is {i} plus {i * 7}?"}) + "\n" for i in range(12)))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "distill_detect.cli", "generate", "--model", str(tiny_dir), "--questions", str(qfile)]
    cmd += ["--out", str(run), "--batch-size", "2", "--max-new-tokens", "24"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _count(run / "traces.sqlite") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _count(run / "traces.sqlite")
    assert 0 < killed_at < 12, f"kill landed at {killed_at} traces; the test needs a mid-run kill"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{12 - killed_at} generated now" in done.stderr
    with TraceStore(run) as st:
        assert st.integrity_check() == []
        ids = [t.id for t in st.traces()]
    assert sorted(ids) == sorted(f"k{i}" for i in range(12)) and len(set(ids)) == 12
