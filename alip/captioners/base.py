"""The captioner protocol, its typed config, spec parsing and caption cleaning.

A captioner turns a batch of PIL images into one string each and names itself. The name is
what the caption job writes into the dataset's ``captioner`` column, so it identifies the
model, its dtype, the input size and the generation settings: two runs with the same name
must be comparable (:func:`captioner_id`).

Captioning is split in two halves so a GPU only ever runs the model:

* ``prepare(images) -> dict[str, np.ndarray]`` (CPU, needs only the processor): resize +
  normalise + tokenise the prompt. :func:`load_preparer` builds just this half (no weights),
  so the caption job runs it in cheap CPU tasks next to decoding.
* ``generate_prepared(inputs) -> list[str]`` (the model's device): generate + decode tokens.

``caption(images)`` is ``generate_prepared(prepare(images))`` in batches.

Captioners are built in the process that uses them (a Ray actor in the caption job), so a
:class:`CaptionerConfig` is small and picklable and the weights are loaded in ``__init__``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from alip.captioners.noisy import CaptionNoise

#: Where the built-in captioner (a tiny BLIP trained on the built-in world) is shipped.
BUILTIN_MODEL_DIR = Path(__file__).resolve().parent / "builtin_model"

Backend = Literal["hf", "ofa"]
_DTYPES = ("fp32", "fp16", "bf16")


class CaptionerError(ValueError):
    """A captioner spec or config is invalid, or its model cannot be loaded."""


@runtime_checkable
class Captioner(Protocol):
    """Anything that captions a batch of images."""

    name: str

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One cleaned caption per image, in order."""
        ...

    def prepare(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        """Model inputs for ``images`` (CPU work only); every array's first axis is the image."""
        ...

    def generate_prepared(self, inputs: dict[str, np.ndarray]) -> list[str]:
        """One cleaned caption per row of ``inputs`` (any slice of what :meth:`prepare` returned)."""
        ...


@runtime_checkable
class Preparer(Protocol):
    """The CPU half of a captioner: turns images into model inputs; holds no weights."""

    name: str

    def prepare(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        ...


@dataclass(frozen=True)
class CaptionerConfig:
    """Everything needed to build a captioner; small and picklable (weights load in the actor).

    ``model`` is a hub id, a local directory or an ``s3://`` directory (hf backend), or a
    local/S3 directory holding an OFA checkpoint (ofa backend). Generation settings follow
    the transformers names; ``max_new_tokens``/``min_new_tokens`` count generated tokens
    only (the prompt is not included).
    """

    backend: Backend
    model: str
    device: str = "cpu"
    dtype: str | None = None  # "fp32" | "fp16" | "bf16"; None = fp16 on CUDA, fp32 on CPU
    num_beams: int = 3
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0
    prompt: str | None = None  # fed to the model and stripped from its output
    image_size: int | None = None  # override the processor's resize (square), None = keep
    batch_size: int = 32  # images per forward pass inside caption()
    label: str | None = None  # model part of `name`; None = `model`
    ofa_python: str | None = None  # python of the OFA venv; None = $ALIP_OFA_PYTHON or .ofa-venv
    extra: dict = field(default_factory=dict)  # passed to generate() as-is
    noise: "CaptionNoise | None" = None  # edits the captions on purpose (alip.captioners.noisy); None = as-is

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "ofa"):
            raise CaptionerError(f"unknown captioner backend {self.backend!r}; use 'hf' or 'ofa'")
        if not isinstance(self.model, str) or not self.model.strip():
            raise CaptionerError("CaptionerConfig.model must be a non-empty hub id, directory or s3:// URI")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise CaptionerError(f"dtype must be one of {_DTYPES} or None, got {self.dtype!r}")
        if not (isinstance(self.device, str) and (self.device == "cpu" or self.device.startswith("cuda"))):
            raise CaptionerError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise CaptionerError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("min_new_tokens", "no_repeat_ngram_size"):
            if int(getattr(self, name)) < 0:
                raise CaptionerError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise CaptionerError(
                f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})"
            )
        if self.image_size is not None and int(self.image_size) < 8:
            raise CaptionerError(f"image_size must be >= 8 or None, got {self.image_size!r}")

    def with_overrides(self, **overrides) -> "CaptionerConfig":
        """A copy with some fields replaced; unknown names are a clear error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise CaptionerError(f"unknown captioner setting(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    @property
    def effective_dtype(self) -> str:
        """The dtype the model runs in: ``dtype``, else half precision on a GPU and fp32 on CPU."""
        if self.dtype is not None:
            return self.dtype
        return "fp16" if self.device.startswith("cuda") else "fp32"

    @property
    def name(self) -> str:
        """``<model>[<dtype>,<generation settings>]``: the value of the dataset's ``captioner`` column.

        Everything that changes a caption is in it: fp16 and fp32 captions differ, so the dtype
        is part of the name (the device is not: fp32 on CPU and on GPU agree).
        """
        settings = [
            f"dtype={self.effective_dtype}",
            f"beams={self.num_beams}",
            f"max_new={self.max_new_tokens}",
            f"min_new={self.min_new_tokens}",
        ]
        if self.no_repeat_ngram_size:
            settings.append(f"no_repeat_ngram={self.no_repeat_ngram_size}")
        if self.image_size:
            settings.append(f"size={self.image_size}")
        if self.prompt:
            settings.append(f"prompt={self.prompt!r}")
        for key in sorted(self.extra):
            settings.append(f"{key}={self.extra[key]!r}")
        name = f"{self.label or self.model}[{','.join(settings)}]"
        return f"noisy({self.noise.spec})+{name}" if self.noise is not None else name


def captioner_id(config: CaptionerConfig) -> str:
    """The identity of the captions ``config`` makes (model, dtype, image size, generation settings).

    Equal ids mean comparable captions; the caption job pins it in its output manifest.
    """
    return config.name


# ---------------------------------------------------------------------------------------------
# Presets: published generation settings of the captioners we know.

#: BLIP CapFilt-L as used to caption web data: 384 px, beam 3, 5..20 tokens, "a picture of ".
BLIP_LARGE = CaptionerConfig(
    backend="hf",
    model="Salesforce/blip-image-captioning-large",
    image_size=384,
    num_beams=3,
    min_new_tokens=5,
    max_new_tokens=20,
    prompt="a picture of ",
)

#: The paper's OFA settings (ALIP supplement): prompt, beam 5, 16 tokens, no 3-gram repeats, 480 px.
OFA_DEFAULTS = dict(
    num_beams=5,
    max_new_tokens=16,
    min_new_tokens=1,
    no_repeat_ngram_size=3,
    image_size=480,
    prompt=" what does the image describe?",
)


def builtin_config() -> CaptionerConfig:
    """The shipped tiny BLIP trained on the built-in world (see scripts/train_builtin_captioner.py).

    Its name carries a short hash of the weights, so captions made by a retrained model are
    distinguishable in the ``captioner`` column.
    """
    weights = BUILTIN_MODEL_DIR / "model.safetensors"
    if not weights.exists():
        raise CaptionerError(
            f"the built-in captioner is missing ({weights} not found); regenerate it with "
            "`.venv/bin/python scripts/train_builtin_captioner.py` or reinstall the package"
        )
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:8]
    return CaptionerConfig(
        backend="hf", model=str(BUILTIN_MODEL_DIR), label=f"builtin@{digest}", num_beams=3, max_new_tokens=24
    )


PRESETS = {"builtin": builtin_config, "blip-large": lambda: BLIP_LARGE}


def parse_spec(spec: str) -> CaptionerConfig:
    """Turn a spec string into a config.

    Specs: ``builtin``, ``blip-large``, ``hf:<hub-id | local dir | s3://dir>``, ``ofa:<dir | s3://dir>``,
    and ``noisy:<settings>:<any of those>`` (alip.captioners.noisy: generic and wrong on purpose).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CaptionerError(f"captioner spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("noisy:"):
        from alip.captioners.noisy import parse_noisy_spec

        noise, inner = parse_noisy_spec(spec)
        config = parse_spec(inner)
        if config.noise is not None:
            raise CaptionerError(f"captioner spec {spec!r}: a noisy captioner cannot wrap another noisy one")
        return dataclasses.replace(config, noise=noise)
    if spec in PRESETS:
        return PRESETS[spec]()
    backend, sep, target = spec.partition(":")
    if sep and backend in ("hf", "ofa"):
        if not target.strip():
            raise CaptionerError(f"captioner spec {spec!r} names no model; use '{backend}:<hub id or directory>'")
        if backend == "hf":
            return CaptionerConfig(backend="hf", model=target.strip())
        return CaptionerConfig(backend="ofa", model=target.strip(), **OFA_DEFAULTS)
    raise CaptionerError(
        f"unknown captioner spec {spec!r}. Use one of: 'builtin', 'blip-large', "
        "'hf:<hub id | local dir | s3://dir>', 'ofa:<dir | s3://dir>', 'noisy:error=<0..1>,generic=<0..1>:<spec>'"
    )


# ---------------------------------------------------------------------------------------------
# Output cleaning shared by the backends.

_WS = re.compile(r"\s+")


def clean_caption(text: str, prompt: str | None = None) -> str:
    """Strip, collapse whitespace and drop a leading copy of the prompt (case-insensitive).

    Decoder-only captioners (BLIP's text decoder, GIT) return the prompt tokens followed by
    the continuation; tokenizers may change case and spacing, so compare normalised forms.
    """
    text = _WS.sub(" ", text).strip()
    if prompt:
        p = _WS.sub(" ", prompt).strip()
        if p and text.lower().startswith(p.lower()):
            text = text[len(p):].strip()
    return text
