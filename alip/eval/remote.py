"""Evaluation data roots on S3: the one dataset a task needs is copied to a local cache first.

The loaders in :mod:`alip.eval.datasets` read local files lazily (tar members by byte offset,
ImageFolder files one by one), which is what keeps a large test set out of memory. For an
``s3://`` data root the task's dataset folder (``<root>/<dirname>`` or ``<root>/wds/<name>``) is
downloaded once with pyarrow's S3 filesystem (the same settings as every other S3 access:
alip.data.storage) into ``$ALIP_EVAL_CACHE`` (default ``~/.cache/alip/eval``) on the machine that
runs the task, then read locally. A later run re-downloads only files whose size changed, so a
Ray worker evaluating the same dataset again costs one listing.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from alip.data.storage import join, resolve

CACHE_ENV = "ALIP_EVAL_CACHE"


def is_remote(root: str | os.PathLike) -> bool:
    return str(root).startswith("s3://")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "alip" / "eval").expanduser()


def remote_type(uri: str) -> pafs.FileType:
    """File, Directory (a prefix holding objects) or NotFound."""
    loc = resolve(uri)
    return loc.fs.get_file_info(loc.path).type


def remote_glob(uri: str, suffix: str, prefix: str = "") -> list[str]:
    """Names of the files directly under ``uri`` that start with ``prefix`` and end with ``suffix``."""
    loc = resolve(uri)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    names = [i.base_name for i in infos if i.type == pafs.FileType.File]
    return sorted(n for n in names if n.startswith(prefix) and n.endswith(suffix))


def fetch_folder(uri: str) -> Path:
    """Copy every object under ``uri`` (recursively) into the local cache; returns the local folder.

    Files already there with the same size are kept. Each file is written to a temporary name
    and renamed, so an interrupted download never leaves a truncated file that a later run
    would trust."""
    loc = resolve(uri)
    local = cache_root() / "s3" / loc.path
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"{uri} holds no files")
    for info in files:
        rel = info.path[len(loc.path):].lstrip("/")
        dest = local / rel
        if dest.is_file() and dest.stat().st_size == info.size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        with loc.fs.open_input_stream(info.path) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, length=8 << 20)
        os.replace(tmp, dest)
    return local


def write_text(uri: str, text: str) -> str:
    """Write ``text`` to a local path or ``s3://`` key (parents created); returns the URI."""
    loc = resolve(uri)
    if not loc.is_s3:
        os.makedirs(os.path.dirname(loc.path) or ".", exist_ok=True)
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(text.encode())
    return loc.uri


def uri_join(base: str, name: str) -> str:
    return join(base, name)
