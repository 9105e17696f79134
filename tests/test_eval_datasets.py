"""Registry and loaders: the paper's dataset lists, local layouts, and the missing-dataset error."""

import json

import numpy as np
import pytest
from PIL import Image

from alip.eval.datasets import DatasetFormatError, DatasetNotFoundError, load_split
from alip.eval.metrics import CLASSIFICATION_METRICS
from alip.eval.registry import (LINEAR_PROBE_26, REGISTRY, SUITES, ZEROSHOT_11, UnknownDatasetError, expand_tasks,
                                get_spec)
from alip.eval.zeroshot import PROMPT_SETS


def test_registry_matches_the_paper():
    assert len(LINEAR_PROBE_26) == 26 and len(ZEROSHOT_11) == 11
    assert LINEAR_PROBE_26[0] == "food101" and LINEAR_PROBE_26[-1] == "imagenet"  # Table 6 column order
    metrics = {d: get_spec(d).metric for d in LINEAR_PROBE_26}
    assert {d for d, m in metrics.items() if m == "mean_per_class"} == {"aircraft", "pets", "caltech101", "flowers"}
    assert metrics["voc2007"] == "map11" and metrics["hateful_memes"] == "roc_auc"
    assert metrics["kinetics700"] == "mean_top1_top5"
    assert sum(m == "accuracy" for m in metrics.values()) == 19
    assert all(m in CLASSIFICATION_METRICS for m in metrics.values())
    for d in ZEROSHOT_11:  # every zero-shot set has its Table 4 prompt set
        assert get_spec(d).prompt_set in PROMPT_SETS and "zeroshot" in get_spec(d).protocols
    assert get_spec("world-shape").prompt_set == "world" in PROMPT_SETS
    assert all(s.source for s in REGISTRY.values())


def test_expand_tasks():
    assert expand_tasks(["zeroshot-11"]) == [("zeroshot", d) for d in ZEROSHOT_11]
    assert len(expand_tasks(["linear-probe-26", "linear_probe:cifar10"])) == 26  # duplicates dropped
    assert expand_tasks(["cifar10"]) == [("linear_probe", "cifar10"), ("zeroshot", "cifar10")]
    assert expand_tasks(["lp:Memes", "retrieval:coco"]) == [("linear_probe", "hateful_memes"), ("retrieval", "mscoco")]
    assert ("retrieval", "world-retrieval") in expand_tasks(["world"])
    assert set(SUITES) >= {"zeroshot-11", "linear-probe-26", "retrieval", "world"}
    with pytest.raises(UnknownDatasetError, match="unknown dataset 'cifar11'.*Known"):
        expand_tasks(["cifar11"])
    with pytest.raises(UnknownDatasetError, match="does not support zeroshot"):
        expand_tasks(["zeroshot:mnist"])
    with pytest.raises(UnknownDatasetError, match="unknown protocol"):
        expand_tasks(["finetune:mnist"])


def test_missing_dataset_error_names_layout_and_source(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_split("pets", "test", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "pets" / "test") + "/<class>/<image>" in msg  # ImageFolder layout
    assert str(tmp_path / "wds" / "vtab-pets") in msg and "nshards.txt" in msg  # CLIP_benchmark layout
    assert "clip-benchmark/wds_vtab-pets" in msg and "OxfordIIITPet" in msg  # where to get it
    assert "ALIP_EVAL_DATA" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(DatasetNotFoundError, match="dataset_coco.json"):
        load_split("mscoco", "test", tmp_path)


def test_data_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIP_EVAL_DATA", str(tmp_path / "from-env"))
    with pytest.raises(DatasetNotFoundError, match="from-env"):
        load_split("dtd", "test")


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_imagefolder_layout_with_classnames_and_val_fallback(tmp_path):
    for split in ("train", "val"):  # ImageNet-style: no test/, val is the test split
        for c, folder in enumerate(["n01_tench", "n02_goldfish"]):
            for i in range(3):
                _png(tmp_path / "imagenet" / split / folder / f"{i}.png", (c * 100, 0, 0))
    train = load_split("imagenet", "train", tmp_path)
    assert train.classnames == ["n01 tench", "n02 goldfish"] and list(np.bincount(train.labels)) == [3, 3]
    (tmp_path / "imagenet" / "classnames.txt").write_text("tench\ngoldfish\n")
    test = load_split("imagenet", "test", tmp_path)
    assert test.classnames == ["tench", "goldfish"] and test.layout.endswith("imagenet/val")
    assert test.images[0].size == (8, 8) and test.images[5].getpixel((0, 0)) == (100, 0, 0)
    (tmp_path / "imagenet" / "classnames.txt").write_text("tench\n")
    with pytest.raises(DatasetFormatError, match="one name per folder"):
        load_split("imagenet", "test", tmp_path)


def test_karpathy_json_layout(tmp_path):
    base = tmp_path / "flickr30k"
    images = []
    for i, split in enumerate(["train", "test", "test", "val"]):
        _png(base / "flickr30k-images" / f"{i}.jpg", (i * 50, 0, 0))
        images.append({"filename": f"{i}.jpg", "split": split,
                       "sentences": [{"raw": f"caption {j} of image {i}"} for j in range(5)]})
    (base / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    split = load_split("flickr30k", "test", tmp_path)
    assert len(split) == 2 and split.captions[0][4] == "caption 4 of image 1"
    texts, owners = split.texts_and_owners
    assert len(texts) == 10 and list(owners) == [0] * 5 + [1] * 5
    (base / "flickr30k-images" / "2.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match="2.jpg"):
        load_split("flickr30k", "test", tmp_path)


def test_world_splits_are_disjoint_and_sized():
    train = load_split("world-pattern", "train", world_n=12)
    test = load_split("world-pattern", "test", world_n=8)
    assert len(train) == 12 and len(test) == 8 and train.classnames == test.classnames
    assert not np.array_equal(np.asarray(train.images[0]), np.asarray(test.images[0]))
    ret = load_split("world-retrieval", "test", world_n=5)
    assert len(ret) == 5 and all(len(c) == 3 for c in ret.captions)
    assert "background" in ret.captions[0][0] and "background" not in ret.captions[0][2]


def _upload(local, uri):
    import pyarrow.fs as pafs

    from alip.data.storage import resolve

    dest = resolve(uri)
    pafs.copy_files(str(local), dest.path, destination_filesystem=dest.fs)


def test_s3_data_root_reads_the_same_data_and_results_go_to_s3(tmp_path, s3_bucket, monkeypatch):
    """A cluster job's workers see no local eval data: an s3:// data root is read through pyarrow's
    S3 filesystem (the local S3 server here), cached per dataset, and results may go to s3:// too."""
    from alip.data.storage import resolve
    from alip.eval.runner import main
    from alip.model import create_model, export_open_clip

    local = tmp_path / "local"
    for split in ("train", "val"):
        for c, folder in enumerate(["n01_tench", "n02_goldfish"]):
            for i in range(3):
                _png(local / "imagenet" / split / folder / f"{i}.png", (c * 100, i * 30, 0))
    base = local / "flickr30k"
    images = []
    for i in range(3):
        _png(base / "flickr30k-images" / f"{i}.jpg", (i * 50, 0, 0))
        images.append({"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": f"c{j} of {i}"} for j in range(5)]})
    (base / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    _upload(local, f"{s3_bucket}/eval")
    monkeypatch.setenv("ALIP_EVAL_CACHE", str(tmp_path / "cache"))

    root = f"{s3_bucket}/eval"
    for name, split in (("imagenet", "test"), ("imagenet", "train"), ("flickr30k", "test")):
        remote, here = load_split(name, split, root), load_split(name, split, local)
        assert len(remote) == len(here) > 0
        assert [np.asarray(remote.images[i]).tolist() for i in range(len(remote))] == \
               [np.asarray(here.images[i]).tolist() for i in range(len(here))]
        assert getattr(remote, "classnames", None) == getattr(here, "classnames", None)
    assert (tmp_path / "cache" / "s3" / s3_bucket[5:] / "eval" / "imagenet" / "val" / "n02_goldfish" / "2.png").is_file()
    with pytest.raises(DatasetNotFoundError, match=rf"(?s)under data root {s3_bucket}/eval .*{s3_bucket}/eval/dtd/test/<class>"):
        load_split("dtd", "test", root)

    export = export_open_clip(create_model("alip-micro"), tmp_path / "export")
    out = f"{s3_bucket}/results/run1"
    assert main(["--checkpoint", str(export), "--datasets", "zeroshot:imagenet", "retrieval:flickr30k",
                 "--data-root", root, "--out", out, "--no-ray", "--batch-size", "8", "--name", "M"]) == 0
    loc = resolve(out)
    with loc.fs.open_input_stream(loc.path + "/results.json") as f:
        report = json.loads(f.read())
    res = report["models"]["M"]["results"]
    assert res["zeroshot"]["imagenet"]["n_test"] == 6 and res["retrieval"]["flickr30k"]["n_images"] == 3
    assert report["data_root"] == root and not res["errors"]
    with loc.fs.open_input_stream(loc.path + "/results.md") as f:
        assert f.read().decode() == report["table"]
