"""The caption job's typed config and its validation (no Ray, no I/O beyond cheap checks)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from alip.captioners import CaptionerConfig, CaptionerError, parse_spec
from alip.data.images import DEFAULT_MAX_PIXELS


class CaptionJobError(ValueError):
    """The caption job cannot start (bad config, input or output); raised before Ray starts."""


#: CaptionJobConfig fields that override the captioner spec's generation settings when not None.
GENERATION_FIELDS = ("num_beams", "max_new_tokens", "min_new_tokens", "no_repeat_ngram_size", "prompt",
                     "image_size", "dtype")


@dataclass
class CaptionJobConfig:
    """Everything the caption job needs. Re-running with the same config resumes the same job.

    Work is split into *units*: a whole input shard, or a fixed row range of one
    (``rows_per_unit``). A unit is read, decoded, captioned and written as one output file;
    it is the granularity of retries and of resume, and ``rows_per_unit`` is pinned in the
    output folder's manifest (changing it would change the unit boundaries).
    """

    input: str
    output: str
    captioner: str = "builtin"  # builtin | blip-large | hf:<id|dir|s3://dir> | ofa:<dir>
    input_format: str = "auto"  # auto | parquet | webdataset
    batch_size: int = 32  # images per captioner forward pass
    rows_per_unit: int = 512  # max rows per work unit (Parquet shards and tars are split into row ranges);
    # a unit travels as one block: memory per unit in flight ~ rows x (encoded + decoded image)
    min_actors: int = 1  # the pool holds min(max_actors, units left, what the cluster can hold beside
    max_actors: int | None = None  # the decode tasks) actors (alip/captioning/pool.py); None: see sized()
    gpus_per_actor: float = 0.0  # > 0 runs the captioner on cuda
    cpus_per_actor: float | None = None  # None: 1 on a cluster; the local rule on a private local Ray (sized())
    decode_cpus: float = 0.5  # per decode task; fractional so decode + actors fit small boxes
    torch_threads: int | None = None  # per actor; None = max(1, round(cpus_per_actor)) (local rule: sized())
    # Generation overrides (None keeps the spec's value).
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    no_repeat_ngram_size: int | None = None
    prompt: str | None = None
    image_size: int | None = None  # also the size the decode tasks resize to (None: no resize)
    dtype: str | None = None  # fp32 | fp16 | bf16
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are rejected (decompression bombs)
    max_unit_attempts: int = 3  # captioner crashes/errors an image may cause before it is rejected
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a private local Ray; "auto": a `ray start` cluster here
    overwrite: bool = False  # delete this job's earlier output in `output` and start afresh
    stall_timeout_s: float = 120.0  # nothing completes this long: say what waits for what, then act
    progress: bool = True  # one line per committed unit

    def validate(self) -> None:
        for name in ("input", "output", "captioner"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise CaptionJobError(f"{name} must be a non-empty string, got {value!r}")
        if self.input_format not in ("auto", "parquet", "webdataset"):
            raise CaptionJobError(f"input_format must be auto, parquet or webdataset, got {self.input_format!r}")
        for name in ("batch_size", "rows_per_unit", "min_actors", "max_actors", "max_pixels", "max_unit_attempts"):
            if name == "max_actors" and self.max_actors is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CaptionJobError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise CaptionJobError(f"max_actors ({self.max_actors}) < min_actors ({self.min_actors})")
        cpus = 1.0 if self.cpus_per_actor is None else self.cpus_per_actor
        if self.gpus_per_actor < 0 or cpus < 0 or self.decode_cpus <= 0:
            raise CaptionJobError("gpus_per_actor/cpus_per_actor must be >= 0 and decode_cpus > 0")
        if self.gpus_per_actor == 0 and cpus == 0:
            raise CaptionJobError("a CPU captioning actor needs cpus_per_actor > 0")
        if not isinstance(self.stall_timeout_s, (int, float)) or self.stall_timeout_s <= 0:
            raise CaptionJobError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise CaptionJobError(f"torch_threads must be >= 1 or None, got {self.torch_threads!r}")
        if _norm(self.input) == _norm(self.output):
            raise CaptionJobError(f"output {self.output!r} is the input folder; write captions to a new folder")
        if self.dtype == "fp16" and self.gpus_per_actor == 0:
            raise CaptionJobError("dtype fp16 needs GPU actors (--gpus-per-actor > 0); use fp32 or bf16 on CPU")
        self.captioner_config()  # spec + overrides are checked here, before any Ray work

    def captioner_config(self) -> CaptionerConfig:
        """The captioner's config with this job's overrides and device applied."""
        try:
            config = parse_spec(self.captioner)
            overrides = {f: getattr(self, f) for f in GENERATION_FIELDS if getattr(self, f) is not None}
            overrides["batch_size"] = self.batch_size
            overrides["device"] = "cuda" if self.gpus_per_actor > 0 else "cpu"
            config = config.with_overrides(**overrides)
        except CaptionerError as exc:
            raise CaptionJobError(f"captioner {self.captioner!r}: {exc}") from exc
        # A local model folder that is missing fails here in a second instead of in every actor.
        model = config.model
        if not model.startswith("s3://") and (os.path.isabs(model) or model.startswith(".")) \
                and not os.path.isdir(model):
            hint = (" The built-in captioner is shipped in alip/captioners/builtin_model "
                    "(scripts/train_builtin_captioner.py builds it)." if config.label == "builtin" else "")
            raise CaptionJobError(f"captioner model folder {model!r} does not exist.{hint}")
        return config

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, round(1.0 if self.cpus_per_actor is None else self.cpus_per_actor))

    def sized(self, local_cpus: float | None = None, local_gpus: float = 0.0) -> CaptionJobConfig:
        """This config with the pool's unset sizes filled in (a copy; set values are kept).

        On a cluster (``local_cpus`` None): 1 CPU per actor, ``max_actors`` = ``min_actors``.

        On a private local Ray with ``local_cpus`` CPUs (the local rule: use the machine):
        - CPU actors: one actor per 4 CPUs (at least one); together they take every CPU but the
          decode + commit reserve (``decode_cpus`` + 0.25) in Ray's accounting, and each runs
          ``local_cpus // actors`` torch threads, so generation uses every core (decode tasks are
          short and share them). 2 CPUs: 1 actor, 1.25 CPU, 2 threads; 8 CPUs: 2 actors, 3.6 CPU,
          4 threads each.
        - GPU actors: one per ``gpus_per_actor`` of the machine's GPUs, 1 CPU each.
        """
        if local_cpus is None:
            return dataclasses.replace(self, max_actors=self.max_actors or self.min_actors,
                                       cpus_per_actor=1.0 if self.cpus_per_actor is None else self.cpus_per_actor)
        if self.gpus_per_actor > 0:
            actors = self.max_actors or max(self.min_actors, int(local_gpus // self.gpus_per_actor) or 1)
            return dataclasses.replace(self, max_actors=actors,
                                       cpus_per_actor=1.0 if self.cpus_per_actor is None else self.cpus_per_actor)
        actors = self.max_actors or max(self.min_actors, int(local_cpus // 4) or 1)
        cpus = self.cpus_per_actor
        if cpus is None:
            reserve = self.decode_cpus + min(self.decode_cpus, 0.25)
            cpus = max(0.25, math.floor((local_cpus - reserve) / actors * 100) / 100)
        threads = self.torch_threads or (max(1, int(local_cpus // actors)) if self.cpus_per_actor is None
                                         else max(1, round(cpus)))
        return dataclasses.replace(self, max_actors=actors, cpus_per_actor=cpus, torch_threads=threads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _norm(uri: str) -> str:
    if uri.startswith("s3://"):
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri[7:] if uri.startswith("file://") else uri))
