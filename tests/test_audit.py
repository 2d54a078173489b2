"""Tests for distill_detect.audit: hand-checkable numbers, brute-force references, and
calibration properties under simulation (null super-uniformity, FDR, test size and power,
interval coverage, the documented bias of Storey's estimate)."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_detect.audit import (
    audit,
    conformal_pvalues,
    dataset_test,
    estimate_contaminated_fraction,
    flag_fdr,
    make_reference,
    perturb_numbers,
    storey_pi0,
)
from distill_detect.errors import ConfigError
from distill_detect.types import Question

# ----------------------------------------------------------------------------- conformal p-values


def test_pvalues_hand_example():
    # m = 4. 5.0: no r >= 5 -> 1/5; 0.5: {0.5, 1, 2} -> 4/5; -1: all 4 -> 5/5; 1.0: {1, 2}, tie counted -> 3/5
    p = conformal_pvalues([5.0, 0.5, -1.0, 1.0], [0.0, 1.0, 2.0, 0.5])
    np.testing.assert_allclose(p, [1 / 5, 4 / 5, 5 / 5, 3 / 5])


# Scores on a 1/64 grid: many ties, and increasing transforms below stay exact in float64.
small_scores = st.lists(st.integers(-4, 4).map(float) | st.integers(-320, 320).map(lambda k: k / 64), min_size=1, max_size=30)


@settings(deadline=None)  # the first example pays for importing scipy.stats
@given(bench=small_scores, ref=small_scores)
def test_pvalues_match_brute_force(bench, ref):
    p = conformal_pvalues(bench, ref)
    m = len(ref)
    want = [(1 + sum(r >= s for r in ref)) / (m + 1) for s in bench]
    np.testing.assert_allclose(p, want)
    assert p.min() >= 1 / (m + 1) and p.max() <= 1
    # Monotone: a higher (more member-like) score never gets a larger p-value.
    order = np.argsort(bench, kind="stable")
    assert np.all(np.diff(p[order]) <= 1e-12)
    # Rank-based: a strictly increasing transform of all scores changes nothing.
    np.testing.assert_allclose(conformal_pvalues(np.exp(np.array(bench)), np.exp(np.array(ref))), p)


def test_pvalues_uniform_under_null():
    """Exchangeable null, no ties: P(p <= k/(m+1)) = k/(m+1) exactly (marginally over R).

    m = 20 makes the +1 correction matter: the uncorrected K/m gives P(p <= 0.05) = 2/21 = 0.095.
    """
    rng = np.random.default_rng(0)
    m, n, reps = 20, 50, 400
    p = np.concatenate([conformal_pvalues(rng.normal(size=n), rng.normal(size=m)) for _ in range(reps)])
    grid = np.arange(1, m + 2) / (m + 1)
    emp = np.array([(p <= g + 1e-12).mean() for g in grid])
    # Monte Carlo error of each point is at most about 0.005 (between-R variation dominates).
    assert np.all(np.abs(emp - grid) < 0.02), np.c_[grid, emp]
    assert (p <= 0.05).mean() <= 0.05 + 0.01


def test_pvalues_super_uniform_with_ties():
    # Heavily tied scores (like many TPD = 0): ties count against membership, so P(p <= t) <= t.
    rng = np.random.default_rng(1)
    m, n, reps = 30, 40, 300
    p = np.concatenate([conformal_pvalues(rng.poisson(1.0, n), rng.poisson(1.0, m)) for _ in range(reps)])
    for t in (0.05, 0.1, 0.25, 0.5, 0.75):
        assert (p <= t).mean() <= t + 0.01, t


# ----------------------------------------------------------------------------- BH


def bh_brute_force(p, q):
    n = len(p)
    order = np.argsort(p)
    ok = [k for k in range(1, n + 1) if p[order[k - 1]] <= k * q / n]
    flags = np.zeros(n, bool)
    if ok:
        flags[order[: max(ok)]] = True
    return flags


@settings(deadline=None)
@given(
    p=st.lists(st.floats(0, 1) | st.sampled_from([0.01, 0.02, 0.05]), min_size=1, max_size=40),
    q=st.sampled_from([0.01, 0.05, 0.2]),
)
def test_flag_fdr_is_bh_step_up(p, q):
    np.testing.assert_array_equal(flag_fdr(p, q), bh_brute_force(np.array(p), q))


def test_flag_fdr_rejects_bad_level():
    with pytest.raises(ConfigError, match="0.05"):
        flag_fdr([0.1, 0.2], fdr=5)


def test_bh_realised_fdr_on_known_mixture():
    """40 members among 200 (shift 3.5 sd), m = 1000 reference: realised FDR <= nominal on average."""
    rng = np.random.default_rng(2)
    n, n1, m, q, reps = 200, 40, 1000, 0.1, 200
    fdp, flagged = [], []
    for _ in range(reps):
        truth = np.r_[np.ones(n1, bool), np.zeros(n - n1, bool)]
        bench = np.where(truth, rng.normal(3.5, 1, n), rng.normal(0, 1, n))
        flags = flag_fdr(conformal_pvalues(bench, rng.normal(size=m)), q)
        fdp.append((flags & ~truth).sum() / max(1, flags.sum()))
        flagged.append(flags.sum())
    # BH's bound is q * n0/n = 0.08; Monte Carlo sd of the mean is about 0.003.
    assert np.mean(fdp) <= q + 0.01
    assert np.mean(flagged) > 15  # the procedure has power here, so the check is not vacuous


# ----------------------------------------------------------------------------- dataset test


def test_dataset_test_auc_is_pairwise_probability():
    b, r = np.array([3.0, 1.0, 2.0, 2.0]), np.array([2.0, 0.0, 5.0])
    pairs = [(x > y) + 0.5 * (x == y) for x in b for y in r]
    res = dataset_test(b, r)
    assert res.method == "permutation"
    assert res.auc == pytest.approx(np.mean(pairs))
    assert res.statistic == pytest.approx(np.sum(pairs))


def test_permutation_path_agrees_with_exact_mann_whitney():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(3)
    b, r = rng.normal(0.8, 1, 6), rng.normal(0, 1, 8)  # C(14, 6) = 3003 splits: enumerated exactly
    res = dataset_test(b, r, method="permutation")
    want = mannwhitneyu(b, r, alternative="greater", method="exact").pvalue
    assert res.pvalue == pytest.approx(want, rel=1e-9)


def test_dataset_test_size_at_zero_contamination():
    rng = np.random.default_rng(4)
    reps, alpha = 400, 0.05
    rej = np.mean([dataset_test(rng.normal(size=100), rng.normal(size=100)).pvalue < alpha for _ in range(reps)])
    assert rej <= alpha + 0.025  # binomial sd at 400 reps: 0.011
    # (Small samples use the exact permutation test, whose size is <= alpha by construction;
    # test_permutation_path_agrees_with_exact_mann_whitney checks that path.)


def test_dataset_test_power_and_effect_at_half_contamination():
    from scipy.stats import norm

    rng = np.random.default_rng(5)
    reps, n, m, pi, shift = 100, 100, 100, 0.5, 2.0
    ps, aucs = [], []
    for _ in range(reps):
        member = rng.random(n) < pi
        res = dataset_test(rng.normal(shift * member, 1), rng.normal(size=m))
        ps.append(res.pvalue)
        aucs.append(res.auc)
    assert np.mean(np.array(ps) < 0.05) >= 0.95
    # P(B > R) = 0.5 + pi (AUC_members - 0.5), AUC_members = Phi(shift / sqrt 2)
    assert np.mean(aucs) == pytest.approx(0.5 + pi * (norm.cdf(shift / math.sqrt(2)) - 0.5), abs=0.015)


# ----------------------------------------------------------------------------- contaminated fraction


def test_storey_hand_example_and_exact_null_mass():
    # m = 10: conformal nulls are uniform on {1..11}/11, and P(p > 0.5) = 6/11, not 0.5.
    grid = list(np.arange(1, 12) / 11)
    p = grid + [1 / 11] * 11  # 11 nulls (one per grid value) + 11 clear members
    assert storey_pi0(p, n_ref=10) == pytest.approx(0.5)  # (6/22) / (6/11)
    assert storey_pi0(p) == pytest.approx((6 / 22) / 0.5)


def test_fraction_interval_covers_truth_with_clear_separation():
    # A small reference (m = 100 vs n = 400) makes R's sampling error dominate: an interval
    # that resampled only B would cover about 73% of the time here and fail this test.
    rng = np.random.default_rng(6)
    reps, n, m, pi = 100, 400, 100, 0.3
    est, cover = [], []
    for k in range(reps):
        member = rng.random(n) < pi
        bench = rng.normal(8.0 * member, 1)
        f = estimate_contaminated_fraction(bench, rng.normal(size=m), n_boot=300, seed=k)
        true_pi = member.mean()
        est.append(f.estimate - true_pi)
        cover.append(f.ci_low <= true_pi <= f.ci_high)
    assert abs(np.mean(est)) < 0.02  # unbiased when no member falls below the reference median
    assert np.mean(cover) >= 0.88  # nominal 0.95; Monte Carlo sd about 0.02


def test_fraction_is_a_lower_bound_for_a_weak_detector():
    """Documented bias: E[estimate] = pi (1 - P1(S <= median F0) / 0.5) = 0.3 (1 - 2 Phi(-1)) = 0.205."""
    from scipy.stats import norm

    rng = np.random.default_rng(7)
    pi, n, m = 0.3, 2000, 2000
    est = [
        estimate_contaminated_fraction(rng.normal(1.0 * (rng.random(n) < pi), 1), rng.normal(size=m), n_boot=0).estimate
        for _ in range(40)
    ]
    assert np.mean(est) == pytest.approx(pi * (1 - 2 * norm.cdf(-1.0)), abs=0.015)
    assert np.mean(est) < pi - 0.05


def test_fraction_near_zero_without_contamination():
    rng = np.random.default_rng(8)
    fs = [estimate_contaminated_fraction(rng.normal(size=200), rng.normal(size=200), n_boot=200, seed=i) for i in range(30)]
    assert np.mean([f.estimate for f in fs]) < 0.06
    assert np.mean([f.ci_low == 0.0 for f in fs]) >= 0.9
    assert all(0.0 <= f.ci_low <= f.estimate <= f.ci_high <= 1.0 for f in fs)


# ----------------------------------------------------------------------------- audit()

VERDICT = re.compile(
    r"^(contaminated|no evidence of contamination): estimated \d+% of questions \(95% CI \d+–\d+%\); "
    r"\d+ of \d+ questions flagged at FDR 5%; dataset test p = [0-9.e-]+$"
)


def test_audit_contaminated_verdict_and_dict():
    rng = np.random.default_rng(9)
    bench = np.r_[rng.normal(6, 1, 50), rng.normal(0, 1, 150)]
    ref = rng.normal(size=400)
    ids = [f"q{i}" for i in range(200)]
    r = audit(ids, bench, ref, n_boot=300, higher_is_member=True)
    assert r.contaminated and r.verdict().startswith("contaminated: ")
    assert VERDICT.match(r.verdict()), r.verdict()
    assert 0.15 <= r.fraction.estimate <= 0.35 and r.fraction.ci_low <= 0.25 <= r.fraction.ci_high
    assert set(r.flagged_ids) <= set(ids[:50]) | set(ids[50:]) and r.n_flagged >= r.min_flaggable
    d = json.loads(json.dumps(r.to_dict()))
    assert d["verdict"] == r.verdict() and d["n_flagged"] == r.n_flagged and len(d["questions"]) == 200
    assert d["questions"][0]["id"] == "q0" and d["questions"][0]["pvalue"] == pytest.approx(r.pvalues[0])
    with pytest.raises(ValueError):
        r.pvalues[0] = 0.5  # results are read-only


def test_audit_null_verdict():
    rng = np.random.default_rng(10)
    r = audit([str(i) for i in range(100)], rng.normal(size=100), rng.normal(size=100), n_boot=200, higher_is_member=True)
    assert not r.contaminated and r.dataset.pvalue >= r.alpha
    assert r.verdict().startswith("no evidence of contamination: ") and VERDICT.match(r.verdict())
    assert r.verdict().endswith(f"p = {r.dataset.pvalue:.2g}")


def test_audit_does_not_freeze_callers_array_and_validates():
    bench = np.array([1.0, 2.0, 3.0])
    audit(["a", "b", "c"], bench, [0.0, 1.0], n_boot=0, higher_is_member=True)
    bench[0] = 5.0  # still writable
    with pytest.raises(ValueError, match="3 ids but 2 scores"):
        audit(["a", "b", "c"], [1.0, 2.0], [0.0], higher_is_member=True)
    with pytest.raises(ValueError, match="not unique"):
        audit(["a", "a"], [1.0, 2.0], [0.0], higher_is_member=True)
    with pytest.raises(ValueError, match="non-finite"):
        audit(["a", "b"], [1.0, float("nan")], [0.0], higher_is_member=True)
    with pytest.raises(ConfigError, match="fdr"):
        audit(["a"], [1.0], [0.0], fdr=5, higher_is_member=True)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 60), m=st.integers(2, 60), shift=st.floats(0, 5), seed=st.integers(0, 10_000))
def test_bh_flags_nothing_or_at_least_min_flaggable(n, m, shift, seed):
    rng = np.random.default_rng(seed)
    r = audit([str(i) for i in range(n)], rng.normal(shift, 1, n), rng.normal(size=m), n_boot=0, higher_is_member=True)
    assert r.n_flagged == 0 or r.n_flagged >= r.min_flaggable


# ----------------------------------------------------------------------------- make_reference


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_perturbation_keeps_text_and_maps_numbers_consistently():
    text = "Janet has 16 eggs and sells 16 of them for $2 each; 3 friends buy 45 eggs."
    new, changes = perturb_numbers(text, _rng())
    pattern = r"Janet has (\d+) eggs and sells (\d+) of them for \$(\d) each; (\d) friends buy (\d+) eggs\."
    m = re.fullmatch(pattern, new)
    assert m, new
    a, b, c, d, e = m.groups()
    assert a == b == changes["16"] != "16" and len(a) == 2  # same number -> same new number
    assert c != "2" and d != "3" and len(e) == 2 and e != "45"
    assert len({a, c, d, e}) == 4  # different numbers -> different new numbers


def test_perturbation_keeps_format_and_magnitude():
    text = "He paid $80,000 plus $1,250.50, a 150% rise over 2.5 years since 2019."
    new, _ = perturb_numbers(text, _rng(1))
    m = re.fullmatch(
        r"He paid \$(\d)0,000 plus \$(\d),(\d{3})\.(\d)0, a (\d\d)0% rise over (\d)\.(\d) years since (\d{4})\.", new
    )
    assert m, new
    assert m.group(1) != "8" and m.group(1) not in "01"  # 80,000 -> X0,000: round numbers stay round
    assert int(m.group(8)) != 2019 and abs(int(m.group(8)) - 2019) <= 20  # a year moves a little
    assert m.group(6) + m.group(7) != "25"


def test_perturbation_leaves_zero_one_ordinals_and_embedded_digits():
    text = "On the 4th day 1 box had 0 pens; model A4 uses 1.0 units."
    new, changes = perturb_numbers(text, _rng())
    assert new == text and changes == {}


def test_perturbation_words_and_times():
    new, changes = perturb_numbers("Three cats and 3 dogs left at 7:30 and came back at 7:45.", _rng(2))
    m = re.fullmatch(r"(\w+) cats and (\d) dogs left at (\d+):30 and came back at (\d+):45\.", new)
    assert m, new
    word, digit, h1, h2 = m.groups()
    assert word[0].isupper() and word.lower() != "three"
    assert {"two": "2", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9"}[word.lower()] == digit
    assert h1 == h2 != "7" and 3 <= int(h1) <= 11  # one common shift of 1-4 hours
    kept, _ = perturb_numbers("Three cats and 3 dogs", _rng(2), words=False)
    assert kept.startswith("Three cats and ") and not kept.endswith(" 3 dogs")


words = st.sampled_from(["apples", "cost", "$", "each", "and", "the", "box", "%", "per", "week"])
numbers = st.integers(2, 99_999)


@settings(deadline=None)
@given(tokens=st.lists(st.one_of(words, numbers), min_size=1, max_size=25), seed=st.integers(0, 2**32 - 1))
def test_perturbation_property(tokens, seed):
    text = " ".join(map(str, tokens))
    new, _ = perturb_numbers(text, _rng(seed))
    new_tokens = new.split(" ")
    assert len(new_tokens) == len(tokens)
    mapping: dict[int, str] = {}
    for old, tok in zip(tokens, new_tokens):
        if isinstance(old, str):
            assert tok == old  # non-number text identical
            continue
        s = str(old)
        assert tok.isdigit() and tok != s and len(tok) == len(s)  # changed, integer, same magnitude
        if not (len(s) == 4 and 1900 <= old <= 2100):
            assert len(tok) - len(tok.rstrip("0")) == len(s) - len(s.rstrip("0"))  # round stays round
        assert mapping.setdefault(old, tok) == tok  # consistent within the question


def test_make_reference_ids_labels_determinism_and_drops():
    qs = [
        Question(id="a", text="Tom has 12 apples and eats 3.", label=1, response="9"),
        Question(id="b", text="What is the capital of France?"),
        Question(id="c", text="Sam ran 1 mile."),
        Question(id="d", text="A box holds 24 pens."),
    ]
    with pytest.warns(UserWarning, match="dropped 2 of 4"):
        ref, dropped = make_reference(qs, seed=3)
    assert dropped == ["b", "c"]
    assert [q.id for q in ref] == ["a-perturbed", "d-perturbed"]
    assert all(q.label == 0 and q.response is None for q in ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again, _ = make_reference(qs[::-1], seed=3)  # per-question seeding: order does not matter
        other, _ = make_reference(qs, seed=4)
    assert sorted(q.text for q in again) == sorted(q.text for q in ref)
    assert [q.text for q in other] != [q.text for q in ref]


def test_make_reference_on_bundled_gsm8k():
    from distill_detect.data import load_questions

    qs = load_questions("bundled:gsm8k_test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, dropped = make_reference(qs, seed=0)
    assert len(dropped) < 0.01 * len(qs) and len(ref) + len(dropped) == len(qs)
    by_id = {q.id: q.text for q in qs}
    digit_run = re.compile(r"\d+")
    time = re.compile(r"\d{1,2}:\d\d")
    for r in ref:
        old = by_id[r.id.removesuffix("-perturbed")]
        assert r.text != old
        # Same skeleton: only digit runs and the words two..nine may differ.
        strip = re.compile(r"\d+|\b(?:two|three|four|five|six|seven|eight|nine)\b", re.I)
        assert strip.sub("#", r.text) == strip.sub("#", old)
        assert [len(x) for x in digit_run.findall(time.sub("T", r.text))] == [
            len(x) for x in digit_run.findall(time.sub("T", old))
        ]
