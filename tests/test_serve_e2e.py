"""The Ray Serve deployment end to end on 127.0.0.1: one Serve instance for the whole module.

Every endpoint against the library's own encoders, client mistakes over real HTTP (chunked
uploads included), 32 concurrent clients x 20 requests, and the web page in headless Chromium.
"""
from __future__ import annotations

import asyncio
import io
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from alip.eval.zeroshot import build_classifier, classify
from alip.model import get_tokenizer, image_transform
from serve_helpers import (b64, direct_image_embeddings, direct_text_embeddings, ok, png_bytes,
                           png_header_only, running_service)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `serve` is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow

SETTINGS = dict(max_body_bytes=1_000_000, max_image_pixels=1_000_000, max_images=8, max_texts=64, max_labels=16,
                max_batch_size=16, batch_wait_timeout_s=0.005)
RED, BLUE, GREEN = (png_bytes((220, 20, 20), pattern=7), png_bytes((20, 20, 220), (64, 90), pattern=5),
                    png_bytes((20, 200, 40), (50, 50), pattern=3))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(tmp_path_factory.mktemp("serve_export"), settings=SETTINGS, num_replicas=1, ray_num_cpus=2) as svc:
        yield svc


def test_every_endpoint_matches_the_library(service):
    c, model = service["client"], service["model"]
    health = ok(c.get("/healthz"))
    assert health["status"] == "ok" and health["model"] == "alip-tiny" and health["probe"]["ok"] is True
    assert c.get("/-/healthz").status_code == 200  # liveness on Serve's proxy
    info = ok(c.get("/v1/models"))
    assert info["data"][0]["embed_dim"] == model.embed_dim == 64 and info["limits"]["max_images"] == 8

    want = direct_image_embeddings(model, [RED, BLUE])
    for body in (c.post("/v1/embeddings/image", json={"images": [b64(RED), b64(BLUE)]}),
                 c.post("/v1/embeddings/image", files=[("images", ("r.png", RED, "image/png")),
                                                       ("images", ("b.png", BLUE, "image/png"))])):
        torch.testing.assert_close(torch.tensor(ok(body)["embeddings"]), want, atol=1e-5, rtol=0)

    texts = ["a red square", "blue stripes", "a green thing on a table"]
    got = torch.tensor(ok(c.post("/v1/embeddings/text", json={"texts": texts}))["embeddings"])
    torch.testing.assert_close(got, direct_text_embeddings(model, texts), atol=1e-5, rtol=0)

    sim = ok(c.post("/v1/similarity", json={"images": [b64(RED), b64(BLUE)], "texts": texts}))
    cos = want @ direct_text_embeddings(model, texts).T
    with torch.no_grad():
        scale = float(model.logit_scale.exp())
    torch.testing.assert_close(torch.tensor(sim["cosine"]), cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(sim["probabilities"]), (scale * cos).softmax(-1), atol=1e-5, rtol=0)

    labels = ["red", "blue", "green"]
    res = ok(c.post("/v1/classify", json={"images": [b64(RED), b64(BLUE), b64(GREEN)], "labels": labels,
                                          "prompts": "cifar10"}))
    from PIL import Image
    tf = image_transform(model, train=False)
    x = torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in (RED, BLUE, GREEN)])
    probs = (scale * classify(model, build_classifier(model, get_tokenizer(model), labels, "cifar10"), x)).softmax(-1)
    for result, p in zip(res["results"], probs):
        assert [r["label"] for r in result["ranking"]] == [labels[i] for i in p.argsort(descending=True)]
        got_p = {r["label"]: r["probability"] for r in result["ranking"]}
        assert [got_p[lab] for lab in labels] == pytest.approx(p.tolist(), abs=1e-5)

    assert "<title>ALIP zero-shot classifier</title>" in c.get("/").text
    assert set(ok(c.get("/openapi.json"))["paths"]) >= {"/v1/embeddings/image", "/v1/embeddings/text",
                                                       "/v1/similarity", "/v1/classify", "/v1/models", "/healthz"}


def _chunked(n: int):
    for i in range(0, n, 65536):
        yield b"x" * min(65536, n - i)


BAD = [
    ("413 content-length", dict(url="/v1/embeddings/image", content=b" " * 1_200_000,
                                headers={"content-type": "application/json"}), 413),
    ("413 chunked", dict(url="/v1/embeddings/image", content=lambda: _chunked(3_000_000),
                         headers={"content-type": "application/json"}), 413),
    ("400 undecodable", dict(url="/v1/embeddings/image", json={"images": [b64(b"GIF89a broken")]}), 400),
    ("413 bomb", dict(url="/v1/embeddings/image", json={"images": [b64(png_header_only(40_000, 40_000))]}), 413),
    ("422 empty images", dict(url="/v1/embeddings/image", json={"images": []}), 422),
    ("422 empty texts", dict(url="/v1/embeddings/text", json={"texts": []}), 422),
    ("422 empty text", dict(url="/v1/embeddings/text", json={"texts": [""]}), 422),
    ("422 over-long text", dict(url="/v1/embeddings/text", json={"texts": ["very long " * 30]}), 422),
    ("422 too many images", dict(url="/v1/similarity", json={"images": [b64(RED)] * 9, "texts": ["a"]}), 422),
    ("422 too many labels", dict(url="/v1/classify", json={"images": [b64(RED)], "labels": [str(i) for i in range(17)]}), 422),
    ("422 bad template", dict(url="/v1/classify", json={"images": [b64(RED)], "labels": ["a"], "prompts": ["no slot"]}), 422),
    ("415 content type", dict(url="/v1/embeddings/text", content=b"texts=a", headers={"content-type": "text/plain"}), 415),
]


@pytest.mark.parametrize("name,kwargs,status", BAD, ids=[b[0] for b in BAD])
def test_client_mistakes_over_http(service, name, kwargs, status):
    kwargs = dict(kwargs)
    if callable(kwargs.get("content")):
        kwargs["content"] = kwargs["content"]()  # a generator: httpx sends it chunked, no Content-Length
    r = service["client"].post(**kwargs)
    assert r.status_code == status, (name, r.text)
    assert r.json()["error"]["status"] == status
    assert ok(service["client"].get("/healthz"))["status"] == "ok"


def test_32_clients_x_20_requests(service):
    """Bounded load on 127.0.0.1: no errors, every answer right, and requests were batched."""
    model, url = service["model"], service["url"]
    texts = [f"item number {i}" for i in range(8)]
    want_text = direct_text_embeddings(model, texts)
    want_img = direct_image_embeddings(model, [RED, BLUE])
    imgs = [b64(RED), b64(BLUE)]
    labels = ["red", "blue", "green"]

    async def client(cid: int, http: httpx.AsyncClient) -> list[str]:
        errors = []
        for i in range(20):
            kind = (cid + i) % 4
            if kind in (0, 1):
                t = texts[(cid * 20 + i) % len(texts)]
                r = await http.post("/v1/embeddings/text", json={"texts": [t]})
                if r.status_code != 200:
                    errors.append(r.text)
                elif not torch.allclose(torch.tensor(r.json()["embeddings"][0]), want_text[texts.index(t)], atol=1e-5):
                    errors.append(f"wrong text embedding for {t!r}")
            elif kind == 2:
                j = (cid + i) % 2
                r = await http.post("/v1/embeddings/image", json={"images": [imgs[j]]})
                if r.status_code != 200:
                    errors.append(r.text)
                elif not torch.allclose(torch.tensor(r.json()["embeddings"][0]), want_img[j], atol=1e-5):
                    errors.append("wrong image embedding")
            else:
                r = await http.post("/v1/classify", json={"images": [imgs[i % 2]], "labels": labels,
                                                          "prompts": ["a photo of a {label}."]})
                if r.status_code != 200:
                    errors.append(r.text)
        return errors

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            results = await asyncio.gather(*(client(c, http) for c in range(32)))
        return [e for r in results for e in r]

    start = time.perf_counter()
    errors = asyncio.run(main())
    elapsed = time.perf_counter() - start
    assert errors == [], errors[:5]
    stats = ok(service["client"].get("/v1/models"))["batching"]
    print(f"\n640 requests in {elapsed:.1f}s ({640 / elapsed:.0f} req/s); batching {stats}")
    # concurrent single-item requests were merged into shared forwards
    assert stats["text"]["largest"] > 1 and stats["text"]["items"] > stats["text"]["batches"]
    assert stats["text"]["largest"] <= SETTINGS["max_batch_size"]
    assert ok(service["client"].get("/healthz"))["status"] == "ok"


CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER),
                    reason="headless Chromium not installed: apt-get install -y chromium chromium-driver")
def test_page_in_headless_chromium(service, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image = tmp_path / "blue.png"
    image.write_bytes(BLUE)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)  # explicit driver: no Selenium Manager
    try:
        driver.set_page_load_timeout(60)
        driver.get(service["url"] + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "alip-tiny" in d.find_element(By.ID, "model-info").text)  # /v1/models answered
        # no image yet: the page explains instead of sending a request
        driver.find_element(By.ID, "go").click()
        assert "Choose an image" in driver.find_element(By.ID, "error").text

        driver.find_element(By.ID, "file").send_keys(str(image))
        labels = driver.find_element(By.ID, "labels")
        labels.clear()
        labels.send_keys("red\nblue, green\nstriped")
        Select(driver.find_element(By.ID, "prompts")).select_by_value("cifar10")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart .bar-row")) == 4)

        rows = driver.find_elements(By.CSS_SELECTOR, "#chart .bar-row")
        shown = [r.get_attribute("data-label") for r in rows]
        assert sorted(shown) == ["blue", "green", "red", "striped"]
        assert [r.find_element(By.CLASS_NAME, "bar-label").text for r in rows] == shown
        probs = [float(r.get_attribute("data-probability")) for r in rows]
        widths = [float(r.find_element(By.CLASS_NAME, "bar").value_of_css_property("width").rstrip("px")) for r in rows]
        track = float(rows[0].find_element(By.CLASS_NAME, "bar-track").value_of_css_property("width").rstrip("px"))
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)
        for p, w in zip(probs, widths):  # the bars are drawn to scale
            assert w == pytest.approx(max(p * track, 1.0), abs=2.0)

        # the same request through the API gives the same ranking
        api = ok(service["client"].post("/v1/classify", files=[("images", ("b.png", BLUE, "image/png"))],
                                        data={"labels": ["red", "blue", "green", "striped"], "prompts": "cifar10"}))
        assert [r["label"] for r in api["results"][0]["ranking"]] == shown
        assert [r["probability"] for r in api["results"][0]["ranking"]] == pytest.approx(probs, abs=1e-6)
    finally:
        driver.quit()
