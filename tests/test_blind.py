"""The blind (model-free) baseline flags a shifted split and not a random one."""

from __future__ import annotations

from distill_detect.blind import blind_scores
from distill_detect.data import load_questions
from distill_detect.metrics import roc_auc


def test_random_split_is_near_chance_and_shifted_split_is_caught():
    gsm = load_questions("bundled:gsm8k_test")[:120]
    math = load_questions("bundled:math_test")[:60]
    # Random split of one pool: the classifier has nothing to learn.
    texts = [q.text for q in gsm]
    labels = [i % 2 for i in range(len(texts))]
    auc_random = roc_auc(labels, blind_scores(texts, labels, seed=0))
    assert 0.3 < auc_random < 0.7
    # Members from GSM8K, non-members from MATH: a distribution shift the text alone reveals.
    shifted = [q.text for q in gsm[:60]] + [q.text for q in math]
    y = [1] * 60 + [0] * 60
    assert roc_auc(y, blind_scores(shifted, y, seed=0)) > 0.95
