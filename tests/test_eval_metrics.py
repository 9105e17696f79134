"""Each evaluation metric against an independent reference on constructed inputs."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from alip.eval.metrics import (MetricError, classification_metric, mean_per_class_recall, mean_top1_top5,
                               retrieval_recalls, roc_auc, topk_accuracy, voc11_average_precision, voc11_map)


def _devkit_voc07_ap(scores, positives):
    """The VOC2007 devkit's 11-point AP, written the way the devkit (and py-faster-rcnn's
    voc_eval with use_07_metric=True) writes it: sort, cumulate, loop over thresholds."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.asarray(positives, dtype=float)[order]
    fp = 1.0 - tp
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / np.sum(positives)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap += p / 11.0
    return ap


def test_voc11_ap_hand_computed():
    # ranking: + - + - -, 2 positives. precision at recall 0.5 = 1, at recall 1.0 = 2/3
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    pos = [1, 0, 1, 0, 0]
    # thresholds 0..0.5 (6 of them) -> 1.0 ; 0.6..1.0 (5) -> 2/3
    assert voc11_average_precision(scores, pos) == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)


def test_voc11_map_matches_devkit_and_differs_from_sklearn_ap():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    n, c = 200, 6
    targets = (rng.random((n, c)) < 0.2).astype(int)
    scores = targets * rng.normal(1.0, 1.0, (n, c)) + rng.normal(0, 1.0, (n, c))
    expected = np.mean([_devkit_voc07_ap(scores[:, k], targets[:, k]) for k in range(c)])
    assert voc11_map(scores, targets) == pytest.approx(expected, abs=1e-12)
    # the interpolated 11-point metric is not sklearn's non-interpolated AP
    sk = np.mean([average_precision_score(targets[:, k], scores[:, k]) for k in range(c)])
    assert abs(voc11_map(scores, targets) - sk) > 1e-4


def test_voc11_map_perfect_and_errors():
    targets = np.eye(4, dtype=int)
    assert voc11_map(np.eye(4) * 5, targets) == pytest.approx(1.0)
    with pytest.raises(MetricError, match="no class has a positive"):
        voc11_map(np.ones((3, 2)), np.zeros((3, 2)))
    with pytest.raises(MetricError, match="binary matrix"):
        voc11_map(np.ones((3, 2)), np.zeros(3))


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(y * 0.7 + rng.normal(0, 1, 300), 1)  # rounding makes many ties
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    two_col = np.stack([np.zeros_like(s), s], axis=1)
    assert roc_auc(two_col, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    with pytest.raises(MetricError, match="only one class"):
        roc_auc(s, np.ones_like(y))


def test_mean_per_class_vs_direct_and_sklearn():
    rng = np.random.default_rng(2)
    # imbalanced: class 0 is 80% of the data, so plain accuracy != mean per class
    y = np.concatenate([np.zeros(80, int), np.ones(15, int), np.full(5, 2)])
    scores = rng.normal(size=(100, 3))
    scores[np.arange(100), y] += np.where(y == 0, 3.0, 0.3)
    pred = scores.argmax(1)
    direct = np.mean([(pred[y == c] == c).mean() for c in range(3)])
    assert mean_per_class_recall(scores, y) == pytest.approx(direct)
    assert mean_per_class_recall(scores, y) == pytest.approx(balanced_accuracy_score(y, pred))
    assert abs(mean_per_class_recall(scores, y) - topk_accuracy(scores, y, 1)) > 0.05


def test_topk_and_mean_top1_top5():
    scores = np.array([
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],  # target 0 -> top1
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],  # target 4 -> rank 4: top5 only
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],  # target 6 -> rank 6: neither
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # target 6 -> top1
    ])
    y = np.array([0, 4, 6, 6])
    assert topk_accuracy(scores, y, 1) == 0.5
    assert topk_accuracy(scores, y, 5) == 0.75
    assert mean_top1_top5(scores, y) == pytest.approx(0.625)
    assert classification_metric("mean_top1_top5", scores, y) == pytest.approx(0.625)
    assert np.isnan(topk_accuracy(scores[:, :3], np.array([0, 1, 2, 0]), 5))  # fewer classes than k
    with pytest.raises(MetricError, match="unknown metric"):
        classification_metric("f1", scores, y)


def test_retrieval_recalls_hand_made_matrix():
    # 3 images; captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2
    owners = [0, 0, 1, 1, 2]
    sim = np.array([
        # c0   c1   c2   c3   c4
        [0.1, 0.9, 0.8, 0.0, 0.0],  # image 0: its caption c1 is ranked first -> i2t hit@1
        [0.5, 0.0, 0.1, 0.2, 0.9],  # image 1: c4 (img2), c0 (img0) then c3 (own) -> first own at rank 3
        [0.0, 0.0, 0.0, 0.0, 0.3],  # image 2: own caption c4 top -> hit@1
    ])
    r = retrieval_recalls(sim, owners, ks=(1, 2, 3))
    assert r["i2t_r1"] == pytest.approx(2 / 3)
    assert r["i2t_r2"] == pytest.approx(2 / 3)
    assert r["i2t_r3"] == pytest.approx(1.0)
    # text -> image, per caption (column): c0 best img1 (own img0 rank 2); c1 img0 rank1;
    # c2 img0 0.8 > img1 0.1 -> rank 2; c3 img1 0.2 top -> rank1; c4 img1 0.9 > img2 0.3 -> rank 2
    assert r["t2i_r1"] == pytest.approx(2 / 5)
    assert r["t2i_r2"] == pytest.approx(1.0)
    assert r["t2i_r3"] == pytest.approx(1.0)


def test_retrieval_recalls_validates_inputs():
    with pytest.raises(MetricError, match="num_texts"):
        retrieval_recalls(np.zeros((2, 3)), [0, 1])
    with pytest.raises(MetricError, match="at least one caption"):
        retrieval_recalls(np.zeros((3, 2)), [0, 1])
