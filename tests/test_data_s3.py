"""S3 round trips against a real S3-compatible HTTP server (moto's, see tests/s3_server.py)."""

import os
import time

import pytest

from alip.data.dataset import list_shards, read_dataset, read_json, read_shard, write_shard
from alip.data.images import write_rejects
from alip.data.storage import StorageError, resolve
from alip.data.world import generate_world, world_table


def test_s3_round_trip_write_list_read(s3_bucket):
    table = world_table(40, noise=0.3, seed=3)
    uris = [write_shard(table.slice(i * 20, 20), f"{s3_bucket}/ds/part-{i:05d}.parquet") for i in (1, 0)]
    assert uris[0] == f"{s3_bucket}/ds/part-00001.parquet"
    shards = list_shards(f"{s3_bucket}/ds")
    assert shards == [f"{s3_bucket}/ds/part-00000.parquet", f"{s3_bucket}/ds/part-00001.parquet"]
    assert read_shard(shards[0]).equals(table.slice(0, 20))
    assert read_dataset(f"{s3_bucket}/ds/").equals(table)  # trailing slash is fine
    write_rejects([("k", "corrupt")], f"{s3_bucket}/ds/_rejects/rejects-0.parquet")
    assert list_shards(f"{s3_bucket}/ds") == shards  # the rejects folder is not a shard


def test_generate_world_to_s3(s3_bucket):
    summary = generate_world(f"{s3_bucket}/world", n=50, noise=0.2, seed=1, shard_size=20, log=None)
    assert len(summary["shards"]) == 3
    assert read_dataset(f"{s3_bucket}/world").equals(world_table(50, noise=0.2, seed=1))
    assert read_json(f"{s3_bucket}/world/_world.json")["n"] == 50


def test_s3_missing_paths_and_buckets_are_clear_errors(s3_bucket):
    with pytest.raises(StorageError, match="does not exist"):
        list_shards(f"{s3_bucket}/nothing-here")
    with pytest.raises(StorageError, match="does not exist"):
        resolve(f"{s3_bucket}/nothing-here", must_exist=True)
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-x' does not exist"):
        write_shard(world_table(2), "s3://no-such-bucket-x/ds/a.parquet")
    with pytest.raises(StorageError, match="has no bucket name"):
        resolve("s3://")


def test_unreachable_endpoint_fails_fast_with_clear_error(monkeypatch, s3_server):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ALIP_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"S3 endpoint 'http://127.0.0.1:{port}' is unreachable"):
        list_shards("s3://bucket/prefix")
    with pytest.raises(StorageError, match="unreachable"):
        write_shard(world_table(2), "s3://bucket/prefix/a.parquet")
    assert time.monotonic() - start < 10


def test_fixture_sets_environment_for_other_clients(s3_server):
    import boto3

    assert os.environ["AWS_ENDPOINT_URL"] == s3_server == os.environ["ALIP_S3_ENDPOINT"]
    client = boto3.client("s3")  # picks the endpoint and credentials up from the environment
    assert isinstance(client.list_buckets()["Buckets"], list)
