"""The evaluation metrics of the paper's tables, as pure numpy functions.

Classification metrics take ``scores`` of shape (N, C) (logits, probabilities or
decision values: only their order matters) and integer ``targets`` of shape (N,),
except the multi-label ones (VOC2007) whose targets are a binary (N, C) matrix.
Every function returns a fraction in [0, 1]; the tables print percentages.

Ties are scored pessimistically: a class (or text/image) scored exactly as high as the
target is ranked ABOVE it. Otherwise a collapsed model (constant scores) would reach 100%
top-1 and R@1. NaN scores are an error (MetricError), never silently ranked.

Retrieval metrics take an image x text similarity matrix and, for each text, the
index of the image it describes (several captions per image, as in COCO/Flickr).

No torch, no I/O, no Ray: these are pinned by tests against independent
references (scikit-learn, CLIP_benchmark, direct loop implementations).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.stats import rankdata


class MetricError(ValueError):
    """Inputs that a metric cannot be computed on (wrong shapes, one-class data)."""


def _check_no_nan(scores: np.ndarray, what: str = "scores") -> np.ndarray:
    # NaN compares False with everything, so it would silently rank anywhere (or, with
    # "strictly higher" counting, at the top): a broken model must fail the evaluation.
    nan = np.isnan(scores)
    if nan.any():
        rows = np.unique(np.nonzero(nan)[0]) if scores.ndim == 2 else np.nonzero(nan)[0]
        raise MetricError(f"{what} contain {int(nan.sum())} NaN value(s) (first rows: {rows[:5].tolist()}); "
                          "the model or its features are broken")
    return scores


def _as_2d_scores(scores) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise MetricError(f"scores must be a (N, C) matrix, got shape {scores.shape}")
    return _check_no_nan(scores)


def _pessimistic_rank(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target with every tie placed above it: the number of OTHER
    classes scoring >= the target's score."""
    target_scores = scores[np.arange(len(targets)), targets]
    return (scores >= target_scores[:, None]).sum(axis=1) - 1


def _as_labels(targets, n: int, num_classes: int) -> np.ndarray:
    targets = np.asarray(targets)
    if targets.shape != (n,):
        raise MetricError(
            f"targets must be a vector of {n} class indices (one per score row), got shape {targets.shape}"
        )
    if n and (targets.min() < 0 or targets.max() >= num_classes):
        raise MetricError(f"targets must lie in [0, {num_classes}), got range [{targets.min()}, {targets.max()}]")
    return targets.astype(np.int64)


def topk_accuracy(scores, targets, k: int = 1) -> float:
    """Fraction of rows whose target is among the k highest scores.

    With fewer than k classes the top-k accuracy is trivially 1, which would only
    inflate a table: NaN is returned instead (as CLIP_benchmark does for top-5).
    """
    scores = _as_2d_scores(scores)
    targets = _as_labels(targets, scores.shape[0], scores.shape[1])
    if k > scores.shape[1]:
        return float("nan")
    if scores.shape[0] == 0:
        raise MetricError("cannot compute accuracy on an empty set")
    # Ties rank the target below every tied class (torch.topk would break them by index,
    # i.e. in the target's favour by luck).
    return float((_pessimistic_rank(scores, targets) < k).mean())


def mean_per_class_recall(scores, targets) -> float:
    """Mean over the classes present in ``targets`` of that class's top-1 recall
    (CLIP's "mean per class"; identical to sklearn's balanced accuracy when there are no ties;
    a tie for the top score counts as a miss, as in :func:`topk_accuracy`)."""
    scores = _as_2d_scores(scores)
    targets = _as_labels(targets, scores.shape[0], scores.shape[1])
    if scores.shape[0] == 0:
        raise MetricError("cannot compute mean per class recall on an empty set")
    hit = _pessimistic_rank(scores, targets) == 0
    recalls = [float(hit[targets == c].mean()) for c in np.unique(targets)]
    return float(np.mean(recalls))


def mean_top1_top5(scores, targets) -> float:
    """Kinetics700's metric in CLIP's linear-probe table: mean of top-1 and top-5 accuracy."""
    return 0.5 * (topk_accuracy(scores, targets, 1) + topk_accuracy(scores, targets, 5))


def voc11_average_precision(scores, positives) -> float:
    """PASCAL VOC2007's 11-point interpolated average precision for one class.

    AP = mean over recall thresholds t in {0, 0.1, ..., 1} of the highest precision
    reached at any recall >= t (0 when that recall is never reached). This is the
    VOC2007 devkit definition, not sklearn's step-wise (non-interpolated) AP.
    """
    scores = _check_no_nan(np.asarray(scores, dtype=np.float64).ravel())
    positives = np.asarray(positives).astype(bool).ravel()
    if scores.shape != positives.shape:
        raise MetricError(f"scores {scores.shape} and positives {positives.shape} differ in length")
    n_pos = int(positives.sum())
    if n_pos == 0:
        raise MetricError("average precision is undefined for a class with no positive example")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(positives[order])
    precision = tp / np.arange(1, len(scores) + 1)
    recall = tp / n_pos
    thresholds = np.linspace(0.0, 1.0, 11)
    # For each threshold, the max precision over the ranks whose recall reaches it.
    # A suffix maximum of precision makes that one lookup per threshold.
    suffix_max = np.maximum.accumulate(precision[::-1])[::-1]
    first_reaching = np.searchsorted(recall, thresholds - 1e-12, side="left")
    interp = np.where(first_reaching < len(recall), suffix_max[np.minimum(first_reaching, len(recall) - 1)], 0.0)
    return float(interp.mean())


def voc11_map(scores, targets) -> float:
    """Mean over classes of :func:`voc11_average_precision`; ``targets`` is a binary (N, C)
    matrix. Classes without positives in ``targets`` are skipped (the devkit does too)."""
    scores = _as_2d_scores(scores)
    targets = np.asarray(targets)
    if targets.shape != scores.shape:
        raise MetricError(
            f"multi-label targets must be a binary matrix shaped like scores {scores.shape}, got {targets.shape}"
        )
    aps = [voc11_average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1]) if targets[:, c].any()]
    if not aps:
        raise MetricError("no class has a positive example: mAP is undefined")
    return float(np.mean(aps))


def roc_auc(scores, targets) -> float:
    """Binary ROC AUC (Hateful Memes) via the Mann-Whitney U statistic, ties counted half.

    ``scores`` is either a vector of positive-class scores or an (N, 2) matrix whose
    column 1 is the positive class (its difference to column 0 is used, which orders
    samples the same way as the softmax probability).
    """
    scores = _check_no_nan(np.asarray(scores, dtype=np.float64))
    if scores.ndim == 2:
        if scores.shape[1] != 2:
            raise MetricError(f"ROC AUC needs a binary problem, got {scores.shape[1]} score columns")
        scores = scores[:, 1] - scores[:, 0]
    targets = np.asarray(targets).astype(np.int64).ravel()
    if scores.shape != targets.shape:
        raise MetricError(f"scores {scores.shape} and targets {targets.shape} differ in length")
    if not set(np.unique(targets)) <= {0, 1}:
        raise MetricError("ROC AUC targets must be 0/1")
    n_pos = int(targets.sum())
    n_neg = len(targets) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError("ROC AUC is undefined when the targets contain only one class")
    ranks = rankdata(scores)  # average ranks for ties -> each tied pair counts 1/2
    u = ranks[targets == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# The metric names used by the dataset registry (supplement, Table 5).
CLASSIFICATION_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda s, t: topk_accuracy(s, t, 1),
    "mean_per_class": mean_per_class_recall,
    "map11": voc11_map,
    "roc_auc": roc_auc,
    "mean_top1_top5": mean_top1_top5,
}

METRIC_LABELS = {
    "accuracy": "accuracy",
    "mean_per_class": "mean per class",
    "map11": "11-point mAP",
    "roc_auc": "ROC AUC",
    "mean_top1_top5": "mean(top1,top5)",
}


def classification_metric(name: str, scores, targets) -> float:
    """Compute the registry metric ``name`` (one of :data:`CLASSIFICATION_METRICS`)."""
    try:
        fn = CLASSIFICATION_METRICS[name]
    except KeyError:
        raise MetricError(f"unknown metric {name!r}; known: {sorted(CLASSIFICATION_METRICS)}") from None
    return fn(scores, targets)


def retrieval_recalls(
    similarity, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10), chunk: int = 1024
) -> dict[str, float]:
    """Image->text and text->image Recall@K, CLIP-paper style.

    similarity: (num_images, num_texts) matrix (e.g. cosine similarities).
    text_to_image: for each text, the index of the image it captions.
    Image->text: an image is a hit at k when ANY of its captions is in its top k texts.
    Text->image: each caption is a query; a hit when its own image is in its top k.
    Returns keys ``i2t_r{k}`` and ``t2i_r{k}`` (fractions). Ties rank the true item below every
    tied wrong one (a constant similarity matrix gives R@1 = 0, not 1); NaN is an error.
    """
    sim = _check_no_nan(np.asarray(similarity, dtype=np.float32), "similarities")
    t2i = np.asarray(text_to_image, dtype=np.int64)
    if sim.ndim != 2 or sim.shape[1] != len(t2i):
        raise MetricError(f"similarity must be (num_images, num_texts={len(t2i)}), got {sim.shape}")
    n_img, n_txt = sim.shape
    if n_txt and (t2i.min() < 0 or t2i.max() >= n_img):
        raise MetricError("text_to_image holds an index outside [0, num_images)")
    if len(np.unique(t2i)) != n_img:
        raise MetricError("every image needs at least one caption for image->text recall")

    # Text -> image: rank of the true image among all images for each caption; every other
    # image scoring >= the true one is placed above it (the true one itself is the -1).
    true_score = sim[t2i, np.arange(n_txt)]
    t2i_rank = np.empty(n_txt, dtype=np.int64)
    for s in range(0, n_txt, chunk):
        block = sim[:, s : s + chunk]
        t2i_rank[s : s + chunk] = (block >= true_score[None, s : s + chunk]).sum(axis=0) - 1

    # Image -> text: the best-placed of the image's own captions decides the hit; every
    # caption of ANOTHER image scoring >= it is placed above it.
    positive = np.zeros((n_img, n_txt), dtype=bool)
    positive[t2i, np.arange(n_txt)] = True
    best_pos = np.where(positive, sim, -np.inf).max(axis=1)
    i2t_rank = ((sim >= best_pos[:, None]) & ~positive).sum(axis=1)

    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).mean())
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i_rank < k).mean())
    return out
