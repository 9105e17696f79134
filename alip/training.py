"""One process's ALIP training step, with a typed config. No Ray in here: the Ray Train job
(ray_jobs/pretrain.py via alip.pretrain) wraps it, and tests drive it directly.

A step: encode (image, raw text, caption) -> gates + adaptive loss over the global batch
(alip.loss.ALIPLoss) -> backward -> grad-norm clip -> AdamW -> OneCycleLR -> clamp the logit scale.

The global batch is a property of the run, not of the cluster: `split_global_batch` gives each of
W ranks its share (unequal when W does not divide it), and with `micro_batch_size` a rank's share
is processed in micro-batches with exact gradient accumulation by feature caching (GradCache):
  1. embed every micro-batch without autograd (the features of the whole local share are cached);
  2. gates + loss ONCE over the global batch, on the cached features -> d loss / d features;
  3. re-embed each micro-batch with autograd and back-propagate those feature gradients into it.
The gradient is the full-batch gradient (exactly, up to float rounding), for one extra forward.

The step is lean: it never waits for the device (no `.item()`, `float()` or size exchange). The
metrics are 0-d device tensors; `StepResult.host_metrics()` fetches them in one transfer when the
caller logs. Trim lengths are computed on the CPU tokens before they move to the device.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch

from alip.gates import GateState
from alip.loss import OBJECTIVES, ALIPLoss
from alip.model import ALIPModel, eot_length

MAX_LOGIT_SCALE = math.log(100.0)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRECISION_ALIASES = {"amp": "auto"}  # older presets and checkpoints say "amp"


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
    # auto: bf16 autocast on CUDA with bf16 (A100, H100...), fp16 autocast + GradScaler on older CUDA
    # (V100, T4), fp32 on CPU. "amp" is accepted as an alias of "auto".
    precision: str = "auto"
    seed: int = 0
    # Per-worker micro-batch (memory-bound): a worker's share of the global batch is processed in
    # micro-batches with exact gradient accumulation (feature caching). None = one pass.
    micro_batch_size: int | None = None
    compile: bool = False  # torch.compile the image and text towers
    grad_checkpointing: bool = False  # recompute the towers' activations in backward (less memory)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.global_batch_size < 2:
            raise ValueError("global_batch_size must be >= 2 (contrastive learning needs negatives)")
        if PRECISION_ALIASES.get(self.precision, self.precision) not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (or 'amp' = auto), "
                             f"got {self.precision!r}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 (or unset), got {self.micro_batch_size}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def split_global_batch(global_batch_size: int, world_size: int) -> list[int]:
    """Each rank's share of the global batch: rank r holds G // W + (1 if r < G % W else 0).

    Any worker count gives the same global batch (and so the same gates and loss); shares differ
    by at most one sample."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if global_batch_size < world_size:
        raise ValueError(f"a global batch of {global_batch_size} cannot give each of {world_size} workers a sample")
    base, extra = divmod(global_batch_size, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision a step runs in on `device`: 'bf16', 'fp16' or 'fp32'."""
    device = torch.device(device)
    precision = PRECISION_ALIASES.get(precision, precision)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16 support; use precision fp16 or auto")
    return precision


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
    # 0-d device tensors (global-batch values) and plain floats (lr): reading a tensor is a host
    # sync, so callers fetch them with host_metrics() only when they log.
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)

    def host_metrics(self) -> dict[str, float]:
        """Every metric as a Python float, in one device-to-host transfer per device."""
        out = {k: float(v) for k, v in self.metrics.items() if not isinstance(v, torch.Tensor)}
        by_device: dict[torch.device, list[str]] = {}
        for k, v in self.metrics.items():
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append(k)
        for keys in by_device.values():
            values = torch.stack([self.metrics[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
            out.update(zip(keys, values))
        return {k: out[k] for k in self.metrics}


class ALIPTrainer:
    """Holds model, optimiser, scheduler, gate state and step; `train_step` does one update.

    `model` may be wrapped (DDP by Ray Train); `rank`/`world_size` tell the loss how to gather.
    Each rank passes its local share (`split_global_batch`); everything that must be global
    (gates, loss) is.
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
        self.rank, self.world_size = rank, world_size
        self.shares = split_global_batch(cfg.global_batch_size, world_size)
        self.local_batch_size = self.shares[rank]
        self.precision = resolve_precision(cfg.precision, self.device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # fp16's narrow range needs loss scaling; bf16 has fp32's exponent range and does not.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        if cfg.grad_checkpointing:
            self.unwrapped.set_grad_checkpointing(True)
        if cfg.compile:
            self.unwrapped.compile_towers()
        # Trim lengths rounded up to a multiple of 8 under compile bound the distinct text shapes
        # (recompilations) to ~context/8; exact either way (see ALIPModel.encode_text).
        self.trim_multiple = 8 if cfg.compile else 1
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.unwrapped, cfg.weight_decay), lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            # The fused CUDA kernel is faster and takes the GradScaler's inf check on the device
            # (a non-fused optimizer makes GradScaler.step read found_inf on the host: a sync).
            fused=self.device.type == "cuda",
        )
        # OneCycleLR divides by (pct_start * total_steps - 1), which is exactly 0 for e.g. 10 steps at
        # 0.1 (ZeroDivisionError at construction): a two-step warm-up then.
        pct_start = 2.0 / total_steps if abs(cfg.pct_start * total_steps - 1.0) < 1e-9 else cfg.pct_start
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start,
            # Adam betas are not cycled (the official code uses OneCycleLR's defaults but with
            # AdamW, torch would cycle beta1 between 0.85 and 0.95: keep Table 2's beta1 = 0.9).
            cycle_momentum=False,
        )
        self.loss_fn = ALIPLoss(cfg.objective, cfg.gate_sharpness, cfg.gate_momentum, rank, world_size,
                                shares=self.shares)
        self.gate_state = GateState()
        self.step = 0

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _check_batch(self, images, raw_tokens, caption_tokens) -> None:
        """Host-side shape checks (shapes are host metadata: free, no device sync)."""
        n = images.shape[0]
        for name, tok in (("raw_tokens", raw_tokens), ("caption_tokens", caption_tokens)):
            if tok is not None and tok.shape[0] != n:
                raise ValueError(f"{name} has {tok.shape[0]} rows but there are {n} images")
        if n != self.local_batch_size:
            raise ValueError(
                f"rank {self.rank} got {n} samples; its share of the global batch of "
                f"{self.cfg.global_batch_size} over {self.world_size} worker(s) is {self.local_batch_size} "
                f"(per-rank shares {self.shares})"
            )
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")

    def _text_lengths(self, raw_tokens, caption_tokens) -> dict[str, int | None]:
        """Trim lengths of both texts. Free on CPU tokens (the data path hands them over on the
        CPU when it can); for tokens already on an accelerator both lengths come in ONE host read."""
        if not self.unwrapped.trims_text:
            return {"raw_length": None, "caption_length": None}
        present = {k: t for k, t in (("raw_length", raw_tokens), ("caption_length", caption_tokens)) if t is not None}
        lengths: dict[str, int | None] = {"raw_length": None, "caption_length": None}
        on_device = [k for k, t in present.items() if t.device.type != "cpu" and t.shape[0] > 0]
        if on_device:
            eots = torch.stack([present[k].argmax(dim=-1).max() for k in on_device]).tolist()
            for k, eot in zip(on_device, eots):
                m = self.trim_multiple
                lengths[k] = min(-(-(eot + 1) // m) * m, present[k].shape[1])
        for k, t in present.items():
            if k not in on_device:
                lengths[k] = eot_length(t, self.trim_multiple)
        return lengths

    def train_step(self, images: torch.Tensor, raw_tokens: torch.Tensor | None,
                   caption_tokens: torch.Tensor | None, raw_length: int | None = None,
                   caption_length: int | None = None) -> StepResult:
        """One update on this rank's share of the global batch.

        images: uint8 [N, 3, H, W] raw pixels (normalised here, on the device) or float, already
        normalised. Tokens: [N, context] int, best passed on the CPU (see module docstring), or
        pass `raw_length`/`caption_length` (`alip.model.eot_length`, computed where the tokens were
        made) to skip the one host read that trimming device tokens costs."""
        if self.step >= self.total_steps:
            raise RuntimeError(f"the schedule has {self.total_steps} steps and all were taken")
        lf = self.loss_fn
        raw_tokens = raw_tokens if lf.uses_raw else None
        caption_tokens = caption_tokens if lf.uses_caption else None
        self._check_batch(images, raw_tokens, caption_tokens)
        # Lengths the caller knows are kept; the others are computed (before the tokens move).
        lengths = self._text_lengths(raw_tokens if raw_length is None else None,
                                     caption_tokens if caption_length is None else None)
        if self.unwrapped.trims_text:
            for key, given, tokens in (("raw_length", raw_length, raw_tokens),
                                       ("caption_length", caption_length, caption_tokens)):
                if given is not None and tokens is not None:
                    lengths[key] = int(given)
        self.model.train()
        images = images.to(self.device, non_blocking=True)
        raw_tokens = raw_tokens.to(self.device, non_blocking=True) if raw_tokens is not None else None
        caption_tokens = caption_tokens.to(self.device, non_blocking=True) if caption_tokens is not None else None

        self.optimizer.zero_grad(set_to_none=True)
        micro = self.cfg.micro_batch_size
        if micro is None or micro >= images.shape[0]:
            result = self._forward_backward(images, raw_tokens, caption_tokens, lengths)
        else:
            result = self._forward_backward_cached(images, raw_tokens, caption_tokens, lengths, micro)

        params = [p for p in self.unwrapped.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update when a gradient overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.gate_state = result.state
        self.step += 1
        metrics: dict[str, torch.Tensor | float] = dict(result.metrics)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["grad_norm"] = grad_norm.detach()
        return StepResult(self.step, metrics)

    def _loss(self, out: dict):
        return self.loss_fn(out["image"].float(),
                            out["raw"].float() if out["raw"] is not None else None,
                            out["caption"].float() if out["caption"] is not None else None,
                            out["logit_scale"].float(), self.gate_state)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _forward_backward(self, images, raw_tokens, caption_tokens, lengths):
        """The whole local share in one forward with autograd."""
        with self._autocast():
            out = self.model(images, raw_tokens, caption_tokens, **lengths)
        result = self._loss(out)
        self._backward(result.loss)
        return result

    def _forward_backward_cached(self, images, raw_tokens, caption_tokens, lengths, micro: int):
        """Exact gradient accumulation with feature caching (GradCache; open_clip's accum_freq)."""
        chunks = [slice(i, min(i + micro, images.shape[0])) for i in range(0, images.shape[0], micro)]

        def piece(t, sl):
            return t[sl] if t is not None else None

        # 1. Features of every micro-batch, no autograd graph kept (the memory saving). Through the
        #    unwrapped model: DDP's hooks and buffer broadcast are for the passes with gradient.
        cached: dict[str, list[torch.Tensor]] = {"image": [], "raw": [], "caption": []}
        with torch.no_grad(), self._autocast():
            for sl in chunks:
                out = self.unwrapped(images[sl], piece(raw_tokens, sl), piece(caption_tokens, sl), **lengths)
                for k in cached:
                    if out[k] is not None:
                        cached[k].append(out[k])
        feats = {k: torch.cat(v).float().requires_grad_() for k, v in cached.items() if v}
        scale_leaf = self.unwrapped.logit_scale.detach().exp().float().requires_grad_()

        # 2. Gates and loss once over the global batch; gradients with respect to the features.
        result = self.loss_fn(feats["image"], feats.get("raw"), feats.get("caption"), scale_leaf, self.gate_state)
        leaves = [*feats.values(), scale_leaf]
        loss = self.scaler.scale(result.loss) if self.scaler is not None else result.loss
        grads = dict(zip([*feats.keys(), "logit_scale"], torch.autograd.grad(loss, leaves)))

        # 3. Re-embed each micro-batch with autograd and push its feature gradients through it.
        #    Under DDP only the last backward all-reduces (no_sync accumulates locally before it).
        for index, sl in enumerate(chunks):
            last = index == len(chunks) - 1
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self._autocast():
                    out = self.model(images[sl], piece(raw_tokens, sl), piece(caption_tokens, sl), **lengths)
                outputs = [out[k] for k in feats]
                out_grads = [grads[k][sl].to(out[k].dtype) for k in feats]
                if last:  # the logit scale's gradient, once, through a pass DDP sees
                    outputs.append(out["logit_scale"])
                    out_grads.append(grads["logit_scale"].to(out["logit_scale"].dtype))
                torch.autograd.backward(outputs, out_grads)
        return result

    # --- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
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
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

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
        if self.scaler is not None and state.get("grad_scaler"):
            # An fp16 run resumes with its loss scale (a bf16/fp32 checkpoint starts from the default).
            self.scaler.load_state_dict(state["grad_scaler"])


def save_training_checkpoint(trainer: ALIPTrainer, path) -> None:
    torch.save(trainer.state_dict(), path)


def load_training_checkpoint(trainer: ALIPTrainer, path) -> None:
    try:
        state = torch.load(path, map_location=trainer.device, weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot read training checkpoint {path}: {e}") from e
    trainer.load_state_dict(state)
