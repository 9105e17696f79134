"""The training data path inside Ray Data, as the job builds it (alip.pretrain.job.build_dataset):
uint8 images and int64 tokens reach the consumer through iter_torch_batches, each planned read
unit tags its rows with its epoch, and the augmentation is reproducible per (seed, epoch, row)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from alip.pretrain.data import trainer_batch_options
from alip.training import TrainConfig
from tests.world_fixtures import write_reference_captioned_world


@pytest.mark.slow
def test_ray_data_pipeline_ships_uint8_and_reseeds_every_epoch(tmp_path):
    import ray
    import ray.data

    from alip.pretrain.job import build_dataset, inspect_dataset
    from alip.pretrain.stream import plan_reads

    data = write_reference_captioned_world(tmp_path / "data", n=40, shards=2)
    units, rows = inspect_dataset(data)
    cfg = SimpleNamespace(train=TrainConfig(model="alip-micro", seed=3), data_cpus=1)  # what build_dataset reads
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True  # the stream's order, as the job's ingest options keep it

        def two_epochs() -> tuple[list[bytes], list[bytes]]:
            ds = build_dataset(cfg, plan_reads(units, cfg.train.seed, 0, 2 * rows))
            images = []
            for batch in ds.iterator().iter_torch_batches(batch_size=16, **trainer_batch_options("cpu")):
                assert batch["image"].dtype == torch.uint8 and tuple(batch["image"].shape[1:]) == (3, 32, 32)
                assert batch["raw_tokens"].dtype == torch.int64 and batch["caption_tokens"].dtype == torch.int64
                assert set(batch) == {"image", "raw_tokens", "caption_tokens"}  # the epoch tag stays in the data tasks
                images += [img.numpy().tobytes() for img in batch["image"]]
            assert len(images) == 2 * rows
            return images[:rows], images[rows:]

        first, second = two_epochs(), two_epochs()
    finally:
        ray.shutdown()
    # Reproducible: a rebuilt pipeline (new tasks, new processes) augments every row the same way.
    assert sorted(first[0]) == sorted(second[0]) and sorted(first[1]) == sorted(second[1])
    # A new epoch draws new crops: no image of epoch 1 repeats one of epoch 0.
    assert not set(first[0]) & set(first[1])
