"""`alip explore`: score every sample of a captioned dataset with a trained model's gates (Ray Data).

    alip explore --model runs/demo-alip/export --data demo_out/world-captioned --out demo_out/explore/scores.parquet

Per sample: s_tc, s_it, s_ic and W_s, W_t, W_c (alip.explore.scoring: the training gates with the
export's final momentum means), for every caption column (`caption`, `caption_*`: e.g. two
captioners side by side). Ray Data reads the shards and scores them in tasks (each worker process
loads the model once, for all the tasks it runs); the driver streams their batches into ONE Parquet
file with small row groups (ROW_GROUP rows), which the service's /explore page reads a page at a time.

The scores file holds key, raw_text, the caption column(s), `source` (the shard file name in the
captioned data) and the scores, plus `raw_text_related` when the data has it (the built-in world's
truth). Images are NOT copied: the page reads each image from the captioned data by source + key
(the data's location is in the file's metadata), which keeps the scores file small (1M rows: tens
of MB instead of the images' GBs) and the images at full quality. Metadata (`alip_explore` in the
Parquet key-value metadata): data, model, caption columns, gate settings, summary.
"""
from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alip.explore.scoring import (GateSettings, GateSettingsError, add_counts, gate_accuracy_from_counts, gate_counts,
                                  gate_scores, score_columns, truth_figure)

ROW_GROUP = 1024  # rows per Parquet row group: a page of the explorer reads only the groups it shows
METADATA_KEY = b"alip_explore"
TRUTH = "raw_text_related"
LABELS = ("shape", "colour", "pattern")  # the built-in world's labels: with them, per-row truth of every text


class ExploreError(ValueError):
    """Bad input to `alip explore`: the message says what and how to fix it."""


@dataclass
class ExploreConfig:
    model: str
    data: str
    out: str
    caption_columns: list[str] = field(default_factory=list)  # empty: every `caption` / `caption_*` column
    batch_size: int = 256
    actors: int = 1
    cpus_per_actor: float = 1.0
    ray_address: str | None = None


def detect_caption_columns(schema: pa.Schema, wanted: list[str] | None = None) -> list[str]:
    strings = {f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)}
    if wanted:
        missing = [c for c in wanted if c not in strings]
        if missing:
            raise ExploreError(f"caption column(s) {missing} not in the data (string columns: {sorted(strings)})")
        return list(wanted)
    found = sorted(c for c in strings if c == "caption" or (c.startswith("caption_") and c != "captioner"))
    if not found:
        raise ExploreError(f"no caption column in the data (columns: {schema.names}); caption it first "
                           "with `alip caption`, or name the column(s) with --caption-columns")
    return (["caption"] if "caption" in found else []) + [c for c in found if c != "caption"]


class Scorer:
    """Loads the export once, then scores pyarrow batches (:func:`score_batch` keeps one per process)."""

    def __init__(self, model: str, caption_columns: list[str], settings: dict, threads: int = 1):
        import torch

        from alip.model import get_tokenizer, image_transform, load_model

        torch.set_num_threads(max(1, threads))
        self.model = load_model(model).eval()
        self.tokenizer = get_tokenizer(self.model)
        self.transform = image_transform(self.model, train=False)
        self.captions = caption_columns
        self.settings = GateSettings.from_export({"gates": settings})

    def __call__(self, batch: pa.Table) -> pa.Table:
        import io

        import torch
        from PIL import Image

        images = torch.stack([self.transform(Image.open(io.BytesIO(b)).convert("RGB"))
                              for b in batch.column("image").to_pylist()])
        with torch.no_grad():
            img = self.model.encode_image(images)
            raw = self.model.encode_text(self.tokenizer(batch.column("raw_text").to_pylist()))
            caps = {c: self.model.encode_text(self.tokenizer(batch.column(c).to_pylist())) for c in self.captions}
        scores = gate_scores(img, raw, caps, self.settings)
        paths = batch.column("path").to_pylist()
        cols = {"key": batch.column("key"), "raw_text": batch.column("raw_text")}
        cols.update({c: batch.column(c) for c in self.captions})
        cols["source"] = pa.array([posixpath.basename(p) for p in paths], pa.string())
        if TRUTH in batch.column_names:
            cols[TRUTH] = batch.column(TRUTH)
        if TRUTH in batch.column_names and all(label in batch.column_names for label in LABELS):
            cols.update(_truth_columns(batch, self.captions))
        cols.update({k: pa.array(v) for k, v in scores.items()})
        return pa.table(cols)


def _truth_columns(batch: pa.Table, captions: list[str]) -> dict[str, pa.Array]:
    """Which of each row's texts is right about what (alip.data.world_truth), per caption column."""
    from alip.data.world_truth import truth_columns

    labels = batch.select(list(LABELS)).to_pylist()
    raw, related = batch.column("raw_text").to_pylist(), batch.column(TRUTH).to_pylist()
    out: dict[str, pa.Array] = {}
    for c in captions:
        t = truth_columns(raw, batch.column(c).to_pylist(), labels, related)
        out["raw_text_truth"] = pa.array(t["raw_text_truth"], pa.string())
        out[f"caption_truth__{c}"] = pa.array(t["caption_truth"], pa.string())
        out[f"caption_wrong__{c}"] = pa.array(t["caption_wrong"], pa.bool_())
        out[f"raw_text_adds__{c}"] = pa.array(t["raw_text_adds"], pa.bool_())
    return out


def _truth_schema(captions: list[str]) -> list[tuple[str, pa.DataType]]:
    return [("raw_text_truth", pa.string())] + [
        (f"{name}__{c}", kind) for c in captions
        for name, kind in (("caption_truth", pa.string()), ("caption_wrong", pa.bool_()), ("raw_text_adds", pa.bool_()))]


#: this worker process's Scorer, kept for the next tasks it runs: ((its arguments), scorer)
_PROCESS_SCORER: tuple[tuple, Scorer] | None = None


def score_batch(batch: pa.Table, *, model: str, caption_columns: list[str], settings: dict,
                threads: int = 1) -> pa.Table:
    """A Ray Data task's body: ``Scorer(...)(batch)`` with the scorer of this worker process, built
    (the model loaded) by the first task that runs here and kept for the tasks after it."""
    global _PROCESS_SCORER
    key = (model, tuple(caption_columns), json.dumps(settings, sort_keys=True), threads)
    if _PROCESS_SCORER is None or _PROCESS_SCORER[0] != key:
        _PROCESS_SCORER = None  # one model per process: the previous one goes before the next loads
        _PROCESS_SCORER = (key, Scorer(model, list(caption_columns), settings, threads))
    return _PROCESS_SCORER[1](batch)


def _output_schema(captions: list[str], has_truth: bool, has_labels: bool = False) -> pa.Schema:
    fields_ = [("key", pa.string()), ("raw_text", pa.string())] + [(c, pa.string()) for c in captions]
    fields_.append(("source", pa.string()))
    if has_truth:
        fields_.append((TRUTH, pa.bool_()))
    if has_labels:
        fields_ += _truth_schema(captions)
    fields_ += [(c, pa.float32()) for c in score_columns(captions)]
    return pa.schema(fields_)


def run_explore(cfg: ExploreConfig, log=print) -> dict:
    import ray

    from alip.data.dataset import iter_footers, list_shard_sizes
    from alip.data.storage import resolve, resolve_all
    from alip.model import ModelLoadError, export_metadata
    from alip.ray_setup import connect_ray

    t0 = time.perf_counter()
    try:
        settings = GateSettings.from_export(export_metadata(cfg.model), where=cfg.model)
    except (ModelLoadError, GateSettingsError) as e:
        raise ExploreError(str(e)) from e
    if settings.objective not in ("alip", "alip_no_lcg", "alip_no_dcg"):
        log(f"[explore] note: {cfg.model} was trained with objective {settings.objective!r}, which does not "
            "update the gates: its momentum means are the initial 1.0 and the weights say little")
    try:
        sizes = list_shard_sizes(cfg.data, format="parquet")
    except (ValueError, OSError) as e:
        raise ExploreError(f"cannot read the captioned data: {e}") from e
    shards = list(sizes)
    first = resolve(shards[0])
    schema = pq.read_schema(first.path, filesystem=first.fs)
    for col in ("key", "image", "raw_text"):
        if col not in schema.names:
            raise ExploreError(f"{shards[0]} has no {col!r} column (columns: {schema.names}); "
                               "`alip explore` needs a captioned dataset (key, image, raw_text, caption)")
    captions = detect_caption_columns(schema, cfg.caption_columns or None)
    has_truth = TRUTH in schema.names
    has_labels = has_truth and all(label in schema.names for label in LABELS)
    # Every shard's row count from its footer, read concurrently (one request each on S3).
    rows_in = sum(meta.num_rows for _, meta in iter_footers(shards, sizes))
    if rows_in == 0:
        raise ExploreError(f"{cfg.data} has no rows to score")
    out = resolve(cfg.out)
    if not out.path.endswith(".parquet"):
        raise ExploreError(f"--out must name a .parquet file (local or s3://), got {cfg.out!r}")
    log(f"[explore] scoring {rows_in} samples of {len(shards)} shard(s) in {cfg.data}, caption column(s) "
        f"{captions}, with {cfg.model} (gate state {settings.state.to_dict()}, sharpness {settings.sharpness})")

    connect_ray(cfg.ray_address, log=log)
    # Ray Data's file listing and reading tasks take a CPU each: a pool holding every CPU would wait forever.
    total = float(ray.cluster_resources().get("CPU", 0))
    room = int((total - 1) // cfg.cpus_per_actor)
    if room < 1:
        raise ExploreError(f"this Ray has {total:g} CPU(s): {cfg.cpus_per_actor:g} per scoring task plus 1 for "
                           "reading the data do not fit; lower --cpus-per-actor")
    actors = min(cfg.actors, room)
    if actors < cfg.actors:
        log(f"[explore] {actors} scoring task(s) at a time instead of {cfg.actors}: this Ray has {total:g} CPUs and "
            "reading the data needs one")
    columns = ["key", "image", "raw_text"] + captions + ([TRUTH] if has_truth else []) + \
        (list(LABELS) if has_labels else [])
    ds = ray.data.read_parquet([loc.path for loc in resolve_all(shards)], filesystem=first.fs, include_paths=True)
    ds = ds.select_columns(columns + ["path"])
    # Scoring runs in Ray Data TASKS (at most `actors` at a time), each worker process loading the
    # model once (score_batch). Not a Ray Data actor pool: its actors restart forever (max_restarts=-1,
    # Ray Data 2.60's default) with constructor arguments Ray Data puts in the object store, which
    # Ray's core worker flags at ERROR level on this driver's console ("has constructor arguments in
    # the object store and max_restarts > 0", ray-project/ray#53727; a C++ line on the driver's own
    # stderr, which no filter reaches), and after a node loss a restarted actor can wait forever for
    # the lost node's resources (measured for the caption job's pool, alip/captioning/scheduler.py).
    # Switching restarts off needs Ray Data's deprecated `ray_remote_args`. A task lost with its node
    # is retried elsewhere by Ray Data.
    ds = ds.map_batches(score_batch, fn_kwargs=dict(model=cfg.model, caption_columns=captions,
                                                    settings=settings.to_dict(), threads=int(cfg.cpus_per_actor)),
                        batch_size=cfg.batch_size, batch_format="pyarrow",
                        compute=ray.data.TaskPoolStrategy(size=actors), num_cpus=cfg.cpus_per_actor)

    out_schema = _output_schema(captions, has_truth, has_labels)
    local = not out.is_s3
    target = out.path + ".tmp" if local else out.path
    if local:
        os.makedirs(os.path.dirname(os.path.abspath(target)) or ".", exist_ok=True)
    rank_scores: dict[str, list[np.ndarray]] = {c: [] for c in captions}
    truth: list[np.ndarray] = []
    # Streaming counts (no per-row arrays on the driver): the share of W_c > W_t, and with the world's
    # labels the gate-accuracy table (alip.explore.scoring.gate_accuracy).
    counts: dict[str, dict | None] = {c: None for c in captions}
    done, last = 0, time.perf_counter()
    with pq.ParquetWriter(target, out_schema, filesystem=out.fs, compression="zstd") as writer:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            batch = batch.select(out_schema.names).cast(out_schema)
            writer.write_table(batch, row_group_size=ROW_GROUP)
            n = batch.num_rows
            unrelated = ~batch.column(TRUTH).to_numpy(zero_copy_only=False).astype(bool) if has_truth \
                else np.zeros(n, bool)
            if has_truth:  # per-row scores stay on the driver only for the truth figure (world data)
                for c in captions:
                    rank_scores[c].append(batch.column(f"s_tc__{c}").to_numpy())
                truth.append(unrelated)
            for c in captions:
                wrong, adds = ((batch.column(f"{k}__{c}").to_numpy(zero_copy_only=False).astype(bool)
                                for k in ("caption_wrong", "raw_text_adds")) if has_labels
                               else (np.zeros(n, bool), np.zeros(n, bool)))
                counts[c] = add_counts(counts[c], gate_counts(
                    *(batch.column(f"{w}__{c}").to_numpy() for w in ("w_s", "w_t", "w_c")), unrelated, wrong, adds))
            done += batch.num_rows
            if time.perf_counter() - last > 5 or done == rows_in:
                last = time.perf_counter()
                log(f"[explore] {done}/{rows_in} samples scored ({done / max(last - t0, 1e-9):.0f}/s)")
        summary = {"rows": done, "data": cfg.data, "model": cfg.model, "out": cfg.out,
                   "caption_columns": captions, "gates": settings.to_dict()}
        if has_truth and done:
            unrelated = np.concatenate(truth)
            summary["truth"] = {c: truth_figure(np.concatenate(rank_scores[c]), unrelated) for c in captions}
        if done:
            accuracy = {c: gate_accuracy_from_counts(counts[c]) for c in captions}
            summary["share_caption_over_raw"] = {c: accuracy[c]["share_caption_over_raw"] for c in captions}
            if has_labels:
                summary["gate_accuracy"] = accuracy
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        writer.add_key_value_metadata({METADATA_KEY: json.dumps(summary).encode()})
    if local:
        os.replace(target, out.path)
    for c, fig in summary.get("truth", {}).items():
        log(f"[explore] {c}: unrelated raw texts among the 10% lowest W_s: {fig['unrelated_lowest_w_s']:.1%}, "
            f"among the 10% highest: {fig['unrelated_highest_w_s']:.1%} (overall {fig['unrelated_overall']:.1%})")
    for c, share in summary.get("share_caption_over_raw", {}).items():
        log(f"[explore] {c}: W_c > W_t (the caption weighs more than the raw text) on {share:.1%} of the samples "
            "(the paper: 27.6% of YFCC15M)")
    for c, acc in summary.get("gate_accuracy", {}).items():
        for name, what in (("lcg_unrelated", "W_s < 1 flags an unrelated raw text"),
                           ("dcg_wrong_caption", "W_t > W_c flags a wrong caption"),
                           ("dcg_raw_adds", "W_t > W_c flags a raw text right where the caption is not")):
            pr = acc[name]
            log(f"[explore] {c}: {what}: precision {pr['precision']:.1%}, recall {pr['recall']:.1%} "
                f"({pr['positives']} such samples)")
    log(f"[explore] wrote {done} rows to {cfg.out} in {summary['seconds']}s")
    return summary


def parse_args(argv: list[str]) -> ExploreConfig:
    p = argparse.ArgumentParser(prog="alip explore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an `alip pretrain` export dir (local or s3://)")
    p.add_argument("--data", required=True, help="captioned dataset folder (local or s3://)")
    p.add_argument("--out", required=True, help="scores file to write, *.parquet (local or s3://)")
    p.add_argument("--caption-columns", default="", help="comma-separated (default: caption, caption_*)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--actors", type=int, default=1,
                   help="scoring tasks at a time (each worker process loads the model once)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--ray-address", default=None, help="attach to a cluster (default $RAY_ADDRESS, else a local Ray)")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.actors < 1 or a.cpus_per_actor <= 0:
        p.error("--batch-size and --actors must be >= 1 and --cpus-per-actor > 0")
    return ExploreConfig(model=a.model, data=a.data, out=a.out,
                         caption_columns=[c.strip() for c in a.caption_columns.split(",") if c.strip()],
                         batch_size=a.batch_size, actors=a.actors, cpus_per_actor=a.cpus_per_actor,
                         ray_address=a.ray_address)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        summary = run_explore(cfg)
    except ExploreError as e:
        print(f"alip explore: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "gates"}, indent=2))
    return 0


__all__ = ["ExploreConfig", "ExploreError", "run_explore", "main"]
