"""The FastAPI application: routes, body parsing, error mapping. Ray-free.

`create_app(backend, config, page_html)` is used unchanged by the Ray Serve deployment
(alip.serving.deployment, whose backend batches across requests) and by the unit tests (LocalBackend).

Error mapping (every client mistake is a JSON 4xx `{"error": {status, code, message, type}}`):
  400 malformed JSON / base64 / undecodable image, Ray's proxy-control headers (middleware.py)
  401 missing or wrong bearer token
  404 unknown path, or a /v1/embeddings `model` that is not the served one
  413 body over max_body_bytes (declared or chunked), image over max_image_pixels / Pillow bomb,
      all images of a request over max_request_pixels (checked from the headers, before decoding)
  415 a content type other than JSON (or multipart where images are accepted)
  422 schema errors, empty lists, too many items, empty or over-long texts (never truncated),
      bad prompt templates (only a bare {label}), labels x templates over max_class_prompts,
      duplicate labels
Under Ray Serve the proxy adds (plain text, before the app sees the request): 503 with
`Retry-After` when the deployment's queue (max_queued_requests) is full, 408 when a request runs
past http_options.request_timeout_s. The OpenAPI lists them all, and the bearer scheme.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from alip.eval.zeroshot import PROMPT_SETS
from alip.serving import openai_compat
from alip.serving.cache import AsyncLRUCache
from alip.serving.classes import class_features
from alip.serving.config import ServeConfig
from alip.serving.encoder import Backend
from alip.serving.inputs import (ClientError, Template, check_count, check_pixel_budget, check_prompt_budget,
                                 check_texts, clean_labels, decode_base64, decode_image, image_header_size,
                                 resolve_prompts, token_lengths)
from alip.serving.middleware import (BearerTokenMiddleware, BodySizeLimitMiddleware, ProxyControlHeaderGuard,
                                     error_body)
from alip.serving.schemas import (ClassifyRequest, ClassifyResponse, EmbeddingResponse, ErrorResponse,
                                  ImageEmbeddingRequest, OpenAIEmbeddingRequest, OpenAIEmbeddingResponse,
                                  SimilarityRequest, SimilarityResponse, TextEmbeddingRequest)

log = logging.getLogger(__name__)

#: reachable without a token: liveness probes, the pages (they ask for the token), the docs
OPEN_PATHS = ("/", "/explore", "/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico")

_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 413, 415, 422)}

#: statuses Ray Serve's proxy answers itself (plain text), documented on every operation
_PROXY_ERRORS = {
    "408": {"description": "Request timeout: the request ran past Serve's http_options.request_timeout_s "
                           "(plain text from Ray Serve's proxy); the work is cancelled.",
            "content": {"text/plain": {"schema": {"type": "string"}}}},
    "503": {"description": "Overloaded: the deployment's queue (max_queued_requests) is full, answered at once "
                           "by Ray Serve's proxy (plain text); retry after the Retry-After header's seconds.",
            "headers": {"Retry-After": {"description": "Seconds to wait before retrying.",
                                        "schema": {"type": "integer"}}},
            "content": {"text/plain": {"schema": {"type": "string"}}}},
}
_BEARER = {"type": "http", "scheme": "bearer",
           "description": "Required on /v1/* when the service runs with ALIP_SERVE_TOKEN set: "
                          "'Authorization: Bearer <token>'. /healthz, /, /docs and /openapi.json stay open."}


#: nested models of the request bodies below, hoisted into the OpenAPI's components/schemas
_BODY_DEFS: dict[str, Any] = {}


def _install_openapi(app: FastAPI, open_paths: tuple[str, ...], auth_required: bool) -> None:
    """OpenAPI with the bearer scheme on every protected operation and every status it can get."""
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearerAuth"] = _BEARER
        for name, definition in _BODY_DEFS.items():
            components.setdefault("schemas", {}).setdefault(name, definition)
        for path, ops in schema["paths"].items():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                for status, doc in _PROXY_ERRORS.items():
                    responses.setdefault(status, doc)
                if path in open_paths:
                    continue
                # with no token configured the scheme is optional ({} = no auth)
                op["security"] = [{"bearerAuth": []}] if auth_required else [{"bearerAuth": []}, {}]
                responses.setdefault("401", {"description": "Missing or wrong bearer token",
                                             "content": {"application/json": {"schema": {
                                                 "$ref": "#/components/schemas/ErrorResponse"}}}})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _body_doc(model: type[BaseModel], multipart: dict[str, Any] | None) -> dict:
    """OpenAPI requestBody for endpoints that read the body themselves (JSON or multipart)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _BODY_DEFS.update(schema.pop("$defs", {}))  # a "#/$defs/..." ref would not resolve in the OpenAPI
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if multipart:
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": multipart,
                                                     "required": ["images"]}}
    return {"requestBody": {"required": True, "content": content}}


_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
_STRS = {"type": "array", "items": {"type": "string"}}


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _validation_message(e: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts[:5]) + (f" (+{len(parts) - 5} more)" if len(parts) > 5 else "")


async def _read_request(request: Request, model: type[BaseModel], config: ServeConfig,
                        multipart: bool) -> tuple[BaseModel, list[bytes | str]]:
    """Parse a JSON or multipart body into `model`; returns it and the raw images (b64 or bytes)."""
    media = _media_type(request)
    if media == "application/json" or media.endswith("+json"):
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ClientError(400, "bad_json", f"request body is not valid JSON: {e}") from e
        if not isinstance(payload, dict):
            raise ClientError(422, "bad_json", "request body must be a JSON object")
        try:
            parsed = model.model_validate(payload)
        except ValidationError as e:
            raise ClientError(422, "invalid_request", _validation_message(e)) from e
        return parsed, list(getattr(parsed, "images", []))
    if multipart and media == "multipart/form-data":
        try:
            form = await request.form(max_files=config.max_images, max_fields=config.max_texts + config.max_labels
                                      + config.max_templates + 8)
        except StarletteHTTPException as e:  # starlette's multipart errors: too many files, bad boundary
            raise ClientError(422 if "Too many" in str(e.detail) else 400, "bad_multipart",
                              f"could not parse the multipart body: {e.detail}") from e
        fields: dict[str, Any] = {}
        images: list[bytes | str] = []
        for key in dict.fromkeys(form.keys()):
            values = form.getlist(key)
            if key == "images":
                for v in values:
                    images.append(await v.read() if isinstance(v, UploadFile) else v)
                continue
            if any(isinstance(v, UploadFile) for v in values):
                raise ClientError(422, "invalid_request", f"field {key!r} must be text, not a file upload")
            fields[key] = values
        list_fields = {"texts", "labels"}
        data = {k: (v if k in list_fields else v[0] if len(v) == 1 else v) for k, v in fields.items()}
        try:
            parsed = model.model_validate({**data, "images": []})
        except ValidationError as e:
            raise ClientError(422, "invalid_request", _validation_message(e)) from e
        return parsed, images
    accepted = "application/json" + (" or multipart/form-data" if multipart else "")
    raise ClientError(415, "unsupported_media_type",
                      f"content type {media or '(none)'!r} is not supported here; send {accepted}")


def create_app(backend: Backend, config: ServeConfig | None = None, page_html: str | None = None) -> FastAPI:
    config = config or ServeConfig()
    enc = backend.encoder
    info = enc.info()
    cache: AsyncLRUCache[torch.Tensor] = AsyncLRUCache(config.class_cache_size)
    app = FastAPI(
        title="ALIP embedding service",
        version="1.0",
        description="Image and text embeddings, image-text similarity and zero-shot classification "
                    f"with an ALIP / open_clip model ({info['id']}). Errors: JSON 4xx "
                    "{'error': {status, code, message, type}}; Ray Serve's proxy answers 503 (overload, "
                    "with Retry-After) and 408 (request timeout) in plain text.",
    )
    app.state.class_cache = cache
    class_work = {"batches": 0, "prompts": 0}  # prompt batches encoded for class-cache misses

    # middleware: the last added runs first, so auth is checked before any body is read
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(BearerTokenMiddleware, token=config.resolved_token(), open_paths=OPEN_PATHS)
    app.add_middleware(ProxyControlHeaderGuard)

    @app.exception_handler(ClientError)
    async def _client_error(_: Request, e: ClientError) -> JSONResponse:
        return JSONResponse(error_body(e.status, e.code, e.message), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(422, "invalid_request", _validation_message(e)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse(error_body(e.status_code, code, str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    # ------------------------------------------------------------------------------ helpers
    def _pixels(raw: list[bytes | str]) -> list[torch.Tensor]:
        blobs = [decode_base64(item, i) if isinstance(item, str) else item for i, item in enumerate(raw)]
        # every header first: the request's pixel budget is checked before any image is decoded
        sizes = [image_header_size(b, i) for i, b in enumerate(blobs)]
        check_pixel_budget(sizes, config.max_image_pixels, config.max_request_pixels)
        return [enc.transform(decode_image(b, i, config.max_image_pixels)) for i, b in enumerate(blobs)]

    async def _images(raw: list[bytes | str]) -> torch.Tensor:
        check_count("images", raw, config.max_images)
        pixels = await run_in_threadpool(_pixels, raw)  # decoding is CPU work: off the event loop
        return await backend.embed_images(pixels)

    def _tokens(texts: list[str], field: str = "texts", origin: list[str] | None = None) -> list[torch.Tensor]:
        check_texts(texts, enc.tokenizer, enc.context_length, config.max_text_chars, field, origin)
        return list(enc.tokenize(texts))

    async def _texts(texts: list[str]) -> torch.Tensor:
        check_count("texts", texts, config.max_texts)
        tokens = await run_in_threadpool(_tokens, texts)
        return await backend.embed_texts(tokens)

    # ------------------------------------------------------------------------------- routes
    @app.get("/healthz", summary="This replica answers; with its last readiness probe (a real tiny forward)")
    async def healthz() -> dict:
        # Cheap on purpose (no forward here): liveness is Serve's proxy route /-/healthz, which never
        # queues behind model work; readiness is Serve's check_health (a real forward, every 10 s).
        probe = backend.last_probe() if hasattr(backend, "last_probe") else None
        return {"status": "ok", "model": info["id"], "probe": probe}

    @app.get("/v1/models", summary="The served model: name, config, embedding size, prompt sets, limits")
    async def models() -> dict:
        limits = {k: v for k, v in config.to_dict().items() if k.startswith("max_")}
        return {
            "object": "list",
            "data": [info],
            "prompt_sets": {name: len(t) for name, t in sorted(PROMPT_SETS.items())},
            "limits": limits,
            "class_cache": {**cache.stats(), "prompt_batches": class_work["batches"],
                            "prompts_encoded": class_work["prompts"]},
            # forwards run and items they carried, if the backend batches across requests
            "batching": backend.stats() if hasattr(backend, "stats") else None,
        }

    @app.post("/v1/embeddings/image", response_model=EmbeddingResponse, responses=_ERRORS,
              summary="Embed images (JSON base64 or multipart files)",
              openapi_extra=_body_doc(ImageEmbeddingRequest, {"images": _FILES}))
    async def embed_images(request: Request) -> dict:
        _, raw = await _read_request(request, ImageEmbeddingRequest, config, multipart=True)
        emb = await _images(raw)
        return {"model": info["id"], "dim": int(emb.shape[1]), "embeddings": emb.tolist()}

    @app.post("/v1/embeddings/text", response_model=EmbeddingResponse, responses=_ERRORS,
              summary="Embed texts", openapi_extra=_body_doc(TextEmbeddingRequest, None))
    async def embed_texts(request: Request) -> dict:
        req, _ = await _read_request(request, TextEmbeddingRequest, config, multipart=False)
        emb = await _texts(req.texts)
        return {"model": info["id"], "dim": int(emb.shape[1]), "embeddings": emb.tolist()}

    @app.post("/v1/similarity", response_model=SimilarityResponse, responses=_ERRORS,
              summary="Cosine similarity and softmax probabilities of images x texts",
              openapi_extra=_body_doc(SimilarityRequest, {"images": _FILES, "texts": _STRS}))
    async def similarity(request: Request) -> dict:
        req, raw = await _read_request(request, SimilarityRequest, config, multipart=True)
        check_count("images", raw, config.max_images)
        check_count("texts", req.texts, config.max_texts)
        texts = await _texts(req.texts)  # validate texts before the (costlier) image decode
        images = await _images(raw)
        cos = images @ texts.T
        probs = (enc.logit_scale * cos).softmax(dim=-1)
        return {"model": info["id"], "logit_scale": enc.logit_scale,
                "cosine": cos.tolist(), "probabilities": probs.tolist()}

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS,
              summary="Zero-shot classification: labels ranked with probabilities",
              openapi_extra=_body_doc(ClassifyRequest, {"images": _FILES, "labels": _STRS,
                                                        "prompts": _STRS, "top_k": {"type": "integer"}}))
    async def classify(request: Request) -> dict:
        req, raw = await _read_request(request, ClassifyRequest, config, multipart=True)
        check_count("images", raw, config.max_images)
        labels = clean_labels(req.labels, config.max_labels, config.max_label_chars)
        name, templates = resolve_prompts(req.prompts, PROMPT_SETS, config.max_templates)
        # bounded before any prompt string is built (a cache miss encodes every prompt)
        check_prompt_budget(labels, templates, config.max_class_prompts, config.max_text_chars)
        key = (tuple(labels), tuple(t.text for t in templates))
        classes = await cache.get_or_compute(key, lambda: _class_features(labels, templates))
        images = await _images(raw)
        cos = images @ classes
        probs = (enc.logit_scale * cos).softmax(dim=-1)
        k = min(req.top_k or len(labels), len(labels))
        results = []
        for p, c in zip(probs, cos):
            top = torch.argsort(p, descending=True)[:k].tolist()
            results.append({"ranking": [{"label": labels[j], "probability": float(p[j]), "cosine": float(c[j])}
                                        for j in top]})
        return {"model": info["id"], "prompts": name, "n_templates": len(templates), "results": results}

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, responses={**_ERRORS, 404: {"model": ErrorResponse}},
              summary="OpenAI-compatible embeddings of texts and images (data: URLs)",
              description=openai_compat.__doc__.split("Conventions", 1)[1].split("Nothing here", 1)[0],
              openapi_extra=_body_doc(OpenAIEmbeddingRequest, None))
    async def openai_embeddings(request: Request) -> dict:
        req, _ = await _read_request(request, OpenAIEmbeddingRequest, config, multipart=False)
        items = openai_compat.request_items(req, info["id"], int(info["embed_dim"]))
        texts = [it.value for it in items if it.kind == "text"]
        images = [it.value for it in items if it.kind == "image"]
        for kind, values, limit in (("images", images, config.max_images), ("texts", texts, config.max_texts)):
            if values:  # one of the two may be empty: input holds texts, images or both
                check_count(kind, values, limit)
        text_emb = await _texts(texts) if texts else None  # texts first: cheaper to refuse
        image_emb = await _images(images) if images else None
        out, ti, ii = [], 0, 0
        for it in items:  # back into input order
            if it.kind == "text":
                out.append(text_emb[ti])
                ti += 1
            else:
                out.append(image_emb[ii])
                ii += 1
        tokens = sum(token_lengths(enc.tokenizer, texts)) if texts else 0
        return openai_compat.response(out, info["id"], req.encoding_format, tokens)

    async def _class_features(labels: list[str], templates: list[Template]) -> torch.Tensor:
        def prepare(prompts: list[str], origin: list[str]) -> torch.Tensor:
            check_texts(prompts, enc.tokenizer, enc.context_length, config.max_text_chars, "prompts", origin)
            return enc.tokenize(prompts)

        async def encode(prompts: list[str], origin: list[str]) -> torch.Tensor:
            tokens = await run_in_threadpool(prepare, prompts, origin)
            emb = await backend.encode_prompts(tokens)
            class_work["batches"] += 1
            class_work["prompts"] += len(prompts)
            return emb

        return await class_features(encode, labels, templates, config.class_batch_size)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        if page_html is None:
            raise StarletteHTTPException(404, "no demo page configured; see /docs for the API")
        return HTMLResponse(page_html)

    if config.explore_roots or config.cam_grid:  # the data explorer (alip/serving/explore.py)
        from alip.serving.explore import explore_router

        app.include_router(explore_router(config))

    _install_openapi(app, OPEN_PATHS, auth_required=config.resolved_token() is not None)
    return app


def build_local_app(model_path: str, config: ServeConfig | None = None, page_html: str | None = None,
                    load: Callable[[str], Any] | None = None) -> FastAPI:
    """The same app without Ray (one forward per request): for tests and single-process use."""
    from alip.model import load_model
    from alip.serving.encoder import Encoder, LocalBackend

    model = (load or load_model)(model_path)
    return create_app(LocalBackend(Encoder(model)), config, page_html)
