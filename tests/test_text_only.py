"""The text-only detectors (detectors/text_only.py) against brute-force twins and hand-checked cases."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

pytest.importorskip("rapidfuzz", reason="the text-only methods need rapidfuzz: pip install 'distill-detect[text]'")

from distill_detect.detectors import REGISTRY, TEXT_ONLY, get  # noqa: E402
from distill_detect.detectors.text_only import final_answer, ngram_recall, words  # noqa: E402
from distill_detect.errors import ConfigError, DistillDetectError  # noqa: E402
from distill_detect.types import Samples, Trace  # noqa: E402


def trace(greedy, samples=None, solution=None, logprobs=None):
    s = None if samples is None else Samples(tuple(samples), temperature=1.0, top_p=1.0, seed=0, max_new_tokens=64)
    return Trace(id="t", output_logprobs=logprobs, output_text=greedy, samples=s, solution=solution)


# -- brute-force twins ----------------------------------------------------------------------------------


def lev(a, b) -> int:
    """Levenshtein distance by the textbook dynamic programme."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i, j in itertools.product(range(1, len(a) + 1), range(1, len(b) + 1)):
        d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]


def cdd_twin(greedy, samples, alpha):
    g = words(greedy)
    s = [words(x) for x in samples]
    ell = max([len(g)] + [len(x) for x in s])
    return np.mean([lev(x, g) <= alpha * ell for x in s])


def ngram_twin(cand, ref, n):
    grams = lambda w: [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]  # noqa: E731
    r, c = grams(ref), grams(cand)
    if not r:
        return 0.0
    used, hit = [False] * len(c), 0
    for g in r:  # each reference n-gram matched to at most one unused candidate n-gram
        for j, h in enumerate(c):
            if not used[j] and h == g:
                used[j], hit = True, hit + 1
                break
    return hit / len(r)


VOCAB = ["the", "answer", "is", "4", "5", ",", ".", "so", "we", "add"]


def sentence(rng, n):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


@pytest.mark.parametrize("seed", range(20))
def test_cdd_sol_ngram_sol_edit_match_brute_force(seed):
    rng = random.Random(seed)
    g = sentence(rng, rng.randint(0, 12))
    samples = [sentence(rng, rng.randint(0, 12)) for _ in range(rng.randint(1, 6))]
    sol = sentence(rng, rng.randint(0, 12))
    alpha = rng.choice([0.0, 0.05, 0.2, 0.5, 1.0])
    t = trace(g or "x", samples, sol or "y")
    assert get("cdd")(t, alpha=alpha) == pytest.approx(cdd_twin(t.output_text, samples, alpha))
    n = rng.randint(1, 4)
    assert get("sol_ngram")(t, n=n) == pytest.approx(ngram_twin(words(t.output_text), words(t.solution), n))
    a, b = t.output_text, t.solution
    assert get("sol_edit")(t) == pytest.approx(1 - lev(a, b) / max(len(a), len(b)))


def test_hand_checked_values():
    # cdd: greedy 10 words, alpha 0.1 -> within 1 edit; samples: identical (0), one word changed (1), very different
    g = "a b c d e f g h i j"
    t = trace(g, [g, "a b c d e f g h i x", "z y x w v u t s r q"])
    assert get("cdd")(t) == pytest.approx(1 / 3)  # alpha 0.05: 0.5 edits allowed, only the identical one
    assert get("cdd")(t, alpha=0.1) == pytest.approx(2 / 3)
    assert ngram_recall("a b c d".split(), "a b c e".split(), 2) == pytest.approx(2 / 3)
    t = trace("so 2 + 2 = 4\n#### 4", ["#### 4", "it is 4.", "it is 5", "nothing"], solution="2+2=4\n#### 4")
    assert get("answer_agree")(t) == pytest.approx(2 / 4) and get("answer_correct")(t) == 1.0
    assert get("answer_correct")(trace("the answer is 5", solution="4")) == 0.0
    assert get("answer_agree")(trace("no number", ["no number"])) == 0.0  # no final answer: nothing to agree on


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Janet sells 9 eggs at $2 each.\n#### 18", "18"),  # GSM8K's marker wins over later numbers
        ("so 2 * 9 = $<<2*9=18>>18 per day\nA: 18", "18"),  # bundled:gsm8k_gpt3's teacher traces
        ("#### 1,234", "1234"),
        ("The graph has $\\boxed{2}$ vertical asymptotes, not 3.", "2"),  # bundled:math_test
        ("$\\boxed{\\dfrac{1}{2}}$", "\\frac{1}{2}"),
        ("so $x = \\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("It costs 3.50 dollars, i.e. 7/2", "7/2"),
        ("The total is 12.0.", "12"),
        ("-5 degrees", "-5"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_bundled_sets_have_checkable_answers():
    """Every bundled set with a solution or answer gives a final answer for (nearly) every question."""
    import distill_detect as dd
    from distill_detect.api import QuestionSource

    for name in ("gsm8k_test", "gsm8k_gpt3", "math_test"):
        qs = QuestionSource(limit=200).load(f"bundled:{name}")
        got = [final_answer(q.solution) for q in qs]
        assert sum(a is not None for a in got) >= 0.98 * len(qs), name
    ans = {q.id: q.solution for q in QuestionSource(limit=5).load("bundled:gsm8k_test")}
    gpt3 = {q.id: q.solution for q in QuestionSource(limit=5).load("bundled:gsm8k_gpt3")}
    for qid in set(ans) & set(gpt3):  # the teacher's worked solution ends at the benchmark's answer
        assert final_answer(ans[qid]) == final_answer(gpt3[qid])
    assert dd.Question("a", "q", answer="7").solution == "7"


def test_missing_inputs_say_what_produces_them():
    with pytest.raises(DistillDetectError, match="--samples"):
        get("cdd")(trace("x"))
    with pytest.raises(DistillDetectError, match="'answer' field"):
        get("answer_correct")(trace("x"))
    with pytest.raises(ConfigError, match="cdd.alpha"):
        get("cdd")(trace("x", ["y"]), alpha=2)
    with pytest.raises(ConfigError, match="sol_ngram.n"):
        get("sol_ngram")(trace("x", solution="y"), n=0)


def test_registry_directions_and_needs():
    from distill_detect.backends.capabilities import required_capabilities
    from distill_detect.pipeline import TEXT_NEEDS, text_only_methods

    assert set(TEXT_ONLY) == set(text_only_methods())
    for m in TEXT_ONLY:
        det = REGISTRY[m]
        assert det.higher_is_member and det.needs <= TEXT_NEEDS
        assert required_capabilities(m) <= {"samples"}
    assert "output_logprobs" not in required_capabilities("cdd")


def test_text_only_trace_refuses_logprob_methods():
    from distill_detect.detectors import check_needs

    t = trace("greedy text", ["a"])
    assert t.num_tokens == 0 and not t.has_logprobs
    with pytest.raises(DistillDetectError, match="output_logprobs"):
        check_needs("tpd", [t])
    check_needs("cdd", [t])  # nothing missing
    with pytest.raises(ValueError, match="text"):
        Trace(id="x", output_logprobs=None)


# -- the question file's answer and response ---------------------------------------------------------------


def test_numeric_answer_and_response_are_read_as_text(tmp_path):
    import json

    from distill_detect.data import load_questions

    f = tmp_path / "q.jsonl"
    rows = [
        {"id": "a", "question": "6*7?", "answer": 42},
        {"id": "b", "question": "5/2?", "answer": 2.5, "response": "5 / 2 = 2.5\n#### 2.5"},
        {"id": "c", "question": "9*9?", "answer": 81.0, "response": 81},
        {"id": "d", "question": "none?", "answer": None},
        {"id": "e", "question": "blank?", "answer": "  "},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qs = {q.id: q for q in load_questions(f)}
    assert [qs[i].answer for i in "abcde"] == ["42", "2.5", "81", None, None]
    assert qs["c"].response == "81" and qs["b"].solution.endswith("#### 2.5") and qs["a"].solution == "42"
    assert get("answer_correct")(trace("so 6 * 7 = 42", solution=qs["a"].solution)) == 1.0


@pytest.mark.parametrize(
    "field, value, why",
    [
        ("answer", [42], "must be text or a number, got list"),
        ("answer", {"text": "42"}, "must be text or a number, got dict"),
        ("answer", True, "must be text or a number, got bool"),
        ("response", ["a", "b"], "must be text or a number, got list"),
        ("answer", float("nan"), "must be text or a finite number, got nan"),
    ],
)
def test_other_answer_types_are_refused_by_line(tmp_path, field, value, why):
    import json

    from distill_detect.data import load_questions
    from distill_detect.errors import InputError

    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "fine", "answer": "1"}) + "\n" + json.dumps({"question": "bad", field: value}) + "\n")
    with pytest.raises(InputError) as info:
        load_questions(f)
    msg = str(info.value)
    assert msg == f"{f}:2: field '{field}': {why}" and "\n" not in msg
