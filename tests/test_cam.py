"""`alip cam`: Grad-CAM maps, the pointing game and the grid PNG (fast: no Ray, micro models)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from alip.cam import (CamError, Scene, builtin_scenes, gradcam, grid_size, pointing_game, pointing_hits,
                      preprocess, text_targets, world_mask)
from alip.data.world import BACKGROUNDS, COLOURS, IMAGE_SIZE, render, sample_attrs, world_table
from alip.model import create_model, export_open_clip


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model("alip-micro")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("cam-exports")
    paths = []
    for seed, name in ((0, "alip"), (1, "clip")):
        torch.manual_seed(seed)
        paths.append(str(export_open_clip(create_model("alip-micro"), root / f"demo-{name}" / "export")))
    return paths


# ----------------------------------------------------------------------------- maps

def test_gradcam_is_finite_input_sized_and_depends_on_the_label(micro):
    images, _, _ = builtin_scenes(3)
    x = preprocess(micro, images)
    maps_circle = gradcam(micro, x, text_targets(micro, ["circle"] * 3))
    maps_star = gradcam(micro, x, text_targets(micro, ["star"] * 3))
    assert maps_circle.shape == (3, 32, 32)  # alip-micro: 32-px input, 4x4 patch grid upsampled
    assert torch.isfinite(maps_circle).all() and (maps_circle >= 0).all()
    assert maps_circle.flatten(1).amax(dim=1).gt(0).any(), "all maps are flat: no gradient reached the tokens"
    assert not torch.allclose(maps_circle, maps_star), "the map must explain the similarity to THIS label"
    # Row i is explained against text i only (no mixing across the batch).
    alone = gradcam(micro, x[1:2], text_targets(micro, ["circle"]))
    torch.testing.assert_close(alone[0], maps_circle[1], rtol=1e-4, atol=1e-6)
    assert micro.training, "the model's train/eval mode is restored"
    assert all(p.grad is None for p in micro.parameters()), "no gradients left on the weights"


def test_text_targets_follow_the_label_order(micro):
    t = text_targets(micro, ["star", "circle", "star"])
    assert t.shape == (3, micro.embed_dim)
    torch.testing.assert_close(t[0], t[2])
    assert not torch.allclose(t[0], t[1])
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))


# ----------------------------------------------------------------------------- pointing game

def test_pointing_hits_pass_and_fail_on_a_known_mask():
    mask = np.zeros((1, 16, 16), dtype=bool)
    mask[0, 4:8, 4:8] = True
    inside = np.zeros((1, 16, 16))
    inside[0, 5, 6] = 1.0
    outside = np.zeros((1, 16, 16))
    outside[0, 12, 12] = 1.0
    near = np.zeros((1, 16, 16))
    near[0, 9, 5] = 1.0  # two pixels below the mask
    flat = np.ones((1, 16, 16))
    assert pointing_hits(inside, mask).tolist() == [1]
    assert pointing_hits(outside, mask).tolist() == [0]
    assert pointing_hits(near, mask).tolist() == [0]
    assert pointing_hits(near, mask, tolerance=2).tolist() == [1]
    assert pointing_hits(outside, mask, tolerance=2).tolist() == [0]
    assert pointing_hits(flat, mask).tolist() == [0], "a flat map points nowhere"
    with pytest.raises(CamError):
        pointing_hits(inside, mask[:, :8])


def test_pointing_game_scores_models_and_the_random_baseline():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:2, :] = True  # a quarter of the image
    scenes = [Scene(Image.new("RGB", (8, 8)), "x", mask) for _ in range(4)]
    good = torch.zeros(4, 8, 8)
    good[:, 0, 3] = 1  # always inside
    half = torch.zeros(4, 8, 8)
    half[:2, 1, 1] = 1
    half[2:, 6, 6] = 1  # inside on two images of four
    result = pointing_game({"A": good, "B": half}, scenes)
    assert result.hits == {"A": [1, 1, 1, 1], "B": [1, 1, 0, 0]}
    assert result.baseline == pytest.approx(0.25)
    s = result.summary()
    assert s["models"]["A"] == {"hits": 4, "pct": 100.0} and s["models"]["B"] == {"hits": 2, "pct": 50.0}
    assert s["differences"]["A - B"]["points"] == pytest.approx(50.0)
    assert "A - B: +50.0 points" in result.format()
    # Maps at another resolution are resized to the masks' size before scoring.
    small = torch.zeros(4, 4, 4)
    small[:, 3, 3] = 1
    assert pointing_game({"C": small}, scenes).hits["C"] == [0, 0, 0, 0]


def test_world_masks_are_the_main_object_and_do_not_change_rendering():
    for i in range(20):
        rng_a, rng_b = (np.random.default_rng([7, i]) for _ in range(2))
        attrs = sample_attrs(rng_a, n_objects=1, fixed={"pattern": "plain"})
        assert sample_attrs(rng_b, n_objects=1, fixed={"pattern": "plain"}) == attrs
        plain = render(attrs, rng_a)
        pixels, mask = render(attrs, rng_b, return_mask=True)
        np.testing.assert_array_equal(plain, pixels)
        assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE) and 30 < mask.sum() < IMAGE_SIZE ** 2 / 4
        inside, outside = pixels[mask].astype(int), pixels[~mask].astype(int)
        assert np.abs(inside - COLOURS[attrs["colour"]]).max() <= 12  # the object's (jittered) colour
        assert np.abs(outside - BACKGROUNDS[attrs["background"]]).max() <= 10  # background everywhere else


def test_world_rows_get_their_masks_back_and_other_images_none():
    table = world_table(6, noise=0.5, seed=3)
    from alip.data.images import decode_image

    for row in table.to_pylist():
        image = decode_image(row["image"])
        mask = world_mask(row, image)
        assert mask is not None and mask.any()
        arr = np.asarray(image).copy()
        arr[0, 0] = 255 - arr[0, 0]
        assert world_mask(row, Image.fromarray(arr)) is None, "pixels that do not re-render exactly"
        assert world_mask({**row, "key": "not-a-world-key"}, image) is None


# ----------------------------------------------------------------------------- the command

def _run(argv):
    from alip.cli import main

    return main(["cam"] + argv)


def test_cli_end_to_end_grid_and_pointing_game(exports, tmp_path, capsys):
    out = tmp_path / "cam" / "grid.png"
    assert _run(["--models", *exports, "--names", "ALIP", "CLIP", "--out", str(out), "--n", "3",
                 "--pointing-game", "20"]) == 0
    with Image.open(out) as im:
        assert im.size == grid_size(3, 2) == (408, 478)  # 3 columns and 3 rows of 128-px cells
    summary = json.loads(out.with_suffix(".json").read_text())
    pg = summary["pointing_game"]
    assert pg["n"] == 20 and set(pg["models"]) == {"ALIP", "CLIP"}
    for name, m in pg["models"].items():
        assert m["hits"] == sum(pg["per_image_hits"][name]) and 0 <= m["hits"] <= 20
        assert m["pct"] == pytest.approx(100 * m["hits"] / 20)
    assert pg["differences"]["ALIP - CLIP"]["points"] == pytest.approx(
        pg["models"]["ALIP"]["pct"] - pg["models"]["CLIP"]["pct"])
    assert 1 < pg["random_baseline_pct"] < 25
    text = capsys.readouterr().out
    assert "ALIP - CLIP" in text and "random point" in text and str(out) in text


def test_cli_on_a_world_parquet_dir_with_a_label_template(exports, tmp_path):
    from alip.data.world import generate_world

    data = tmp_path / "world"
    generate_world(str(data), 5, seed=2, log=None)
    out = tmp_path / "grid.png"
    assert _run(["--models", exports[0], "--data", str(data), "--labels", "{colour} {shape}",
                 "--out", str(out), "--n", "2", "--pointing-game", "5", "--tolerance", "2"]) == 0
    with Image.open(out) as im:
        assert im.size == grid_size(2, 1) == (274, 328)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["models"] == {"demo-alip": exports[0]}  # name from runs/<name>/export
    rows = world_table(5, seed=2).to_pylist()
    assert summary["pointing_game"]["labels"] == [f"{r['colour']} {r['shape']}" for r in rows]


def test_cli_rejects_bad_input_clearly(exports, tmp_path, capsys):
    out = str(tmp_path / "g.png")
    cases = [
        (["--labels", "no_such_column_{x}"], "names column 'x'"),
        (["--labels", "a", "b"], "2 labels for 6 images"),
        (["--out", str(tmp_path / "g.jpg")], ".png"),
        (["--models", str(tmp_path / "missing")], "does not exist"),
        (["--templates", "nope"], "unknown prompt set"),
    ]
    for extra, message in cases:
        argv = ["--models", exports[0], "--out", out] + extra
        with pytest.raises(SystemExit) as e:
            _run(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    # The pointing game needs world masks: a dataset of other images is refused, not scored.
    from alip.data.dataset import write_shard
    import io
    import pyarrow as pa

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(buf, format="PNG")
    other = tmp_path / "other"
    write_shard(pa.table({"key": ["x1"], "image": [buf.getvalue()], "raw_text": ["a photo"]}),
                str(other / "part-00000.parquet"))
    with pytest.raises(SystemExit):
        _run(["--models", exports[0], "--data", str(other), "--labels", "a photo", "--out", out, "--n", "1",
              "--pointing-game", "1"])
    assert "not built-in world samples" in capsys.readouterr().err
    # ... but maps of it are fine.
    assert _run(["--models", exports[0], "--data", str(other), "--labels", "a photo", "--out", out, "--n", "1"]) == 0


def test_untrained_reference_model_is_seeded(tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"g{i}.png"
        assert _run(["--models", "random:alip-micro", "--out", str(out), "--n", "1", "--pointing-game", "30",
                     "--seed", "4"]) == 0
        runs.append(json.loads(out.with_suffix(".json").read_text())["pointing_game"]["per_image_hits"])
    assert runs[0] == runs[1]


def test_demo_cam_step(exports, tmp_path, capsys):
    from alip.demo import cam_line, cam_step

    assert cam_step({"alip": {"export": exports[0]}}, tmp_path) is None  # no CLIP trained: no step
    summaries = {"alip": {"export": exports[0], "model": "alip-micro"}, "clip": {"export": exports[1]}}
    summary = cam_step(summaries, tmp_path, pointing_game=12)
    with Image.open(tmp_path / "cam" / "grid.png") as im:
        assert im.size == grid_size(8, 3)  # ALIP, CLIP and the untrained reference
    assert list(summary["pointing_game"]["models"]) == ["ALIP", "CLIP", "untrained"]
    line = cam_line(summary)
    assert str(tmp_path / "cam" / "grid.png") in line and "random point" in line and "n=12" in line
