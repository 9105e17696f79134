import hashlib
import io
import os
import re
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alip.data.dataset import list_shards, read_dataset, read_json
from alip.data.images import decode_image
from alip.data.schema import validate_table
from alip.data.world import (
    ATTRIBUTE_WORDS,
    BACKGROUNDS,
    COLOURS,
    PATTERNS,
    SHAPES,
    WORLD_TASKS,
    describe,
    generate_world,
    world_eval_split,
    world_table,
)


@pytest.fixture(scope="module")
def world2k():
    start = time.perf_counter()
    table = world_table(2000, noise=0.3, seed=7)
    elapsed = time.perf_counter() - start
    print(f"\nworld: 2000 samples in {elapsed:.2f}s ({2000 / elapsed:.0f} samples/s, one process)")
    assert 2000 / elapsed > 150, "world generation became pathologically slow"
    return table.to_pylist()


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def test_generation_is_deterministic_and_independent_of_sharding(tmp_path):
    a = generate_world(str(tmp_path / "a"), n=300, noise=0.3, seed=5, shard_size=128, log=None)
    b = generate_world(str(tmp_path / "b"), n=300, noise=0.3, seed=5, shard_size=128, log=None)
    assert [os.path.basename(s) for s in a["shards"]] == [f"world-0000{i}.parquet" for i in range(3)]
    for sa, sb in zip(a["shards"], b["shards"]):
        assert open(sa, "rb").read() == open(sb, "rb").read()  # byte-identical Parquet
    # other shard size, two worker processes: same samples
    c = generate_world(str(tmp_path / "c"), n=300, noise=0.3, seed=5, shard_size=1000, workers=2, log=None)
    assert len(c["shards"]) == 1
    assert read_dataset(str(tmp_path / "c")).equals(read_dataset(str(tmp_path / "a")))
    # another seed: other samples, other keys
    d = read_dataset(generate_world(str(tmp_path / "d"), n=20, seed=6, log=None)["out"])
    assert d.column("key").to_pylist()[:2] == ["0006-00000000", "0006-00000001"]
    assert d.column("image").to_pylist() != read_dataset(str(tmp_path / "a")).column("image").to_pylist()[:20]
    assert read_json(str(tmp_path / "a" / "_world.json"))["shards"] == [os.path.basename(s) for s in a["shards"]]


def test_output_follows_dataset_schema_and_refuses_stale_shards(tmp_path, capsys):
    summary = generate_world(str(tmp_path / "w"), n=30, noise=0.5, seed=0, shard_size=16)
    out = capsys.readouterr().out
    assert "[world] shard 2/2" in out and "[world] done: 30 samples" in out
    table = pq.read_table(summary["shards"][0])
    validate_table(table)
    assert table.column("key").to_pylist()[0] == "0000-00000000"
    with pytest.raises(ValueError, match="already holds 2 shard"):
        generate_world(str(tmp_path / "w"), n=10, log=None)
    generate_world(str(tmp_path / "w"), n=10, overwrite=True, log=None)
    assert len(list_shards(str(tmp_path / "w"))) == 1
    for bad, match in [(dict(n=0), "n must be"), (dict(noise=1.5), "noise must be"),
                       (dict(seed=10000), "seed must be"), (dict(shard_size=0), "shard_size")]:
        with pytest.raises(ValueError, match=match):
            generate_world(str(tmp_path / "x"), **{"n": 5, **bad}, log=None)


def test_noise_fraction_and_pattern_mentions(world2k):
    related = np.array([r["raw_text_related"] for r in world2k])
    # binomial sd at n=2000 is ~0.01: 4 sd tolerance
    assert abs((~related).mean() - 0.3) < 0.04
    mentions = np.array([r["raw_text_mentions_pattern"] for r in world2k])
    assert not mentions[~related].any()
    assert abs(mentions[related].mean() - 0.5) < 0.05
    assert all(world_table(50, noise=0.0, seed=1).column("raw_text_related").to_pylist())
    assert not any(world_table(50, noise=1.0, seed=1).column("raw_text_related").to_pylist())
    assert len({r["raw_text"] for r in world2k if not r["raw_text_related"]}) > 200  # varied noise


def test_two_object_share_defaults_to_world_and_is_adjustable(world2k):
    # Datasets use TWO_OBJECT_PROB (0.3); the captioner's training script asks for more.
    two = np.array([r["n_objects"] == 2 for r in world2k])
    assert abs(two.mean() - 0.3) < 0.04
    assert world_table(20, seed=3).equals(world_table(20, seed=3, two_object_prob=0.3))
    denser = world_table(1000, noise=0.0, seed=3, two_object_prob=0.6).column("n_objects").to_pylist()
    assert abs(np.mean(np.array(denser) == 2) - 0.6) < 0.06
    assert set(world_table(30, seed=3, two_object_prob=0.0).column("n_objects").to_pylist()) == {1}


def test_raw_texts_are_noise_or_truthful(world2k):
    colour_words, shape_words = set(COLOURS), set(SHAPES)
    pattern_words = {"plain": {"plain", "solid"}, "striped": {"striped", "stripy"},
                     "dotted": {"dotted", "polka", "spotted"}, "checkered": {"checkered", "checkerboard"}}
    for r in world2k:
        words = _words(r["raw_text"])
        if not r["raw_text_related"]:
            assert not words & ATTRIBUTE_WORDS, r["raw_text"]
            continue
        assert words & ATTRIBUTE_WORDS, r["raw_text"]
        assert words & colour_words <= {r["colour"]}, (r["raw_text"], r["colour"])
        assert words & shape_words <= {r["shape"]}, (r["raw_text"], r["shape"])
        said = {p for p, ws in pattern_words.items() if words & ws}
        assert said == ({r["pattern"]} if r["raw_text_mentions_pattern"] else set()), r["raw_text"]


def test_labels_match_descriptions(world2k):
    for r in world2k:
        d = r["description"]
        assert d == describe(r, include_pattern=True)
        assert d.startswith(f"a {r['size']} {r['colour']} {r['pattern']} {r['shape']} ")
        assert d.endswith(f"on a {r['background']} background")
        assert (" and a small " in d) == (r["n_objects"] == 2) == (r["second_shape"] is not None)
        caption = describe(r)
        assert not _words(caption) & {p for p in PATTERNS}, caption
        assert r["colour"] in caption and r["shape"] in caption and r["size"] in caption
    counts = {s: sum(r["shape"] == s for r in world2k) for s in SHAPES}
    assert min(counts.values()) > 2000 / len(SHAPES) * 0.7
    assert 0.2 < np.mean([r["n_objects"] == 2 for r in world2k]) < 0.4


def test_pixels_match_labels(world2k):
    for r in world2k[:300]:
        px = np.asarray(decode_image(r["image"])).astype(int)
        assert px.shape == (64, 64, 3)
        bg = np.array(BACKGROUNDS[r["background"]])
        assert np.abs(px[0, 0] - bg).max() <= 12 and np.abs(px[63, 63] - bg).max() <= 12
        near = np.linalg.norm(px - np.array(COLOURS[r["colour"]]), axis=-1) < 30
        assert near.sum() >= 15, r["description"]


def test_eval_splits_are_deterministic_balanced_and_held_out():
    for task, names in WORLD_TASKS.items():
        images, labels, classnames = world_eval_split(task, n=2 * len(names) + 1, seed=0)
        assert classnames == names and len(images) == len(labels) == 2 * len(names) + 1
        counts = np.bincount(labels, minlength=len(names))
        assert counts.max() - counts.min() <= 1
        assert images[0].mode == "RGB" and images[0].size == (64, 64)
    assert WORLD_TASKS["pattern"] == ["plain", "striped", "dotted", "checkered"]
    assert len(WORLD_TASKS["colour_shape"]) == len(COLOURS) * len(SHAPES)

    a_img, a_lab, _ = world_eval_split("colour", n=60, seed=0)
    b_img, b_lab, _ = world_eval_split("colour", n=60, seed=0)
    c_img, _, _ = world_eval_split("colour", n=60, seed=1)
    assert (a_lab == b_lab).all() and all(x.tobytes() == y.tobytes() for x, y in zip(a_img, b_img))
    assert any(x.tobytes() != y.tobytes() for x, y in zip(a_img, c_img))
    names = WORLD_TASKS["colour"]
    for img, label in zip(a_img, a_lab):  # the labelled colour is really there
        near = np.linalg.norm(np.asarray(img).astype(int) - np.array(COLOURS[names[label]]), axis=-1) < 30
        assert near.sum() >= 15

    def digest(img):
        return hashlib.sha1(np.asarray(img).tobytes()).hexdigest()

    train = {digest(Image.open(io.BytesIO(b))) for b in world_table(300, seed=0).column("image").to_pylist()}
    assert not train & {digest(im) for im in a_img}

    tensors, labels, _ = world_eval_split("shape", n=12, seed=0,
                                          transform=lambda im: __import__("torch").from_numpy(np.asarray(im).copy()))
    assert tuple(tensors.shape) == (12, 64, 64, 3) and labels.dtype == np.int64
    with pytest.raises(ValueError, match="unknown world task 'size'"):
        world_eval_split("size", n=10)


def test_cli_world_generate_prints_progress_then_the_summary_json(tmp_path, capsys):
    import json

    from alip.cli import main

    out = tmp_path / "w"
    assert main(["world", "generate", "--out", str(out), "--n", "40", "--noise", "0.5", "--seed", "3",
                 "--shard-size", "16"]) == 0
    printed = capsys.readouterr().out
    progress, _, doc = printed.partition("{")
    assert "[world] generating 40 samples" in progress and "[world] done: 40 samples" in progress
    summary = json.loads("{" + doc)
    assert summary["n"] == 40 and summary["seed"] == 3 and summary["noise"] == 0.5
    assert [os.path.basename(s) for s in summary["shards"]] == ["world-00000.parquet", "world-00001.parquet",
                                                                 "world-00002.parquet"]
    assert read_dataset(str(out)).num_rows == 40
    # a second run into the same folder is refused with a clear usage error, nothing is lost
    with pytest.raises(SystemExit) as exc:
        main(["world", "generate", "--out", str(out), "--n", "10"])
    assert exc.value.code == 2
    assert "already holds 3 shard(s)" in capsys.readouterr().err
    assert read_dataset(str(out)).num_rows == 40
