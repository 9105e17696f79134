"""The pretraining data stream, config flags and metrics log, without Ray: per-epoch permutations,
resume positions in global samples, worker ranges, boolean flags, required --config/--data, the
metrics JSONL cut back to a checkpoint's offset, and the plot's unweighted InfoNCE panel."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from alip.pretrain.config import config_from_args, parse_workers
from alip.pretrain.metrics import PLOTTED, MetricsLog, host_records, plot_history, read_history
from alip.pretrain.stream import (
    ReadUnit, epoch_order, latest_registered_position, plan_reads, read_items, read_trace, rows_to_plan,
    total_steps,
)
from world_fixtures import write_reference_captioned_world

UNITS = [ReadUnit(f"s{i}", g, rows) for i, (g, rows) in enumerate([(0, 10), (1, 7), (0, 13), (2, 5), (0, 9)])]
ROWS = sum(u.rows for u in UNITS)  # 44


def stream_rows(items):
    """Expand plan items into (unit id, row) per stream position."""
    out = []
    for it in items:
        out += [((it["shard"], it["row_group"]), r) for r in range(it["start"], it["stop"])]
    return out


def test_each_epoch_reads_every_row_once_in_its_own_order():
    items = plan_reads(UNITS, seed=3, start_sample=0, n_samples=3 * ROWS)
    rows = stream_rows(items)
    epochs = [rows[e * ROWS:(e + 1) * ROWS] for e in range(3)]
    for e in epochs:
        assert sorted(e) == sorted({((u.shard, u.row_group), r) for u in UNITS for r in range(u.rows)})
    orders = [tuple(epoch_order(len(UNITS), 3, e)) for e in range(3)]
    assert len(set(orders)) == 3  # a fresh permutation every epoch
    assert tuple(epoch_order(len(UNITS), 3, 1)) == orders[1]  # reproducible from the seed
    assert tuple(epoch_order(len(UNITS), 4, 1)) != orders[1]
    assert [it["stream_start"] for it in items] == list(np.cumsum([0] + [it["stop"] - it["start"] for it in items])[:-1])


@pytest.mark.parametrize("start", [0, 1, 9, 10, 17, 43, 44, 45, 100])
def test_resume_plan_starts_at_the_first_unconsumed_row(start):
    full = stream_rows(plan_reads(UNITS, seed=0, start_sample=0, n_samples=8 * ROWS))
    resumed_items = plan_reads(UNITS, seed=0, start_sample=start, n_samples=2 * ROWS)
    resumed = stream_rows(resumed_items)
    # Exactly the continuation of the uninterrupted stream: nothing before `start` is listed.
    assert resumed == full[start:start + len(resumed)]
    assert len(resumed) >= 2 * ROWS
    assert resumed_items[0]["stream_start"] == start


def test_steps_depend_on_the_global_batch_only():
    assert total_steps(rows_per_epoch=1000, epochs=3, global_batch_size=128, max_steps=None) == 23
    assert total_steps(1000, 3, 128, max_steps=7) == 7
    # Enough rows are planned for the largest share on an equal split of the stream.
    steps_left, G, W = 10, 10, 3
    assert rows_to_plan(steps_left, G, W) // W >= steps_left * -(-G // W)


def test_reader_yields_the_planned_rows_in_blocks_and_traces_them(tmp_path, monkeypatch):
    data = write_reference_captioned_world(tmp_path / "d", n=40, shards=1)
    shard = f"{data}/part-00000.parquet"
    monkeypatch.setenv("ALIP_READ_TRACE_DIR", str(tmp_path / "trace"))
    item = {"shard": np.array([shard]), "row_group": np.array([0]), "start": np.array([5]),
            "stop": np.array([40]), "stream_start": np.array([105]), "epoch": np.array([2])}
    parts = list(read_items(item, columns=["key", "caption"], block_rows=16))
    assert [p.num_rows for p in parts] == [16, 16, 3]
    keys = [k for p in parts for k in p.column("key").to_pylist()]
    assert keys == pq.read_table(shard).column("key").to_pylist()[5:40]
    assert {e for p in parts for e in p.column("epoch").to_pylist()} == {2}
    assert [(a, b) for a, b, _ in read_trace(str(tmp_path / "trace"))] == [(105, 16), (121, 16), (137, 3)]


def test_dataset_factory_reads_the_registered_checkpoints_position(tmp_path):
    run = tmp_path / "run"
    assert latest_registered_position(str(run), "position.json") is None
    (run / "checkpoint_000003").mkdir(parents=True)
    (run / "checkpoint_000003" / "position.json").write_text(json.dumps({"step": 30, "samples": 720}))
    (run / "checkpoint_000004").mkdir()  # uploaded but never registered: must not be used
    (run / "checkpoint_000004" / "position.json").write_text(json.dumps({"step": 40, "samples": 960}))
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000003", "metrics": {"step": 30}}}))
    assert latest_registered_position(str(run), "position.json") == {"step": 30, "samples": 720}


# ----------------------------------------------------------------------------- config

def args(tmp_path, *extra):
    return ["--config", "tiny", "--data", str(tmp_path), "--storage-path", str(tmp_path), *extra]


def test_worker_counts_fixed_or_elastic(tmp_path):
    assert parse_workers(8) == (8, 8) and parse_workers("2-8") == (2, 8) and parse_workers(" 3 ") == (3, 3)
    for bad in ("8-2", "0", "two", "2-", True):
        with pytest.raises(ValueError, match="num_workers"):
            parse_workers(bad)
    cfg = config_from_args(args(tmp_path, "--num-workers", "2-8"))
    assert (cfg.min_workers, cfg.max_workers, cfg.elastic) == (2, 8, True)
    cfg = config_from_args(args(tmp_path, "--num-workers", "3"))  # 128 is not divisible by 3: shares differ
    assert (cfg.min_workers, cfg.max_workers, cfg.elastic) == (3, 3, False)
    with pytest.raises(ValueError, match="more workers than samples"):
        config_from_args(args(tmp_path, "--num-workers", "2-200"))


def test_boolean_fields_are_real_flags(tmp_path, capsys):
    assert config_from_args(args(tmp_path, "--use-gpu")).use_gpu is True
    assert config_from_args(args(tmp_path, "--no-use-gpu")).use_gpu is False
    assert config_from_args(args(tmp_path, "--no-export")).export is False
    with pytest.raises(SystemExit):
        config_from_args(args(tmp_path, "--use-gpu=true"))
    assert "ignored explicit argument 'true'" in capsys.readouterr().err


def test_use_gpu_with_a_value_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        config_from_args(args(tmp_path, "--use-gpu", "ture"))
    assert "unrecognized arguments: ture" in capsys.readouterr().err


def test_config_is_required_and_gpu_presets_have_no_bucket(tmp_path, capsys):
    with pytest.raises(SystemExit):
        config_from_args(["--data", str(tmp_path)])
    assert "the following arguments are required: --config" in capsys.readouterr().err
    for preset in ("vit-b-32", "vit-b-16"):
        with pytest.raises(ValueError, match="data is required: pass --data"):
            config_from_args(["--config", preset])
        with pytest.raises(ValueError, match="storage_path is required: pass --storage-path"):
            config_from_args(["--config", preset, "--data", "s3://mine/captioned"])
        cfg = config_from_args(["--config", preset, "--data", "s3://mine/c", "--storage-path", "s3://mine/runs"])
        assert (cfg.data, cfg.storage_path, cfg.elastic, cfg.train.global_batch_size) == \
            ("s3://mine/c", "s3://mine/runs", True, 4096)


# ----------------------------------------------------------------------------- metrics

def test_metric_tensors_reach_the_host_in_one_transfer():
    pending = [(1, {"loss": torch.tensor(2.5), "lr": 0.1, "epoch": 0}), (2, {"loss": torch.tensor(1.5), "lr": 0.2})]
    assert host_records(pending) == [(1, {"loss": 2.5, "lr": 0.1, "epoch": 0}), (2, {"loss": 1.5, "lr": 0.2})]


def test_local_jsonl_is_cut_back_to_the_checkpoint_offset(tmp_path):
    run = str(tmp_path / "run")
    log = MetricsLog(run, total_steps=10, log_every=2)
    for s in range(1, 5):
        log.log(s, {"loss": torch.tensor(float(s))}, samples=8)
    offset = log.commit(4)
    for s in range(5, 8):  # logged after the checkpoint by a group that then dies
        log.log(s, {"loss": float(s)}, samples=8)
    log.flush()
    assert [r["step"] for r in read_history(run)] == list(range(1, 8))
    resumed = MetricsLog(run, total_steps=10, log_every=1, resume_step=4, offset=offset)
    for s in range(5, 11):
        resumed.log(s, {"loss": float(s)}, samples=8)
    resumed.close()
    assert [r["step"] for r in read_history(run)] == list(range(1, 11))
    fresh = MetricsLog(run, total_steps=10)  # a new run of the same name starts a new log
    fresh.close()
    assert read_history(run) == []


def test_s3_metrics_are_uploaded_as_segments_and_cut_back(s3_bucket):
    run = f"{s3_bucket}/runs/r"
    log = MetricsLog(run, total_steps=9, log_every=3)
    for s in range(1, 7):
        log.log(s, {"loss": float(s)}, samples=4)
        if s % 3 == 0:
            log.commit(s)
    log.log(7, {"loss": 7.0}, samples=4)
    log.commit(7)  # a checkpoint that was then lost: the run resumes from step 6
    assert [r["step"] for r in read_history(run)] == list(range(1, 8))
    resumed = MetricsLog(run, total_steps=9, log_every=3, resume_step=6, offset={"step": 6})
    for s in range(7, 10):
        resumed.log(s, {"loss": float(s)}, samples=4)
    resumed.commit(9)
    resumed.close()
    assert [r["step"] for r in read_history(run)] == list(range(1, 10))
    from alip.data.storage import resolve

    tb = resolve(f"{run}/tensorboard")
    import pyarrow.fs as pafs

    assert any(i.size > 0 for i in tb.fs.get_file_info(pafs.FileSelector(tb.path, recursive=True)))


def test_plot_has_the_unweighted_infonce_panel(tmp_path):
    assert ("InfoNCE (unweighted)", ("infonce_raw", "infonce_caption")) in PLOTTED
    history = [{"step": s, "loss": 1.0 / s, "infonce_raw": 2.0 - s / 10, "infonce_caption": 1.5 - s / 20}
               for s in range(1, 6)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = plot_history(history, tmp_path / "p.png")
    assert out.stat().st_size > 0
    # Re-draw to inspect: the InfoNCE panel holds both unweighted curves with their values.
    fig_before = set(plt.get_fignums())
    orig_close = plt.close
    captured = {}
    plt.close = lambda fig=None: captured.setdefault("fig", fig)
    try:
        plot_history(history, tmp_path / "q.png")
    finally:
        plt.close = orig_close
    ax = captured["fig"].axes[1]
    assert ax.get_title() == "InfoNCE (unweighted)"
    assert {line.get_label(): list(line.get_ydata()) for line in ax.lines} == {
        "infonce_raw": [r["infonce_raw"] for r in history], "infonce_caption": [r["infonce_caption"] for r in history]}
    orig_close(captured["fig"])
    assert set(plt.get_fignums()) == fig_before
