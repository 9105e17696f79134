"""The training data path: a batch of captioned rows -> compact, model-ready arrays.

Runs inside the Ray tasks that read each rank's rows (alip.pretrain.rank_reader), so the training
loop only moves tensors: decoding, the official augmentation and tokenisation of both texts never
block the GPU step. What leaves these tasks is deliberately small, because every byte crosses the
object store and the host-to-device link once per sample:

* images as **uint8** [N, 3, S, S] (raw pixels, 147 KiB at 224 px instead of 588 KiB of float32);
  the trainer converts and normalises them on the device (`ALIPTrainer.train_step` accepts uint8);
* tokens as **uint16** (open_clip's BPE vocabulary has 49,408 ids), widened to int64 in the
  trainer process (`alip.pretrain.job.rank_batches`).

Decoding is reduced-size where it can be: a random resized crop of a 2000x1500 photo only needs a
few hundred source pixels per side, so the JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT
(`Image.draft`, libjpeg's scaled IDCT) whenever the crop still has at least S pixels per side at
that scale; the bicubic resize then starts from that image. Nothing is ever upsampled that the
official path would not have upsampled.

The augmentation is the official ALIP one (`alip.model.image_transform(train=True)`): torchvision's
RandomResizedCrop algorithm (area 0.7-1.0, aspect 0.8-1.25, 10 tries then a centre fallback, integer
boxes), bicubic with antialiasing, horizontal flip p=0.5. Differences, all measured in
tests/test_pretrain_data.py:
* the bicubic resize is torch's uint8 antialiased kernel (PIL's filter, vectorised; about 4x
  faster than PIL's `resize` on one core): the pixels agree with the official path within 2 grey
  levels (most exactly) when the JPEG is decoded at full size;
* with reduced-size decoding the first reduction is libjpeg's DCT scaling rather than the bicubic
  filter (a slightly different low-pass before the same bicubic resize), and the box is rounded to
  whole decoded pixels; it applies only to crops at least twice the output size (mean difference
  about half a grey level, sharp edges up to ~15);
* randomness: each row's crop and flip come from its own generator seeded by (seed, epoch, row
  key), not from torch's global RNG. torchvision draws from one process-wide stream, and the old
  `torch.manual_seed(seed)` in every data task gave every task the SAME stream (the k-th image of
  each task got the same crop). Per-row seeds give distinct, reproducible augmentation that does
  not depend on which task or process handles a row. Without an epoch (no `epoch` column and no
  `epoch` argument) the process id and a batch counter stand in for it: distinct, not reproducible.

Pure Python/numpy/PIL: unit-testable without Ray.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, ImageOps

from alip.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, open_checked, to_rgb
from alip.data.schema import CAPTION, IMAGE, KEY, RAW_TEXT

log = logging.getLogger(__name__)

IMAGE_DTYPE = np.uint8
TOKEN_DTYPE = np.uint16
#: Optional input column: the epoch a row is read in (part of its augmentation seed).
EPOCH = "epoch"
#: DCT scale reductions libjpeg offers through `Image.draft`, largest first.
DRAFT_FACTORS = (8, 4, 2)
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_AXES = {5, 6, 7, 8}


@dataclass(frozen=True)
class AugmentConfig:
    """The official ALIP train augmentation (`alip.model.image_transform(train=True)`)."""

    scale: tuple[float, float] = (0.7, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (0.8, 1.25)  # crop aspect ratio w/h, sampled log-uniformly
    hflip: float = 0.5  # probability of a horizontal flip


@dataclass(frozen=True)
class CropBox:
    """A crop in the (EXIF-oriented) source image's pixel coordinates."""

    left: float
    top: float
    width: float
    height: float


#: Chooses the crop for an image of (width, height) before any pixel is decoded: (box, flip).
CropChooser = Callable[[int, int], tuple[CropBox, bool]]


def sample_crop(rng: random.Random, width: int, height: int, aug: AugmentConfig = AugmentConfig()) -> CropBox:
    """torchvision's `RandomResizedCrop.get_params`, step for step, drawing from `rng`."""
    area = width * height
    log_lo, log_hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(aug.scale[0], aug.scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randrange(height - h + 1)
            left = rng.randrange(width - w + 1)
            return CropBox(left, top, w, h)
    # Fallback: the central crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < min(aug.ratio):
        w, h = width, int(round(width / min(aug.ratio)))
    elif in_ratio > max(aug.ratio):
        w, h = int(round(height * max(aug.ratio))), height
    else:
        w, h = width, height
    return CropBox((width - w) // 2, (height - h) // 2, w, h)


def center_crop(width: int, height: int) -> CropBox:
    """The largest centred square: what open_clip's eval transform (resize shortest side, centre
    crop) shows, used when augmentation is off."""
    side = min(width, height)
    return CropBox((width - side) / 2, (height - side) / 2, side, side)


def draft_factor(box: CropBox, size: int) -> int:
    """The largest DCT reduction (8, 4, 2, else 1) after which the crop still has >= `size`
    pixels per side, so the bicubic resize never has to enlarge what the full decode had."""
    shortest = min(box.width, box.height)
    return next((f for f in DRAFT_FACTORS if shortest / f >= size), 1)


def row_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The augmentation generator of one row: a function of (seed, epoch, key) only. (Python's
    Mersenne Twister seeded from a BLAKE2 digest: a few microseconds per row, where a numpy
    Generator costs ten times that in seeding and per-draw overhead.)"""
    digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{key}".encode("utf-8"), digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "little"))


def decode_resized_crop(data: bytes | None, size: int, choose: CropChooser,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> the chosen crop, bicubic-resized to size x size, as uint8 [3, size, size].

    `choose(width, height)` gets the EXIF-oriented size from the header, before decoding, so the
    JPEG can be decoded at reduced size when the crop allows it. Raises ImageDecodeError for the
    same inputs as `alip.data.images.decode_image` (missing, empty, unknown, corrupt, truncated,
    over `max_pixels`)."""
    with open_checked(data, max_pixels) as img:
        width, height = img.size
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        oriented = (height, width) if orientation in _SWAPS_AXES else (width, height)
        box, flip = choose(*oriented)
        factor, scale = draft_factor(box, size), 1.0
        if factor > 1:
            # Only JPEG implements draft (others return None and decode at full size). The
            # reduction is the same on both axes, so it can be asked for in stored coordinates.
            drafted = img.draft(img.mode, (width // factor, height // factor))
            if drafted is not None:
                scale = width / drafted[1][2]
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        pixels = np.asarray(to_rgb(img))  # HWC uint8
    if scale != 1.0:
        box = CropBox(box.left / scale, box.top / scale, box.width / scale, box.height / scale)
    return resize_crop(pixels, box, size, flip)


def resize_crop(pixels: np.ndarray, box: CropBox, size: int, flip: bool = False) -> np.ndarray:
    """uint8 HWC pixels -> the box, bicubic-resized to size x size (optionally mirrored), as uint8
    [3, size, size].

    torch's uint8 antialiased bicubic (`interpolate(..., antialias=True)`) is PIL's resampling
    filter (same kernel, a = -0.5, same support scaling; outputs agree within one grey level) in
    AVX2 code, about 4x faster than PIL's `resize` on one core. The box is rounded to whole pixels
    (exact for the integer boxes of the crop sampler; after reduced-size decoding a shift of under
    half a decoded pixel)."""
    height, width = pixels.shape[:2]
    left = min(max(int(round(box.left)), 0), width - 1)
    top = min(max(int(round(box.top)), 0), height - 1)
    right = min(max(int(round(box.left + box.width)), left + 1), width)
    bottom = min(max(int(round(box.top + box.height)), top + 1), height)
    crop = pixels[top:bottom, left:right]
    if not crop.flags.writeable:
        # np.asarray(PIL image) is a read-only view of the image's bytes: a tensor over it is
        # undefined behaviour on a write. Copying the crop costs about 3% of the resize below.
        crop = crop.copy()
    crop = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return (out.flip(-1) if flip else out).numpy()


def open_clip_tokenize():
    """open_clip's `tokenize` (its BPE tokenizer, `open_clip/tokenizer.py`), without importing the
    open_clip package: `import open_clip` pulls in every model, timm and huggingface_hub (~5 s and
    ~250 MB more than torch on this box), in every read task's process, after every group restart.
    The module has no relative imports, so it is loaded from its file as it is; when open_clip is
    already imported in this process its own module is used."""
    import importlib.util
    import sys

    name = "alip._open_clip_tokenizer"
    module = sys.modules.get("open_clip.tokenizer") or sys.modules.get(name)
    if module is None:
        spec = importlib.util.find_spec("open_clip")  # the package's location; nothing is executed
        if spec is None or not spec.origin:
            raise ImportError("open_clip is not installed (pip install open_clip_torch)")
        path = os.path.join(os.path.dirname(spec.origin), "tokenizer.py")
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        try:
            file_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module.tokenize


class TrainPreprocessor:
    """Callable for `Dataset.map_batches` (or plain use): captioned rows -> uint8 images + tokens.

    Input columns: key, image, raw_text, caption, and optionally `epoch` (the epoch the row is
    read in). Output: image uint8 [N, 3, S, S], raw_tokens / caption_tokens uint16 [N, context].
    Rows whose image does not decode are dropped *with a log line naming the key*: the captioning
    job already routes undecodable images to its rejects table, so this only happens on hand-made
    datasets. `train=False` turns augmentation off (centre crop, no flip).
    """

    def __init__(self, image_size: int, context_length: int, train: bool = True, seed: int = 0,
                 epoch: int | None = None, augment: AugmentConfig = AugmentConfig(),
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.image_size = image_size
        self.context_length = context_length
        self.train = train
        self.seed = seed
        self.epoch = epoch
        self.augment = augment
        self.max_pixels = max_pixels
        tokenize = open_clip_tokenize()
        self._tokenize = lambda texts: tokenize(texts, context_length=context_length)
        self._batches = 0  # stands in for the epoch when none is given (see module docstring)

    def _chooser(self, key: str, epoch: int) -> CropChooser:
        if not self.train:
            return lambda w, h: (center_crop(w, h), False)
        rng = row_rng(self.seed, epoch, key)
        aug = self.augment
        # Crop first, then flip: the order torchvision's Compose draws them in.
        return lambda w, h: (sample_crop(rng, w, h, aug), bool(rng.random() < aug.hflip))

    def _epochs(self, batch: dict[str, np.ndarray], n: int) -> np.ndarray:
        if EPOCH in batch:
            return np.asarray(batch[EPOCH], dtype=np.int64)
        if self.epoch is not None:
            return np.full(n, self.epoch, dtype=np.int64)
        # No epoch known: mix the process and a batch counter in, so tasks never share a stream.
        return np.full(n, (os.getpid() << 32) + self._batches, dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch[KEY]]
        epochs = self._epochs(batch, len(keys))
        self._batches += 1
        size = self.image_size
        images = np.empty((len(keys), 3, size, size), dtype=IMAGE_DTYPE)
        keep: list[int] = []
        for i, blob in enumerate(batch[IMAGE]):
            try:
                pixels = decode_resized_crop(None if blob is None else bytes(blob), size,
                                             self._chooser(keys[i], int(epochs[i])), self.max_pixels)
            except ImageDecodeError as e:
                log.warning("skipping row %s in training: %s", keys[i], e.reason)
                continue
            images[len(keep)] = pixels
            keep.append(i)
        return {
            IMAGE: images[: len(keep)],
            "raw_tokens": self._tokens([str(batch[RAW_TEXT][i]) for i in keep]),
            "caption_tokens": self._tokens([str(batch[CAPTION][i]) for i in keep]),
        }

    def _tokens(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.context_length), dtype=TOKEN_DTYPE)
        tokens = self._tokenize(texts).numpy()
        if tokens.max() > np.iinfo(TOKEN_DTYPE).max:  # only a tokenizer with a >65,536 vocabulary
            raise ValueError(f"token id {int(tokens.max())} does not fit {np.dtype(TOKEN_DTYPE).name}")
        return tokens.astype(TOKEN_DTYPE)


def bytes_per_sample(batch: dict[str, np.ndarray]) -> float:
    """Bytes a batch of preprocessed rows puts into the object store / the trainer, per row."""
    rows = len(next(iter(batch.values())))
    return sum(a.nbytes for a in batch.values()) / max(rows, 1)
