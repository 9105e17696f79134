"""The single-process training loop: it learns, it checkpoints, it refuses what does not fit."""
from pathlib import Path

import pytest
import torch

from alip.loss import adaptive_contrastive_loss
from alip.model import create_model, get_tokenizer
from alip.training import ALIPTrainer, TrainConfig, load_training_checkpoint, save_training_checkpoint


def fixed_batch(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = get_tokenizer("alip-micro")
    words = ["red", "blue", "green", "yellow", "circle", "square", "star", "cross"]
    raw = tok([f"{words[k]} thing" for k in range(n)])
    cap = tok([f"a {words[k]} {words[(k + 3) % n]}" for k in range(n)])
    return torch.randn(n, 3, size, size, generator=g), raw, cap


# The paper's Table 2 (ViT-B/32 on YFCC15M), the spec the defaults and the preset must follow.
TABLE_2 = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "weight_decay": 0.2, "global_batch_size": 4096,
           "epochs": 32, "pct_start": 0.1, "init_temperature": 0.07}


def test_defaults_and_the_vit_b_32_preset_follow_table_2():
    import yaml

    defaults = TrainConfig().to_dict()
    preset = yaml.safe_load((Path(__file__).parent.parent / "configs" / "vit-b-32.yaml").read_text())["train"]
    for key, value in TABLE_2.items():
        assert defaults[key] == pytest.approx(value), key
        assert preset.get(key, defaults[key]) == pytest.approx(value), f"configs/vit-b-32.yaml: {key}"
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 2})


def test_config_reaches_the_optimizer_and_the_schedule():
    # Not the literals again: what the trainer builds from them (a mis-wired field fails here).
    cfg = TrainConfig(model="alip-micro", global_batch_size=8, lr=2e-3, beta1=0.8, beta2=0.9, eps=1e-7,
                      weight_decay=0.3, pct_start=0.25, init_temperature=0.05, precision="fp32")
    model = create_model("alip-micro", init_temperature=cfg.init_temperature)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(1 / 0.05, rel=1e-5)
    trainer = ALIPTrainer(cfg, model, total_steps=8)
    groups = trainer.optimizer.param_groups
    for g in groups:
        assert (g["betas"], g["eps"]) == ((0.8, 0.9), 1e-7)
    no_decay, decay = groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.3
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "clip.logit_scale" in no_decay_names and all(p.ndim >= 2 for p in decay["params"])
    lrs = []
    for _ in range(8):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    # OneCycleLR peaks after pct_start * total - 1 = 1 scheduler step, then anneals.
    assert max(lrs) == pytest.approx(2e-3) and lrs.index(max(lrs)) == 1
    assert lrs[0] < 2e-3 / 10 and lrs[-1] < lrs[2] / 5


@pytest.mark.parametrize("steps", [1, 2, 10, 20])
def test_any_number_of_steps_builds_a_schedule(steps):
    # 10 steps at the default pct_start 0.1 made OneCycleLR divide by zero (pct_start * total - 1 = 0).
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=8, precision="fp32"),
                          create_model("alip-micro"), total_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert all(lr >= 0 for lr in lrs) and (steps < 10 or max(lrs) == pytest.approx(1e-3))


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("alip-micro")
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=8, lr=3e-3, precision="fp32"),
                          model, total_steps=30)
    batch = fixed_batch()
    losses = [trainer.train_step(*batch).host_metrics()["loss"] for _ in range(30)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_metrics_are_device_tensors_with_the_right_values():
    torch.manual_seed(0)
    model = create_model("alip-micro")
    images, raw, cap = fixed_batch()
    with torch.no_grad():
        out = model(images, raw, cap)
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=8, precision="fp32"), model, total_steps=2)
    result = trainer.train_step(images, raw, cap)
    # Everything but the learning rate stays on the device until host_metrics() (no sync per step).
    assert {k for k, v in result.metrics.items() if not isinstance(v, torch.Tensor)} == {"lr"}
    m = result.host_metrics()
    assert list(m) == list(result.metrics) and all(isinstance(v, float) for v in m.values())
    for key in ("loss", "loss_raw", "loss_caption", "infonce_raw", "infonce_caption", "similarity_text_caption",
                "similarity_image_text", "similarity_image_caption", "momentum_text_caption", "momentum_image_text",
                "momentum_image_caption", "mean_sample_weight", "mean_raw_pair_weight", "mean_caption_pair_weight",
                "fraction_caption_over_raw", "logit_scale", "lr", "grad_norm"):
        assert key in m, key
    # The unweighted InfoNCE of each path is plain CLIP loss on the step's features.
    ones = torch.ones(8)
    scale = out["logit_scale"]
    assert m["infonce_raw"] == pytest.approx(float(adaptive_contrastive_loss(out["image"], out["raw"], scale, ones, ones)), rel=1e-5)
    assert m["infonce_caption"] == pytest.approx(
        float(adaptive_contrastive_loss(out["image"], out["caption"], scale, ones, ones)), rel=1e-5)
    assert m["loss"] == pytest.approx(m["loss_raw"] + m["loss_caption"], rel=1e-6)
    # W_s <= 1 weights the gated losses below the unweighted ones at the first step (mu = 1 > s_tc).
    assert m["mean_sample_weight"] < 1 and m["loss_raw"] < m["infonce_raw"]
    assert m["momentum_text_caption"] == pytest.approx(0.99 + 0.01 * m["similarity_text_caption"], rel=1e-6)
    assert m["grad_norm"] > 0


def test_the_step_reads_nothing_back_from_the_device(monkeypatch):
    """Lean step: no .item()/float()/int()/bool()/tolist() of a tensor anywhere in alip/ during a step
    (on a GPU each one stalls the pipeline). The only exception is the trim length, computed on the
    CPU tokens BEFORE they move to the device. torch's own optimizer reads only CPU step counters."""
    import inspect

    import alip

    root = str(Path(alip.__file__).parent)
    calls = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            frame = inspect.currentframe().f_back
            if frame.f_code.co_filename.startswith(root):
                calls.append((Path(frame.f_code.co_filename).name, frame.f_code.co_name, name))
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)

    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=8, micro_batch_size=4, precision="fp32"),
                          create_model("alip-micro"), total_steps=2)
    batch = fixed_batch()
    trainer.train_step(*batch)  # warm-up outside the spy
    for name in ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu"):
        spy(name)
    result = trainer.train_step(*batch)
    assert {c for c in calls if c[1] != "eot_length"} == set(), calls
    assert any(c[1] == "eot_length" for c in calls)  # the spy does see alip's calls
    calls.clear()
    result.host_metrics()
    assert calls, "host_metrics() is where the values are fetched"


def test_logit_scale_is_clamped_to_100():
    model = create_model("alip-micro")
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=8), model, total_steps=2)
    trainer.train_step(*fixed_batch())
    assert float(model.logit_scale.exp()) == pytest.approx(100.0, rel=1e-5)


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    cfg = TrainConfig(model="alip-micro", global_batch_size=8, precision="fp32")
    torch.manual_seed(0)
    a = ALIPTrainer(cfg, create_model("alip-micro"), total_steps=6)
    for s in range(3):
        a.train_step(*fixed_batch(seed=s))
    save_training_checkpoint(a, tmp_path / "ckpt.pt")
    b = ALIPTrainer(cfg, create_model("alip-micro"), total_steps=6)
    load_training_checkpoint(b, tmp_path / "ckpt.pt")
    assert b.step == 3 and b.gate_state == a.gate_state
    for s in range(3, 6):
        ma = a.train_step(*fixed_batch(seed=s)).host_metrics()
        mb = b.train_step(*fixed_batch(seed=s)).host_metrics()
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)
    for (n, p), (_, q) in zip(a.unwrapped.named_parameters(), b.unwrapped.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    a = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=8), create_model("alip-micro"), total_steps=4)
    save_training_checkpoint(a, tmp_path / "ckpt.pt")
    b = ALIPTrainer(TrainConfig(model="alip-tiny", global_batch_size=8), create_model("alip-tiny"), total_steps=4)
    with pytest.raises(ValueError, match="different architecture"):
        load_training_checkpoint(b, tmp_path / "ckpt.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read training checkpoint"):
        load_training_checkpoint(a, tmp_path / "junk.pt")


def test_mismatched_batch_sizes_are_refused():
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=8), create_model("alip-micro"), total_steps=2)
    images, raw, cap = fixed_batch()
    with pytest.raises(ValueError, match="rows but there are 8 images"):
        trainer.train_step(images, raw[:5], cap)
