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
"""
from __future__ import annotations

import warnings
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


def _gather(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """all_gather with gradient (torch.distributed.nn), concatenated along the batch axis."""
    if world_size == 1:
        return x
    with warnings.catch_warnings():
        # torch 2.14 marks it deprecated in favour of a private API; it is the one with autograd.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)


@dataclass
class LossOutput:
    loss: torch.Tensor  # this rank's share; DDP-averaged gradients of it = gradient of the global loss
    state: GateState
    metrics: dict[str, float] = field(default_factory=dict)  # global-batch values, same on every rank


class ALIPLoss(torch.nn.Module):
    """Gates + adaptive loss over the global batch, for every training objective.

    objective:
      alip         L_raw(W_s * W_t) + L_caption(W_s * W_c)    (the paper)
      clip         L_raw with unit weights (the baseline; captions unused)
      caption      L_caption with unit weights (caption-only ablation)
      alip_no_lcg  ALIP with W_s = 1
      alip_no_dcg  ALIP with W_t = W_c = 1
    All share this code path so that comparisons differ only in the weights.
    """

    def __init__(self, objective: str = "alip", sharpness: float = 2.0, momentum: float = 0.99,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.objective = objective
        self.sharpness = sharpness
        self.momentum = momentum
        self.rank = rank
        self.world_size = world_size

    @property
    def uses_raw(self) -> bool:
        return self.objective != "caption"

    @property
    def uses_caption(self) -> bool:
        return self.objective != "clip"

    def _check_local_sizes(self, n: int, device: torch.device) -> None:
        if self.world_size == 1:
            return
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
        sizes = [int(s) for s in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(f"every rank must hold the same number of samples; got per-rank sizes {sizes}")

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
        self._check_local_sizes(n, image.device)
        offset = self.rank * n

        all_image = _gather(image, self.world_size)
        all_raw = _gather(raw, self.world_size) if raw is not None else None
        all_caption = _gather(caption, self.world_size) if caption is not None else None

        metrics: dict[str, float] = {"logit_scale": float(logit_scale.detach())}
        new_state = state
        local = slice(offset, offset + n)
        ones = torch.ones(n, device=image.device)
        w_s = w_t = w_c = ones
        if all_raw is not None and all_caption is not None:
            gates = consistency_gates(all_image, all_raw, all_caption, state, self.sharpness, self.momentum)
            new_state = gates.state
            metrics.update(
                similarity_text_caption=gates.similarity_text_caption,
                similarity_image_text=gates.similarity_image_text,
                similarity_image_caption=gates.similarity_image_caption,
                momentum_text_caption=new_state.text_caption,
                momentum_image_text=new_state.image_text,
                momentum_image_caption=new_state.image_caption,
                mean_sample_weight=float(gates.sample_weight.mean()),
                mean_raw_pair_weight=float(gates.raw_pair_weight.mean()),
                mean_caption_pair_weight=float(gates.caption_pair_weight.mean()),
                # The supplement's A.3 statistic (27.6% of YFCC15M pairs).
                fraction_caption_over_raw=float(
                    (gates.caption_pair_weight > gates.raw_pair_weight).float().mean()
                ),
            )
            if self.objective in ("alip", "alip_no_dcg"):
                w_s = gates.sample_weight[local]
            if self.objective in ("alip", "alip_no_lcg"):
                w_t, w_c = gates.raw_pair_weight[local], gates.caption_pair_weight[local]

        total = image.new_zeros((), dtype=torch.float32)
        loss_raw = loss_caption = None
        if self.uses_raw:
            per = _per_sample_infonce(image, raw, all_image, all_raw, logit_scale, offset)
            loss_raw = (per * w_s * w_t).mean()
            total = total + loss_raw
        if self.uses_caption:
            per = _per_sample_infonce(image, caption, all_image, all_caption, logit_scale, offset)
            loss_caption = (per * w_s * w_c).mean()
            total = total + loss_caption

        # Report global values (mean over ranks == single-process value on the whole batch).
        values = torch.stack([
            total.detach(),
            loss_raw.detach() if loss_raw is not None else total.new_tensor(float("nan")),
            loss_caption.detach() if loss_caption is not None else total.new_tensor(float("nan")),
        ])
        if self.world_size > 1:
            dist.all_reduce(values)
            values = values / self.world_size
        metrics["loss"] = float(values[0])
        if loss_raw is not None:
            metrics["loss_raw"] = float(values[1])
        if loss_caption is not None:
            metrics["loss_caption"] = float(values[2])
        return LossOutput(loss=total, state=new_state, metrics=metrics)
