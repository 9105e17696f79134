"""OpenAI-compatible POST /v1/embeddings, driven by the official `openai` Python client (no Ray: the
client's HTTP transport is FastAPI's TestClient around the real app; the Ray Serve deployment is
driven by the same client over real HTTP in tests/test_serve_abuse.py)."""
from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from alip.model import create_model, export_open_clip, get_tokenizer, load_model
from alip.serving import ServeConfig
from alip.serving.api import create_app
from alip.serving.encoder import Encoder, LocalBackend
from alip.serving.inputs import token_lengths
from serve_helpers import b64, direct_image_embeddings, direct_text_embeddings, png_bytes, png_header_only

TOKEN = "sk-test-token"
RED, BLUE = png_bytes((220, 20, 20), pattern=7), png_bytes((20, 20, 220), (64, 90), pattern=5)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + b64(png)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    return load_model(export_open_clip(create_model("alip-tiny"), tmp_path_factory.mktemp("export"))).eval()


@pytest.fixture(scope="module")
def client(model):
    config = ServeConfig(auth_token=TOKEN, max_images=3, max_texts=4, max_image_pixels=1_000_000,
                         max_request_pixels=1_500_000)
    with TestClient(create_app(LocalBackend(Encoder(model)), config), raise_server_exceptions=False) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=TOKEN, http_client=http, max_retries=0)


def vec(item) -> torch.Tensor:
    return torch.tensor(item.embedding, dtype=torch.float32)


def test_texts_default_base64_and_float_match_the_library(client, model):
    texts = ["a red square", "a blue striped rectangle"]
    want = direct_text_embeddings(model, texts)
    # the client asks for base64 by default and decodes it itself: check the wire format too
    raw = client.embeddings.with_raw_response.create(model="alip-tiny", input=texts)
    body = json.loads(raw.text)
    assert body["object"] == "list" and body["model"] == "alip-tiny"
    assert [d["object"] for d in body["data"]] == ["embedding"] * 2 and [d["index"] for d in body["data"]] == [0, 1]
    assert isinstance(body["data"][0]["embedding"], str)  # base64 on the wire
    wire = np.frombuffer(base64.b64decode(body["data"][1]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(wire, want[1].numpy(), atol=1e-6)

    parsed = raw.parse()
    torch.testing.assert_close(torch.stack([vec(d) for d in parsed.data]), want, atol=1e-5, rtol=0)
    n_tokens = sum(token_lengths(get_tokenizer(model), texts))
    assert parsed.usage.prompt_tokens == parsed.usage.total_tokens == n_tokens

    as_float = client.embeddings.create(model="alip-tiny", input=texts[0], encoding_format="float")
    assert len(as_float.data) == 1 and len(as_float.data[0].embedding) == model.embed_dim
    torch.testing.assert_close(vec(as_float.data[0]), want[0], atol=1e-5, rtol=0)


def test_images_as_data_urls_mixed_with_texts_keep_input_order(client, model):
    img = direct_image_embeddings(model, [RED, BLUE])
    txt = direct_text_embeddings(model, ["red", "blue"])
    res = client.embeddings.create(model="alip-tiny", input=[data_url(RED), "red", data_url(BLUE), "blue"],
                                   encoding_format="float")
    got = torch.stack([vec(d) for d in sorted(res.data, key=lambda d: d.index)])
    torch.testing.assert_close(got, torch.stack([img[0], txt[0], img[1], txt[1]]), atol=1e-5, rtol=0)
    assert res.usage.prompt_tokens == sum(token_lengths(get_tokenizer(model), ["red", "blue"]))  # images add none


def test_vllm_messages_form_one_image_or_one_text(client, model):
    """vLLM's convention for CLIP embeddings: `messages` with one image_url (or one text) part."""
    def chat(content):
        return client.post("/embeddings", cast_to=openai.types.CreateEmbeddingResponse,
                           body={"model": "alip-tiny", "encoding_format": "float",
                                 "messages": [{"role": "user", "content": content}]})

    image = chat([{"type": "image_url", "image_url": {"url": data_url(BLUE)}}])
    torch.testing.assert_close(vec(image.data[0]), direct_image_embeddings(model, [BLUE])[0], atol=1e-5, rtol=0)
    text = chat([{"type": "text", "text": "a photo of a cat"}])
    torch.testing.assert_close(vec(text.data[0]), direct_text_embeddings(model, ["a photo of a cat"])[0],
                               atol=1e-5, rtol=0)
    with pytest.raises(openai.UnprocessableEntityError, match="exactly one"):
        chat([{"type": "image_url", "image_url": {"url": data_url(BLUE)}}, {"type": "text", "text": "x"}])
    with pytest.raises(openai.UnprocessableEntityError, match="does not fetch"):
        chat([{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(model="ViT-L-14", input="x"), openai.NotFoundError, "not served here"),
    (dict(model="alip-tiny", input="x", dimensions=32), openai.UnprocessableEntityError, "not trained to be truncated"),
    (dict(model="alip-tiny", input=[]), openai.UnprocessableEntityError, "empty"),
    (dict(model="alip-tiny", input=[""]), openai.UnprocessableEntityError, "empty or blank"),
    (dict(model="alip-tiny", input=["word " * 40]), openai.UnprocessableEntityError, "context length"),
    (dict(model="alip-tiny", input=["a"] * 5), openai.UnprocessableEntityError, "over the limit of 4"),
    (dict(model="alip-tiny", input=[[1, 2, 3]]), openai.UnprocessableEntityError, "input"),
    (dict(model="alip-tiny", input="data:image/png;base64,@@@"), openai.BadRequestError, "base64"),
    (dict(model="alip-tiny", input=[data_url(png_header_only(900, 900))] * 2), openai.APIStatusError, "budget"),
])
def test_client_mistakes_are_clear_openai_errors(client, kwargs, error, match):
    with pytest.raises(error, match=match) as e:
        client.embeddings.create(**kwargs)
    assert 400 <= e.value.status_code < 500
    assert e.value.body["type"] and e.value.body["code"]  # OpenAI's error shape: error.{message,type,code}


def test_wrong_key_is_401_for_the_client(client):
    bad = client.with_options(api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="alip-tiny", input="x")
