"""The pretraining job's config: a YAML preset + command-line overrides -> PretrainConfig.

Presets live in configs/<name>.yaml (tiny, vit-b-32, vit-b-16); `--config` is required (a run's
size is never guessed). Every field of PretrainConfig and of its nested TrainConfig can be
overridden from the command line with its own flag, e.g. `--num-workers 2-8 --lr 5e-4
--global-batch-size 1024`; boolean fields are `--x` / `--no-x`. No Ray here: validated before any
worker starts.

Workers: `num_workers: 8` (fixed) or `num_workers: 2-8` (elastic: Ray Train starts once 2 workers
can be placed, shrinks when a node is lost and grows back when nodes return). The global batch is a
property of the run: with W workers rank r holds `split_global_batch(G, W)[r]` rows of it (G // W,
plus one for the first G % W ranks), so every W in the range trains on the same global batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from alip.training import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# A preset may name its data/storage as "<required: ...>": a reminder, never a bucket anyone owns.
PLACEHOLDER = "<required"


def parse_workers(value) -> tuple[int, int]:
    """`8` -> (8, 8) fixed; `"2-8"` -> (2, 8) elastic. Errors say what is accepted."""
    if isinstance(value, bool):
        raise ValueError(f"num_workers must be a count like 8 or a range like 2-8, got {value!r}")
    if isinstance(value, int):
        lo = hi = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(value))
        if not m:
            raise ValueError(f"num_workers must be a count like 8 or a range like 2-8, got {value!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if lo < 1 or hi < lo:
        raise ValueError(f"num_workers {value!r}: need 1 <= min <= max")
    return lo, hi


@dataclass
class PretrainConfig:
    data: str | None = None  # captioned dataset (Parquet shards), local or s3://; required
    run_name: str = "alip"
    storage_path: str | None = None  # checkpoints, metrics, export: <storage_path>/<run_name>; required
    num_workers: str = "2"  # "8" fixed or "2-8" elastic (min-max)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    data_cpus: float = 0.5  # per read task of a rank (read + decode + augment + tokenise)
    checkpoint_every: int = 100  # steps
    keep_checkpoints: int = 2
    max_failures: int = 3  # real failures (crashes) tolerated; preemptions do not count (unlimited)
    preemption_check_every: int = 5  # steps between get_preemption_info() polls (a barrier of all ranks)
    elastic_resize_interval_s: float = 10.0  # how often Ray Train looks for room to grow an elastic group
    min_node_uptime_s: float = 30.0  # a joining node is used for growth once it has been up this long
    log_every: int = 10
    shuffle_buffer_mb: float = 256.0  # per worker local shuffle buffer, bounded in bytes (0 = off)
    eval_samples: int = 300  # per built-in world zero-shot task at the end (0 = skip)
    export: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        lo, hi = parse_workers(self.num_workers)
        self.num_workers = str(lo) if lo == hi else f"{lo}-{hi}"

    @property
    def min_workers(self) -> int:
        return parse_workers(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        return parse_workers(self.num_workers)[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    def validate(self) -> None:
        for name, flag in (("data", "--data"), ("storage_path", "--storage-path")):
            value = getattr(self, name)
            if not value or str(value).startswith(PLACEHOLDER):
                raise ValueError(
                    f"{name} is required: pass {flag} (a local path or s3://YOUR-BUCKET/...); "
                    "the GPU presets ship no default bucket"
                )
        if self.max_workers > self.train.global_batch_size:
            raise ValueError(
                f"num_workers {self.num_workers}: more workers than samples in the global batch "
                f"{self.train.global_batch_size}"
            )
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        if self.min_node_uptime_s < 0 or self.elastic_resize_interval_s <= 0:
            raise ValueError("min_node_uptime_s must be >= 0 and elastic_resize_interval_s > 0")
        if self.preemption_check_every < 1:
            raise ValueError("preemption_check_every must be >= 1")
        if self.shuffle_buffer_mb < 0:
            raise ValueError("shuffle_buffer_mb must be >= 0")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name must be a non-empty name without '/', got {self.run_name!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown pretraining config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> dict:
    """A preset by name (configs/<name>.yaml) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown config preset {name_or_path!r}: no {path}; presets: {', '.join(list_presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config fields")
    return data


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser_type(annotation) -> tuple[typing.Callable, bool]:
    """(converter, is_bool) for a dataclass field annotation given as a string."""
    a = str(annotation).replace(" ", "")
    if a.startswith("bool"):
        return bool, True
    if a.startswith("int"):
        return (lambda s: None if s.lower() == "none" else int(s)), False
    if a.startswith("float"):
        return float, False
    return str, False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alip pretrain",
        description="ALIP pretraining on Ray Train (DDP). A preset sets every field; flags override it.",
    )
    p.add_argument("--config", required=True,
                   help=f"preset name ({', '.join(list_presets())}) or YAML path (required)")
    for group, cls in (("job", PretrainConfig), ("training", TrainConfig)):
        g = p.add_argument_group(group)
        for f in fields(cls):
            if f.name == "train":
                continue
            conv, is_bool = _parser_type(f.type)
            default = f"(default from preset; built-in default {f.default!r})" \
                if f.default is not dataclasses.MISSING else None
            if is_bool:
                # --use-gpu / --no-use-gpu: a flag takes no value, so `--use-gpu ture` is an error.
                g.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=default)
            else:
                g.add_argument(_flag(f.name), dest=f.name, type=conv, default=None, metavar=f.name.upper(),
                               help=default)
    return p


def config_from_args(argv: list[str] | None = None) -> PretrainConfig:
    args = build_parser().parse_args(argv)
    data = load_preset(args.config)
    train = dict(data.pop("train", {}) or {})
    train_names = {f.name for f in fields(TrainConfig)}
    for key, value in vars(args).items():
        if key == "config" or value is None:
            continue
        if key in train_names:
            train[key] = value
        else:
            data[key] = value
    data["train"] = TrainConfig.from_dict(train)
    cfg = PretrainConfig.from_dict(data)
    cfg.validate()
    if not cfg.storage_path.startswith("s3://"):
        cfg.storage_path = os.path.abspath(cfg.storage_path)
    return cfg
