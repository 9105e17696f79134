"""Measure how well a captioner describes the built-in world: shape + colour per object.

A caption is credited for an object when it contains that object's "<colour> <shape>"
phrase (the world's descriptions read "a large red circle on the left and a small blue
square at the top ..."). Both objects of two-object scenes count in ``shape_colour_accuracy``;
the second one is small and drawn *under* the main one (over the world's geometry, 5.5% of second
objects are more than half hidden; most are fully visible).
``main_shape_colour_accuracy`` counts the labelled main object only; ``object_count_accuracy``
checks that a caption neither misses nor invents an object. The pattern is ignored:
a real captioner (and the built-in one) does not describe it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class WorldCaptionScore:
    objects: int
    shape_colour_correct: int
    scenes: int
    main_shape_colour_correct: int  # the scene's labelled (main, topmost) object only
    size_position_correct: int  # main object's "<size> <colour> <shape> <position phrase>"
    pattern_mentions: int  # captions that name a fill pattern (should be 0)
    object_count_correct: int = 0  # captions naming exactly as many objects as the scene has

    @property
    def object_count_accuracy(self) -> float:
        """Share of scenes described with the right number of objects (no missed or invented object)."""
        return self.object_count_correct / max(1, self.scenes)

    @property
    def shape_colour_accuracy(self) -> float:
        return self.shape_colour_correct / max(1, self.objects)

    @property
    def main_shape_colour_accuracy(self) -> float:
        return self.main_shape_colour_correct / max(1, self.scenes)

    @property
    def main_object_full_accuracy(self) -> float:
        return self.size_position_correct / max(1, self.scenes)


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z]+", " ", text.lower()).strip() + " "


def score_captions(captions: Sequence[str], rows: Sequence[Mapping]) -> WorldCaptionScore:
    """Score captions against world label rows (dicts with shape/colour/... columns)."""
    from alip.data.world import COLOURS, PATTERNS, SHAPES, SIZES, describe

    if len(captions) != len(rows):
        raise ValueError(f"{len(captions)} captions for {len(rows)} rows")
    # An object phrase is "<size> <colour> <shape>" (a pattern word may sit before the shape).
    object_phrase = re.compile(r"\b(?:%s) (?:%s) (?:\w+ )?(?:%s)\b" % ("|".join(SIZES), "|".join(COLOURS), "|".join(SHAPES)))
    objects = correct = main_correct = full = patterns = count_ok = 0
    pattern_words = [p for p in PATTERNS if p != "plain"] + ["plain"]
    for caption, row in zip(captions, rows):
        text = _words(caption)
        pairs = [(row["colour"], row["shape"])]
        if row.get("second_shape"):
            pairs.append((row["second_colour"], row["second_shape"]))
        for i, (colour, shape) in enumerate(pairs):
            objects += 1
            hit = f" {colour} {shape} " in text
            correct += hit
            main_correct += hit and i == 0
        main = describe({k: row[k] for k in ("shape", "colour", "size", "position")}, include_background=False)
        full += _words(main) in text
        patterns += any(f" {p} " in text for p in pattern_words)
        count_ok += len(object_phrase.findall(text)) == len(pairs)
    return WorldCaptionScore(objects, correct, len(rows), main_correct, full, patterns, count_ok)


def evaluate_on_world(captioner, n: int = 300, seed: int = 9001, batch_size: int = 100) -> WorldCaptionScore:
    """Caption ``n`` world scenes of ``seed`` (pick one the captioner was not trained on) and score them."""
    from alip.data.world import world_table

    table = world_table(n, noise=0.0, seed=seed)
    rows = table.drop_columns(["image"]).to_pylist()
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in table.column("image").to_pylist()]
    captions: list[str] = []
    for start in range(0, n, batch_size):
        captions.extend(captioner.caption(images[start:start + batch_size]))
    return score_captions(captions, rows)
