"""`alip eval` / ray_jobs/evaluate.py: a checkpoint + datasets -> results.json + paper-style tables.

    alip eval --checkpoint runs/tiny/export --datasets world
    alip eval --checkpoint runs/b32/export --compare runs/b32-clip/export --name ALIP --compare-name CLIP \\
        --datasets zeroshot-11 linear-probe-26 retrieval --data-root /data/eval

With Ray (the default) every (model, dataset) pair is one Ray task (num_gpus=1 when the cluster has
GPUs); ``--no-ray`` runs the same per-dataset function in this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alip.eval.datasets import DATA_ROOT_ENV
from alip.eval.linear_probe import LinearProbeConfig
from alip.eval.registry import SUITES, expand_tasks
from alip.eval.suite import EvalOptions, evaluate, format_table

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """One evaluation run. ``checkpoint``/``compare``: an ALIP export dir (local or s3://), an open_clip
    ``local-dir:`` path, or ``random:<config>`` (a random init of that architecture, e.g. a chance-level
    baseline). ``out_dir`` and ``options.data_root`` may be ``s3://`` (cluster jobs)."""

    checkpoint: str
    datasets: list[str] = field(default_factory=lambda: ["world"])
    name: str | None = None  # row label in the tables; default: derived from the checkpoint
    compare: str | None = None  # second model, shown as another row (e.g. the CLIP baseline)
    compare_name: str | None = None
    out_dir: str = "runs/eval"
    use_ray: bool = True
    ray_address: str | None = None  # None: attach to RAY_ADDRESS / start a local Ray
    cpus_per_task: float = 1.0
    allow_missing: bool = False  # exit 0 even when some datasets are not on disk
    options: EvalOptions = field(default_factory=lambda: EvalOptions(skip_missing=True))

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError("checkpoint is required: an export directory, local-dir:<path> or random:<config>")
        self.jobs = expand_tasks(self.datasets)  # validate names early, before any model is loaded


def _label(ref: str, given: str | None) -> str:
    if given:
        return given
    ref = ref[len("local-dir:"):] if ref.startswith("local-dir:") else ref
    p = Path(ref.rstrip("/"))
    return p.parent.name if p.name == "export" and p.parent.name else (p.name or ref)


def _load(ref: str, seed: int):
    import torch

    from alip.model import load_model

    torch.manual_seed(seed)  # random:<config> builds a random model: same seed -> same baseline
    return load_model(ref)


def run_evaluation(cfg: EvalConfig) -> dict:
    """Evaluate cfg.checkpoint (and cfg.compare) and write ``results.json`` + ``results.md`` to
    cfg.out_dir. Returns the report dict (also what results.json holds)."""
    t0 = time.time()
    models = {_label(cfg.checkpoint, cfg.name): cfg.checkpoint}
    if cfg.compare:
        label = _label(cfg.compare, cfg.compare_name)
        if label in models:
            label += " (compare)"
        models[label] = cfg.compare
    # The comparison row goes first, like the paper's CLIP-then-ALIP rows.
    order = list(models)[::-1]
    log.info("evaluating %s on %d dataset jobs", ", ".join(models), len(cfg.jobs))
    if cfg.use_ray:
        from alip.eval.ray_runner import run_with_ray

        by_model = run_with_ray(models, cfg.jobs, cfg.options, ray_address=cfg.ray_address,
                                cpus_per_task=cfg.cpus_per_task, load=lambda ref: _load(ref, cfg.options.seed))
    else:
        items = [f"{p}:{d}" for p, d in cfg.jobs]
        by_model = {name: evaluate(_load(ref, cfg.options.seed), items, cfg.options) for name, ref in models.items()}
    by_model = {name: by_model[name] for name in order}
    table = format_table(by_model)
    report = {
        "models": {name: {"checkpoint": models[name], "results": by_model[name]} for name in order},
        "datasets": [f"{p}:{d}" for p, d in cfg.jobs],
        "options": asdict(cfg.options),
        "data_root": cfg.options.data_root or os.environ.get(DATA_ROOT_ENV),
        "seconds": round(time.time() - t0, 1),
        "table": table,
    }
    # --out may be s3:// (a cluster job's driver has no disk the user can read).
    from alip.eval.remote import uri_join, write_text

    write_text(uri_join(cfg.out_dir, "results.json"), json.dumps(report, indent=2, sort_keys=False, default=str))
    write_text(uri_join(cfg.out_dir, "results.md"), table)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alip eval",
        description="Zero-shot / linear-probe / retrieval evaluation with the paper's protocols.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="suites: " + ", ".join(f"{k} ({len(v)} jobs)" for k, v in SUITES.items())
        + "\nitems may also be 'protocol:dataset' (zeroshot:cifar10, linear_probe:voc2007, retrieval:mscoco)"
        " or a bare dataset name.",
    )
    p.add_argument("--checkpoint", "-c", required=True,
                   help="ALIP export dir (local or s3://), local-dir:<open_clip dir>, or random:<config> "
                   "(random init, a chance-level baseline)")
    p.add_argument("--datasets", "-d", nargs="+", default=["world"], help="suites and/or datasets (default: world)")
    p.add_argument("--name", help="row label for the checkpoint")
    p.add_argument("--compare", help="a second model shown side by side (e.g. the CLIP baseline)")
    p.add_argument("--compare-name", help="row label for --compare")
    p.add_argument("--out", default="runs/eval", help="output dir (local or s3://) for results.json and results.md")
    p.add_argument("--data-root", help=f"evaluation data root, local or s3:// (default: ${DATA_ROOT_ENV} or "
                   "./eval_data); S3 datasets are cached per worker in $ALIP_EVAL_CACHE (~/.cache/alip/eval)")
    p.add_argument("--no-ray", action="store_true", help="run in this process instead of one Ray task per dataset")
    p.add_argument("--ray-address", help="Ray cluster to attach to (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per Ray task on GPU-less clusters")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0, help="image-decoding DataLoader workers per task")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--max-samples", type=int, help="cap every split (seeded subsample): quick looks, not paper numbers")
    p.add_argument("--world-n", type=int, default=300, help="built-in world: test images per task")
    p.add_argument("--world-train-n", type=int, default=600, help="built-in world: train images per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lp-max-iter", type=int, default=1000, help="linear probe L-BFGS iterations (CLIP: 1000)")
    p.add_argument("--allow-missing", action="store_true", help="exit 0 even if some datasets are not on disk")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    options = EvalOptions(
        data_root=args.data_root, batch_size=args.batch_size, num_workers=args.workers, amp=args.amp,
        max_samples=args.max_samples, world_n=args.world_n, world_train_n=args.world_train_n, seed=args.seed,
        skip_missing=True, linear_probe=LinearProbeConfig(max_iter=args.lp_max_iter, seed=args.seed),
    )
    return EvalConfig(
        checkpoint=args.checkpoint, datasets=args.datasets, name=args.name, compare=args.compare,
        compare_name=args.compare_name, out_dir=args.out, use_ray=not args.no_ray, ray_address=args.ray_address,
        cpus_per_task=args.cpus_per_task, allow_missing=args.allow_missing, options=options,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parse argv, run, print the tables and a summary. Exit status 1 when some
    dataset could not be evaluated (unless --allow-missing), 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))  # exits 2 with usage
    from alip.model import ModelLoadError

    try:
        report = run_evaluation(cfg)
    except ModelLoadError as e:  # a bad --checkpoint/--compare: the message says what to pass instead
        print(f"alip eval: error: {e}", file=sys.stderr)
        return 2
    print(report["table"])
    n_err = sum(len(m["results"]["errors"]) for m in report["models"].values())
    n_ok = sum(len(m["results"][p]) for m in report["models"].values() for p in ("zeroshot", "linear_probe", "retrieval"))
    print(f"[eval] {n_ok} results, {n_err} not evaluated, {report['seconds']}s -> "
          f"{cfg.out_dir.rstrip('/')}/results.json")
    if n_err:
        for m in report["models"].values():
            for job, msg in m["results"]["errors"].items():
                print(f"[eval] not evaluated {job}:\n  " + msg.replace("\n", "\n  "), file=sys.stderr)
    return 1 if n_err and not cfg.allow_missing else 0


if __name__ == "__main__":
    sys.exit(main())
