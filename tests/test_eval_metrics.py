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


def test_ties_rank_the_target_below_every_tied_class():
    # constant scores (a collapsed model) must score 0, not 100%
    assert topk_accuracy(np.zeros((4, 6)), [0, 1, 2, 3], 1) == 0.0
    assert topk_accuracy(np.zeros((4, 6)), [0, 1, 2, 3], 5) == 0.0
    assert mean_per_class_recall(np.zeros((4, 6)), [0, 1, 2, 3]) == 0.0
    scores = np.array([
        [0.9, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # target 0 tied with class 1 -> rank 1: top-2 hit, top-1 miss
        [0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.0],  # target 1 tied with 4 others -> rank 4: top-5 hit only
        [0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],  # target 6 tied with 5 others -> rank 5: miss at 5
        [0.1, 0.8, 0.3, 0.3, 0.3, 0.3, 0.3],  # target 1 alone on top -> hit everywhere
    ])
    y = np.array([0, 1, 6, 1])
    assert topk_accuracy(scores, y, 1) == 0.25
    assert topk_accuracy(scores, y, 2) == 0.5
    assert topk_accuracy(scores, y, 5) == 0.75
    # reference: the worst rank over every order of the tied classes, by brute force
    for k in (1, 2, 5):
        worst = [int((np.delete(row, t) >= row[t]).sum() < k) for row, t in zip(scores, y)]
        assert topk_accuracy(scores, y, k) == np.mean(worst)
    # mean per class: class 0 -> 0/1, class 1 -> 1/2 (row 3 hit, row 1 miss), class 6 -> 0/1
    assert mean_per_class_recall(scores, y) == pytest.approx((0 + 0.5 + 0) / 3)


def test_retrieval_ties_rank_the_true_item_below_tied_wrong_ones():
    owners = [0, 0, 1, 2]
    r = retrieval_recalls(np.zeros((3, 4)), owners, ks=(1, 3))
    # constant similarities: every image has 4 texts all tied; its own captions go below the
    # others' -> image 0 (2 own) ranks 2, images 1, 2 rank 3; each caption ranks last of 3 images
    assert r["i2t_r1"] == 0.0 and r["t2i_r1"] == 0.0
    assert r["i2t_r3"] == pytest.approx(1 / 3) and r["t2i_r3"] == 1.0
    sim = np.array([
        [0.7, 0.2, 0.7, 0.0],  # image 0: own c0 tied with c2 (image 1) -> rank 1, not a hit at 1
        [0.1, 0.1, 0.6, 0.0],  # image 1: own c2 alone on top -> hit at 1
        [0.0, 0.0, 0.0, 0.5],  # image 2: own c3 alone on top -> hit at 1
    ])
    r = retrieval_recalls(sim, owners, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(2 / 3) and r["i2t_r2"] == 1.0
    # c1 (image 0): 0.2 vs 0.1, 0.0 -> hit; c0 alone on top; c2 0.6 vs 0.7 -> rank 1; c3 hit
    assert r["t2i_r1"] == pytest.approx(3 / 4)
    tied = sim.copy()
    tied[1, 1] = 0.2  # c1 now tied between its image 0 and image 1 -> rank 1
    assert retrieval_recalls(tied, owners, ks=(1,))["t2i_r1"] == pytest.approx(2 / 4)


def test_nan_scores_are_an_error():
    scores = np.random.default_rng(0).normal(size=(5, 4))
    scores[3, 2] = np.nan
    y = np.array([0, 1, 2, 3, 0])
    for fn in (lambda: topk_accuracy(scores, y, 1), lambda: mean_per_class_recall(scores, y),
               lambda: classification_metric("mean_top1_top5", scores, y),
               lambda: voc11_map(scores, np.eye(4, dtype=int)[y]),
               lambda: roc_auc(scores[:, 1:3], [0, 1, 0, 1, 1])):
        with pytest.raises(MetricError, match=r"1 NaN value\(s\) \(first rows: \[3\]\)"):
            fn()
    with pytest.raises(MetricError, match="similarities contain 1 NaN"):
        retrieval_recalls(scores[:4, :4], [0, 1, 2, 3])


def test_world_zeroshot_metrics_use_the_same_tie_and_nan_rules():
    import torch

    from alip.eval.zeroshot import zeroshot_metrics

    out = zeroshot_metrics(torch.zeros(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out == {"top1": 0.0, "top5": 1.0, "mean_per_class_recall": 0.0}  # top-5 capped at 3 classes: trivial
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = zeroshot_metrics(logits, torch.tensor([0, 1, 2, 0]))
    assert out["top1"] == 0.75 and out["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 1) / 3)
    with pytest.raises(MetricError, match="NaN"):
        zeroshot_metrics(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))
