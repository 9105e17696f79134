"""The /explore page's data: browse an `alip explore` scores file, sorted and filtered, a page at a time.

Only files under `ServeConfig.explore_roots` are ever opened: the page names a file by the id that
/explore/api/files gave it ("<root number>/<path inside the root>"), checked here (no absolute
paths, no "..", *.parquet only). Images are read from the captioned data recorded in the scores
file's own metadata, by the row's shard name (a bare file name) and key; the CAM grid endpoint
serves the one configured `cam_grid` file.

Fast on 1M rows (no full load per request): the first request for a file loads its numeric score
columns (1M x float32 = 4 MB each) and the row-group offsets from the footer; a sort order
(argsort) is computed once per (score, caption column) and a filtered view once per
(sort, filter), both cached; a page then reads only the row groups that hold its rows (the job writes
row groups of 1024 rows), cached in an LRU. Images: the key -> row index of a shard is cached.
"""
from __future__ import annotations

import json
import posixpath
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from alip.serving.config import ServeConfig
from alip.serving.inputs import ClientError

METADATA_KEY = b"alip_explore"  # the same key alip.explore.job writes (kept literal: no torch import here)
PAGE = Path(__file__).with_name("static") / "explore.html"
MAX_PER_PAGE = 200
MAX_LISTED = 500

#: sort keys: a score column (per caption column where the caption is involved) or a difference
SORTS: dict[str, str] = {
    "w_s": "W_s, the sample weight (low: the model distrusts the raw text)",
    "caption_wins": "W_c - W_t (high: the image agrees with the caption more than with the raw text)",
    "raw_wins": "W_t - W_c (high: the image agrees with the raw text more than with the caption)",
    "w_t": "W_t, the raw-text pair weight", "w_c": "W_c, the caption pair weight",
    "s_tc": "s_tc, raw text vs caption", "s_it": "s_it, image vs raw text", "s_ic": "s_ic, image vs caption",
}
FILTERS = ("all", "disagree", "agree")  # disagree: W_s < 1 (where the DCG acts), agree: W_s = 1
RELATED = ("all", "related", "unrelated")


def _sniff(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "application/octet-stream"


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make: Callable[[], Any]):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    from alip.data.storage import resolve  # the data layer owns S3 settings

    loc = resolve(uri)
    return loc.fs, loc.path


class ScoresFile:
    """One scores file: metadata, row-group offsets, numeric columns (lazily), cached orders and views."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = _resolve(uri)
        self.pf = pq.ParquetFile(self.fs.open_input_file(self.path))
        raw_meta = (self.pf.metadata.metadata or {}).get(METADATA_KEY)  # the footer key-value metadata
        if raw_meta is None:
            raise ClientError(422, "not_a_scores_file", f"{posixpath.basename(self.path)} is not an "
                              "`alip explore` scores file (no alip_explore metadata)")
        self.meta = json.loads(raw_meta)
        self.captions: list[str] = list(self.meta["caption_columns"])
        self.rows = self.pf.metadata.num_rows
        counts = [self.pf.metadata.row_group(i).num_rows for i in range(self.pf.num_row_groups)]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.has_truth = "raw_text_related" in self.pf.schema_arrow.names
        self._columns: dict[str, np.ndarray] = {}
        self._orders: dict[tuple[str, str], np.ndarray] = {}
        self._views = _LRU(16)
        self._groups = _LRU(64)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ numeric columns, orders
    def column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            col = self.pf.read(columns=[name]).column(0)
            self._columns[name] = col.to_numpy() if name != "raw_text_related" else \
                col.to_numpy(zero_copy_only=False).astype(bool)
        return self._columns[name]

    def score(self, sort: str, caption: str) -> np.ndarray:
        if sort == "s_it":
            return self.column("s_it")
        if sort in ("caption_wins", "raw_wins"):
            w_c, w_t = self.column(f"w_c__{caption}"), self.column(f"w_t__{caption}")
            return w_c - w_t if sort == "caption_wins" else w_t - w_c
        return self.column(f"{sort}__{caption}")

    def order(self, sort: str, caption: str) -> np.ndarray:
        key = (sort, caption)
        if key not in self._orders:
            # ties (e.g. W_s clamped at 1): by s_tc, the quantity W_s is clamped from, then row order
            tie = self.column(f"s_tc__{caption}")
            self._orders[key] = np.lexsort((tie, self.score(sort, caption)))
        return self._orders[key]

    def view(self, sort: str, caption: str, descending: bool, filt: str, related: str) -> np.ndarray:
        def make() -> np.ndarray:
            order = self.order(sort, caption)
            if descending:
                order = order[::-1]
            mask = None
            if filt != "all":
                w_s = self.column(f"w_s__{caption}")
                mask = w_s < 1.0 if filt == "disagree" else w_s >= 1.0
            if related != "all":
                truth = self.column("raw_text_related")
                m = truth if related == "related" else ~truth
                mask = m if mask is None else mask & m
            return order if mask is None else order[mask[order]]

        return self._views.get_or((sort, caption, descending, filt, related), make)

    # ------------------------------------------------------------------ rows of a page
    def _group(self, g: int) -> pa.Table:
        cols = ["key", "raw_text", *self.captions, "source"] + (["raw_text_related"] if self.has_truth else [])
        return self._groups.get_or(g, lambda: self.pf.read_row_group(g, columns=cols))

    def rows_at(self, indices: np.ndarray) -> list[dict]:
        out = []
        groups = np.searchsorted(self.offsets, indices, side="right") - 1
        for idx, g in zip(indices.tolist(), groups.tolist()):
            t = self._group(g)
            r = idx - int(self.offsets[g])
            row = {"row": idx, "key": t.column("key")[r].as_py(), "raw_text": t.column("raw_text")[r].as_py(),
                   "captions": {c: t.column(c)[r].as_py() for c in self.captions},
                   "source": t.column("source")[r].as_py()}
            if self.has_truth:
                row["raw_text_related"] = bool(t.column("raw_text_related")[r].as_py())
            scores = {"s_it": float(self.column("s_it")[idx])}
            for c in self.captions:
                scores[c] = {k: float(self.column(f"{k}__{c}")[idx]) for k in ("s_tc", "s_ic", "w_s", "w_t", "w_c")}
            row["scores"] = scores
            out.append(row)
        return out

    def page(self, sort: str, caption: str, descending: bool, filt: str, related: str,
             page: int, per_page: int) -> dict:
        with self._lock:  # one request at a time builds/reads this file's caches
            view = self.view(sort, caption, descending, filt, related)
            total = int(len(view))
            pages = max(1, -(-total // per_page))
            if page >= pages:
                raise ClientError(422, "bad_page", f"page {page} is past the last page ({pages - 1}) of "
                                  f"{total} row(s) at {per_page} per page")
            rows = self.rows_at(view[page * per_page:(page + 1) * per_page])
        return {"total": total, "page": page, "pages": pages, "per_page": per_page, "rows": rows}


class ImageReader:
    """Reads one image from a captioned shard by key; caches each shard's key -> row index."""

    def __init__(self, size: int = 8):
        self._shards = _LRU(size)
        self._lock = threading.Lock()

    def _index(self, uri: str) -> tuple[pq.ParquetFile, dict[str, int], np.ndarray]:
        fs, path = _resolve(uri)
        pf = pq.ParquetFile(fs.open_input_file(path))
        keys = pf.read(columns=["key"]).column(0).to_pylist()
        counts = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        return pf, {k: i for i, k in enumerate(keys)}, np.concatenate([[0], np.cumsum(counts)])

    def read(self, data: str, source: str, key: str) -> bytes:
        if not source or "/" in source or "\\" in source or source in (".", "..") or not source.endswith(".parquet"):
            raise ClientError(422, "bad_source", f"scores row names an invalid shard {source!r}")
        uri = data.rstrip("/") + "/" + source
        with self._lock:
            try:
                pf, index, offsets = self._shards.get_or(uri, lambda: self._index(uri))
            except (OSError, ValueError) as e:
                raise ClientError(404, "image_not_found", f"cannot read shard {source} of {data}: {e}") from e
            if key not in index:
                raise ClientError(404, "image_not_found", f"key {key!r} is not in {source} of {data}")
            i = index[key]
            g = int(np.searchsorted(offsets, i, side="right") - 1)
            return pf.read_row_group(g, columns=["image"]).column(0)[i - int(offsets[g])].as_py()


@dataclass
class _Root:
    uri: str
    is_file: bool


def _int(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise ClientError(422, "bad_parameter", f"{name} must be an integer, got {value!r}") from None
    if not lo <= n <= hi:
        raise ClientError(422, "bad_parameter", f"{name} must be in [{lo}, {hi}], got {n}")
    return n


def _choice(value: str | None, name: str, choices, default: str) -> str:
    value = value or default
    if value not in choices:
        raise ClientError(422, "bad_parameter", f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


class Explorer:
    """The scores files under the configured roots, opened on demand and cached."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.roots = [_Root(r, r.endswith(".parquet")) for r in config.explore_roots]
        self._files = _LRU(4)
        self._lock = threading.Lock()
        self.images = ImageReader()

    def list_files(self) -> list[dict]:
        out = []
        for i, root in enumerate(self.roots):
            try:
                fs, path = _resolve(root.uri)
                if root.is_file:
                    if fs.get_file_info(path).type == pafs.FileType.File:
                        out.append({"id": str(i), "name": posixpath.basename(path), "root": root.uri})
                    continue
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            except (OSError, ValueError):
                continue  # an unreachable root lists nothing; opening a file from it says why
            for info in sorted(infos, key=lambda x: x.path):
                if info.type == pafs.FileType.File and info.base_name.endswith(".parquet") \
                        and not info.base_name.startswith((".", "_")):
                    rel = posixpath.relpath(info.path, path.rstrip("/"))
                    out.append({"id": f"{i}/{rel}", "name": rel, "root": root.uri})
                    if len(out) >= MAX_LISTED:
                        return out
        return out

    def uri_of(self, file_id: str | None) -> str:
        if not self.roots:
            raise ClientError(404, "explore_off", "no scores files configured: start the service with "
                              "`alip serve --explore PATH` (or explore_roots in serve/config.yaml)")
        if not file_id:
            raise ClientError(422, "bad_parameter", "file is required (an id from /explore/api/files)")
        head, _, rel = file_id.partition("/")
        if not head.isdigit() or int(head) >= len(self.roots):
            raise ClientError(404, "unknown_file", f"no scores file {file_id!r}; see /explore/api/files")
        root = self.roots[int(head)]
        if root.is_file:
            if rel:
                raise ClientError(404, "unknown_file", f"no scores file {file_id!r}; see /explore/api/files")
            return root.uri
        norm = posixpath.normpath(rel) if rel else ""
        if (not rel or rel.startswith("/") or "\\" in rel or norm.startswith("..") or norm != rel
                or not rel.endswith(".parquet")):
            raise ClientError(404, "unknown_file", f"no scores file {file_id!r}; ids come from /explore/api/files")
        return root.uri.rstrip("/") + "/" + rel

    def open(self, file_id: str | None) -> ScoresFile:
        uri = self.uri_of(file_id)
        try:  # keyed by size + mtime too: a file rewritten by a new `alip explore` run is reopened
            fs, path = _resolve(uri)
            info = fs.get_file_info(path)
        except (OSError, ValueError) as e:
            raise ClientError(404, "unknown_file", f"scores file {file_id!r} cannot be reached: {e}") from e
        if info.type != pafs.FileType.File:
            raise ClientError(404, "unknown_file", f"scores file {file_id!r} does not exist")

        def make() -> ScoresFile:
            try:
                return ScoresFile(uri)
            except FileNotFoundError as e:
                raise ClientError(404, "unknown_file", f"scores file {file_id!r} does not exist") from e
            except (OSError, pa.ArrowInvalid) as e:
                raise ClientError(422, "not_a_scores_file", f"cannot read scores file {file_id!r}: {e}") from e

        with self._lock:
            return self._files.get_or((uri, info.size, info.mtime_ns), make)


def explore_router(config: ServeConfig, page_html: str | None = None) -> APIRouter:
    """/explore (the page) and /explore/api/* (JSON, images, the CAM grid). Sync routes: Parquet reads
    run in FastAPI's thread pool, off the event loop."""
    explorer = Explorer(config)
    router = APIRouter()

    @router.get("/explore", include_in_schema=False)
    def explore_page() -> HTMLResponse:
        html = page_html if page_html is not None else (PAGE.read_text() if PAGE.is_file() else None)
        if html is None:
            raise ClientError(404, "not_found", f"the explorer page {PAGE} is missing from this installation")
        return HTMLResponse(html)

    @router.get("/explore/api/files", summary="Scores files of `alip explore` under the configured roots")
    def files() -> dict:
        return {"files": explorer.list_files(), "cam_grid": bool(config.cam_grid),
                "sorts": SORTS, "filters": list(FILTERS), "related": list(RELATED)}

    @router.get("/explore/api/rows", summary="One page of a scores file, sorted and filtered")
    def rows(file: str | None = None, sort: str | None = None, caption: str | None = None,
             order: str | None = None, filter: str | None = None, related: str | None = None,
             page: str | None = None, per_page: str | None = None) -> dict:
        sf = explorer.open(file)
        sort_ = _choice(sort, "sort", list(SORTS), "w_s")
        caption_ = _choice(caption, "caption column", sf.captions, sf.captions[0])
        order_ = _choice(order, "order", ["asc", "desc"], "asc")
        filt = _choice(filter, "filter", FILTERS, "all")
        rel = _choice(related, "related", RELATED, "all")
        if rel != "all" and not sf.has_truth:
            raise ClientError(422, "bad_parameter", "this scores file has no raw_text_related column to filter on")
        per = _int(per_page, "per_page", 20, 1, MAX_PER_PAGE)
        pg = _int(page, "page", 0, 0, 10**9)
        out = sf.page(sort_, caption_, order_ == "desc", filt, rel, pg, per)
        out.update(file=file, sort=sort_, caption=caption_, order=order_, filter=filt, related=rel,
                   captions=sf.captions, has_truth=sf.has_truth, rows_in_file=sf.rows,
                   model=sf.meta.get("model"), truth=sf.meta.get("truth"))
        return out

    @router.get("/explore/api/image", summary="The image of one row of a scores file (from the captioned data)")
    def image(file: str | None = None, row: str | None = Query(None)) -> Response:
        sf = explorer.open(file)
        i = _int(row, "row", -1, 0, max(sf.rows - 1, 0))
        if i < 0:
            raise ClientError(422, "bad_parameter", "row is required")
        with sf._lock:
            r = sf.rows_at(np.array([i]))[0]
        data = explorer.images.read(sf.meta["data"], r["source"], r["key"])
        return Response(data, media_type=_sniff(data), headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/explore/api/cam", summary="The configured CAM grid PNG (e.g. from `alip cam`)")
    def cam() -> Response:
        if not config.cam_grid:
            raise ClientError(404, "no_cam_grid", "no CAM grid configured (alip serve --cam-grid PNG)")
        try:
            fs, path = _resolve(config.cam_grid)
            with fs.open_input_stream(path) as f:
                data = f.read()
        except (OSError, ValueError) as e:
            raise ClientError(404, "no_cam_grid", f"the configured CAM grid cannot be read: {e}") from e
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})

    return router
