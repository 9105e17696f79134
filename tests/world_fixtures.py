"""Test datasets built from the built-in world.

`write_reference_captioned_world` adds a `caption` column from the world's own ground truth,
phrased like the built-in captioner (no pattern), for tests of the *pretraining* job that must
not depend on a captioner run. The captioning job's own tests use real captioners.
"""
import pyarrow as pa

from alip.data.dataset import write_shard
from alip.data.world import describe, world_table


def write_reference_captioned_world(out_dir, n: int, noise: float = 0.5, seed: int = 0, shards: int = 2,
                                    with_caption: bool = True) -> str:
    table = world_table(n, noise=noise, seed=seed)
    if with_caption:
        captions = [describe(r, include_pattern=False) for r in table.to_pylist()]
        table = table.append_column("caption", pa.array(captions, pa.string()))
        table = table.append_column("captioner", pa.array(["reference-description"] * n, pa.string()))
    per = -(-n // shards)
    for s in range(shards):
        write_shard(table.slice(s * per, per), f"{out_dir}/part-{s:05d}.parquet", validate=False)
    return str(out_dir)
