"""ALIP's adaptive contrastive loss, and the training loss module that runs it over the global batch.

The loss of one path (raw text or caption), over a batch of N pairs with L2-normalised
embeddings and scale = exp(logit_scale):

    logits_i2t = scale * image @ text.T        logits_t2i = scale * text @ image.T
    l_k        = (CE(logits_i2t[k], k) + CE(logits_t2i[k], k)) / 2
    L_path     = mean_k(l_k * sample_weight[k] * pair_weight[k])

ALIP's total loss is L_raw (weights W_s * W_t) + L_caption (weights W_s * W_c); see alip.gates.

`adaptive_contrastive_loss` is the single-process formula. `ALIPLoss` is what training uses: it
all-gathers features across ranks (with gradient, open_clip's `gather_with_grad=True`), computes
the gates on the *global* batch, and uses open_clip's `local_loss` trick: each rank only builds the
logits rows of its own samples against every column. The mean over ranks of the per-rank losses
is exactly the single-process loss on the concatenated batch, and because the gather carries
gradients back to their owners, DDP's gradient averaging yields exactly its gradient.

Ranks may hold UNEQUAL shares of the global batch (alip.training.split_global_batch: G = 10 on 3
ranks is 4 + 3 + 3), so that any worker count trains the same global batch. The shares are known
from the config, so the gather needs no size exchange: each rank pads its features to the largest
share, all_gather moves equal shapes, and the padding rows are dropped. Each rank's loss is its
rows' SUM scaled by world_size / G, so the mean over ranks (what DDP's gradient averaging computes)
is the mean over the G samples whatever the shares.

Nothing in the forward synchronises with the host: every metric is a 0-d device tensor.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from alip.gates import GateState, consistency_gates

OBJECTIVES = ("alip", "clip", "caption", "alip_no_lcg", "alip_no_dcg")


def _per_sample_infonce(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    offset: int,
) -> torch.Tensor:
    """Symmetric InfoNCE of rows [offset, offset + n) of the global batch, one value per row."""
    logits_i2t = logit_scale * image_rows @ all_text.T
    logits_t2i = logit_scale * text_rows @ all_image.T
    labels = torch.arange(image_rows.shape[0], device=image_rows.device) + offset
    return (
        F.cross_entropy(logits_i2t.float(), labels, reduction="none")
        + F.cross_entropy(logits_t2i.float(), labels, reduction="none")
    ) / 2


def adaptive_contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    sample_weight: torch.Tensor,
    pair_weight: torch.Tensor,
) -> torch.Tensor:
    """Weighted symmetric InfoNCE of one path, single process. `logit_scale` is already exp()'d."""
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(
            f"image and text embeddings must both be [N, D] with the same N; "
            f"got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    n = image.shape[0]
    if sample_weight.shape != (n,) or pair_weight.shape != (n,):
        raise ValueError(
            f"weights must be 1-D of length {n}; got sample_weight {tuple(sample_weight.shape)}, "
            f"pair_weight {tuple(pair_weight.shape)}"
        )
    per_sample = _per_sample_infonce(image, text, image, text, logit_scale, 0)
    return (per_sample * sample_weight.detach() * pair_weight.detach()).mean()


def _gather(x: torch.Tensor, shares: Sequence[int]) -> torch.Tensor:
    """all_gather with gradient (torch.distributed.nn), concatenated along the batch axis.

    `shares[r]` rows come from rank r. Unequal shares are padded to the largest one for the
    collective and the padding is cut off again (its gradient is zero)."""
    if len(shares) == 1:
        return x
    largest = max(shares)
    padded = F.pad(x, (0, 0, 0, largest - x.shape[0])) if x.shape[0] < largest else x
    with warnings.catch_warnings():
        # torch 2.14 marks it deprecated in favour of a private API; it is the one with autograd.
        warnings.simplefilter("ignore", FutureWarning)
        parts = torch.distributed.nn.functional.all_gather(padded)
    if all(s == largest for s in shares):
        return torch.cat(parts, dim=0)
    return torch.cat([part[:s] for part, s in zip(parts, shares)], dim=0)


@dataclass
class LossOutput:
    loss: torch.Tensor  # this rank's share; DDP-averaged gradients of it = gradient of the global loss
    state: GateState
    # Global-batch values, the same on every rank, as 0-d device tensors (fetch them when logging).
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class ALIPLoss(torch.nn.Module):
    """Gates + adaptive loss over the global batch, for every training objective.

    objective:
      alip         L_raw(W_s * W_t) + L_caption(W_s * W_c)    (the paper)
      clip         L_raw with unit weights (the baseline; captions unused)
      caption      L_caption with unit weights (caption-only ablation)
      alip_no_lcg  ALIP with W_s = 1
      alip_no_dcg  ALIP with W_t = W_c = 1
    All share this code path so that comparisons differ only in the weights.

    `shares`: the number of samples each rank holds (alip.training.split_global_batch); None means
    every rank holds as many as this one.
    """

    def __init__(self, objective: str = "alip", sharpness: float = 2.0, momentum: float = 0.99,
                 rank: int = 0, world_size: int = 1, shares: Sequence[int] | None = None):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if shares is not None:
            shares = [int(s) for s in shares]
            if len(shares) != world_size or min(shares) < 1:
                raise ValueError(f"shares must give every one of the {world_size} ranks >= 1 sample, got {shares}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.objective = objective
        self.sharpness = sharpness
        self.momentum = momentum
        self.rank = rank
        self.world_size = world_size
        self.shares = shares

    @property
    def uses_raw(self) -> bool:
        return self.objective != "caption"

    @property
    def uses_caption(self) -> bool:
        return self.objective != "clip"

    def _shares(self, n: int) -> list[int]:
        """Per-rank sample counts, checked against this rank's batch on the host (shapes are host
        metadata: no device sync, and no per-step size exchange between ranks)."""
        shares = self.shares if self.shares is not None else [n] * self.world_size
        if n != shares[self.rank]:
            raise ValueError(
                f"rank {self.rank} holds {n} samples but its share of the global batch is "
                f"{shares[self.rank]} (per-rank shares {shares}); every rank must pass exactly its share"
            )
        return shares

    def forward(
        self,
        image: torch.Tensor,
        raw: torch.Tensor | None,
        caption: torch.Tensor | None,
        logit_scale: torch.Tensor,
        state: GateState,
    ) -> LossOutput:
        n = image.shape[0]
        for name, t in (("raw", raw), ("caption", caption)):
            if t is not None and t.shape != image.shape:
                raise ValueError(
                    f"{name} embeddings {tuple(t.shape)} do not match image embeddings {tuple(image.shape)}"
                )
        if self.uses_raw and raw is None:
            raise ValueError(f"objective {self.objective!r} needs raw-text embeddings")
        if self.uses_caption and caption is None:
            raise ValueError(f"objective {self.objective!r} needs caption embeddings")
        shares = self._shares(n)
        offset = sum(shares[:self.rank])
        # sum over this rank's rows * scale, averaged over ranks (by DDP or the all_reduce below),
        # is the mean over the whole global batch.
        scale = self.world_size / sum(shares)

        all_image = _gather(image, shares)
        all_raw = _gather(raw, shares) if raw is not None else None
        all_caption = _gather(caption, shares) if caption is not None else None

        metrics: dict[str, torch.Tensor] = {"logit_scale": logit_scale.detach().float()}
        new_state = state
        local = slice(offset, offset + n)
        w_s = w_t = w_c = None  # None = unit weights
        if all_raw is not None and all_caption is not None:
            gates = consistency_gates(all_image, all_raw, all_caption, state, self.sharpness, self.momentum)
            new_state = gates.state
            metrics.update(
                similarity_text_caption=gates.similarity_text_caption,
                similarity_image_text=gates.similarity_image_text,
                similarity_image_caption=gates.similarity_image_caption,
                momentum_text_caption=_as_tensor(new_state.text_caption, image),
                momentum_image_text=_as_tensor(new_state.image_text, image),
                momentum_image_caption=_as_tensor(new_state.image_caption, image),
                mean_sample_weight=gates.sample_weight.mean(),
                mean_raw_pair_weight=gates.raw_pair_weight.mean(),
                mean_caption_pair_weight=gates.caption_pair_weight.mean(),
                # The supplement's A.3 statistic (27.6% of YFCC15M pairs).
                fraction_caption_over_raw=(gates.caption_pair_weight > gates.raw_pair_weight).float().mean(),
            )
            if self.objective in ("alip", "alip_no_dcg"):
                w_s = gates.sample_weight[local]
            if self.objective in ("alip", "alip_no_lcg"):
                w_t, w_c = gates.raw_pair_weight[local], gates.caption_pair_weight[local]

        total = image.new_zeros((), dtype=torch.float32)
        # name -> this rank's scaled sum; mean over ranks = the global value
        reported: dict[str, torch.Tensor] = {}
        for path, text, all_text, w_pair in (("raw", raw, all_raw, w_t), ("caption", caption, all_caption, w_c)):
            if not (self.uses_raw if path == "raw" else self.uses_caption):
                continue
            per = _per_sample_infonce(image, text, all_image, all_text, logit_scale, offset)
            weighted = per
            for w in (w_s, w_pair):
                if w is not None:
                    weighted = weighted * w
            path_loss = weighted.sum() * scale
            total = total + path_loss
            reported[f"loss_{path}"] = path_loss.detach()
            # The unweighted InfoNCE: the gate-weighted losses rise as the gates open, this one
            # shows whether the model still learns.
            reported[f"infonce_{path}"] = per.detach().sum() * scale
        reported = {"loss": total.detach(), **reported}

        # Report global values (mean over ranks == single-process value on the whole batch), in one
        # collective and without leaving the device.
        values = torch.stack(list(reported.values()))
        if self.world_size > 1:
            dist.all_reduce(values)
            values = values / self.world_size
        metrics.update(zip(reported.keys(), values.unbind(0)))
        return LossOutput(loss=total, state=new_state, metrics=metrics)


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else like.new_tensor(float(value), dtype=torch.float32)
