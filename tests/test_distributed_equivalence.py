"""2 processes (torch.distributed, gloo), each with half the batch, must equal 1 process on the whole
batch: same gates, same loss, same gradients, and (through the trainer) the same parameters."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alip.gates import GateState
from alip.loss import ALIPLoss
from alip.model import create_model, get_tokenizer
from alip.training import ALIPTrainer, TrainConfig

N, STEPS = 8, 3
TEXTS = ["a red circle", "beach day", "a small blue square on the left", "northwest trip",
         "green star", "my striped thing", "a large yellow triangle at the top", "first birthday cake"]
CAPTIONS = ["a red circle in the center", "a blue square", "a small blue square on the left", "a green cross",
            "a green star on the right", "a purple circle", "a large yellow triangle at the top", "an orange star"]


def make_batches():
    torch.manual_seed(123)
    tok = get_tokenizer("alip-micro")
    images = [torch.randn(N, 3, 32, 32) for _ in range(STEPS)]
    raw, cap = tok(TEXTS), tok(CAPTIONS)
    return [(im, raw.roll(s, 0), cap.roll(s, 0)) for s, im in enumerate(images)]


def run(rank, world_size, init_file, out_file, objective):
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = create_model("alip-micro")
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    cfg = TrainConfig(model="alip-micro", objective=objective, global_batch_size=N, max_steps=STEPS,
                      lr=1e-3, precision="fp32")
    trainer = ALIPTrainer(cfg, wrapped, total_steps=STEPS, rank=rank, world_size=world_size)
    per = N // world_size
    record = {"metrics": [], "grads": []}
    for images, raw, cap in make_batches():
        sl = slice(rank * per, (rank + 1) * per)
        res = trainer.train_step(images[sl], raw[sl], cap[sl])
        record["metrics"].append(res.metrics)
        record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    record["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    record["state"] = trainer.gate_state.to_dict()
    if rank == 0:
        torch.save(record, out_file)
    if world_size > 1:
        dist.destroy_process_group()


def run_world(world_size, objective, tmp):
    out = os.path.join(tmp, f"out{world_size}.pt")
    init = os.path.join(tmp, f"init{world_size}")
    if world_size == 1:
        run(0, 1, init, out, objective)
    else:
        mp.start_processes(run, args=(world_size, init, out, objective), nprocs=world_size, start_method="spawn")
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("objective", ["alip", "clip"])
def test_two_ranks_equal_one_rank(objective):
    with tempfile.TemporaryDirectory() as tmp:
        one = run_world(1, objective, tmp)
        two = run_world(2, objective, tmp)
    for m1, m2 in zip(one["metrics"], two["metrics"]):
        assert m1.keys() == m2.keys()
        for k in m1:
            assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
    for g1, g2 in zip(one["grads"], two["grads"]):
        for name in g1:
            torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in one["params"]:
        torch.testing.assert_close(two["params"][name], one["params"][name], rtol=1e-4, atol=1e-6, msg=name)
    assert two["state"] == pytest.approx(one["state"])
    if objective == "alip":
        assert one["state"]["text_caption"] < 1.0  # the momentum really moved




def test_uneven_rank_batches_are_rejected():
    # Gathering requires equal shapes; ALIPLoss checks sizes first and raises a clear error.
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_uneven_worker, args=(2, os.path.join(tmp, "init"), os.path.join(tmp, "err")),
                           nprocs=2, start_method="spawn")
        assert "same number of samples" in open(os.path.join(tmp, "err")).read()


def _uneven_worker(rank, world_size, init_file, err_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    n = 4 if rank == 0 else 3
    feats = [torch.nn.functional.normalize(torch.randn(n, 8), dim=-1) for _ in range(3)]
    try:
        ALIPLoss("alip", rank=rank, world_size=world_size)(*feats, torch.tensor(10.0), GateState())
    except ValueError as e:
        if rank == 0:
            open(err_file, "w").write(str(e))
    dist.destroy_process_group()
