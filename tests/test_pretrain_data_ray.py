"""The training data path on Ray, as the job runs it (alip.pretrain.job.rank_batches over
alip.pretrain.rank_reader): uint8 images and int64 tokens reach the step, one batch of the rank's
share per step, in step order; every epoch draws new crops; the augmentation is reproducible per
(seed, epoch, row) whichever task decodes it; the read-ahead window is what it says."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from alip.training import TrainConfig
from world_fixtures import write_reference_captioned_world


@pytest.mark.slow
def test_rank_batches_ship_uint8_in_step_order_and_reseed_every_epoch(tmp_path):
    import ray

    from alip.pretrain.job import inspect_dataset, rank_batches
    from alip.pretrain.stream import read_trace

    data = write_reference_captioned_world(tmp_path / "data", n=40, shards=2)
    units, rows = inspect_dataset(data)
    cfg = SimpleNamespace(train=TrainConfig(model="alip-micro", seed=3, global_batch_size=8), data_cpus=1,
                          shuffle_buffer_mb=0)  # what rank_batches reads
    steps = 2 * rows // 8
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"ALIP_READ_TRACE_DIR": str(tmp_path / "trace")}})
    try:
        def two_epochs(rank: int, world: int) -> list[list[bytes]]:
            steps_seen = []
            for batch in rank_batches(cfg, units, rows, rank, world, first_step=0, end_step=steps):
                assert batch["image"].dtype == torch.uint8 and tuple(batch["image"].shape[1:]) == (3, 32, 32)
                assert batch["raw_tokens"].dtype == torch.int64 and batch["caption_tokens"].dtype == torch.int64
                assert set(batch) == {"image", "raw_tokens", "caption_tokens"}  # the epoch tag stays in the tasks
                assert len(batch["image"]) == 8 // world
                steps_seen.append([img.numpy().tobytes() for img in batch["image"]])
            assert len(steps_seen) == steps
            return steps_seen

        one = two_epochs(0, 1)
        again = two_epochs(0, 1)
        halves = [two_epochs(r, 2) for r in range(2)]
        # Stopping early (--max-steps, an error) cancels what was read ahead and ends cleanly.
        early = rank_batches(cfg, units, rows, 0, 1, first_step=0, end_step=steps, read_ahead=2)
        assert len(next(early)["image"]) == 8
        early.close()
    finally:
        ray.shutdown()
    # Reproducible: new tasks in new processes augment every row the same way.
    assert one == again
    # Rank r of 2 gets exactly its half of each global batch, in step order.
    assert [halves[0][s] + halves[1][s] for s in range(steps)] == one
    epoch0 = {x for s in one[:rows // 8] for x in s}
    epoch1 = {x for s in one[rows // 8:] for x in s}
    assert len(epoch0) == len(epoch1) == rows  # every row once per epoch
    assert not epoch0 & epoch1  # a new epoch draws new crops
    # Every decoded range is one read item; 3 full passes + the early stop's read-ahead (at most 1 + 2 items).
    decoded = sum(n for _, n, _ in read_trace(str(tmp_path / "trace")))
    assert 3 * steps * 8 <= decoded <= 3 * steps * 8 + 3 * 16
