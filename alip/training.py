"""One process's ALIP training step, with a typed config. No Ray in here: the Ray Train job
(ray_jobs/pretrain.py via alip.pretrain) wraps it, and tests drive it directly.

A step: encode (image, raw text, caption) -> gates + adaptive loss over the global batch
(alip.loss.ALIPLoss) -> backward -> grad-norm clip -> AdamW -> OneCycleLR -> clamp the logit scale.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch

from alip.gates import GateState
from alip.loss import OBJECTIVES, ALIPLoss
from alip.model import ALIPModel

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class TrainConfig:
    """Training hyperparameters. Defaults are the paper's Table 2 (ViT-B/32 on YFCC15M)."""

    model: str = "ViT-B-32"
    objective: str = "alip"  # alip | clip | caption | alip_no_lcg | alip_no_dcg
    global_batch_size: int = 4096
    epochs: int = 32
    max_steps: int | None = None  # when set, overrides epochs (tiny runs, benchmarks)
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2
    pct_start: float = 0.1  # OneCycleLR warm-up fraction
    init_temperature: float = 0.07
    gate_sharpness: float = 2.0  # lambda: the official exp(x)**2
    gate_momentum: float = 0.99  # alpha of the momentum means
    grad_clip_norm: float = 1.0
    precision: str = "amp"  # amp (bf16 autocast on GPU; fp32 on CPU) | fp32
    seed: int = 0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.global_batch_size < 2:
            raise ValueError("global_batch_size must be >= 2 (contrastive learning needs negatives)")
        if self.precision not in ("amp", "fp32"):
            raise ValueError(f"precision must be 'amp' or 'fp32', got {self.precision!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """open_clip's rule: no weight decay on gains, biases, embeddings' 1-D params or the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@dataclass
class StepResult:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


class ALIPTrainer:
    """Holds model, optimiser, scheduler, gate state and step; `train_step` does one update.

    `model` may be wrapped (DDP by Ray Train); `rank`/`world_size` tell the loss how to gather.
    Each rank passes its local slice; everything that must be global (gates, loss) is.
    """

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, total_steps: int,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.cfg = cfg
        self.model = model
        self.unwrapped: ALIPModel = getattr(model, "module", model)
        self.device = torch.device(device)
        self.total_steps = total_steps
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.unwrapped, cfg.weight_decay), lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        )
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.pct_start,
            # Adam betas are not cycled (the official code uses OneCycleLR's defaults but with
            # AdamW, torch would cycle beta1 between 0.85 and 0.95: keep Table 2's beta1 = 0.9).
            cycle_momentum=False,
        )
        self.loss_fn = ALIPLoss(cfg.objective, cfg.gate_sharpness, cfg.gate_momentum, rank, world_size)
        self.gate_state = GateState()
        self.step = 0
        self.rank, self.world_size = rank, world_size

    def _autocast(self):
        if self.cfg.precision == "amp" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, images: torch.Tensor, raw_tokens: torch.Tensor | None,
                   caption_tokens: torch.Tensor | None) -> StepResult:
        if self.step >= self.total_steps:
            raise RuntimeError(f"the schedule has {self.total_steps} steps and all were taken")
        self.model.train()
        lf = self.loss_fn
        images = images.to(self.device, non_blocking=True)
        raw_tokens = raw_tokens.to(self.device) if (raw_tokens is not None and lf.uses_raw) else None
        caption_tokens = caption_tokens.to(self.device) if (caption_tokens is not None and lf.uses_caption) else None
        with self._autocast():
            out = self.model(images, raw_tokens, caption_tokens)
        result = lf(out["image"].float(),
                    out["raw"].float() if out["raw"] is not None else None,
                    out["caption"].float() if out["caption"] is not None else None,
                    out["logit_scale"].float(), self.gate_state)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.unwrapped.parameters(), self.cfg.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.gate_state = result.state
        self.step += 1
        metrics = dict(result.metrics)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["grad_norm"] = float(grad_norm)
        return StepResult(self.step, metrics)

    # --- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model_name": self.unwrapped.model_name,
            "model_cfg": self.unwrapped.model_cfg,
            "model": self.unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "gate_state": self.gate_state.to_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "train_config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("model_cfg") != self.unwrapped.model_cfg:
            raise ValueError(
                f"checkpoint is of model {state.get('model_name')!r} with a different architecture than "
                f"{self.unwrapped.model_name!r}; resume with the same model config (or start a new run name)"
            )
        if state.get("total_steps") != self.total_steps:
            raise ValueError(
                f"checkpoint was made for a {state.get('total_steps')}-step schedule, this run has "
                f"{self.total_steps} steps (dataset size, epochs or batch size changed); use a new run name"
            )
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.gate_state = GateState.from_dict(state["gate_state"])
        self.step = int(state["step"])


def save_training_checkpoint(trainer: ALIPTrainer, path) -> None:
    torch.save(trainer.state_dict(), path)


def load_training_checkpoint(trainer: ALIPTrainer, path) -> None:
    try:
        state = torch.load(path, map_location=trainer.device, weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot read training checkpoint {path}: {e}") from e
    trainer.load_state_dict(state)
