"""--shard i/N and merge: shards partition the questions; merging shard runs equals one run."""

from __future__ import annotations

import numpy as np
import pytest

from distill_detect.distributed import merge_runs, parse_shard, shard_of, shard_questions
from distill_detect.errors import ConfigError
from distill_detect.pipeline import generate_run
from distill_detect.store import TraceStore
from distill_detect.types import Question, Trace

QS = [Question(id=f"q{i}", text=f"What is {i} plus {i}?", label=i % 2) for i in range(12)]


class FakeBackend:
    """Deterministic stand-in: the trace is a function of the question text only."""

    name = "fake"
    location = None

    def __init__(self, tag: str = "v1", salt: float = 0.0):
        self.tag, self.salt = tag, salt

    def fingerprint(self):
        return {"backend": "fake", "model": {"tag": self.tag}}

    def generate(self, batch, *, max_new_tokens):
        out = []
        for q in batch:
            n = 1 + len(q.text) % 5
            lp = -np.arange(1, n + 1, dtype=np.float32) / (len(q.text) + self.salt)
            out.append(
                Trace(
                    id=q.id,
                    question=q.text,
                    label=q.label,
                    output_ids=np.arange(n),
                    output_logprobs=lp,
                    output_text=q.text[::-1],
                    finish_reason="stop",
                    max_new_tokens=max_new_tokens,
                )
            )
        return out


def _gen(qs, run, **kw):
    return generate_run(qs, run, lambda: FakeBackend(**kw), max_new_tokens=16, batch_size=4)


def _rows(run):
    with TraceStore(run) as st:
        return {t.id: (t.output_ids.tolist(), t.output_logprobs.tolist(), t.output_text, t.label) for t in st.traces()}, [
            q.id for q in st.questions()
        ]


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/4", "1/0", "a/b", "1"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_shards_partition_and_are_stable():
    parts = [shard_questions(QS, i, 3) for i in range(3)]
    ids = [q.id for p in parts for q in p]
    assert sorted(ids) == sorted(q.id for q in QS) and len(ids) == len(set(ids))  # each question in exactly one shard
    assert all(parts)  # 12 ids over 3 shards: none empty (fixed hash, so this is a fixed fact)
    # sha256-based: the same on every machine and Python; pinned value.
    assert shard_of("q0", 1000) == int.from_bytes(__import__("hashlib").sha256(b"q0").digest()[:8], "big") % 1000
    assert [q.id for q in parts[0]] == [q.id for q in QS if q in parts[0]]  # input order kept


def test_merge_of_shards_equals_single_run(tmp_path):
    runs = []
    for i in range(3):
        run = tmp_path / f"shard{i}"
        _gen(shard_questions(QS, i, 3), run)
        runs.append(run)
    _gen(QS, tmp_path / "single")
    s = merge_runs(runs, tmp_path / "merged")
    assert s["traces"] == len(QS) and s["questions"] == len(QS)
    merged, order = _rows(tmp_path / "merged")
    single, _ = _rows(tmp_path / "single")
    assert merged == single
    assert len(order) == len(set(order)) == len(QS)
    with TraceStore(tmp_path / "merged") as st:
        assert st.integrity_check() == [] and st.get_meta("fingerprint") == FakeBackend().fingerprint()


def test_identical_duplicates_are_kept_once(tmp_path):
    _gen(QS[:8], tmp_path / "a")
    _gen(QS[4:], tmp_path / "b")
    s = merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert s["duplicates_identical"] == 4 and s["traces"] == len(QS)


def test_different_duplicates_are_refused(tmp_path):
    _gen(QS[:6], tmp_path / "a")
    _gen(QS[4:], tmp_path / "b", salt=1.0)  # same fingerprint, different numbers for q4, q5
    with pytest.raises(ConfigError, match="different traces"):
        merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert not (tmp_path / "m" / "traces.sqlite").exists() or _rows(tmp_path / "m")[0] == {}


def test_different_fingerprints_are_refused(tmp_path):
    _gen(QS[:6], tmp_path / "a")
    _gen(QS[6:], tmp_path / "b", tag="v2")
    with pytest.raises(ConfigError, match="different settings"):
        merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")


def test_merge_into_an_input_is_refused(tmp_path):
    _gen(QS[:2], tmp_path / "a")
    with pytest.raises(ConfigError, match="also one of the inputs"):
        merge_runs([tmp_path / "a"], tmp_path / "a")


def test_cli_shard_and_merge(tmp_path, monkeypatch):
    """The CLI path: --shard on generate, then merge, with a fake backend registered under a test name."""
    import json

    from distill_detect import backends, cli

    monkeypatch.setitem(backends.BACKENDS, "fake", f"{__name__}:FakeBackendCLI")
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": q.id, "question": q.text}) + "\n" for q in QS))
    for i in range(2):
        rc = cli.main(
            ["generate", "--backend", "fake", "--questions", str(qfile), "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"]
        )
        assert rc == 0
    assert cli.main(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]) == 0
    merged, _ = _rows(tmp_path / "m")
    assert sorted(merged) == sorted(q.id for q in QS)


class FakeBackendCLI(FakeBackend):
    def __init__(self, **kwargs):  # accepts whatever the CLI passes
        super().__init__()


# -- sampled answers and solutions travel with the merge ----------------------------------------------------

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "seed": 0, "max_new_tokens": 16, "n": 3}
QS_SOL = [Question(id=q.id, text=q.text, label=q.label, answer=str(2 * i)) for i, q in enumerate(QS)]


class FakeSampler(FakeBackend):
    """FakeBackend that also samples: answer k is a function of (question, k, twist)."""

    capabilities = frozenset({"output_logprobs", "samples"})

    def __init__(self, twist: int = 0, **kw):
        super().__init__(**kw)
        self.twist = twist

    def sample(self, requests, *, temperature, top_p, seed, max_new_tokens):
        from distill_detect.backends.base import Sampled

        return [Sampled(f"{q.text} #{k}{'!' * self.twist}", 2 + k, "stop") for q, k in requests]


def _gen_sampled(qs, run, sampling=SAMPLING, **kw):
    return generate_run(qs, run, lambda: FakeSampler(**kw), max_new_tokens=16, batch_size=4, sampling=sampling)


def _sampled(run):
    with TraceStore(run) as st:
        return (
            {t.id: (t.samples.texts, t.samples.num_tokens, t.solution) for t in st.traces(sampling=st.get_meta("sampling"))},
            st.sample_settings(),
            st.get_meta("sampling"),
        )


def test_merge_copies_samples_and_solutions(tmp_path):
    other = {**SAMPLING, "temperature": 0.5, "n": 2}
    for i in range(2):
        _gen_sampled(shard_questions(QS_SOL, i, 2), tmp_path / f"s{i}")
        _gen_sampled(shard_questions(QS_SOL, i, 2), tmp_path / f"s{i}", sampling=other)  # a second setting, stored apart
        _gen_sampled(shard_questions(QS_SOL, i, 2), tmp_path / f"s{i}")  # the first one is the latest request again
    _gen_sampled(QS_SOL, tmp_path / "single")
    _gen_sampled(QS_SOL, tmp_path / "single", sampling=other)
    _gen_sampled(QS_SOL, tmp_path / "single")
    s = merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m")
    assert s["samples"] == len(QS) * (3 + 2) and s["solutions"] == len(QS)
    merged, single = _sampled(tmp_path / "m"), _sampled(tmp_path / "single")
    assert merged[0] == single[0] and merged[2] == single[2] == SAMPLING
    assert sorted(map(str, merged[1])) == sorted(map(str, single[1]))  # both settings, each with its N
    assert merged[0]["q3"] == (("What is 3 plus 3? #0", "What is 3 plus 3? #1", "What is 3 plus 3? #2"), (2, 3, 4), "6")
    with TraceStore(tmp_path / "m") as st:
        by_other = st.samples(other)
        assert st.integrity_check() == [] and all(v.n == 2 for v in by_other.values()) and len(by_other) == len(QS)


def test_merge_keeps_identical_samples_once_and_refuses_conflicts(tmp_path):
    _gen_sampled(QS_SOL[:8], tmp_path / "a")
    _gen_sampled(QS_SOL[4:], tmp_path / "b")
    s = merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert s["samples"] == len(QS) * 3 and s["solutions"] == len(QS)

    _gen_sampled(QS_SOL[4:], tmp_path / "c", twist=1)  # same traces, fingerprint and seed; other answers for q4..q7
    with pytest.raises(ConfigError, match=r"question 'q4': sampled answer 0 \(temperature=1.0.*differs between"):
        merge_runs([tmp_path / "a", tmp_path / "c"], tmp_path / "m2")
    assert not (tmp_path / "m2" / "traces.sqlite").exists() or _rows(tmp_path / "m2")[0] == {}

    other_sol = [Question(id=q.id, text=q.text, label=q.label, answer="999") for q in QS[4:]]
    _gen_sampled(other_sol, tmp_path / "d")
    with pytest.raises(ConfigError, match="question 'q4' has a different solution"):
        merge_runs([tmp_path / "a", tmp_path / "d"], tmp_path / "m3")
    with pytest.raises(ConfigError, match="differs from the one already in"):  # into a run that holds other answers
        merge_runs([tmp_path / "c"], tmp_path / "m")
