"""OpenAI-compatible `POST /v1/embeddings`: request -> typed items, vectors -> OpenAI's response.

Conventions (documented in docs/serving.md):
  * `input`: a string or a list of strings (OpenAI). A string that is a `data:image/<type>;base64,`
    URL is an image, any other string is text, so one list may mix both; results keep input order.
  * `messages`: vLLM's form for CLIP embeddings (`vllm serve openai/clip-vit-base-patch32 --runner
    pooling`): one user message whose content is ONE `image_url` part or ONE `text` part; one
    embedding per request. CLIP cannot fuse an image with a text, so more parts are refused.
  * Images must be `data:` URLs: the service never fetches http(s) URLs (no server-side request
    forgery, no unbounded downloads).
  * `encoding_format=base64`: little-endian float32 bytes of each vector, base64-encoded, as OpenAI.
  * `dimensions`: only the model's own size (no silent truncation of a non-Matryoshka embedding).
  * `model`: optional; if given it must be the served model's id (404 `model_not_found` otherwise).
Nothing here imports FastAPI or Ray.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from alip.serving.inputs import ClientError
from alip.serving.schemas import OpenAIEmbeddingRequest

_IMAGE_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class Item:
    kind: Literal["text", "image"]
    value: str  # the text, or the image's data: URL


def is_image_data_url(s: str) -> bool:
    return bool(_IMAGE_DATA_URL.match(s))


def request_items(req: OpenAIEmbeddingRequest, model_id: str, embed_dim: int) -> list[Item]:
    """The request's inputs in order, after the checks that need no model work."""
    if req.model is not None and req.model != model_id:
        raise ClientError(404, "model_not_found",
                          f"model {req.model[:100]!r} is not served here; this service serves {model_id!r}")
    if req.dimensions is not None and req.dimensions != embed_dim:
        raise ClientError(422, "unsupported_dimensions",
                          f"dimensions={req.dimensions} is not supported: {model_id} embeddings have {embed_dim} "
                          "dimensions and are not trained to be truncated; omit 'dimensions'")
    if (req.input is None) == (req.messages is None):
        raise ClientError(422, "invalid_request", "send exactly one of 'input' (strings) or 'messages' (vLLM's form)")
    if req.input is not None:
        values = [req.input] if isinstance(req.input, str) else list(req.input)
        if not values:
            raise ClientError(422, "empty_input", "'input' is an empty list; send at least one string")
        return [Item("image" if is_image_data_url(v) else "text", v) for v in values]
    return [_message_item(req)]


def _message_item(req: OpenAIEmbeddingRequest) -> Item:
    msgs = req.messages or []
    if len(msgs) != 1 or msgs[0].role != "user":
        raise ClientError(422, "bad_messages", "'messages' must hold exactly one message with role 'user' "
                                               "(a CLIP-style model embeds one image or one text)")
    content = msgs[0].content
    if isinstance(content, str):
        return Item("text", content)
    if len(content) != 1:
        raise ClientError(422, "bad_messages", f"the message has {len(content)} content parts; send exactly one "
                                               "image_url part or one text part (CLIP cannot fuse them)")
    part = content[0]
    if part.type == "text":
        if part.text is None:
            raise ClientError(422, "bad_messages", "a 'text' content part needs a 'text' field")
        return Item("text", part.text)
    if part.image_url is None:
        raise ClientError(422, "bad_messages", "an 'image_url' content part needs an 'image_url': {'url': ...} field")
    url = part.image_url.url
    if not is_image_data_url(url):
        raise ClientError(422, "unsupported_image_url",
                          "image_url.url must be a data:image/<type>;base64, URL: this service does not fetch URLs")
    return Item("image", url)


def encode_vector(vec: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
    return vec.tolist()


def response(embeddings: list[torch.Tensor], model_id: str, encoding_format: str, prompt_tokens: int) -> dict:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_vector(e, encoding_format)}
                 for i, e in enumerate(embeddings)],
        "model": model_id,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
