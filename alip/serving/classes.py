"""Zero-shot class features for the service: batched, bounded and cancellable.

A class-cache miss encodes labels x templates prompts (up to `max_class_prompts`, e.g. 100 labels x
80 ImageNet templates = 8,000 text forwards). Computing them as one call would hold a thread for
the whole time and keep running after the client has gone. Here the prompts are encoded in
batches of `batch_size`, with an `await` between batches: cancelling the request (Serve cancels
it when the client disconnects or the request times out) stops the work at the next batch.

The result equals `alip.eval.zeroshot.build_classifier`: per label, the mean of the L2-normalised
prompt embeddings, normalised again; returned as [D, C].
"""
from __future__ import annotations

from typing import Awaitable, Callable, Sequence

import torch
import torch.nn.functional as F

from alip.serving.inputs import Template

#: (prompts, where each came from) -> L2-normalised embeddings [N, D]; the caller validates and
#: tokenises the prompts (a ClientError names the label and template of a bad one) and runs the
#: forward off the event loop
EncodeBatch = Callable[[list[str], list[str]], Awaitable[torch.Tensor]]


async def class_features(encode: EncodeBatch, labels: Sequence[str], templates: Sequence[Template],
                         batch_size: int) -> torch.Tensor:
    """[D, C] class text features, encoded `batch_size` prompts at a time."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not labels or not templates:
        raise ValueError("class features need at least one label and one template")
    n_t = len(templates)
    n = len(labels) * n_t
    feats: list[torch.Tensor] = []
    for start in range(0, n, batch_size):
        # prompts are built one batch at a time, label-major (the order build_classifier uses)
        idx = range(start, min(start + batch_size, n))
        prompts = [templates[i % n_t].fill(labels[i // n_t]) for i in idx]
        origin = [f"label {labels[i // n_t]!r} in template {templates[i % n_t].text!r}" for i in idx]
        feats.append(await encode(prompts, origin))  # the cancellation point between batches
    emb = torch.cat(feats).view(len(labels), n_t, -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1).T.contiguous()
