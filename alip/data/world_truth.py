"""What a text says about a built-in-world scene, and whether it is right (pure functions, no I/O).

Gates are judged against this: a raw text or caption *claims* a shape, a colour and a fill pattern
for the scene's main object (or leaves them out), and the world's label columns say which claims
are true. Used by the gate-accuracy table (bench/bench_learning.py) and `alip explore`.

    text_claims("my red stripy round thing")   -> {"shape": "circle", "colour": "red", "pattern": "striped"}
    text_truth("a large blue circle on the left", {"shape": "circle", "colour": "red", "pattern": "dotted"})
        -> {"shape": "right", "colour": "wrong", "pattern": "absent"}

The main object is the first one a text describes: captions and descriptions follow `describe()`
("<main object> and <small second object> on a <background> background"), so only the part before
" and " is read. Background colours (gray, black, white) are not object colours, so they never count.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from alip.data.world import COLOURS, PATTERNS, SHAPES

#: attributes a text can be right or wrong about, in the order reports list them
CLAIMED = ("shape", "colour", "pattern")

# Every word the world's texts use for an attribute value (world.py: _SHAPE_WORDS, _PATTERN_WORDS).
_WORDS: dict[str, dict[str, str]] = {
    "shape": {**{s: s for s in SHAPES}, "round": "circle", "box": "square", "plus": "cross", "rhombus": "diamond"},
    "colour": {c: c for c in COLOURS},
    "pattern": {**{p: p for p in PATTERNS}, "solid": "plain", "stripy": "striped", "stripes": "striped",
                "polka": "dotted", "dot": "dotted", "dots": "dotted", "spotted": "dotted",
                "checkerboard": "checkered"},
}
_TOKEN = re.compile(r"[a-z]+")


def text_claims(text: str) -> dict[str, str | None]:
    """The shape, colour and pattern ``text`` names for the main object (None: not named)."""
    main = (text or "").lower().split(" and ", 1)[0]
    claims: dict[str, str | None] = {a: None for a in CLAIMED}
    for token in _TOKEN.findall(main):
        for attribute, words in _WORDS.items():
            if claims[attribute] is None and token in words:
                claims[attribute] = words[token]
    return claims


def text_truth(text: str, labels: Mapping) -> dict[str, str]:
    """Per attribute: "right", "wrong" or "absent" (``labels``: a world row's shape, colour, pattern)."""
    claims = text_claims(text)
    return {a: "absent" if claims[a] is None else "right" if claims[a] == labels[a] else "wrong" for a in CLAIMED}


def truth_string(truth: Mapping[str, str]) -> str:
    """One column value: "shape=right colour=wrong pattern=absent"."""
    return " ".join(f"{a}={truth[a]}" for a in CLAIMED)


def adds_what_the_caption_lacks(raw: Mapping[str, str], caption: Mapping[str, str]) -> bool:
    """The raw text is right about an attribute the caption leaves out or gets wrong."""
    return any(raw[a] == "right" and caption[a] != "right" for a in CLAIMED)


def is_wrong(truth: Mapping[str, str]) -> bool:
    """The text names at least one attribute wrongly."""
    return any(v == "wrong" for v in truth.values())


def truth_columns(raw_texts, captions, labels, raw_related) -> dict[str, list]:
    """Per sample, which of its texts is right about what, and the three facts the gates are judged on.

    ``labels``: per sample a mapping with shape, colour, pattern (world rows); ``raw_related``: the
    world's ``raw_text_related``. Returns lists: ``raw_text_truth`` / ``caption_truth`` (truth strings),
    ``raw_text_unrelated``, ``caption_wrong`` (names a wrong shape, colour or pattern),
    ``raw_text_adds`` (a related raw text right about something the caption lacks or gets wrong)."""
    out: dict[str, list] = {k: [] for k in ("raw_text_truth", "caption_truth", "raw_text_unrelated",
                                            "caption_wrong", "raw_text_adds")}
    for raw, caption, label, related in zip(raw_texts, captions, labels, raw_related):
        raw_t, cap_t = text_truth(raw, label), text_truth(caption, label)
        out["raw_text_truth"].append(truth_string(raw_t))
        out["caption_truth"].append(truth_string(cap_t))
        out["raw_text_unrelated"].append(not related)
        out["caption_wrong"].append(is_wrong(cap_t))
        out["raw_text_adds"].append(bool(related) and adds_what_the_caption_lacks(raw_t, cap_t))
    return out
