"""The training data path: a batch of captioned rows -> model-ready arrays.

Runs inside Ray Data CPU tasks (map_batches), so the training loop only moves tensors: decoding,
the official augmentation and tokenisation of both texts never block the GPU step.
Pure Python/numpy: unit-testable without Ray.
"""
from __future__ import annotations

import logging

import numpy as np

from alip.data.images import ImageDecodeError, decode_image
from alip.data.schema import CAPTION, IMAGE, KEY, RAW_TEXT

log = logging.getLogger(__name__)


class TrainPreprocessor:
    """Callable for `Dataset.map_batches(TrainPreprocessor, fn_constructor_kwargs=...)` or plain use.

    Holds the transform and the tokenizer (built once per worker, not per batch). Rows whose image
    does not decode are dropped *with a log line naming the key*: the captioning job already routes
    undecodable images to its rejects table, so this only happens on hand-made datasets.
    """

    def __init__(self, image_size: int, context_length: int, train: bool = True, seed: int = 0):
        import open_clip
        import torch

        from alip.model import image_transform

        self.transform = image_transform(image_size, train=train)
        self.image_size = image_size
        self.context_length = context_length
        self._tokenize = lambda texts: open_clip.tokenize(texts, context_length=context_length)
        torch.manual_seed(seed)  # augmentation randomness per task; distinct streams come from Ray's scheduling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = list(batch[KEY])
        images, keep = [], []
        for i, blob in enumerate(batch[IMAGE]):
            try:
                images.append(self.transform(decode_image(bytes(blob))).numpy())
                keep.append(i)
            except ImageDecodeError as e:
                log.warning("skipping row %s in training: %s", keys[i], e.reason)
        raw = [str(batch[RAW_TEXT][i]) for i in keep]
        cap = [str(batch[CAPTION][i]) for i in keep]
        return {
            "image": np.stack(images) if images else np.zeros((0, 3, self.image_size, self.image_size), np.float32),
            "raw_tokens": self._tokenize(raw).numpy() if raw else np.zeros((0, self.context_length), np.int64),
            "caption_tokens": self._tokenize(cap).numpy() if cap else np.zeros((0, self.context_length), np.int64),
        }
