"""The caption job's driver: validate, plan, skip finished units, run the pipeline, summarise.

In-process: ``run_captioning(CaptionJobConfig(input=..., output=...)) -> summary dict``.
Command line: ``alip caption ...`` / ``python ray_jobs/caption.py ...`` -> :func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from collections.abc import Callable

from alip.captioning.config import CaptionJobConfig
from alip.captioning.plan import SUCCESS, SUMMARY, OutputLayout, plan_units
from alip.data.dataset import write_json
from alip.data.storage import ensure_dir, resolve


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
    fmt, units = plan_units(cfg)
    layout = OutputLayout(cfg.output)
    ensure_dir(layout.root)
    if cfg.overwrite:
        log(f"[caption] --overwrite: removed {layout.clear()} file(s) of an earlier run")
    manifest = {"input": resolve(cfg.input).uri, "format": fmt, "captioner": captioner.name,
                "rows_per_unit": cfg.rows_per_unit, "units": len(units)}
    resumed = layout.check_manifest(manifest)
    stale = layout.remove_stale_temp_files()
    done = layout.done_units() & {u.name for u in units}
    pending = [u for u in units if u.name not in done]
    skipped_captioned, skipped_rejected = layout.count_rows(sorted(done))
    log(f"[caption] {cfg.input} ({fmt}) -> {layout.root.uri} with {captioner.name}: {len(units)} unit(s), "
        f"{len(done)} already done" + (" (resuming)" if resumed else "")
        + (f", {stale} stale temp file(s) removed" if stale else ""))

    totals = {"rows": 0, "captioned": 0, "rejected": 0, "units": 0}
    t_pipeline = time.perf_counter()

    def on_unit(row: dict) -> None:
        for k in ("rows", "captioned", "rejected"):
            totals[k] += row[k]
        totals["units"] += 1
        if cfg.progress:
            rate = totals["captioned"] / max(time.perf_counter() - t_pipeline, 1e-9)
            log(f"[caption] {totals['units']}/{len(pending)} units | {row['unit']}: {row['captioned']} captioned, "
                f"{row['rejected']} rejected | total {totals['captioned']} captioned, {rate:.1f} img/s")

    if pending:
        from alip.captioning.pipeline import ensure_ray, run_pipeline

        ensure_ray(cfg.ray_address)
        t_pipeline = time.perf_counter()
        run_pipeline(cfg, captioner, pending, on_unit)
    pipeline_s = time.perf_counter() - t_pipeline
    layout.remove_stale_temp_files()
    missing = sorted({u.name for u in units} - layout.done_units())
    if missing:
        raise RuntimeError(
            f"{len(missing)} unit(s) have no output after the run (e.g. {missing[:3]}); rerun the same "
            "command to finish them"
        )
    summary = {
        "input": manifest["input"],
        "output": layout.root.uri,
        "captioner": captioner.name,
        "units": len(units),
        "units_skipped_as_done": len(done),
        "rows_in": totals["rows"] + skipped_captioned + skipped_rejected,
        "rows_captioned": totals["captioned"],
        "rows_rejected": totals["rejected"],
        "rows_skipped_as_done": skipped_captioned + skipped_rejected,
        "output_rows": totals["captioned"] + skipped_captioned,
        "rejected_rows": totals["rejected"] + skipped_rejected,
        "images_per_s": round(totals["captioned"] / pipeline_s, 2) if totals["captioned"] else 0.0,
        "pipeline_s": round(pipeline_s, 2),
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    }
    planned_rows = sum(u.rows for u in units) if all(u.rows is not None for u in units) else None
    if planned_rows is not None and planned_rows != summary["rows_in"]:
        raise RuntimeError(f"row accounting mismatch: input has {planned_rows} rows, outputs account "
                           f"for {summary['rows_in']}")
    write_json(summary, layout.root.child(SUMMARY).uri)
    with layout.root.fs.open_output_stream(layout.root.child(SUCCESS).path):
        pass
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
        f"  skipped as done    {s['rows_skipped_as_done']}",
        f"  dataset now        {s['output_rows']} captioned rows, {s['rejected_rows']} rejects",
        f"  images/s           {s['images_per_s']}  (pipeline {s['pipeline_s']} s, total {s['elapsed_s']} s)",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

_HELP = {
    "input": "input dataset: folder or s3://bucket/prefix of Parquet shards or WebDataset tars",
    "output": "output folder or s3:// prefix (rerunning the same command resumes)",
    "captioner": "builtin | blip-large | hf:<hub id|dir|s3://dir> | ofa:<dir>",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per CaptionJobConfig field (``--rows-per-unit``, ``--no-progress``, ...)."""
    parser = argparse.ArgumentParser(
        prog="alip caption", description="Caption a dataset with a Ray Data actor pool (resumable, exactly once)."
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
    """CLI entry: parse flags into a CaptionJobConfig and run it. Exit code 2 on a config/input error
    (CaptionJobError and the data layer's StorageError/DatasetError/DatasetSchemaError: all ValueErrors
    with a message that says what to fix)."""
    args = build_parser().parse_args(argv)
    cfg = CaptionJobConfig(**vars(args))
    try:
        run_captioning(cfg)
    except ValueError as exc:
        print(f"alip caption: error: {exc}", file=sys.stderr)
        return 2
    return 0
