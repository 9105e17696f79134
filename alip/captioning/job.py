"""The caption job's driver: validate, plan, skip finished units, run the pipeline, summarise.

In-process: ``run_captioning(CaptionJobConfig(input=..., output=...)) -> summary dict``.
Command line: ``alip caption ...`` / ``python ray_jobs/caption.py ...`` -> :func:`main`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
import typing
from collections.abc import Callable

from alip.captioning.commit_index import CommitIndexWriter, compact, read_index
from alip.captioning.config import CaptionJobConfig
from alip.captioning.lease import OutputLease
from alip.captioning.manifest import PinnedInput, pin_input
from alip.captioning.output import SUCCESS, SUMMARY, OutputLayout, ResumeState, check_output_reachable
from alip.captioning.plan import WorkUnit, list_input, plan_shards
from alip.captioners import CaptionerConfig, captioner_id
from alip.data.dataset import shard_versions, write_bytes, write_json
from alip.data.storage import resolve


#: run_pipeline's timing entries (per-actor generate time, start-up): the summary's "timing".
TIMING_KEYS = ("generate", "first_caption_s", "first_caption_rows")


def run_captioning(cfg: CaptionJobConfig, log: Callable[[str], None] | None = print) -> dict:
    """Caption ``cfg.input`` into ``cfg.output``; resumes an interrupted run of the same job.

    Every check that can fail (config, captioner spec, input shards and columns, output folder
    ownership) runs before Ray is touched. Starts a local Ray (or attaches to
    ``cfg.ray_address`` / $RAY_ADDRESS) only when there is work left, and leaves it running.
    Returns the summary that is also written to ``<output>/_summary.json``.
    """
    log = log or (lambda _msg: None)
    t_start = time.perf_counter()
    cfg.validate()
    captioner = cfg.captioner_config()
    fmt, shards = list_input(cfg)
    layout = OutputLayout(cfg.output)
    identity = {"input": resolve(cfg.input).uri, "format": fmt, "captioner": captioner_id(captioner),
                "rows_per_unit": cfg.rows_per_unit}
    planned: dict[str, list[WorkUnit]] = {}  # shard -> units, planned once even if pinning is redone

    def plan_new(new: list[str]) -> dict[str, list[WorkUnit]]:
        todo = [s for s in new if s not in planned]
        if todo:
            if len(todo) > 1 or fmt == "webdataset":
                log(f"[caption] planning {len(todo)} new input shard(s)" + (
                    " (indexing tars: one read of each)" if fmt == "webdataset" else ""))
            planned.update(plan_shards(fmt, todo, cfg.rows_per_unit))
        return {s: planned[s] for s in new}

    def pin(existing: dict | None) -> PinnedInput:
        return pin_input(None if cfg.overwrite else existing, identity, shard_versions(shards), plan_new,
                         layout.root.uri)

    # Every check that can fail (input changed, other job's output, bad shards) runs before the
    # output folder is touched; the lease then makes this run the folder's only writer.
    version = layout.manifest_version()  # before the read: a rewrite in between is seen below
    existing = layout.read_manifest()
    pinned = pin(existing)
    with OutputLease(layout.root, log=log) as lease:
        if cfg.overwrite:
            log(f"[caption] --overwrite: removed {layout.clear()} file(s) of an earlier run")
        elif layout.manifest_version() != version:  # another run rewrote it between our read and the lease
            existing = layout.read_manifest()
            pinned = pin(existing)
        if cfg.overwrite or pinned.manifest != existing:  # a resume with nothing new rewrites nothing
            layout.write_manifest(pinned.manifest)
        return _caption_pending(cfg, captioner, layout, pinned, existing is not None and not cfg.overwrite,
                                lease, log, t_start)


def _caption_pending(cfg: CaptionJobConfig, captioner: CaptionerConfig, layout: OutputLayout, pinned: PinnedInput,
                     resumed: bool, lease: OutputLease, log: Callable[[str], None], t_start: float) -> dict:
    """The part of :func:`run_captioning` that runs holding the output's lease."""
    units = pinned.units
    stale = layout.remove_stale_temp_files()
    entries, index_parts = read_index(layout.index, log) if resumed else ({}, [])
    # A fresh output holds no committed unit (read_manifest refuses a folder of Parquet files
    # without a manifest, --overwrite cleared it, the lease keeps others out): nothing to list.
    state = layout.resume_state(units, entries) if resumed else ResumeState({}, {}, 0, {}, {})
    verified, bad = state.done, state.bad
    if resumed and verified:
        log(f"[caption] {len(verified)} committed unit(s) found: {state.trusted} vouched for by the commit index, "
            f"{len(verified) - state.trusted} verified by their footers")
    compact(layout.index, index_parts, verified, entries, state.data_sizes, state.rejects_sizes)
    del entries
    index = CommitIndexWriter(layout.index)
    if bad:
        shown = "; ".join(f"{n}: {why}" for n, why in sorted(bad.items())[:5])
        log(f"[caption] {len(bad)} committed unit output(s) failed verification and will be redone ({shown}"
            + (" ..." if len(bad) > 5 else "") + ")")
        layout.discard(bad)
    done = set(verified)
    pending = [u for u in units if u.name not in done]
    skipped_captioned = sum(c for c, _ in verified.values())
    skipped_rejected = sum(r for _, r in verified.values())
    added = (f", {len(pinned.added)} shard(s) new since the last run" if resumed and pinned.added else "")
    log(f"[caption] {cfg.input} ({pinned.manifest['format']}) -> {layout.root.uri} with {captioner.name}: "
        f"{len(units)} unit(s), {len(done)} already done" + (" (resuming)" if resumed else "") + added
        + (f", {stale} stale temp file(s) removed" if stale else ""))

    totals = {"rows": 0, "captioned": 0, "rejected": 0, "units": 0}
    reject_reasons: dict[str, int] = {}  # this run's rejects by kind (full reasons: _rejects/)
    events: dict = {}
    t_pipeline = time.perf_counter()

    def on_unit(row: dict) -> None:
        lease.check()  # stop if another run took the output over (this run stalled too long)
        index.add(row)
        for k in ("rows", "captioned", "rejected"):
            totals[k] += row[k]
        totals["units"] += 1
        for kind, n in row.get("reject_reasons", {}).items():
            reject_reasons[kind] = reject_reasons.get(kind, 0) + n
        if cfg.progress:
            rate = totals["captioned"] / max(time.perf_counter() - t_pipeline, 1e-9)
            log(f"[caption] {totals['units']}/{len(pending)} units | {row['unit']}: {row['captioned']} captioned, "
                f"{row['rejected']} rejected | total {totals['captioned']} captioned, {rate:.1f} img/s")

    if pending:
        from alip.captioning.pipeline import ensure_ray, run_pipeline
        from alip.ray_setup import is_private_local_ray

        ensure_ray(cfg.ray_address)
        import ray

        check_output_reachable(layout.root, ray.nodes())  # before any unit starts
        private = is_private_local_ray()
        sized = cfg.sized(ray.cluster_resources().get("CPU", 0.0) if private else None,
                          ray.cluster_resources().get("GPU", 0.0))
        if private and (cfg.max_actors, cfg.cpus_per_actor, cfg.torch_threads) != (
                sized.max_actors, sized.cpus_per_actor, sized.torch_threads):
            log(f"[caption] local sizing: {sized.max_actors} actor(s) x {sized.threads} torch thread(s) "
                f"({sized.cpus_per_actor:g} CPU each in Ray's accounting) on this machine's "
                f"{ray.cluster_resources().get('CPU', 0.0):g} CPUs (--max-actors, --cpus-per-actor, "
                "--torch-threads override)")
        t_pipeline = time.perf_counter()
        try:
            events = run_pipeline(sized, captioner, pending, on_unit, say=log, private_ray=private)
        except BaseException:
            with contextlib.suppress(Exception):  # what this run committed: the resume reads fewer footers
                index.flush()
            raise
        index.flush()
    pipeline_s = time.perf_counter() - t_pipeline
    layout.remove_stale_temp_files()
    missing = sorted({u.name for u in units} - layout.done_units())
    if missing:
        raise RuntimeError(
            f"{len(missing)} unit(s) have no output after the run (e.g. {missing[:3]}); rerun the same "
            "command to finish them"
        )
    summary = {
        "input": pinned.manifest["input"],
        "output": layout.root.uri,
        "captioner": captioner.name,
        "units": len(units),
        "units_skipped_as_done": len(done),
        "units_redone_after_verification": len(bad),
        "shards_added": len(pinned.added) if resumed else 0,
        "rows_in": totals["rows"] + skipped_captioned + skipped_rejected,
        "rows_captioned": totals["captioned"],
        "rows_rejected": totals["rejected"],
        "rows_skipped_as_done": skipped_captioned + skipped_rejected,
        "output_rows": totals["captioned"] + skipped_captioned,
        "rejected_rows": totals["rejected"] + skipped_rejected,
        "rejected_by_reason": dict(sorted(reject_reasons.items(), key=lambda kv: -kv[1])),
        "cluster_events": {k: v for k, v in events.items() if k not in TIMING_KEYS},
        "timing": {k: v for k, v in events.items() if k in TIMING_KEYS},
        "images_per_s": round(totals["captioned"] / pipeline_s, 2) if totals["captioned"] else 0.0,
        "pipeline_s": round(pipeline_s, 2),
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    }
    planned_rows = sum(u.rows for u in units) if all(u.rows is not None for u in units) else None
    if planned_rows is not None and planned_rows != summary["rows_in"]:
        raise RuntimeError(f"row accounting mismatch: input has {planned_rows} rows, outputs account "
                           f"for {summary['rows_in']}")
    write_json(summary, layout.root.child(SUMMARY).uri)
    write_bytes(b"", layout.root.child(SUCCESS).uri)
    log(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    lines = [
        "caption job summary",
        f"  captioner          {s['captioner']}",
        f"  input -> output    {s['input']} -> {s['output']}",
        f"  units              {s['units']} ({s['units_skipped_as_done']} skipped as done)",
        f"  rows in            {s['rows_in']}",
        f"  captioned          {s['rows_captioned']}",
        f"  rejected           {s['rows_rejected']}",
        *(f"    {n:>6} x {kind}" for kind, n in s.get("rejected_by_reason", {}).items()),
        *([f"  cluster            {len(e['nodes_lost'])} node(s) lost, {e['actors_lost']} actor(s) lost, "
           f"{e['actors_retired']} retired (drain or pool shrink), {e['chunk_failures']} failed call(s), "
           f"{e['rows_poisoned']} image(s) given up"
           + (f", {e.get('pool_shrinks', 0)} pool shrink(s) for starving decode tasks" if e.get("pool_shrinks") else "")
           + (f", {e.get('stalls', 0)} stall report(s)" if e.get("stalls") else "")] if (e := s.get("cluster_events")) else []),
        f"  skipped as done    {s['rows_skipped_as_done']}",
        f"  dataset now        {s['output_rows']} captioned rows, {s['rejected_rows']} rejects",
        f"  images/s           {s['images_per_s']}  (pipeline {s['pipeline_s']} s, total {s['elapsed_s']} s)",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

_HELP = {
    "input": "input dataset: folder or s3://bucket/prefix of Parquet shards or WebDataset tars",
    "output": "output folder or s3:// prefix (rerunning the same command resumes)",
    "captioner": "builtin | blip-large | hf:<hub id|dir|s3://dir> | ofa:<dir> | noisy:error=<0..1>,generic=<0..1>:<spec>",
    "max_actors": "most caption actors (default: 1 on a cluster; one per 4 CPUs on a private local Ray); the pool "
                  "never holds more than the cluster can beside the decode tasks",
    "cpus_per_actor": "CPUs per caption actor (default: 1 on a cluster; the local rule on a private local Ray)",
    "stall_timeout_s": "seconds without any progress before the job says what waits for what and acts",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per CaptionJobConfig field (``--rows-per-unit``, ``--no-progress``, ...)."""
    parser = argparse.ArgumentParser(
        prog="alip caption", description="Caption a dataset on Ray: decode tasks feed a pool of caption actors sized "
        "to the cluster (resumable, exactly once)."
    )
    hints = typing.get_type_hints(CaptionJobConfig)
    for f in dataclasses.fields(CaptionJobConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        required = f.default is dataclasses.MISSING
        parser.add_argument(flag, dest=f.name, type=base, required=required,
                            default=None if required else f.default, help=_HELP.get(f.name))
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse flags into a CaptionJobConfig and run it. Exit code 1 when the cluster can never
    hold the job (CaptionJobStalled, which says why), 2 on a config/input error
    (CaptionJobError and the data layer's StorageError/DatasetError/DatasetSchemaError: all ValueErrors
    with a message that says what to fix)."""
    args = build_parser().parse_args(argv)
    cfg = CaptionJobConfig(**vars(args))
    from alip.captioning.scheduler import CaptionJobStalled

    try:
        run_captioning(cfg)
    except ValueError as exc:
        print(f"alip caption: error: {exc}", file=sys.stderr)
        return 2
    except CaptionJobStalled as exc:  # the cluster cannot hold the job: a clear message, no traceback
        print(f"alip caption: error: {exc}", file=sys.stderr)
        return 1
    return 0
