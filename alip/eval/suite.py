"""Run the paper's protocols on registry datasets and lay the results out like the paper's tables.

Library use, no Ray::

    from alip.model import load_model
    from alip.eval.suite import evaluate, format_table
    model = load_model("runs/tiny/export")
    results = evaluate(model, ["world"])                 # or ["zeroshot-11"], ["linear_probe:voc2007"], ...
    print(format_table({"ALIP": results}))

``evaluate`` returns plain JSON-able dicts::

    {"zeroshot":     {dataset: {"top1", "top5", "mean_per_class_recall", "n_test", ...}},
     "linear_probe": {dataset: {"metric", "score", "C", "val_score", "n_train", "n_test", ...}},
     "retrieval":    {dataset: {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "n_images", "n_texts"}},
     "errors":       {"protocol:dataset": message}}
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from alip.eval.datasets import ClassificationSplit, RetrievalSplit, load_split
from alip.eval.features import encode_images, encode_texts, model_device
from alip.eval.linear_probe import LinearProbeConfig, linear_probe
from alip.eval.metrics import METRIC_LABELS, mean_per_class_recall, retrieval_recalls, topk_accuracy, voc11_map
from alip.eval.registry import (LINEAR_PROBE_26, PROTOCOLS, REGISTRY, RETRIEVAL, WORLD, ZEROSHOT_11, DatasetSpec,
                                expand_tasks, get_spec)

log = logging.getLogger(__name__)

RETRIEVAL_KS = (1, 5, 10)


@dataclass(frozen=True)
class EvalOptions:
    """Knobs shared by every dataset of a run (the protocols themselves are fixed by the paper)."""

    data_root: str | None = None  # None -> $ALIP_EVAL_DATA -> ./eval_data
    batch_size: int = 128
    num_workers: int = 0  # DataLoader workers for image decoding
    amp: bool = False  # bf16 autocast on CUDA
    max_samples: int | None = None  # cap each split (seeded subsample) for smoke runs; None = full protocol
    world_n: int = 300  # built-in world: test images per task
    world_train_n: int = 600  # built-in world: train images per task (linear probe)
    seed: int = 0
    skip_missing: bool = False  # record a missing/malformed dataset in "errors" instead of raising
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError(f"max_samples must be positive or None, got {self.max_samples}")


def _cap(split, max_samples: int | None, seed: int):
    """A seeded random subset of at most max_samples items (same subset every run)."""
    if max_samples is None or len(split) <= max_samples:
        return split
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:max_samples])
    if isinstance(split, RetrievalSplit):
        return RetrievalSplit(split.name, split.split, split.images.subset(idx),
                              [split.captions[i] for i in idx], layout=split.layout)
    return ClassificationSplit(split.name, split.split, split.images.subset(idx), split.labels[idx],
                               split.classnames, split.templates, layout=split.layout)


def _load(spec: DatasetSpec, split: str, opts: EvalOptions):
    n = opts.world_train_n if split == "train" else opts.world_n
    data = load_split(spec, split, opts.data_root, world_n=n, world_seed=1000 + opts.seed)
    return _cap(data, opts.max_samples, opts.seed)


def _nan_to_none(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def zeroshot_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """top-1 / top-5 / mean per class recall (multi-label data: 11-point mAP)."""
    if labels.ndim == 2:
        return {"map11": voc11_map(logits, labels)}
    return _nan_to_none({
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(logits, labels),
    })


def _zeroshot(model, tokenizer, spec: DatasetSpec, test: ClassificationSplit, feats: torch.Tensor) -> dict:
    from alip.eval.zeroshot import build_classifier, get_templates

    templates = get_templates(spec.prompt_set)
    classifier = build_classifier(model, tokenizer, test.classnames, templates, device=model_device(model))
    logits = (feats @ classifier.float().cpu()).numpy()
    out = zeroshot_metrics(logits, test.labels)
    out.update(prompt_set=spec.prompt_set, n_templates=len(templates), n_classes=len(test.classnames),
               n_test=len(test))
    return out


def _retrieval(model, tokenizer, test: RetrievalSplit, feats: torch.Tensor, opts: EvalOptions) -> dict:
    texts, owners = test.texts_and_owners
    text_feats = encode_texts(model, tokenizer, texts, batch_size=max(opts.batch_size, 256), amp=opts.amp)
    out = retrieval_recalls((feats @ text_feats.T).numpy(), owners, RETRIEVAL_KS)
    out.update(n_images=len(test), n_texts=len(texts))
    return out


def evaluate_dataset(model, dataset: str, protocols: Iterable[str], options: EvalOptions = EvalOptions(), *,
                     tokenizer=None, transform: Callable | None = None) -> dict[str, dict]:
    """Run the given protocols on one dataset, sharing its test-image features between them.

    Returns {protocol: metrics}. Raises DatasetNotFoundError (with the expected layout) when the
    data is not on disk.
    """
    from alip.model import get_tokenizer, image_transform

    spec = get_spec(dataset)
    protocols = list(dict.fromkeys(protocols))
    bad = [p for p in protocols if p not in spec.protocols]
    if bad:
        raise ValueError(f"{spec.name} does not support {bad} (supported: {', '.join(spec.protocols)})")
    tokenizer = tokenizer or get_tokenizer(model)
    transform = transform or image_transform(model, train=False)
    model.eval()
    t0 = time.time()
    test = _load(spec, "test", options)
    enc = dict(batch_size=options.batch_size, num_workers=options.num_workers, amp=options.amp)
    test_feats = encode_images(model, test.images, transform, desc=f"{spec.name}/test", **enc)
    out: dict[str, dict] = {}
    for protocol in protocols:
        t1 = time.time()
        if protocol == "retrieval":
            res = _retrieval(model, tokenizer, test, test_feats, options)
        elif protocol == "zeroshot":
            res = _zeroshot(model, tokenizer, spec, test, test_feats)
        elif protocol == "linear_probe":
            train = _load(spec, "train", options)
            train_feats = encode_images(model, train.images, transform, desc=f"{spec.name}/train", **enc)
            n_classes = max(len(train.classnames), len(test.classnames))
            lp = linear_probe(train_feats.numpy(), train.labels, test_feats.numpy(), test.labels,
                              spec.metric, n_classes, options.linear_probe)
            res = {"metric": spec.metric, **lp.as_dict(), "n_train": len(train), "n_test": len(test),
                   "n_classes": n_classes}
        else:
            raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
        res["seconds"] = round(time.time() - t1, 3)
        out[protocol] = res
    log.info("%s: %s done in %.1fs", spec.name, "+".join(protocols), time.time() - t0)
    return out


def group_by_dataset(jobs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(protocol, dataset) jobs -> {dataset: [protocols]}: one unit of work (and Ray task) per dataset."""
    grouped: dict[str, list[str]] = {}
    for protocol, dataset in jobs:
        grouped.setdefault(dataset, []).append(protocol)
    return grouped


def empty_results() -> dict:
    return {p: {} for p in PROTOCOLS} | {"errors": {}}


def merge_dataset_result(results: dict, dataset: str, protocols: list[str], by_protocol: dict | None,
                         error: str | None) -> None:
    """Fold one dataset's outcome into a results dict (in place)."""
    for p in protocols:
        if error is not None:
            results["errors"][f"{p}:{dataset}"] = error
        else:
            results[p][dataset] = by_protocol[p]


def evaluate(model, dataset_names: Iterable[str], options: EvalOptions = EvalOptions(), *, tokenizer=None,
             transform: Callable | None = None) -> dict:
    """Evaluate ``model`` (an alip.model.ALIPModel, or any CLIP-like module with encode_image /
    encode_text(normalize=...)) on datasets / suites, sequentially, in this process.

    ``dataset_names`` items: suite names (zeroshot-11, linear-probe-26, retrieval, world, paper),
    ``protocol:dataset`` or bare dataset names (every protocol the dataset supports).
    """
    from alip.model import get_tokenizer, image_transform

    tokenizer = tokenizer or get_tokenizer(model)  # built once: open_clip's BPE load takes ~1 s
    transform = transform or image_transform(model, train=False)
    results = empty_results()
    for dataset, protocols in group_by_dataset(expand_tasks(list(dataset_names))).items():
        try:
            by_protocol, error = evaluate_dataset(model, dataset, protocols, options, tokenizer=tokenizer,
                                                  transform=transform), None
        except ValueError as e:  # DatasetNotFoundError, DatasetFormatError, MetricError, LinearProbeError
            if not options.skip_missing:
                raise
            log.warning("skipping %s: %s", dataset, str(e).splitlines()[0])
            by_protocol, error = None, f"{type(e).__name__}: {e}"
        merge_dataset_result(results, dataset, protocols, by_protocol, error)
    return results


# ----------------------------------------------------------------------------------------------
# Tables

_HEADLINE = {  # the number each protocol's table shows
    "zeroshot": lambda m: m.get("top1") if "top1" in m else m.get("map11"),
    "linear_probe": lambda m: m.get("score"),
}
_ORDER = {name: i for i, name in enumerate(ZEROSHOT_11 + LINEAR_PROBE_26 + RETRIEVAL + WORLD + tuple(REGISTRY))}


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _classification_table(protocol: str, results_by_model: Mapping[str, Mapping]) -> list[str]:
    datasets = sorted({d for r in results_by_model.values() for d in r.get(protocol, {})},
                      key=lambda d: _ORDER.get(d, 10**6))
    if not datasets:
        return []
    if protocol == "zeroshot":
        title = "Zero-shot classification: top-1 accuracy (%), prompt ensembles of the supplement's Table 4"
    else:
        title = "Linear probe (%): each dataset's metric from the supplement's Table 5"
    lines = [f"### {title}", ""]
    if protocol == "linear_probe":
        special = {}
        for d in datasets:
            spec = REGISTRY.get(d)
            if spec and spec.metric != "accuracy":
                special.setdefault(METRIC_LABELS[spec.metric], []).append(spec.title)
        if special:
            lines += ["Metric: accuracy, except " + "; ".join(f"{m}: {', '.join(t)}" for m, t in special.items()), ""]
    titles = [REGISTRY[d].title if d in REGISTRY else d for d in datasets]
    lines.append(_row(["Method"] + titles + ["Average"]))
    lines.append(_row(["---"] + ["---:"] * (len(titles) + 1)))
    partial = False
    for model_name, res in results_by_model.items():
        values = [_HEADLINE[protocol](res.get(protocol, {}).get(d, {})) for d in datasets]
        present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        avg = float(np.mean(present)) if present else None
        if len(present) < len(values):
            partial = True
        lines.append(_row([model_name] + [_pct(v) for v in values] + [_pct(avg) + ("*" if len(present) < len(values) else "")]))
    if partial:
        lines += ["", "\\* average over the datasets this model has results for (– = not evaluated / missing)."]
    return lines + [""]


def _retrieval_table(results_by_model: Mapping[str, Mapping]) -> list[str]:
    datasets = sorted({d for r in results_by_model.values() for d in r.get("retrieval", {})},
                      key=lambda d: _ORDER.get(d, 10**6))
    if not datasets:
        return []
    lines = ["### Zero-shot retrieval: Recall@K (%), I2T = image->text, T2I = text->image", ""]
    header, keys = ["Method"], []
    for d in datasets:
        title = REGISTRY[d].title if d in REGISTRY else d
        for direction in ("i2t", "t2i"):
            for k in RETRIEVAL_KS:
                header.append(f"{title} {direction.upper()} R@{k}")
                keys.append((d, f"{direction}_r{k}"))
    lines.append(_row(header))
    lines.append(_row(["---"] + ["---:"] * len(keys)))
    for model_name, res in results_by_model.items():
        ret = res.get("retrieval", {})
        lines.append(_row([model_name] + [_pct(ret.get(d, {}).get(key)) for d, key in keys]))
    return lines + [""]


def format_table(results_by_model: Mapping[str, Mapping]) -> str:
    """Markdown tables shaped like the paper's: datasets as columns (+ Average), one row per model
    (e.g. {"CLIP": ..., "ALIP": ...} gives Table 6's CLIP-vs-ALIP rows). Errors are listed below."""
    if not results_by_model:
        raise ValueError("format_table needs at least one model's results")
    lines = (_classification_table("zeroshot", results_by_model)
             + _classification_table("linear_probe", results_by_model)
             + _retrieval_table(results_by_model))
    errors = [(m, job, msg) for m, r in results_by_model.items() for job, msg in r.get("errors", {}).items()]
    if errors:
        lines += ["### Not evaluated", ""]
        lines += [f"- {m} / {job}: {msg.splitlines()[0]}" for m, job, msg in errors]
        lines.append("")
    if not lines:
        return "(no results)\n"
    return "\n".join(lines)
