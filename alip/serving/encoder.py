"""The model side of the service: preprocessing, batched forwards, class features.

`Encoder` is synchronous and Ray-free. A *backend* gives the HTTP layer async, list-in/list-out
access to it: `LocalBackend` runs each request's list as one forward in a worker thread (tests,
single-process use); the Ray Serve deployment (alip.serving.deployment) feeds items one by one into
`@serve.batch` queues so that concurrent requests share forwards. Class features (zero-shot
prompts) are encoded by `alip.serving.classes` in bounded batches through `encode_prompts`.
"""
from __future__ import annotations

import asyncio
import time
from typing import Protocol, Sequence

import torch

from alip.model import ALIPModel, get_tokenizer, image_transform


class Encoder:
    def __init__(self, model: ALIPModel):
        self.model = model.eval()
        self.tokenizer = get_tokenizer(model)
        self.transform = image_transform(model, train=False)
        self.context_length = model.context_length
        with torch.no_grad():
            # CLIP's temperature: softmax(logit_scale * cosine) gives the model's probabilities
            self.logit_scale = float(model.logit_scale.exp())
        self.device = next(model.parameters()).device

    def info(self) -> dict:
        m = self.model
        return {
            "id": m.model_name,
            "embed_dim": m.embed_dim,
            "image_size": m.image_size,
            "context_length": self.context_length,
            "logit_scale": self.logit_scale,
            "parameters": sum(p.numel() for p in m.parameters()),
            "config": m.model_cfg,
        }

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] preprocessed -> [N, D] L2-normalised, float32 on CPU."""
        return self.model.encode_image(pixels.to(self.device), normalize=True).float().cpu()

    @torch.inference_mode()
    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] token ids -> [N, D] L2-normalised (trimmed to the longest text, exact)."""
        return self.model.encode_text(tokens.to(self.device), normalize=True).float().cpu()

    def probe(self) -> dict:
        """Readiness: a real forward of one tiny image and one text through both towers.

        Catches what a constant check cannot: weights that went non-finite, a broken device, a
        tokenizer or transform that no longer fits the model. Raises RuntimeError on failure.
        """
        from PIL import Image

        t0 = time.perf_counter()
        pixels = self.transform(Image.new("RGB", (8, 8), (127, 127, 127)))[None]
        img = self.encode_images(pixels)
        txt = self.encode_texts(self.tokenize(["a photo"]))
        for name, emb in (("image", img), ("text", txt)):
            if emb.shape != (1, self.model.embed_dim) or not bool(torch.isfinite(emb).all()):
                raise RuntimeError(f"readiness probe: the {name} tower gave {tuple(emb.shape)} "
                                   f"with non-finite values or the wrong size")
            if abs(float(emb.norm()) - 1.0) > 1e-3:
                raise RuntimeError(f"readiness probe: the {name} embedding is not unit-norm ({float(emb.norm()):.4f})")
        if not torch.isfinite(torch.tensor(self.logit_scale)):
            raise RuntimeError("readiness probe: logit_scale is not finite")
        return {"ok": True, "ms": round(1000 * (time.perf_counter() - t0), 1), "at": time.time()}


class Backend(Protocol):
    encoder: Encoder

    async def embed_images(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Preprocessed images [3, H, W] each -> [N, D]."""

    async def embed_texts(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Token rows [L] each -> [N, D]."""

    async def encode_prompts(self, tokens: torch.Tensor) -> torch.Tensor:
        """One batch of class-prompt tokens [N, L] -> [N, D] (alip.serving.classes loops over batches)."""


class LocalBackend:
    """One forward per request, in a thread so the event loop keeps serving."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    async def embed_images(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        return await asyncio.to_thread(self.encoder.encode_images, torch.stack(pixels))

    async def embed_texts(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        return await asyncio.to_thread(self.encoder.encode_texts, torch.stack(tokens))

    async def encode_prompts(self, tokens: torch.Tensor) -> torch.Tensor:
        return await asyncio.to_thread(self.encoder.encode_texts, tokens)
