"""The open_clip-based model: trimmed text encoding is exact; exports load with open_clip's own API."""
import json
import logging
import subprocess
import sys

import numpy as np
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


@pytest.mark.parametrize("name,patch", [("ViT-B-32", 32), ("ViT-B-16", 16)])
def test_built_vit_b_models_have_the_paper_table_3_shapes(name, patch):
    # The modules we actually build and train (not open_clip's config JSON): Table 3's ViT-B
    # image encoder and 12-layer 512-wide text encoder, embedding 512.
    model = create_model(name)
    visual, clip = model.clip.visual, model.clip
    assert visual.conv1.kernel_size == (patch, patch) and visual.conv1.out_channels == 768
    assert model.image_size == 224 and visual.positional_embedding.shape[0] == (224 // patch) ** 2 + 1
    assert len(visual.transformer.resblocks) == 12 and visual.transformer.resblocks[0].attn.num_heads == 12
    assert len(clip.transformer.resblocks) == 12 and clip.transformer.width == 512
    assert clip.transformer.resblocks[0].attn.num_heads == 8
    with torch.no_grad():
        out = model.encode_image(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 512) and clip.text_projection.shape == (512, 512)


def test_initial_temperature_is_0_07():
    assert float(create_model("alip-micro").logit_scale.exp()) == pytest.approx(1 / 0.07, rel=1e-5)


def test_export_loads_with_open_clip_public_api(tmp_path):
    torch.manual_seed(0)
    model = create_model("alip-tiny").eval()
    export_open_clip(model, tmp_path / "export")
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    # open_clip's own eval preprocessing of an export is ours (resize + centre crop + CLIP mean/std)
    from PIL import Image

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    torch.testing.assert_close(preprocess(photo), image_transform(model, train=False)(photo), atol=1e-6, rtol=0)
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
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no open_clip_config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="unknown model config"):
        create_model("ViT-Z-99")


def test_random_init_only_when_asked_for(tmp_path, monkeypatch):
    # a missing path that happens to be a config name is an error (with the way to ask for random)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="'alip-tiny' does not exist.*pass random:alip-tiny"):
        load_model("alip-tiny")
    torch.manual_seed(0)
    a = load_model("random:alip-tiny")
    torch.manual_seed(0)
    b = load_model("alip-tiny", random_init=True)
    assert a.model_name == b.model_name == "alip-tiny"
    torch.testing.assert_close(a.clip.visual.conv1.weight, b.clip.visual.conv1.weight)
    with pytest.raises(ModelLoadError, match="'ViT-Z-99', which is not a known model config"):
        load_model("random:ViT-Z-99")
    # an export dir named like a config still loads as the export, not as a random model
    torch.manual_seed(1)
    export_open_clip(create_model("alip-micro"), tmp_path / "alip-tiny")
    assert load_model("alip-tiny").model_name == "alip-micro"


def test_import_has_no_logging_side_effects_and_the_random_init_warning_is_scoped(caplog):
    code = ("import logging; root = logging.getLogger(); before = list(root.filters); import alip.model; "
            "assert root.filters == before, root.filters; print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr
    root_filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        create_model("alip-micro")
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")  # someone else's
    assert logging.getLogger().filters == root_filters
    # our own random init is silent; the same warning from any other caller still shows
    assert [r.getMessage() for r in caplog.records if "No pretrained weights" in r.getMessage()] == [
        "No pretrained weights loaded for model 'x'. Model initialized randomly."]
