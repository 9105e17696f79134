"""Our zero-shot top-1 and retrieval Recall@K agree with CLIP_benchmark's own library functions on
the same model and a small generated dataset in CLIP_benchmark's webdataset layout."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

webdataset = pytest.importorskip("webdataset")
cb_builder = pytest.importorskip("clip_benchmark.datasets.builder")
from clip_benchmark.metrics import zeroshot_classification as cb_zsc  # noqa: E402
from clip_benchmark.metrics import zeroshot_retrieval as cb_zsr  # noqa: E402

from alip.eval.datasets import load_split  # noqa: E402
from alip.eval.suite import EvalOptions, evaluate_dataset  # noqa: E402
from alip.eval.zeroshot import get_templates  # noqa: E402
from alip.model import create_model, get_tokenizer, image_transform  # noqa: E402

CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _image(rng, label: int, fmt: str) -> bytes:
    # class-dependent mean colour + noise, so the (random) model's features differ by class
    base = np.array([(label * 53) % 256, (label * 97) % 256, (label * 151) % 256], dtype=float)
    px = np.clip(base + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


def _write_wds(base, split, samples, shards=2, dataset_type=None, classnames=None, templates=None):
    (base / split).mkdir(parents=True)
    per = -(-len(samples) // shards)
    for s in range(shards):
        with webdataset.TarWriter(str(base / split / f"{s}.tar")) as sink:
            for sample in samples[s * per:(s + 1) * per]:
                sink.write(sample)
    (base / split / "nshards.txt").write_text(str(shards))
    if classnames:
        (base / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates:
        (base / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if dataset_type:
        (base / "dataset_type.txt").write_text(dataset_type + "\n")


pytestmark = pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle:UserWarning")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    return create_model("alip-tiny").eval()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(0)
    fmts = ["png", "webp", "jpg"]
    samples = [{"__key__": f"s{i:05d}", fmts[i % 3]: _image(rng, i % 10, fmts[i % 3]), "cls": i % 10}
               for i in range(60)]
    # CLIP_benchmark's export ships '{c}' templates; ours come from the prompt set (Table 4) instead
    _write_wds(root / "wds" / "cifar10", "test", samples, classnames=CLASSNAMES, templates=["a photo of a {c}."])
    words = ["red", "green", "blue", "small", "large", "round", "square", "bright", "dark", "striped"]
    ret = []
    for i in range(24):
        caps = [f"a {words[i % 10]} {words[(i // 10 + j) % 10]} thing number {i % 7}" for j in range(3 + i % 3)]
        ret.append({"__key__": f"r{i:05d}", "png": _image(rng, i % 10, "png"), "txt": "\n".join(caps)})
    _write_wds(root / "wds" / "mscoco_captions", "test", ret, dataset_type="retrieval")
    return root


def test_zeroshot_agrees_with_clip_benchmark(model, data_root):
    ours = evaluate_dataset(model, "cifar10", ["zeroshot"], EvalOptions(data_root=str(data_root), batch_size=16))
    ours = ours["zeroshot"]
    assert ours["n_test"] == 60 and ours["n_templates"] == 18  # the CIFAR prompt set of Table 4

    tokenizer, transform = get_tokenizer(model), image_transform(model, train=False)
    ds = cb_builder.build_dataset("wds/cifar10", root=str(data_root / "wds" / "cifar10"), transform=transform,
                                  split="test", task="zeroshot_classification")
    loader = torch.utils.data.DataLoader(ds.batched(16), batch_size=None)
    templates = [t.replace("{label}", "{c}") for t in get_templates("cifar10")]
    # CLIP_benchmark's own classifier + classification loop give the reference logits. Its
    # evaluate()/accuracy() wrapper cannot run here: accuracy() calls float() on a 1-element array,
    # which numpy 2.4 rejects, so top-k is read off its logits the way accuracy() does.
    classifier = cb_zsc.zero_shot_classifier(model, tokenizer, CLASSNAMES, templates, "cpu", amp=False)
    logits, target = cb_zsc.run_classification(model, classifier, loader, "cpu", amp=False)
    pred = logits.topk(5, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    ref_acc1 = correct[:1].float().sum().item() / len(target)
    ref_acc5 = correct[:5].float().sum().item() / len(target)
    ref_mpc = balanced_accuracy_score(target, logits.argmax(axis=1))
    assert 0 < ref_acc1 < ref_acc5 < 1  # a non-degenerate comparison
    assert ours["top1"] == pytest.approx(ref_acc1, abs=1e-9)
    assert ours["top5"] == pytest.approx(ref_acc5, abs=1e-9)
    assert ours["mean_per_class_recall"] == pytest.approx(ref_mpc, abs=1e-9)


def test_retrieval_agrees_with_clip_benchmark(model, data_root):
    ours = evaluate_dataset(model, "mscoco", ["retrieval"], EvalOptions(data_root=str(data_root), batch_size=8))
    ours = ours["retrieval"]
    split = load_split("mscoco", "test", data_root)
    assert ours["n_images"] == 24 and ours["n_texts"] == sum(len(c) for c in split.captions) > 24

    tokenizer, transform = get_tokenizer(model), image_transform(model, train=False)
    ds = cb_builder.build_dataset("wds/mscoco_captions", root=str(data_root / "wds" / "mscoco_captions"),
                                  transform=transform, split="test", task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(ds.batched(8, collation_fn=cb_builder.image_captions_collate_fn),
                                         batch_size=None)
    ref = cb_zsr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        # CLIP_benchmark: "image_retrieval" = text -> image, "text_retrieval" = image -> text;
        # it averages in float32, hence 1e-6 (one hit is 1/24 or 1/~96 here)
        assert ours[f"t2i_r{k}"] == pytest.approx(ref[f"image_retrieval_recall@{k}"], abs=1e-6)
        assert ours[f"i2t_r{k}"] == pytest.approx(ref[f"text_retrieval_recall@{k}"], abs=1e-6)
    assert ours["i2t_r10"] > ours["i2t_r1"]  # not a degenerate all-0 / all-1 comparison
