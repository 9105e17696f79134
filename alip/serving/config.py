"""Typed settings of the HTTP service: request limits, batching, cache, auth.

One dataclass, filled from `serve/config.yaml` application args, `alip serve` flags or Python.
Unknown keys are an error (a typo such as `max_body_byte` would otherwise silently keep the
default limit).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

TOKEN_ENV = "ALIP_SERVE_TOKEN"


class ServeConfigError(ValueError):
    """A service setting that is unknown or out of range."""


def _absolute(path: str) -> str:
    return path if path.startswith("s3://") else os.path.abspath(path)


@dataclass(frozen=True)
class ServeConfig:
    # --- request limits (each violation is a 4xx, never a 500) ---
    #: Whole request body, counted as it streams in (Content-Length AND chunked uploads) -> 413.
    max_body_bytes: int = 16 * 1024 * 1024
    #: Decoded image size; larger headers are refused before any pixel is decoded -> 413.
    #: (Pillow's own bomb limit is ~89 Mpx; we refuse earlier and also catch Pillow's error.)
    max_image_pixels: int = 24_000_000
    max_images: int = 32
    max_texts: int = 256
    #: Decoded pixels (width x height from each header, summed) across all images of one request,
    #: checked before any image is decoded -> 413. 32 images of 24 Mpx would be ~2.3 GB of RGB.
    max_request_pixels: int = 48_000_000
    max_labels: int = 256
    max_templates: int = 100
    #: Characters per label, and labels x templates prompts per classify request (each prompt is
    #: one text forward on a class-cache miss) -> 422.
    max_label_chars: int = 200
    max_class_prompts: int = 8192
    #: Characters per text, checked before tokenising (tokenising a 10 MB string is itself slow).
    #: Filled-in prompts are checked arithmetically, before any string is built.
    max_text_chars: int = 2000
    # --- batching (Serve's @serve.batch, images and texts separately) ---
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    # --- class text features: computed in batches of this many prompts (a cancelled request
    # stops between batches), cached in an LRU keyed by (labels, templates) ---
    class_batch_size: int = 256
    class_cache_size: int = 128
    # --- runtime ---
    torch_threads: int = 0  # 0: leave torch's default (Ray sets OMP_NUM_THREADS from num_cpus)
    #: Bearer token; None reads ALIP_SERVE_TOKEN from the replica's environment, "" disables auth.
    auth_token: str | None = None
    # --- the /explore page (alip/serving/explore.py) ---
    #: Scores files of `alip explore` the page may open: each a *.parquet file or a folder searched for
    #: them, local or s3://. Nothing outside these is ever read (the page picks files by id).
    explore_roots: tuple[str, ...] = ()
    #: A PNG the page shows (e.g. `alip cam`'s grid); served by /explore/api/cam and nothing else.
    cam_grid: str | None = None

    def __post_init__(self) -> None:
        roots = self.explore_roots
        if isinstance(roots, str):  # one root given as a plain string (YAML, CLI)
            roots = [roots]
        if not isinstance(roots, (list, tuple)) or not all(isinstance(r, str) and r.strip() for r in roots):
            raise ServeConfigError(f"explore_roots must be a list of paths or s3:// URIs, got {roots!r}")
        # absolute where the config is first built (the driver): Serve replicas run in another directory
        object.__setattr__(self, "explore_roots", tuple(_absolute(r) for r in roots))
        if self.cam_grid is not None and not (isinstance(self.cam_grid, str) and self.cam_grid.endswith(".png")):
            raise ServeConfigError(f"cam_grid must be the path of a .png file, got {self.cam_grid!r}")
        if self.cam_grid is not None:
            object.__setattr__(self, "cam_grid", _absolute(self.cam_grid))
        positive = ("max_body_bytes", "max_image_pixels", "max_request_pixels", "max_images", "max_texts",
                    "max_labels", "max_templates", "max_label_chars", "max_class_prompts", "max_text_chars",
                    "max_batch_size", "class_batch_size", "class_cache_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ServeConfigError(f"serve setting {name} must be a positive integer, got {value!r}")
        if not self.batch_wait_timeout_s >= 0:
            raise ServeConfigError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s!r}")
        if self.torch_threads < 0:
            raise ServeConfigError(f"torch_threads must be >= 0, got {self.torch_threads!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "ServeConfig":
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ServeConfigError(f"unknown serve setting(s) {unknown}; known: {sorted(known)}")
        out: dict[str, Any] = {}
        for name, value in values.items():
            # YAML / env / CLI hand strings around; coerce to the field's declared type.
            ftype = known[name].type
            try:
                if ftype == "int":
                    value = int(value)
                elif ftype == "float":
                    value = float(value)
            except (TypeError, ValueError) as e:
                raise ServeConfigError(f"serve setting {name} must be a {ftype}, got {value!r}") from e
            out[name] = value
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def resolved_token(self) -> str | None:
        """The token to require, read where the service runs (a replica's env, not the driver's)."""
        token = self.auth_token if self.auth_token is not None else os.environ.get(TOKEN_ENV, "")
        return token or None
