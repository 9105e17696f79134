"""The caption job's manifest: what an output folder was made from (no Ray, no I/O here).

``<output>/_caption_job.json`` holds the job's identity and pins every input shard::

    {"version": 2, "input": "s3://b/world", "format": "parquet", "rows_per_unit": 512,
     "captioner": "<captioner id: model + dtype + image size + generation settings>",
     "sources": {"s3://b/world/world-00000.parquet":
                   {"size": 123, "etag": "...", "rows": 1000,          # (local: "mtime_ns")
                    "units": [{"name": "world-00000-00000", "start": 0, "stop": 512, ...}, ...]}}}

Each run compares the input it finds now with the pins (:func:`pin_input`):

* a pinned shard that is gone or whose size/etag/mtime changed is an error naming it --
  captions of the old content must not be mixed with rows of the new content;
* shards that are not pinned yet (appended to the input) are planned and pinned; only their
  units are new work (earlier units stay done), so a growing dataset is captioned by increments;
* the units of pinned shards come from the manifest, not from re-reading the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from alip.captioning.config import CaptionJobError
from alip.captioning.output import check_same_job
from alip.captioning.plan import WorkUnit, check_unique_names

MANIFEST_VERSION = 2
#: Manifest fields that identify the job: a different value is a different job.
IDENTITY = ("input", "format", "captioner", "rows_per_unit")
#: Source fields that pin a shard's content (whichever the storage reports).
PIN_FIELDS = ("size", "etag", "mtime_ns")
_NAMED = 5  # how many changed/removed shards an error lists by name


class InputChangedError(CaptionJobError):
    """Input shards pinned by an earlier run of this job were changed or removed."""


@dataclass
class PinnedInput:
    """The job's units (pinned ones first, in shard order) and the manifest to write."""

    units: list[WorkUnit]
    added: list[str]  # shards pinned by this run (all of them on a fresh output)
    manifest: dict


def _pin(version: dict) -> dict:
    return {k: version[k] for k in PIN_FIELDS if k in version}


def _describe(old: dict, new: dict) -> str:
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in PIN_FIELDS
                     if old.get(k) != new.get(k) and (k in old or k in new))


def pin_input(
    existing: dict | None,
    identity: dict,
    versions: dict[str, dict],
    plan_new: Callable[[list[str]], dict[str, list[WorkUnit]]],
    where: str,
) -> PinnedInput:
    """Reconcile the input found now (``versions``: shard -> size + etag/mtime, in shard order)
    with the manifest of an earlier run (``existing``, None on a fresh output).

    ``plan_new(shards)`` plans the units of shards that are not pinned yet. Raises
    :class:`CaptionJobError` for a different job, :class:`InputChangedError` for changed or
    removed shards (both name what differs).
    """
    missing_identity = [k for k in IDENTITY if k not in identity]
    if missing_identity:
        raise ValueError(f"identity lacks {missing_identity}")
    existing = existing or {}
    if existing:
        check_same_job(existing, identity, where)
    pinned: dict = existing.get("sources") or {}  # a version-1 manifest pinned nothing
    removed = sorted(s for s in pinned if s not in versions)
    changed = sorted(s for s in pinned if s in versions and _pin(pinned[s]) != _pin(versions[s]))
    if removed or changed:
        parts = []
        if changed:
            parts.append(f"{len(changed)} changed since they were captioned: " + "; ".join(
                f"{s} ({_describe(pinned[s], versions[s])})" for s in changed[:_NAMED])
                + (f"; ... {len(changed) - _NAMED} more" if len(changed) > _NAMED else ""))
        if removed:
            parts.append(f"{len(removed)} removed: " + ", ".join(removed[:_NAMED])
                         + (f", ... {len(removed) - _NAMED} more" if len(removed) > _NAMED else ""))
        raise InputChangedError(
            f"input shards pinned by the earlier run of this job into {where!r} differ: "
            + "; ".join(parts) + ". Their captions would mix old and new content. Restore those shards, "
            "caption into a new output folder, or pass --overwrite to recaption everything."
        )
    added = [s for s in versions if s not in pinned]
    planned = plan_new(added) if added else {}
    sources = {}
    units: list[WorkUnit] = []
    for shard in versions:  # shard order: pinned and new shards interleave as the listing sorts them
        if shard in pinned:
            entry = pinned[shard]
            shard_units = [WorkUnit.from_item(dict(item, shard=shard)) for item in entry["units"]]
        else:
            shard_units = planned[shard]
            entry = dict(_pin(versions[shard]), rows=sum(u.rows or 0 for u in shard_units))
            entry["units"] = [{k: v for k, v in u.to_item().items() if k != "shard"} for u in shard_units]
        sources[shard] = entry
        units += shard_units
    check_unique_names(units)
    manifest = dict(identity, version=MANIFEST_VERSION, units=len(units), sources=sources)
    return PinnedInput(units, added, manifest)
