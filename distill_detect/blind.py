"""The blind baseline: can the member/non-member split be told apart from the question text alone?

A model-free text classifier (TF-IDF of word 1-2-grams and character 3-5-grams, logistic
regression) is trained to predict the label from the question, and its out-of-fold
probabilities (stratified k-fold cross-validation) are scored like any detector. If it
separates the two sides well above AUC 0.5, the split is distribution-shifted and any
detector can "win" for the wrong reason (Das, Zhang and Tramer, *Blind Baselines Beat
Membership Inference Attacks for Foundation Models*, arXiv:2406.16201; Duan et al., *Do
Membership Inference Attacks Work on Large Language Models?*, arXiv:2402.07841). A split
drawn at random from one pool, as the paper's protocol does, should give about 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def blind_scores(texts: Sequence[str], labels: Sequence[int], *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold P(member | question text), higher = member; one value per question."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels, dtype=int)
    texts = list(texts)
    k = int(min(folds, np.bincount(y, minlength=2).min()))
    if k < 2:
        raise ValueError("the blind baseline needs at least 2 members and 2 non-members")
    out = np.empty(len(texts))
    for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(texts, y):
        # Vectorisers are fitted on the training fold only: nothing about the held-out questions leaks.
        words = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
        chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=2, sublinear_tf=True)
        tr = [texts[i] for i in train]
        te = [texts[i] for i in test]
        x_tr = hstack([words.fit_transform(tr), chars.fit_transform(tr)]).tocsr()
        x_te = hstack([words.transform(te), chars.transform(te)]).tocsr()
        clf = LogisticRegression(C=1.0, max_iter=2000)
        clf.fit(x_tr, y[train])
        out[test] = clf.predict_proba(x_te)[:, 1]
    return out
