"""The HTTP API without Ray (FastAPI TestClient + LocalBackend): results equal the library's, and
every client mistake is the documented 4xx JSON error, never a 500."""
from __future__ import annotations

import asyncio
import warnings

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from alip.eval.zeroshot import PROMPT_SETS, build_classifier, classify
from alip.model import create_model, export_open_clip, get_tokenizer, image_transform, load_model
from alip.serving import ServeConfig, ServeConfigError
from alip.serving.api import create_app
from alip.serving.cache import AsyncLRUCache
from alip.serving.encoder import Encoder, LocalBackend
from alip.serving.inputs import ClientError, decode_base64, decode_image, strict_pillow_bomb_check
from serve_helpers import b64, direct_image_embeddings, direct_text_embeddings, png_bytes, png_header_only

LIMITS = dict(max_body_bytes=200_000, max_image_pixels=1_000_000, max_request_pixels=1_500_000, max_images=4,
              max_texts=8, max_labels=6, max_templates=5, max_text_chars=300, max_label_chars=40,
              max_class_prompts=200, class_batch_size=7)
RED, BLUE = png_bytes((220, 20, 20), pattern=7), png_bytes((20, 20, 220), (64, 90), pattern=5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    out = export_open_clip(create_model("alip-tiny"), tmp_path_factory.mktemp("export"))
    return load_model(out).eval()


@pytest.fixture(scope="module")
def client(model):
    app = create_app(LocalBackend(Encoder(model)), ServeConfig(auth_token="", **LIMITS), "<html>page</html>")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def ok(r):
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------- correct answers
def test_image_embeddings_equal_library(client, model):
    want = direct_image_embeddings(model, [RED, BLUE])
    got_json = torch.tensor(ok(client.post("/v1/embeddings/image", json={"images": [b64(RED), b64(BLUE)]}))["embeddings"])
    got_multi = torch.tensor(ok(client.post("/v1/embeddings/image", files=[
        ("images", ("r.png", RED, "image/png")), ("images", ("b.png", BLUE, "image/png"))]))["embeddings"])
    assert got_json.shape == (2, model.embed_dim)
    torch.testing.assert_close(got_json, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_multi, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_json.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    assert not torch.allclose(got_json[0], got_json[1], atol=1e-3)  # the two images differ


def test_data_url_and_urlsafe_base64_accepted(client, model):
    want = direct_image_embeddings(model, [RED])
    import base64
    for s in ("data:image/png;base64," + b64(RED), base64.urlsafe_b64encode(RED).decode().rstrip("=")):
        got = torch.tensor(ok(client.post("/v1/embeddings/image", json={"images": [s]}))["embeddings"])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_text_embeddings_equal_library(client, model):
    texts = ["a red square", "a blue striped rectangle on a white table"]
    body = ok(client.post("/v1/embeddings/text", json={"texts": texts}))
    assert body["dim"] == model.embed_dim and body["model"] == "alip-tiny"
    torch.testing.assert_close(torch.tensor(body["embeddings"]), direct_text_embeddings(model, texts), atol=1e-5, rtol=0)


def test_similarity_is_scaled_cosine_softmax(client, model):
    texts = ["red", "blue", "a photo of a dog"]
    body = ok(client.post("/v1/similarity", json={"images": [b64(RED), b64(BLUE)], "texts": texts}))
    img, txt = direct_image_embeddings(model, [RED, BLUE]), direct_text_embeddings(model, texts)
    cos = img @ txt.T
    scale = float(model.logit_scale.detach().exp())
    assert body["logit_scale"] == pytest.approx(scale, rel=1e-6)
    torch.testing.assert_close(torch.tensor(body["cosine"]), cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(body["probabilities"]), (scale * cos).softmax(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompts", ["cifar10", ["a photo of a {label}.", "a {label} thing."]])
def test_classify_agrees_with_zeroshot_helper(client, model, prompts):
    labels = ["red", "blue", "green", "dog"]
    files = [("images", ("r.png", RED, "image/png")), ("images", ("b.png", BLUE, "image/png"))]
    form = {"labels": labels, "prompts": prompts}
    body = ok(client.post("/v1/classify", files=files, data=form))
    clf = build_classifier(model, get_tokenizer(model), labels, prompts)
    tf = image_transform(model, train=False)
    import io
    x = torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in (RED, BLUE)])
    probs = (float(model.logit_scale.detach().exp()) * classify(model, clf, x)).softmax(-1)
    assert body["prompts"] == (prompts if isinstance(prompts, str) else "custom")
    assert body["n_templates"] == (len(PROMPT_SETS[prompts]) if isinstance(prompts, str) else 2)
    for result, p in zip(body["results"], probs):
        ranking = result["ranking"]
        assert [r["label"] for r in ranking] == [labels[i] for i in p.argsort(descending=True)]
        for r in ranking:
            assert r["probability"] == pytest.approx(float(p[labels.index(r["label"])]), abs=1e-5)
        assert sum(r["probability"] for r in ranking) == pytest.approx(1.0, abs=1e-5)


def test_classify_json_top_k_and_cache(client):
    before = ok(client.get("/v1/models"))["class_cache"]
    req = {"images": [b64(RED)], "labels": ["cat", "dog", "car"], "prompts": ["a {label}."], "top_k": 2}
    first = ok(client.post("/v1/classify", json=req))
    second = ok(client.post("/v1/classify", json=req))
    assert len(first["results"][0]["ranking"]) == 2 and first == second
    after = ok(client.get("/v1/models"))["class_cache"]
    assert after["misses"] == before["misses"] + 1 and after["hits"] == before["hits"] + 1


def test_models_healthz_page_openapi(client, model):
    info = ok(client.get("/v1/models"))
    m = info["data"][0]
    assert m["id"] == "alip-tiny" and m["embed_dim"] == model.embed_dim and m["config"]["embed_dim"] == 64
    assert info["prompt_sets"]["imagenet"] == len(PROMPT_SETS["imagenet"]) and "cifar10" in info["prompt_sets"]
    assert "auth_token" not in info["limits"]
    assert ok(client.get("/healthz"))["status"] == "ok"
    assert client.get("/").text == "<html>page</html>"
    spec = ok(client.get("/openapi.json"))
    for path in ("/v1/embeddings/image", "/v1/embeddings/text", "/v1/similarity", "/v1/classify"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        schema = content["application/json"]["schema"]
        assert any("examples" in p for p in schema["properties"].values()), path
        assert "413" in spec["paths"][path]["post"]["responses"]
    assert "multipart/form-data" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]


# --------------------------------------------------------------------------------- bad input
def _chunks(n_bytes: int, size: int = 16_384):
    for i in range(0, n_bytes, size):
        yield b"x" * min(size, n_bytes - i)


BAD = {
    # name: (method, path, kwargs, status, code)
    "body over limit": ("post", "/v1/embeddings/text", dict(content=b"{" + b" " * 250_000 + b"}",
                        headers={"content-type": "application/json"}), 413, "body_too_large"),
    "chunked body over limit": ("post", "/v1/embeddings/image", dict(content=_chunks(300_000),
                                headers={"content-type": "application/json"}), 413, "body_too_large"),
    "undecodable image": ("post", "/v1/embeddings/image", dict(json={"images": [b64(b"not an image at all")]}),
                          400, "bad_image"),
    "truncated image": ("post", "/v1/embeddings/image", dict(json={"images": [b64(RED[: len(RED) // 2])]}),
                        400, "bad_image"),
    "bad base64": ("post", "/v1/embeddings/image", dict(json={"images": ["@@@not base64@@@"]}), 400, "bad_base64"),
    "bomb over our limit": ("post", "/v1/embeddings/image", dict(json={"images": [b64(png_header_only(2000, 2000))]}),
                            413, "image_too_large"),
    "bomb multipart": ("post", "/v1/classify", dict(files=[("images", ("b.png", png_header_only(30000, 30000), "image/png"))],
                       data={"labels": ["a", "b"]}), 413, "image_too_large"),
    "empty images": ("post", "/v1/embeddings/image", dict(json={"images": []}), 422, "empty_images"),
    "empty texts": ("post", "/v1/embeddings/text", dict(json={"texts": []}), 422, "empty_texts"),
    "empty labels": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": []}), 422, "empty_labels"),
    "empty text": ("post", "/v1/embeddings/text", dict(json={"texts": ["ok", "  "]}), 422, "empty_text"),
    "text over context": ("post", "/v1/embeddings/text", dict(json={"texts": ["word " * 40]}), 422, "text_too_long"),
    "text over chars": ("post", "/v1/embeddings/text", dict(json={"texts": ["x" * 301]}), 422, "text_too_long"),
    "prompt over context": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["cat", "dog"],
                            "prompts": ["{label} " + "a," * 60]}), 422, "text_too_long"),
    "prompt over chars (not built)": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["c" * 40],
                                      "prompts": ["{label}" * 8]}), 422, "text_too_long"),
    "label over chars": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["cat", "dog " * 11],
                         "prompts": ["a {label}."]}), 422, "label_too_long"),
    "labels x templates over budget": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": list("abcdef"),
                                       "prompts": "imagenet"}),
                                       422, "too_many_prompts"),
    "format spec in template": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["a"],
                                "prompts": ["{label}{label:>1000000000}"]}), 422, "bad_prompts"),
    "conversion in template": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["a"],
                               "prompts": ["{label!r}"]}), 422, "bad_prompts"),
    "attribute in template": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["a"],
                              "prompts": ["{label.__class__}"]}), 422, "bad_prompts"),
    "index in template": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["a"],
                          "prompts": ["{label[0]}"]}), 422, "bad_prompts"),
    "lone brace in template": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["a"],
                               "prompts": ["{label} }"]}), 422, "bad_prompts"),
    "pixels over the request budget": ("post", "/v1/embeddings/image",
                                       dict(json={"images": [b64(png_header_only(900, 900))] * 2}), 413, "too_many_pixels"),
    "too many images": ("post", "/v1/embeddings/image", dict(json={"images": [b64(RED)] * 5}), 422, "too_many_images"),
    "too many files": ("post", "/v1/embeddings/image", dict(files=[("images", ("r.png", RED, "image/png"))] * 5),
                       422, "bad_multipart"),
    "too many texts": ("post", "/v1/embeddings/text", dict(json={"texts": ["a"] * 9}), 422, "too_many_texts"),
    "too many labels": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": list("abcdefg")}),
                        422, "too_many_labels"),
    "duplicate labels": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["a", "a"]}),
                         422, "duplicate_labels"),
    "unknown prompt set": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["a"], "prompts": "nope"}),
                           422, "bad_prompts"),
    "template without label": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["a"],
                               "prompts": ["a photo of {label}", "a photo"]}), 422, "bad_prompts"),
    "template with stray braces": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["a"],
                                   "prompts": ["{label} {0}"]}), 422, "bad_prompts"),
    "misspelt field": ("post", "/v1/embeddings/text", dict(json={"text": ["a"]}), 422, "invalid_request"),
    "wrong type": ("post", "/v1/embeddings/text", dict(json={"texts": "a"}), 422, "invalid_request"),
    "json not object": ("post", "/v1/embeddings/text", dict(json=["a"]), 422, "bad_json"),
    "malformed json": ("post", "/v1/embeddings/text", dict(content=b"{texts:", headers={"content-type": "application/json"}),
                       400, "bad_json"),
    "top_k zero": ("post", "/v1/classify", dict(json={"images": [b64(RED)], "labels": ["a"], "top_k": 0}),
                   422, "invalid_request"),
    "wrong content type": ("post", "/v1/embeddings/image", dict(content=RED, headers={"content-type": "image/png"}),
                           415, "unsupported_media_type"),
    "multipart on text endpoint": ("post", "/v1/embeddings/text", dict(files=[("texts", ("t.txt", b"a", "text/plain"))]),
                                   415, "unsupported_media_type"),
    "no content type": ("post", "/v1/similarity", dict(content=b"x"), 415, "unsupported_media_type"),
    "timeout override header": ("post", "/v1/embeddings/text", dict(json={"texts": ["a"]},
                                headers={"x-request-timeout-seconds": "0"}), 400, "forbidden_header"),
    "disconnect override header": ("get", "/v1/models", dict(headers={"X-Request-Disconnect-Disabled": "?1"}),
                                   400, "forbidden_header"),
    "unknown path": ("get", "/v2/nothing", {}, 404, "not_found"),
    "wrong method": ("get", "/v1/classify", {}, 405, "method_not_allowed"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_client_mistakes_are_4xx_json(client, name):
    method, path, kwargs, status, code = BAD[name]
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, (name, r.text)
    err = r.json()["error"]
    assert err["status"] == status and err["code"] == code and err["message"], err
    assert client.get("/healthz").status_code == 200


def test_auth_token_required_when_set(model, monkeypatch):
    monkeypatch.setenv("ALIP_SERVE_TOKEN", "s3cret")
    app = create_app(LocalBackend(Encoder(model)), ServeConfig(), "<html></html>")  # token from the env
    with TestClient(app) as c:
        assert c.post("/v1/embeddings/text", json={"texts": ["a"]}).status_code == 401
        r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        ok(c.post("/v1/embeddings/text", json={"texts": ["a"]}, headers={"Authorization": "bearer s3cret"}))
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # open paths


# ------------------------------------------------------------------------------- the helpers
def test_decode_image_limits_and_pillow_bomb_guard():
    assert decode_image(RED, 0, 10_000).size == (80, 60)
    with pytest.raises(ClientError) as e:
        decode_image(png_header_only(101, 100), 3, 10_000)
    assert e.value.status == 413 and "images[3]" in e.value.message
    # above Pillow's own 2x MAX_IMAGE_PIXELS it raises DecompressionBombError in Image.open
    big = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 100
    with pytest.raises(ClientError) as e:
        decode_image(png_header_only(big, big), 0, 10**12)
    assert e.value.status == 413 and "bomb" in e.value.message
    # between 1x and 2x Pillow only warns; strict_pillow_bomb_check (set by the service) makes it an error
    mid = int((1.5 * Image.MAX_IMAGE_PIXELS) ** 0.5)
    with warnings.catch_warnings():
        strict_pillow_bomb_check()
        with pytest.raises(ClientError) as e:
            decode_image(png_header_only(mid, mid), 0, 10**12)
    assert e.value.status == 413
    with pytest.raises(ClientError) as e:
        decode_image(b"", 0, 10)
    assert e.value.status == 422
    assert decode_base64("  " + b64(RED)[:20] + "\n" + b64(RED)[20:], 0) == RED  # wrapped base64


def test_serve_config_validation():
    assert ServeConfig.from_dict({"max_batch_size": "8", "batch_wait_timeout_s": "0.05"}).max_batch_size == 8
    with pytest.raises(ServeConfigError, match="unknown serve setting"):
        ServeConfig.from_dict({"max_body_byte": 1})
    with pytest.raises(ServeConfigError, match="positive"):
        ServeConfig(max_images=0)


def test_lru_cache_evicts_and_shares_pending_computation():
    calls = []

    async def main():
        cache: AsyncLRUCache[int] = AsyncLRUCache(2)

        def compute(k):
            async def run():
                calls.append(k)
                await asyncio.sleep(0.01)
                return k * 10
            return run

        # three concurrent misses on one key: one computation
        assert await asyncio.gather(*(cache.get_or_compute("a", compute(1)) for _ in range(3))) == [10, 10, 10]
        await cache.get_or_compute("b", compute(2))
        await cache.get_or_compute("a", compute(1))       # hit, now most recent
        await cache.get_or_compute("c", compute(3))       # evicts b (least recent)
        assert "a" in cache and "c" in cache and "b" not in cache

        async def boom():
            raise RuntimeError("x")
        with pytest.raises(RuntimeError):
            await cache.get_or_compute("d", boom)
        assert "d" not in cache                            # failures are not cached
        return cache.stats()

    stats = asyncio.run(main())
    assert calls == [1, 2, 3]
    assert stats == {"entries": 2, "maxsize": 2, "hits": 3, "misses": 4, "cancelled": 0}


def test_entry_points_fail_fast_on_bad_settings_and_models(tmp_path):
    """`alip serve` / deployment.build refuse typos and missing models in the driver, before Ray starts.
    "no model": no model given, $ALIP_SERVE_MODEL unset, and no demo export in the session's demo
    folder ($ALIP_DEMO_OUT, a scratch folder: see tests/conftest.py), whatever `make demo` left here."""
    from alip.model import ModelLoadError
    from alip.serving import run_local
    from alip.serving.deployment import app_builder, build

    with pytest.raises(ServeConfigError, match="unknown serve setting"):
        run_local(str(tmp_path), settings={"max_batch": 4})
    with pytest.raises(ModelLoadError, match="open_clip_config.json"):
        build(str(tmp_path))                       # a folder that is not an export
    with pytest.raises(ModelLoadError, match="does not exist"):
        build(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="pass random:alip-tiny"):
        build("alip-tiny")                         # a config name is not silently a random model
    with pytest.raises(ServeConfigError, match="no model"):
        app_builder({})
    with pytest.raises(ServeConfigError, match="max_ongoing_requests"):
        build("random:alip-tiny", {"max_batch_size": 32}, max_ongoing_requests=8)


# ------------------------------------------------------------------- limits that hold (issue 15)
def test_format_spec_template_is_refused_at_once(client):
    """`{label:>1000000000}` would build a gigabyte string per prompt: refused before any formatting."""
    import time
    t0 = time.perf_counter()
    r = client.post("/v1/classify", json={"images": [b64(RED)], "labels": ["a", "b"],
                                          "prompts": ["{label}{label:>1000000000}"]})
    assert r.status_code == 422 and "only the bare placeholder" in r.json()["error"]["message"]
    assert time.perf_counter() - t0 < 1.0


def test_escaped_braces_are_literal_and_match_the_library(client, model):
    templates = ["a {{curly}} photo of a {label}.", "{label}, {label}!"]
    labels = ["red", "blue"]
    body = ok(client.post("/v1/classify", json={"images": [b64(RED)], "labels": labels, "prompts": templates}))
    clf = build_classifier(model, get_tokenizer(model), labels, templates)  # str.format, like the service
    tf = image_transform(model, train=False)
    import io
    x = tf(Image.open(io.BytesIO(RED)).convert("RGB"))[None]
    p = (float(model.logit_scale.detach().exp()) * classify(model, clf, x)).softmax(-1)[0]
    got = {r["label"]: r["probability"] for r in body["results"][0]["ranking"]}
    assert [got[lab] for lab in labels] == pytest.approx(p.tolist(), abs=1e-5)


def test_pixel_budget_is_checked_before_decoding(client):
    # each header-only PNG is under the per-image limit but cannot be decoded (its pixel data is
    # missing): one alone is a 400 from the decoder, two are refused by the budget before decoding
    one = b64(png_header_only(900, 900))
    assert client.post("/v1/embeddings/image", json={"images": [one]}).json()["error"]["code"] == "bad_image"
    r = client.post("/v1/embeddings/image", json={"images": [one, one]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels"
    assert "1620000 pixels" in r.json()["error"]["message"]


def test_template_parser_accepts_only_bare_label():
    from alip.serving.inputs import parse_template
    t = parse_template("a {{x}} {label} and {label}", 0)
    assert (t.slots, t.literal_chars, t.fill("cat")) == (2, len("a {x}  and "), "a {x} cat and cat")
    assert t.filled_chars("cat") == len(t.fill("cat"))
    for bad in ("{label:10}", "{label!s}", "{label.upper}", "{label[0]}", "{0}", "{}", "{name}", "{label", "}",
                "no slot", "{label:{label}}"):
        with pytest.raises(ClientError) as e:
            parse_template(bad, 0)
        assert e.value.status == 422, bad


def test_class_features_batched_equal_build_classifier(model):
    from alip.serving.classes import class_features
    from alip.serving.inputs import parse_template

    enc = Encoder(model)
    labels, raw = ["red", "blue", "green", "a dog"], ["a photo of a {label}.", "{label}", "art of the {label}"]
    sizes = []

    async def encode(prompts, origin):
        sizes.append(len(prompts))
        return enc.encode_texts(enc.tokenize(prompts))

    got = asyncio.run(class_features(encode, labels, [parse_template(t, i) for i, t in enumerate(raw)], 5))
    assert sizes == [5, 5, 2]  # 12 prompts in batches of 5
    torch.testing.assert_close(got, build_classifier(model, get_tokenizer(model), labels, raw), atol=1e-6, rtol=0)


def test_cancelled_request_stops_class_features_between_batches(model):
    """The request's task is cancelled (client gone): the shared computation stops at the next
    batch once its last waiter has gone, and nothing is cached."""
    from alip.serving.classes import class_features
    from alip.serving.inputs import parse_template

    backend = LocalBackend(Encoder(model))
    templates = [parse_template(f"{{label}} number {i}", i) for i in range(10)]
    labels = [f"class {i}" for i in range(20)]  # 200 prompts, 50 batches of 4
    done = []

    async def encode(prompts, origin):
        emb = await backend.encode_prompts(backend.encoder.tokenize(prompts))
        done.append(len(prompts))
        await asyncio.sleep(0.01)
        return emb

    async def main():
        cache: AsyncLRUCache[torch.Tensor] = AsyncLRUCache(4)
        waiters = [asyncio.ensure_future(cache.get_or_compute(("k",), lambda: class_features(encode, labels, templates, 4)))
                   for _ in range(2)]
        while len(done) < 3:
            await asyncio.sleep(0.005)
        waiters[0].cancel()          # one client goes: the other still waits, work continues
        await asyncio.sleep(0.1)
        n_mid = len(done)
        assert n_mid > 3 and not waiters[1].done()
        waiters[1].cancel()          # the last one goes: the computation stops
        await asyncio.gather(*waiters, return_exceptions=True)
        n_stop = len(done)
        await asyncio.sleep(0.3)
        return cache, n_stop

    cache, n_stop = asyncio.run(main())
    assert len(done) == n_stop < 50   # nothing more was encoded after the cancellation
    assert len(cache) == 0 and cache.stats()["cancelled"] == 1  # nothing cached


def test_openapi_has_bearer_scheme_and_every_status(client):
    spec = ok(client.get("/openapi.json"))
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {**spec["components"]["securitySchemes"]["bearerAuth"],
                                                                    "type": "http", "scheme": "bearer"}
    for path in ("/v1/embeddings", "/v1/embeddings/image", "/v1/embeddings/text", "/v1/similarity", "/v1/classify"):
        op = spec["paths"][path]["post"]
        assert {"bearerAuth": []} in op["security"], path
        assert {"200", "400", "401", "408", "413", "415", "422", "503"} <= set(op["responses"]), (path, op["responses"])
        assert "Retry-After" in op["responses"]["503"]["headers"]
    assert "security" not in spec["paths"]["/healthz"]["get"]  # liveness stays open
    assert {"bearerAuth": []} in spec["paths"]["/v1/models"]["get"]["security"]


def test_readiness_probe_runs_a_real_forward(model):
    enc = Encoder(model)
    assert enc.probe()["ok"] is True
    broken = create_model("alip-tiny")
    with torch.no_grad():
        broken.clip.visual.proj.fill_(float("nan"))  # what a bad checkpoint or device fault looks like
    with pytest.raises(RuntimeError, match="image tower"):
        Encoder(broken).probe()


def test_serve_app_limits_and_default_model(tmp_path, monkeypatch):
    from alip import demo
    from alip.serving import deployment as serve_app

    with pytest.raises(ServeConfigError, match="max_queued_requests"):
        serve_app.build("random:alip-tiny", max_queued_requests=0)
    with pytest.raises(ServeConfigError, match="per replica"):
        serve_app.build("random:alip-tiny", num_cpus=0)
    deployment = serve_app.build("random:alip-tiny", num_replicas=1, num_cpus=0.5, max_queued_requests=7)
    opts = deployment._bound_deployment
    assert opts.ray_actor_options["num_cpus"] == 0.5 and opts.max_queued_requests == 7
    assert opts._deployment_config.backpressure_config.retry_after_s == 1

    monkeypatch.delenv("ALIP_SERVE_MODEL", raising=False)
    monkeypatch.setenv(demo.OUT_ENV, str(tmp_path / "my-demo"))
    with pytest.raises(ServeConfigError, match="make demo.*ALIP_SERVE_MODEL") as e:
        serve_app.app_builder({})
    assert str(tmp_path / "my-demo" / "runs" / "demo-alip" / "export") in str(e.value)
    # the default: the demo's ALIP export in the demo folder ($ALIP_DEMO_OUT here)
    demo_export = export_open_clip(create_model("alip-tiny"), tmp_path / "my-demo" / "runs" / "demo-alip" / "export")
    assert serve_app.app_builder({})._bound_deployment.init_args[0] == str(demo_export.resolve())
    # $ALIP_SERVE_MODEL wins over the default
    export = export_open_clip(create_model("alip-tiny"), tmp_path / "exp")
    monkeypatch.setenv("ALIP_SERVE_MODEL", str(export))
    bound = serve_app.app_builder({"max_batch_size": "4"})._bound_deployment
    assert bound.init_args[0] == str(export.resolve()) and bound.init_args[1]["max_batch_size"] == 4
    # a relative default is looked up in the current directory (a `make demo` there)
    monkeypatch.delenv("ALIP_SERVE_MODEL")
    monkeypatch.delenv(demo.OUT_ENV)
    (tmp_path / "my-demo").rename(tmp_path / "demo_out")
    monkeypatch.chdir(tmp_path)
    assert serve_app.app_builder({})._bound_deployment.init_args[0] == str(
        (tmp_path / "demo_out" / "runs" / "demo-alip" / "export").resolve())


def test_serve_app_is_the_library_deployment_under_the_serve_cli_import_path():
    """serve/config.yaml's import_path (serve.app:app_builder) reaches the library's deployment."""
    import importlib
    import sys
    from pathlib import Path

    import yaml

    from alip.serving import deployment

    root = Path(__file__).resolve().parents[1]
    apps = yaml.safe_load((root / "serve" / "config.yaml").read_text())["applications"]
    module, attr = apps[0]["import_path"].split(":")
    sys.path.insert(0, str(root))  # `serve run` imports it from the checkout (Ray puts the cwd on the path)
    try:
        app_module = importlib.import_module(module)
    finally:
        sys.path.remove(str(root))
    assert getattr(app_module, attr) is deployment.app_builder
    assert app_module.build is deployment.build and app_module.ALIPServer is deployment.ALIPServer
