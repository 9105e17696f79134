"""One torchft replica group of 1 process: toy two-tower contrastive model whose forward
all-gathers features across replica groups (ALIP-style global-batch loss).

--gather dist_nn : torch.distributed.nn.functional.all_gather(x, group=<torchft PG>) (what ALIP does)
--gather custom  : autograd Function: forward = manager._pg.allgather (errors -> manager.report_error),
                   backward = manager.allreduce(SUM) of the gathered grad, keep own slice.
"""
import argparse
import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch._C._distributed_c10d import AllgatherOptions, ReduceOp
from torch.distributed import TCPStore

from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo
from torchft.process_group import ManagedProcessGroup

p = argparse.ArgumentParser()
p.add_argument("--replica", type=int, required=True)
p.add_argument("--lighthouse", required=True)
p.add_argument("--gather", choices=["dist_nn", "custom"], default="custom")
p.add_argument("--probe", action="store_true", help="try every gather API once, print errors, exit")
p.add_argument("--sleep", type=float, default=0.2)
p.add_argument("--log", default=None)
p.add_argument("--pg-timeout", type=float, default=60.0)
p.add_argument("--timeout", type=float, default=60.0)
p.add_argument("--patch-ddp", action="store_true", help="fix torchft 0.2.0 ddp._comm_hook crash when manager already errored")
p.add_argument("--suicide-step", type=int, default=None, help="SIGKILL self after quorum, before the allgather, at this step")
args = p.parse_args()

torch.set_num_threads(1)
torch.manual_seed(0)
B, D_IN, D = 4, 16, 8
log = open(args.log or f"/tmp/tft-spike-logs/replica_{args.replica}.jsonl", "a", buffering=1)


def emit(**kw):
    kw["t"] = time.time()
    kw["replica"] = args.replica
    kw["pid"] = os.getpid()
    log.write(json.dumps(kw) + "\n")
    print(json.dumps(kw), flush=True)


# Replica-group-local store + default PG of world size 1 (what Ray's TorchftConfig gives each worker).
store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.img = nn.Linear(D_IN, D)
        self.txt = nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, y):
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(y), dim=-1), self.logit_scale.exp()


model = TwoTower()
if args.patch_ddp:
    def _patched_comm_hook(state, bucket):
        work = state.allreduce(bucket.buffer())
        work.wait()
        fut = work.get_future()
        # manager.allreduce returns a _DummyWork (plain torch Future, no ._fut) once the step errored
        return getattr(fut, "_fut", None) or fut
    DistributedDataParallel._comm_hook = staticmethod(_patched_comm_hook)
opt_inner = torch.optim.SGD(model.parameters(), lr=0.1)
pg = ProcessGroupGloo(timeout=timedelta(seconds=args.pg_timeout))
manager = Manager(
    pg=pg,
    min_replica_size=1,
    load_state_dict=lambda sd: (model.load_state_dict(sd["model"]), opt_inner.load_state_dict(sd["optim"])),
    state_dict=lambda: {"model": model.state_dict(), "optim": opt_inner.state_dict()},
    rank=0,
    world_size=1,
    replica_id=f"replica_{args.replica}",
    store_addr="localhost",
    store_port=store.port,
    lighthouse_addr=args.lighthouse,
    timeout=timedelta(seconds=args.timeout),
)
ddp = DistributedDataParallel(manager, model)
optimizer = Optimizer(manager, opt_inner)
emit(event="started")


class FTAllGather(torch.autograd.Function):
    """All-gather with gradient through the torchft manager's (reconfigurable) PG."""

    @staticmethod
    def forward(ctx, x):
        manager.wait_quorum()
        n, rank = manager._pg.size(), manager._pg._rank
        ctx.n, ctx.rank, ctx.b = n, rank, x.shape[0]
        outs = [torch.empty_like(x) for _ in range(n)]
        if manager.errored() is None:
            try:
                manager._pg.allgather([outs], [x.contiguous()], AllgatherOptions()).wait()
                return torch.cat(outs)
            except Exception as e:  # peer died mid-collective: mark step failed, continue with zeros
                emit(event="allgather_error", error=repr(e)[:300])
                manager.report_error(e)
        outs = [torch.zeros_like(x) for _ in range(n)]
        outs[rank] = x.detach()
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        work = manager.allreduce(g, reduce_op=ReduceOp.SUM)  # swallowed + reported on error
        work.wait()
        return g[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]


def gather(x):
    if args.gather == "custom":
        return FTAllGather.apply(x)
    import torch.distributed.nn.functional as dnn
    return torch.cat(dnn.all_gather(x, group=REGISTERED))


def probe():
    """Try the gather APIs ALIP would use, against the torchft PGs."""
    import torch.distributed.nn.functional as dnn
    optimizer.zero_grad()  # start_quorum
    manager.wait_quorum()
    emit(event="probe_quorum", pg_size=manager._pg.size(), participants=manager.num_participants())
    x = torch.randn(B, D, requires_grad=True)
    attempts = {
        "dist.nn.all_gather(group=ManagedProcessGroup(manager)) unregistered":
            lambda: dnn.all_gather(x, group=ManagedProcessGroup(manager)),
        "dist.nn.all_gather(group=ManagedProcessGroup(manager).register('managed'))":
            lambda: dnn.all_gather(x, group=ManagedProcessGroup(manager).register("managed")),
        "dist.nn.all_gather(group=manager._pg.register('ftgloo'))":
            lambda: dnn.all_gather(x, group=manager._pg.register("ftgloo")),
        "ManagedProcessGroup(manager).allgather (raw c10d call)":
            lambda: ManagedProcessGroup(manager).allgather([[torch.empty_like(x) for _ in range(manager._pg.size())]], [x.detach()], AllgatherOptions()).wait(),
        "manager._pg.allgather (torchft ProcessGroupGloo, raw)":
            lambda: manager._pg.allgather([[torch.empty_like(x) for _ in range(manager._pg.size())]], [x.detach()], AllgatherOptions()).wait(),
    }
    for name, fn in attempts.items():
        try:
            out = fn()
            info = {"ok": True, "type": type(out).__name__}
            if isinstance(out, tuple):
                info["n_parts"] = len(out)
                try:
                    torch.cat(out).sum().backward()
                    info["backward"] = "ok"
                except Exception as e:
                    info["backward"] = repr(e)[:400]
                    info["backward_tb"] = [l.strip() for l in traceback.format_exc().splitlines() if l.strip().startswith("File")][-4:]
            emit(event="probe", api=name, **info)
        except Exception as e:
            emit(event="probe", api=name, ok=False, error=repr(e)[:400], tb=traceback.format_exc()[-600:])
    manager.shutdown(wait=False)
    os._exit(0)


if args.probe:
    probe()

REGISTERED = None
if args.gather == "dist_nn":
    REGISTERED = ManagedProcessGroup(manager).register("managed")

gen = torch.Generator().manual_seed(1000 + args.replica)
while True:
    t0 = time.time()
    optimizer.zero_grad()  # -> manager.start_quorum()
    x, y = torch.randn(B, D_IN, generator=gen), torch.randn(B, D_IN, generator=gen)
    img, txt, scale = ddp(x, y)
    if args.suicide_step is not None and manager.current_step() >= args.suicide_step:
        manager.wait_quorum()
        emit(event="suicide", step=manager.current_step())
        os.kill(os.getpid(), 9)
    g_img, g_txt = gather(img), gather(txt)
    rank = manager._pg._rank
    labels = torch.arange(B) + rank * B
    # open_clip local_loss: own rows against every column of the global batch
    loss = (F.cross_entropy(scale * img @ g_txt.T, labels) + F.cross_entropy(scale * txt @ g_img.T, labels)) / 2
    loss.backward()
    step_before = manager.current_step()
    t_commit = time.time()
    optimizer.step()  # -> manager.should_commit()
    emit(event="step", step=step_before, committed=manager.current_step() > step_before,
         participants=manager.num_participants(), qrank=rank, pg_size=manager._pg.size(),
         errored=repr(manager.errored())[:200] if manager.errored() else None,
         loss=round(loss.item(), 4), dur=round(time.time() - t0, 3), commit_dur=round(time.time() - t_commit, 3))
    time.sleep(args.sleep)
