"""Resolve where a captioner's weights live: hub id, local directory, or an ``s3://`` directory.

S3 directories are copied once into a local cache (transformers and ModelScope load from
local folders). The cache key hashes the URI *and* the remote listing (names, sizes, mtimes),
so a re-uploaded model is fetched again instead of silently reusing stale weights.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from alip.captioners.base import CaptionerError

# A Hugging Face hub id: "name" or "org/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def cache_root() -> Path:
    """Local cache for downloaded models: $ALIP_CACHE_DIR/models or ~/.cache/alip/models."""
    base = os.environ.get("ALIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "alip")
    return Path(base) / "models"


def resolve_model_dir(model: str, *, allow_hub_id: bool = True) -> str:
    """A local directory to load from, or a hub id to pass through to transformers.

    Raises :class:`CaptionerError` naming the path when a local/S3 directory does not exist.
    """
    if model.startswith("s3://"):
        return download_s3_dir(model)
    path = model[len("file://"):] if model.startswith("file://") else model
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if os.path.exists(expanded):
        raise CaptionerError(f"captioner model path {expanded!r} is a file; pass the directory that holds config.json")
    looks_like_path = (
        model.startswith(("file://", "/", ".", "~")) or path.count("/") > 1
    )
    if looks_like_path or not allow_hub_id or not _HUB_ID.match(model):
        raise CaptionerError(
            f"captioner model directory {os.path.abspath(expanded)!r} does not exist"
            + ("" if not allow_hub_id else " (and it is not a hub id like 'org/name')")
            + "; check the path or the spec"
        )
    return model  # a hub id: transformers resolves it (its own cache, HF_HUB_OFFLINE, ...)


def download_s3_dir(uri: str) -> str:
    """Copy every object under an ``s3://bucket/prefix`` directory into the local cache."""
    from alip.data.storage import StorageError, resolve  # one place that knows S3 settings

    try:
        loc = resolve(uri.rstrip("/"))
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    except (StorageError, OSError) as exc:
        raise CaptionerError(f"cannot list captioner model directory {uri!r}: {exc}") from exc
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    if not files:
        raise CaptionerError(f"captioner model directory {uri!r} does not exist or is empty")

    digest = hashlib.sha256(uri.rstrip("/").encode())
    for info in files:
        digest.update(f"\0{info.path}\0{info.size}\0{info.mtime_ns}".encode())
    target = cache_root() / digest.hexdigest()[:24]
    if target.is_dir():
        return str(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    # Download into a temp dir next to the target and rename: concurrent actors on one
    # node may race here, and a half-written directory must never look complete.
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        prefix = loc.path.rstrip("/") + "/"
        for info in files:
            rel = info.path[len(prefix):]
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with loc.fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, length=8 << 20)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # lost a race if another process created it; else re-raise
                raise
    except OSError as exc:
        raise CaptionerError(f"cannot download captioner model {uri!r} to {target}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
