"""Captioner protocol, specs and the `hf` backend on tiny random BLIP / GIT models built offline."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import numpy as np
import pytest
import torch
from PIL import Image

from alip.captioners import (
    BLIP_LARGE,
    Captioner,
    CaptionerConfig,
    CaptionerError,
    Preparer,
    captioner_id,
    clean_caption,
    load_captioner,
    load_preparer,
    parse_spec,
)
from alip.captioners import hf as hf_backend
from alip.captioners.tiny import SPECIAL_TOKENS, build_word_tokenizer, tiny_blip, tiny_git

WORDS = "a an the of picture photo red green blue circle square triangle on left right top small large , .".split()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    tok = build_word_tokenizer(WORDS)
    dirs = {}
    for name, build in (("blip", tiny_blip), ("git", tiny_git)):
        kwargs = dict(vision_hidden=32, text_hidden=32, heads=2) if name == "blip" else {}
        model, processor = build(tok, **kwargs) if name == "git" else build(tok, image_size=32, **kwargs)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        dirs[name] = str(root / name)
    dirs["vocab"] = tok.get_vocab()
    return dirs


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40 + 7 * i, 30 + 5 * i), (60 * i, 255 - 60 * i, 30 * i)) for i in range(4)]


# ----------------------------------------------------------------------------------- specs


def test_parse_spec_presets_and_backends(tmp_path):
    blip = parse_spec("blip-large")
    assert blip == BLIP_LARGE
    assert (blip.backend, blip.model) == ("hf", "Salesforce/blip-image-captioning-large")
    assert (blip.image_size, blip.num_beams, blip.min_new_tokens, blip.max_new_tokens) == (384, 3, 5, 20)
    assert blip.prompt == "a picture of "
    hf = parse_spec("hf:org/some-captioner")
    assert (hf.backend, hf.model, hf.prompt) == ("hf", "org/some-captioner", None)
    ofa = parse_spec(f"ofa:{tmp_path}")
    assert (ofa.backend, ofa.model) == ("ofa", str(tmp_path))
    assert (ofa.num_beams, ofa.max_new_tokens, ofa.no_repeat_ngram_size, ofa.image_size) == (5, 16, 3, 480)
    assert ofa.prompt == " what does the image describe?"
    builtin = parse_spec("builtin")
    assert builtin.backend == "hf" and builtin.label.startswith("builtin@")


@pytest.mark.parametrize("spec", ["", "blip", "hf:", "ofa:  ", "foo:bar", "openai/clip"])
def test_bad_spec_is_a_clear_error(spec):
    with pytest.raises(CaptionerError) as err:
        parse_spec(spec)
    msg = str(err.value)
    assert "spec" in msg and ("builtin" in msg or "names no model" in msg or "non-empty" in msg)


def test_config_validation_and_overrides():
    with pytest.raises(CaptionerError, match="dtype"):
        CaptionerConfig(backend="hf", model="x", dtype="fp8")
    with pytest.raises(CaptionerError, match="min_new_tokens"):
        CaptionerConfig(backend="hf", model="x", min_new_tokens=30, max_new_tokens=20)
    with pytest.raises(CaptionerError, match="backend"):
        CaptionerConfig(backend="onnx", model="x")
    with pytest.raises(CaptionerError, match="unknown captioner setting"):
        BLIP_LARGE.with_overrides(beams=4)
    cfg = BLIP_LARGE.with_overrides(num_beams=1)
    assert cfg.num_beams == 1 and BLIP_LARGE.num_beams == 3
    assert cfg.name.startswith("Salesforce/blip-image-captioning-large[dtype=fp32,beams=1,")
    assert "prompt='a picture of '" in cfg.name and "size=384" in cfg.name
    # Everything that changes a caption is in the id: dtype (half precision by default on CUDA).
    assert captioner_id(cfg) == cfg.name
    assert captioner_id(cfg.with_overrides(device="cuda")) == cfg.name.replace("dtype=fp32", "dtype=fp16")
    assert captioner_id(cfg.with_overrides(device="cuda", dtype="fp32")) == cfg.name
    assert len({captioner_id(cfg.with_overrides(**kw)) for kw in (
        {}, {"dtype": "bf16"}, {"image_size": 256}, {"max_new_tokens": 9}, {"prompt": "x"}, {"no_repeat_ngram_size": 2},
    )}) == 6


def test_missing_local_dir_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    for spec in (f"hf:{missing}", f"ofa:{missing}"):
        with pytest.raises(CaptionerError) as err:
            load_captioner(spec)
        assert str(missing) in str(err.value) and "does not exist" in str(err.value)


def test_directory_without_model_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(CaptionerError, match="config"):
        load_captioner(f"hf:{tmp_path}")


def test_clean_caption():
    assert clean_caption("  a picture of   a red\n circle ", "a picture of ") == "a red circle"
    assert clean_caption("A Picture Of a cat", "a picture of") == "a cat"
    assert clean_caption("a dog", "a picture of ") == "a dog"
    assert clean_caption("  two\tcats ") == "two cats"


# ----------------------------------------------------------------------------------- hf backend


def test_tiny_tokenizer_vocab_is_ours(tiny_dirs):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dirs["blip"])
    vocab = processor.tokenizer.get_vocab()
    assert vocab == tiny_dirs["vocab"]
    assert list(vocab)[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS or sorted(vocab.values()) == list(range(len(vocab)))
    assert len(vocab) == len(SPECIAL_TOKENS) + len(set(WORDS))
    ids = processor.tokenizer("A red circle")["input_ids"]
    assert processor.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "circle", "[SEP]"]


@pytest.mark.parametrize("kind,cls_name", [("blip", "BlipForConditionalGeneration"), ("git", "GitForCausalLM")])
def test_hf_local_dir_generates_deterministic_captions(tiny_dirs, images, kind, cls_name):
    cap = load_captioner(f"hf:{tiny_dirs[kind]}", num_beams=2, max_new_tokens=5)
    assert isinstance(cap, Captioner)
    assert cap.load_route == "AutoModelForImageTextToText"  # both load via the v5 auto class
    assert type(cap.model).__name__ == cls_name
    assert cap.name == f"{tiny_dirs[kind]}[dtype=fp32,beams=2,max_new=5,min_new=0]"
    out = cap.caption(images)
    assert len(out) == len(images) and all(isinstance(c, str) for c in out)
    assert all(len(c.split()) <= 5 for c in out)
    assert any(c for c in out), "a random model still emits some tokens"
    assert all(c == " ".join(c.split()) for c in out)  # cleaned: no stray whitespace
    assert cap.caption(images) == out
    assert load_captioner(f"hf:{tiny_dirs[kind]}", num_beams=2, max_new_tokens=5).caption(images) == out
    assert cap.caption([]) == []


@pytest.mark.parametrize("kind", ["blip", "git"])
def test_hf_prompt_and_generation_settings(tiny_dirs, images, kind):
    prompt = "a picture of "
    cap = load_captioner(f"hf:{tiny_dirs[kind]}", prompt=prompt, num_beams=1, max_new_tokens=3, min_new_tokens=3)
    out = cap.caption(images[:2])
    assert len(out) == 2
    # min_new_tokens == max_new_tokens == 3 word-level tokens after the stripped prompt
    for c in out:
        assert not c.lower().startswith("a picture of")
        assert 1 <= len(c.split()) <= 3
    inputs = {k: torch.from_numpy(v) for k, v in cap.prepare(images[:1]).items()}
    raw = cap.processor.batch_decode(cap.model.generate(**inputs, **cap._generate_kwargs()),
                                     skip_special_tokens=True)[0]
    assert raw.startswith("a picture of"), raw  # the model really was prompted; clean_caption strips it


def test_hf_batching_and_input_checks(tiny_dirs, images):
    cap = load_captioner(f"hf:{tiny_dirs['blip']}", num_beams=1, max_new_tokens=4, batch_size=3)
    assert cap.caption(images) == load_captioner(
        f"hf:{tiny_dirs['blip']}", num_beams=1, max_new_tokens=4, batch_size=8
    ).caption(images)
    with pytest.raises(CaptionerError, match="PIL"):
        cap.caption([images[0], "not an image"])
    with pytest.raises(CaptionerError, match="list"):
        cap.caption(images[0])


def test_hf_dtype_and_device_checks(tiny_dirs, images):
    cap = load_captioner(f"hf:{tiny_dirs['blip']}", dtype="bf16", num_beams=1, max_new_tokens=3)
    assert next(cap.model.parameters()).dtype == torch.bfloat16
    assert len(cap.caption(images[:2])) == 2
    with pytest.raises(CaptionerError, match="fp16.*GPU"):
        load_captioner(f"hf:{tiny_dirs['blip']}", dtype="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(CaptionerError, match="CUDA"):
            load_captioner(f"hf:{tiny_dirs['blip']}", device="cuda")


def test_hf_image_size_override_interpolates(tiny_dirs, images):
    cap = load_captioner(f"hf:{tiny_dirs['blip']}", image_size=48, num_beams=1, max_new_tokens=3)
    assert cap.prepare(images[:1])["pixel_values"].shape[-2:] == (48, 48)
    assert len(cap.caption(images[:2])) == 2


@pytest.mark.parametrize("kind", ["blip", "git"])
def test_prepare_then_generate_equals_caption(tiny_dirs, images, tmp_path, kind):
    """The CPU half needs only the processor (a folder without weights works); any slice of its
    arrays generates exactly what caption() gives for those images."""
    import shutil

    settings = dict(num_beams=2, max_new_tokens=4, prompt="a picture of ")
    cap = load_captioner(f"hf:{tiny_dirs[kind]}", **settings)
    no_weights = tmp_path / "processor-only"
    shutil.copytree(tiny_dirs[kind], no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    prep = load_preparer(f"hf:{no_weights}", **settings)
    assert isinstance(prep, Preparer) and not hasattr(prep, "model")
    inputs = prep.prepare(images)
    assert all(isinstance(v, np.ndarray) and len(v) == len(images) for v in inputs.values())
    assert inputs["pixel_values"].dtype == np.float32  # fp32 on CPU
    assert cap.generate_prepared(inputs) == cap.caption(images)
    assert cap.generate_prepared({k: v[2:4] for k, v in inputs.items()}) == cap.caption(images[2:4])
    # The square side decode may resize to early: BLIP's processor resizes to a square; GIT's
    # crops, so resizing early would distort and is left to the processor.
    assert prep.input_size == (cap.prepare(images[:1])["pixel_values"].shape[-1] if kind == "blip" else None)
    # Half precision (the CUDA default) travels as float16: half the bytes to the GPU actor.
    half = load_preparer(f"hf:{tiny_dirs[kind]}", device="cuda", **settings).prepare(images[:2])
    assert half["pixel_values"].dtype == np.float16
    np.testing.assert_allclose(half["pixel_values"], inputs["pixel_values"][:2], atol=2e-3)


def test_hf_falls_back_to_config_architecture(tiny_dirs, images, monkeypatch):
    monkeypatch.setattr(hf_backend, "auto_class_supports", lambda config: False)
    cap = load_captioner(f"hf:{tiny_dirs['blip']}", num_beams=1, max_new_tokens=3)
    assert cap.load_route == "architectures:BlipForConditionalGeneration"
    assert len(cap.caption(images[:2])) == 2


def test_hf_rejects_non_captioning_model(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(tmp_path)
    build_word_tokenizer(WORDS).save_pretrained(tmp_path)
    with pytest.raises(CaptionerError, match="not an image captioning model"):
        load_captioner(f"hf:{tmp_path}")


def test_hf_loads_from_s3_dir(tiny_dirs, images, s3_bucket, tmp_path, monkeypatch):
    from alip.data.storage import resolve

    monkeypatch.setenv("ALIP_CACHE_DIR", str(tmp_path / "cache"))
    dest = resolve(f"{s3_bucket}/models/blip")
    pafs.copy_files(tiny_dirs["blip"], dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)
    local = load_captioner(f"hf:{tiny_dirs['blip']}", num_beams=2, max_new_tokens=4)
    remote = load_captioner(f"hf:{s3_bucket}/models/blip", num_beams=2, max_new_tokens=4)
    assert remote.source.startswith(str(tmp_path / "cache"))
    assert sorted(os.listdir(remote.source)) == sorted(os.listdir(tiny_dirs["blip"]))
    assert remote.caption(images) == local.caption(images)
    assert remote.name.startswith(f"{s3_bucket}/models/blip[")
    again = load_captioner(f"hf:{s3_bucket}/models/blip/", num_beams=2, max_new_tokens=4)
    assert again.source == remote.source  # cached, not downloaded twice
    with pytest.raises(CaptionerError, match="does not exist or is empty"):
        load_captioner(f"hf:{s3_bucket}/models/nothing-here")


def test_ofa_preparer_resizes_only_and_needs_no_venv(images):
    """OFA's CPU half is a bicubic resize to image_size (uint8); no OFA venv or checkpoint needed."""
    prep = load_preparer(CaptionerConfig(backend="ofa", model="/nowhere", image_size=24, prompt="p"))
    out = prep.prepare(images[:3])
    assert list(out) == ["pixels"] and out["pixels"].shape == (3, 24, 24, 3) and out["pixels"].dtype == np.uint8
    expected = np.asarray(images[1].convert("RGB").resize((24, 24), Image.Resampling.BICUBIC))
    assert (out["pixels"][1] == expected).all()
    with pytest.raises(CaptionerError, match="PIL"):
        prep.prepare([images[0], "x"])
