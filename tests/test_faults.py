"""Faults injected into real runs: kill -9, Ctrl-C, a full disk, unwritable paths, two writers, model load failures.

Most scenarios drive the real CLI (``distill_detect.cli.main``) in a child process with a
deterministic fake backend (``faultfake.FaultFake`` below), so a fault lands at an exact
point without paying for a model: the child is killed from inside (SIGKILL to itself)
at a named moment, or from outside at a random one. The same command is then run again
and must finish the run with every question stored exactly once, the store passing
``TraceStore.integrity_check()``, and the traces equal to those of a run that was never
interrupted. Ctrl-C, the hub and the out-of-memory cases use the tiny random Llama.

No test hook lives in the package: the child monkeypatches ``TraceStore`` (see DRIVER).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill_detect import backends, cli
from distill_detect.store import TraceStore

# -- the fake backend and the child-process driver ----------------------------------------------------

FAKE = '''
"""Deterministic fake backend for fault injection (written by tests/test_faults.py)."""
import os
import signal
import time

import numpy as np

from distill_detect.types import Trace


class FaultFake:
    name = "fake"
    location = None
    capabilities = frozenset({"output_logprobs", "output_ids"})

    def __init__(self, **kwargs):
        self.calls = 0

    def fingerprint(self):
        return {"backend": "fake", "model": {"tag": "v1"}, "decoding": "greedy"}

    def generate(self, questions, *, max_new_tokens):
        self.calls += 1
        go = os.environ.get("FAULT_WAIT_FILE")
        while go and not os.path.exists(go):
            time.sleep(0.02)
        if os.environ.get("FAULT_KILL") == f"generate:{self.calls}":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(os.environ.get("FAULT_SLEEP", "0")))
        out = []
        for q in questions:
            n = min(max_new_tokens, 200 + len(q.text) % 7)
            lp = -(np.arange(n, dtype=np.float32) + 1) / (n + len(q.text))
            fin = "stop" if n < max_new_tokens else "length"
            out.append(Trace(id=q.id, question=q.text, label=q.label, output_ids=np.arange(n) + len(q.text),
                             output_logprobs=lp, output_text=q.text[::-1], finish_reason=fin, max_new_tokens=max_new_tokens))
        log = os.environ.get("FAULT_LOG")
        if log:  # which process generated which question (made durable before the traces are returned)
            with open(log, "a") as fh:
                fh.write("".join(f"{os.getpid()} {q.id}\\n" for q in questions))
                fh.flush()
                os.fsync(fh.fileno())
        return out

    def close(self):
        pass
'''

DRIVER = '''
"""Run distill_detect.cli.main with the fake backend and a fault named by $FAULT_KILL (tests/test_faults.py).

FAULT_KILL:  generate:K      SIGKILL inside the K-th model call (nothing being written)
             commit:K        inside the K-th batch's transaction: rows written, COMMIT not sent
             rows:N          inside a batch's INSERT, after N trace rows in all
             after_commit:K  right after the K-th batch is committed
             plan / bind     inside the transaction that plans the questions / binds the fingerprint
             fsize:K         after the K-th batch, cap the size of any file this process writes
                             (RLIMIT_FSIZE: later writes fail with EFBIG, like a full disk)
             fsize_at        the same cap ($FAULT_FSIZE bytes) from the moment $FAULT_AT (module:function)
                             is called, e.g. the function that writes the outputs
"""
import importlib
import contextlib
import os
import resource
import signal
import sqlite3
import sys

from distill_detect import backends, cli
from distill_detect.store import TraceStore

backends.BACKENDS["fake"] = "faultfake:FaultFake"
what, _, k = os.environ.get("FAULT_KILL", "").partition(":")
k = int(k or 0)
n = {"put": 0, "rows": 0}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


orig_tx, orig_put, orig_add, orig_bind = TraceStore._tx, TraceStore.put_traces, TraceStore.add_questions, TraceStore.bind


@contextlib.contextmanager
def tx(self):
    with orig_tx(self):
        yield
        if getattr(self, "die_before_commit", False):
            die()


def put(self, traces):
    n["put"] += 1
    self.die_before_commit = what == "commit" and n["put"] == k
    orig_put(self, traces)
    if what == "after_commit" and n["put"] == k:
        die()
    if what == "fsize" and n["put"] == k:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = max(os.path.getsize(p) for p in (self.path, str(self.path) + "-wal") if os.path.exists(p))
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def add(self, qs):
    self.die_before_commit = what == "plan"
    return orig_add(self, qs)


def bind(self, fp):
    self.die_before_commit = what == "bind"
    return orig_bind(self, fp)


class Dying(sqlite3.Connection):
    def executemany(self, sql, rows):
        if what == "rows" and sql.startswith("INSERT OR REPLACE INTO traces"):
            rows = counted(rows)
        return super().executemany(sql, rows)


def counted(rows):
    for r in rows:
        if n["rows"] == k:
            die()
        n["rows"] += 1
        yield r


real_connect = sqlite3.connect
sqlite3.connect = lambda *a, **kw: real_connect(*a, factory=Dying, **kw)
TraceStore._tx, TraceStore.put_traces, TraceStore.add_questions, TraceStore.bind = tx, put, add, bind
if what == "fsize_at":
    mod_name, fn_name = os.environ["FAULT_AT"].split(":")
    mod = importlib.import_module(mod_name)
    real_fn = getattr(mod, fn_name)

    def capped(*a, **kw):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        cap = int(os.environ["FAULT_FSIZE"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return real_fn(*a, **kw)

    setattr(mod, fn_name, capped)
sys.exit(cli.main(sys.argv[1:]))
'''

N_Q = 10  # questions; text lengths all differ, so the batches (sorted by length) are known in advance
BATCH = 3


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    d = tmp_path_factory.mktemp("faulttools")
    (d / "faultfake.py").write_text(FAKE)
    (d / "driver.py").write_text(DRIVER)
    return d


@pytest.fixture()
def fake_here(tools, monkeypatch):
    """The fake backend registered for in-process cli.main calls."""
    monkeypatch.syspath_prepend(str(tools))
    monkeypatch.setitem(backends.BACKENDS, "fake", "faultfake:FaultFake")
    return tools


def _qfile(path: Path, n: int = N_Q) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": "What is " + "x" * (i + 1) + "?"}) + "\n" for i in range(n)))
    return path


def _argv(qfile, run, batch=BATCH):
    return [
        "generate",
        "--backend",
        "fake",
        "--questions",
        str(qfile),
        "--out",
        str(run),
        "--batch-size",
        str(batch),
        "--max-new-tokens",
        "400",
    ]


def _child(tools, argv, *, env=None, wait=True, **kw):
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    cmd = [sys.executable, str(tools / "driver.py"), *argv]
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=120, **kw)


def _stored(run: Path) -> dict[str, tuple]:
    """{id: (tokens, log-probs, text, cap)} of the committed traces (what a fresh reader sees)."""
    if not (run / "traces.sqlite").exists():
        return {}
    with TraceStore(run) as st:
        assert st.integrity_check() == []
        return {t.id: (t.output_ids.tolist(), t.output_logprobs.tolist(), t.output_text, t.max_new_tokens) for t in st.traces()}


def _generated_by(log: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            pid, qid = line.split()
            out.setdefault(int(pid), []).append(qid)
    return out


@pytest.fixture(scope="module")
def reference(tools, tmp_path_factory):
    """The traces of an uninterrupted run: every resumed run must end with exactly these."""
    d = tmp_path_factory.mktemp("ref")
    r = _child(tools, _argv(_qfile(d / "q.jsonl"), d / "run"))
    assert r.returncode == 0, r.stderr
    ref = _stored(d / "run")
    assert len(ref) == N_Q
    return ref


def _resume_and_check(tools, qfile, run, log, reference, committed_before: set[str]):
    """The same command again: finishes, regenerates exactly the missing questions, ends equal to the reference."""
    r = _child(tools, _argv(qfile, run), env={"FAULT_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    assert f"{N_Q - len(committed_before)} generated now" in r.stderr
    assert _generated_by(log)[_last_pid(log)] == sorted(set(reference) - committed_before, key=lambda q: int(q[1:]))
    final = _stored(run)
    assert final == reference  # every question once, nothing torn or duplicated
    with TraceStore(run) as st:
        assert [q.id for q in st.questions()] == [f"q{i}" for i in range(N_Q)]  # planned once, in input order


def _last_pid(log: Path) -> int:
    return int(log.read_text().splitlines()[-1].split()[0])


# -- kill -9 at named moments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault, committed",
    [
        ("bind", 0),  # binding the fingerprint on a fresh run
        ("plan", 0),  # planning the questions
        ("generate:2", 3),  # inside the model call of batch 2
        ("commit:1", 0),  # batch 1 written, not committed
        ("commit:3", 6),  # batch 3 written, not committed
        ("rows:4", 3),  # batch 2 half written (1 of its 3 rows)
        ("after_commit:2", 6),  # just after batch 2 is committed
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_kill_9_at_a_named_moment_then_the_same_command_completes(tools, reference, tmp_path, fault, committed):
    qfile, run, log = _qfile(tmp_path / "q.jsonl"), tmp_path / "run", tmp_path / "gen.log"
    r = _child(tools, _argv(qfile, run), env={"FAULT_KILL": fault, "FAULT_LOG": str(log)})
    assert r.returncode == -signal.SIGKILL, r.stderr
    stored = _stored(run)  # readable, integrity_check() == [] (asserted inside)
    # Whole batches only, in the planned order: the killed batch left nothing behind.
    assert set(stored) == {f"q{i}" for i in range(committed)}
    assert all(stored[q] == reference[q] for q in stored)
    _resume_and_check(tools, qfile, run, log, reference, set(stored))


def test_kill_9_at_random_moments_loses_nothing_and_duplicates_nothing(tools, reference, tmp_path):
    """SIGKILL from outside after a random delay, several times; batches are atomic; then the run completes."""
    qfile, run, log = _qfile(tmp_path / "q.jsonl"), tmp_path / "run", tmp_path / "gen.log"
    rng = random.Random(1234)
    argv = _argv(qfile, run, batch=2)
    attempts: list[tuple[int, set[str]]] = []  # (pid, ids stored when it started)
    killed = 0
    for _ in range(4):
        before = set(_stored(run))
        pending = sorted(set(reference) - before, key=lambda q: int(q[1:]))
        proc = _child(tools, argv, env={"FAULT_SLEEP": "0.4", "FAULT_LOG": str(log)}, wait=False)
        attempts.append((proc.pid, before))
        time.sleep(rng.uniform(0.3, 2.0))
        if proc.poll() is not None:
            assert proc.returncode == 0
            break  # finished before the kill: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        killed += 1
        now = set(_stored(run))
        assert before <= now
        # What this attempt added is exactly its first j batches (pending sorted by length, 2 per batch).
        new = now - before
        batches = [set(pending[i : i + 2]) for i in range(0, len(pending), 2)]
        assert any(new == set().union(*batches[:j]) for j in range(len(batches) + 1)), (new, batches)
    assert killed >= 1
    r = _child(tools, argv, env={"FAULT_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    attempts.append((_last_pid(log), set(attempts[-1][1])))
    assert _stored(run) == reference
    # No attempt generated a question that was already stored when it started.
    gen = _generated_by(log)
    for pid, before in attempts:
        assert before.isdisjoint(gen.get(pid, [])), pid


# -- Ctrl-C ------------------------------------------------------------------------------------------------


@pytest.fixture()
def one_thread():
    """One torch thread: on a loaded 2-core machine, two threads make the tiny model many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**os.environ, "OMP_NUM_THREADS": "1"}
    torch.set_num_threads(before)


@pytest.mark.slow
def test_ctrl_c_says_how_far_it_got_and_the_same_command_resumes(tiny_dir, tmp_path, capsys, one_thread):
    """SIGINT to the real CLI on the tiny model mid-run: exit 130, one line with the count and how to resume."""
    n = 16
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(
        "".join(json.dumps({"id": f"c{i}", "question": f"Count {i} sheep, then {i + 3} goats."}) + "\n" for i in range(n))
    )
    run = tmp_path / "run"
    argv = ["generate", "--model", str(tiny_dir), "--questions", str(qfile), "--out", str(run)]
    argv += ["--batch-size", "1", "--max-new-tokens", "16"]
    cmd = [sys.executable, "-m", "distill_detect.cli", *argv]
    # A shell that starts the test suite in the background makes it ignore SIGINT, and Python then
    # leaves SIGINT ignored in the child too: give the child the default disposition back.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=one_thread,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 180
    while _count(run) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before Ctrl-C; the test needs a mid-run interrupt"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    stored = _count(run)
    assert 2 <= stored < n
    assert err.strip().splitlines()[-1] == (
        f"distill-detect: interrupted: {stored} of {n} questions are stored in {run}; run the same command again to resume"
    )
    assert "Traceback" not in err
    assert cli.main(argv) == 0
    assert f"{n - stored} generated now" in capsys.readouterr().err
    with TraceStore(run) as st:
        assert st.integrity_check() == []
        ids = [t.id for t in st.traces()]
    assert ids == [f"c{i}" for i in range(n)]


def _count(run: Path) -> int:
    try:
        with sqlite3.connect(run / "traces.sqlite", timeout=1) as c:
            return c.execute("SELECT COUNT(*) FROM traces").fetchone()[0]
    except sqlite3.Error:
        return 0


# -- a full disk -------------------------------------------------------------------------------------------


def test_full_database_is_a_clear_error_and_the_store_survives(fake_here, reference, tmp_path, monkeypatch, capsys):
    """SQLite's own size cap (PRAGMA max_page_count) makes the database 'full' at the second batch."""
    qfile, run = _qfile(tmp_path / "q.jsonl"), tmp_path / "run"
    orig_put = TraceStore.put_traces
    calls = []

    def put(self, traces):
        calls.append(len(traces))
        if len(calls) == 2:
            pages = self.db.execute("PRAGMA page_count").fetchone()[0]
            self.db.execute(f"PRAGMA max_page_count = {pages}")
        return orig_put(self, traces)

    monkeypatch.setattr(TraceStore, "put_traces", put)
    assert cli.main(_argv(qfile, run)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill-detect: error: could not write to") and "database or disk is full" in err
    assert "run the same command again" in err and "\n" not in err
    assert set(_stored(run)) == {"q0", "q1", "q2"}  # batch 1 kept, batch 2 not half-stored
    monkeypatch.setattr(TraceStore, "put_traces", orig_put)
    assert cli.main(_argv(qfile, run)) == 0
    assert f"{N_Q - 3} generated now" in capsys.readouterr().err
    assert _stored(run) == reference


def test_file_size_limit_while_writing_the_store_then_resume(tools, reference, tmp_path):
    """A real OS write failure (RLIMIT_FSIZE -> EFBIG) during a commit: one-line error, store intact, resume works."""
    qfile, run, log = _qfile(tmp_path / "q.jsonl"), tmp_path / "run", tmp_path / "gen.log"
    r = _child(tools, _argv(qfile, run), env={"FAULT_KILL": "fsize:1", "FAULT_LOG": str(log)})
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith("distill-detect: error: could not write to") and "nothing from this batch was stored" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert set(_stored(run)) == {"q0", "q1", "q2"}
    _resume_and_check(tools, qfile, run, log, reference, {"q0", "q1", "q2"})


def test_file_size_limit_while_exporting_keeps_the_old_file(tools, reference, tmp_path):
    """export under a write cap: one-line error naming the file, the previous export untouched, no temp file left."""
    qfile, run = _qfile(tmp_path / "q.jsonl"), tmp_path / "run"
    assert _child(tools, _argv(qfile, run)).returncode == 0
    target = tmp_path / "t.jsonl"
    target.write_text("previous export\n")
    env = {"FAULT_KILL": "fsize_at", "FAULT_AT": "distill_detect.traceio:write_traces_jsonl", "FAULT_FSIZE": "4000"}
    r = _child(tools, ["export", str(run), "--out", str(target)], env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"distill-detect: error: cannot write {target}: File too large"
    assert target.read_text() == "previous export\n" and not Path(f"{target}.tmp").exists()


def test_file_size_limit_while_writing_scores(tools, reference, tmp_path):
    qfile, run = _qfile(tmp_path / "q.jsonl"), tmp_path / "run"
    assert _child(tools, _argv(qfile, run)).returncode == 0
    env = {"FAULT_KILL": "fsize_at", "FAULT_AT": "distill_detect.scoring:write_outputs", "FAULT_FSIZE": "300"}
    r = _child(tools, ["score", "--run", str(run), "--out", str(tmp_path / "res"), "--no-report"], env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"distill-detect: error: cannot write outputs to {tmp_path / 'res'}: File too large"
    assert not (tmp_path / "res" / "scores.jsonl").exists() and not (tmp_path / "res" / "scores.jsonl.tmp").exists()


# -- unwritable output ---------------------------------------------------------------------------------------


def test_output_path_under_a_regular_file(fake_here, tmp_path, capsys):
    """A real OS error for every user (root included): a directory cannot be made inside a file."""
    qfile, blocker = _qfile(tmp_path / "q.jsonl"), tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(_argv(qfile, blocker / "run")) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"distill-detect: error: cannot create run directory {blocker / 'run'}: Not a directory"
    )
    assert cli.main(_argv(qfile, tmp_path / "run")) == 0
    capsys.readouterr()
    assert cli.main(["score", "--run", str(tmp_path / "run"), "--out", str(blocker / "res"), "--no-report"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"distill-detect: error: cannot create output directory {blocker / 'res'}: Not a directory"
    )
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(blocker / "t.jsonl")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"distill-detect: error: cannot write {blocker / 't.jsonl'}: {blocker} is not a directory"
    )
    assert blocker.read_text() == "x"


def _without_dac_override() -> list[str]:
    """Command prefix under which file permissions apply (root ignores them unless CAP_DAC_OVERRIDE is dropped)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot make permissions bind")
    return [setpriv, "--bounding-set=-dac_override"]


def test_read_only_output_directory_and_read_only_run(tools, reference, tmp_path):
    """Permission denied for real (chmod; as root, run without CAP_DAC_OVERRIDE): clear error, the run unharmed."""
    prefix = _without_dac_override()
    qfile, ro = _qfile(tmp_path / "q.jsonl"), tmp_path / "ro"
    ro.mkdir()
    run = ro / "run"
    assert _child(tools, [*_argv(qfile, run), "--limit", "3"]).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(tools)}
    try:
        for p in (run / "traces.sqlite", run / ".lock", run, ro):
            p.chmod(0o555 if p.is_dir() else 0o444)
        base = [*prefix, sys.executable, str(tools / "driver.py")]
        r = subprocess.run([*base, *_argv(qfile, ro / "new")], env=env, capture_output=True, text=True, timeout=120)
        assert (
            r.returncode == 2
            and r.stderr.strip() == f"distill-detect: error: cannot create run directory {ro / 'new'}: Permission denied"
        )
        r = subprocess.run([*base, *_argv(qfile, run)], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().startswith(f"distill-detect: error: cannot open the trace store {run / 'traces.sqlite'}")
        assert "readonly" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        for p in (ro, run, run / "traces.sqlite", run / ".lock"):
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert set(_stored(run)) == {"q0", "q1", "q2"}
    log = tmp_path / "gen.log"
    _resume_and_check(tools, qfile, run, log, reference, {"q0", "q1", "q2"})


# -- two writers ---------------------------------------------------------------------------------------------


def test_second_process_on_the_same_run_is_refused_and_nothing_interleaves(tools, reference, tmp_path, capsys):
    qfile, run, log, go = _qfile(tmp_path / "q.jsonl"), tmp_path / "run", tmp_path / "gen.log", tmp_path / "go"
    a = _child(tools, _argv(qfile, run), env={"FAULT_WAIT_FILE": str(go), "FAULT_LOG": str(log)}, wait=False)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and a.poll() is None:
            lock = run / ".lock"
            if lock.exists() and lock.read_text().strip() == str(a.pid):
                break
            time.sleep(0.05)
        assert a.poll() is None, a.communicate()[1]
        b = _child(tools, _argv(qfile, run), env={"FAULT_LOG": str(log)})
        assert b.returncode == 2
        assert b.stderr.strip() == (
            f"distill-detect: error: {run}: another distill-detect process (pid {a.pid}) is writing this run; "
            "wait for it to finish or use another --out"
        )
        # Readers are not blocked by the writer: export works on the run in progress.
        assert cli.main(["export", str(run), "--out", str(tmp_path / "t.jsonl")]) == 0
        assert "wrote 0 traces" in capsys.readouterr().err
    finally:
        go.write_text("go")
    _, err = a.communicate(timeout=120)
    assert a.returncode == 0, err
    assert set(_generated_by(log)) == {a.pid}  # B generated nothing
    assert _stored(run) == reference


# -- model load failures -------------------------------------------------------------------------------------


def _partial_checkpoint(tiny_dir, dest: Path, *, weights: str | None) -> Path:
    dest.mkdir()
    for f in Path(tiny_dir).iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, dest / f.name)
    if weights == "truncated":
        (dest / "model.safetensors").write_bytes((Path(tiny_dir) / "model.safetensors").read_bytes()[:100_000])
    return dest


@pytest.mark.parametrize(
    "weights, needle",
    [
        (None, "no file named model.safetensors"),
        ("truncated", "a weights file is truncated or corrupt"),
    ],
    ids=["no-weights", "truncated-weights"],
)
def test_checkpoint_with_missing_or_truncated_weights(tiny_dir, tmp_path, capsys, weights, needle):
    model = _partial_checkpoint(tiny_dir, tmp_path / "ckpt", weights=weights)
    qfile = _qfile(tmp_path / "q.jsonl", 2)
    assert cli.main(["generate", "--model", str(model), "--questions", str(qfile), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"distill-detect: error: could not load the model from {model}") and needle in err
    assert "config.json, the tokenizer files and *.safetensors weights" in err and "\n" not in err


def test_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    qfile = _qfile(tmp_path / "q.jsonl", 2)
    assert (
        cli.main(["generate", "--model", str(tmp_path / "notamodel"), "--questions", str(qfile), "--out", str(tmp_path / "r")])
        == 2
    )
    assert "expected a Hugging Face checkpoint directory with a config.json" in capsys.readouterr().err


def test_hub_unreachable(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache: the hub cannot be reached; the message says to pass a local directory."""
    qfile = _qfile(tmp_path / "q.jsonl", 2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    argv = ["generate", "--model", "some-org/some-model", "--questions", str(qfile), "--out", str(tmp_path / "r")]
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "distill_detect.cli", *argv], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith("distill-detect: error: could not load 'some-org/some-model' from the Hugging Face hub")
    assert "pass the local directory to --model" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("kind", ["torch", "runtime"])
def test_out_of_memory_names_batch_size_and_a_smaller_batch_then_works(tiny_dir, tmp_path, monkeypatch, capsys, kind, one_thread):
    """A batch of 2 'does not fit' (the model raises OOM); the message names --batch-size; with 1 the run completes."""
    import torch
    from transformers import LlamaForCausalLM

    from distill_detect.backends.fused import FusedLlama

    def failing(real, ids_at):
        def forward(self, *args, **kwargs):
            ids = kwargs.get("input_ids", kwargs.get("ids", args[ids_at] if len(args) > ids_at else None))
            if ids is not None and ids.shape[0] > 1:
                if kind == "torch":
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
                raise RuntimeError("CUDA error: out of memory")
            return real(self, *args, **kwargs)

        return forward

    # Both decoding forwards: transformers' modules and the fused CPU one (its ids come after the cache).
    monkeypatch.setattr(LlamaForCausalLM, "forward", failing(LlamaForCausalLM.forward, 0))
    monkeypatch.setattr(FusedLlama, "forward", failing(FusedLlama.forward, 1))
    qfile = _qfile(tmp_path / "q.jsonl", 3)
    run = tmp_path / "r"
    argv = ["generate", "--model", str(tiny_dir), "--questions", str(qfile), "--out", str(run), "--max-new-tokens", "4"]
    assert cli.main([*argv, "--batch-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"distill-detect: error: out of memory generating a batch of 2 questions with up to 4 new tokens; 0 of 3 questions "
        f"are stored in {run}. Run the same command again with a smaller --batch-size (e.g. 1) or a lower --max-new-tokens to resume"
    )
    assert cli.main([*argv, "--batch-size", "1"]) == 0
    assert "3 generated now" in capsys.readouterr().err
    with TraceStore(run) as st:
        assert st.integrity_check() == [] and st.counts()["traces"] == 3


def test_other_runtime_errors_are_not_mistaken_for_memory(fake_here, tmp_path, monkeypatch):
    """Only out-of-memory is reworded; any other failure inside the backend keeps its traceback (it is a bug)."""
    import faultfake

    def boom(self, questions, *, max_new_tokens):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(faultfake.FaultFake, "generate", boom)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(_argv(_qfile(tmp_path / "q.jsonl"), tmp_path / "run"))
