"""The pretraining job's config: a YAML preset + command-line overrides -> PretrainConfig.

Presets live in configs/<name>.yaml (tiny, vit-b-32, vit-b-16). Every field of PretrainConfig and
of its nested TrainConfig can be overridden from the command line with its own flag, e.g.
`--num-workers 4 --lr 5e-4 --global-batch-size 1024`. No Ray here: validated before any worker starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from alip.training import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class PretrainConfig:
    data: str = "demo_out/world-captioned"  # captioned dataset (Parquet shards), local or s3://
    run_name: str = "alip"
    storage_path: str = "runs"  # checkpoints + export go to <storage_path>/<run_name>; local or s3://
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    data_cpus: float = 0.5  # per Ray Data preprocessing task (decode + augment + tokenise)
    checkpoint_every: int = 100  # steps
    keep_checkpoints: int = 2
    max_failures: int = 3  # a dead worker is replaced this many times, resuming from the last checkpoint
    log_every: int = 10
    shuffle_buffer: int = 2048  # rows, per worker (Ray Data local shuffle)
    eval_samples: int = 300  # per built-in world zero-shot task at the end (0 = skip)
    export: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)

    @property
    def per_worker_batch_size(self) -> int:
        return self.train.global_batch_size // self.num_workers

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.train.global_batch_size % self.num_workers:
            raise ValueError(
                f"global_batch_size {self.train.global_batch_size} is not divisible by num_workers "
                f"{self.num_workers}: each worker must hold the same share of the global batch"
            )
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
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
        return (lambda s: s.lower() in ("1", "true", "yes", "on")), True
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
    p.add_argument("--config", default="tiny", help=f"preset name ({', '.join(list_presets())}) or YAML path")
    for group, cls in (("job", PretrainConfig), ("training", TrainConfig)):
        g = p.add_argument_group(group)
        for f in fields(cls):
            if f.name == "train":
                continue
            conv, _ = _parser_type(f.type)
            g.add_argument(_flag(f.name), dest=f.name, type=conv, default=None, metavar=f.name.upper(),
                           help=f"(default from preset; built-in default {f.default!r})"
                           if f.default is not dataclasses.MISSING else None)
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
    if not cfg.storage_path.startswith("s3://"):
        cfg.storage_path = os.path.abspath(cfg.storage_path)
    cfg.validate()
    return cfg
