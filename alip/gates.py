"""ALIP's two consistency gates, as pure tensor math (no I/O, no Ray, no distributed calls).

Given L2-normalised embeddings of a *global* batch of N triplets
(image i, raw web text t, synthetic caption c):

    s_tc = <t, c>,  s_it = <i, t>,  s_ic = <i, c>          (per sample)
    mu   <- momentum * mu + (1 - momentum) * mean(s)        (updated BEFORE use)

Language Consistency Gate (LCG): does the raw text agree with the caption?
    w   = exp(sharpness * (s_tc - mu_tc))
    W_s = min(w, 1)                                         (sample weight)

Description Consistency Gate (DCG): only where raw text and caption disagree (w < 1),
ask which of the two the image agrees with more:
    W_t = exp(sharpness * (s_it - mu_it)),  W_c = exp(sharpness * (s_ic - mu_ic))
    and W_t = W_c = 1 for every other sample.

The official code writes exp(x)**2, i.e. sharpness = 2. Gates are weights, never a path for
gradients, so everything here runs under no_grad and returns detached tensors.

The caller is responsible for passing the *global* batch (see alip.loss.ALIPLoss, which gathers
across ranks first): the momentum means must be identical on every rank.

Nothing here synchronises with the host: the momentum means and the batch means are 0-d tensors on
the embeddings' device (a `float()` per step would stall a GPU pipeline); they become Python floats
only when a checkpoint is written (`GateState.to_dict`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


Scalar = Union[float, torch.Tensor]  # a Python float, or a 0-d tensor on the training device


@dataclass(eq=False)
class GateState:
    """Momentum means of the three similarities. Start at 1.0 (the official initial value).

    Fields are floats (fresh or loaded state) or 0-d device tensors (after a training step)."""

    text_caption: Scalar = 1.0
    image_text: Scalar = 1.0
    image_caption: Scalar = 1.0

    def to_dict(self) -> dict:
        """Plain floats (a host sync when the fields are device tensors: call it at checkpoints only)."""
        return {k: float(getattr(self, k)) for k in ("text_caption", "image_text", "image_caption")}

    def __eq__(self, other) -> bool:
        return isinstance(other, GateState) and self.to_dict() == other.to_dict()

    @classmethod
    def from_dict(cls, d: dict) -> "GateState":
        return cls(**{k: float(d[k]) for k in ("text_caption", "image_text", "image_caption")})


@dataclass
class Gates:
    sample_weight: torch.Tensor  # W_s, shape [N]
    raw_pair_weight: torch.Tensor  # W_t, shape [N]
    caption_pair_weight: torch.Tensor  # W_c, shape [N]
    state: GateState  # the updated momentum means
    # current-batch mean similarities (0-d tensors), for metrics
    similarity_text_caption: torch.Tensor
    similarity_image_text: torch.Tensor
    similarity_image_caption: torch.Tensor


def _check_triplet(image: torch.Tensor, raw: torch.Tensor, caption: torch.Tensor) -> None:
    if image.dim() != 2 or raw.dim() != 2 or caption.dim() != 2:
        raise ValueError(
            f"gates expect 2-D [N, D] embeddings, got image {tuple(image.shape)}, "
            f"raw {tuple(raw.shape)}, caption {tuple(caption.shape)}"
        )
    if not (image.shape == raw.shape == caption.shape):
        raise ValueError(
            "image, raw-text and caption embeddings must have the same shape [N, D]; got "
            f"image {tuple(image.shape)}, raw {tuple(raw.shape)}, caption {tuple(caption.shape)} "
            "(every image needs exactly one raw text and one caption)"
        )
    if image.shape[0] == 0:
        raise ValueError("gates need a non-empty batch")


@torch.no_grad()
def consistency_gates(
    image: torch.Tensor,
    raw: torch.Tensor,
    caption: torch.Tensor,
    state: GateState,
    sharpness: float = 2.0,
    momentum: float = 0.99,
) -> Gates:
    """Compute W_s, W_t, W_c for a global batch and return them with the updated state.

    Embeddings must already be L2-normalised; computed in float32 whatever their dtype
    (under AMP the features may be fp16/bf16, and exp() amplifies rounding).
    """
    _check_triplet(image, raw, caption)
    image, raw, caption = image.detach().float(), raw.detach().float(), caption.detach().float()

    s_tc = (raw * caption).sum(dim=-1)
    s_it = (image * raw).sum(dim=-1)
    s_ic = (image * caption).sum(dim=-1)

    # Momentum means, updated before use (as in the official train loop). 0-d device tensors:
    # no host synchronisation.
    mean_tc, mean_it, mean_ic = (s.mean() for s in (s_tc, s_it, s_ic))
    new_state = GateState(
        text_caption=momentum * state.text_caption + (1.0 - momentum) * mean_tc,
        image_text=momentum * state.image_text + (1.0 - momentum) * mean_it,
        image_caption=momentum * state.image_caption + (1.0 - momentum) * mean_ic,
    )

    # Language Consistency Gate.
    language_consistency = torch.exp(sharpness * (s_tc - new_state.text_caption))
    sample_weight = language_consistency.clamp(max=1.0)

    # Description Consistency Gate, only where the two texts disagree.
    disagree = language_consistency < 1.0
    ones = torch.ones_like(s_it)
    raw_pair_weight = torch.where(disagree, torch.exp(sharpness * (s_it - new_state.image_text)), ones)
    caption_pair_weight = torch.where(
        disagree, torch.exp(sharpness * (s_ic - new_state.image_caption)), ones
    )

    return Gates(
        sample_weight=sample_weight,
        raw_pair_weight=raw_pair_weight,
        caption_pair_weight=caption_pair_weight,
        state=new_state,
        similarity_text_caption=mean_tc,
        similarity_image_text=mean_it,
        similarity_image_caption=mean_ic,
    )
