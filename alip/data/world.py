"""The built-in world: a procedural image-text dataset that makes ALIP's problem visible.

Nothing can be downloaded, yet ALIP should be demonstrable in minutes on a laptop CPU. Each
sample is a 64x64 picture of one or two objects with visual attributes -- shape, colour,
size, position, a fill pattern and a background colour -- paired with *web-like* alt-text:

* a fraction ``noise`` of the raw texts is unrelated to the picture ("Northwest trip.");
* the rest is terse or partial ("red circle", "my striped thing", "circle pic"); about half
  of them state the fill pattern.

The built-in captioner (alip.captioners) describes shape, colour, size and position but
never the pattern (it uses :func:`describe` with ``include_pattern=False``). So the caption
is reliable but incomplete and the raw text is informative but noisy: neither alone is
enough, which is exactly the situation ALIP's gates are designed for.

Label columns (``shape``, ``colour``, ``pattern``, ...), ``description`` and
``raw_text_related`` are ground truth for evaluation only; training must not read them.

Determinism: sample ``i`` of seed ``s`` is drawn from its own RNG seeded with
``(TRAIN_STREAM, s, i)``, so sharding and parallelism do not change it; held-out evaluation
splits use a different stream (``EVAL_STREAM``) and never repeat a training sample's RNG.
"""

from __future__ import annotations

import functools
import io
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (35, 160, 55),
    "blue": (35, 85, 225),
    "purple": (135, 55, 190),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
PATTERNS = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (22, 22, 22),
    "white": (236, 236, 236),
}

#: Zero-shot evaluation tasks -> class names (the label text put into prompt templates).
WORLD_TASKS: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "colour_shape": [f"{c} {s}" for c in COLOURS for s in SHAPES],
    "pattern": list(PATTERNS),
}

TRAIN_STREAM = 0x7A11  # seed-sequence tags keep training and eval samples disjoint
EVAL_STREAM = 0xE7A1
TWO_OBJECT_PROB = 0.3
RAW_TEXT_PATTERN_PROB = 0.5

_RADIUS = {"small": 8.0, "large": 15.0}
_CENTRES = {"left": (18, 32), "right": (46, 32), "top": (32, 18), "bottom": (32, 46), "center": (32, 32)}
_POSITION_PHRASES = {
    "left": "on the left", "right": "on the right", "top": "at the top",
    "bottom": "at the bottom", "center": "in the center",
}
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
_COLOUR_NAMES = tuple(COLOURS)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)

# The attribute vocabulary. Unrelated ("noise") raw texts must contain none of these words.
ATTRIBUTE_WORDS = frozenset(
    set(SHAPES) | set(COLOURS) | set(SIZES) | set(POSITIONS) | set(PATTERNS) | set(BACKGROUNDS)
    | {"round", "box", "plus", "rhombus", "stripy", "stripes", "polka", "dot", "dots", "spotted",
       "checkerboard", "solid", "big", "tiny", "little", "huge", "grey", "centre", "middle"}
)


# ----------------------------------------------------------------------------- attributes

def _pick(rng: np.random.Generator, options: Sequence):
    # rng.random() is ~10x cheaper than rng.integers() for one draw; rendering 50k samples
    # makes thousands of these calls per second.
    return options[int(rng.random() * len(options))]


def _randint(rng: np.random.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high)."""
    return low + int(rng.random() * (high - low))


def sample_attrs(rng: np.random.Generator, fixed: Mapping[str, str] | None = None,
                 n_objects: int | None = None, two_object_prob: float = TWO_OBJECT_PROB) -> dict:
    """Draw the attributes of one scene (main object first); ``fixed`` pins some of them.

    ``two_object_prob`` only exists so that the built-in captioner's training script can show
    it more small second objects (its hardest case); datasets always use the default."""
    fixed = dict(fixed or {})
    attrs = {
        "shape": fixed.get("shape") or _pick(rng, SHAPES),
        "colour": fixed.get("colour") or _pick(rng, _COLOUR_NAMES),
        "size": fixed.get("size") or _pick(rng, SIZES),
        "position": fixed.get("position") or _pick(rng, POSITIONS),
        "pattern": fixed.get("pattern") or _pick(rng, PATTERNS),
        "background": fixed.get("background") or _pick(rng, _BACKGROUND_NAMES),
    }
    if n_objects is None:
        n_objects = 2 if rng.random() < two_object_prob else 1
    attrs["n_objects"] = n_objects
    attrs["second_shape"] = attrs["second_colour"] = attrs["second_position"] = None
    if n_objects == 2:
        # The second object is small, plain, of another shape and colour, elsewhere: the
        # main object stays the unambiguous subject of labels and texts.
        attrs["second_shape"] = _pick(rng, [s for s in SHAPES if s != attrs["shape"]])
        attrs["second_colour"] = _pick(rng, [c for c in COLOURS if c != attrs["colour"]])
        attrs["second_position"] = _pick(rng, [p for p in POSITIONS if p != attrs["position"]])
    return attrs


def _object_phrase(shape: str, colour: str, size: str, position: str, pattern: str | None) -> str:
    words = [size, colour] + ([pattern] if pattern else []) + [shape]
    return f"a {' '.join(words)} {_POSITION_PHRASES[position]}"


def describe(attrs: Mapping, include_pattern: bool = False, include_background: bool = True) -> str:
    """The clean, caption-like description of a scene.

    ``attrs`` is a mapping with ``shape``, ``colour``, ``size``, ``position`` and optionally
    ``pattern``, ``background``, ``second_shape``/``second_colour``/``second_position`` (a world
    table row as a dict works). Without ``include_pattern`` -- the captioner's view -- the fill
    pattern is never mentioned. Example: "a large red striped circle on the left on a gray
    background".
    """
    pattern = attrs.get("pattern") if include_pattern else None
    text = _object_phrase(attrs["shape"], attrs["colour"], attrs["size"], attrs["position"], pattern)
    if attrs.get("second_shape"):
        second_pattern = "plain" if include_pattern else None
        text += " and " + _object_phrase(attrs["second_shape"], attrs["second_colour"], "small",
                                         attrs["second_position"], second_pattern)
    if include_background and attrs.get("background"):
        text += f" on a {attrs['background']} background"
    return text


# ----------------------------------------------------------------------------- raw (web) text

_PLACES = ["Northwest", "Beach", "Mountain", "Lake", "Paris", "Tokyo", "Road", "Camping", "Ski",
           "Weekend", "Family", "Desert", "Island", "City", "Forest", "River", "Harbor", "Canyon",
           "Business", "Honeymoon", "Alaska", "Iceland", "Coast", "Vineyard"]
_EVENTS = ["Beach", "Graduation", "Moving", "Wedding", "Game", "Snow", "Rainy", "Sports",
           "Market", "Field", "Laundry", "Picture", "Pajama", "Spa", "Election", "Moving-in"]
_ORDINALS = ["First", "Second", "Third", "Fourth", "Fifth", "Tenth", "Twentieth", "Fortieth"]
_MILESTONES = ["birthday cake", "day of school", "apartment", "marathon", "concert", "snowfall",
               "anniversary dinner", "fishing trip", "driving lesson", "haircut", "road trip"]
_PEOPLE = ["Grandma", "Dad", "Mom", "Uncle Joe", "Sarah", "Tom", "Aunt May", "Grandpa", "Lucy",
           "the neighbours", "Kevin", "Priya"]
_THINGS = ["kitchen", "garden", "new car", "old bike", "recipe", "living room", "retirement party",
           "puppy", "wedding dress", "bookshelf", "backyard", "pancakes", "surprise party"]
_FOODS = ["pizza", "tacos", "coffee", "ramen", "burgers", "pancakes", "sushi", "bagels", "curry"]
_CITIES = ["town", "Chicago", "Berlin", "Austin", "Lisbon", "Seoul", "Denver", "the valley"]
_ACTIONS = ["subscribe", "learn more", "buy now", "read the review", "see the menu", "sign up",
            "download the app", "book a table"]
_SEASONS = ["Spring", "Summer", "Autumn", "Winter", "Holiday", "Easter", "Christmas"]
_VIEWS = ["hotel room", "balcony", "bridge", "train window", "tower", "ferry", "cabin"]
_ADJS = ["Vintage", "Used", "Handmade", "Cheap", "Rare", "Antique", "Refurbished", "Custom"]
_ITEMS = ["lamp", "sofa", "bicycle", "guitar", "table", "camera", "watch", "rug", "mirror"]

_NOISE_TEMPLATES: tuple[Callable[[np.random.Generator], str], ...] = (
    lambda r: f"{_pick(r, _PLACES)} trip.",
    lambda r: f"{_pick(r, _EVENTS)} day.",
    lambda r: f"{_pick(r, _ORDINALS)} {_pick(r, _MILESTONES)}.",
    lambda r: f"{_pick(r, _PEOPLE)}'s {_pick(r, _THINGS)}",
    lambda r: f"IMG_{_randint(r, 1000, 10000)}.JPG",
    lambda r: f"DSC{_randint(r, 10000, 100000)}",
    lambda r: f"Best {_pick(r, _FOODS)} in {_pick(r, _CITIES)}!",
    lambda r: f"Click here to {_pick(r, _ACTIONS)}",
    lambda r: f"{_pick(r, _SEASONS)} {_randint(r, 1995, 2025)}",
    lambda r: f"View from the {_pick(r, _VIEWS)}",
    lambda r: f"{_pick(r, _ADJS)} {_pick(r, _ITEMS)} for sale",
    lambda r: f"{_pick(r, _PEOPLE)} at the {_pick(r, _EVENTS).lower()} {_pick(r, ['party', 'fair', 'parade'])}",
)

_SHAPE_WORDS = {"circle": ["circle", "circle", "round thing"], "square": ["square", "square", "box"],
                "triangle": ["triangle"], "star": ["star"], "cross": ["cross", "cross", "plus sign"],
                "diamond": ["diamond", "diamond", "rhombus"]}
_PATTERN_WORDS = {"plain": ["plain", "solid"], "striped": ["striped", "stripy"],
                  "dotted": ["dotted", "polka dot", "spotted"], "checkered": ["checkered", "checkerboard"]}
_SIZE_WORDS = {"small": ["small", "tiny", "little"], "large": ["large", "big", "huge"]}
_NOUNS_WITHOUT_SHAPE = ["thing", "one", "design", "sticker", "logo"]
_RELATED_TEMPLATES = ("{p}", "my {p}", "{p} pic", "photo of a {p}", "{P}!", "{p} :)", "new {p}",
                      "the {p}", "{p} drawing", "a {p} i made", "{p} (2)", "{P}.", "{p} lol")


def noise_text(rng: np.random.Generator) -> str:
    """An alt-text unrelated to the picture (never uses an attribute word)."""
    return _pick(rng, _NOISE_TEMPLATES)(rng)


def _more_specific(prob: float, specificity: float) -> float:
    """``prob`` moved ``specificity`` of the way to 1 (0 keeps today's alt-texts, 1 names it always)."""
    return prob + specificity * (1.0 - prob)


def related_text(attrs: Mapping, rng: np.random.Generator, specificity: float = 0.0) -> tuple[str, dict]:
    """A terse, partial, but truthful alt-text for the main object.

    Returns ``(text, mentions)``, ``mentions`` = {"pattern": bool, "colour": bool, "shape": bool}: which
    attributes the text names. ``specificity`` in [0, 1] raises the chance of naming each of colour,
    shape and pattern from today's 0.65 / 0.7 / RAW_TEXT_PATTERN_PROB towards 1 (web alt-texts that are
    related often carry specifics a captioner never says); the random draws are the same for every
    value, so specificity 0 reproduces the default world exactly."""
    with_pattern = rng.random() < _more_specific(RAW_TEXT_PATTERN_PROB, specificity)
    with_colour = rng.random() < _more_specific(0.65, specificity)
    with_shape = rng.random() < _more_specific(0.7, specificity)
    if not (with_pattern or with_colour or with_shape):
        with_shape = True
    words = []
    if rng.random() < 0.25:
        words.append(_pick(rng, _SIZE_WORDS[attrs["size"]]))
    if with_colour:
        words.append(attrs["colour"])
    if with_pattern:
        words.append(_pick(rng, _PATTERN_WORDS[attrs["pattern"]]))
    words.append(_pick(rng, _SHAPE_WORDS[attrs["shape"]]) if with_shape else _pick(rng, _NOUNS_WITHOUT_SHAPE))
    if rng.random() < 0.1:
        words.append(_POSITION_PHRASES[attrs["position"]])
    phrase = " ".join(words)
    text = _pick(rng, _RELATED_TEMPLATES).format(p=phrase, P=phrase[:1].upper() + phrase[1:])
    return text, {"pattern": with_pattern, "colour": with_colour, "shape": with_shape}


# ----------------------------------------------------------------------------- rendering

def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    return None


@functools.lru_cache(maxsize=4096)  # ~3k (shape, centre, size) variants exist; 4 KiB each
def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "cross":
        t = r * 0.35
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
    else:
        poly = _shape_polygon(shape, cx, cy, r)
        if poly is None:
            raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
        draw.polygon(poly, fill=255)
    return np.asarray(mask) > 127


@functools.lru_cache(maxsize=None)
def _pattern_grid(pattern: str, orient: int, px: int, py: int) -> np.ndarray:
    x, y = _XX + px, _YY + py
    if pattern == "striped":
        coord = y if orient == 0 else x if orient == 1 else x + y
        return (coord // 3) % 2 == 0
    if pattern == "dotted":
        return ((x % 6) - 2.5) ** 2 + ((y % 6) - 2.5) ** 2 <= 2.6
    if pattern == "checkered":
        return ((x // 4) + (y // 4)) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}; known: {PATTERNS}")


def _pattern_mask(pattern: str, rng: np.random.Generator) -> np.ndarray | None:
    """Pixels painted in the darker pattern colour (None for plain); random phase/orientation."""
    if pattern == "plain":
        return None
    px, py, orient = _randint(rng, 0, 8), _randint(rng, 0, 8), _randint(rng, 0, 3)
    return _pattern_grid(pattern, orient if pattern == "striped" else 0, px, py)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + _randint(rng, -amount, amount + 1))) for c in rgb)  # type: ignore[return-value]


def _paint(canvas: np.ndarray, rng: np.random.Generator, shape: str, colour: str, size: str,
           position: str, pattern: str) -> np.ndarray:
    """Paint one object; returns its pixel mask (HxW bool)."""
    cx, cy = _CENTRES[position]
    cx += _randint(rng, -3, 4)
    cy += _randint(rng, -3, 4)
    mask = _shape_mask(shape, cx, cy, _RADIUS[size])
    fill = _jitter(COLOURS[colour], rng, 12)
    canvas[mask] = fill
    pmask = _pattern_mask(pattern, rng)
    if pmask is not None:
        # Darker shade of the same colour: the pattern is visible, the hue stays the colour's.
        canvas[mask & pmask] = tuple(int(c * 0.4) for c in fill)
    return mask


def render(attrs: Mapping, rng: np.random.Generator, return_mask: bool = False):
    """Draw a scene as an HxWx3 uint8 array (second object first, so the main one is on top).

    ``return_mask``: return ``(pixels, mask)``, mask = the main object's pixels (HxW bool; it is
    drawn last, so all of it is visible), e.g. for the pointing game of alip.cam."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    canvas[:] = _jitter(BACKGROUNDS[attrs["background"]], rng, 10)
    if attrs.get("second_shape"):
        _paint(canvas, rng, attrs["second_shape"], attrs["second_colour"], "small",
               attrs["second_position"], "plain")
    mask = _paint(canvas, rng, attrs["shape"], attrs["colour"], attrs["size"], attrs["position"], attrs["pattern"])
    return (canvas, mask) if return_mask else canvas


def encode_image(pixels: np.ndarray) -> bytes:
    """PNG at compress_level=1: lossless (patterns stay exact), ~450 bytes per 64x64 scene,
    and measured as fast as JPEG q90 (which is 3x larger here because of the hard edges)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ----------------------------------------------------------------------------- tables

_LABEL_COLUMNS = ("shape", "colour", "pattern", "size", "position", "background",
                  "second_shape", "second_colour", "second_position")

WORLD_SCHEMA = pa.schema(
    [("key", pa.string()), ("image", pa.binary()), ("raw_text", pa.string()),
     ("description", pa.string())]
    + [(c, pa.string()) for c in _LABEL_COLUMNS]
    + [("n_objects", pa.int8()), ("raw_text_related", pa.bool_()), ("raw_text_mentions_pattern", pa.bool_()),
       ("raw_text_mentions_colour", pa.bool_()), ("raw_text_mentions_shape", pa.bool_())]
)


def world_key(seed: int, index: int) -> str:
    return f"{seed:04d}-{index:08d}"


def world_sample(index: int, noise: float, seed: int, two_object_prob: float = TWO_OBJECT_PROB,
                 specificity: float = 0.0) -> dict:
    """Sample ``index`` of the training world for ``seed`` (pure function of its arguments).

    ``specificity``: see :func:`related_text` (0 = the default world)."""
    rng = np.random.default_rng([TRAIN_STREAM, seed, index])
    attrs = sample_attrs(rng, two_object_prob=two_object_prob)
    pixels = render(attrs, rng)
    related = bool(rng.random() >= noise)
    if related:
        text, mentions = related_text(attrs, rng, specificity)
    else:
        text, mentions = noise_text(rng), {"pattern": False, "colour": False, "shape": False}
    row = {"key": world_key(seed, index), "image": encode_image(pixels), "raw_text": text,
           "description": describe(attrs, include_pattern=True)}
    row.update({c: attrs[c] for c in _LABEL_COLUMNS})
    row.update(n_objects=attrs["n_objects"], raw_text_related=related,
               **{f"raw_text_mentions_{a}": mentions[a] for a in ("pattern", "colour", "shape")})
    return row


def world_table(n: int, noise: float = 0.3, seed: int = 0, start: int = 0,
                two_object_prob: float = TWO_OBJECT_PROB, specificity: float = 0.0) -> pa.Table:
    """Samples ``start .. start+n-1`` as an in-memory table in the dataset format (+ labels)."""
    _check_fraction("specificity", specificity)
    rows = [world_sample(i, noise, seed, two_object_prob, specificity) for i in range(start, start + n)]
    return pa.Table.from_pylist(rows, schema=WORLD_SCHEMA)


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")


def _check_args(n: int, noise: float, seed: int) -> None:
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not (0.0 <= float(noise) <= 1.0):
        raise ValueError(f"noise must be a fraction in [0, 1], got {noise!r}")
    if not isinstance(seed, int) or not (0 <= seed <= 9999):
        raise ValueError(f"seed must be an integer in [0, 9999] (it is part of the 4-digit key), got {seed!r}")


def _chunk(args: tuple[int, int, float, int, float]) -> pa.Table:
    start, stop, noise, seed, specificity = args
    return world_table(stop - start, noise, seed, start=start, specificity=specificity)


def generate_world(
    out_uri: str,
    n: int,
    noise: float = 0.3,
    seed: int = 0,
    shard_size: int = 10_000,
    workers: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
    raw_text_specificity: float = 0.0,
) -> dict:
    """Write ``n`` world samples as Parquet shards ``world-00000.parquet, ...`` to ``out_uri``.

    ``out_uri`` is a local folder or ``s3://bucket/prefix``. ``workers`` processes render in
    parallel (default: up to 2 for n >= 4000); results do not depend on it or on ``shard_size``.
    ``raw_text_specificity``: how much the related raw texts name (:func:`related_text`; 0 = the
    default world). Refuses to write into a folder that already holds shards unless ``overwrite`` (stale shards
    from an earlier run would otherwise silently join the dataset). Writes ``_world.json`` with
    the parameters and returns a summary dict (also the progress lines go to ``log``).
    """
    from alip.data.dataset import DatasetError, list_shards, write_json, write_shard
    from alip.data.storage import StorageError, join, resolve

    _check_args(n, noise, seed)
    _check_fraction("raw_text_specificity", raw_text_specificity)
    if not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    log = log or (lambda _msg: None)
    loc = resolve(out_uri)
    try:
        existing = list_shards(loc.uri, format="parquet")
    except (DatasetError, StorageError):
        existing = []
    if existing:
        if not overwrite:
            raise ValueError(
                f"{out_uri!r} already holds {len(existing)} shard(s); choose an empty folder or pass overwrite=True"
            )
        for uri in existing:
            sub = resolve(uri)
            sub.fs.delete_file(sub.path)

    if workers is None:
        workers = min(2, os.cpu_count() or 1) if n >= 4000 else 1
    chunk = min(shard_size, 2000)
    # Chunks never straddle a shard boundary, so each shard is a concatenation of whole chunks.
    jobs = []
    for s0 in range(0, n, shard_size):
        s1 = min(n, s0 + shard_size)
        jobs += [(c0, min(s1, c0 + chunk), float(noise), seed, float(raw_text_specificity))
                 for c0 in range(s0, s1, chunk)]
    n_shards = math.ceil(n / shard_size)
    log(f"[world] generating {n} samples (noise={noise}, raw_text_specificity={raw_text_specificity}, seed={seed}) "
        f"into {loc.uri}: "
        f"{n_shards} shard(s), {workers} worker(s)")

    t0 = time.perf_counter()
    shards, pending, done, related = [], [], 0, 0
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        results = pool.map(_chunk, jobs) if pool else map(_chunk, jobs)
        for table in results:
            pending.append(table)
            rows = sum(t.num_rows for t in pending)
            if rows == shard_size or done + rows == n:
                shard = pa.concat_tables(pending).combine_chunks()
                pending = []
                uri = write_shard(shard, join(loc.uri, f"world-{len(shards):05d}.parquet"))
                shards.append(uri)
                done += shard.num_rows
                related += shard.column("raw_text_related").to_numpy(zero_copy_only=False).sum()
                elapsed = time.perf_counter() - t0
                log(f"[world] shard {len(shards)}/{n_shards} -> {uri} ({done}/{n} samples, "
                    f"{done / elapsed:.0f} samples/s)")
    finally:
        if pool:
            pool.shutdown()
    elapsed = time.perf_counter() - t0
    summary = {
        "out": loc.uri, "n": n, "noise": float(noise), "raw_text_specificity": float(raw_text_specificity),
        "seed": seed, "shard_size": shard_size,
        "shards": shards, "workers": workers, "seconds": round(elapsed, 3),
        "samples_per_s": round(n / elapsed, 1), "related_fraction": round(float(related) / n, 4),
    }
    write_json({k: summary[k] for k in ("n", "noise", "raw_text_specificity", "seed", "shard_size")}
               | {"generator": "alip.data.world", "shards": [u.rsplit("/", 1)[-1] for u in shards]},
               join(loc.uri, "_world.json"))
    log(f"[world] done: {n} samples in {elapsed:.1f}s ({summary['samples_per_s']:.0f}/s), "
        f"{len(shards)} shard(s), unrelated raw text {1 - summary['related_fraction']:.1%}")
    return summary


def world_summary_json(summary: Mapping) -> str:
    """The summary of :func:`generate_world` as the JSON document ``alip world generate`` prints
    last (after the progress lines), so scripts can read it with ``tail``/``jq``."""
    import json

    return json.dumps(dict(summary), indent=2, default=str)


# ----------------------------------------------------------------------------- evaluation splits

def world_eval_split(task: str, n: int = 600, seed: int = 0, transform: Callable | None = None):
    """A held-out, class-balanced zero-shot split: ``(images, labels, classnames)``.

    ``images`` are RGB PIL images (PNG round-tripped like the training data), or a stacked
    tensor when ``transform`` (PIL -> tensor) is given; ``labels`` an int64 numpy array of
    indices into ``classnames = WORLD_TASKS[task]``. Classes are assigned round-robin then
    shuffled, so counts differ by at most one. Scenes have a single object so the label is
    unambiguous. Samples come from ``EVAL_STREAM``, never from the training stream.
    """
    if task not in WORLD_TASKS:
        raise ValueError(f"unknown world task {task!r}; choose one of {sorted(WORLD_TASKS)}")
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    classnames = WORLD_TASKS[task]
    task_id = sorted(WORLD_TASKS).index(task)
    order_rng = np.random.default_rng([EVAL_STREAM, task_id, seed])
    labels = order_rng.permutation(np.arange(n) % len(classnames)).astype(np.int64)
    images = []
    for i, label in enumerate(labels):
        rng = np.random.default_rng([EVAL_STREAM, task_id, seed, i])
        name = classnames[label]
        if task == "colour_shape":
            colour, shape = name.split(" ")
            fixed = {"colour": colour, "shape": shape}
        else:
            fixed = {task: name}
        attrs = sample_attrs(rng, fixed=fixed, n_objects=1)
        img = Image.open(io.BytesIO(encode_image(render(attrs, rng))))
        images.append(img.convert("RGB"))
    if transform is not None:
        import torch

        return torch.stack([transform(im) for im in images]), labels, list(classnames)
    return images, labels, list(classnames)

