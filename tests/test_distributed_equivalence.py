"""The global batch is a property of the run, not of the cluster: W processes (torch.distributed, gloo),
each with its share of the batch, optionally in micro-batches (GradCache), must equal 1 process on the
whole batch: same gates, momentum, loss, every gradient, and (through the trainer) the same parameters."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from alip.gates import GateState
from alip.loss import ALIPLoss
from alip.model import create_model, get_tokenizer
from alip.training import ALIPTrainer, TrainConfig, split_global_batch

STEPS = 3
TEXTS = ["a red circle", "beach day", "a small blue square on the left", "northwest trip",
         "green star", "my striped thing", "a large yellow triangle at the top", "first birthday cake",
         "a purple cross", "sunset over the water at the end of a long summer day"]
CAPTIONS = ["a red circle in the center", "a blue square", "a small blue square on the left", "a green cross",
            "a green star on the right", "a purple circle", "a large yellow triangle at the top", "an orange star",
            "a purple cross at the bottom", "a gray square"]


def make_batches(n):
    torch.manual_seed(123)
    tok = get_tokenizer("alip-micro")
    images = [torch.randn(n, 3, 32, 32) for _ in range(STEPS)]
    raw, cap = tok(TEXTS[:n]), tok(CAPTIONS[:n])
    return [(im, raw.roll(s, 0), cap.roll(s, 0)) for s, im in enumerate(images)]


def train(rank, world_size, objective, n, micro):
    """STEPS steps of one run on this rank's share; the record of what it computed."""
    torch.manual_seed(0)
    model = create_model("alip-micro")
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    cfg = TrainConfig(model="alip-micro", objective=objective, global_batch_size=n, max_steps=STEPS,
                      lr=1e-3, precision="fp32", micro_batch_size=micro)
    trainer = ALIPTrainer(cfg, wrapped, total_steps=STEPS, rank=rank, world_size=world_size)
    shares = split_global_batch(n, world_size)
    start = sum(shares[:rank])
    record = {"metrics": [], "grads": []}
    for images, raw, cap in make_batches(n):
        sl = slice(start, start + shares[rank])
        res = trainer.train_step(images[sl], raw[sl], cap[sl])
        record["metrics"].append(res.host_metrics())
        record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    record["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    record["state"] = trainer.gate_state.to_dict()
    return record


def _worker(rank, world_size, init_file, out_file, runs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    records = [train(rank, world_size, *r) for r in runs]  # one process group for every run: spawns are slow
    if rank == 0:
        torch.save(records, out_file)
    dist.destroy_process_group()


def run_distributed(world_size, runs):
    """Each (objective, global batch, micro-batch) run on `world_size` spawned processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "init"), out, runs), nprocs=world_size,
                           start_method="spawn")
        return dict(zip(runs, torch.load(out, weights_only=False)))


def run_one(objective, n=8, micro=None):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(0, 1, objective, n, micro)
    finally:
        torch.set_num_threads(threads)


TWO_RANK_RUNS = (("alip", 8, None), ("clip", 8, None), ("alip", 8, 2))
THREE_RANK_RUNS = (("alip", 10, None), ("alip", 10, 2))


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(2, TWO_RANK_RUNS)


@pytest.fixture(scope="module")
def three_ranks():
    return run_distributed(3, THREE_RANK_RUNS)


def assert_same_run(a, b, tol):
    for step, (m1, m2) in enumerate(zip(a["metrics"], b["metrics"])):
        assert m1.keys() == m2.keys()
        for k in m1:  # loss, gates' means, momentum, similarities, grad norm...
            assert m2[k] == pytest.approx(m1[k], rel=tol, abs=tol), (step, k)
    assert len(a["grads"]) == len(b["grads"]) == STEPS
    for g1, g2 in zip(a["grads"], b["grads"]):
        assert g1.keys() == g2.keys() and len(g1) > 10
        for name in g1:
            torch.testing.assert_close(g2[name], g1[name], rtol=tol, atol=tol, msg=name)
    for name in a["params"]:
        torch.testing.assert_close(b["params"][name], a["params"][name], rtol=tol, atol=tol, msg=name)
    assert b["state"] == pytest.approx(a["state"], rel=tol, abs=tol)


@pytest.mark.parametrize("objective", ["alip", "clip"])
def test_two_ranks_equal_one_rank(objective, two_ranks):
    one = run_one(objective)
    assert_same_run(one, two_ranks[(objective, 8, None)], 1e-5)
    if objective == "alip":
        assert one["state"]["text_caption"] < 1.0  # the momentum really moved


def test_micro_batches_equal_the_full_batch():
    """1 worker x 4 micro-batches == 1 worker x 1 full batch (feature caching is exact)."""
    full = run_one("alip")
    assert_same_run(full, run_one("alip", micro=2), 1e-5)
    assert_same_run(full, run_one("alip", micro=3), 1e-5)  # uneven micro-batches: 3 + 3 + 2


def test_two_workers_with_micro_batches_equal_one_worker_with_four(two_ranks):
    """2 workers x 2 micro-batches == 1 worker x 4 micro-batches (DDP's no_sync accumulation)."""
    assert_same_run(run_one("alip", micro=2), two_ranks[("alip", 8, 2)], 1e-5)


def test_unequal_shares_equal_one_worker(three_ranks):
    """A global batch of 10 on 3 workers (shares 4, 3, 3), with and without micro-batches of 2
    (then 2 + 2, 2 + 1, 2 + 1), == 1 worker on all 10."""
    assert split_global_batch(10, 3) == [4, 3, 3]
    one = run_one("alip", n=10)
    assert one["state"]["text_caption"] < 1.0
    assert_same_run(one, three_ranks[("alip", 10, None)], 1e-5)
    assert_same_run(one, three_ranks[("alip", 10, 2)], 1e-5)


def test_split_global_batch():
    assert split_global_batch(4096, 8) == [512] * 8
    assert split_global_batch(4096, 3) == [1366, 1365, 1365]
    for g, w in ((10, 3), (7, 7), (4096, 5), (9, 2)):
        shares = split_global_batch(g, w)
        assert sum(shares) == g and max(shares) - min(shares) <= 1 and len(shares) == w
    with pytest.raises(ValueError, match="cannot give each of 5 workers"):
        split_global_batch(4, 5)


def test_a_rank_with_the_wrong_share_is_refused_before_any_collective():
    # The check is on host shapes against the configured shares: no size exchange, no hang.
    feats = [F.normalize(torch.randn(4, 8), dim=-1) for _ in range(3)]
    loss = ALIPLoss("alip", rank=1, world_size=3, shares=[4, 3, 3])
    with pytest.raises(ValueError, match="rank 1 holds 4 samples but its share of the global batch is 3"):
        loss(*feats, torch.tensor(10.0), GateState())
    with pytest.raises(ValueError, match="shares must give every one of the 3 ranks"):
        ALIPLoss("alip", rank=0, world_size=3, shares=[5, 5])
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=10), create_model("alip-micro"),
                          total_steps=1, rank=2, world_size=3)
    images, raw, cap = make_batches(10)[0]
    with pytest.raises(ValueError, match="its share of the global batch of 10 over 3 worker"):
        trainer.train_step(images[:4], raw[:4], cap[:4])
