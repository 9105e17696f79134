"""Turning client input into model input, with every client mistake mapped to a 4xx.

Each check raises `ClientError(status, code, message)`: the message says what was wrong, why, and
what to send instead. Nothing here imports Ray or FastAPI, so it is unit-testable on its own.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import string
import warnings
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageOps, UnidentifiedImageError


class ClientError(ValueError):
    """A request the client must fix; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


# ----------------------------------------------------------------------------------------- images
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


def decode_base64(data: str, index: int) -> bytes:
    """Standard or URL-safe base64, optionally as a `data:image/...;base64,` URL."""
    if not isinstance(data, str) or not data.strip():
        raise ClientError(422, "empty_image", f"images[{index}] is empty; send base64-encoded image bytes")
    s = _DATA_URL.sub("", data.strip(), count=1)
    s = "".join(s.split())  # line-wrapped base64 (e.g. `base64` CLI output) is common
    try:
        if "-" in s or "_" in s:
            return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ClientError(400, "bad_base64", f"images[{index}] is not valid base64: {e}") from e


def image_header_size(data: bytes, index: int) -> tuple[int, int]:
    """(width, height) from the image header alone (`Image.open` is lazy: no pixel is decoded)."""
    if not data:
        raise ClientError(422, "empty_image", f"images[{index}] is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ClientError(413, "image_too_large", f"images[{index}] is a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise ClientError(400, "bad_image", f"images[{index}] is not a decodable image (PNG, JPEG, WebP, ...)") from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as e:
        raise ClientError(400, "bad_image", f"images[{index}] could not be read: {e}") from e


def check_pixel_budget(sizes: Sequence[tuple[int, int]], max_image_pixels: int, max_request_pixels: int) -> None:
    """413 before decoding anything: one image over its limit, or all of them over the request's.

    The body limit alone does not bound memory: 32 small PNGs can each claim 24 Mpx, about 2.3 GB
    of decoded RGB. The per-request budget bounds the decode work a single request can cause.
    """
    total = 0
    for i, (w, h) in enumerate(sizes):
        if w * h > max_image_pixels:
            raise ClientError(
                413, "image_too_large",
                f"images[{i}] is {w}x{h} = {w * h} pixels, over the limit of {max_image_pixels}; "
                "downscale it before sending (the model sees only a small centre crop anyway)")
        total += w * h
    if total > max_request_pixels:
        raise ClientError(
            413, "too_many_pixels",
            f"the {len(sizes)} images of this request have {total} pixels in all, over the per-request "
            f"budget of {max_request_pixels}; downscale them or split the request")


def decode_image(data: bytes, index: int, max_pixels: int) -> Image.Image:
    """Bytes -> RGB PIL image, refusing decompression bombs before decoding any pixel.

    The size check reads only the header (`Image.open` is lazy), so a 50 kB PNG that claims
    100k x 100k pixels is refused without allocating 30 GB. Pillow's own bomb guard
    (DecompressionBombError, and the Warning once `strict_pillow_bomb_check()` made it an error)
    is turned into the same 413 as a second line of defence.
    """
    if not data:
        raise ClientError(422, "empty_image", f"images[{index}] is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ClientError(
                413, "image_too_large",
                f"images[{index}] is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}; "
                "downscale it before sending (the model sees only a small centre crop anyway)")
        img.seek(0)  # first frame of animations / multi-page files
        img.load()
        img = ImageOps.exif_transpose(img)  # phone photos: honour the orientation tag
        return img.convert("RGB")
    except ClientError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ClientError(413, "image_too_large", f"images[{index}] is a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise ClientError(400, "bad_image", f"images[{index}] is not a decodable image (PNG, JPEG, WebP, ...)") from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as e:
        # truncated files, corrupt chunks, unsupported modes: all the client's data
        raise ClientError(400, "bad_image", f"images[{index}] could not be decoded: {e}") from e


def strict_pillow_bomb_check() -> None:
    """Make Pillow's DecompressionBombWarning an error, process-wide.

    `warnings.catch_warnings()` per call is not thread-safe (images are decoded in a thread
    pool), so a service process sets the filter once at start-up instead of per image.
    """
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


# ------------------------------------------------------------------------------------------ texts
def check_count(kind: str, items: Sequence, limit: int) -> None:
    if len(items) == 0:
        raise ClientError(422, f"empty_{kind}", f"'{kind}' is empty; send at least one")
    if len(items) > limit:
        raise ClientError(422, f"too_many_{kind}",
                          f"{len(items)} {kind} in one request, over the limit of {limit}; split the request")


def token_lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """Tokens per text including start/end tokens, as the tokenizer would emit before truncation."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # open_clip SimpleTokenizer
        return [len(tokenizer.encode(t)) + 2 for t in texts]
    # other open_clip tokenizers (HF): tokenise with room to spare and count non-padding tokens
    ctx = int(getattr(tokenizer, "context_length", 77))
    tokens = tokenizer(list(texts), context_length=ctx * 4)
    return [int((row != 0).sum()) for row in tokens]


def check_texts(texts: Sequence[str], tokenizer, context_length: int, max_chars: int,
                field: str = "texts", origin: Sequence[str] | None = None) -> None:
    """Refuse empty and over-long texts instead of letting the tokenizer truncate them silently.

    A truncated text gets an embedding of a different sentence: for search and classification
    that is a wrong answer that looks right, so it is a 422 with the token count.
    `origin[i]` names where text i came from (e.g. the label a template was filled with).
    """
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ClientError(422, "empty_text", f"{field}[{i}] is empty or blank")
        if len(t) > max_chars:
            raise ClientError(422, "text_too_long",
                              f"{field}[{i}] has {len(t)} characters, over the limit of {max_chars}")
    for i, n in enumerate(token_lengths(tokenizer, texts)):
        if n > context_length:
            where = origin[i] if origin is not None else f"{field}[{i}]"
            raise ClientError(
                422, "text_too_long",
                f"{where} is {n} tokens (with start/end tokens), over the model's context length of "
                f"{context_length}; the service does not truncate silently: shorten the text")


@dataclass(frozen=True)
class Template:
    """A validated prompt template: its text, and the parts that size its filled-in prompts."""
    text: str
    literal_chars: int  # characters outside the {label} slots, '{{' and '}}' counted once
    slots: int          # how many times {label} appears

    def filled_chars(self, label: str) -> int:
        return self.literal_chars + self.slots * len(label)

    def fill(self, label: str) -> str:
        return self.text.format(label=label)  # safe: only bare {label} fields passed validation


def parse_template(text: str, index: int) -> Template:
    """Accept only the bare `{label}` placeholder: no format spec (`{label:>1000000000}` would build
    gigabytes), no conversion (`{label!r}`), no attribute or index access (`{label.__class__}`,
    `{label[0]}`), no other field names; `{{` and `}}` are literal braces."""
    where = f"templates[{index}] = {text[:80]!r}"
    if not isinstance(text, str):
        raise ClientError(422, "bad_prompts", f"templates[{index}] must be a string")
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as e:  # a lone '{' or '}'
        raise ClientError(422, "bad_prompts", f"{where} is not a valid template ({e}); write '{{{{' or '}}}}' "
                                              "for a literal brace") from e
    literal, slots = 0, 0
    for lit, field, spec, conversion in parts:
        literal += len(lit)
        if field is None:
            continue
        if field != "label" or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ClientError(422, "bad_prompts",
                              f"{where} contains {shown[:60]!r}: only the bare placeholder '{{label}}' is allowed "
                              "(no format specs, conversions, attribute or index access); write '{{' or '}}' "
                              "for a literal brace")
        slots += 1
    if slots == 0:
        raise ClientError(422, "bad_prompts", f"{where} does not contain '{{label}}'")
    return Template(text, literal, slots)


def resolve_prompts(prompts: str | Sequence[str], prompt_sets: dict[str, Sequence[str]],
                    max_templates: int) -> tuple[str, list[Template]]:
    """(name, templates): a named set (e.g. 'imagenet'), one template, or a list of templates."""
    if isinstance(prompts, str):
        if prompts in prompt_sets:  # the server's own sets: trusted, bounded by max_class_prompts
            return prompts, [parse_template(t, i) for i, t in enumerate(prompt_sets[prompts])]
        if "{" not in prompts:
            raise ClientError(422, "bad_prompts",
                              f"unknown prompt set {prompts[:80]!r}; use one of {sorted(prompt_sets)} "
                              "or a template containing '{label}'")
        else:
            prompts = [prompts]
    templates = list(prompts)
    check_count("templates", templates, max_templates)
    return "custom", [parse_template(t, i) for i, t in enumerate(templates)]


def check_prompt_budget(labels: Sequence[str], templates: Sequence[Template], max_prompts: int,
                        max_chars: int) -> None:
    """Bound the work of a class-cache miss before any prompt string is built: labels x templates
    prompts (one text forward each), each at most `max_chars` characters once filled in."""
    n = len(labels) * len(templates)
    if n > max_prompts:
        raise ClientError(422, "too_many_prompts",
                          f"{len(labels)} labels x {len(templates)} templates = {n} prompts, over the limit of "
                          f"{max_prompts}; send fewer labels or templates")
    longest = max(labels, key=len)
    for i, t in enumerate(templates):
        if t.filled_chars(longest) > max_chars:
            raise ClientError(422, "text_too_long",
                              f"templates[{i}] filled with label {longest[:40]!r} would be {t.filled_chars(longest)} "
                              f"characters, over the limit of {max_chars}")


def clean_labels(labels: Sequence[str], max_labels: int, max_chars: int = 200) -> list[str]:
    check_count("labels", labels, max_labels)
    out = []
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise ClientError(422, "empty_label", f"labels[{i}] is empty or blank")
        if len(label.strip()) > max_chars:
            raise ClientError(422, "label_too_long",
                              f"labels[{i}] has {len(label.strip())} characters, over the limit of {max_chars}")
        out.append(label.strip())
    if len(set(out)) != len(out):
        dupes = sorted({x for x in out if out.count(x) > 1})
        raise ClientError(422, "duplicate_labels", f"labels must be distinct; repeated: {dupes[:5]}")
    return out
