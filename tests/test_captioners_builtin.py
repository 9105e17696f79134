"""The shipped built-in captioner: loads through the hf backend and describes held-out world scenes.

Trained by scripts/train_builtin_captioner.py on world seed 4242; evaluated here on seed 9100,
which it never saw.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from alip.captioners import BUILTIN_MODEL_DIR, load_captioner
from alip.captioners.world_eval import evaluate_on_world, score_captions


@pytest.fixture(scope="module")
def builtin():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield load_captioner("builtin")
    torch.set_num_threads(old)


def test_builtin_is_small_and_documented():
    files = os.listdir(BUILTIN_MODEL_DIR)
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= set(files)
    size = sum(os.path.getsize(BUILTIN_MODEL_DIR / f) for f in files)
    assert size < 5e6, f"builtin model is {size / 1e6:.1f} MB"
    meta = json.loads((BUILTIN_MODEL_DIR / "alip_training.json").read_text())
    assert meta["train_config"]["world_seed"] != 9100
    assert meta["heldout"]["shape_colour_accuracy"] >= 0.9 and meta["heldout"]["pattern_mentions"] == 0


def test_builtin_names_shape_and_colour_on_heldout_world(builtin):
    assert builtin.name.startswith("builtin@") and builtin.load_route == "AutoModelForImageTextToText"
    score = evaluate_on_world(builtin, n=200, seed=9100)
    print(f"builtin captioner on 200 held-out scenes: shape+colour {score.shape_colour_accuracy:.1%} of "
          f"{score.objects} objects, {score.main_shape_colour_accuracy:.1%} of main objects; "
          f"full main-object phrase {score.main_object_full_accuracy:.1%}, "
          f"right object count {score.object_count_accuracy:.1%}")
    assert score.objects > 200  # some scenes have two objects; both count
    # Measured for the shipped model on these 200 scenes: 96.5% of all 260 objects, 99.5% of main
    # objects, 100% right object counts (97.0% / 99.25% on world seed 9001's 400 scenes). The
    # remaining misses are shapes of small objects (see scripts/train_builtin_captioner.py).
    assert score.shape_colour_accuracy >= 0.90  # the brief's target, over *all* objects
    assert score.main_shape_colour_accuracy >= 0.95
    assert score.object_count_accuracy >= 0.97  # neither misses nor invents objects
    assert score.pattern_mentions == 0  # like a real captioner, it never describes the fill pattern


def test_score_captions_parses_objects():
    rows = [
        dict(shape="circle", colour="red", size="large", position="left", second_shape="square",
             second_colour="blue", second_position="top"),
        dict(shape="star", colour="green", size="small", position="center", second_shape=None),
    ]
    captions = ["a large red circle on the left and a small green square at the top on a gray background",
                "a small green star in the center, striped"]
    s = score_captions(captions, rows)
    assert (s.objects, s.shape_colour_correct, s.scenes, s.size_position_correct, s.pattern_mentions) == (3, 2, 2, 2, 1)
    assert s.main_shape_colour_correct == 2 and s.object_count_correct == 2
    # a missed second object and an invented one both count as a wrong number of objects
    wrong = ["a large red circle on the left on a gray background",
             "a small green star in the center and a large blue cross at the top"]
    assert score_captions(wrong, rows).object_count_correct == 0
    with pytest.raises(ValueError):
        score_captions(captions[:1], rows)
