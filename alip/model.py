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


logging.getLogger().addFilter(_RandomInitIsIntended())

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

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True, trim: bool = True) -> torch.Tensor:
        """open_clip's encode_text, computed only up to the longest EOT in the batch.

        Exact for open_clip's causal text tower with argmax (EOT) pooling: token k only attends to
        tokens <= k, and pooling reads the EOT position, so the padding after it is dead weight.
        Other towers (HF text models, non-causal) fall back to the untrimmed path.
        """
        clip = self.clip
        if not trim or getattr(clip, "text_pool_type", None) != "argmax" or getattr(clip, "attn_mask", None) is None:
            return clip.encode_text(tokens, normalize=normalize)
        length = int(tokens.argmax(dim=-1).max()) + 1
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
                caption_tokens: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """Normalised embeddings of a triplet batch. Raw text and caption go through the shared text
        encoder in ONE pass (batch 2N): one weight read and one kernel launch chain instead of two."""
        n = images.shape[0]
        for name, tok in (("raw_tokens", raw_tokens), ("caption_tokens", caption_tokens)):
            if tok is not None and tok.shape[0] != n:
                raise ValueError(f"{name} has {tok.shape[0]} rows but there are {n} images")
        image = self.encode_image(images)
        raw = caption = None
        if raw_tokens is not None and caption_tokens is not None:
            both = self.encode_text(torch.cat([raw_tokens, caption_tokens], dim=0))
            raw, caption = both[:n], both[n:]
        elif raw_tokens is not None:
            raw = self.encode_text(raw_tokens)
        elif caption_tokens is not None:
            caption = self.encode_text(caption_tokens)
        return {"image": image, "raw": raw, "caption": caption, "logit_scale": self.clip.logit_scale.exp()}


def create_model(model_name: str = "alip-tiny", device: str | torch.device = "cpu",
                 init_temperature: float = 0.07) -> ALIPModel:
    """A randomly initialised ALIP model of an open_clip architecture (no download)."""
    cfg = model_config(model_name)
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


def export_open_clip(model: ALIPModel, out_dir: str | os.PathLike) -> Path:
    """Write the model in open_clip's local-dir layout; `open_clip.create_model_and_transforms(
    "local-dir:" + out_dir)` and `alip.model.load_model(out_dir)` both load it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = model.image_size
    config = {
        "model_cfg": model.model_cfg,
        "preprocess_cfg": {"size": size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
        "alip": {"model_name": model.model_name},
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


def load_model(path_or_name: str | os.PathLike, device: str | torch.device = "cpu") -> ALIPModel:
    """Load an exported model dir (local or s3://) or create a random model from a config name."""
    ref = str(path_or_name)
    if ref.startswith("local-dir:"):
        ref = ref[len("local-dir:"):]
    if not ref.startswith("s3://") and not Path(ref).exists():
        if open_clip.get_model_config(ref) is not None:
            return create_model(ref, device=device)
        raise ModelLoadError(
            f"model {ref!r} is neither an existing export directory nor a known config name "
            f"(expected a folder with {EXPORT_CONFIG} + {EXPORT_WEIGHTS}, e.g. from `alip pretrain`)"
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


def load_weights_strict(model: ALIPModel, weights_path: str | os.PathLike) -> None:
    """Load safetensors weights, failing clearly if they belong to another architecture."""
    state = load_file(str(weights_path))
    missing, unexpected = model.clip.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {weights_path} do not fit {model.model_name}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
