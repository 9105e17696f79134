"""The ALIP model: open_clip's CLIP (one image encoder, ONE text encoder shared by raw text and
caption), plus the two things ALIP needs on top of it:

* trimmed text encoding: web alt-texts and captions are 8-25 tokens, but open_clip pads every text to
  77. Because the text transformer is causal and pools at the EOT token, positions after the longest
  EOT in the batch can never influence the result, so we cut them off: exact, and ~5x cheaper;
* export to open_clip's own on-disk layout (`open_clip_config.json` + `open_clip_model.safetensors`),
  so `open_clip.create_model_and_transforms("local-dir:<dir>")` loads an ALIP model unchanged.

Models are created by open_clip config name (`ViT-B-32`, `ViT-B-16`, ... and this package's tiny
configs `alip-tiny` / `alip-micro`, registered with open_clip on import), always randomly initialised:
ALIP is pretraining, and nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from safetensors.torch import load_file, save_file
from torchvision import transforms as T

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)


class _RandomInitIsIntended(logging.Filter):
    """open_clip warns on every random init; for pretraining that is the point, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning():
    """Silence open_clip's random-init warning for one create_model call only. open_clip logs it
    with the module-level `logging.warning` (the root logger itself, not a named one), so the
    filter sits on the root logger but only while our call runs: importing alip.model changes
    no logging anywhere."""
    flt = _RandomInitIsIntended()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)

EXPORT_CONFIG = "open_clip_config.json"
EXPORT_WEIGHTS = "open_clip_model.safetensors"


class ModelLoadError(ValueError):
    """A model path or name that cannot be loaded, with the reason."""


def model_config(model_name: str) -> dict:
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ModelLoadError(
            f"unknown model config {model_name!r}; known ALIP configs: alip-tiny, alip-micro; "
            f"or any open_clip config such as ViT-B-32, ViT-B-16 (open_clip.list_models())"
        )
    return cfg


class ALIPModel(torch.nn.Module):
    """Thin wrapper around an open_clip CLIP that encodes (image, raw text, caption) triplets."""

    def __init__(self, clip: open_clip.CLIP, model_name: str, model_cfg: dict):
        super().__init__()
        self.clip = clip
        self.model_name = model_name
        self.model_cfg = model_cfg

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.model_cfg["vision_cfg"]["image_size"]
        return int(size if isinstance(size, int) else size[0])

    @property
    def context_length(self) -> int:
        return int(self.model_cfg.get("text_cfg", {}).get("context_length", 77))

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        return self.clip.logit_scale

    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [N, 3, H, W] (0-255) -> float, normalised with the model's mean/std, on the
        images' device; float images are taken as already normalised and returned unchanged.

        Shipping uint8 and normalising here moves 4x fewer bytes from the data workers and does the
        arithmetic on the accelerator instead of the CPU."""
        if images.dtype != torch.uint8:
            return images
        mean, std = self._mean_std(images.device)
        return (images.float() / 255.0 - mean) / std

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.__dict__.setdefault("_mean_std_cache", {})  # plain attribute: not a buffer/state
        if device not in cache:
            cfg = open_clip.get_model_preprocess_cfg(self.clip) or {}
            mean = cfg.get("mean") or OPENAI_MEAN
            std = cfg.get("std") or OPENAI_STD
            cache[device] = (torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
                             torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        return cache[device]

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_image(self.normalize_images(images), normalize=normalize)

    @property
    def trims_text(self) -> bool:
        """Whether encode_text can cut the padding (open_clip's causal tower with EOT pooling)."""
        clip = self.clip
        return getattr(clip, "text_pool_type", None) == "argmax" and getattr(clip, "attn_mask", None) is not None

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True, trim: bool = True,
                    length: int | None = None) -> torch.Tensor:
        """open_clip's encode_text, computed only up to the longest EOT in the batch.

        Exact for open_clip's causal text tower with argmax (EOT) pooling: token k only attends to
        tokens <= k, and pooling reads the EOT position, so the padding after it is dead weight.
        Other towers (HF text models, non-causal) fall back to the untrimmed path.

        `length`: the trim length if the caller already knows it (`eot_length` of the tokens while
        they were still on the CPU); computing it here from device tokens costs a host sync.
        Any length >= the longest EOT + 1 gives the same result.
        """
        clip = self.clip
        if not trim or not self.trims_text:
            return clip.encode_text(tokens, normalize=normalize)
        if length is None:
            length = eot_length(tokens)
        length = min(int(length), tokens.shape[1])
        tokens = tokens[:, :length]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast_dtype)
        x = x + clip.positional_embedding[:length].to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = text_global_pool(x, tokens, clip.text_pool_type)
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, torch.nn.Linear) else x @ clip.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, raw_tokens: torch.Tensor | None,
                caption_tokens: torch.Tensor | None, raw_length: int | None = None,
                caption_length: int | None = None, text_passes: str = "auto") -> dict[str, torch.Tensor | None]:
        """Normalised embeddings of a triplet batch (images uint8 or already-normalised float).

        Raw text and caption share the text encoder. `text_passes` says how they are run:
        "joint" = one pass of 2N texts trimmed to the longer of the two lengths (one weight read
        and kernel chain), "split" = two passes each trimmed to its own length (fewer tokens when
        a long alt-text would pad every short caption), "auto" = `plan_text_passes` decides from
        the lengths. Pass the lengths (`eot_length` on the CPU tokens) to avoid a host sync."""
        n = images.shape[0]
        for name, tok in (("raw_tokens", raw_tokens), ("caption_tokens", caption_tokens)):
            if tok is not None and tok.shape[0] != n:
                raise ValueError(f"{name} has {tok.shape[0]} rows but there are {n} images")
        if text_passes not in TEXT_PASSES:
            raise ValueError(f"text_passes must be one of {TEXT_PASSES}, got {text_passes!r}")
        image = self.encode_image(images)
        raw = caption = None
        if raw_tokens is not None and caption_tokens is not None:
            if self.trims_text:
                raw_length = eot_length(raw_tokens) if raw_length is None else raw_length
                caption_length = eot_length(caption_tokens) if caption_length is None else caption_length
            if text_passes == "auto":
                text_passes = plan_text_passes(raw_length, caption_length) if self.trims_text else "joint"
            if text_passes == "split":
                raw = self.encode_text(raw_tokens, length=raw_length)
                caption = self.encode_text(caption_tokens, length=caption_length)
            else:
                length = max(raw_length, caption_length) if self.trims_text else None
                both = self.encode_text(torch.cat([raw_tokens, caption_tokens], dim=0), length=length)
                raw, caption = both[:n], both[n:]
        elif raw_tokens is not None:
            raw = self.encode_text(raw_tokens, length=raw_length)
        elif caption_tokens is not None:
            caption = self.encode_text(caption_tokens, length=caption_length)
        return {"image": image, "raw": raw, "caption": caption, "logit_scale": self.clip.logit_scale.exp()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """open_clip's activation checkpointing of both towers' transformer blocks."""
        self.clip.set_grad_checkpointing(enable)

    def compile_towers(self, **kwargs) -> None:
        """torch.compile the two towers in place (`nn.Module.compile`: parameter names and the
        state dict stay the same, so checkpoints and exports are unaffected)."""
        kwargs.setdefault("backend", COMPILE_BACKEND)
        self.clip.visual.compile(**kwargs)
        self.clip.transformer.compile(**kwargs)


TEXT_PASSES = ("auto", "joint", "split")

# torch.compile's backend for `compile_towers`. Inductor generates fused kernels (Triton on GPU,
# C++ via the machine's compiler on CPU); tests swap in "aot_eager" (same tracing and autograd
# capture, no code generation) because inductor needs minutes per graph on a 2-core CPU.
COMPILE_BACKEND = "inductor"

# Split raw text and captions into two trimmed passes when one joint pass would push at least this
# factor more tokens through the text tower: 2 * max(Lr, Lc) / (Lr + Lc) >= SPLIT_MIN_TOKEN_RATIO.
# Below it, the second pass's fixed costs (a second weight read, kernel launches) eat the saving.
# A chosen threshold, not yet a measured one: bench/bench_train_step.py prints what a second pass
# costs at equal lengths ("short: split / joint") and what splitting saves on long alt-texts.
SPLIT_MIN_TOKEN_RATIO = 1.2


def eot_length(tokens: torch.Tensor, multiple: int = 1) -> int:
    """Trim length of a token batch: the longest EOT position + 1 (open_clip's EOT token has the
    largest id, hence argmax), rounded up to `multiple`, at most the context length.
    Call it on CPU tokens: on device tokens it is a host sync."""
    if tokens.shape[0] == 0:
        return 1
    length = int(tokens.argmax(dim=-1).max()) + 1
    if multiple > 1:
        length = -(-length // multiple) * multiple
    return min(length, tokens.shape[1])


def plan_text_passes(raw_length: int, caption_length: int) -> str:
    """'split' when a joint pass would waste enough padded tokens (see SPLIT_MIN_TOKEN_RATIO)."""
    joint_tokens = 2 * max(raw_length, caption_length)
    return "split" if joint_tokens >= SPLIT_MIN_TOKEN_RATIO * (raw_length + caption_length) else "joint"


def create_model(model_name: str = "alip-tiny", device: str | torch.device = "cpu",
                 init_temperature: float = 0.07) -> ALIPModel:
    """A randomly initialised ALIP model of an open_clip architecture (no download)."""
    cfg = model_config(model_name)
    with _quiet_random_init_warning():
        clip = open_clip.create_model(model_name, pretrained=None, device=device)
    with torch.no_grad():
        clip.logit_scale.fill_(torch.log(torch.tensor(1.0 / init_temperature)).item())
    return ALIPModel(clip, model_name, cfg)


def get_tokenizer(model: ALIPModel | str):
    """open_clip's tokenizer, unchanged (context length from the model config)."""
    if isinstance(model, ALIPModel):
        return open_clip.get_tokenizer(model.model_name, context_length=model.context_length) \
            if open_clip.get_model_config(model.model_name) is not None \
            else open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    return open_clip.get_tokenizer(model)


OPENAI_MEAN = open_clip.OPENAI_DATASET_MEAN
OPENAI_STD = open_clip.OPENAI_DATASET_STD


def image_transform(model: ALIPModel | str | int, train: bool):
    """PIL -> normalised tensor. Eval: open_clip's own resize + centre crop. Train: the official
    ALIP augmentation (random resized crop area 0.7-1.0, aspect 0.8-1.25, horizontal flip, CLIP
    mean/std). open_clip's non-timm train transform ignores `ratio` and has no flip, hence our own."""
    if isinstance(model, ALIPModel):
        size = model.image_size
    elif isinstance(model, int):
        size = model
    else:
        size = model_config(model)["vision_cfg"]["image_size"]
    if not train:
        return open_clip.image_transform(size, is_train=False)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.8, 1.25),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


def export_open_clip(model: ALIPModel, out_dir: str | os.PathLike, gates: dict | None = None) -> Path:
    """Write the model in open_clip's local-dir layout; `open_clip.create_model_and_transforms(
    "local-dir:" + out_dir)` and `alip.model.load_model(out_dir)` both load it.

    `gates`: the run's final gate settings, stored under the config's "alip" section (open_clip
    ignores that section) so that `alip explore` scores samples with the momentum means the model
    ended training with: {"state": GateState.to_dict(), "sharpness": ..., "momentum": ...,
    "objective": ..., "step": ...}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = model.image_size
    config = {
        "model_cfg": model.model_cfg,
        "preprocess_cfg": {"size": size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
        "alip": {"model_name": model.model_name, **({"gates": dict(gates)} if gates else {})},
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    # Write to temporary names and rename: a reader never sees a half-written export.
    tmp_weights = out / (EXPORT_WEIGHTS + ".tmp")
    save_file(state, str(tmp_weights))
    tmp_config = out / (EXPORT_CONFIG + ".tmp")
    tmp_config.write_text(json.dumps(config, indent=2))
    os.replace(tmp_weights, out / EXPORT_WEIGHTS)
    os.replace(tmp_config, out / EXPORT_CONFIG)
    return out


def _localise(uri: str) -> Path:
    """An s3:// directory is copied to a local cache dir (open_clip reads local files only)."""
    if not uri.startswith("s3://"):
        return Path(uri)
    import pyarrow.fs as pafs

    from alip.data.storage import resolve  # the data layer owns S3 settings (endpoint, credentials)

    loc = resolve(uri, must_exist=True)
    fs, path = loc.fs, loc.path
    cache = Path(os.environ.get("ALIP_CACHE", Path(tempfile.gettempdir()) / "alip-cache"))
    local = cache / "models" / uri[len("s3://"):].strip("/").replace("/", "__")
    tmp = Path(tempfile.mkdtemp(dir=cache.mkdir(parents=True, exist_ok=True) or cache))
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"could not download model from {uri}: {e}") from e
    shutil.rmtree(local, ignore_errors=True)
    os.replace(tmp, local)
    return local


RANDOM_PREFIX = "random:"


def load_model(path_or_name: str | os.PathLike, device: str | torch.device = "cpu", *,
               random_init: bool = False) -> ALIPModel:
    """Load an exported model dir (local or s3://, optionally ``local-dir:``-prefixed).

    A randomly initialised model only when asked for: ``random:<config>`` (e.g.
    ``random:alip-tiny``, a baseline or smoke test) or ``random_init=True`` with a config name.
    A missing path is always an error, even when it happens to match a config name."""
    ref = str(path_or_name)
    if ref.startswith(RANDOM_PREFIX) or random_init:
        name = ref[len(RANDOM_PREFIX):] if ref.startswith(RANDOM_PREFIX) else ref
        if open_clip.get_model_config(name) is None:
            raise ModelLoadError(f"random init asked for {name!r}, which is not a known model config "
                                 f"(e.g. alip-tiny, alip-micro, ViT-B-32, ViT-B-16)")
        return create_model(name, device=device)
    if ref.startswith("local-dir:"):
        ref = ref[len("local-dir:"):]
    if not ref.startswith("s3://") and not Path(ref).exists():
        hint = (f"; {ref!r} is a model config name: for a randomly initialised model pass "
                f"{RANDOM_PREFIX}{ref}" if open_clip.get_model_config(ref) is not None else "")
        raise ModelLoadError(
            f"model {ref!r} does not exist (expected an export folder with {EXPORT_CONFIG} + "
            f"{EXPORT_WEIGHTS}, e.g. from `alip pretrain`, local or s3://){hint}"
        )
    local = _localise(ref)
    cfg_path = local / EXPORT_CONFIG
    if not cfg_path.is_file():
        raise ModelLoadError(f"{ref} has no {EXPORT_CONFIG}: not an open_clip/ALIP export directory")
    config = json.loads(cfg_path.read_text())
    try:
        clip = open_clip.create_model("local-dir:" + str(local), device=device)
    except Exception as e:  # open_clip raises RuntimeError on missing/unexpected keys
        raise ModelLoadError(f"could not load {ref}: {e}") from e
    name = config.get("alip", {}).get("model_name", "local-dir:" + str(local))
    return ALIPModel(clip, name, config["model_cfg"])


def export_metadata(path: str | os.PathLike) -> dict:
    """The "alip" section of an export's config (model_name, and "gates" when the run stored them)."""
    ref = str(path)
    if ref.startswith("local-dir:"):
        ref = ref[len("local-dir:"):]
    if not ref.startswith("s3://") and not Path(ref).exists():
        raise ModelLoadError(f"model {ref!r} does not exist (expected an export folder with {EXPORT_CONFIG})")
    cfg_path = _localise(ref) / EXPORT_CONFIG
    if not cfg_path.is_file():
        raise ModelLoadError(f"{ref} has no {EXPORT_CONFIG}: not an open_clip/ALIP export directory")
    return dict(json.loads(cfg_path.read_text()).get("alip") or {})


def load_weights_strict(model: ALIPModel, weights_path: str | os.PathLike) -> None:
    """Load safetensors weights, failing clearly if they belong to another architecture."""
    state = load_file(str(weights_path))
    missing, unexpected = model.clip.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {weights_path} do not fit {model.model_name}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
