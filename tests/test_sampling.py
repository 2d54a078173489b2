"""Sampled answers for the text-only methods: every backend's ``sample``, stored with the run.

* the sampler (``base.sample_from_logits``, the hf backend's torch twin) against a brute-force draw;
* hf on the tiny random Llama: deterministic for a seed, independent of the batch, greedy untouched;
* the store: resumable (a second run generates nothing), counted once, N extends, another setting
  is stored separately and chosen by flags, ``score`` reads the samples without a model;
* ``run``/``audit --methods <text-only>`` end to end, refusals before any model time;
* the openai backend with log-probabilities off against a stand-in server (``n`` per request
  where honoured, else one request per answer).
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import warnings
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
from stand_ins import JSONHandler, run_cli

pytest.importorskip("rapidfuzz", reason="the text-only methods need rapidfuzz: pip install 'distill-detect[text]'")

import distill_detect as dd  # noqa: E402
from distill_detect import api  # noqa: E402
from distill_detect.backends.base import sample_from_logits, sample_seed  # noqa: E402
from distill_detect.errors import ConfigError  # noqa: E402
from distill_detect.store import TraceStore  # noqa: E402
from distill_detect.types import GenConfig, Question  # noqa: E402

MAX_NEW = 6


def _main(argv):
    return run_cli(argv, show_warnings=False)


def _questions(n=4, start=0):
    return [
        Question(f"q{i}", f"What is {i} plus {i}?", response=f"{i} + {i} = {2 * i}\n#### {2 * i}")
        for i in range(start, start + n)
    ]


def _model(tiny_dir):
    return dd.ModelSettings(model=str(tiny_dir), dtype="float32", device="cpu")


# -- the sampler ------------------------------------------------------------------------------------------


def brute_sample(logits, u, temperature, top_p):
    """The definition, one token at a time: sort by probability (ties by id), cut at top_p, walk the CDF."""
    p = np.exp(np.asarray(logits, np.float64) / temperature)
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += p[i]
    total = sum(p[i] for i in kept)
    acc = 0.0
    for i in kept:
        acc += p[i]
        if acc > u * total:
            return i
    return kept[-1]


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 0.05])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampler_matches_brute_force_and_torch_twin(tiny_backend, temperature, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(64, 11)).astype(np.float32)
    logits[:, 3] = logits[:, 5]  # ties
    u = rng.random(64)
    got = sample_from_logits(logits, u, temperature, top_p)
    want = [brute_sample(x, ui, temperature, top_p) for x, ui in zip(logits, u)]
    assert got.tolist() == want

    class Fixed:  # the hf backend's torch sampler, fed the same uniforms
        def __init__(self, v):
            self.v = v

        def random(self):
            return self.v

    torch = tiny_backend.torch
    pick = tiny_backend._sampler([Fixed(x) for x in u], temperature, top_p)
    assert pick(torch.tensor(logits), torch.arange(64)).tolist() == want


def test_sampler_draws_the_softmax_distribution():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    u = np.random.default_rng(1).random(20000)
    draws = sample_from_logits(np.repeat(logits, len(u), 0), u, 1.0, 1.0)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert np.abs(np.bincount(draws, minlength=4) / len(u) - p).max() < 0.01


# -- hf on the tiny model -----------------------------------------------------------------------------------


def test_hf_sampling_deterministic_batch_independent_greedy_untouched(tiny_backend):
    qs = _questions(2)
    greedy_before = tiny_backend.generate(qs, max_new_tokens=MAX_NEW)
    kw = dict(temperature=1.0, top_p=1.0, seed=3, max_new_tokens=MAX_NEW)
    reqs = [(qs[0], 0), (qs[0], 1), (qs[1], 0), (qs[1], 1)]
    a = tiny_backend.sample(reqs, **kw)
    assert a == tiny_backend.sample(reqs, **kw)  # same seed, same answers
    assert tiny_backend.sample([reqs[2]], **kw) == [a[2]]  # alone or in a batch: the same answer
    assert len({s.text for s in a}) > 1 and all(0 < s.num_tokens <= MAX_NEW for s in a)
    assert tiny_backend.sample(reqs, **{**kw, "seed": 4}) != a
    greedy_after = tiny_backend.generate(qs, max_new_tokens=MAX_NEW)
    for x, y in zip(greedy_before, greedy_after):
        assert np.array_equal(x.output_ids, y.output_ids) and np.array_equal(x.output_logprobs, y.output_logprobs)


# -- the store: resumable, counted once, settings kept apart --------------------------------------------------


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("sampled")
    gen = GenConfig(max_new_tokens=MAX_NEW, samples=3, batch_size=4)
    first = api.generate(_questions(), d / "run", model=_model(tiny_dir), gen=gen)
    return {"dir": d, "run": d / "run", "gen": gen, "first": first}


def test_sampling_is_stored_once_and_resumes(sampled_run, tiny_dir, monkeypatch):
    s = sampled_run["first"]
    assert s["generated"] == 4 and s["samples_generated"] == 12 and s["sample_tokens"] > 0
    import distill_detect.backends as B

    monkeypatch.setattr(B, "make_backend", lambda *a, **k: pytest.fail("a finished run must not load the model"))
    again = api.generate(_questions(), sampled_run["run"], model=_model(tiny_dir), gen=sampled_run["gen"])
    assert again["generated"] == 0 and again["samples_generated"] == 0 and again["samples_already_done"] == 12
    with TraceStore(sampled_run["run"]) as st:
        assert st.sample_counts()["samples"] == 12
        assert st.solutions()["q2"].endswith("#### 4")


def test_samples_do_not_change_greedy_traces(sampled_run, tiny_dir, tmp_path):
    api.generate(_questions(), tmp_path / "plain", model=_model(tiny_dir), gen=GenConfig(max_new_tokens=MAX_NEW, batch_size=4))
    with TraceStore(tmp_path / "plain") as a, TraceStore(sampled_run["run"]) as b:
        plain, sampled = list(a.traces()), list(b.traces())
        assert a.get_meta("fingerprint") == b.get_meta("fingerprint")  # sampling is keyed apart from the run's fingerprint
    for x, y in zip(plain, sampled):
        assert np.array_equal(x.output_ids, y.output_ids) and np.array_equal(x.output_logprobs, y.output_logprobs)


def test_more_samples_and_another_setting_are_stored_separately(sampled_run, tiny_dir):
    run = sampled_run["run"]
    with TraceStore(run) as st:
        before = st.samples(sampled_run["gen"].sampling())
    more = api.generate(_questions(), run, model=_model(tiny_dir), gen=GenConfig(max_new_tokens=MAX_NEW, samples=5, batch_size=4))
    assert more["samples_generated"] == 8 and more["generated"] == 0  # only answers 3 and 4 of each question
    cold = GenConfig(max_new_tokens=MAX_NEW, samples=2, temperature=0.5, batch_size=4)
    other = api.generate(_questions(), run, model=_model(tiny_dir), gen=cold)
    assert other["samples_generated"] == 8
    with TraceStore(run) as st:
        after = st.samples(sampled_run["gen"].sampling())
        settings = st.sample_settings()
    assert {s["temperature"]: s["n"] for s in settings} == {1.0: 5, 0.5: 2}
    for qid, s in before.items():
        assert after[qid].texts[:3] == s.texts  # earlier answers kept, N = 3 is a prefix of N = 5
        assert after[qid].first(3).texts == s.texts

    # score reads the latest request by default, another one by its flags, N by --samples; without a model
    res = api.score(run, methods="cdd,answer_agree", out=None)
    assert {t.samples.temperature for t in res.traces} == {0.5} and res.traces[0].samples.n == 2
    res = api.score(run, methods="cdd", temperature=1.0, samples=4)
    assert res.traces[0].samples.n == 4 and res.config["source"]["sampling"]["temperature"] == 1.0
    with pytest.raises(ConfigError, match="--temperature"):
        api.score(run, methods="cdd", sample_seed=0)  # matches both settings
    with pytest.raises(ConfigError, match="no answers sampled with temperature 0.7"):
        api.score(run, methods="cdd", temperature=0.7)


def test_score_cli_from_stored_samples_without_a_model(sampled_run, monkeypatch, tmp_path):
    import distill_detect.backends as B

    monkeypatch.setattr(B, "make_backend", lambda *a, **k: pytest.fail("score must not load a model"))
    out = tmp_path / "scored"
    rc, stdout, err = _main(["score", "--run", str(sampled_run["run"]), "--out", str(out), "--no-report",
                             "--methods", "cdd,answer_agree,answer_correct,sol_ngram,sol_edit", "--temperature", "1.0", "--samples", "3"])  # fmt: skip
    assert rc == 0, err
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(0.0 <= r["cdd"] <= 1.0 and r["answer_correct"] in (0.0, 1.0) for r in rows)
    rc, _, err = _main(["score", "--traces", str(out / "scores.jsonl"), "--out", str(tmp_path / "x"), "--samples", "3"])
    assert rc == 2 and "--run RUN" in err


def test_methods_without_their_inputs_are_refused_before_model_time(tmp_path, monkeypatch):
    import distill_detect.backends as B

    monkeypatch.setattr(B, "make_backend", lambda *a, **k: pytest.fail("refused before any model"))
    m, n = tmp_path / "m.jsonl", tmp_path / "n.jsonl"
    m.write_text(json.dumps({"id": "a", "question": "1+1?"}) + "\n")
    n.write_text(json.dumps({"id": "b", "question": "2+2?"}) + "\n")
    base = ["run", "--members", str(m), "--nonmembers", str(n), "--out", str(tmp_path / "o")]
    rc, _, err = _main(base + ["--methods", "cdd"])
    assert rc == 2 and "--samples N" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _main(base + ["--methods", "tpd,cdd", "--samples", "2", "--no-logprobs"])
    assert rc == 2 and "tpd" in err and "cdd, answer_agree" in err
    rc, _, err = _main(base + ["--methods", "cdd", "--samples", "-1"])
    assert rc == 2 and "--samples" in err
    rc, _, err = _main(base + ["--methods", "cdd", "--samples", "2", "--temperature", "0"])
    assert rc == 2 and "--temperature" in err


def test_run_with_text_only_methods_end_to_end(tiny_dir, tmp_path):
    res = api.run(_questions(3), _questions(3, start=3), out=tmp_path / "r", model=_model(tiny_dir),
                  methods="tpd,cdd,answer_agree,answer_correct,sol_ngram,sol_edit",
                  gen=GenConfig(max_new_tokens=MAX_NEW, samples=2, batch_size=6), bootstrap=50)  # fmt: skip
    assert set(res.metrics) == {"tpd", "cdd", "answer_agree", "answer_correct", "sol_ngram", "sol_edit"}
    assert all(t.samples.n == 2 for t in res.traces)
    assert res.config["source"]["sampling"]["n"] == 2
    assert (tmp_path / "r" / "report.html").exists()


def test_audit_with_a_text_only_method(tiny_dir, tmp_path):
    bench = tmp_path / "bench.jsonl"
    ref = tmp_path / "ref.jsonl"
    bench.write_text(
        "".join(json.dumps({"id": f"b{i}", "question": f"Bench question {i}: what is {i}*3?"}) + "\n" for i in range(6))
    )
    ref.write_text(
        "".join(json.dumps({"id": f"r{i}", "question": f"Reference question {i}: what is {i}*7?"}) + "\n" for i in range(20))
    )
    out = tmp_path / "audit"
    argv = ["audit", "--model", str(tiny_dir), "--questions", str(bench), "--reference", str(ref), "--out", str(out),
            "--methods", "cdd", "--samples", "2", "--max-new-tokens", str(MAX_NEW), "--bootstrap", "50", "--no-report"]  # fmt: skip
    rc, stdout, err = _main(argv)
    assert rc == 0, err
    doc = json.loads((out / "audit.json").read_text())
    assert doc["method"] == "cdd" and doc["higher_is_member"] is True and len(doc["questions"]) == 6
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 26 and all(0.0 <= r["cdd"] <= 1.0 for r in rows)
    chosen = {"temperature": 1.0, "top_p": 1.0, "seed": 0, "max_new_tokens": MAX_NEW, "n": 2}
    sets = json.loads((out / "audit_sets.json").read_text())
    assert sets["sampling"] == chosen and doc["source"]["sampling"] == chosen

    # The run samples another setting later (its latest request now): the audit keeps reading the answers it chose.
    later = ["generate", "--model", str(tiny_dir), "--questions", str(bench), "--out", str(out / "run"), "--samples", "2",
             "--sample-seed", "7", "--max-new-tokens", str(MAX_NEW)]  # fmt: skip
    assert _main(later)[0] == 0
    with TraceStore(out / "run") as st:
        assert st.get_meta("sampling")["seed"] == 7
        ours, theirs = st.samples(chosen), st.samples({**chosen, "seed": 7})
    assert any(ours[i].texts != theirs[i].texts for i in theirs)
    from distill_detect.auditing import audit_from

    again = audit_from(out, out=tmp_path / "again", report=False)
    assert json.loads((tmp_path / "again" / "audit_sets.json").read_text())["sampling"] == chosen
    assert [r["raw_score"] for r in again.doc["questions"]] == [r["raw_score"] for r in doc["questions"]]


# -- the openai backend with log-probabilities off, against a stand-in server -----------------------------------


class Stand:
    def __init__(self):
        self.requests: list[dict] = []
        self.honour_n = True
        self.lock = threading.Lock()


def _handler(state: Stand):
    class H(JSONHandler):
        def do_GET(self):
            self._send({"object": "list", "data": [{"id": "text-model", "object": "model", "created": 0, "owned_by": "me"}]})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            with state.lock:
                state.requests.append(req)
            n = int(req.get("n") or 1) if state.honour_n else 1
            if float(req.get("temperature") or 0) == 0:
                texts = ["The answer is 4."]
            else:  # what a seeded sampler would give: a function of the seed (and the choice's index)
                texts = [f"I think it is {req.get('seed', 0) % 7 + i}." for i in range(n)]
            chat = self.path.endswith("/chat/completions")
            choices = [
                {
                    "index": i,
                    "finish_reason": "stop",
                    "logprobs": None,
                    **({"message": {"role": "assistant", "content": t}} if chat else {"text": t}),
                }  # fmt: skip
                for i, t in enumerate(texts)
            ]
            used = 6 * len(texts)  # a server's token count of its answers (6 each here)
            self._send({"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                        "model": "text-model", "choices": choices,
                        "usage": {"prompt_tokens": 9, "completion_tokens": used, "total_tokens": 9 + used}})  # fmt: skip

    return H


@pytest.fixture()
def stand():
    pytest.importorskip("openai", reason="the openai backend needs the 'openai' package")
    state = Stand()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("honour_n", [True, False])
def test_openai_without_logprobs(stand, default_dir, tmp_path, honour_n):
    stand.honour_n = honour_n
    q = tmp_path / "q.jsonl"
    q.write_text(
        "".join(json.dumps({"id": f"c{i}", "question": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(3))
    )
    argv = ["generate", "--questions", str(q), "--out", str(tmp_path / "run"), "--backend", "openai", "--base-url", stand.url,
            "--model", "text-model", "--endpoint", "chat", "--no-logprobs", "--samples", "3", "--batch-size", "6",
            "--max-new-tokens", "16", "--concurrency", "2"]  # fmt: skip
    rc, _, err = _main(argv)
    assert rc == 0, err
    assert "3 generated now (18 tokens" in err  # the server's counts of the text-only answers, not 0
    greedy = [r for r in stand.requests if not r.get("temperature")]
    sampled = [r for r in stand.requests if r.get("temperature")]
    assert all("logprobs" not in r and "top_logprobs" not in r for r in stand.requests)  # never asked for
    assert len(greedy) == 3
    if honour_n:
        assert len(sampled) == 3 and all(r["n"] == 3 for r in sampled)  # one request per question
    else:  # the first request of each concurrent group finds n ignored; then one request per answer, each seeded
        singles = [r for r in sampled if "n" not in r]
        assert len(singles) == 9 and {r["seed"] for r in singles} == {
            sample_seed(0, f"c{i}", k) % 2**31 for i in range(3) for k in range(3)
        }
    with TraceStore(tmp_path / "run") as st:
        fp = st.get_meta("fingerprint")
        traces = list(st.traces(sampling=st.get_meta("sampling")))
    assert fp["logprobs"] is False
    assert all(t.output_logprobs is None and t.output_text == "The answer is 4." and t.samples.n == 3 for t in traces)
    assert [t.num_tokens for t in traces] == [6, 6, 6]  # stored and read back
    assert traces[2].solution == "4"

    rc, _, err = _main(["generate", *argv[1:]])  # again: nothing to ask the server
    n_before = len(stand.requests)
    assert rc == 0 and len(stand.requests) == n_before

    res = api.score(tmp_path / "run", methods="cdd,answer_agree,answer_correct")
    assert res.raw["answer_correct"].tolist() == [0.0, 0.0, 1.0]  # greedy says 4: right for c2 only
    # exported, the text-only run scores the same from the traces file (answers, samples, solutions travel)
    rc, _, err = _main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "t.jsonl")])
    assert rc == 0, err
    again = api.score(tmp_path / "t.jsonl", methods="cdd,answer_agree,answer_correct")
    for m in ("cdd", "answer_agree", "answer_correct"):
        assert again.raw[m].tolist() == res.raw[m].tolist(), m
    rc, _, err = _main(["score", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "s"), "--methods", "tpd"])
    assert rc == 2 and "output_logprobs" in err


def test_openai_text_only_refuses_logprob_methods_naming_what_is_left(stand, tmp_path):
    from distill_detect.backends.capabilities import check_methods
    from distill_detect.backends.openai import OpenAIBackend

    be = OpenAIBackend("text-model", base_url=stand.url, endpoint="chat", logprobs=False, max_retries=0)
    with pytest.raises(ConfigError, match=r"--no-logprobs.*cdd, answer_agree, answer_correct, sol_ngram, sol_edit"):
        check_methods(be, ["tpd", "cdd"])
    check_methods(be, ["cdd", "answer_correct"])
    t = be.generate([Question("a", "hi")], max_new_tokens=8)[0]
    assert t.output_logprobs is None and t.output_text == "The answer is 4." and be.fingerprint()["logprobs"] is False


def test_no_logprobs_is_refused_on_local_backends(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="--no-logprobs is for"):
        api.generate(_questions(1), tmp_path / "r", model=_model(tiny_dir),
                     gen=GenConfig(max_new_tokens=4, samples=1, logprobs=False), methods=["cdd"])  # fmt: skip


def test_black_box_benchmark_quick(tmp_path):
    """``benchmarks/black_box.py --quick``: the measurement's machinery on a tiny random model (not its numbers)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "black_box.py"
    spec = importlib.util.spec_from_file_location("black_box_script", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mod.main(["--quick", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "res")]) == 0
    doc = json.loads((tmp_path / "res" / "black_box_quick.json").read_text())
    rows = {(r["n"], r["method"]) for r in doc["rows"]}
    assert rows == {(n, m) for n in (1, 2) for m in (*mod.TEXT_METHODS, "tpd")}
    costs = {r["n"]: r["sample_tokens_per_q"] for r in doc["rows"] if r["method"] == "cdd"}
    assert 0 < costs[1] <= costs[2] and doc["generation"]["samples_generated"] == 16
    assert "| cdd |" in (tmp_path / "res" / "black_box_quick.md").read_text()


def test_no_logprobs_builds_the_backend_text_only_before_any_request(stand, default_dir):
    """``--no-logprobs`` reaches the backend's constructor: not even the start-up echo probe asks for log-probabilities."""
    settings = dd.ModelSettings(model="text-model", backend="openai", base_url=stand.url, tokenizer=str(default_dir))
    be = settings.factory(GenConfig(logprobs=False, samples=2), ["cdd"])()
    assert be.logprobs is False and be.capabilities == frozenset({"samples"}) and not be.want_prompt_logprobs
    be.generate([Question("a", "hi")], max_new_tokens=8)
    assert stand.requests and all("logprobs" not in r and "echo" not in r for r in stand.requests)
    with_lp = settings.factory(GenConfig(samples=2), ["tpd"])
    from distill_detect.backends.openai import NoLogprobsError

    with pytest.raises(NoLogprobsError, match="pass --no-logprobs"):
        with_lp().generate([Question("a", "hi")], max_new_tokens=8)  # the stand-in returns none: that needs --no-logprobs


def test_text_only_audit_prints_no_misleading_warning(stand, default_dir, tmp_path, capsys):
    from distill_detect.cli import main

    bench, ref = tmp_path / "bench.jsonl", tmp_path / "ref.jsonl"
    bench.write_text(
        "".join(json.dumps({"id": f"b{i}", "question": f"Bench {i}: {i}*3?", "answer": 3 * i}) + "\n" for i in range(4))
    )
    ref.write_text(
        "".join(json.dumps({"id": f"r{i}", "question": f"Ref {i}: {i}*7?", "answer": 7 * i}) + "\n" for i in range(20))
    )
    argv = ["audit", "--backend", "openai", "--base-url", stand.url, "--model", "text-model", "--tokenizer", str(default_dir),
            "--no-logprobs", "--questions", str(bench), "--reference", str(ref), "--out", str(tmp_path / "audit"),
            "--methods", "cdd", "--samples", "2", "--max-new-tokens", "16", "--bootstrap", "20", "--no-report"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    said = [str(w.message) for w in caught] + (out + err).splitlines()
    assert not [x for x in said if "TPD" in x or "0 tokens" in x or "no generated tokens" in x], said
    assert "text only" in err and "sampled 48 answers" in err
    assert all("logprobs" not in r and "echo" not in r for r in stand.requests)
