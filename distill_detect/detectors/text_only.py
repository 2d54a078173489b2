"""Detectors that need only the text: for models behind APIs that return no log-probabilities.

Each is a pure function of one ``Trace``: its greedy answer ``output_text``, the answers
sampled at a temperature ``samples.texts`` (``GenConfig.samples``), and the benchmark's own
solution or final answer ``solution`` (from the question file). String distances come from
rapidfuzz (``pip install 'distill-detect[text]'``).

With g the greedy answer, s_1..s_N the sampled answers, r the benchmark's solution, ans(.) the
final answer extracted by ``final_answer`` (GSM8K '#### 42', MATH \\boxed{...}, else the last
number) and words(.) the word/punctuation tokens of ``words``:

    cdd(q)            = (1/N) * #{i : ED(words(s_i), words(g)) <= alpha * l},  l = max length in words over g, s_1..s_N
                        (output peakedness, CDD: Dong et al. 2024, "Generalization or Memorization: Data
                        Contamination and Trustworthy Evaluation for Large Language Models", arXiv:2402.15938;
                        ED = Levenshtein distance over tokens, alpha = 0.05; higher = member)
    answer_agree(q)   = (1/N) * #{i : ans(s_i) = ans(g) != none}        (higher = member)
    answer_correct(q) = 1 if ans(g) = ans(r) != none, else 0             (higher = member)
    sol_ngram(q)      = sum over word n-grams v of r of min(c_g(v), c_r(v)) / sum_v c_r(v)
                        (ROUGE-N recall of the solution's n-grams in the greedy answer, n = 3; higher = member)
    sol_edit(q)       = 1 - Lev(g, r) / max(|g|, |r|)   over characters (normalised edit similarity; higher = member)

CDD's intuition: a model trained on a question's answer reproduces it whatever the sampling
noise, so its samples pile up near the greedy answer. The answer scores read the same
peakedness through the final answers, which is coarser but robust to rewording. The solution
scores need the benchmark's worked solution (``response``); with only a final answer
(``answer``) use ``answer_correct``.
"""

from __future__ import annotations

import re
from collections import Counter

from distill_detect.detectors.checks import missing_message
from distill_detect.errors import ConfigError, DistillDetectError, require

_WORD = re.compile(r"\w+|[^\w\s]")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens: the unit of CDD's edit distance and of the n-grams.

    >>> words("Janet sells 9 eggs, $18.")
    ['janet', 'sells', '9', 'eggs', ',', '$', '18', '.']
    """
    return _WORD.findall(text.lower())


# -- final answers ------------------------------------------------------------------------------------


def _boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} or \\fbox{...} (braces balanced), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        rest = text[start + len("\\boxed") :].strip()
        return rest.split("$")[0].split()[0] if rest else None  # \boxed 5
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def normalize_answer(ans: str) -> str:
    """A canonical spelling, so '18', '$18.00' and '18 dollars'... compare equal when they are one number.

    >>> normalize_answer("$1,000.00"), normalize_answer("\\\\dfrac{1}{2}"), normalize_answer(" x = 3 ")
    ('1000', '\\\\frac{1}{2}', '3')
    """
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|!|,|;|:)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # 'x = 3' -> '3'
    s = s.rstrip(".").strip()
    num = s.replace(",", "").replace("$", "").rstrip("%").strip()
    try:
        v = float(num)
    except ValueError:
        return re.sub(r"\s+", "", s)
    return str(int(v)) if v == int(v) else repr(v)


def final_answer(text: str | None) -> str | None:
    """The final answer of a worked solution, normalised (``normalize_answer``); None when there is none.

    GSM8K's '#### 42', then MATH's last \\boxed{...}, then the last number in the text.

    >>> final_answer("so 2 * 9 = $18 per day\\n#### 18"), final_answer("the answer is $\\\\boxed{\\\\frac{3}{4}}$.")
    ('18', '\\\\frac{3}{4}')
    >>> final_answer("She pays 1,250 dollars."), final_answer("no digits here")
    ('1250', None)
    """
    if not text:
        return None
    m = re.findall(r"####\s*([^\n]+)", text)
    if m:
        return normalize_answer(m[-1])
    box = _boxed(text)
    if box is not None and box.strip():
        return normalize_answer(box)
    nums = _NUMBER.findall(text)
    return normalize_answer(nums[-1]) if nums else None


# -- what the detectors read ----------------------------------------------------------------------------


def _greedy(trace, method: str) -> str:
    if trace.output_text is None:
        raise DistillDetectError(missing_message(method, "output_text", trace.id))
    return trace.output_text


def _samples(trace, method: str) -> tuple[str, ...]:
    s = trace.samples
    if s is None:
        raise DistillDetectError(missing_message(method, "output_samples", trace.id))
    if not s.texts:
        raise DistillDetectError(
            f"method {method!r}: trace {trace.id!r} has no sampled answers; generate with --samples N (N >= 1)"
        )
    return s.texts


def _solution(trace, method: str) -> str:
    if not trace.solution:
        raise DistillDetectError(missing_message(method, "solution", trace.id))
    return trace.solution


def _levenshtein():
    return require("rapidfuzz.distance", "text", "The text-only methods (string distances)").Levenshtein


# -- the detectors -------------------------------------------------------------------------------------


def check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        a = float("nan")
    if isinstance(alpha, bool) or not (0.0 <= a <= 1.0):
        raise ConfigError(f"cdd alpha must be a fraction in [0, 1], got {alpha!r} (the paper uses 0.05): --param cdd.alpha=0.05")
    return a


def cdd(trace, *, alpha: float = 0.05) -> float:
    """Share of sampled answers within ``alpha * l`` word edits of the greedy answer (CDD's Peak; higher = member)."""
    a = check_alpha(alpha)
    samples = [words(s) for s in _samples(trace, "cdd")]
    g = words(_greedy(trace, "cdd"))
    lev = _levenshtein()
    l_max = max(len(g), *(len(s) for s in samples))
    limit = a * l_max
    return sum(lev.distance(s, g) <= limit for s in samples) / len(samples)


def answer_agree(trace) -> float:
    """Share of sampled answers whose final answer equals the greedy answer's (higher = member; 0 without one)."""
    samples = _samples(trace, "answer_agree")
    g = final_answer(_greedy(trace, "answer_agree"))
    if g is None:
        return 0.0
    return sum(final_answer(s) == g for s in samples) / len(samples)


def answer_correct(trace) -> float:
    """1 when the greedy answer's final answer equals the benchmark's, else 0 (higher = member)."""
    g = final_answer(_greedy(trace, "answer_correct"))
    r = final_answer(_solution(trace, "answer_correct"))
    return float(g is not None and g == r)


def ngram_recall(candidate: list[str], reference: list[str], n: int) -> float:
    """ROUGE-N recall: the share of ``reference``'s n-grams (with multiplicity) found in ``candidate``.

    >>> ngram_recall("a b c d".split(), "a b c e".split(), 2)  # {ab, bc} of {ab, bc, ce}
    0.6666666666666666
    """
    ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
    if not ref:
        return 0.0
    cand = Counter(tuple(candidate[i : i + n]) for i in range(len(candidate) - n + 1))
    return sum(min(c, cand[g]) for g, c in ref.items()) / sum(ref.values())


def check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"sol_ngram n must be an integer >= 1, got {n!r}: e.g. --param sol_ngram.n=3")
    return n


def sol_ngram(trace, *, n: int = 3) -> float:
    """Share of the solution's word n-grams that the greedy answer repeats (higher = member)."""
    k = check_n(n)
    return ngram_recall(words(_greedy(trace, "sol_ngram")), words(_solution(trace, "sol_ngram")), k)


def sol_edit(trace) -> float:
    """Normalised character edit similarity of the greedy answer and the solution, in [0, 1] (higher = member)."""
    g, r = _greedy(trace, "sol_edit"), _solution(trace, "sol_edit")
    return float(_levenshtein().normalized_similarity(g, r))
