"""The linear probe's C sweep picks a sensible C and the protocol scores test with the right metric."""

import numpy as np
import pytest

from alip.eval.linear_probe import LinearProbeConfig, LinearProbeError, linear_probe, sweep_c, validation_split
from alip.eval.metrics import voc11_map


def _blobs(n_per_class, n_classes, dim, sep, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    centres *= sep / np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + rng.normal(size=(len(y), dim))
    return x, y


def test_sweep_on_separable_problem_picks_a_working_c():
    # separable but imbalanced (60/20/20/20): with C=1e-6 the weights vanish and the unpenalised
    # intercept predicts the majority class (accuracy ~0.5); the sweep must move to a C that separates
    x, y = _blobs(20, 4, 16, sep=6.0, seed=0)
    x0, _ = _blobs(40, 4, 16, sep=6.0, seed=0)
    x = np.concatenate([x, x0[:40]])  # _blobs rows 0..39 are class 0
    y = np.concatenate([y, np.zeros(40, int)])
    C, val, sweep = sweep_c(x, y, "accuracy", 4)
    scores = dict(sweep)
    assert scores[1e-6] == scores[1e-4] == 0.5  # the over-regularised end predicts the majority class
    # every other coarse C separates: the plateau is 1e-2 .. 1e6 and its middle, 1e2, is chosen
    # (refinement around it finds only more ties)
    assert [scores[10.0 ** e] for e in (-2, 0, 2, 4, 6)] == [1.0] * 5
    assert C == pytest.approx(100.0) and val == 1.0
    assert len(sweep) == 13  # coarse grid (7) + 3 refinement rounds of 2 new points each
    # the sweep's validation scores are what a direct fit on the same split gives
    from sklearn.linear_model import LogisticRegression

    tr, va = validation_split(y, 0.2, 0)
    for c in (1e-4, 1e-2, 100.0):
        direct = LogisticRegression(C=c, max_iter=1000, random_state=0).fit(x[tr], y[tr]).predict(x[va])
        assert scores[c] == pytest.approx(float((direct == y[va]).mean()))


def test_flat_validation_score_picks_middle_of_plateau():
    # balanced, well separated: every C from 1e-6 to 1e6 is perfect on validation; an edge of the
    # grid would be an arbitrary pick, the middle of the plateau is the stable one
    x, y = _blobs(30, 3, 8, sep=8.0, seed=7)
    C, val, sweep = sweep_c(x, y, "accuracy", 3)
    assert all(s == 1.0 for _, s in sweep)
    assert C == pytest.approx(1.0)  # exponents -6..6: the middle one


def test_sweep_prefers_regularisation_on_noisy_high_dim_data():
    # few samples, many noisy dimensions: large C overfits; the best C is interior
    x, y = _blobs(15, 3, 200, sep=3.0, seed=1)
    C, val, sweep = sweep_c(x, y, "accuracy", 3)
    scores = dict(sweep)
    # strong regularisation (C <= 1e-2) generalises better than weak (C >= 1) on this split
    assert max(scores[c] for c in (1.0, 1e2, 1e4, 1e6)) < min(scores[c] for c in (1e-6, 1e-4, 1e-2))
    assert val == max(scores.values())
    assert C == pytest.approx(1e-4)  # the middle of the best coarse plateau 1e-6 .. 1e-2


def test_full_protocol_scores_test_split():
    x, y = _blobs(60, 5, 16, sep=5.0, seed=2)
    xt, yt = _blobs(30, 5, 16, sep=5.0, seed=2)  # same centres (same seed), fresh noise below
    xt = xt + np.random.default_rng(3).normal(scale=0.1, size=xt.shape)
    res = linear_probe(x, y, xt, yt, "mean_per_class", 5)
    assert res.score > 0.95 and res.val_score > 0.9
    assert res.as_dict()["C"] == res.C


def test_multilabel_uses_one_vs_rest_and_map11():
    rng = np.random.default_rng(4)
    n, c, d = 300, 4, 12
    y = (rng.random((n, c)) < 0.3).astype(int)
    y[y.sum(1) == 0, 0] = 1
    w = rng.normal(size=(c, d)) * 3
    x = y @ w + rng.normal(scale=6.0, size=(n, d))  # noisy enough that the metrics differ
    res = linear_probe(x[:200], y[:200], x[200:], y[200:], "map11", c,
                       LinearProbeConfig(coarse_exponents=(-4, -2, 0, 2), refine_steps=1))
    assert 0.6 < res.score < 1.0
    # the score is the 11-point mAP of one-vs-rest logistic regressions refit with the chosen C
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.multiclass import OneVsRestClassifier

    ref = OneVsRestClassifier(LogisticRegression(C=res.C, max_iter=1000, random_state=0)).fit(x[:200], y[:200])
    decision = ref.decision_function(x[200:])
    assert res.score == pytest.approx(voc11_map(decision, y[200:]), abs=1e-9)
    sk_ap = np.mean([average_precision_score(y[200:, k], decision[:, k]) for k in range(c)])
    assert res.score != pytest.approx(sk_ap, abs=1e-6)  # really the VOC07 metric, not sklearn's AP


def test_binary_roc_auc_and_unseen_class():
    x, y = _blobs(50, 2, 8, sep=4.0, seed=5)
    res = linear_probe(x, y, x, y, "roc_auc", 2, LinearProbeConfig(coarse_exponents=(-2, 0, 2), refine_steps=0))
    assert res.score > 0.95
    # test labels include a class the training split never had: scored as a miss, not a crash
    x3, y3 = _blobs(20, 3, 8, sep=4.0, seed=6)
    res = linear_probe(x3[y3 < 2], y3[y3 < 2], x3, y3, "accuracy", 3,
                       LinearProbeConfig(coarse_exponents=(0,), refine_steps=0))
    assert res.score <= 2 / 3 + 1e-9


def test_validation_split_is_stratified_and_errors():
    y = np.repeat(np.arange(4), 10)
    tr, va = validation_split(y, 0.2, 0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 40
    assert sorted(np.bincount(y[va])) == [2, 2, 2, 2]
    with pytest.raises(LinearProbeError, match="single class"):
        sweep_c(np.ones((10, 3)), np.zeros(10, int), "accuracy", 1)
    with pytest.raises(LinearProbeError, match="one label row"):
        linear_probe(np.ones((10, 3)), np.zeros(9, int), np.ones((2, 3)), np.zeros(2, int), "accuracy", 2)
    with pytest.raises(ValueError, match="val_fraction"):
        LinearProbeConfig(val_fraction=1.5)
