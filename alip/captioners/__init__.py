"""Captioners: turn batches of PIL images into captions for ALIP's synthetic-caption column.

Public API::

    from alip.captioners import load_captioner
    cap = load_captioner("builtin")                 # tiny BLIP trained on the built-in world
    cap = load_captioner("blip-large", device="cuda", dtype="fp16")   # BLIP CapFilt-L preset
    cap = load_captioner("hf:/models/my-blip")      # any transformers captioner (hub id / dir / s3://dir)
    cap = load_captioner("ofa:/models/ofa-large")   # OFA via ModelScope, in the isolated .ofa-venv
    cap = load_captioner("noisy:error=0.2,generic=0.5:builtin")  # generic and wrong on purpose (noisy.py)
    captions = cap.caption([img1, img2])            # -> list[str]; cap.name -> `captioner` column
    prep = load_preparer("builtin")                 # the CPU half only (processor, no weights)
    cap.generate_prepared(prep.prepare([img1]))     # == cap.caption([img1])

Specs and configs are small and picklable; weights load when the captioner is built
(inside the Ray actor in the caption job).
"""

from __future__ import annotations

from alip.captioners.base import (
    BLIP_LARGE,
    BUILTIN_MODEL_DIR,
    OFA_DEFAULTS,
    Captioner,
    CaptionerConfig,
    CaptionerError,
    Preparer,
    builtin_config,
    captioner_id,
    clean_caption,
    parse_spec,
)

__all__ = [
    "BLIP_LARGE",
    "BUILTIN_MODEL_DIR",
    "OFA_DEFAULTS",
    "Captioner",
    "CaptionerConfig",
    "CaptionerError",
    "Preparer",
    "builtin_config",
    "captioner_id",
    "clean_caption",
    "load_captioner",
    "load_preparer",
    "parse_spec",
]


def load_captioner(
    spec: str | CaptionerConfig, device: str | None = None, dtype: str | None = None, **generation_overrides
) -> Captioner:
    """Build a captioner from a spec string or a :class:`CaptionerConfig`.

    ``device``/``dtype`` and any ``generation_overrides`` (num_beams, max_new_tokens,
    min_new_tokens, no_repeat_ngram_size, prompt, image_size, batch_size, ...) replace the
    spec's values; ``device``/``dtype`` left as None keep the config's (default: cpu, fp32).
    Raises :class:`CaptionerError` for a bad spec or a missing model.
    """
    config = spec if isinstance(spec, CaptionerConfig) else parse_spec(spec)
    if device is not None:
        generation_overrides["device"] = device
    if dtype is not None:
        generation_overrides["dtype"] = dtype
    config = config.with_overrides(**generation_overrides)
    if config.noise is not None:
        from alip.captioners.noisy import NoisyCaptioner

        inner = load_captioner(config.with_overrides(noise=None))
        return NoisyCaptioner(inner, config.noise, config.name, config.batch_size)
    if config.backend == "hf":
        from alip.captioners.hf import HFCaptioner

        return HFCaptioner(config)
    from alip.captioners.ofa import OFACaptioner

    return OFACaptioner(config)


def load_preparer(spec: str | CaptionerConfig, **overrides) -> "Preparer":
    """The CPU half of a captioner (``prepare(images)``): loads the processor only, never the weights."""
    config = spec if isinstance(spec, CaptionerConfig) else parse_spec(spec)
    config = config.with_overrides(**overrides)
    if config.noise is not None:  # the edits happen after generation: preparing is the inner captioner's
        preparer = load_preparer(config.with_overrides(noise=None))
        preparer.name = config.name
        return preparer
    if config.backend == "hf":
        from alip.captioners.hf import HFPreparer

        return HFPreparer(config)
    from alip.captioners.ofa import OFAPreparer

    return OFAPreparer(config)
