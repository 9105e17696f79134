"""Training ingest: samples/s per CPU core and bytes per sample into the trainer, today's float
preprocessing vs the uint8 data path (alip/pretrain/data.py), side by side in one run.

    .venv/bin/python bench/bench_ingest.py                                # 256 web + 32 large JPEGs, 3 rounds
    .venv/bin/python bench/bench_ingest.py --web 16 --large 2 --rounds 1  # a smoke run (seconds)

The JPEGs are made here, web-like: smooth colour fields, shapes with hard edges, blur and sensor
noise, quality 90 (4:2:0): `--web` at 500x375 (about 45 KB each, a typical alt-text photo) and
`--large` at 2000x1500 (about 600 KB, where reduced-size decoding matters). Each row also has a raw
alt-text and a caption, tokenised by both paths (a fixed cost of both).

  today  decode_image -> image_transform(train=True) (RandomResizedCrop bicubic, flip, ToTensor,
         Normalize) -> float32 [3, S, S]; int64 tokens. (The code TrainPreprocessor had before.)
  new    TrainPreprocessor: header -> crop chosen -> JPEG decoded at 1/2-1/8 scale when the crop
         allows -> bicubic resize of the box -> uint8 [3, S, S]; uint16 tokens.

Both run in this one process on one thread (torch.set_num_threads(1); PIL decodes and resamples on
one thread): rows/s here is rows/s per CPU core of a Ray Data preprocessing task. Rounds alternate
(today, new, today, new, ...) so machine noise hits both alike; the median round is reported.
Bytes per sample are the `nbytes` of what each path returns per row: what its Ray Data task puts
into the object store and what reaches the trainer process.
Targets (issue 14): >= 2x samples/s per core, >= 4x fewer bytes per sample.

Measured 2026-11-29, defaults, on the 2-core dev machine while other jobs ran (load ~5.5; absolute
rows/s are low, the ratios are what to read): web 500x375 2.22x (102.8 -> 228.6 rows/s per core),
large 2000x1500 3.71x (15.5 -> 57.4), all 288 together 2.72x; bytes per sample 603,344 -> 150,836
= 4.00x fewer.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from alip.data.images import ImageDecodeError, decode_image
from alip.model import image_transform
from alip.pretrain.data import TrainPreprocessor, bytes_per_sample

WORDS = ("red blue green small large circle square star striped dotted photo picture trip beach day "
         "left right top bottom center gray background object thing with on the of a").split()


def web_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: a smooth colour field, a dozen hard-edged shapes, blur, sensor noise."""
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def alt_text(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(6, 20))))


class TodaysPreprocessor:
    """The training preprocessing as it was before the uint8 path (float32 out, int64 tokens)."""

    def __init__(self, image_size: int, context_length: int, seed: int = 0):
        import open_clip

        self.transform = image_transform(image_size, train=True)
        self.image_size = image_size
        self._tokenize = lambda texts: open_clip.tokenize(texts, context_length=context_length)
        torch.manual_seed(seed)

    def __call__(self, batch: dict) -> dict:
        images, keep = [], []
        for i, blob in enumerate(batch["image"]):
            try:
                images.append(self.transform(decode_image(bytes(blob))).numpy())
                keep.append(i)
            except ImageDecodeError:
                pass
        return {
            "image": np.stack(images),
            "raw_tokens": self._tokenize([str(batch["raw_text"][i]) for i in keep]).numpy(),
            "caption_tokens": self._tokenize([str(batch["caption"][i]) for i in keep]).numpy(),
        }


def make_batches(rng: np.random.Generator, n: int, size: tuple[int, int], batch: int, quality: int,
                 prefix: str) -> list[dict]:
    rows = [(f"{prefix}{i:06d}", web_like_jpeg(rng, *size, quality), alt_text(rng), alt_text(rng)) for i in range(n)]
    out = []
    for s in range(0, n, batch):
        chunk = rows[s:s + batch]
        out.append({"key": np.array([r[0] for r in chunk]), "image": np.array([r[1] for r in chunk], dtype=object),
                    "raw_text": np.array([r[2] for r in chunk]), "caption": np.array([r[3] for r in chunk])})
    return out


def time_pass(fn, batches: list[dict]) -> float:
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--web", type=int, default=256, help="500x375 JPEGs (default 256)")
    ap.add_argument("--large", type=int, default=32, help="2000x1500 JPEGs (default 32)")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--image-size", type=int, default=224, help="crop size S (ViT-B: 224)")
    ap.add_argument("--batch", type=int, default=64, help="rows per preprocessing call (the job's map_batches size)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per path (plus one warm-up)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.web < 1 or args.large < 0 or args.rounds < 1 or args.batch < 1:
        ap.error("--web, --rounds and --batch must be >= 1, --large >= 0")
    torch.set_num_threads(1)

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    sets = {"web 500x375": make_batches(rng, args.web, (500, 375), args.batch, args.quality, "w")}
    if args.large:
        sets["large 2000x1500"] = make_batches(rng, args.large, (2000, 1500), args.batch, args.quality, "l")
    kb = {name: np.mean([len(x) for b in batches for x in b["image"]]) / 1024 for name, batches in sets.items()}
    print(f"made {args.web} + {args.large} JPEGs (quality {args.quality}; mean "
          + ", ".join(f"{name} {v:.0f} KB" for name, v in kb.items())
          + f") in {time.perf_counter() - t0:.1f}s; crop {args.image_size}px, batches of {args.batch}, "
            f"1 thread, {args.rounds} timed round(s)", flush=True)

    paths = {"today": TodaysPreprocessor(args.image_size, 77), "new": TrainPreprocessor(args.image_size, 77, epoch=0)}
    seconds = {(p, s): [] for p in paths for s in sets}
    for rnd in range(args.rounds + 1):  # round 0 warms caches (tokenizer BPE, allocator)
        for set_name, batches in sets.items():
            for path_name, fn in paths.items():
                t = time_pass(fn, batches)
                if rnd:
                    seconds[(path_name, set_name)].append(t)

    rows = {s: sum(len(b["key"]) for b in batches) for s, batches in sets.items()}
    med = {k: statistics.median(v) for k, v in seconds.items()}
    results: dict = {"sets": {}}
    print(f"\n{'set':<22}{'rows':>6}{'today ms/row':>14}{'new ms/row':>12}{'today rows/s':>14}{'new rows/s':>12}{'speed-up':>10}")

    def line(name: str, n: int, t_today: float, t_new: float) -> None:
        results["sets"][name] = {"rows": n, "today_rows_per_s": n / t_today, "new_rows_per_s": n / t_new,
                                 "speedup": t_today / t_new}
        print(f"{name:<22}{n:>6}{1e3 * t_today / n:>14.2f}{1e3 * t_new / n:>12.2f}"
              f"{n / t_today:>14.1f}{n / t_new:>12.1f}{t_today / t_new:>9.2f}x")

    for s in sets:
        line(s, rows[s], med[("today", s)], med[("new", s)])
    if len(sets) > 1:
        line("all (as mixed)", sum(rows.values()), sum(med[("today", s)] for s in sets), sum(med[("new", s)] for s in sets))

    sample = next(iter(sets.values()))[0]
    out_today, out_new = paths["today"](sample), paths["new"](sample)
    b_today, b_new = bytes_per_sample(out_today), bytes_per_sample(out_new)
    results["bytes_per_sample"] = {"today": b_today, "new": b_new, "ratio": b_today / b_new,
                                   "dtypes_today": {k: str(v.dtype) for k, v in out_today.items()},
                                   "dtypes_new": {k: str(v.dtype) for k, v in out_new.items()}}
    print(f"\nbytes per sample into the trainer: today {b_today:,.0f} ("
          + ", ".join(f"{k} {v.dtype}" for k, v in out_today.items()) + f"), new {b_new:,.0f} ("
          + ", ".join(f"{k} {v.dtype}" for k, v in out_new.items()) + ")")
    web = results["sets"]["web 500x375"]["speedup"]
    summary = f"samples/s per core, new / today: web {web:.2f}x"
    if args.large:
        summary += (f", large {results['sets']['large 2000x1500']['speedup']:.2f}x, "
                    f"all {results['sets']['all (as mixed)']['speedup']:.2f}x")
    print(summary + " (target >= 2x)")
    print(f"bytes per sample, today / new = {b_today / b_new:.2f}x (target >= 4x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
