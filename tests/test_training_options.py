"""The lean step's options each give today's loss and gradients (within tolerance, on CPU):
uint8 images normalised on the device, split text passes, gradient checkpointing, bf16 and fp16
autocast (fp16 with a GradScaler), torch.compile of the towers; and checkpoints keep working."""
import copy

import pytest
import torch

from alip.model import SPLIT_MIN_TOKEN_RATIO, create_model, eot_length, get_tokenizer, plan_text_passes
from alip.training import (ALIPTrainer, TrainConfig, load_training_checkpoint, resolve_precision,
                           save_training_checkpoint)

N = 8


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = get_tokenizer("alip-micro")
    words = ["red", "blue", "green", "yellow", "circle", "square", "star", "cross"]
    raw = tok([f"{words[k]} thing seen on a long trip to the beach" for k in range(N)])
    cap = tok([f"a {words[k]} {words[(k + 3) % N]}" for k in range(N)])
    pixels = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=g)
    return pixels, raw, cap


def one_step(seed_batch=0, steps=1, **cfg):
    torch.manual_seed(0)
    model = create_model("alip-micro")
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=N, **{"precision": "fp32", **cfg}),
                          model, total_steps=steps + 1)
    for s in range(steps):
        metrics = trainer.train_step(*batch(seed_batch + s)).host_metrics()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return metrics, grads, trainer


def assert_close_run(a, b, rtol, atol, cosine=None):
    (ma, ga, _), (mb, gb, _) = a, b
    for k in ("loss", "infonce_raw", "infonce_caption", "momentum_text_caption", "mean_sample_weight"):
        assert mb[k] == pytest.approx(ma[k], rel=rtol, abs=atol), k
    assert ga.keys() == gb.keys()
    for name in ga:
        if cosine is None:
            torch.testing.assert_close(gb[name], ga[name], rtol=rtol, atol=atol, msg=name)
        else:  # low precision: the gradient points the same way
            sim = torch.nn.functional.cosine_similarity(ga[name].flatten().double(), gb[name].flatten().double(), dim=0)
            assert ga[name].abs().max() == 0 or sim > cosine, (name, float(sim))


@pytest.fixture(scope="module")
def baseline():
    return one_step()


def test_uint8_images_are_normalised_in_the_step(baseline):
    pixels, raw, cap = batch()
    model = create_model("alip-micro")
    mean = torch.tensor(model.clip.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.clip.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    floats = (pixels.float() / 255 - mean) / std
    torch.manual_seed(0)
    model = create_model("alip-micro")
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=N, precision="fp32"), model, total_steps=2)
    m = trainer.train_step(floats, raw, cap).host_metrics()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_close_run(baseline, (m, grads, trainer), 1e-5, 1e-6)
    with pytest.raises(ValueError, match=r"images must be \[N, 3, H, W\]"):
        trainer.train_step(pixels[:, :1], raw, cap)


def test_split_and_joint_text_passes_give_the_same_features():
    torch.manual_seed(0)
    model = create_model("alip-micro").eval()
    pixels, raw, cap = batch()
    lr, lc = eot_length(raw), eot_length(cap)
    assert lr > lc and plan_text_passes(lr, lc) == "split"
    with torch.no_grad():
        joint = model(pixels, raw, cap, text_passes="joint")
        split = model(pixels, raw, cap, text_passes="split")
        full_raw = model.encode_text(raw, trim=False)
    for k in ("raw", "caption"):
        torch.testing.assert_close(split[k], joint[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split["raw"], full_raw, rtol=1e-5, atol=1e-6)
    # the decision: split only when a joint pass pads enough tokens
    assert plan_text_passes(20, 20) == "joint" and plan_text_passes(77, 12) == "split"
    assert plan_text_passes(11, 10) == "joint"
    assert 2 * 12 / (12 + 10) < SPLIT_MIN_TOKEN_RATIO and plan_text_passes(12, 10) == "joint"
    # rounding up keeps it exact and bounded by the context
    assert eot_length(raw, multiple=8) % 8 == 0 and eot_length(raw, multiple=64) == raw.shape[1]
    with pytest.raises(ValueError, match="text_passes must be one of"):
        model(pixels, raw, cap, text_passes="three")


def test_grad_checkpointing_gives_the_same_step(baseline):
    run = one_step(grad_checkpointing=True)
    assert run[2].unwrapped.clip.transformer.grad_checkpointing
    assert_close_run(baseline, run, 1e-5, 1e-6)


def test_bf16_autocast_on_cpu_is_close(baseline):
    run = one_step(precision="bf16")
    assert run[2].precision == "bf16" and run[2].scaler is None
    assert_close_run(baseline, run, 3e-2, 3e-2, cosine=0.95)


def test_fp16_autocast_with_grad_scaler_is_close(baseline):
    run = one_step(precision="fp16")
    trainer = run[2]
    assert trainer.precision == "fp16" and trainer.scaler is not None
    assert_close_run(baseline, run, 3e-2, 3e-2, cosine=0.95)


def test_fp16_overflow_skips_the_update_and_backs_off_the_scale():
    torch.manual_seed(0)
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=N, precision="fp16"),
                          create_model("alip-micro"), total_steps=3)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # the fp16 backward overflows
    before = copy.deepcopy(trainer.unwrapped.state_dict())
    with pytest.warns(UserWarning, match="lr_scheduler.step"):  # torch notes the skipped optimizer step
        trainer.train_step(*batch())
    after = trainer.unwrapped.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "an overflowed step must not update"
    assert trainer.scaler.get_scale() == 2.0 ** 119
    assert trainer.step == 1  # the step counts (the schedule moves on), only the update was skipped


def test_checkpoints_keep_the_scaler_and_old_ones_still_load(tmp_path):
    cfg = TrainConfig(model="alip-micro", global_batch_size=N, precision="fp16")
    torch.manual_seed(0)
    a = ALIPTrainer(cfg, create_model("alip-micro"), total_steps=4)
    a.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    a.train_step(*batch())
    save_training_checkpoint(a, tmp_path / "fp16.pt")
    b = ALIPTrainer(cfg, create_model("alip-micro"), total_steps=4)
    load_training_checkpoint(b, tmp_path / "fp16.pt")
    assert b.scaler.get_scale() == a.scaler.get_scale() == 1024.0 and b.step == 1
    # An old checkpoint: precision "amp", no scaler state, float gate state.
    old = a.state_dict()
    old.pop("grad_scaler")
    old["train_config"]["precision"] = "amp"
    torch.save(old, tmp_path / "old.pt")
    c = ALIPTrainer(TrainConfig.from_dict(old["train_config"]), create_model("alip-micro"), total_steps=4)
    load_training_checkpoint(c, tmp_path / "old.pt")
    assert c.step == 1 and c.precision == "fp32" and c.gate_state == a.gate_state


def test_precision_is_chosen_per_device():
    assert resolve_precision("auto", "cpu") == resolve_precision("amp", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="int8")
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        TrainConfig(micro_batch_size=0)
    if torch.cuda.is_available():  # runs where a GPU is: bf16 where supported, else fp16
        expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        assert resolve_precision("auto", "cuda") == expected


def test_compiled_towers_give_the_same_step(baseline, monkeypatch):
    # Dynamo traces the towers and AOTAutograd captures forward + backward as for inductor; only the
    # code generation is skipped: inductor's C++ build takes ~7 min for this model on this 2-core box
    # (measured). bench/gpu_check.py runs the real inductor path, on GPU or with --tiny on CPU.
    import alip.model

    monkeypatch.setattr(alip.model, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    run = one_step(compile=True, steps=1)
    trainer = run[2]
    assert trainer.trim_multiple == 8
    for tower in (trainer.unwrapped.clip.visual, trainer.unwrapped.clip.transformer):
        assert tower._compiled_call_impl is not None  # nn.Module.compile: compiled in place
    assert "clip.visual.conv1.weight" in trainer.unwrapped.state_dict()  # checkpoint keys unchanged
    assert_close_run(baseline, run, 1e-4, 1e-5)
