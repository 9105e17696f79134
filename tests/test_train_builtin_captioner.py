"""scripts/train_builtin_captioner.py on tiny settings: it trains, saves a model that loads through the
hf backend with its measured held-out score, and --init-from continues from a saved model."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import train_builtin_captioner as script  # noqa: E402

from alip.captioners import load_captioner  # noqa: E402

TINY = ["--n-train", "128", "--epochs", "1", "--batch-size", "32", "--eval-n", "20", "--vision-hidden", "32",
        "--vision-layers", "1", "--text-hidden", "32", "--text-layers", "1", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cap") / "model")
    threads = torch.get_num_threads()
    script.main(["--out", out, *TINY])
    torch.set_num_threads(threads)
    return out


def test_saves_a_loadable_model_with_its_heldout_score(trained):
    meta = json.loads(open(os.path.join(trained, "alip_training.json")).read())
    assert meta["train_config"]["n_train"] == 128 and meta["train_config"]["two_object_prob"] == 0.6
    held = meta["heldout"]
    assert held["scenes"] == 20 and held["objects"] >= 20
    assert 0.0 <= held["shape_colour_accuracy"] <= 1.0 and 0.0 <= held["object_count_accuracy"] <= 1.0
    captioner = load_captioner(f"hf:{trained}")
    from PIL import Image
    assert all(isinstance(c, str) and c for c in captioner.caption([Image.new("RGB", (64, 64), "red")]))


def test_init_from_continues_from_the_saved_weights(trained, tmp_path):
    out = str(tmp_path / "continued")
    # lr 0: the continued model must be exactly the one it started from
    script.main(["--out", out, "--init-from", trained, "--lr", "0", "--world-seed", "77", *TINY])
    before, after = load_file(os.path.join(trained, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SystemExit, match="architecture differs"):
        script.main(["--out", str(tmp_path / "bad"), "--init-from", trained, *TINY, "--vision-layers", "2"])
    with pytest.raises(SystemExit, match="architecture differs"):  # same keys, other tensor shapes
        script.main(["--out", str(tmp_path / "bad"), "--init-from", trained, *TINY, "--text-hidden", "64"])
