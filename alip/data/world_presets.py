"""Named settings of the built-in world: how its raw texts are written and how good its captions are.

    alip world generate --out data/web --preset web-like     # prints the --captioner spec to caption it with
    .venv/bin/python bench/bench_learning.py --preset web-like

* ``default``: today's world. Half the raw texts are unrelated; the related ones are terse (about half
  name the pattern); the built-in captioner names shape and colour right ~97% of the time and never
  the pattern. The caption is almost always the better text: the gates have little to decide.
* ``web-like``: the regime ALIP was built for (supplement A.3 measures W_c > W_t on 27.6% of YFCC15M
  pairs): captions are generic and sometimes wrong (a noisy captioner, alip.captioners.noisy), related
  raw texts are specific (they name colour, shape and pattern), and more of the raw texts are
  unrelated. The rates were calibrated by measurement (docs/benchmarks.md: the share of W_c > W_t
  at the end of training falls in the paper's 20-35%).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WorldPreset:
    name: str
    noise: float  # share of raw texts unrelated to their image
    raw_text_specificity: float  # alip.data.world.related_text: 0 = terse, 1 = names colour, shape and pattern
    caption_error: float  # alip.captioners.noisy: the caption names a wrong colour or shape
    caption_genericity: float  # alip.captioners.noisy: each droppable attribute is dropped with this chance

    def captioner(self, base: str = "builtin") -> str:
        """The captioner spec of this preset on top of ``base`` (``base`` itself when captions stay as-is)."""
        if not self.caption_error and not self.caption_genericity:
            return base
        return f"noisy:error={self.caption_error:g},generic={self.caption_genericity:g}:{base}"

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, WorldPreset] = {
    "default": WorldPreset("default", noise=0.5, raw_text_specificity=0.0, caption_error=0.0, caption_genericity=0.0),
    "web-like": WorldPreset("web-like", noise=0.3, raw_text_specificity=0.8, caption_error=0.3,
                            caption_genericity=0.6),
}


def get_preset(name: str) -> WorldPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown world preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
