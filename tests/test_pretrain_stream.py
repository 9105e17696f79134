"""The pretraining data stream, config flags and metrics log, without Ray: per-epoch permutations,
resume positions in global samples, each rank's fixed slice of every global batch (whatever the
worker count), the windowed shuffle, the reader and the job's read task, worker ranges, boolean
flags, required --config/--data, the metrics JSONL cut back to a checkpoint's offset, and the
plot's unweighted InfoNCE panel."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from alip.pretrain.config import config_from_args, parse_workers
from alip.pretrain.metrics import PLOTTED, MetricsLog, host_records, plot_history, read_history
from alip.pretrain.stream import (
    ReadUnit, batch_shares, epoch_order, locate, n_rank_items, plan_reads, rank_items, rank_positions, rank_slice,
    read_positions, read_trace, shuffle_positions, total_steps,
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


@pytest.mark.parametrize("G, W", [(24, 1), (24, 2), (24, 5), (7, 3), (128, 8), (10, 10)])
def test_rank_r_trains_a_fixed_slice_of_each_global_batch(G, W):
    """Rank r's rows for step s are exactly stream positions [s G + off_r, s G + off_r + share_r):
    the ranks' slices tile the global batch, so the step's rows are the same at every W."""
    shares = batch_shares(G, W)
    assert sum(shares) == G and max(shares) - min(shares) <= 1
    offsets = np.cumsum([0] + shares[:-1])
    for s in (0, 1, 5, 37):
        slices = [rank_slice(s, G, W, r) for r in range(W)]
        assert slices == [(s * G + offsets[r], s * G + offsets[r] + shares[r]) for r in range(W)]
        assert sorted(p for a, b in slices for p in range(a, b)) == list(range(s * G, (s + 1) * G))
    for r in range(W):  # a run of steps: step by step, each step the rank's slice
        got = rank_positions(3, 4, G, W, r)
        assert list(got) == [p for s in range(3, 7) for p in range(*rank_slice(s, G, W, r))]
    with pytest.raises(ValueError, match="cannot split a global batch of 3 over 4 workers"):
        batch_shares(3, 4)


def test_rank_items_cover_exactly_the_remaining_steps():
    items = rank_items(first_step=5, end_step=30, share=12, min_rows=64)  # 6 steps (72 rows) an item
    assert [(i["first_step"], i["steps"]) for i in items] == [(5, 6), (11, 6), (17, 6), (23, 6), (29, 1)]
    assert rank_items(7, 7, 12) == []
    assert [i["steps"] for i in rank_items(0, 3, 512)] == [1, 1, 1]  # big shares: one step an item
    for first, end, share, min_rows in [(5, 30, 12, 64), (7, 7, 12, 16), (0, 3, 512, 16), (3, 1000, 5, 16)]:
        assert n_rank_items(first, end, share, min_rows) == len(rank_items(first, end, share, min_rows))


def test_windowed_shuffle_permutes_inside_each_window_only():
    pos = np.arange(0, 100)
    src = shuffle_positions(pos, seed=1, window=16)
    for k in range(0, 96, 16):
        assert sorted(src[k:k + 16]) == list(range(k, k + 16))  # a permutation of the window
    assert list(src) != list(pos)
    assert list(shuffle_positions(pos[37:53], 1, 16)) == list(src[37:53])  # the same from any start
    assert list(shuffle_positions(pos, 2, 16)) != list(src)
    assert list(shuffle_positions(pos, 1, 0)) == list(pos)


def test_locate_matches_the_epoch_permutation():
    unit_idx, rows, epochs = locate(UNITS, 3, np.arange(0, 3 * ROWS))
    expect = [(int(u), r, e) for e in range(3) for u in epoch_order(len(UNITS), 3, e) for r in range(UNITS[u].rows)]
    assert list(zip(unit_idx.tolist(), rows.tolist(), epochs.tolist())) == expect


def test_reader_returns_the_rows_at_the_positions_and_traces_them(tmp_path, monkeypatch):
    data = write_reference_captioned_world(tmp_path / "d", n=40, shards=2)
    units = [ReadUnit(f"{data}/part-0000{i}.parquet", 0, 20) for i in range(2)]
    keys = [pq.read_table(u.shard).column("key").to_pylist() for u in units]
    monkeypatch.setenv("ALIP_READ_TRACE_DIR", str(tmp_path / "trace"))
    positions = rank_positions(2, 3, 8, 2, 1)  # rank 1 of 2, steps 2-4 of G = 8: crosses epoch 0 -> 1
    table = read_positions(units, 5, positions, ["key", "caption"])
    unit_idx, rows, epochs = locate(units, 5, positions)
    assert table.column("key").to_pylist() == [keys[u][r] for u, r in zip(unit_idx, rows)]
    assert table.column("epoch").to_pylist() == [p // 40 for p in positions] == epochs.tolist()
    assert [(a, b) for a, b, _ in read_trace(str(tmp_path / "trace"))] == [(20, 4), (28, 4), (36, 4)]
    shuffled = read_positions(units, 5, positions, ["key"], shuffle_window=16)
    src = shuffle_positions(positions, 5, 16)
    u2, r2, _ = locate(units, 5, src)
    assert shuffled.column("key").to_pylist() == [keys[u][r] for u, r in zip(u2, r2)]


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


def test_every_worker_count_decodes_the_same_global_batches(tmp_path):
    """The job's read task (alip.pretrain.job.read_and_decode, called directly: no Ray): for each
    step, the ranks' outputs concatenated in rank order are the same rows, decoded and augmented
    to the same bytes, at W = 1, 2 and 3 -- across an epoch boundary and with the shuffle window."""
    from alip.pretrain.job import read_and_decode
    from alip.pretrain.stream import steps_per_item

    data = write_reference_captioned_world(tmp_path / "d", n=40, shards=2)
    units = [ReadUnit(f"{data}/part-0000{i}.parquet", 0, 20) for i in range(2)]
    G, first, end = 9, 2, 7  # steps 2-6 read positions 18-62: epoch 0 -> 1

    def global_batches(W: int, window: int) -> list[list[bytes]]:
        per_rank = []
        for r in range(W):
            share = batch_shares(G, W)[r]
            out = {}
            for i in range(len(rank_items(first, end, share))):
                got = read_and_decode(i, first, end, units, 7, G, W, r, window, 32, 77)
                assert got["image"].dtype == np.uint8 and len(got["image"]) % share == 0
                for k, v in got.items():
                    out.setdefault(k, []).append(v)
            images = np.concatenate(out["image"])
            assert len(images) == (end - first) * share and steps_per_item(share) >= 1
            per_rank.append([images[s * share:(s + 1) * share] for s in range(end - first)])
        return [[img.tobytes() for r in range(W) for img in per_rank[r][s]] for s in range(end - first)]

    for window in (0, 16):
        one = global_batches(1, window)
        assert all(len(b) == G for b in one) and len({x for b in one for x in b}) == len(one) * G
        assert global_batches(2, window) == one
        assert global_batches(3, window) == one
    assert global_batches(1, 16) != global_batches(1, 0)  # the window does shuffle


def test_an_undecodable_row_keeps_every_step_at_its_share(tmp_path, caplog):
    """A corrupt image is skipped (with a warning) and its step is filled up from the step's other
    rows: the ranks' shares are fixed by the config, so a step must never come up short or borrow
    rows of the next step."""
    import pyarrow as pa

    from alip.pretrain.job import read_and_decode

    data = write_reference_captioned_world(tmp_path / "d", n=16, shards=1)
    shard = f"{data}/part-00000.parquet"
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[3] = b"not an image"
    pq.write_table(table.set_column(table.column_names.index("image"), "image",
                                    pa.array(images, type=table.schema.field("image").type)), shard)
    units = [ReadUnit(shard, 0, 16)]
    got = read_and_decode(0, 0, 2, units, 0, 8, 1, 0, 0, 32, 77)
    assert len(got["image"]) == len(got["raw_tokens"]) == 16
    assert "skipping row" in caplog.text
    bad_step = 0 if int(np.flatnonzero(locate(units, 0, np.arange(16))[1] == 3)[0]) < 8 else 1
    step = [img.tobytes() for img in got["image"][bad_step * 8:(bad_step + 1) * 8]]
    other = [img.tobytes() for img in got["image"][(1 - bad_step) * 8:(2 - bad_step) * 8]]
    assert len(set(step)) == 7 and len(set(other)) == 8  # one row repeated, only in the bad row's step
