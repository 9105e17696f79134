"""Request/response models of the HTTP API (they are the OpenAPI schema, with examples)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: a 2x2 red PNG: small enough to paste into the OpenAPI "try it out" box
EXAMPLE_PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJRU5ErkJggg=="

_IMAGES = Field(description="Images as base64 strings (standard or URL-safe; a data: URL prefix is accepted). "
                            "multipart/form-data uploads go in repeated 'images' file fields instead.",
                examples=[[EXAMPLE_PNG_B64]])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, not silently ignored


class ImageEmbeddingRequest(_Strict):
    images: list[str] = _IMAGES


class TextEmbeddingRequest(_Strict):
    texts: list[str] = Field(description="Texts to embed; each must fit the model's context length.",
                             examples=[["a photo of a red square", "a dog on a beach"]])


class SimilarityRequest(_Strict):
    images: list[str] = _IMAGES
    texts: list[str] = Field(examples=[["a red square", "a blue circle"]])


class ClassifyRequest(_Strict):
    images: list[str] = _IMAGES
    labels: list[str] = Field(description="Candidate class names, distinct.", examples=[["red", "green", "blue"]])
    prompts: str | list[str] = Field(
        default="imagenet",
        description="A named prompt set from the paper's Table 4 (see GET /v1/models: prompt_sets), "
                    "one template, or a list of templates; each template contains '{label}'.",
        examples=["imagenet", ["a photo of a {label}.", "a drawing of a {label}."]])
    top_k: int | None = Field(default=None, ge=1, description="Return only the k best labels per image.")


class EmbeddingResponse(BaseModel):
    model: str
    dim: int
    embeddings: list[list[float]] = Field(description="One L2-normalised vector per input, in input order.")


class SimilarityResponse(BaseModel):
    model: str
    logit_scale: float = Field(description="The model's temperature exp(logit_scale) used for softmax.")
    cosine: list[list[float]] = Field(description="[n_images][n_texts] cosine similarities.")
    probabilities: list[list[float]] = Field(
        description="[n_images][n_texts] softmax over the texts of logit_scale * cosine.")


class LabelScore(BaseModel):
    label: str
    probability: float
    cosine: float


class ClassifyResult(BaseModel):
    ranking: list[LabelScore] = Field(description="Labels by descending probability.")


class ClassifyResponse(BaseModel):
    model: str
    prompts: str = Field(description="Name of the prompt set used, or 'custom'.")
    n_templates: int
    results: list[ClassifyResult] = Field(description="One result per image, in input order.")


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(examples=["text_too_long"])
    message: str
    type: str = Field(description="OpenAI-style error class: invalid_request_error, authentication_error, ...",
                      examples=["invalid_request_error"])


# ---------------------------------------------------------------- OpenAI-compatible /v1/embeddings
class ImageURL(BaseModel):
    url: str = Field(description="A data: URL (data:image/png;base64,...). The service does not fetch http(s) URLs.")


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    role: str = Field(examples=["user"])
    content: str | list[ContentPart]


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; `messages` is vLLM's multimodal form (one embedding per request)."""
    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | None = Field(
        default=None,
        description="A string or a list of strings. A string that is a data:image/...;base64, URL is embedded "
                    "as an image, any other string as text. Token-id arrays are not supported.",
        examples=[["a photo of a red square", "data:image/png;base64," + EXAMPLE_PNG_B64]])
    messages: list[ChatMessage] | None = Field(
        default=None,
        description="vLLM's chat form for CLIP-style models: one user message whose content is one "
                    "image_url part or one text part; gives one embedding. Use either input or messages.")
    model: str | None = Field(default=None, description="The served model's id (GET /v1/models); optional.")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: each vector as little-endian float32 bytes, base64-encoded (as OpenAI).")
    dimensions: int | None = Field(
        default=None, ge=1,
        description="Only the model's own embedding size is accepted: CLIP-style embeddings are not trained "
                    "to be truncated, so a shorter vector would silently lose accuracy.")
    user: str | None = Field(default=None, description="Accepted for compatibility; ignored.")


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="L2-normalised vector, or its base64 float32 bytes.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the text inputs (start/end tokens included); images add none.")
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingUsage


class ErrorResponse(BaseModel):
    error: ErrorDetail
