"""Zero-shot classification with prompt ensembles (CLIP's protocol, the paper's Table 4 prompts).

A class's text feature is the normalised mean over templates of the normalised text embeddings of
"template.format(label=classname)"; an image is assigned the class with the highest cosine.
The template lists ship as package data (prompt_templates.json), transcribed from the supplement.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

_TEMPLATES_FILE = Path(__file__).with_name("prompt_templates.json")


@lru_cache(maxsize=1)
def _load() -> dict[str, tuple[str, ...]]:
    data = json.loads(_TEMPLATES_FILE.read_text())
    return {k: tuple(v) for k, v in data["prompt_sets"].items()}


PROMPT_SETS: dict[str, tuple[str, ...]] = _load()


def get_templates(name_or_templates: str | Sequence[str]) -> list[str]:
    """A named prompt set, or a custom list of templates (each must contain "{label}")."""
    if isinstance(name_or_templates, str):
        if name_or_templates not in PROMPT_SETS:
            raise ValueError(
                f"unknown prompt set {name_or_templates!r}; named sets: {', '.join(sorted(PROMPT_SETS))} "
                "(or pass a list of templates containing '{label}')"
            )
        return list(PROMPT_SETS[name_or_templates])
    templates = list(name_or_templates)
    if not templates:
        raise ValueError("the template list is empty")
    bad = [t for t in templates if "{label}" not in t]
    if bad:
        raise ValueError(f"every template must contain '{{label}}'; these do not: {bad[:3]}")
    return templates


@torch.no_grad()
def build_classifier(model, tokenizer, classnames: Sequence[str], templates: str | Sequence[str],
                     device: str | torch.device | None = None, batch_size: int = 256) -> torch.Tensor:
    """[embed_dim, n_classes] matrix of class text features (normalised mean over templates)."""
    templates = get_templates(templates)
    if not classnames:
        raise ValueError("no class names given")
    device = device or next(model.parameters()).device
    texts = [t.format(label=c) for c in classnames for t in templates]
    feats = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i:i + batch_size]).to(device)
        feats.append(model.encode_text(tokens, normalize=True).float())
    feats = torch.cat(feats).view(len(classnames), len(templates), -1)
    return F.normalize(F.normalize(feats, dim=-1).mean(dim=1), dim=-1).T.contiguous()


@torch.no_grad()
def classify(model, classifier: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity logits [N, n_classes] (unscaled) of preprocessed images."""
    feats = model.encode_image(images.to(classifier.device), normalize=True).float()
    return feats @ classifier


@torch.no_grad()
def zeroshot_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 (top-k capped at the class count) and mean per-class recall.

    The metrics of alip.eval.metrics: ties rank the target below every tied class and NaN
    logits are an error (a collapsed model must not score 100%)."""
    from alip.eval.metrics import mean_per_class_recall, topk_accuracy

    scores = torch.as_tensor(logits).detach().float().cpu().numpy()
    targets = torch.as_tensor(labels, dtype=torch.long).cpu().numpy()
    return {"top1": topk_accuracy(scores, targets, 1),
            "top5": topk_accuracy(scores, targets, min(5, scores.shape[1])),
            "mean_per_class_recall": mean_per_class_recall(scores, targets)}


@torch.no_grad()
def evaluate_world_zeroshot(model, n: int = 300, seed: int = 0, tasks: Sequence[str] | None = None,
                            batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Zero-shot on the built-in world's held-out splits (shape, colour, colour_shape, pattern)."""
    from alip.data.world import WORLD_TASKS, world_eval_split
    from alip.model import get_tokenizer, image_transform

    model.eval()
    tokenizer = get_tokenizer(model)
    transform = image_transform(model, train=False)
    results = {}
    for task in tasks or sorted(WORLD_TASKS):
        images, labels, classnames = world_eval_split(task, n=n, seed=seed, transform=transform)
        classifier = build_classifier(model, tokenizer, classnames, "world")
        logits = torch.cat([classify(model, classifier, images[i:i + batch_size])
                            for i in range(0, len(images), batch_size)])
        results[task] = zeroshot_metrics(logits, torch.as_tensor(labels))
    return results
