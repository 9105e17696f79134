"""Per-sample gate scores with a trained model's frozen momentum state (pure math, no I/O, no Ray).

Training updates the momentum means with every batch before using them (alip/gates.py). To explore a
dataset we want each sample's score to depend on that sample alone, not on which other samples
happen to share its batch, so the means stay at the value the model ended training with: we call
the SAME `consistency_gates` as training with momentum = 1.0, for which its update
`1.0 * mu + 0.0 * mean(s)` returns mu exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from alip.gates import GateState, consistency_gates

#: per caption column c, the scores are written as f"{name}__{c}"; s_it has no caption in it
PER_CAPTION = ("s_tc", "s_ic", "w_s", "w_t", "w_c")
SHARED = ("s_it",)


class GateSettingsError(ValueError):
    """The export does not carry (valid) gate settings."""


@dataclass(frozen=True)
class GateSettings:
    state: GateState = field(default_factory=GateState)
    sharpness: float = 2.0
    objective: str = "alip"
    step: int | None = None

    @classmethod
    def from_export(cls, alip_section: dict, where: str = "the export") -> "GateSettings":
        gates = alip_section.get("gates")
        if not gates:
            raise GateSettingsError(
                f"{where} has no gate state in its open_clip_config.json 'alip' section: it was exported "
                "before exports stored it, or not by `alip pretrain`. Re-export it from the run's last "
                "checkpoint (alip.pretrain.job.finish_run) to explore data with it.")
        try:
            state = GateState.from_dict(gates["state"])
            sharpness = float(gates.get("sharpness", 2.0))
        except (KeyError, TypeError, ValueError) as e:
            raise GateSettingsError(f"{where}: malformed gate state {gates!r}: {e}") from e
        step = gates.get("step")
        return cls(state, sharpness, str(gates.get("objective", "alip")), int(step) if step is not None else None)

    def to_dict(self) -> dict:
        return {"state": self.state.to_dict(), "sharpness": self.sharpness, "objective": self.objective,
                "step": self.step}


def score_columns(caption_columns: list[str]) -> list[str]:
    return list(SHARED) + [f"{name}__{c}" for c in caption_columns for name in PER_CAPTION]


@torch.no_grad()
def gate_scores(image: torch.Tensor, raw: torch.Tensor, captions: dict[str, torch.Tensor],
                settings: GateSettings) -> dict[str, np.ndarray]:
    """Similarities and gate weights of each sample, for every caption column.

    `image`, `raw` and each caption embedding: L2-normalised [N, D]. Returns float32 arrays of
    length N named as `score_columns(list(captions))` lists them."""
    image, raw = image.float(), raw.float()
    out = {"s_it": (image * raw).sum(-1).numpy().astype(np.float32)}
    for col, caption in captions.items():
        caption = caption.float()
        g = consistency_gates(image, raw, caption, settings.state, settings.sharpness, momentum=1.0)
        out[f"s_tc__{col}"] = (raw * caption).sum(-1).numpy().astype(np.float32)
        out[f"s_ic__{col}"] = (image * caption).sum(-1).numpy().astype(np.float32)
        out[f"w_s__{col}"] = g.sample_weight.numpy().astype(np.float32)
        out[f"w_t__{col}"] = g.raw_pair_weight.numpy().astype(np.float32)
        out[f"w_c__{col}"] = g.caption_pair_weight.numpy().astype(np.float32)
    return out


def truth_figure(rank_score: np.ndarray, unrelated: np.ndarray, fraction: float = 0.1) -> dict:
    """Fraction of unrelated raw texts among the `fraction` lowest- and highest-ranked samples.

    Ranked by s_tc: W_s = min(exp(sharpness * (s_tc - mu_tc)), 1) is monotone in s_tc, so the lowest
    s_tc are the lowest W_s, and s_tc also orders the samples W_s clamps at 1 (agreeing ones)."""
    n = len(rank_score)
    k = max(1, int(round(n * fraction)))
    order = np.argsort(rank_score, kind="stable")
    unrelated = np.asarray(unrelated, dtype=bool)
    return {"n": int(n), "k": int(k), "fraction": fraction,
            "unrelated_overall": float(unrelated.mean()) if n else float("nan"),
            "unrelated_lowest_w_s": float(unrelated[order[:k]].mean()),
            "unrelated_highest_w_s": float(unrelated[order[-k:]].mean())}


def gate_counts(w_s, w_t, w_c, unrelated, caption_wrong, raw_adds) -> dict[str, int]:
    """The counts :func:`gate_accuracy_from_counts` needs; counts of several batches add up."""
    w_s, w_t, w_c = (np.asarray(a, dtype=np.float64) for a in (w_s, w_t, w_c))
    unrelated, caption_wrong, raw_adds = (np.asarray(a, dtype=bool) for a in (unrelated, caption_wrong, raw_adds))
    if not (len(w_s) == len(w_t) == len(w_c) == len(unrelated) == len(caption_wrong) == len(raw_adds)):
        raise ValueError("gate_counts: every array must have one value per sample")
    flags = {"lcg": w_s < 1.0, "dcg": w_t > w_c}
    counts = {"n": len(w_s), "caption_over_raw": int((w_c > w_t).sum())}
    for name, flag, positive in (("lcg_unrelated", "lcg", unrelated), ("dcg_wrong_caption", "dcg", caption_wrong),
                                 ("dcg_raw_adds", "dcg", raw_adds)):
        counts[f"{name}.tp"] = int((flags[flag] & positive).sum())
        counts[f"{name}.predicted"] = int(flags[flag].sum())
        counts[f"{name}.positives"] = int(positive.sum())
    return counts


def add_counts(a: dict[str, int] | None, b: dict[str, int]) -> dict[str, int]:
    return dict(b) if a is None else {k: a[k] + b[k] for k in b}


def gate_accuracy_from_counts(counts: dict[str, int]) -> dict:
    def pr(name: str) -> dict:
        tp, pred, pos = (counts[f"{name}.{k}"] for k in ("tp", "predicted", "positives"))
        return {"precision": tp / pred if pred else float("nan"), "recall": tp / pos if pos else float("nan"),
                "predicted": pred, "positives": pos}

    n = counts["n"]
    return {"n": n, "share_caption_over_raw": counts["caption_over_raw"] / n if n else float("nan"),
            "lcg_unrelated": pr("lcg_unrelated"), "dcg_wrong_caption": pr("dcg_wrong_caption"),
            "dcg_raw_adds": pr("dcg_raw_adds")}


def gate_accuracy(w_s, w_t, w_c, unrelated, caption_wrong, raw_adds) -> dict:
    """How well the gates tell right from wrong, against the world's truth per sample.

    * ``lcg_unrelated``: W_s < 1 (the LCG weighs the sample down) as a detector of unrelated raw texts;
    * ``dcg_wrong_caption``: W_t > W_c (the DCG weighs the caption path below the raw path) as a
      detector of captions that name a wrong colour, shape or pattern (a wrong caption should NOT get
      W_c > W_t);
    * ``dcg_raw_adds``: W_t > W_c as a detector of related raw texts that are right about something the
      caption leaves out or gets wrong (the pattern, a dropped colour, ...);
    * ``share_caption_over_raw``: the share of W_c > W_t (supplement A.3: 27.6% on YFCC15M).

    Precision = of the samples the gate flags, the share that are positives; recall = of the positives,
    the share the gate flags (nan when there is nothing to divide by). Arguments: length-N arrays
    (bools for the last three)."""
    return gate_accuracy_from_counts(gate_counts(w_s, w_t, w_c, unrelated, caption_wrong, raw_adds))
