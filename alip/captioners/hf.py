"""The ``hf`` backend: any transformers image-to-text captioner (BLIP, GIT, ...).

transformers 5 removed ``AutoModelForVision2Seq`` and the ``image-to-text`` pipeline; captioners
load through ``AutoProcessor`` + ``AutoModelForImageTextToText`` (BLIP -> BlipForConditionalGeneration,
GIT -> GitForCausalLM in 5.23). A checkpoint whose config the auto class does not map falls back
to the class named in its config's ``architectures``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os

import numpy as np
from PIL import Image

from alip.captioners.base import CaptionerConfig, CaptionerError, clean_caption
from alip.captioners.files import resolve_model_dir

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _torch_dtype(config: CaptionerConfig):
    import torch

    name = config.effective_dtype
    if name == "fp16" and not config.device.startswith("cuda"):
        raise CaptionerError("dtype 'fp16' needs a GPU (device='cuda'); use 'fp32' or 'bf16' on CPU")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise CaptionerError(f"device {config.device!r} requested but torch sees no CUDA GPU; use device='cpu'")
    return getattr(torch, _TORCH_DTYPES[name])


def _numpy_float(config: CaptionerConfig):
    """The dtype prepared pixels travel in: the model's where numpy has it (fp16 halves the bytes
    shipped to a GPU actor); bf16 travels as fp32 and is cast on the device."""
    return np.float16 if config.effective_dtype == "fp16" else np.float32


def _writable(value: np.ndarray) -> np.ndarray:
    """`value` as a C-contiguous array torch may share: prepared inputs arrive from Ray's object
    store READ-ONLY (zero-copy), and a tensor over read-only memory is undefined behaviour on any
    write (torch warns). Those are copied (a memcpy of one batch of pixels, next to a generate of
    seconds); a writable contiguous array is shared as is."""
    if value.flags.writeable and value.flags.c_contiguous:
        return value
    return np.array(value, order="C", copy=True)


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' own switch for its tqdm bars ("Loading weights", downloads), off while a model
    loads: inside a job's actors they only add lines to the job's output (the job prints its own
    progress). Restored afterwards, so a caller's choice outside the load stands."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load_processor(source: str):
    from transformers import AutoProcessor

    if os.path.isdir(source) and not os.path.exists(os.path.join(source, "config.json")):
        raise CaptionerError(f"{source!r} holds no config.json: not a transformers model directory")
    try:
        with _no_progress_bars():
            return AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        hint = "" if os.path.isdir(source) else (
            " (a hub id needs network access or a copy in the HF cache; without network pass a local or "
            "s3:// directory, and set HF_HUB_OFFLINE=1 to fail fast)"
        )
        raise CaptionerError(f"cannot load the processor/tokenizer from {source!r}{hint}: {exc}") from exc


def _model_type(source: str) -> str:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as exc:
        raise CaptionerError(f"cannot load a transformers config from {source!r}: {exc}") from exc


class HFPreparer:
    """The CPU half of :class:`HFCaptioner`: processor only (resize, normalise, prompt tokens)."""

    def __init__(self, config: CaptionerConfig):
        if config.backend != "hf":
            raise CaptionerError(f"HFPreparer needs backend 'hf', got {config.backend!r}")
        self.config = config
        self.name = config.name
        self.source = resolve_model_dir(config.model)
        self.processor = _load_processor(self.source)
        self.model_type = _model_type(self.source)
        self._image_kwargs = self._image_size_kwargs(config.image_size)
        self._float = _numpy_float(config)

    def _image_size_kwargs(self, size: int | None) -> dict:
        """Processor kwargs that resize to ``size`` x ``size`` (and crop to it, if the processor crops)."""
        if size is None:
            return {}
        kwargs = {"size": {"height": size, "width": size}}
        image_processor = getattr(self.processor, "image_processor", None)
        if getattr(image_processor, "do_center_crop", False):
            kwargs["crop_size"] = {"height": size, "width": size}
        return kwargs

    @property
    def input_size(self) -> int | None:
        """The square side the model sees (``image_size``, else the processor's), for resizing early."""
        if self.config.image_size:
            return self.config.image_size
        if getattr(getattr(self.processor, "image_processor", None), "do_center_crop", False):
            return None  # resize-shortest-edge + crop: a square resize first would distort
        size = getattr(getattr(self.processor, "image_processor", None), "size", None)
        # transformers 5 keeps sizes in a SizeDict (attributes), older ones in a plain dict.
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        side = get("height")
        return side if side and get("width") == side else None

    def prepare(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        if not isinstance(images, (list, tuple)):
            raise CaptionerError(f"prepare() takes a list of PIL images, got {type(images).__name__}")
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise CaptionerError(f"prepare() item {i} is {type(im).__name__}, expected a PIL.Image")
        images = [im.convert("RGB") for im in images]
        prompt, n = self.config.prompt, len(images)
        if not prompt:
            inputs = dict(self.processor(images=images, return_tensors="np", **self._image_kwargs))
        elif self.model_type == "git":
            # GIT is decoder-only: the prompt continues after [CLS]; a trailing [SEP] would end
            # generation at once, so tokenize without special tokens and prepend CLS (HF's recipe).
            inputs = dict(self.processor(images=images, return_tensors="np", **self._image_kwargs))
            tok = self.processor.tokenizer
            ids = [tok.cls_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
            inputs["input_ids"] = np.array([ids] * n, dtype=np.int64)
        else:
            # BLIP (and processors that pair text with images): BLIP's generate() replaces the
            # first token by BOS and drops the trailing [SEP] itself.
            inputs = dict(self.processor(images=images, text=[prompt] * n, return_tensors="np",
                                         **self._image_kwargs))
        out = {}
        for key, value in inputs.items():
            value = np.asarray(value)
            if value.dtype == object:
                continue
            if np.issubdtype(value.dtype, np.floating):
                value = value.astype(self._float, copy=False)
            elif np.issubdtype(value.dtype, np.integer):
                value = value.astype(np.int64, copy=False)
            out[key] = np.ascontiguousarray(value)
        return out


def auto_class_supports(config) -> bool:
    """Whether AutoModelForImageTextToText maps this config type (BLIP, GIT, ... in transformers 5.23)."""
    from transformers import AutoModelForImageTextToText

    return type(config) in AutoModelForImageTextToText._model_mapping


def _is_captioning_class(cls) -> bool:
    """A class we can caption with: it generates and its forward takes images."""
    from transformers import GenerationMixin

    return issubclass(cls, GenerationMixin) and "pixel_values" in inspect.signature(cls.forward).parameters


def load_model(source: str, dtype, device: str):
    """Load a captioning model: the image-text-to-text auto class, else the config's architecture.

    Returns ``(model, route)`` where ``route`` says which way was taken (for logs and tests).
    """
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise CaptionerError(f"cannot load a transformers config from {source!r}: {exc}") from exc
    if auto_class_supports(config):
        cls, route = AutoModelForImageTextToText, "AutoModelForImageTextToText"
    else:
        archs = getattr(config, "architectures", None) or []
        candidates = [getattr(transformers, a) for a in archs if hasattr(transformers, a)]
        cls = next((c for c in candidates if _is_captioning_class(c)), None)
        if cls is None:
            raise CaptionerError(
                f"{source!r} (model_type {config.model_type!r}, architectures {archs}) is not an image captioning "
                f"model: AutoModelForImageTextToText in transformers {transformers.__version__} does not map it and "
                "none of its architectures generates text from pixel_values"
            )
        route = f"architectures:{cls.__name__}"
        log.info("%s: AutoModelForImageTextToText has no mapping, using %s", source, cls.__name__)
    try:
        with _no_progress_bars():
            model = cls.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise CaptionerError(f"cannot load captioning model weights from {source!r}: {exc}") from exc
    return model.to(device).eval(), route


class HFCaptioner:
    """Caption images with a transformers model; see :class:`CaptionerConfig` for the settings."""

    def __init__(self, config: CaptionerConfig):
        if config.backend != "hf":
            raise CaptionerError(f"HFCaptioner needs backend 'hf', got {config.backend!r}")
        self.config = config
        self.name = config.name
        dtype = _torch_dtype(config)
        self.preparer = HFPreparer(config)
        self.source = self.preparer.source
        self.processor = self.preparer.processor
        self.model, self.load_route = load_model(self.source, dtype, config.device)
        self.dtype = dtype
        self._gen_kwargs = self._generate_kwargs()

    def prepare(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        return self.preparer.prepare(images)

    def _generate_kwargs(self) -> dict:
        c = self.config
        kwargs = dict(
            num_beams=c.num_beams,
            max_new_tokens=c.max_new_tokens,
            min_new_tokens=c.min_new_tokens,
            do_sample=False,  # deterministic: same images + settings -> same captions
        )
        if c.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = c.no_repeat_ngram_size
        vision = getattr(self.model.config, "vision_config", None)
        native = getattr(vision, "image_size", None)
        if c.image_size and native and c.image_size != native:
            # Resized away from the training resolution: BLIP/GIT interpolate position embeddings.
            if "interpolate_pos_encoding" not in inspect.signature(self.model.forward).parameters:
                raise CaptionerError(
                    f"image_size={c.image_size} differs from the model's {native} and "
                    f"{type(self.model).__name__} cannot interpolate position embeddings; drop image_size"
                )
            kwargs["interpolate_pos_encoding"] = True
        kwargs.update(c.extra)
        return kwargs

    # -- protocol -----------------------------------------------------------------------------
    def generate_prepared(self, inputs: dict[str, np.ndarray]) -> list[str]:
        """Captions for prepared inputs: only device transfer, generate and token decoding here."""
        import torch

        tensors = {}
        for key, value in inputs.items():
            t = torch.from_numpy(_writable(value)).to(self.config.device, non_blocking=True)
            tensors[key] = t.to(self.dtype) if t.is_floating_point() else t
        with torch.inference_mode():
            out = self.model.generate(**tensors, **self._gen_kwargs)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [clean_caption(t, self.config.prompt) for t in texts]

    def caption(self, images: list[Image.Image]) -> list[str]:
        if not isinstance(images, (list, tuple)):
            raise CaptionerError(f"caption() takes a list of PIL images, got {type(images).__name__}")
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise CaptionerError(f"caption() item {i} is {type(im).__name__}, expected a PIL.Image")
        captions: list[str] = []
        bs = self.config.batch_size
        for start in range(0, len(images), bs):
            captions.extend(self.generate_prepared(self.prepare(list(images[start:start + bs]))))
        return captions
