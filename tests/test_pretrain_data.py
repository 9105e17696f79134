"""The training data path (alip/pretrain/data.py): uint8 images that, normalised on the device,
are the official float path's images; reduced-size JPEG decoding; the official crop distribution;
per-row augmentation seeds; compact dtypes into the trainer. Pure, no Ray: a few seconds."""
from __future__ import annotations

import io
import logging
import math
import random

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageFilter, JpegImagePlugin

from alip.data.images import ImageDecodeError, decode_image
from alip.model import OPENAI_MEAN, OPENAI_STD, create_model, image_transform
from alip.pretrain.data import (
    EPOCH, AugmentConfig, CropBox, TrainPreprocessor, bytes_per_sample, center_crop,
    decode_resized_crop, draft_factor, row_rng, sample_crop,
)
from alip.training import ALIPTrainer, TrainConfig

MEAN = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
GREY_LEVEL = 1 / 255 / min(OPENAI_STD)  # one uint8 step, in normalised units (the largest channel step)


def photo(width: int, height: int, seed: int = 0, fmt: str = "JPEG", exif_orientation: int | None = None,
          **save) -> bytes:
    """A photo-like image: smooth colours, hard-edged shapes, blur, noise (what JPEGs of the web hold)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(10):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse((x, y, x + width // 4, y + height // 3), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        save["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}), **save)
    return buf.getvalue()


def official(data: bytes, box: CropBox, flip: bool, size: int = 224, monkeypatch=None) -> torch.Tensor:
    """alip.model.image_transform(train=True) itself, with its random draws pinned to `box`/`flip`."""
    transform = image_transform(size, train=True)
    crop, hflip = transform.transforms[0], transform.transforms[1]
    monkeypatch.setattr(T.RandomResizedCrop, "get_params",
                        staticmethod(lambda img, scale, ratio: (int(box.top), int(box.left), int(box.height), int(box.width))))
    hflip.p = 1.0 if flip else 0.0
    assert isinstance(crop, T.RandomResizedCrop)
    return transform(decode_image(data)).unsqueeze(0)


def on_device(pixels: np.ndarray) -> torch.Tensor:
    """The trainer's normalisation of a uint8 image (alip.model.ALIPModel.normalize_images)."""
    return _MODEL.normalize_images(torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0))


_MODEL = create_model("alip-micro")


def fixed(box: CropBox, flip: bool = False):
    return lambda w, h: (box, flip)


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("box, flip", [
    (CropBox(30, 20, 400, 330), False), (CropBox(30, 20, 400, 330), True),
    (CropBox(0, 0, 500, 375), False), (CropBox(137, 41, 311, 297), True),
])
def test_uint8_path_normalised_on_device_is_the_official_float_path(box, flip, monkeypatch):
    data = photo(500, 375)
    pixels = decode_resized_crop(data, 224, fixed(box, flip))
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 224, 224)
    diff = (on_device(pixels) - official(data, box, flip, monkeypatch=monkeypatch)).abs()
    # Same decoder, same bicubic filter (torch's uint8 kernel is PIL's): within 2 grey levels,
    # almost every pixel exactly.
    assert diff.max() <= 2.01 * GREY_LEVEL
    assert diff.mean() <= 0.02 * GREY_LEVEL


def test_upsampled_crop_of_a_small_image_matches_too(monkeypatch):
    data = photo(120, 90, seed=3)
    box = CropBox(10, 0, 90, 90)
    diff = (on_device(decode_resized_crop(data, 224, fixed(box))) - official(data, box, False, monkeypatch=monkeypatch)).abs()
    assert diff.max() <= 1.01 * GREY_LEVEL


def test_large_jpeg_is_decoded_at_reduced_size_and_stays_close(monkeypatch):
    data = photo(2000, 1500, seed=1)
    box = CropBox(100, 100, 1300, 1200)
    assert draft_factor(box, 224) == 4  # 1200 / 4 = 300 >= 224, / 8 = 150 < 224
    calls = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    pixels = decode_resized_crop(data, 224, fixed(box))
    assert calls == [((500, 375), (500, 375))]  # decoded at 1/4 scale: 16x fewer pixels
    monkeypatch.undo()
    diff = (on_device(pixels) - official(data, box, False, monkeypatch=monkeypatch)).abs()
    # DCT-domain reduction then bicubic vs bicubic alone: a slightly different low-pass filter.
    assert diff.mean() <= 1.0 * GREY_LEVEL
    assert diff.max() <= 30 * GREY_LEVEL


def test_draft_factor_never_goes_below_the_output_size():
    assert draft_factor(CropBox(0, 0, 447, 1000), 224) == 1
    assert draft_factor(CropBox(0, 0, 448, 1000), 224) == 2
    assert draft_factor(CropBox(0, 0, 1792, 1792), 224) == 8
    assert draft_factor(CropBox(0, 0, 5000, 5000), 224) == 8


def test_exif_orientation_and_other_formats_give_the_official_pixels(monkeypatch):
    cases = [(photo(300, 200, exif_orientation=6), (200, 300)),  # rotated 90: crop chosen in the upright frame
             (photo(640, 480, exif_orientation=8), (480, 640)),  # rotated 270 and decoded at 1/2 scale
             (photo(300, 200, fmt="PNG"), (300, 200))]           # no draft for PNG: full decode
    for data, upright in cases:
        assert decode_image(data).size == upright
        side = min(upright)
        box = CropBox(10, 20, side - 20, side - 30)  # off-centre: a wrong orientation shows
        diff = (on_device(decode_resized_crop(data, 224, fixed(box)))
                - official(data, box, False, monkeypatch=monkeypatch)).abs()
        assert diff.mean() <= 1.0 * GREY_LEVEL, upright


# ----------------------------------------------------------------------------- augmentation distribution

def test_crop_sampler_has_torchvisions_random_resized_crop_distribution():
    aug = AugmentConfig()
    n = 3000
    rng = random.Random(0)
    ours = np.array([[b.left, b.top, b.width, b.height] for b in (sample_crop(rng, 500, 375, aug) for _ in range(n))],
                    dtype=float)
    torch.manual_seed(0)
    image = torch.zeros(3, 375, 500)
    theirs = np.array([[j, i, w, h] for i, j, h, w in
                       (T.RandomResizedCrop.get_params(image, list(aug.scale), list(aug.ratio)) for _ in range(n))],
                      dtype=float)

    def stats(a):
        area = a[:, 2] * a[:, 3] / (500 * 375)
        log_ratio = np.log(a[:, 2] / a[:, 3])
        return {"area": area, "log_ratio": log_ratio, "cx": (a[:, 0] + a[:, 2] / 2) / 500,
                "cy": (a[:, 1] + a[:, 3] / 2) / 375}

    s_ours, s_theirs = stats(ours), stats(theirs)
    for name in s_ours:
        q_ours = np.quantile(s_ours[name], [0.05, 0.25, 0.5, 0.75, 0.95])
        q_theirs = np.quantile(s_theirs[name], [0.05, 0.25, 0.5, 0.75, 0.95])
        spread = np.quantile(s_theirs[name], 0.95) - np.quantile(s_theirs[name], 0.05)
        # Two samples of 3000: quantiles agree to a few % of the spread (a scale of 0.5-1.0 instead
        # of 0.7-1.0, or no aspect jitter, would miss by 30% or more).
        assert np.abs(q_ours - q_theirs).max() <= 0.05 * spread, (name, q_ours, q_theirs)
    assert 0.69 <= s_ours["area"].min() and s_ours["area"].max() <= 1.01  # w, h are rounded
    assert math.log(0.8) - 0.01 <= s_ours["log_ratio"].min() and s_ours["log_ratio"].max() <= math.log(1.25) + 0.01


def test_crop_sampler_falls_back_like_torchvision_on_extreme_aspect_ratios():
    # A 1000x200 banner: no crop of 70-100% area with aspect 0.8-1.25 fits, so both take the
    # centre crop with the aspect clamped to 1.25.
    box = sample_crop(random.Random(1), 1000, 200)
    i, j, h, w = T.RandomResizedCrop.get_params(torch.zeros(3, 200, 1000), [0.7, 1.0], [0.8, 1.25])
    assert (box.top, box.left, box.height, box.width) == (i, j, h, w) == (0, 375, 200, 250)


def test_flip_probability_is_one_half():
    p = TrainPreprocessor(32, 16, seed=0, epoch=0)
    flips = [p._chooser(f"k{i}", 0)(100, 100)[1] for i in range(4000)]
    assert abs(np.mean(flips) - 0.5) < 0.03


# ----------------------------------------------------------------------------- seeds

def _batch(blobs, keys, epoch=None):
    batch = {"key": np.array(keys), "image": np.array(blobs, dtype=object),
             "raw_text": np.array([f"raw {k}" for k in keys]), "caption": np.array([f"a photo of {k}" for k in keys])}
    if epoch is not None:
        batch[EPOCH] = np.full(len(keys), epoch)
    return batch


def test_augmentation_is_per_row_reproducible_and_differs_across_tasks_and_epochs():
    blobs = [photo(200, 150, seed=5)] * 4  # the same picture four times
    # Two data tasks (processes) handling different rows: the old torch.manual_seed(seed) per task
    # gave the k-th row of every task the same crop. Now each row's crop is its own.
    task_a = TrainPreprocessor(64, 16, seed=7)(_batch(blobs, ["a0", "a1", "a2", "a3"], epoch=0))["image"]
    task_b = TrainPreprocessor(64, 16, seed=7)(_batch(blobs, ["b0", "b1", "b2", "b3"], epoch=0))["image"]
    assert all(not np.array_equal(task_a[k], task_b[k]) for k in range(4))
    assert len({task_a[k].tobytes() for k in range(4)}) == 4
    # Reproducible: the same (seed, epoch, key) gives the same crop whatever task, batch or position.
    again = TrainPreprocessor(64, 16, seed=7)(_batch(blobs[:2], ["a3", "a0"], epoch=0))["image"]
    assert np.array_equal(again[0], task_a[3]) and np.array_equal(again[1], task_a[0])
    # A new epoch, or another run seed, draws new crops.
    next_epoch = TrainPreprocessor(64, 16, seed=7)(_batch(blobs, ["a0", "a1", "a2", "a3"], epoch=1))["image"]
    other_seed = TrainPreprocessor(64, 16, seed=8)(_batch(blobs, ["a0", "a1", "a2", "a3"], epoch=0))["image"]
    assert all(not np.array_equal(task_a[k], next_epoch[k]) for k in range(4))
    assert all(not np.array_equal(task_a[k], other_seed[k]) for k in range(4))
    # The epoch may come from the constructor instead of a column.
    assert np.array_equal(TrainPreprocessor(64, 16, seed=7, epoch=1)(_batch(blobs, ["a0", "a1", "a2", "a3"]))["image"],
                          next_epoch)
    # Without any epoch, passes over the same rows still differ (process + batch counter).
    p = TrainPreprocessor(64, 16, seed=7)
    first, second = p(_batch(blobs[:2], ["a0", "a1"]))["image"], p(_batch(blobs[:2], ["a0", "a1"]))["image"]
    assert not np.array_equal(first, second)


def test_row_rng_depends_on_seed_epoch_and_key_only():
    draw = lambda *a: row_rng(*a).random()  # noqa: E731
    assert draw(0, 0, "k") == draw(0, 0, "k")
    assert len({draw(0, 0, "k"), draw(1, 0, "k"), draw(0, 1, "k"), draw(0, 0, "j"), draw(0, 10, "k")}) == 5


# ----------------------------------------------------------------------------- what ships to the trainer

def test_preprocessor_ships_uint8_images_and_uint16_tokens(caplog):
    blobs = [photo(500, 375, seed=i) for i in range(3)] + [b"<html>not an image</html>", photo(64, 48, fmt="PNG")]
    keys = ["k0", "k1", "k2", "bad", "png"]
    batch = _batch(blobs, keys, epoch=0)
    with caplog.at_level(logging.WARNING, logger="alip.pretrain.data"):
        out = TrainPreprocessor(224, 77, seed=0)(batch)
    assert "skipping row bad" in caplog.text  # dropped with the key named, the rest kept
    assert out["image"].dtype == np.uint8 and out["image"].shape == (4, 3, 224, 224)
    kept = [0, 1, 2, 4]
    for col, text_col in (("raw_tokens", "raw_text"), ("caption_tokens", "caption")):
        assert out[col].dtype == np.uint16 and out[col].shape == (4, 77)
        expected = open_clip.tokenize([str(batch[text_col][i]) for i in kept], context_length=77).numpy()
        assert np.array_equal(out[col].astype(np.int64), expected)
    # 4x fewer bytes than float32 pixels + int64 tokens: 150,528 + 2 x 154 vs 602,112 + 2 x 616.
    assert bytes_per_sample(out) == 3 * 224 * 224 + 2 * 77 * 2
    assert (3 * 224 * 224 * 4 + 2 * 77 * 8) / bytes_per_sample(out) == 4.0


def test_empty_and_all_bad_batches_keep_shapes_and_dtypes():
    out = TrainPreprocessor(32, 16)(_batch([b"", None], ["e", "n"], epoch=0))
    assert out["image"].shape == (0, 3, 32, 32) and out["image"].dtype == np.uint8
    assert out["raw_tokens"].shape == (0, 16) and out["raw_tokens"].dtype == np.uint16


@pytest.mark.parametrize("bad", [None, b"", b"GIF89a-garbage", b"\xff\xd8\xff\xe0 truncated"])
def test_bad_bytes_are_rejected_like_decode_image(bad):
    with pytest.raises(ImageDecodeError):
        decode_image(bad)
    with pytest.raises(ImageDecodeError):
        decode_resized_crop(bad, 32, fixed(CropBox(0, 0, 1, 1)))


def test_truncated_jpeg_and_pixel_bombs_are_rejected():
    data = photo(300, 200)
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_resized_crop(data[: len(data) // 2], 32, lambda w, h: (center_crop(w, h), False))
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_resized_crop(data, 32, lambda w, h: (center_crop(w, h), False), max_pixels=300 * 200 - 1)


def test_a_training_step_on_uint8_images_equals_the_step_on_official_float_images():
    """The contract with the trainer: uint8 in, normalised on the device with the CLIP mean/std
    the old CPU path used, so loss and gradients are those of the float path."""
    out = TrainPreprocessor(32, 16, seed=0)(_batch([photo(96, 72, seed=i) for i in range(8)],
                                                   [f"k{i}" for i in range(8)], epoch=0))
    images = torch.from_numpy(out["image"])
    floats = (images.float() / 255 - MEAN) / STD  # what ToTensor + Normalize made on the CPU
    raw, cap = torch.from_numpy(out["raw_tokens"].astype(np.int64)), torch.from_numpy(out["caption_tokens"].astype(np.int64))
    cfg = TrainConfig(model="alip-micro", global_batch_size=8, precision="fp32", max_steps=2)
    losses, grads = [], []
    for batch_images in (images, floats):
        torch.manual_seed(0)
        trainer = ALIPTrainer(cfg, create_model("alip-micro"), total_steps=2)
        losses.append(trainer.train_step(batch_images, raw, cap).host_metrics()["loss"])
        grads.append(torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
