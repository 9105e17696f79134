"""Issue 25's knobs of the built-in world: raw-text specificity, the noisy captioner (caption error
rate and genericity), the truth every row carries about its texts, the presets and the gate-accuracy
figures. Pure functions plus the real built-in captioner; no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alip.captioners import CaptionerError, load_captioner, load_preparer, parse_spec
from alip.captioners.noisy import CaptionNoise
from alip.data.world import describe, world_table
from alip.data.world_presets import PRESETS, get_preset
from alip.data.world_truth import text_claims, text_truth, truth_columns
from alip.explore.scoring import add_counts, gate_accuracy, gate_accuracy_from_counts, gate_counts

LABEL = {"shape": "circle", "colour": "red", "pattern": "striped"}


def test_text_claims_read_the_main_object_in_every_wording_the_world_uses():
    assert text_claims("my red stripy round thing") == {"shape": "circle", "colour": "red", "pattern": "striped"}
    assert text_claims("Polka dot box!") == {"shape": "square", "colour": None, "pattern": "dotted"}
    # the second object and the background are not the main object's
    assert text_claims("a large blue star on the left and a small red circle at the top on a white background") \
        == {"shape": "star", "colour": "blue", "pattern": None}
    assert text_claims("Northwest trip.") == {"shape": None, "colour": None, "pattern": None}
    assert text_truth("a large blue circle on the left", LABEL) == \
        {"shape": "right", "colour": "wrong", "pattern": "absent"}


@pytest.fixture(scope="module")
def worlds():
    return {s: world_table(1500, noise=0.5, seed=3, specificity=s).to_pylist() for s in (0.0, 1.0)}


def test_specificity_0_is_todays_world_and_1_names_everything(worlds):
    default = world_table(1500, noise=0.5, seed=3).to_pylist()
    assert [r["raw_text"] for r in default] == [r["raw_text"] for r in worlds[0.0]]
    # same images, same relatedness: only the related texts' wording changes
    assert [r["image"] for r in worlds[1.0]] == [r["image"] for r in default]
    assert [r["raw_text_related"] for r in worlds[1.0]] == [r["raw_text_related"] for r in default]
    for spec, rows in worlds.items():
        related = [r for r in rows if r["raw_text_related"]]
        rates = {a: np.mean([r[f"raw_text_mentions_{a}"] for r in related]) for a in ("pattern", "colour", "shape")}
        if spec == 1.0:
            assert rates == {"pattern": 1.0, "colour": 1.0, "shape": 1.0}
        else:  # RAW_TEXT_PATTERN_PROB, 0.65, 0.7 (+ the shape a text falls back to)
            assert 0.45 < rates["pattern"] < 0.55 and 0.6 < rates["colour"] < 0.7 and 0.68 < rates["shape"] < 0.8
        for r in rows:
            truth = text_truth(r["raw_text"], r)
            # raw texts are never wrong; what they name is recorded per row, and unrelated ones name nothing
            assert "wrong" not in truth.values(), r["raw_text"]
            for a in ("pattern", "colour", "shape"):
                assert (truth[a] == "right") == r[f"raw_text_mentions_{a}"], (r["raw_text"], a)


def test_world_knobs_are_checked():
    with pytest.raises(ValueError, match="specificity must be a fraction"):
        world_table(4, specificity=1.5)
    with pytest.raises(ValueError, match="unknown world preset"):
        get_preset("webby")


def _scenes(n=400, seed=0):
    return world_table(n, noise=0.0, seed=seed).to_pylist()


def test_noisy_caption_edits_follow_their_rates():
    rows = _scenes()
    clean = [describe(r) for r in rows]
    rng = np.random.default_rng(0)

    def edited(noise):
        return [noise.apply(c, np.random.default_rng(rng.integers(1 << 62))) for c in clean]

    assert edited(CaptionNoise()) == clean  # nothing asked, nothing changed
    wrong = edited(CaptionNoise(error_rate=1.0))
    assert all(text_truth(c, r)["shape"] != "absent" for c, r in zip(wrong, rows))
    assert all("wrong" in text_truth(c, r).values() for c, r in zip(wrong, rows))  # every caption is now wrong
    generic = edited(CaptionNoise(genericity=1.0))
    for c, r in zip(generic, rows):
        assert text_claims(c) == {"shape": r["shape"], "colour": None, "pattern": None}, c
        assert not any(w in c.split() for w in ("small", "large", "background", "left", "right", "top", "center"))
        assert " and " not in c
    half = edited(CaptionNoise(error_rate=0.3, genericity=0.5))
    wrong_share = np.mean(["wrong" in text_truth(c, r).values() for c, r in zip(half, rows)])
    colour_share = np.mean([text_claims(c)["colour"] is not None for c in half])
    assert 0.22 < wrong_share < 0.38 and 0.4 < colour_share < 0.6


def test_noisy_spec_name_and_errors():
    config = parse_spec("noisy:error=0.2,generic=0.5:builtin")
    assert config.noise == CaptionNoise(0.2, 0.5, 0)
    assert config.name.startswith("noisy(error=0.2,generic=0.5,seed=0)+builtin@")
    assert parse_spec("noisy:error=0.2,generic=0.5,seed=1:builtin").name != config.name  # pinned by its settings
    for bad, message in (("noisy:error=2:builtin", "error_rate must be a fraction"),
                         ("noisy:errors=0.1:builtin", "use error="), ("noisy:error=0.1", "noisy:error=<0..1>"),
                         ("noisy:error=x:builtin", "not a number"),
                         ("noisy:error=0.1:noisy:error=0.1:builtin", "cannot wrap another noisy")):
        with pytest.raises(CaptionerError, match=message):
            parse_spec(bad)


def test_noisy_builtin_captioner_is_deterministic_per_image_and_the_job_halves_agree():
    from alip.data.images import decode_image

    rows = _scenes(24, seed=5)
    images = [decode_image(r["image"]).convert("RGB") for r in rows]
    spec = "noisy:error=0.5,generic=0.5:builtin"
    noisy, plain = load_captioner(spec), load_captioner("builtin")
    captions = noisy.caption(images)
    assert captions == noisy.caption(images)  # a retried or resumed unit writes the same captions
    assert captions[5:9] == noisy.caption(images[5:9])  # per image, not per batch position
    # the caption job prepares on CPU tasks and generates in the actor: the same captions
    preparer = load_preparer(spec)
    assert preparer.name == noisy.name
    assert noisy.generate_prepared(preparer.prepare(images)) == captions
    assert captions != plain.caption(images)
    assert np.mean(["wrong" in text_truth(c, r).values() for c, r in zip(captions, rows)]) > 0.2


def test_truth_columns_say_which_text_is_right_about_what():
    truth = truth_columns(["red striped circle", "Beach day."], ["a large red circle", "a large blue square"],
                          [LABEL, {"shape": "square", "colour": "green", "pattern": "plain"}], [True, False])
    assert truth["raw_text_truth"] == ["shape=right colour=right pattern=right",
                                       "shape=absent colour=absent pattern=absent"]
    assert truth["caption_truth"][1] == "shape=right colour=wrong pattern=absent"
    assert truth["caption_wrong"] == [False, True] and truth["raw_text_unrelated"] == [False, True]
    assert truth["raw_text_adds"] == [True, False]  # the pattern the caption does not name; unrelated adds nothing


def test_gate_accuracy_against_a_hand_count():
    w_s = [0.5, 0.9, 1.0, 1.0, 0.2]
    w_t = [0.2, 1.5, 1.0, 1.0, 0.1]
    w_c = [1.1, 0.5, 1.0, 1.0, 0.3]
    unrelated = [True, False, False, True, True]
    wrong = [False, True, False, False, False]
    adds = [False, True, True, False, False]
    acc = gate_accuracy(w_s, w_t, w_c, unrelated, wrong, adds)
    assert acc["share_caption_over_raw"] == pytest.approx(2 / 5)
    assert acc["lcg_unrelated"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                    "predicted": 3, "positives": 3}
    assert acc["dcg_wrong_caption"]["precision"] == 1.0 and acc["dcg_wrong_caption"]["recall"] == 1.0
    assert acc["dcg_raw_adds"]["recall"] == 0.5
    # counts of two halves add up to the counts of the whole (the explorer streams them)
    halves = add_counts(gate_counts(w_s[:2], w_t[:2], w_c[:2], unrelated[:2], wrong[:2], adds[:2]),
                        gate_counts(w_s[2:], w_t[2:], w_c[2:], unrelated[2:], wrong[2:], adds[2:]))
    assert gate_accuracy_from_counts(halves) == acc
    assert math.isnan(gate_accuracy([1.0], [1.0], [1.0], [False], [False], [False])["lcg_unrelated"]["precision"])
    with pytest.raises(ValueError, match="one value per sample"):
        gate_accuracy([1.0], [1.0], [1.0, 2.0], [False], [False], [False])


def test_presets_name_their_captioner():
    assert PRESETS["default"].captioner() == "builtin"
    web = get_preset("web-like")
    assert web.captioner().startswith("noisy:") and web.captioner().endswith(":builtin")
    assert parse_spec(web.captioner()).noise == CaptionNoise(web.caption_error, web.caption_genericity, 0)


def test_world_generate_cli_takes_the_preset_and_says_how_to_caption_it(tmp_path, capsys):
    import json

    from alip.cli import main

    assert main(["world", "generate", "--out", str(tmp_path / "web"), "--n", "40", "--preset", "web-like"]) == 0
    out = capsys.readouterr().out
    web = get_preset("web-like")
    assert f"--captioner '{web.captioner()}'" in out
    meta = json.loads((tmp_path / "web" / "_world.json").read_text())
    assert (meta["noise"], meta["raw_text_specificity"]) == (web.noise, web.raw_text_specificity)
    # an explicit flag wins over the preset
    assert main(["world", "generate", "--out", str(tmp_path / "w2"), "--n", "40", "--preset", "web-like",
                 "--raw-text-specificity", "0"]) == 0
    assert json.loads((tmp_path / "w2" / "_world.json").read_text())["raw_text_specificity"] == 0.0
    with pytest.raises(SystemExit):
        main(["world", "generate", "--out", str(tmp_path / "w3"), "--n", "4", "--preset", "webby"])
    assert "unknown world preset" in capsys.readouterr().err
