"""The single-process training loop: it learns, it checkpoints, it refuses what does not fit."""
import pytest
import torch

from alip.model import create_model, get_tokenizer
from alip.training import ALIPTrainer, TrainConfig, load_training_checkpoint, save_training_checkpoint


def fixed_batch(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = get_tokenizer("alip-micro")
    words = ["red", "blue", "green", "yellow", "circle", "square", "star", "cross"]
    raw = tok([f"{words[k]} thing" for k in range(n)])
    cap = tok([f"a {words[k]} {words[(k + 3) % n]}" for k in range(n)])
    return torch.randn(n, 3, size, size, generator=g), raw, cap


def test_config_defaults_are_table_2():
    c = TrainConfig()
    assert (c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.global_batch_size, c.epochs, c.pct_start,
            c.init_temperature) == (1e-3, 0.9, 0.98, 1e-6, 0.2, 4096, 32, 0.1, 0.07)
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 2})


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("alip-micro")
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=8, lr=3e-3, precision="fp32"),
                          model, total_steps=40)
    batch = fixed_batch()
    losses = [trainer.train_step(*batch).metrics["loss"] for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    metrics = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=8), create_model("alip-micro"),
                          total_steps=1).train_step(*batch).metrics
    for key in ("loss", "loss_raw", "loss_caption", "similarity_text_caption", "similarity_image_text",
                "similarity_image_caption", "momentum_text_caption", "momentum_image_text",
                "momentum_image_caption", "mean_sample_weight", "mean_raw_pair_weight",
                "mean_caption_pair_weight", "fraction_caption_over_raw", "logit_scale", "lr"):
        assert key in metrics, key


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
        ma = a.train_step(*fixed_batch(seed=s)).metrics
        mb = b.train_step(*fixed_batch(seed=s)).metrics
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
