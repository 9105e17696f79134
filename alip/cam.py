"""Class activation maps for open_clip ViTs, and the pointing game (`alip cam`).

Method: **Grad-CAM** (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017), adapted to ViT tokens as is usual for transformers
(e.g. pytorch-grad-cam's ViT recipe, Chefer et al. CVPR 2021's Grad-CAM baseline):

* activations A = the patch tokens *entering* the last transformer block of the image tower
  [N, L, D]. Not the block's output: with CLS ("tok") pooling the last block's output patch
  tokens never reach the embedding, so their gradient is zero;
* target y = cosine similarity between the image embedding and the label's text embedding (the
  zero-shot classifier of alip.eval.zeroshot: mean over the prompt ensemble, "world" by default);
* map = ReLU(sum_d w_d * A[:, patch, d]) with w_d = mean over patches of dy/dA[:, patch, d],
  reshaped to the patch grid (8x8 for alip-tiny) and bilinearly upsampled to the input size.

**Pointing game** (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016):
a hit when the maximum of the (upsampled) map lies inside the object, here the built-in world's
main-object mask (alip.data.world.render(..., return_mask=True)), optionally within
``tolerance`` pixels (Zhang et al. use 15 px at ImageNet scale; default here 0 px: 64-px images,
8-px patches). A flat map (all zero after the ReLU) points nowhere and counts as a miss. The
chance level is the mask's area fraction (a uniformly random point).

Pure torch + numpy + PIL: no Ray (the CLI is a single process; a few hundred images take seconds).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

BUILTIN_WORLD = "world"
# Seed-sequence tag of the held-out scenes the built-in source draws: disjoint from the training
# stream and from world_eval_split's (task ids 0-3).
CAM_SCENE_TAG = 0xCA


class CamError(ValueError):
    """Bad input to `alip cam` (unknown label column, wrong label count, non-world data...)."""


# ----------------------------------------------------------------------------- the maps

def _vision_blocks(model) -> torch.nn.ModuleList:
    visual = model.clip.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(visual, "grid_size"):
        raise CamError(f"{model.model_name}: CAMs need open_clip's ViT image tower (VisionTransformer), "
                       f"got {type(visual).__name__}")
    return blocks


def text_targets(model, labels: Sequence[str], templates: str | Sequence[str] = "world") -> torch.Tensor:
    """[len(labels), D] normalised text embeddings, one per label (prompt-ensemble mean)."""
    from alip.eval.zeroshot import build_classifier
    from alip.model import get_tokenizer

    unique = sorted(set(labels))
    classifier = build_classifier(model, get_tokenizer(model), unique, templates)  # [D, n_unique]
    index = {name: i for i, name in enumerate(unique)}
    return classifier.T[[index[name] for name in labels]]


def gradcam(model, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps [N, H, W] (input resolution, >= 0, unnormalised) of preprocessed ``images``
    [N, 3, H, W] for the text embeddings ``targets`` [N, D] (row i explains image i vs text i)."""
    if images.shape[0] != targets.shape[0]:
        raise CamError(f"{images.shape[0]} images but {targets.shape[0]} text targets")
    blocks = _vision_blocks(model)
    visual = model.clip.visual
    gh, gw = visual.grid_size
    captured: dict[str, torch.Tensor] = {}

    def keep_input(_module, args):
        captured["tokens"] = args[0]

    handle = blocks[-1].register_forward_pre_hook(keep_input)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = images.detach().float().requires_grad_(True)  # a graph even if weights are frozen
            emb = model.encode_image(x, normalize=True)
            score = (emb * targets.to(emb)).sum()  # rows are independent: d score / d row i = d y_i
            tokens = captured["tokens"]
            # autograd.grad, not backward(): the weights' .grad stay untouched.
            (grads,) = torch.autograd.grad(score, tokens)
    finally:
        handle.remove()
        model.train(was_training)
    if not visual.transformer.batch_first:  # LND -> NLD
        tokens, grads = tokens.transpose(0, 1), grads.transpose(0, 1)
    patches = gh * gw
    acts, grads = tokens[:, -patches:].detach(), grads[:, -patches:]  # the patch tokens (after CLS)
    weights = grads.mean(dim=1, keepdim=True)  # [N, 1, D]: Grad-CAM's pooled gradient per channel
    cam = F.relu((weights * acts).sum(dim=-1)).view(-1, 1, gh, gw)
    size = images.shape[-2:]
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0].detach()


# ----------------------------------------------------------------------------- pointing game

def pointing_hits(maps: np.ndarray | torch.Tensor, masks: np.ndarray, tolerance: int = 0) -> np.ndarray:
    """Per image: 1 if the map's maximum lies inside the mask (or within ``tolerance`` px), else 0.
    ``maps`` [N, H, W], ``masks`` [N, H, W] bool of the same size. Flat maps are misses."""
    maps = np.asarray(maps.cpu() if isinstance(maps, torch.Tensor) else maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape:
        raise CamError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    hits = np.zeros(len(maps), dtype=np.int64)
    for i, (m, mask) in enumerate(zip(maps, masks)):
        if not np.isfinite(m).all() or m.max() <= m.min():
            continue
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        if tolerance <= 0:
            hits[i] = int(mask[y, x])
        else:
            ys, xs = np.nonzero(mask)
            hits[i] = int(ys.size > 0 and ((ys - y) ** 2 + (xs - x) ** 2).min() <= tolerance ** 2)
    return hits


def dilate(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels within ``tolerance`` px (Euclidean) of the mask: the area a random point must hit."""
    if tolerance <= 0:
        return mask.astype(bool)
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    out = np.zeros(mask.shape, dtype=bool)
    for y, x in zip(ys, xs):
        out |= (yy - y) ** 2 + (xx - x) ** 2 <= tolerance ** 2
    return out


@dataclass
class PointingResult:
    names: list[str]
    hits: dict[str, list[int]]
    baseline: float  # expected hit rate of a uniformly random point (mean mask area fraction)
    tolerance: int
    labels: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(next(iter(self.hits.values()))) if self.hits else 0

    def rate(self, name: str) -> float:
        return float(np.mean(self.hits[name])) if self.n else float("nan")

    def difference(self, a: str, b: str) -> tuple[float, float]:
        """Paired difference of hit rates a - b (points) and its standard error."""
        d = np.asarray(self.hits[a], float) - np.asarray(self.hits[b], float)
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
        return 100 * float(d.mean()), 100 * se

    def summary(self) -> dict:
        first = self.names[0]
        return {
            "method": "pointing game (Zhang et al. ECCV 2016) on Grad-CAM maps (Selvaraju et al. ICCV 2017)",
            "n": self.n, "tolerance_px": self.tolerance,
            "random_baseline_pct": round(100 * self.baseline, 2),
            "models": {name: {"hits": int(np.sum(self.hits[name])), "pct": round(100 * self.rate(name), 2)}
                       for name in self.names},
            "differences": {f"{first} - {other}": dict(zip(("points", "stderr"),
                                                          (round(v, 2) for v in self.difference(first, other))))
                            for other in self.names[1:]},
            "per_image_hits": self.hits, "labels": self.labels,
        }

    def format(self) -> str:
        lines = [f"pointing game on {self.n} world images (hit = map maximum inside the main object"
                 + (f", tolerance {self.tolerance} px" if self.tolerance else "") + "):"]
        for name in self.names:
            lines.append(f"  {name:>12}: {int(np.sum(self.hits[name]))}/{self.n} = {100 * self.rate(name):.1f}%")
        lines.append(f"  {'random point':>12}: {100 * self.baseline:.1f}% (mean object area fraction)")
        for other in self.names[1:]:
            d, se = self.difference(self.names[0], other)
            lines.append(f"  {self.names[0]} - {other}: {d:+.1f} points (paired, +- {se:.1f} std. error)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- data

@dataclass
class Scene:
    image: Image.Image  # RGB
    label: str
    mask: np.ndarray | None = None  # main-object mask at the image's size (world images only)


def _label_of(spec: str, row: Mapping) -> str:
    if "{" in spec:
        try:
            return spec.format(**row)
        except KeyError as e:
            raise CamError(f"label template {spec!r} names column {e.args[0]!r}, which the data lacks; "
                           f"columns: {sorted(row)}") from None
    if spec not in row:
        raise CamError(f"label column {spec!r} not in the data; columns: {sorted(row)}")
    value = row[spec]
    if value is None or str(value).strip() == "":
        raise CamError(f"label column {spec!r} is empty in a row")
    return str(value)


def resolve_labels(label_args: Sequence[str], rows: Sequence[Mapping]) -> list[str]:
    """One label text per row from ``--labels``: a column name (``shape``), a template over
    columns (``"{colour} {shape}"``), one fixed text for every row, or one text per row."""
    if not label_args:
        raise CamError("no labels given")
    if len(label_args) == 1:
        spec = label_args[0]
        if rows and ("{" in spec or spec in rows[0]):
            return [_label_of(spec, row) for row in rows]
        return [spec] * len(rows)
    if len(label_args) != len(rows):
        raise CamError(f"{len(label_args)} labels for {len(rows)} images: give one label text, "
                       f"a column name, or exactly one text per image")
    return list(label_args)


def builtin_scenes(n: int, seed: int = 0) -> tuple[list[Image.Image], list[dict], list[np.ndarray]]:
    """``n`` held-out world scenes (one or two objects) with their attributes and main-object masks."""
    from alip.data.world import EVAL_STREAM, render, sample_attrs

    images, attrs_list, masks = [], [], []
    for i in range(n):
        rng = np.random.default_rng([EVAL_STREAM, CAM_SCENE_TAG, seed, i])
        attrs = sample_attrs(rng)
        pixels, mask = render(attrs, rng, return_mask=True)
        images.append(Image.fromarray(pixels))
        attrs_list.append(attrs)
        masks.append(mask.copy())  # render's masks are shared cache entries
    return images, attrs_list, masks


def world_mask(row: Mapping, image: Image.Image) -> np.ndarray | None:
    """The main-object mask of a training-world row (key "SSSS-IIIIIIII"), re-derived with the
    RNG draws of alip.data.world.world_sample; None unless re-rendering gives the stored pixels
    exactly (other data, or a world generated by other code)."""
    from alip.data.world import TRAIN_STREAM, render, sample_attrs

    key = str(row.get("key") or "")
    parts = key.split("-")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    rng = np.random.default_rng([TRAIN_STREAM, int(parts[0]), int(parts[1])])
    pixels, mask = render(sample_attrs(rng), rng, return_mask=True)
    if np.array_equal(pixels, np.asarray(image.convert("RGB"))):
        return mask.copy()
    return None


def load_scenes(data: str | None, n: int, label_args: Sequence[str], seed: int = 0,
                need_masks: bool = False) -> list[Scene]:
    """``n`` scenes from a Parquet dataset dir (local or s3://; an ``image`` column of encoded
    bytes) or, for ``None``/``"world"``, the built-in world's held-out scenes."""
    if n <= 0:
        raise CamError(f"need at least one image, got n={n}")
    if data in (None, BUILTIN_WORLD):
        images, rows, masks = builtin_scenes(n, seed)
    else:
        from alip.data.dataset import DatasetError, read_dataset
        from alip.data.images import decode_image
        from alip.data.storage import StorageError

        try:
            table = read_dataset(data, limit=n)
        except (DatasetError, StorageError, OSError) as e:
            raise CamError(f"cannot read --data {data!r}: {e}") from e
        if "image" not in table.column_names:
            raise CamError(f"{data!r} has no 'image' column (columns: {table.column_names})")
        rows = [{k: v for k, v in r.items() if k != "image"} for r in table.to_pylist()]
        images = []
        for r, b in zip(rows, table.column("image").to_pylist()):
            try:
                images.append(decode_image(b).convert("RGB"))
            except ValueError as e:
                raise CamError(f"row {r.get('key', '?')}: {e}") from e
        masks = [world_mask(r, im) for r, im in zip(rows, images)] if need_masks else [None] * len(rows)
        if need_masks and any(m is None for m in masks):
            bad = sum(m is None for m in masks)
            raise CamError(f"the pointing game needs object masks: {bad} of {len(rows)} rows of {data!r} are "
                           f"not built-in world samples that re-render exactly (use --data {BUILTIN_WORLD} "
                           f"for held-out world scenes)")
    labels = resolve_labels(label_args, rows)
    return [Scene(im, lab, m) for im, lab, m in zip(images, labels, masks)]


# ----------------------------------------------------------------------------- running models

def preprocess(model, images: Sequence[Image.Image]) -> torch.Tensor:
    from alip.model import image_transform

    transform = image_transform(model, train=False)
    return torch.stack([transform(im) for im in images])


def model_maps(model, scenes: Sequence[Scene], templates: str | Sequence[str] = "world",
               batch_size: int = 64) -> torch.Tensor:
    """Grad-CAM maps [N, S, S] at the model's input size S."""
    targets = text_targets(model, [s.label for s in scenes], templates)
    out = []
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i:i + batch_size]
        out.append(gradcam(model, preprocess(model, [s.image for s in chunk]), targets[i:i + batch_size]))
    return torch.cat(out)


def _at_size(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return maps.numpy()


def pointing_game(maps_by_model: Mapping[str, torch.Tensor], scenes: Sequence[Scene],
                  tolerance: int = 0) -> PointingResult:
    """Score each model's maps against the scenes' masks (maps resized to the mask size)."""
    if any(s.mask is None for s in scenes):
        raise CamError("the pointing game needs a mask for every scene")
    masks = np.stack([s.mask for s in scenes])
    hits = {name: pointing_hits(_at_size(maps, masks.shape[-2:]), masks, tolerance).tolist()
            for name, maps in maps_by_model.items()}
    baseline = float(np.mean([dilate(m, tolerance).mean() for m in masks]))
    return PointingResult(list(maps_by_model), hits, baseline, tolerance, [s.label for s in scenes])


# ----------------------------------------------------------------------------- the grid

CELL = 128  # px per image in the grid
PAD = 6
HEADER = 22  # column titles
CAPTION = 16  # label text under each row


def grid_size(n_rows: int, n_models: int, cell: int = CELL) -> tuple[int, int]:
    """(width, height) of the PNG :func:`render_grid` draws."""
    return (n_models + 1) * (cell + PAD) + PAD, HEADER + n_rows * (cell + CAPTION + PAD) + PAD


def _jet(x: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, the classic blue-cyan-yellow-red colour map."""
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The map (min-max normalised, jet colours) blended over the image, both at cam's size."""
    lo, hi = float(cam.min()), float(cam.max())
    norm = (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)
    base = np.asarray(image.convert("RGB").resize(cam.shape[::-1], Image.BICUBIC), dtype=np.float32)
    mixed = (1 - alpha) * base + alpha * _jet(norm).astype(np.float32)
    return Image.fromarray(mixed.clip(0, 255).astype(np.uint8))


def render_grid(scenes: Sequence[Scene], maps_by_model: Mapping[str, torch.Tensor], cell: int = CELL,
                hits: Mapping[str, Sequence[int]] | None = None) -> Image.Image:
    """Per row: the image, then each model's map over it; the label under the row; a green/red
    dot where the map peaks if the pointing game scored that image (hit/miss)."""
    names = list(maps_by_model)
    width, height = grid_size(len(scenes), len(names), cell)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for c, title in enumerate(["image"] + names):
        draw.text((PAD + c * (cell + PAD), 4), title, fill=(0, 0, 0), font=font)
    for r, scene in enumerate(scenes):
        y0 = HEADER + r * (cell + CAPTION + PAD)
        grid.paste(scene.image.convert("RGB").resize((cell, cell), Image.NEAREST), (PAD, y0))
        for c, name in enumerate(names, start=1):
            cam = F.interpolate(maps_by_model[name][r][None, None].float(), size=(cell, cell),
                                mode="bilinear", align_corners=False)[0, 0].numpy()
            x0 = PAD + c * (cell + PAD)
            grid.paste(overlay(scene.image, cam), (x0, y0))
            if cam.max() > cam.min():
                py, px = (min(max(int(v), 4), cell - 5) for v in np.unravel_index(int(np.argmax(cam)), cam.shape))
                colour = (255, 255, 255) if hits is None else ((0, 200, 0) if hits[name][r] else (230, 0, 0))
                draw.ellipse([x0 + px - 4, y0 + py - 4, x0 + px + 4, y0 + py + 4], outline=colour, width=2)
        draw.text((PAD, y0 + cell + 2), f'"{scene.label}"', fill=(0, 0, 0), font=font)
    return grid


# ----------------------------------------------------------------------------- the command

@dataclass
class CamConfig:
    models: list[str]
    out: str
    data: str | None = None  # Parquet dir (local/s3) or None / "world": built-in held-out scenes
    labels: list[str] = field(default_factory=lambda: ["shape"])
    names: list[str] | None = None
    n: int = 6  # grid rows
    pointing_game: int = 0  # images to score (0: no pointing game)
    tolerance: int = 0
    templates: str = "world"
    seed: int = 0


def model_display_name(path: str) -> str:
    """runs/demo-alip/export -> demo-alip; other paths -> their last part."""
    parts = [p for p in str(path).rstrip("/").split("/") if p]
    if not parts:
        return str(path)
    return parts[-2] if parts[-1] == "export" and len(parts) > 1 else parts[-1]


def run_cam(cfg: CamConfig, log=print) -> dict:
    """Grid PNG at ``cfg.out`` and, with ``pointing_game`` > 0, the pointing game's JSON summary
    beside it (same name, .json). Returns the summary dict."""
    from alip.model import load_model

    if not cfg.models:
        raise CamError("give at least one model")
    names = cfg.names or [model_display_name(m) for m in cfg.models]
    if len(names) != len(cfg.models) or len(set(names)) != len(names):
        raise CamError(f"need one distinct name per model, got {names} for {len(cfg.models)} model(s)")
    if cfg.n < 1 or cfg.pointing_game < 0 or cfg.tolerance < 0:
        raise CamError("--n must be >= 1, --pointing-game and --tolerance >= 0")
    out = Path(cfg.out)
    if out.suffix.lower() != ".png":
        raise CamError(f"--out must be a .png path, got {cfg.out!r}")
    total = max(cfg.n, cfg.pointing_game)
    label_args = cfg.labels
    if len(label_args) > 1 and cfg.pointing_game > cfg.n:
        raise CamError("a list of label texts covers the grid rows only; use a column or template "
                       "(e.g. --labels shape) with --pointing-game")
    scenes = load_scenes(cfg.data, total if len(label_args) == 1 else cfg.n, label_args, cfg.seed,
                         need_masks=cfg.pointing_game > 0)
    if len(label_args) == 1:
        spec = label_args[0]
        kind = ("template" if "{" in spec else
                "column" if scenes and scenes[0].label != spec else "fixed text (no such column)")
        log(f"[cam] labels: {kind} {spec!r}, e.g. {[s.label for s in scenes[:3]]}")
    if len(scenes) < total:
        log(f"[cam] note: {cfg.data} has only {len(scenes)} rows; using them all")
    models = []
    # Seeded: a `random:<config>` reference model (the untrained baseline) is the same every run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for name, ref in zip(names, cfg.models):
            models.append(load_model(ref))
            log(f"[cam] loaded {name} from {ref}")
    maps = {}
    for name, model in zip(names, models):
        maps[name] = model_maps(model, scenes, cfg.templates)
        if not torch.isfinite(maps[name]).all():
            raise CamError(f"{name}: the map has non-finite values (a diverged model?)")
        log(f"[cam] {name}: {len(scenes)} maps ({tuple(maps[name].shape[-2:])} px)")
    summary: dict = {"grid": str(out), "models": dict(zip(names, cfg.models)), "rows": cfg.n,
                     "data": cfg.data or BUILTIN_WORLD,
                     "method": "Grad-CAM (Selvaraju et al. ICCV 2017) on the tokens entering the last ViT block"}
    hits = None
    if cfg.pointing_game:
        k = cfg.pointing_game
        result = pointing_game({nm: m[:k] for nm, m in maps.items()}, scenes[:k], cfg.tolerance)
        log(result.format())
        summary["pointing_game"] = result.summary()
        hits = {nm: h[:cfg.n] for nm, h in result.hits.items()} if k >= cfg.n else None
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_scenes = scenes[:cfg.n]
    render_grid(grid_scenes, {nm: m[:cfg.n] for nm, m in maps.items()}, hits=hits).save(out)
    log(f"[cam] grid of {len(grid_scenes)} rows x (image + {len(names)} maps) -> {out}")
    summary_path = out.with_suffix(".json")
    summary_path.write_text(json.dumps(summary, indent=2))
    summary["summary_path"] = str(summary_path)
    log(f"[cam] summary -> {summary_path}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="alip cam", description="Grad-CAM maps of exported models side by side (PNG grid) and the "
        "pointing game on built-in world images. Method: Grad-CAM (Selvaraju et al. ICCV 2017) on the "
        "tokens entering the last ViT block; target: similarity to the label's prompt-ensemble text embedding.")
    p.add_argument("--models", nargs="+", required=True, help="export dirs (local or s3://), e.g. ALIP then CLIP; "
                   "random:<config> is an untrained model (seeded by --seed), the baseline of the maps")
    p.add_argument("--names", nargs="+", default=None, help="column titles (default: from the paths)")
    p.add_argument("--data", default=BUILTIN_WORLD, help="Parquet dataset dir (local or s3://) with an image "
                   "column, or 'world' (default): held-out built-in world scenes")
    p.add_argument("--labels", nargs="+", default=["shape"], help="text per row: a column name (default "
                   "'shape'), a template over columns ('{colour} {shape}'), one fixed text, or one text per row")
    p.add_argument("--out", required=True, help="PNG path of the grid (a .json summary is written beside it)")
    p.add_argument("--n", type=int, default=6, help="grid rows (default 6)")
    p.add_argument("--pointing-game", type=int, default=0, metavar="N",
                   help="score the first N world images with the pointing game (default 0: off)")
    p.add_argument("--tolerance", type=int, default=0, help="pointing-game tolerance in pixels (default 0)")
    p.add_argument("--templates", default="world", help="prompt set of alip.eval (default 'world')")
    p.add_argument("--seed", type=int, default=0, help="which held-out built-in scenes, and the weights of "
                   "random:<config> models (default 0)")
    args = p.parse_args(argv)
    from alip.model import ModelLoadError
    cfg = CamConfig(models=args.models, out=args.out, data=args.data, labels=args.labels, names=args.names,
                    n=args.n, pointing_game=args.pointing_game, tolerance=args.tolerance,
                    templates=args.templates, seed=args.seed)
    try:
        run_cam(cfg)
    except (CamError, ModelLoadError, ValueError) as e:  # CamError/ModelLoadError are ValueErrors too
        p.error(str(e))
    return 0
