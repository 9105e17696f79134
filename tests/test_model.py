"""The open_clip-based model: trimmed text encoding is exact; exports load with open_clip's own API."""
import json

import open_clip
import pytest
import torch

from alip.model import ModelLoadError, create_model, export_open_clip, get_tokenizer, image_transform, load_model

TEXTS = ["a red circle", "Northwest trip.", "a large yellow striped triangle at the top of a gray picture", "x", ""]


@pytest.mark.parametrize("name", ["alip-tiny", "alip-micro"])
def test_trimmed_text_encoding_equals_open_clip(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    tokens = get_tokenizer(model)(TEXTS)
    with torch.no_grad():
        ours = model.encode_text(tokens)
        theirs = model.clip.encode_text(tokens, normalize=True)
    assert tokens.shape[1] > int(tokens.argmax(-1).max()) + 1  # there really was padding to trim
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_trimmed_text_encoding_equals_open_clip_vit_b_32():
    torch.manual_seed(0)
    model = create_model("ViT-B-32").eval()
    tokens = get_tokenizer(model)(TEXTS)
    assert tokens.shape[1] == 77
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.clip.encode_text(tokens, normalize=True),
                                   atol=1e-5, rtol=0)


def test_vit_b_configs_match_the_paper_table_3():
    for name, patch in (("ViT-B-32", 32), ("ViT-B-16", 16)):
        cfg = open_clip.get_model_config(name)
        assert cfg["embed_dim"] == 512
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        assert (v["image_size"], v["layers"], v["width"], v["patch_size"]) == (224, 12, 768, patch)
        assert (t["layers"], t["width"], t["heads"]) == (12, 512, 8)


def test_initial_temperature_is_0_07():
    assert float(create_model("alip-micro").logit_scale.exp()) == pytest.approx(1 / 0.07, rel=1e-5)


def test_export_loads_with_open_clip_public_api(tmp_path):
    torch.manual_seed(0)
    model = create_model("alip-tiny").eval()
    export_open_clip(model, tmp_path / "export")
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}")
    clip.eval()
    images = torch.randn(3, 3, 64, 64)
    tokens = tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images, normalize=True), model.encode_image(images), atol=0, rtol=0)
        torch.testing.assert_close(clip.encode_text(tokens, normalize=True), model.encode_text(tokens), atol=1e-6, rtol=0)
        assert float(clip.logit_scale) == float(model.logit_scale)
    reloaded = load_model(tmp_path / "export").eval()
    assert reloaded.model_name == "alip-tiny"
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), model.encode_image(images), atol=0, rtol=0)
    assert json.loads((tmp_path / "export" / "open_clip_config.json").read_text())["preprocess_cfg"]["size"] == 64


def test_forward_shares_one_text_encoder():
    model = create_model("alip-micro").eval()
    tok = get_tokenizer(model)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), tok(["a", "b c"]), tok(["a", "d e f"]))
    torch.testing.assert_close(out["raw"][0], out["caption"][0])  # same text -> same embedding
    with pytest.raises(ValueError, match="rows but there are 2 images"):
        model(torch.randn(2, 3, 32, 32), tok(["a"]), tok(["a", "b"]))


def test_train_transform_is_the_official_augmentation():
    from PIL import Image
    t = image_transform("alip-tiny", train=True)
    crop = t.transforms[0]
    assert crop.scale == (0.7, 1.0) and crop.ratio == (0.8, 1.25) and crop.size == (64, 64)
    assert tuple(t(Image.new("RGB", (80, 100))).shape) == (3, 64, 64)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing export directory nor a known config"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no open_clip_config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="unknown model config"):
        create_model("ViT-Z-99")
