"""CLIP's linear-probe protocol on frozen features (pure numpy + scikit-learn).

1. Carve a validation split out of train (stratified when every class has >= 2 samples).
2. Sweep the inverse regularisation C of an L-BFGS logistic regression (max_iter 1000):
   a coarse log-spaced grid (10^-6 .. 10^6), then a binary refinement around the best exponent
   (CLIP's parametric search: halve the step, try best +/- step, keep the best), scoring each C
   on the validation split with the dataset's own metric (Table 5).
3. Fit once more with the chosen C on train + validation and report the metric on test.

Multi-label data (VOC2007) uses one binary logistic regression per class (one-vs-rest).
Ties on the validation score (common: accuracy is flat over decades of C on easy data) go to the
middle of the tied range, not to an edge of the grid where the fit is least stable.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.multiclass import OneVsRestClassifier

from alip.eval.metrics import classification_metric

log = logging.getLogger(__name__)


class LinearProbeError(ValueError):
    """Data the linear probe cannot be fit on (too few samples, a single class, shape mismatch)."""


@dataclass(frozen=True)
class LinearProbeConfig:
    coarse_exponents: tuple[float, ...] = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0)  # C = 10 ** e
    refine_steps: int = 3  # after the coarse grid: steps of 1, 0.5, 0.25 decades around the best
    val_fraction: float = 0.2
    max_iter: int = 1000
    refit_on_train_val: bool = True
    seed: int = 0
    # BLAS threads for the fits. None = automatic: 1 thread for small problems, where thread
    # hand-offs cost more than the tiny GEMMs they split (measured 15x slower with 2 threads on
    # 600x64 features), the library default for large ones (ImageNet-sized feature matrices).
    blas_threads: int | None = None

    def __post_init__(self):
        if not self.coarse_exponents:
            raise ValueError("coarse_exponents must hold at least one exponent")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class LinearProbeResult:
    score: float  # the dataset's metric on test
    C: float
    val_score: float
    sweep: list[tuple[float, float]] = field(default_factory=list)  # (C, val score) in evaluation order

    def as_dict(self) -> dict:
        return {"score": self.score, "C": self.C, "val_score": self.val_score,
                "sweep": [[c, s] for c, s in self.sweep]}


def _make_model(C: float, multilabel: bool, max_iter: int, seed: int):
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed)
    return OneVsRestClassifier(clf) if multilabel else clf


def _scores(model, x: np.ndarray, num_classes: int, multilabel: bool) -> np.ndarray:
    """(N, num_classes) decision values; classes unseen in training get -inf (never predicted)."""
    d = model.decision_function(x)
    if multilabel:
        return d.reshape(len(x), -1)
    classes = model.classes_
    if d.ndim == 1:  # binary: decision value is the logit of classes_[1]
        d = np.stack([-d / 2, d / 2], axis=1)
    out = np.full((len(x), num_classes), -np.inf)
    out[:, classes] = d
    return out


def _fit_score(C, x_tr, y_tr, x_ev, y_ev, metric, num_classes, multilabel, cfg) -> tuple[float, object]:
    model = _make_model(C, multilabel, cfg.max_iter, cfg.seed)
    with warnings.catch_warnings():
        # L-BFGS may stop at max_iter on tiny C / large C ends of the sweep: that is part of the
        # protocol (CLIP uses max_iter 1000 too), not worth a warning per sweep point.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_tr, y_tr)
    return classification_metric(metric, _scores(model, x_ev, num_classes, multilabel), y_ev), model


def _check(x, y, name):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if x.ndim != 2 or len(x) != len(y):
        raise LinearProbeError(f"{name}: features must be (N, D) with one label row each; got {x.shape} and {y.shape}")
    return x, y


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, val); stratified for single-label data when every class has >= 2 samples."""
    idx = np.arange(len(y))
    stratify = None
    if y.ndim == 1:
        counts = np.bincount(y)
        counts = counts[counts > 0]
        n_val = math.ceil(fraction * len(y))
        if counts.min() >= 2 and n_val >= len(counts) and len(y) - n_val >= len(counts):
            stratify = y
    tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(va)


def sweep_c(x: np.ndarray, y: np.ndarray, metric: str, num_classes: int, cfg: LinearProbeConfig = LinearProbeConfig()
            ) -> tuple[float, float, list[tuple[float, float]]]:
    """Choose C on a validation split carved from (x, y). Returns (best C, its val score, sweep)."""
    x, y = _check(x, y, "train")
    multilabel = y.ndim == 2
    if not multilabel and len(np.unique(y)) < 2:
        raise LinearProbeError("the training split holds a single class: nothing to separate")
    tr, va = validation_split(y, cfg.val_fraction, cfg.seed)
    results: dict[float, float] = {}

    def evaluate(e: float) -> float:
        e = round(e, 6)
        if e not in results:
            results[e] = _fit_score(10.0 ** e, x[tr], y[tr], x[va], y[va], metric, num_classes, multilabel, cfg)[0]
            log.debug("C=1e%+.2f val %s=%.4f", e, metric, results[e])
        return results[e]

    def best_of(exps):
        scores = {e: np.nan_to_num(evaluate(e), nan=-np.inf) for e in exps}
        top = max(scores.values())
        tied = sorted(e for e, v in scores.items() if v >= top - 1e-12)
        return tied[(len(tied) - 1) // 2]  # the middle of a plateau of equally good C

    coarse = sorted(float(e) for e in cfg.coarse_exponents)
    best = best_of(coarse)
    step = (coarse[-1] - coarse[0]) / (len(coarse) - 1) if len(coarse) > 1 else 1.0
    for _ in range(cfg.refine_steps):
        step /= 2
        best = best_of([best - step, best, best + step])
    sweep = [(10.0 ** e, s) for e, s in results.items()]
    return 10.0 ** best, results[round(best, 6)], sweep


_SMALL_PROBLEM = 5_000_000  # n_train * dim below which one BLAS thread is faster


def linear_probe(train_x, train_y, test_x, test_y, metric: str, num_classes: int,
                 cfg: LinearProbeConfig = LinearProbeConfig()) -> LinearProbeResult:
    """The full protocol: sweep C on a train/val split, refit with it, score test with ``metric``."""
    x = np.asarray(train_x)
    threads = cfg.blas_threads or (1 if x.size < _SMALL_PROBLEM else None)
    with threadpool_limits(limits=threads, user_api="blas"):
        return _linear_probe(train_x, train_y, test_x, test_y, metric, num_classes, cfg)


def _linear_probe(train_x, train_y, test_x, test_y, metric, num_classes, cfg) -> LinearProbeResult:
    train_x, train_y = _check(train_x, train_y, "train")
    test_x, test_y = _check(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise LinearProbeError(f"train features have {train_x.shape[1]} dims, test features {test_x.shape[1]}")
    C, val_score, sweep = sweep_c(train_x, train_y, metric, num_classes, cfg)
    if cfg.refit_on_train_val:
        fit_x, fit_y = train_x, train_y
    else:
        tr, _ = validation_split(train_y, cfg.val_fraction, cfg.seed)
        fit_x, fit_y = train_x[tr], train_y[tr]
    score, _ = _fit_score(C, fit_x, fit_y, test_x, test_y, metric, num_classes, train_y.ndim == 2, cfg)
    return LinearProbeResult(score=score, C=C, val_score=val_score, sweep=sweep)
