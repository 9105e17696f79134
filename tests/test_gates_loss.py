"""Gates and loss against a separate, deliberately naive implementation of the spec (loops, numpy)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alip.gates import GateState, consistency_gates
from alip.loss import ALIPLoss, adaptive_contrastive_loss


def reference_gates(i, t, c, mu, lam=2.0, alpha=0.99):
    """Per-sample loops over float64 numpy arrays, straight from the issue's formulas."""
    n = len(i)
    s_tc = [float(np.dot(t[k], c[k])) for k in range(n)]
    s_it = [float(np.dot(i[k], t[k])) for k in range(n)]
    s_ic = [float(np.dot(i[k], c[k])) for k in range(n)]
    mu = dict(mu)
    mu["tc"] = alpha * mu["tc"] + (1 - alpha) * sum(s_tc) / n
    mu["it"] = alpha * mu["it"] + (1 - alpha) * sum(s_it) / n
    mu["ic"] = alpha * mu["ic"] + (1 - alpha) * sum(s_ic) / n
    ws, wt, wc = [], [], []
    for k in range(n):
        w = math.exp(s_tc[k] - mu["tc"]) ** 2 if lam == 2.0 else math.exp(lam * (s_tc[k] - mu["tc"]))
        ws.append(min(w, 1.0))
        if w < 1:
            wt.append(math.exp(lam * (s_it[k] - mu["it"])))
            wc.append(math.exp(lam * (s_ic[k] - mu["ic"])))
        else:
            wt.append(1.0)
            wc.append(1.0)
    return np.array(ws), np.array(wt), np.array(wc), mu


def reference_path_loss(i, t, scale, ws, wp):
    n = len(i)
    total = 0.0
    for k in range(n):
        li = scale * i[k] @ t.T  # image k against all texts
        lt = scale * t[k] @ i.T  # text k against all images
        ce_i = -li[k] + math.log(np.exp(li - li.max()).sum()) + li.max()
        ce_t = -lt[k] + math.log(np.exp(lt - lt.max()).sum()) + lt.max()
        total += (ce_i + ce_t) / 2 * ws[k] * wp[k]
    return total / n


def random_triplets(n, d, seed, agreement=0.5):
    g = torch.Generator().manual_seed(seed)
    i = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    t = F.normalize(i + agreement * torch.randn(n, d, generator=g), dim=-1)
    c = F.normalize(i + agreement * torch.randn(n, d, generator=g), dim=-1)
    return i, t, c


def test_gates_match_reference_over_several_steps():
    # Start the momentum means at 0.7 (not the official 1.0, where s_tc < mu for every sample of
    # these triplets): then both branches occur, agreeing samples (w >= 1: W_s = W_t = W_c = 1) and
    # disagreeing ones (w < 1: the DCG weights), and both are checked against the reference.
    state = GateState(0.7, 0.7, 0.7)
    mu = {"tc": 0.7, "it": 0.7, "ic": 0.7}
    agreeing = disagreeing = 0
    for step in range(6):
        i, t, c = random_triplets(16, 8, seed=step)
        gates = consistency_gates(i, t, c, state)
        ws, wt, wc, mu = reference_gates(i.double().numpy(), t.double().numpy(), c.double().numpy(), mu)
        np.testing.assert_allclose(gates.sample_weight.numpy(), ws, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gates.raw_pair_weight.numpy(), wt, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gates.caption_pair_weight.numpy(), wc, rtol=1e-5, atol=1e-6)
        assert float(gates.state.text_caption) == pytest.approx(mu["tc"], abs=1e-6)
        assert float(gates.state.image_text) == pytest.approx(mu["it"], abs=1e-6)
        assert float(gates.state.image_caption) == pytest.approx(mu["ic"], abs=1e-6)
        agree = ws == 1
        agreeing += int(agree.sum())
        disagreeing += int((~agree).sum())
        # agreeing samples are never re-weighted by the DCG
        assert (wt[agree] == 1).all() and (wc[agree] == 1).all()
        assert torch.equal(gates.raw_pair_weight[torch.from_numpy(agree)], torch.ones(int(agree.sum())))
        state = gates.state
    assert disagreeing > 0, "the w < 1 (DCG) branch was never exercised"
    assert agreeing > 0, "the w >= 1 (W_s = 1) branch was never exercised"


def test_agreeing_samples_get_unit_weights_when_mean_is_low():
    # Momentum mean below every s_tc -> w >= 1 for all -> W_s = W_t = W_c = 1 exactly.
    i, t, c = random_triplets(8, 8, seed=1, agreement=0.01)
    gates = consistency_gates(i, t, c, GateState(text_caption=-5.0, image_text=0.0, image_caption=0.0))
    assert torch.equal(gates.sample_weight, torch.ones(8))
    assert torch.equal(gates.raw_pair_weight, torch.ones(8))
    assert torch.equal(gates.caption_pair_weight, torch.ones(8))


def test_gate_weights_carry_no_gradient():
    i, t, c = (x.requires_grad_() for x in random_triplets(8, 8, seed=2))
    gates = consistency_gates(i, t, c, GateState())
    for w in (gates.sample_weight, gates.raw_pair_weight, gates.caption_pair_weight):
        assert not w.requires_grad and w.grad_fn is None


def test_path_loss_matches_reference():
    i, t, c = random_triplets(12, 8, seed=3)
    g = torch.Generator().manual_seed(0)
    ws, wp = torch.rand(12, generator=g), torch.rand(12, generator=g) * 2
    ours = adaptive_contrastive_loss(i, t, 14.3, ws, wp)
    ref = reference_path_loss(i.double().numpy(), t.double().numpy(), 14.3, ws.double().numpy(), wp.double().numpy())
    assert float(ours) == pytest.approx(ref, rel=1e-5)


def test_unit_weights_equal_open_clip_clip_loss():
    from open_clip.loss import ClipLoss

    i, t, _ = random_triplets(10, 8, seed=4)
    ours = adaptive_contrastive_loss(i, t, torch.tensor(20.0), torch.ones(10), torch.ones(10))
    theirs = ClipLoss()(i, t, torch.tensor(20.0))
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)


def test_alip_total_is_sum_of_weighted_paths_over_steps():
    loss_fn = ALIPLoss("alip")
    state, mu = GateState(), {"tc": 1.0, "it": 1.0, "ic": 1.0}
    for step in range(4):
        i, t, c = random_triplets(10, 8, seed=10 + step)
        out = loss_fn(i, t, c, torch.tensor(10.0), state)
        ws, wt, wc, mu = reference_gates(i.double().numpy(), t.double().numpy(), c.double().numpy(), mu)
        ref = reference_path_loss(i.double().numpy(), t.double().numpy(), 10.0, ws, wt) + \
            reference_path_loss(i.double().numpy(), c.double().numpy(), 10.0, ws, wc)
        assert float(out.loss) == pytest.approx(ref, rel=1e-5)
        assert out.metrics["loss"] == pytest.approx(ref, rel=1e-5)
        state = out.state


@pytest.mark.parametrize("objective", ["clip", "caption", "alip_no_lcg", "alip_no_dcg"])
def test_objectives_are_the_spec_with_weights_switched_off(objective):
    i, t, c = random_triplets(10, 8, seed=7)
    state = GateState(0.3, 0.2, 0.2)
    out = ALIPLoss(objective)(i, t, c, torch.tensor(10.0), state)
    ws, wt, wc, _ = reference_gates(i.double().numpy(), t.double().numpy(), c.double().numpy(),
                                    {"tc": 0.3, "it": 0.2, "ic": 0.2})
    one = np.ones(10)
    a, tn, cn = i.double().numpy(), t.double().numpy(), c.double().numpy()
    expected = {
        "clip": reference_path_loss(a, tn, 10.0, one, one),
        "caption": reference_path_loss(a, cn, 10.0, one, one),
        "alip_no_lcg": reference_path_loss(a, tn, 10.0, one, wt) + reference_path_loss(a, cn, 10.0, one, wc),
        "alip_no_dcg": reference_path_loss(a, tn, 10.0, ws, one) + reference_path_loss(a, cn, 10.0, ws, one),
    }[objective]
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)


def test_each_ablation_switches_off_a_gate_that_is_active():
    """The ablations are only meaningful if, on these inputs, each gate is really at work: W_s < 1 for
    some samples, W_t != W_c for some, so each ablation gives a loss different from full ALIP's."""
    i, t, c = random_triplets(10, 8, seed=7)
    ws, wt, wc, _ = reference_gates(i.double().numpy(), t.double().numpy(), c.double().numpy(),
                                    {"tc": 0.3, "it": 0.2, "ic": 0.2})
    assert (ws < 0.99).any() and (np.abs(wt - wc) > 0.01).any()
    losses = {o: float(ALIPLoss(o)(i, t, c, torch.tensor(10.0), GateState(0.3, 0.2, 0.2)).loss)
              for o in ("alip", "alip_no_lcg", "alip_no_dcg")}
    assert abs(losses["alip"] - losses["alip_no_lcg"]) > 1e-3 * losses["alip"]
    assert abs(losses["alip"] - losses["alip_no_dcg"]) > 1e-3 * losses["alip"]
    assert abs(losses["alip_no_lcg"] - losses["alip_no_dcg"]) > 1e-3 * losses["alip"]


def test_bad_inputs_get_clear_errors():
    i, t, c = random_triplets(8, 8, seed=5)
    with pytest.raises(ValueError, match="same shape"):
        consistency_gates(i, t[:6], c, GateState())
    with pytest.raises(ValueError, match="same N"):
        adaptive_contrastive_loss(i, t[:7], 10.0, torch.ones(8), torch.ones(8))
    with pytest.raises(ValueError, match="length 8"):
        adaptive_contrastive_loss(i, t, 10.0, torch.ones(7), torch.ones(8))
    with pytest.raises(ValueError, match="do not match"):
        ALIPLoss("alip")(i, t, c[:4], torch.tensor(10.0), GateState())
    with pytest.raises(ValueError, match="unknown objective"):
        ALIPLoss("siglip")
