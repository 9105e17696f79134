"""A captioner made worse on purpose: web captioners are generic and sometimes wrong.

    load_captioner("noisy:error=0.2,generic=0.5:builtin")    # spec: noisy:<settings>:<any other spec>

wraps another captioner and, per image, edits what it said about the built-in world's scenes:

* ``generic`` (caption genericity, 0..1): each of the main object's size, colour and position, the
  second object and the background is dropped with this probability ("a large red circle on the
  left on a gray background" -> "a circle on a gray background"). The shape is always kept: a
  generic caption still names the thing ("a man standing in front of a building").
* ``error`` (caption error rate, 0..1): with this probability the caption names a wrong colour or a
  wrong shape for the main object (whichever it still names, chosen at random), e.g. "a large
  blue circle" for a red one.
* ``seed``: which images get which edits.

The edits are a pure function of (seed, the image as the captioner's processor prepared it), so a
caption job that retries or resumes writes the same caption for the same image, and the settings
are part of the captioner's name (the ``captioner`` column and the id a caption job pins): a run
with other settings is another captioner. What each caption gets right or wrong is recorded by the
world's truth (alip.data.world_truth), not by this wrapper: it judges every captioner alike.

The vocabulary is the built-in world's (alip.data.world: COLOURS, SHAPES): a caption that names
none of its words (a real captioner on real photos) passes unchanged but for the dropped phrases.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from alip.captioners.base import CaptionerError

_SETTINGS = {"error": "error_rate", "generic": "genericity", "seed": "seed"}


@dataclass(frozen=True)
class CaptionNoise:
    """How much worse than its inner captioner a noisy captioner is."""

    error_rate: float = 0.0
    genericity: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("error_rate", "genericity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise CaptionerError(f"noisy captioner: {name} must be a fraction in [0, 1], got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise CaptionerError(f"noisy captioner: seed must be an integer >= 0, got {self.seed!r}")

    @property
    def spec(self) -> str:
        """``error=0.2,generic=0.5,seed=0``: the settings part of a ``noisy:`` spec and of the name."""
        return f"error={self.error_rate:g},generic={self.genericity:g},seed={self.seed}"

    @classmethod
    def parse(cls, text: str) -> "CaptionNoise":
        values: dict = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in _SETTINGS:
                raise CaptionerError(f"noisy captioner setting {item!r}: use error=<0..1>, generic=<0..1>, seed=<int>")
            field = _SETTINGS[key.strip()]
            try:
                values[field] = int(value) if field == "seed" else float(value)
            except ValueError:
                raise CaptionerError(f"noisy captioner setting {item!r}: {value!r} is not a number") from None
        return cls(**values)

    # -- the edits ----------------------------------------------------------------------------
    def apply(self, caption: str, rng: np.random.Generator) -> str:
        """The edited caption. Every draw is made whatever the settings, so raising one rate never
        changes which images another rate picks."""
        from alip.data.world import COLOURS, SHAPES

        draws = rng.random(7)
        main, sep, rest = caption.partition(" and ")
        background = _BACKGROUND.search(caption)
        tail = background.group(0) if background else ""
        if sep:  # "<main> and <second object>[ on a <bg> background]"
            second = rest[: len(rest) - len(tail)] if tail and rest.endswith(tail) else rest
        else:
            second = ""
            if tail and main.endswith(tail):
                main = main[: len(main) - len(tail)]
        words = main.split()
        g = self.genericity
        drop = {"size": draws[0] < g, "colour": draws[1] < g, "position": draws[2] < g}
        if drop["position"]:
            main = _POSITION.sub("", main)
            words = main.split()
        words = [w for w in words if not ((drop["size"] and w in _SIZES) or (drop["colour"] and w in COLOURS))]
        second = "" if draws[3] < g else second
        tail = "" if draws[4] < g else tail
        if draws[5] < self.error_rate:
            named = [i for i, w in enumerate(words) if w in COLOURS or w in SHAPES]
            colours = [i for i in named if words[i] in COLOURS]
            shapes = [i for i in named if words[i] in SHAPES]
            choice = colours if colours and (not shapes or draws[6] < 0.5) else shapes
            if choice:
                i = choice[0]
                vocab = list(COLOURS) if words[i] in COLOURS else list(SHAPES)
                others = [v for v in vocab if v != words[i]]
                words[i] = others[int(rng.random() * len(others))]
        text = " ".join(words)
        if second:
            text += " and " + second
        return (text + tail).strip()


_SIZES = frozenset({"small", "large"})
_POSITION = re.compile(r" (on the left|on the right|at the top|at the bottom|in the center)\b")
_BACKGROUND = re.compile(r" on an? \w+ background$")


def parse_noisy_spec(spec: str) -> tuple[CaptionNoise, str]:
    """``noisy:<settings>:<inner spec>`` -> (noise, inner spec)."""
    _, _, rest = spec.partition(":")
    settings, sep, inner = rest.partition(":")
    if not sep or not inner.strip():
        raise CaptionerError(f"captioner spec {spec!r}: use 'noisy:error=<0..1>,generic=<0..1>[,seed=<n>]:<captioner spec>', "
                             "e.g. 'noisy:error=0.2,generic=0.5:builtin'")
    return CaptionNoise.parse(settings), inner.strip()


def _row_digest(inputs: dict[str, np.ndarray], row: int) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(inputs):
        h.update(key.encode())
        h.update(np.ascontiguousarray(inputs[key][row]).tobytes())
    return h.digest()


class NoisyCaptioner:
    """A captioner whose captions are edited by :class:`CaptionNoise` (see the module docstring)."""

    def __init__(self, inner, noise: CaptionNoise, name: str, batch_size: int = 32):
        self.inner, self.noise, self.name, self.batch_size = inner, noise, name, batch_size

    def prepare(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        return self.inner.prepare(images)

    def generate_prepared(self, inputs: dict[str, np.ndarray]) -> list[str]:
        captions = self.inner.generate_prepared(inputs)
        seed = self.noise.seed.to_bytes(8, "little")
        return [self.noise.apply(c, np.random.default_rng(list(hashlib.blake2b(seed + _row_digest(inputs, i),
                                                                                 digest_size=16).digest())))
                for i, c in enumerate(captions)]

    def caption(self, images: list[Image.Image]) -> list[str]:
        if not isinstance(images, (list, tuple)):
            raise CaptionerError(f"caption() takes a list of PIL images, got {type(images).__name__}")
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self.generate_prepared(self.prepare(list(images[start:start + self.batch_size]))))
        return out
