"""Captioner protocol, specs and the `hf` backend on tiny random BLIP / GIT models built offline."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from alip.captioners import (
    BLIP_LARGE,
    Captioner,
    CaptionerConfig,
    CaptionerError,
    clean_caption,
    load_captioner,
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
    assert cfg.name.startswith("Salesforce/blip-image-captioning-large[beams=1,")
    assert "prompt='a picture of '" in cfg.name and "size=384" in cfg.name


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
    assert cap.name == f"{tiny_dirs[kind]}[beams=2,max_new=5,min_new=0]"
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
    raw = cap.processor.batch_decode(
        cap.model.generate(**cap._inputs(images[:1]), **cap._generate_kwargs()), skip_special_tokens=True
    )[0]
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
    assert cap._inputs(images[:1])["pixel_values"].shape[-2:] == (48, 48)
    assert len(cap.caption(images[:2])) == 2


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
