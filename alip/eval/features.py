"""Frozen-encoder feature extraction shared by the three protocols.

Features are L2-normalised (the space zero-shot and retrieval score in; for the linear probe
the C sweep absorbs the scale) and returned as float32 CPU tensors, so the scoring that follows
(pure numpy / scikit-learn) never needs the accelerator.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from alip.eval.datasets import ImageList, TransformedImages

log = logging.getLogger(__name__)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, amp: bool):
    # bf16 autocast only on CUDA: CPU autocast is slower than fp32 for these small matmuls.
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def encode_images(model, images: ImageList, transform: Callable, *, batch_size: int = 128, num_workers: int = 0,
                  amp: bool = False, desc: str = "images") -> torch.Tensor:
    """(N, D) normalised image features, in the order of ``images``."""
    device = model_device(model)
    loader = torch.utils.data.DataLoader(
        TransformedImages(images, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    feats = torch.empty(0)
    chunks, done, t0, last = [], 0, time.time(), time.time()
    for batch, _ in loader:
        with _autocast(device, amp):
            chunks.append(model.encode_image(batch.to(device, non_blocking=True), normalize=True).float().cpu())
        done += len(batch)
        if time.time() - last > 30:  # progress for long test sets, quiet for small ones
            log.info("%s: encoded %d/%d images (%.0f img/s)", desc, done, len(images), done / (time.time() - t0))
            last = time.time()
    if chunks:
        feats = torch.cat(chunks)
    return feats


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 256, amp: bool = False) -> torch.Tensor:
    """(N, D) normalised text features."""
    device = model_device(model)
    chunks = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i : i + batch_size])).to(device)
        with _autocast(device, amp):
            chunks.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)
