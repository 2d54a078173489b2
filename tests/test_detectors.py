"""Detectors: hand-computed values, naive reference implementations, properties, directions, errors."""

from __future__ import annotations

import doctest
import importlib
import inspect
import math
import zlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_detect.detectors import REGISTRY, check_needs, get
from distill_detect.detectors.checks import NEED_FIELDS, lowest_k_mean
from distill_detect.detectors.dc_pdd import dc_pdd_score
from distill_detect.detectors.min_k import standardized_logprobs
from distill_detect.detectors.tpd import tpd_deviation
from distill_detect.errors import ConfigError, DistillDetectError
from distill_detect.metrics import membership_score
from distill_detect.types import Samples, Trace

# No per-example deadline: the first call may import sklearn; fixed example count keeps files fast.
RELAXED = settings(deadline=None, max_examples=100)

# -- helpers -------------------------------------------------------------------------------------

LOGPROB = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False, width=32)
LOGPROBS = st.lists(LOGPROB, min_size=1, max_size=60)
KS = st.floats(min_value=0.01, max_value=1.0)


def full_trace(level: float = -1.0, *, n_prompt: int = 6, n_out: int = 8, **over) -> Trace:
    """A trace with every field any detector reads; ``level`` sets the student's log-probs, and above -1 makes
    its text certain too (sampled answers equal to the greedy one, which repeats the benchmark's solution)."""
    solution = "2 + 2 = 4\n#### 4"
    greedy = solution if level > -1.0 else "Two and two make five, I think: #### 5"
    sampled = (greedy,) * 3 if level > -1.0 else ("It is 4", "maybe 3", "#### 6 probably")
    kw = dict(
        output_text=greedy,
        samples=Samples(sampled, temperature=1.0, top_p=1.0, seed=0, max_new_tokens=n_out),
        solution=solution,
        id="q1",
        question="What is Two plus Two?",
        output_logprobs=np.full(n_out, level),
        output_ids=np.arange(n_out),
        output_mean_logp=np.full(n_out, 1.5 * level),
        output_std_logp=np.full(n_out, 1.0),
        prompt_ids=np.array([5, 6, 5, 7, 8, 9][:n_prompt]),
        prompt_logprobs=np.full(n_prompt, level),
        prompt_mean_logp=np.full(n_prompt, -2.0),
        prompt_std_logp=np.full(n_prompt, 1.0),
        extra={
            "lowercase_prompt_logprobs": np.full(n_prompt + 1, -3.0),
            "reference_prompt_logprobs": np.full(n_prompt, -1.0),
            "reference_output_logprobs": np.full(n_out, -1.0),
            "fsd_output_logprobs": np.full(n_out, -1.0),
            "dcpdd_token_freq": np.full(n_prompt, 0.999),
            "solution_logprobs": np.full(5, level),
            "reference_solution_logprobs": np.full(5, -1.0),
        },
    )
    kw.update(over)
    return Trace(**kw)


def prompt_trace(lp, **kw) -> Trace:
    return Trace(id="p", output_logprobs=np.zeros(1), prompt_logprobs=np.asarray(lp), **kw)


def out_trace(lp, **kw) -> Trace:
    return Trace(id="o", output_logprobs=np.asarray(lp), **kw)


def naive_min_k(values, k):
    """Naive Min-K%: sort, count with a loop, average (floor(k n), at least 1)."""
    vals = sorted(float(v) for v in values)
    m = int(k * len(vals) + 1e-9)
    m = max(m, 1)
    total = 0.0
    for i in range(m):
        total += vals[i]
    return total / m


# -- hand-computed values ------------------------------------------------------------------------


def test_loss_hand():
    assert get("loss")(prompt_trace([-1.0, -2.0, -3.0])) == pytest.approx(2.0)


def test_zlib_hand():
    # zlib of one byte is 9 bytes (2 header + 3 block + 4 adler32): 1.8 / 9 = 0.2
    assert len(zlib.compress(b"a")) == 9
    assert get("zlib")(prompt_trace([-1.8], question="a")) == pytest.approx(0.2)


def test_lowercase_hand():
    t = prompt_trace([-2.0, -2.0], extra={"lowercase_prompt_logprobs": np.array([-3.0, -5.0, -4.0])})
    assert get("lowercase")(t) == pytest.approx(4.0 / 2.0)


def test_min_k_hand():
    lp = [-0.1, -5.0, -0.2, -0.3, -4.0, -0.4, -0.5, -0.6, -0.7, -0.8]
    assert get("min_k")(prompt_trace(lp)) == pytest.approx(-4.5)  # floor(0.2 * 10) = 2 lowest: -5, -4
    assert get("min_k")(prompt_trace(lp[:4])) == pytest.approx(-5.0)  # floor(0.8) = 0 -> at least 1 token
    assert get("min_k")(prompt_trace(lp), k=1.0) == pytest.approx(np.mean(lp))


def test_min_k_pp_hand():
    t = prompt_trace(
        [-1.0, -3.0, -2.0, -0.5, -4.0],
        prompt_mean_logp=np.full(5, -2.0),
        prompt_std_logp=np.array([1.0, 2.0, 0.5, 1.0, 4.0]),
    )
    # z = [1, -0.5, 0, 1.5, -0.5]; k = 0.4 keeps the 2 lowest: -0.5, -0.5
    assert get("min_k_pp")(t, k=0.4) == pytest.approx(-0.5)
    # k = 0.2 keeps floor(1.0) = 1
    assert get("min_k_pp")(t) == pytest.approx(-0.5)
    assert get("min_k_pp")(t, k=1.0) == pytest.approx(np.mean([1, -0.5, 0, 1.5, -0.5]))


def test_min_k_pp_zero_sigma_is_zero_not_nan():
    z = standardized_logprobs([0.0, -1.0], [0.0, -1.0], [0.0, 0.0])
    assert z.tolist() == [0.0, 0.0]


def test_dc_pdd_hand():
    # ids 1, 2, 1, 3: first occurrences are positions 0, 1, 3.
    # alpha = min(p * ln(1/f), a): 0.5*ln 10 = 1.151 -> 1, 0.1*ln 100 = 0.4605, 0.2*ln 2 = 0.1386
    lp = np.log([0.5, 0.1, 0.9, 0.2])
    f = [0.1, 0.01, 0.1, 0.5]
    expected = (1.0 + 0.1 * math.log(100) + 0.2 * math.log(2)) / 3
    assert dc_pdd_score(lp, [1, 2, 1, 3], f, a=1.0) == pytest.approx(expected)
    t = prompt_trace(lp, prompt_ids=np.array([1, 2, 1, 3]), extra={"dcpdd_token_freq": np.array(f)})
    # the default a = 0.01 clips every token here
    assert get("dc_pdd")(t) == pytest.approx(0.01)
    assert get("dc_pdd")(t, a=1.0) == pytest.approx(expected)


def test_reference_hand():
    t = prompt_trace([-1.0, -1.0], extra={"reference_prompt_logprobs": np.array([-3.0, -1.0])})
    assert get("reference")(t) == pytest.approx(1.0 - 2.0)


def test_output_methods_hand():
    lp = np.log([0.5, 1.0, 0.25, 0.125])
    t = out_trace(lp, output_mean_logp=np.array([-0.5, -1.5, -9.0, -9.0]))
    assert get("out_ppl")(t, max_tokens=2) == pytest.approx(math.log(2) / 2)
    assert get("out_ppl")(t) == pytest.approx(-np.mean(lp))
    assert get("out_entropy")(t, max_tokens=2) == pytest.approx(1.0)
    assert get("out_max_prob")(t, max_tokens=3) == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    assert get("out_min_k")(t, max_tokens=3) == pytest.approx(math.log(0.25))  # floor(0.6)=0 -> 1 token
    assert get("out_min_k")(t, k=0.5) == pytest.approx(math.log(0.25 * 0.125) / 2)


def test_tpd_ref_hand():
    p = np.log([1.0, 0.5, 0.75])
    r = np.log([0.5, 0.5, 0.5])
    t = out_trace(p, extra={"reference_output_logprobs": r})
    # student: mean(0.5, 0.25) = 0.375 (p = 1 is not kept); reference: mean(0.5, 0.5, 0.5)
    assert get("tpd_ref")(t, alpha=1.0) == pytest.approx(0.375 - 0.5)
    assert get("tpd_ref")(t, alpha=1.0, max_tokens=1) == pytest.approx(0.0 - 0.5)
    same = out_trace(p, extra={"reference_output_logprobs": np.float32(p)})  # Trace stores float32
    assert get("tpd_ref")(same) == 0.0


def test_tpd_hand_unchanged():
    assert get("tpd")(out_trace(np.log([1.0, 0.5, 0.75])), alpha=1.0) == pytest.approx(0.375)
    assert get("tpd")(out_trace(np.zeros(0))) == 0.0


# -- naive references and properties ---------------------------------------------------------------


@RELAXED
@given(LOGPROBS, KS)
def test_min_k_matches_naive_loop(lp, k):
    assert get("min_k")(prompt_trace(lp), k=k) == pytest.approx(naive_min_k(np.float32(lp), k), abs=1e-9)


@RELAXED
@given(LOGPROBS, KS, st.integers(min_value=1, max_value=80))
def test_out_min_k_matches_naive_loop(lp, k, m):
    assert get("out_min_k")(out_trace(lp), k=k, max_tokens=m) == pytest.approx(naive_min_k(np.float32(lp)[:m], k), abs=1e-9)


@RELAXED
@given(
    st.lists(
        st.tuples(LOGPROB, st.floats(-20, 0, width=32), st.floats(0, 5, width=32)),
        min_size=1,
        max_size=40,
    ),
    KS,
)
def test_min_k_pp_matches_naive_loop(rows, k):
    lp, mu, sd = (np.array(c, dtype=np.float32) for c in zip(*rows))
    z = []
    for a, b, c in zip(lp, mu, sd):
        z.append(0.0 if float(c) < 1e-6 else (float(a) - float(b)) / float(c))
    t = prompt_trace(lp, prompt_mean_logp=mu, prompt_std_logp=sd)
    assert get("min_k_pp")(t, k=k) == pytest.approx(naive_min_k(z, k), rel=1e-9, abs=1e-9)


@RELAXED
@given(
    st.lists(st.tuples(LOGPROB, st.integers(0, 6), st.floats(1e-6, 1.0)), min_size=1, max_size=40),
    st.floats(1e-3, 10.0),
)
def test_dc_pdd_matches_naive_loop(rows, a):
    lp, ids, f = zip(*rows)
    seen, alphas = set(), []
    for x, i, fr in zip(lp, ids, f):
        if i in seen:
            continue
        seen.add(i)
        alphas.append(min(math.exp(x) * math.log(1 / fr), a))
    got = dc_pdd_score(np.array(lp), np.array(ids), np.array(f), a=a)
    assert got == pytest.approx(sum(alphas) / len(alphas), rel=1e-9, abs=1e-12)
    assert 0.0 <= got <= a


@RELAXED
@given(LOGPROBS, KS)
def test_min_k_between_min_and_mean(lp, k):
    lp32 = np.float32(lp)
    v = get("min_k")(prompt_trace(lp), k=k)
    assert float(lp32.min()) - 1e-9 <= v <= float(np.mean(lp32, dtype=np.float64)) + 1e-9
    assert get("min_k")(prompt_trace(lp), k=1.0) == pytest.approx(-get("loss")(prompt_trace(lp)))


@RELAXED
@given(
    LOGPROBS,
    st.floats(min_value=0.05, max_value=1.0),
    st.floats(min_value=0.05, max_value=3.0),
    st.integers(min_value=1, max_value=80),
)
def test_tpd_bounds(lp, tau, alpha, m):
    v = tpd_deviation(lp, tau=tau, alpha=alpha, max_tokens=m)
    assert 0.0 <= v <= tau**alpha + 1e-12


@RELAXED
@given(LOGPROBS, LOGPROBS, st.integers(min_value=1, max_value=60))
def test_tpd_ignores_tokens_past_m(head, tail, m):
    a = np.r_[head, tail]
    b = np.r_[head, np.zeros(len(tail))]
    assert tpd_deviation(a, max_tokens=len(head)) == tpd_deviation(b, max_tokens=len(head))
    assert tpd_deviation(a, max_tokens=m) == tpd_deviation(a[:m], max_tokens=m)


@RELAXED
@given(st.integers(min_value=0, max_value=50), st.floats(0.05, 1.0), st.floats(0.05, 3.0))
def test_tpd_zero_when_certain(n, tau, alpha):
    assert tpd_deviation(np.zeros(n), tau=tau, alpha=alpha) == 0.0


@RELAXED
@given(LOGPROBS, LOGPROBS)
def test_tpd_ref_properties(p, r):
    n = min(len(p), len(r))
    p, r = np.float32(p[:n]), np.float32(r[:n])
    same = out_trace(p, extra={"reference_output_logprobs": p})
    assert get("tpd_ref")(same) == 0.0
    v = get("tpd_ref")(out_trace(p, extra={"reference_output_logprobs": r}))
    assert -1.0 <= v <= 1.0  # tau ** alpha = 1
    assert v == pytest.approx(tpd_deviation(p) - tpd_deviation(r))


@RELAXED
@given(LOGPROBS, st.integers(min_value=1, max_value=80))
def test_output_scores_ranges(lp, m):
    t = out_trace(lp)
    assert 0.0 < get("out_max_prob")(t, max_tokens=m) <= 1.0
    assert get("out_ppl")(t, max_tokens=m) >= 0.0
    assert get("out_min_k")(t, max_tokens=m) <= -get("out_ppl")(t, max_tokens=m) + 1e-9


# -- directions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_direction_member_scores_higher(name):
    """A trace where the student is more certain everywhere must look more like a member."""
    det = get(name)
    member, nonmember = full_trace(-0.1), full_trace(-2.0)
    m, n = membership_score(det, [det(member), det(nonmember)])
    assert m > n, f"{name}: member {m} vs non-member {n} (higher_is_member={det.higher_is_member})"


def test_directions_as_documented():
    lower = {"tpd", "tpd_ref", "loss", "zlib", "reference", "out_ppl", "out_entropy"}
    higher = {"lowercase", "min_k", "min_k_pp", "dc_pdd", "out_min_k", "out_max_prob"}
    assert lower | higher <= set(REGISTRY)
    for n in lower:
        assert REGISTRY[n].higher_is_member is False, n
    for n in higher:
        assert REGISTRY[n].higher_is_member is True, n


# -- registry facts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_defaults_match_signature(name):
    det = REGISTRY[name]
    params = inspect.signature(det.fn).parameters
    kwonly = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert kwonly == det.defaults
    assert all(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for k, p in list(params.items())[1:])
    assert det.summary and ("member" in det.summary)
    for need in det.needs:
        assert need in NEED_FIELDS or need.startswith("extra:"), need
    if det.budget_param is not None:
        assert det.budget_param in det.defaults
    mod = importlib.import_module(det.fn.__module__)
    assert "arXiv" in mod.__doc__ and "=" in mod.__doc__  # citation and formula open the file


def test_published_defaults_and_budgets():
    assert get("min_k").defaults == {"k": 0.2}
    assert get("min_k_pp").defaults == {"k": 0.2}
    assert get("dc_pdd").defaults == {"a": 0.01}
    assert get("tpd_ref").defaults == get("tpd").defaults == {"tau": 1.0, "alpha": 0.6, "max_tokens": 300}
    for n in ("out_ppl", "out_min_k", "out_entropy", "out_max_prob"):
        assert get(n).token_budget() == 1000
        assert get(n).token_budget({"max_tokens": 300}) == 300
    assert get("loss").token_budget() is None


@pytest.mark.parametrize(
    "module",
    [
        "checks",
        "loss",
        "zlib_ratio",
        "lowercase",
        "min_k",
        "dc_pdd",
        "reference",
        "output",
        "tpd",
        "tpd_ref",
    ],
)
def test_module_doctests(module):
    mod = importlib.import_module(f"distill_detect.detectors.{module}")
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0
    if module in ("checks", "loss", "zlib_ratio", "min_k", "dc_pdd", "tpd"):
        assert res.attempted > 0


# -- missing fields and degenerate parameters -------------------------------------------------------


def _without(trace: Trace, need: str) -> Trace:
    if need.startswith("extra:"):
        extra = dict(trace.extra)
        del extra[need[6:]]
        return replace(trace, extra=extra)
    return replace(trace, **dict.fromkeys(NEED_FIELDS[need]))


CASES = [(n, need) for n in sorted(REGISTRY) for need in sorted(REGISTRY[n].needs) if need != "output_logprobs"]


@pytest.mark.parametrize("name,need", CASES)
def test_missing_field_raises_and_names_it(name, need):
    det = get(name)
    t = _without(full_trace(), need)
    field = need[6:] if need.startswith("extra:") else NEED_FIELDS[need][0]
    with pytest.raises(DistillDetectError, match=field) as exc:
        det(t)
    assert name in str(exc.value) and "q1" in str(exc.value)
    with pytest.raises(DistillDetectError, match=field):
        check_needs(det, [full_trace(), t])
    check_needs(det, full_trace())  # complete trace: no error


def test_missing_message_says_what_produces_it():
    t = replace(full_trace(), prompt_logprobs=None)
    with pytest.raises(DistillDetectError, match="API backends") as exc:
        get("loss")(t)
    assert "--no-prompt-logprobs" in str(exc.value)  # the command-line remedy, not internal Python
    t2 = replace(full_trace(), extra={})
    with pytest.raises(DistillDetectError, match="--reference-model"):
        get("tpd_ref")(t2)
    with pytest.raises(DistillDetectError, match="lowercased question"):
        get("lowercase")(t2)
    with pytest.raises(DistillDetectError, match="--methods dc_pdd"):
        get("dc_pdd")(t2)


def test_check_needs_counts_traces():
    bad = [replace(full_trace(), id=f"x{i}", question=None) for i in range(3)]
    with pytest.raises(DistillDetectError, match=r"3 of 4 traces") as exc:
        check_needs("zlib", [full_trace(), *bad])
    assert "'x0'" in str(exc.value)


def test_dc_pdd_needs_prompt_ids():
    with pytest.raises(DistillDetectError, match="prompt_ids"):
        get("dc_pdd")(replace(full_trace(), prompt_ids=None))


@pytest.mark.parametrize("name", ["loss", "zlib", "lowercase", "min_k", "min_k_pp", "dc_pdd", "reference"])
def test_empty_question_tokens_raise_not_nan(name):
    t = full_trace(n_prompt=0)
    with pytest.raises(DistillDetectError, match="empty"):
        get(name)(t)


@pytest.mark.parametrize("name", ["out_ppl", "out_min_k", "out_entropy", "out_max_prob"])
def test_empty_generation_raises_not_nan(name):
    with pytest.raises(DistillDetectError, match="empty"):
        get(name)(full_trace(n_out=0))


def test_misaligned_extra_arrays_raise():
    t = full_trace()
    bad = replace(t, extra={**t.extra, "reference_output_logprobs": np.zeros(3)})
    with pytest.raises(DistillDetectError, match="aligned"):
        get("tpd_ref")(bad)
    bad = replace(t, extra={**t.extra, "reference_prompt_logprobs": np.zeros(2)})
    with pytest.raises(DistillDetectError, match="aligned"):
        get("reference")(bad)
    bad = replace(t, extra={**t.extra, "dcpdd_token_freq": np.full(2, 0.5)})
    with pytest.raises(DistillDetectError, match="aligned"):
        get("dc_pdd")(bad)


@pytest.mark.parametrize(
    "name,params",
    [
        ("min_k", {"k": 0}),
        ("min_k", {"k": 1.5}),
        ("min_k", {"k": -0.2}),
        ("min_k", {"k": "a lot"}),
        ("min_k_pp", {"k": 0.0}),
        ("out_min_k", {"k": 2}),
        ("out_min_k", {"max_tokens": 0}),
        ("out_ppl", {"max_tokens": 2.5}),
        ("out_entropy", {"max_tokens": -1}),
        ("out_max_prob", {"max_tokens": True}),
        ("dc_pdd", {"a": 0}),
        ("dc_pdd", {"a": -1.0}),
        ("tpd_ref", {"tau": 0.0}),
        ("tpd_ref", {"alpha": -1}),
        ("tpd_ref", {"max_tokens": 0}),
        ("loss", {"k": 0.2}),
        ("out_ppl", {"budget": 300}),
    ],
)
def test_degenerate_params_raise_config_error(name, params):
    with pytest.raises(ConfigError, match=next(iter(params))):
        get(name)(full_trace(), **params)


def test_dc_pdd_rejects_zero_frequency():
    t = full_trace()
    bad = replace(t, extra={**t.extra, "dcpdd_token_freq": np.zeros(6)})
    with pytest.raises(DistillDetectError, match="frequencies"):
        get("dc_pdd")(bad)


def test_lowest_k_mean_rounding_is_floor_with_tolerance():
    # 0.29 * 100 is 28.999999999999996 in binary: still 29 tokens
    vals = np.arange(100, dtype=float)
    assert lowest_k_mean(vals, 0.29) == pytest.approx(np.mean(np.arange(29)))
    assert lowest_k_mean(vals[:9], 0.2) == 0.0  # floor(1.8) = 1 token (floor, not ceil)
    assert lowest_k_mean(vals[:10], 0.2) == 0.5  # floor(2.0) = 2 tokens: mean(0, 1)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-10, 0, width=32), min_size=2, max_size=30))
def test_scores_are_finite_floats(lp):
    t = full_trace(n_prompt=6, n_out=8)
    t = replace(t, output_logprobs=np.float32(lp), output_ids=None, output_mean_logp=None, output_std_logp=None)
    t = replace(t, extra={**t.extra, "reference_output_logprobs": np.float32(lp)[::-1].copy()})
    for name in ("tpd", "tpd_ref", "out_ppl", "out_min_k", "out_max_prob"):
        v = get(name)(t)
        assert isinstance(v, float) and math.isfinite(v)
